"""One installation per node (issue 17, item 3): a cage of another address pool or
another state dir is refused while the node's cages share the rules of the first.

The shared rules (the NAT, the cage-to-cage REJECT) cover one pool, and two state
dirs lease the same subnets independently; serving a second pool would need the
shared rules to follow every pool in use. JobCage refuses it instead, with the two
pools and state dirs named, and the shared rules carry their owner (the table's
comment and an owner set on nftables, the MASQUERADE rule's comment on x_tables).
"""

from __future__ import annotations

import ipaddress
import os

import pytest

from jobcage.errors import ConfigError
from jobcage.network import NetworkCage
from jobcage.testing.networld import CAMPUS_HOST, INTERNET_HOST, SERVER_PORT

from .conftest_network import run_in_cage

pytestmark = [pytest.mark.root, pytest.mark.network]

PORT = str(SERVER_PORT)
OTHER_POOL = "100.65.0.0/16"


def _others(net_config, tmp_path):
    """A changed pool, a second state dir with the same pool, and both changed."""
    other_dir = str(tmp_path / "other")
    return {
        "pool changed": net_config.replace(address_pool=OTHER_POOL),
        "second state dir": net_config.replace(state_dir=other_dir),
        "second installation": net_config.replace(address_pool=OTHER_POOL, state_dir=other_dir),
    }


def test_a_second_installation_is_refused_and_the_first_keeps_working(
    node, net_config, job_id, tmp_path
):
    first = NetworkCage.create(job_id + "a", net_config)
    try:
        for n, (what, other) in enumerate(_others(net_config, tmp_path).items()):
            with pytest.raises(ConfigError) as refused:
                NetworkCage.create(f"{job_id}o{n}", other)
            text = str(refused.value)
            for config in (net_config, other):
                assert str(config.address_pool) in text, what
                assert os.path.realpath(config.state_dir) in text, what
            # Nothing of the refused cage is left: its netns, its lease.
            assert not os.path.exists(f"/run/netns/jobcage-{job_id}o{n}"), what
            leases = os.path.join(other.state_dir, "network", "leases")
            expected = [str(first.lease_index)] if other.state_dir == net_config.state_dir else []
            assert sorted(os.listdir(leases)) == expected, what
        assert run_in_cage(first.netns_path, "get", INTERNET_HOST, PORT, "1000") == "1000"
    finally:
        first.destroy()


def test_once_the_first_installations_cages_are_gone_the_other_is_served(
    node, net_config, job_id, tmp_path
):
    """The shared rules go with the last cage, and come back with the next
    installation's pool: NAT and cage-to-cage isolation for the new pool."""
    NetworkCage.create(job_id + "a", net_config).destroy()
    other = _others(net_config, tmp_path)["second installation"]
    a = NetworkCage.create(job_id + "b", other)
    try:
        b = NetworkCage.create(job_id + "c", other)
        try:
            assert a.address in ipaddress.IPv4Network(OTHER_POOL)
            # NAT for the new pool: the internet host answers it.
            assert run_in_cage(a.netns_path, "get", INTERNET_HOST, PORT, "1000") == "1000"
            assert run_in_cage(b.netns_path, "get", CAMPUS_HOST, PORT, "1000") == "1000"
            # Cage to cage, within the new pool: refused at once.
            out = run_in_cage(a.netns_path, "connect", str(b.address.ip), PORT)
            assert out == "EHOSTUNREACH", out
        finally:
            b.destroy()
    finally:
        a.destroy()

"""`jobcage doctor`'s network checks ask the library, in the calling thread's network
namespace (here the simulated node), so they report what the first cage would meet
there: not /sys/class/net, which shows the netns sysfs was mounted in."""

from __future__ import annotations

import pytest

from jobcage import doctor
from jobcage.config import Config
from jobcage.network import netns
from jobcage.testing import networld as world_mod

pytestmark = [pytest.mark.root, pytest.mark.network]


def test_uplink_and_pool_checks_see_the_nodes_links_and_routes(node, tmp_path):
    suffix = world_mod.unique_suffix()
    uplink, peer = f"jcdu{suffix}", f"jcdp{suffix}"
    route = "100.64.200.0/24"
    config = Config(
        state_dir=str(tmp_path / "state"),
        campus_networks=(world_mod.CAMPUS_NETWORK,),
        address_pool=world_mod.POOL,
        uplink=uplink,
    )
    node.exec_in(node.node, ["ip", "link", "add", uplink, "type", "veth", "peer", "name", peer])
    try:
        down = doctor.check_uplink(config)
        # Only the node has this link: a check of /sys/class/net said it did not exist.
        assert down.status is doctor.Status.WARN and "is down" in down.message, down
        for name in (uplink, peer):
            node.exec_in(node.node, ["ip", "link", "set", name, "up"])
        up = doctor.check_uplink(config)
        assert up.status is doctor.Status.OK and f"uplink {uplink} (configured), up" in up.message
        node.exec_in(node.node, ["ip", "route", "add", route, "via", world_mod.ROUTER_NODE_SIDE])
        pool = {c.name: c for c in doctor.check_addresses(config)}["address pool"]
        # The same route the first cage would refuse the pool for.
        assert netns.routes_overlapping(world_mod.POOL) == [f"{route} dev eth0"]
        assert pool.status is doctor.Status.FAIL and route in pool.message, pool
    finally:
        node.exec_in(node.node, ["ip", "route", "del", route], check=False)
        node.exec_in(node.node, ["ip", "link", "del", uplink], check=False)
    default = doctor.check_uplink(Config(state_dir=str(tmp_path / "state")))
    assert default.status is doctor.Status.OK and "uplink eth0 (from the default route)" in (
        default.message
    )


@pytest.mark.root
@pytest.mark.parametrize("backend", ["nftables", "iptables-legacy"])
def test_iptables_check_names_the_backends_own_listing(tmp_path, backend):
    """doctor names the command that shows JobCage's rules alone where the backend
    has one (its own nftables table), asked of the backend, not of its name."""
    config = Config(state_dir=str(tmp_path / "state"), firewall=backend)
    first = doctor.check_iptables(config)[0]
    if first.status == doctor.Status.FAIL:
        pytest.skip(f"no {backend} backend on this kernel: {first.message}")
    assert ("(`nft list table ip jobcage`)" in first.message) == (backend == "nftables")

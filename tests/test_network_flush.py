"""A flush of the node's firewall (issue 17, item 7): `nft flush ruleset`, which a
firewall reload does, or the x_tables equivalent (every chain flushed and deleted).

It takes every cage's rules and counters at once. JobCage notices it wherever it reads
a cage's counters (``usage()``, ``destroy()``) and in `jobcage reap` (a site's
firewall-reload hook), puts the rules back, and says in the usage that the counts have
a gap (``net_counts_gaps``, ``net_counted_since_unix``). These tests flush for real,
inside the simulated node.
"""

from __future__ import annotations

import json
import threading
import time

import pytest

from jobcage import JobCage
from jobcage.errors import NetworkError
from jobcage.network import NetworkCage
from jobcage.network import netns as netns_mod
from jobcage.network.firewall import xtables as firewall_mod
from jobcage.network.firewall.nftables import NftablesFirewall
from jobcage.network.restore import restore_lost
from jobcage.recovery import reap
from jobcage.testing import networld as world_mod
from jobcage.testing.networld import INTERNET_HOST, SERVER_PORT, wait_until

from .conftest_network import run_in_cage

pytestmark = [pytest.mark.root, pytest.mark.network]

PORT = str(SERVER_PORT)
MiB = 1 << 20
FLUSH = {
    "nftables": [["nft", "flush", "ruleset"]],
    # What a reload with iptables-legacy-restore of the site's own rules leaves.
    "iptables-legacy": [
        ["iptables-legacy", "-t", table, op] for table in ("filter", "nat") for op in ("-F", "-X")
    ],
}


def flush(node, backend: str) -> None:
    for argv in FLUSH[backend]:
        node.exec_in(node.node, argv)


def _connect(a: NetworkCage, b: NetworkCage) -> str:
    return run_in_cage(a.netns_path, "connect", str(b.address.ip), PORT, timeout=60)


def test_usage_notices_a_flush_and_puts_the_rules_back(node, net_config, job_id):
    a = NetworkCage.create(job_id + "a", net_config)
    b = NetworkCage.create(job_id + "b", net_config)
    try:
        assert _connect(a, b) == "EHOSTUNREACH"
        flush(node, net_config.firewall)
        before = time.time()
        c = a.counters()  # noticed: a's rules are back, with a gap
        assert c.net_counts_gaps == 1 and c.net_counted_since_unix >= before
        assert c.net_wan_rx_bytes == 0  # counted from the restore on
        # Fail closed: b, whose rules are not back yet, reaches nothing (not even a).
        assert _connect(b, a) in ("EHOSTUNREACH", "timeout")
        assert b.counters().net_counts_gaps == 1
        assert _connect(a, b) == "EHOSTUNREACH"  # isolation is back
        assert run_in_cage(a.netns_path, "get", INTERNET_HOST, PORT, str(MiB)) == str(MiB)
        c = a.counters()
        assert c.net_wan_rx_bytes >= MiB and c.net_counts_gaps == 1  # one gap, counted once
    finally:
        b.destroy()
        a.destroy()


def test_destroy_after_a_flush_bills_the_loss_not_zero(node, net_config, job_id):
    cage = NetworkCage.create(job_id, net_config)
    run_in_cage(cage.netns_path, "get", INTERNET_HOST, PORT, str(MiB))
    flush(node, net_config.firewall)
    final = cage.destroy()  # no error: the loss is in the bill
    assert final.net_wan_rx_bytes is None and final.net_lan_tx_packets is None
    assert final.net_counts_gaps == 1 and final.net_counted_since_unix is not None


def test_reap_puts_every_live_cages_rules_back(node, cage_config, job_id):
    """`jobcage reap` is the command for a site's firewall-reload hook."""
    config = cage_config.replace(campus_networks=(world_mod.CAMPUS_NETWORK,))
    a = JobCage(job_id + "a", network=True, config=config)
    b = JobCage(job_id + "b", network=True, config=config)
    with a, b:
        flush(node, a._net.firewall_backend)
        report = reap(config)
        assert sorted(report.restored) == sorted([a.job_id, b.job_id])
        assert not report.errors and report.live == 2
        assert _connect(a._net, b._net) == "EHOSTUNREACH"
        assert reap(config).restored == []  # whole again: nothing to do
        assert a.usage().net_counts_gaps == 1
    assert a.final_usage.net_counts_gaps == 1 and a.final_usage.net_wan_rx_bytes == 0


def test_rules_that_cannot_come_back_leave_the_cage_cut_off(node, net_config, job_id, monkeypatch):
    cage = NetworkCage.create(job_id, net_config)
    try:
        flush(node, net_config.firewall)

        def refused(*args, **kwargs):
            raise NetworkError("injected")

        monkeypatch.setattr(NftablesFirewall, "restore", refused)
        monkeypatch.setattr(firewall_mod.IptablesLegacyFirewall, "restore", refused)
        with pytest.raises(NetworkError, match="is down"):
            cage.counters()
        link = node.exec_in(node.node, ["ip", "-j", "link", "show", cage.host_veth]).stdout
        assert "UP" not in json.loads(link)[0]["flags"]
        assert run_in_cage(cage.netns_path, "connect", INTERNET_HOST, PORT) != "connected"
    finally:
        monkeypatch.undo()
        cage.destroy()


def _waiting_for_a_lock(tid: int) -> bool:
    try:
        with open(f"/proc/self/task/{tid}/wchan") as f:
            return "lock_inode_wait" in f.read()  # blocked in flock(2)
    except FileNotFoundError:
        return False


def test_a_restore_never_brings_back_a_cage_being_torn_down(
    node, cage_config, job_id, monkeypatch
):
    """A reaper (the firewall-reload hook) that looks while an owner is between
    removing its cage's rules and its netns must not put the rules back: they would
    then belong to no cage and no lease, ever."""
    config = cage_config.replace(campus_networks=(world_mod.CAMPUS_NETWORK,))
    cage = JobCage(job_id, network=True, config=config).create()
    real_remove = netns_mod.remove
    restorer: dict = {}

    def remove(name: str) -> None:
        # The cage's rules are gone now, its netns not yet: a reaper looks.
        thread = threading.Thread(target=lambda: restorer.update(result=restore_lost(config)))
        thread.start()
        restorer["thread"] = thread
        wait_until(
            lambda: not thread.is_alive() or _waiting_for_a_lock(thread.native_id),
            "the reaper to look, or to wait for the teardown",
        )
        real_remove(name)

    monkeypatch.setattr(netns_mod, "remove", remove)
    cage.destroy()
    restorer["thread"].join(timeout=30)
    assert restorer["result"] == ([], [])  # nothing put back; the node fixture checks

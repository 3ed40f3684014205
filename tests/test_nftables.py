"""The nftables backend against a real kernel, in the simulated node: the table reads
back (with the node's own `nft`) as the layout says, cages of one campus list share
it, the last-cage removal is atomic, and a table deleted by hand is reported, not
papered over. Traffic, accounting and policy are proven for both backends by
tests/test_network.py."""

from __future__ import annotations

import errno
import ipaddress

import pytest

from jobcage.config import Config
from jobcage.netlink import core, nfchannel
from jobcage.network import NetworkCage, find_orphans, remove_orphan
from jobcage.network.firewall.nftables import NftablesFirewall
from jobcage.network.firewall.nftables_layout import (
    cage_removal,
    campus_sets,
    shared_removal,
)
from jobcage.testing import networld as world_mod
from jobcage.testing.networld import CAMPUS_HOST, SERVER_PORT

from .conftest_network import run_in_cage

pytestmark = [pytest.mark.root, pytest.mark.network]


def parsed(*cidrs: str) -> tuple:
    """Campus networks as the config hands them on: parsed."""
    return tuple(ipaddress.ip_network(c) for c in cidrs)


@pytest.fixture
def nft_config(tmp_path) -> Config:
    return Config(
        state_dir=str(tmp_path / "state"),
        campus_networks=(world_mod.CAMPUS_NETWORK,),
        address_pool=world_mod.POOL,
        firewall="nftables",
    )


def nft(node, *args: str) -> str:
    return node.exec_in(node.node, ["nft", *args]).stdout


def body(listing: str) -> list[str]:
    """The statements of a `nft list chain` output, without the braces."""
    lines = [line.strip() for line in listing.splitlines()]
    return [line for line in lines if line and not line.startswith(("table", "chain", "}"))]


def test_the_table_reads_back_as_the_layout(node, nft_config, job_id):
    cage = NetworkCage.create(job_id, nft_config)
    try:
        veth, own, pool = cage.host_veth, str(cage.address.ip), world_mod.POOL
        nets, cages = campus_sets(parsed(world_mod.CAMPUS_NETWORK))
        count = "counter name {}name map @JOBCAGE-{}"
        expected = {
            "JOBCAGE-FORWARD": [
                "type filter hook forward priority filter; policy accept;",
                'iifname "jc*" jump JOBCAGE-FWD-TX',
                'oifname "jc*" jump JOBCAGE-FWD-RX',
            ],
            "JOBCAGE-FWD-TX": [
                f"iifname . ip saddr != @JOBCAGE-ADDRESS {count.format('iif', 'REFUSED-TX')} drop",
                f"ip daddr {pool} {count.format('iif', 'REFUSED-TX')} reject with icmp "
                "admin-prohibited",
                "jump JOBCAGE-FWD-TX-CAMPUS",
                f"{count.format('iif', 'WAN-TX')} accept",
                "drop",
            ],
            "JOBCAGE-FWD-TX-CAMPUS": [
                f"iifname @{cages} ip daddr @{nets} {count.format('iif', 'LAN-TX')} accept"
            ],
            "JOBCAGE-FWD-RX": [
                f"ct state ! established,related {count.format('oif', 'REFUSED-RX')} drop",
                "jump JOBCAGE-FWD-RX-CAMPUS",
                f"{count.format('oif', 'WAN-RX')} accept",
                "drop",
            ],
            "JOBCAGE-NODE-TX": [
                f"iifname . ip saddr != @JOBCAGE-ADDRESS {count.format('iif', 'REFUSED-TX')} drop",
                f"ct state established,related {count.format('iif', 'LAN-TX')} accept",
                f"iifname @JOBCAGE-NODE-ACCESS {count.format('iif', 'LAN-TX')} accept",
                f"{count.format('iif', 'REFUSED-TX')} reject with icmp admin-prohibited",
                "drop",
            ],
            "JOBCAGE-POSTROUTING": [
                "type nat hook postrouting priority srcnat; policy accept;",
                f'ip saddr {pool} oifname "eth0" masquerade',  # the node's uplink
            ],
        }
        for chain, statements in expected.items():
            assert body(nft(node, "-s", "list", "chain", "ip", "jobcage", chain)) == statements
        h = cage.plan.cage_hash
        elements = {
            "JOBCAGE-ADDRESS": f'"{veth}" . {own}',
            "JOBCAGE-LAN-TX": f'"{veth}" : "JC-{h}-LAN-TX"',
            "JOBCAGE-REFUSED-RX": f'"{veth}" : "JC-{h}-REFUSED-RX"',
            "JOBCAGE-CAGES": f'"{veth}" : "JOBCAGE-CAGES"',
            cages: f'"{veth}" : "{nets}"',
            nets: world_mod.CAMPUS_NETWORK,
        }
        for set_name, element in elements.items():
            kind = "map" if " : " in element else "set"
            assert element in nft(node, "list", kind, "ip", "jobcage", set_name), set_name
        assert f'"{veth}"' not in nft(node, "list", "set", "ip", "jobcage", "JOBCAGE-NODE-ACCESS")
        assert nfchannel.object_use("jobcage", "JOBCAGE-CAGES") == 1
    finally:
        cage.destroy()


def test_cages_of_one_campus_list_share_it_and_its_last_cage_removes_it(node, nft_config, job_id):
    nets = campus_sets(parsed(world_mod.CAMPUS_NETWORK))[0]
    other = ("198.18.0.0/15",)
    a = NetworkCage.create(job_id + "a", nft_config)
    b = NetworkCage.create(job_id + "b", nft_config)
    c = NetworkCage.create(job_id + "c", nft_config, other)
    try:
        rules = body(nft(node, "list", "chain", "ip", "jobcage", "JOBCAGE-FWD-TX-CAMPUS"))
        assert len(rules) == 2  # one per list, not per cage
        assert nfchannel.object_use("jobcage", "JOBCAGE-CAGES") == 3
        assert nfchannel.object_use("jobcage", nets) == 2
        c.destroy()  # the last of its list
        assert campus_sets(parsed(*other))[0] not in nft(node, "list", "table", "ip", "jobcage")
        assert len(body(nft(node, "list", "chain", "ip", "jobcage", "JOBCAGE-FWD-TX-CAMPUS"))) == 1
        a.destroy()  # not the last of its list: the list stays, and still counts
        assert nfchannel.object_use("jobcage", nets) == 1
        port = str(SERVER_PORT)
        assert run_in_cage(b.netns_path, "get", CAMPUS_HOST, port, "1000") == "1000"
        assert b.counters().net_lan_rx_bytes >= 1000
    finally:
        for cage in (a, b, c):
            cage.destroy()


def test_reap_removes_a_campus_list_its_last_cage_left(node, nft_config, job_id):
    """A cage whose owner died between removing its elements and its list's."""
    keep = NetworkCage.create(job_id + "k", nft_config)
    gone = NetworkCage.create(job_id + "g", nft_config, ("198.18.0.0/15",))
    try:
        nfchannel.transact(cage_removal(gone.plan))  # its elements and counters, not the list
        orphans = [o for o in find_orphans(nft_config) if o.kind == "campus"]
        assert [o.name for o in orphans] == [campus_sets(parsed("198.18.0.0/15"))[0]]
        remove_orphan(orphans[0], nft_config)
        assert [o for o in find_orphans(nft_config) if o.kind == "campus"] == []
        assert len(body(nft(node, "list", "chain", "ip", "jobcage", "JOBCAGE-FWD-TX-CAMPUS"))) == 1
    finally:
        try:
            # Its counters went above: lost, and the bill says so; the rest goes now.
            assert gone.destroy().net_counts_gaps == 1
        finally:
            keep.destroy()


def test_the_shared_part_cannot_be_removed_under_a_cage(node, nft_config, job_id):
    """The guarantee "remove the table with the last cage" rests on: the kernel refuses
    the whole transaction while a cage's chain is in the table (NLM_F_NONREC)."""
    cage = NetworkCage.create(job_id, nft_config)
    try:
        before = nft(node, "-s", "list", "ruleset")
        lists = [campus_sets(parsed(world_mod.CAMPUS_NETWORK))[0]]
        with pytest.raises(core.NetlinkError) as refused:
            nfchannel.transact(shared_removal(lists))
        assert refused.value.errno == errno.EBUSY
        assert nft(node, "-s", "list", "ruleset") == before
        assert NftablesFirewall()._remove_shared_if_unused() is False
        port = str(SERVER_PORT)
        assert run_in_cage(cage.netns_path, "get", CAMPUS_HOST, port, "1000") == "1000"
        assert cage.counters().net_lan_rx_bytes >= 1000
    finally:
        cage.destroy()


def test_a_table_deleted_by_hand_is_put_back_and_the_bill_says_so(node, nft_config, job_id):
    cage = NetworkCage.create(job_id, nft_config)
    node.exec_in(node.node, ["nft", "delete", "table", "ip", "jobcage"])
    assert cage.counters().net_counts_gaps == 1  # noticed, and put back
    node.exec_in(node.node, ["nft", "delete", "table", "ip", "jobcage"])
    final = cage.destroy()  # gone again at teardown: lost, and said so
    assert final.net_counts_gaps == 2 and final.net_wan_rx_bytes is None
    # The node fixture checks that the netns, veth and rules are gone all the same.


def test_a_hand_edited_table_goes_with_the_last_cage_unless_a_cage_arrives(
    node, nft_config, job_id, monkeypatch
):
    """With a shared chain deleted by hand, the last cage removes what is left of the
    shared part in one transaction: a cage that arrives between the last cage's look
    at the table and that removal keeps every rule it needs."""
    first = NetworkCage.create(job_id + "a", nft_config)
    nft(node, "flush", "chain", "ip", "jobcage", "JOBCAGE-OUTPUT")
    nft(node, "delete", "chain", "ip", "jobcage", "JOBCAGE-OUTPUT")
    arrived: list[NetworkCage] = []
    real_dump_chains = nfchannel.dump_chains

    def dump_chains(table: str) -> list[str]:
        chains = real_dump_chains(table)
        if not arrived:  # the fallback's look at the table: a cage arrives now
            arrived.append(NetworkCage.create(job_id + "b", nft_config))
        return chains

    monkeypatch.setattr(nfchannel, "dump_chains", dump_chains)
    try:
        first.destroy()
        monkeypatch.undo()
        [second] = arrived
        port = str(SERVER_PORT)
        assert run_in_cage(second.netns_path, "get", CAMPUS_HOST, port, "1000") == "1000"
        assert second.counters().net_lan_rx_bytes >= 1000
        assert "JOBCAGE-FORWARD" in nft(node, "list", "chains", "ip")
    finally:
        monkeypatch.undo()
        for cage in arrived:
            cage.destroy()
    # The last cage took the rest of the hand-edited table with it.
    assert "jobcage" not in nft(node, "list", "tables")


def test_counters_of_many_cages_come_from_one_dump(node, nft_config, job_id):
    cages = [NetworkCage.create(job_id + k, nft_config) for k in "abc"]
    try:
        run_in_cage(cages[1].netns_path, "get", CAMPUS_HOST, str(SERVER_PORT), "5000")
        found = NftablesFirewall().counters_many([c.plan for c in cages])
        assert found == {c.host_veth: c.counters() for c in cages}
        assert found[cages[1].host_veth].net_lan_rx_bytes >= 5000
        assert found[cages[0].host_veth].net_lan_rx_bytes == 0
    finally:
        for cage in cages:
            cage.destroy()


def test_a_long_campus_list_is_one_set(node, nft_config, job_id):
    """300 networks, none adjacent (so none merged): one set of ranges, looked up with
    one rule per direction, whatever the list's length."""
    campus = [f"10.{i // 128}.{(i % 128) * 2}.0/24" for i in range(300)]
    cage = NetworkCage.create(job_id, nft_config, campus)
    try:
        listing = nft(node, "list", "set", "ip", "jobcage", campus_sets(parsed(*campus))[0])
        assert listing.count("/24") == 300
        assert len(body(nft(node, "list", "chain", "ip", "jobcage", "JOBCAGE-FWD-TX-CAMPUS"))) == 1
    finally:
        cage.destroy()


def test_a_cage_that_lost_the_race_to_make_a_campus_list_joins_it(node, monkeypatch):
    """Two first cages of a new list both find it missing; the second one's NEWSET is
    refused (EEXIST) and it must join the list instead of failing. Replayed against
    the kernel: the second is told the list is missing once, after the first made it."""
    from jobcage.network.firewall.policy import cage_plan

    def plan(k: int):
        return cage_plan(
            cage_hash=f"{k:012x}",
            host_veth=f"jc{k:012x}h",
            address=f"100.64.0.{4 * k + 2}",
            pool=world_mod.POOL,
            campus_networks=parsed("198.18.0.0/15"),
            allow_node_access=False,
        )

    firewall, uplink = NftablesFirewall(), lambda: "eth0"
    firewall.install(plan(1), world_mod.POOL, uplink)
    real, told = nfchannel.set_exists, []

    def missing_once(table: str, name: str) -> bool:
        if not told:
            told.append(name)
            return False
        return real(table, name)

    monkeypatch.setattr(nfchannel, "set_exists", missing_once)
    try:
        firewall.install(plan(2), world_mod.POOL, uplink)
        assert told == [campus_sets(parsed("198.18.0.0/15"))[0]]
        cages = campus_sets(parsed("198.18.0.0/15"))[1]
        rules = body(nft(node, "list", "chain", "ip", "jobcage", "JOBCAGE-FWD-TX-CAMPUS"))
        assert len(rules) == 1
        members = nft(node, "list", "map", "ip", "jobcage", cages)
        assert '"jc000000000001h"' in members and '"jc000000000002h"' in members
    finally:
        firewall.remove(plan(2))
        assert firewall.remove(plan(1)) is True  # the last: the table goes

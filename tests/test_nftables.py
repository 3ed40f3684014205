"""The nftables backend against a real kernel, in the simulated node: the table reads
back (with the node's own `nft`) as the plan says, the last-cage removal is atomic,
and a table deleted by hand is reported, not papered over. Traffic, accounting and
policy are proven for both backends by tests/test_network.py."""

from __future__ import annotations

import errno

import pytest

from jobcage.config import Config
from jobcage.errors import NetworkError, TeardownError
from jobcage.network import NetworkCage, nfnl
from jobcage.network.nftables import NftablesFirewall, shared_removal

from . import networld as world_mod
from .conftest_network import run_in_cage
from .networld import CAMPUS_HOST, SERVER_PORT

pytestmark = [pytest.mark.root, pytest.mark.network]


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


def test_the_table_reads_back_as_the_plan(node, nft_config, job_id):
    cage = NetworkCage.create(job_id, nft_config)
    try:
        ftx, frx, ntx, nrx = cage.plan.chain_names
        h = cage.plan.cage_hash
        own, pool, campus = str(cage.address.ip), world_mod.POOL, world_mod.CAMPUS_NETWORK
        expected = {
            ftx: [
                f"ip saddr != {own} counter drop",
                f"ip daddr {pool} counter reject with icmp admin-prohibited",
                f'ip daddr {campus} counter name "JC-{h}-LAN-TX" accept',
                f'counter name "JC-{h}-WAN-TX" accept',
            ],
            frx: [
                f'ip saddr {campus} ct state established,related counter name "JC-{h}-LAN-RX" '
                "accept",
                f'ct state established,related counter name "JC-{h}-WAN-RX" accept',
                "counter drop",
            ],
            ntx: [
                f"ip saddr != {own} counter drop",
                f'ct state established,related counter name "JC-{h}-LAN-TX" accept',
                "counter reject with icmp admin-prohibited",
            ],
            nrx: [
                f'ct state established,related counter name "JC-{h}-LAN-RX" accept',
                "counter drop",
            ],
            "JOBCAGE-FORWARD": [
                "type filter hook forward priority filter; policy accept;",
                "iifname vmap @JOBCAGE-FWD-TX",
                "oifname vmap @JOBCAGE-FWD-RX",
                'iifname "jc*" drop',
                'oifname "jc*" drop',
            ],
            "JOBCAGE-POSTROUTING": [
                "type nat hook postrouting priority srcnat; policy accept;",
                f'ip saddr {pool} oifname "eth0" masquerade',  # the node's uplink
            ],
        }
        for chain, statements in expected.items():
            assert body(nft(node, "-s", "list", "chain", "ip", "jobcage", chain)) == statements
        element = f'"{cage.host_veth}" : jump {ftx}'
        assert element in nft(node, "list", "map", "ip", "jobcage", "JOBCAGE-FWD-TX")
    finally:
        cage.destroy()


def test_the_shared_part_cannot_be_removed_under_a_cage(node, nft_config, job_id):
    """The guarantee "remove the table with the last cage" rests on: the kernel refuses
    the whole transaction while a cage's chain is in the table (NLM_F_NONREC)."""
    cage = NetworkCage.create(job_id, nft_config)
    try:
        before = nft(node, "-s", "list", "ruleset")
        with pytest.raises(nfnl.NfnlError) as refused:
            nfnl.transact(shared_removal())
        assert refused.value.errno == errno.EBUSY
        assert nft(node, "-s", "list", "ruleset") == before
        assert NftablesFirewall()._remove_shared_if_unused() is False
        port = str(SERVER_PORT)
        assert run_in_cage(cage.netns_path, "get", CAMPUS_HOST, port, "1000") == "1000"
        assert cage.counters().net_lan_rx_bytes >= 1000
    finally:
        cage.destroy()


def test_a_table_deleted_by_hand_is_reported_and_teardown_still_finishes(node, nft_config, job_id):
    cage = NetworkCage.create(job_id, nft_config)
    node.exec_in(node.node, ["nft", "delete", "table", "ip", "jobcage"])
    with pytest.raises(NetworkError, match=r"counters .* are gone"):
        cage.counters()
    with pytest.raises(TeardownError) as failed:
        cage.destroy()
    assert "lost" in str(failed.value.errors[0])
    # The node fixture checks that the netns, veth and rules are gone all the same.


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


def test_a_long_campus_list_fits_in_one_transaction(node, nft_config, job_id):
    """Two rules per campus network: 300 networks make a ~200 KB batch of ~620
    messages, every one acked inside sendmsg, more than default socket buffers hold."""
    campus = [f"10.{i // 256}.{i % 256}.0/24" for i in range(300)]
    cage = NetworkCage.create(job_id, nft_config, campus)
    try:
        ftx = cage.plan.chain_names[0]
        assert len(body(nft(node, "list", "chain", "ip", "jobcage", ftx))) == 300 + 3
    finally:
        cage.destroy()

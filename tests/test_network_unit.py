"""Pure logic of the network cage: no root, no kernel."""

from __future__ import annotations

import ipaddress
import threading

import pytest

from jobcage.config import Config
from jobcage.errors import AddressPoolExhaustedError, ConfigError, NetworkError
from jobcage.network import NetCounters, NetworkCage
from jobcage.network.addresses import AddressPool, LeaseStore
from jobcage.network.netns import is_cage_veth, plan_resolv_conf
from jobcage.network.rules import (
    LAN_RX,
    LAN_TX,
    WAN_RX,
    WAN_TX,
    SharedPlan,
    cage_plan,
    classify,
)


def plan(campus=("192.0.2.0/24", "10.0.0.0/8"), allow_node_access=False):
    return cage_plan(
        cage_hash="0123456789ab",
        host_veth="jc0123456789abh",
        address=ipaddress.IPv4Address("100.64.0.6"),
        pool="100.64.0.0/16",
        campus_networks=campus,
        allow_node_access=allow_node_access,
    )


# -- the address pool ----------------------------------------------------------------


def test_pool_subnets_are_consecutive_30s():
    pool = AddressPool("100.64.0.0/16")
    assert pool.size == 16384
    lease = pool.lease(1)
    assert str(lease.subnet) == "100.64.0.4/30"
    assert str(lease.host) == "100.64.0.5/30" and str(lease.job) == "100.64.0.6/30"
    assert str(pool.lease(pool.size - 1).job) == "100.64.255.254/30"
    with pytest.raises(ValueError):
        pool.lease(pool.size)


def test_first_free_fills_holes_then_exhausts():
    pool = AddressPool("100.64.0.0/29")
    assert pool.size == 2
    assert pool.first_free([]) == 0
    assert pool.first_free([0]) == 1
    assert pool.first_free([1]) == 0
    with pytest.raises(AddressPoolExhaustedError, match="larger address_pool"):
        pool.first_free([0, 1])


@pytest.mark.parametrize("bad", ["nonsense", "100.64.0.1/16", "100.64.0.0/31"])
def test_bad_pool_is_a_config_error(bad):
    with pytest.raises(ConfigError, match="address_pool"):
        AddressPool(bad)


def test_pool_overlap_with_campus():
    pool = AddressPool("100.64.0.0/16")
    assert pool.overlapping(["100.64.3.0/24", "192.0.2.0/24", "100.0.0.0/8"]) == [
        "100.64.3.0/24",
        "100.0.0.0/8",
    ]


def test_leases_never_collide_across_threads(tmp_path):
    store = LeaseStore(str(tmp_path), AddressPool("100.64.0.0/24"))
    got: list[int] = []
    lock = threading.Lock()

    def take(i):
        lease, _ = store.acquire(f"job{i}")
        with lock:
            got.append(lease.index)

    threads = [threading.Thread(target=take, args=(i,)) for i in range(40)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(got) == list(range(40))
    assert store.held()[5].startswith("job")


def test_lease_release_and_first_flag(tmp_path):
    store = LeaseStore(str(tmp_path), AddressPool("100.64.0.0/24"))
    a, first_a = store.acquire("a")
    _, first_b = store.acquire("b")
    assert first_a and not first_b
    store.release(a.index, "not-a")  # someone else's lease is left alone
    assert store.held() == {0: "a", 1: "b"}
    store.release(a.index, "a")
    store.release(a.index, "a")  # idempotent
    assert store.held() == {1: "b"}
    assert store.acquire("c")[0].index == 0


# -- the rule layout -----------------------------------------------------------------


def test_cage_chains_fit_iptables_and_jumps_match_the_veth():
    p = plan()
    assert p.chain_names == (
        "JC-0123456789ab-FTX",
        "JC-0123456789ab-FRX",
        "JC-0123456789ab-NTX",
        "JC-0123456789ab-NRX",
    )
    assert all(len(n) <= 28 for n in p.chain_names)
    jumps = [(j.chain, j.rule.to_iptables()) for j in p.jumps]
    assert jumps == [
        ("JOBCAGE-FWD-TX", "-i jc0123456789abh -j JC-0123456789ab-FTX"),
        ("JOBCAGE-FWD-RX", "-o jc0123456789abh -j JC-0123456789ab-FRX"),
        ("JOBCAGE-NODE-TX", "-i jc0123456789abh -j JC-0123456789ab-NTX"),
        ("JOBCAGE-NODE-RX", "-o jc0123456789abh -j JC-0123456789ab-NRX"),
    ]


def test_forward_chains_policy_order():
    ftx, frx, ntx, nrx = (
        [r.to_iptables() for r in c.rules] for c in plan(allow_node_access=False).chains
    )
    assert ftx == [
        "! -s 100.64.0.6/32 -j DROP",
        "-d 100.64.0.0/16 -j REJECT --reject-with icmp-admin-prohibited",
        "-d 192.0.2.0/24 -j ACCEPT",
        "-d 10.0.0.0/8 -j ACCEPT",
        "-j ACCEPT",
    ]
    assert frx == [
        "-s 192.0.2.0/24 -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
        "-s 10.0.0.0/8 -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
        "-m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
        "-j DROP",
    ]
    assert ntx[-1] == "-j REJECT --reject-with icmp-admin-prohibited"
    assert nrx == ["-m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT", "-j DROP"]


def test_node_access_switch():
    ntx = plan(allow_node_access=True).chains[2]
    assert ntx.rules[-1].to_iptables() == "-j ACCEPT"
    assert ntx.rules[-1].counts == LAN_TX


def test_every_verdict_is_final_so_no_packet_walks_on():
    for chain in plan().chains:
        last = chain.rules[-1]
        assert last.target in {"ACCEPT", "DROP", "REJECT"}
        assert (last.source, last.destination, last.ctstate) == (None, None, None)


def test_shared_plan():
    shared = SharedPlan("100.64.0.0/16", "eth0")
    assert [(j.chain, j.rule.to_iptables()) for j in shared.filter_jumps] == [
        ("FORWARD", "-i jc+ -j JOBCAGE-FWD-TX"),
        ("FORWARD", "-o jc+ -j JOBCAGE-FWD-RX"),
        ("INPUT", "-i jc+ -j JOBCAGE-NODE-TX"),
        ("OUTPUT", "-o jc+ -j JOBCAGE-NODE-RX"),
    ]
    assert shared.nat_jump.rule.to_iptables() == "-s 100.64.0.0/16 -j JOBCAGE-POSTROUTING"
    assert shared.nat_chain.rules[0].to_iptables() == "-o eth0 -j MASQUERADE"


# -- counter classification ----------------------------------------------------------


def test_classify_sums_each_class_and_ignores_drops():
    p = plan()
    counters = [
        [(9, 900), (8, 800), (1, 10), (2, 20), (3, 30)],  # FTX: spoof, cage, lan, lan, wan
        [(4, 40), (5, 50), (6, 60), (7, 700)],  # FRX: lan, lan, wan, drop
        [(9, 900), (1, 1), (0, 0)],  # NTX: spoof, established, reject
        [(2, 2), (5, 500)],  # NRX: established, drop
    ]
    assert classify(p, counters) == NetCounters(
        net_lan_rx_bytes=40 + 50 + 2,
        net_lan_tx_bytes=10 + 20 + 1,
        net_wan_rx_bytes=60,
        net_wan_tx_bytes=30,
        net_lan_rx_packets=4 + 5 + 2,
        net_lan_tx_packets=1 + 2 + 1,
        net_wan_rx_packets=6,
        net_wan_tx_packets=3,
    )


def test_classify_without_campus_is_all_wan_but_the_node():
    p = plan(campus=())
    labels = [[r.counts for r in c.rules] for c in p.chains]
    assert labels == [
        [None, None, WAN_TX],
        [WAN_RX, None],
        [None, LAN_TX, None],
        [LAN_RX, None],
    ]


def test_classify_half_removed_chain_counts_what_is_there():
    p = plan(campus=())
    assert classify(p, [[(1, 1)], [], [], []]) == NetCounters()


def test_net_counters_fields_match_usage():
    from jobcage.usage import Usage

    names = {f for f in NetCounters.__dataclass_fields__}
    assert names == {f for f in Usage.__dataclass_fields__ if f.startswith("net_")}
    assert NetCounters(net_lan_rx_bytes=1) + NetCounters(net_lan_rx_bytes=2) == NetCounters(
        net_lan_rx_bytes=3
    )


# -- DNS -----------------------------------------------------------------------------


def test_resolv_conf_left_alone_when_reachable():
    assert plan_resolv_conf("nameserver 10.1.1.1\nsearch example.org\n", None) is None


def test_resolv_conf_from_systemd_resolved():
    text = plan_resolv_conf(
        "nameserver 127.0.0.53\noptions edns0 trust-ad\nsearch example.org\n",
        "nameserver 192.0.2.53\nnameserver 2001:db8::53\nsearch example.org\n",
    )
    assert text is not None
    assert "nameserver 192.0.2.53" in text and "2001:db8" not in text
    assert "127.0.0.53" not in text and "search example.org" in text


def test_resolv_conf_fallback_servers():
    text = plan_resolv_conf("nameserver 127.0.0.1\nnameserver 10.0.0.2\n", None, ["192.0.2.9"])
    assert text is not None
    servers = [line.split()[1] for line in text.splitlines() if line.startswith("nameserver")]
    assert servers == ["10.0.0.2", "192.0.2.9"]


def test_resolv_conf_nothing_known_says_what_to_set():
    text = plan_resolv_conf("nameserver 127.0.0.53\n", "nameserver 127.0.0.1\n")
    assert (
        text is not None
        and "dns_servers" in text
        and "nameserver" not in text.replace("nameserver", "", 1)
    )


# -- names and records ---------------------------------------------------------------


def test_is_cage_veth():
    assert is_cage_veth("jc0123456789abh")
    assert not is_cage_veth("jc0123456789abj")
    assert not is_cage_veth("jcfoo")
    assert not is_cage_veth("eth0")


def test_record_round_trip(tmp_path):
    cage = NetworkCage(
        job_id="1234.0",
        netns_name="jobcage-1234.0",
        host_veth="jc0123456789abh",
        address=ipaddress.IPv4Interface("100.64.0.6/30"),
        host_address=ipaddress.IPv4Interface("100.64.0.5/30"),
        lease_index=1,
        pool="100.64.0.0/16",
        campus_networks=("192.0.2.0/24",),
        allow_node_access=True,
        state_dir=str(tmp_path),
    )
    import json

    record = json.loads(json.dumps(cage.to_record()))
    again = NetworkCage.from_record(record, Config(state_dir=str(tmp_path)))
    assert again.to_record() == record
    assert again.netns_path == "/run/netns/jobcage-1234.0"
    assert again.plan == cage.plan


def test_bad_record_says_how_to_clean_up():
    with pytest.raises(NetworkError, match="ip netns del"):
        NetworkCage.from_record({"format": 1}, Config())


def test_create_refuses_pool_overlapping_campus(tmp_path):
    config = Config(state_dir=str(tmp_path), address_pool="10.0.0.0/16")
    with pytest.raises(ConfigError, match="overlaps the campus"):
        NetworkCage.create("j1", config, ["10.0.0.0/8"])
    assert not (tmp_path / "network").exists()

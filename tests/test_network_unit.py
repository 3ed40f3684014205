"""Pure logic of the network cage: no root, no kernel."""

from __future__ import annotations

import errno
import ipaddress
import struct
import threading

import pytest

from jobcage.config import Config
from jobcage.errors import (
    AddressPoolExhaustedError,
    ConfigError,
    KernelFeatureError,
    NetworkError,
    TeardownError,
)
from jobcage.ids import netns_name, veth_names
from jobcage.netlink import core, rtnl
from jobcage.network import NetCounters, NetworkCage, Orphan, nodelinks, remove_orphan, resolv
from jobcage.network import netns as netns_mod
from jobcage.network.addresses import AddressPool, LeaseStore
from jobcage.network.firewall.policy import (
    LAN_RX,
    LAN_TX,
    WAN_RX,
    WAN_TX,
    SharedPlan,
    cage_plan,
    classify,
)
from jobcage.network.netns import is_cage_veth
from jobcage.network.resolv import plan_resolv_conf


def parsed(*cidrs: str) -> tuple:
    """Campus networks as the config hands them on: parsed."""
    return tuple(ipaddress.ip_network(c) for c in cidrs)


def plan(campus=("192.0.2.0/24", "10.0.0.0/8"), allow_node_access=False):
    return cage_plan(
        cage_hash="0123456789ab",
        host_veth="jc0123456789abh",
        address=ipaddress.IPv4Address("100.64.0.6"),
        pool="100.64.0.0/16",
        campus_networks=parsed(*campus),
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


def test_a_subnet_still_held_is_skipped_not_leased(tmp_path):
    """Held (the node still routes it to an old veth): not free, though unleased."""
    store = LeaseStore(str(tmp_path), AddressPool("100.64.0.0/28"))
    held = {0, 2}
    lease, _ = store.acquire("a", lambda lease: lease.index in held)
    assert lease.index == 1 and store.held() == {1: "a"}
    assert store.acquire("b", lambda lease: lease.index in held)[0].index == 3
    with pytest.raises(AddressPoolExhaustedError, match="outlived its cage"):
        store.acquire("c", lambda lease: lease.index in held)


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
        campus_networks=parsed("192.0.2.0/24"),
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
    with pytest.raises(ConfigError, match=r"address_pool 10\.0\.0\.0/16 overlaps campus_networks"):
        NetworkCage.create("j1", config, ["10.0.0.0/8"])
    assert not (tmp_path / "network").exists()


# -- raw rtnetlink (jobcage.netlink.rtnl): encoding and answers ----------------------

# What pyroute2 0.9.7's IPRoute sent for the cage's side before (IPBatch with
# link("add", ifname="eth0", kind="veth", index=2, state="up",
# peer={"ifname": "jc0123456789abh", "net_ns_fd": 5}), link("set", index=1,
# state="up"), addr("add", index=2, address="100.64.0.2", prefixlen=30),
# route("add", gateway="100.64.0.1")), headers cut off after the flags.
PYROUTE2_CAGE_SIDE = [
    (
        rtnl.RTM_NEWLINK,
        0x605,
        "00000000020000000100000001000000"  # ifinfomsg: index 2, IFF_UP
        "090003006574683000000000"  # IFLA_IFNAME eth0
        "44001200"  # IFLA_LINKINFO
        "090001007665746800000000"  # IFLA_INFO_KIND veth
        "3400020030000100"  # IFLA_INFO_DATA, VETH_INFO_PEER
        "00000000000000000000000000000000"  # the peer's ifinfomsg
        "140003006a633031323334353637383961626800"  # IFLA_IFNAME jc0123456789abh
        "08001c0005000000",  # IFLA_NET_NS_FD 5
    ),
    (rtnl.RTM_NEWLINK, 0x5, "00000000010000000100000001000000"),
    (rtnl.RTM_NEWADDR, 0x605, "021e00000200000008000100644000020800020064400002"),
    (rtnl.RTM_NEWROUTE, 0x605, "02000000fe040001000000000800050064400001"),
]


def _cage_side_requests():
    return [
        rtnl.new_veth("eth0", 2, "jc0123456789abh", 5, up=True, what="veth"),
        rtnl.set_up(1, "lo"),
        rtnl.new_address(2, ipaddress.IPv4Interface("100.64.0.2/30"), "address"),
        rtnl.new_default_route(ipaddress.IPv4Address("100.64.0.1"), "route"),
    ]


def _kernel_message(kind: int, seq: int, body: bytes, flags: int = 0) -> bytes:
    data = struct.pack("=IHHII", 16 + len(body), kind, flags, seq, 4242) + body
    return data + b"\0" * (-len(data) % 4)


def _ack(seq: int, error: int = 0, text: str = "") -> bytes:
    """An NLMSG_ERROR as a NETLINK_CAP_ACK + NETLINK_EXT_ACK socket gets it."""
    body = struct.pack("=i", -error) + struct.pack("=IHHII", 32, 16, 5, seq, 0)
    flags = core.NLM_F_CAPPED
    if text:
        body += core.attr_str(core.NLMSGERR_ATTR_MSG, text)
        flags |= core.NLM_F_ACK_TLVS
    return _kernel_message(core.NLMSG_ERROR, seq, body, flags)


def _link_reply(seq: int, index: int, name: str, link: int | None = None) -> bytes:
    body = rtnl.ifinfomsg(index) + core.attr_str(rtnl.IFLA_IFNAME, name)
    if link is not None:
        body += core.attr_u32(rtnl.IFLA_LINK, link)
    return _kernel_message(rtnl.RTM_NEWLINK, seq, body)


def _route_reply(seq, dst, dst_len, table=254, oif=None, rta_table=None, multipath_oif=None):
    body = struct.pack("=BBBBBBBBI", 2, dst_len, 0, 0, table, 3, 0, 1, 0)
    if dst_len:
        body += core.attr(rtnl.RTA_DST, ipaddress.IPv4Address(dst).packed)
    if rta_table is not None:
        body += core.attr_u32(rtnl.RTA_TABLE, rta_table)
    if oif is not None:
        body += core.attr_u32(rtnl.RTA_OIF, oif)
    if multipath_oif is not None:
        body += core.attr(rtnl.RTA_MULTIPATH, struct.pack("=HBBi", 8, 0, 0, multipath_oif))
    return _kernel_message(rtnl.RTM_NEWROUTE, seq, body, core.NLM_F_MULTI)


def test_cage_side_is_what_pyroute2_sent():
    sent = list(core.messages(rtnl.encode(_cage_side_requests(), 7)))
    assert [seq for _, _, seq, _ in sent] == [7, 8, 9, 10]
    got = [(kind, flags, message[16:].hex()) for kind, flags, _, message in sent]
    assert got == PYROUTE2_CAGE_SIDE


def test_ipv6_off_and_forwarding_requests_encode_and_parse():
    """The first is byte for byte what `ip link set eth0 addrgenmode none` sends after
    the header (strace, iproute2 6.1); the second asks RTM_GETNETCONF for IPv4, all
    interfaces (netconfmsg padded to 4, NETCONFA_IFINDEX -1); a reply's forwarding is
    read back."""
    link, netconf = (
        message[16:].hex()
        for _, _, _, message in core.messages(
            rtnl.encode([rtnl.no_ipv6_link_local(2, ""), rtnl.get_forwarding()], 1)
        )
    )
    assert link == "0000000002000000000000000000000010001a000c000a000500080001000000"
    assert netconf == "0200000008000100ffffffff"
    for value, expected in ((1, True), (0, False)):
        reply = core.attr(rtnl.NETCONFA_IFINDEX, struct.pack("=i", -1))
        reply += core.attr(rtnl.NETCONFA_FORWARDING, struct.pack("=i", value))
        message = _kernel_message(81, 1, struct.pack("=Bxxx", 2) + reply)
        assert rtnl.netconf_forwarding(message) is expected
    assert rtnl.netconf_forwarding(_kernel_message(81, 1, b"\2\0\0\0")) is None


def test_encoded_veth_parses_back():
    request = rtnl.new_veth("eth0", 2, "jc0123456789abh", 9, up=False, what="")
    ((_, _, _, message),) = core.messages(rtnl.encode([request], 1))
    assert rtnl.ifinfo_index(message) == 2
    attrs = rtnl.ifinfo_attrs(message)
    assert core.text(attrs[rtnl.IFLA_IFNAME]) == "eth0"
    info = core.attrs(attrs[rtnl.IFLA_LINKINFO])
    assert core.text(info[rtnl.IFLA_INFO_KIND]) == "veth"
    peer = core.attrs(info[rtnl.IFLA_INFO_DATA])[rtnl.VETH_INFO_PEER]
    peer_attrs = core.attrs(peer, 16)  # after the peer's ifinfomsg
    assert core.text(peer_attrs[rtnl.IFLA_IFNAME]) == "jc0123456789abh"
    assert core.u32(peer_attrs[rtnl.IFLA_NET_NS_FD]) == 9


def test_dumps_ask_for_no_ack_and_the_rest_do():
    requests = [rtnl.dump_routes(), rtnl.get_link(name="eth0"), rtnl.delete_link("x", "")]
    flags = [flags for _, flags, _, _ in core.messages(rtnl.encode(requests, 1))]
    assert flags == [0x301, 0x5, 0x5]


def test_answers_are_sorted_by_seq_with_errors_and_kernel_text():
    answers = {seq: rtnl.Answer() for seq in (1, 2, 3, 4)}
    done: set[int] = set()
    rtnl.collect(_ack(1, errno.EEXIST) + _link_reply(99, 5, "other"), answers, done)
    assert done == {1} and answers[1].error == errno.EEXIST
    rtnl.collect(
        _ack(2) + _ack(3, errno.ENETUNREACH, "Nexthop has invalid gateway"), answers, done
    )
    rtnl.collect(_link_reply(4, 2, "eth0", link=17) + _ack(4), answers, done)
    assert done == {1, 2, 3, 4}
    assert answers[2].error == 0 and answers[2].replies == []
    assert answers[3].error == errno.ENETUNREACH
    assert answers[3].kernel_message == "Nexthop has invalid gateway"
    assert netns_mod._peer_index(answers[4]) == 17
    requests = _cage_side_requests()
    ordered = [answers[seq] for seq in (1, 2, 3, 4)]
    with pytest.raises(core.NetlinkError) as info:
        rtnl.raise_first_error(requests, ordered)
    assert info.value.code == errno.EEXIST and info.value.request is requests[0]
    assert str(info.value) == "veth: File exists"


def test_error_with_the_request_echoed_in_full():
    request = struct.pack("=IHHII", 20, 16, 5, 3, 0) + b"abcd"
    tlvs = core.attr_str(core.NLMSGERR_ATTR_MSG, "Unknown device type")
    message = _kernel_message(
        core.NLMSG_ERROR, 3, struct.pack("=i", -errno.EOPNOTSUPP) + request + tlvs,
        core.NLM_F_ACK_TLVS,
    )  # fmt: skip
    answers = {3: rtnl.Answer()}
    rtnl.collect(message, answers, set())
    assert answers[3].error == errno.EOPNOTSUPP
    assert answers[3].kernel_message == "Unknown device type"


def test_peer_index_is_none_when_the_kernel_leaves_it_out():
    assert netns_mod._peer_index(rtnl.Answer(replies=[_link_reply(1, 2, "eth0")])) is None
    assert netns_mod._peer_index(rtnl.Answer()) is None


def test_netlink_errors_become_jobcage_errors_that_say_what_to_do():
    veth, lo = _cage_side_requests()[:2]
    missing = core.NetlinkError(errno.EOPNOTSUPP, "creating", "Unknown device type", veth)
    error = nodelinks.netlink_error(missing, "setting up x")
    assert isinstance(error, KernelFeatureError) and "CONFIG_VETH" in str(error)
    other = core.NetlinkError(errno.EOPNOTSUPP, "bringing lo up", "", lo)
    assert not isinstance(nodelinks.netlink_error(other, "x"), KernelFeatureError)
    denied = core.NetlinkError(errno.EPERM, "creating", "", veth)
    assert "CAP_NET_ADMIN" in str(nodelinks.netlink_error(denied, None))


class FakeKernel(rtnl.Socket):
    """Answers dumps and RTM_GETLINK by index from tables, one recv per batch."""

    def __init__(self, routes, links):
        self._seq = 0
        self.routes, self.links, self.batches = routes, links, []

    def close(self):
        pass

    def talk(self, requests):
        self.batches.append([r.kind for r in requests])
        first = self._seq + 1
        self._seq += len(requests)
        data = b""
        for seq, request in enumerate(requests, first):
            if request.kind == rtnl.RTM_GETROUTE:
                data += b"".join(_route_reply(seq, *r) for r in self.routes)
                data += _kernel_message(core.NLMSG_DONE, seq, struct.pack("=i", 0))
            elif request.kind == rtnl.RTM_GETLINK:
                (_, _, _, message), *_ = core.messages(rtnl.encode([request], seq))
                index = rtnl.ifinfo_index(message)
                if index in self.links:
                    data += _link_reply(seq, index, self.links[index]) + _ack(seq)
                else:
                    data += _ack(seq, errno.ENODEV)
        answers = {seq: rtnl.Answer() for seq in range(first, first + len(requests))}
        done: set[int] = set()
        rtnl.collect(data, answers, done)
        assert len(done) == len(requests)
        return [answers[seq] for seq in sorted(answers)]


def _fake(monkeypatch, routes, links):
    kernel = FakeKernel(routes, links)
    monkeypatch.setattr(netns_mod.rtnl, "Socket", lambda: kernel)
    return kernel


def test_routes_overlapping_looks_up_only_the_overlapping_links(monkeypatch):
    routes = [
        ("0.0.0.0", 0, 254, 2),
        ("100.64.0.0", 30, 254, 7),  # a cage's
        ("100.64.128.0", 24, 254, 3),  # a VPN's
        ("100.64.0.1", 32, 255, 7),  # local table
        ("100.64.9.0", 24, 252, 3, 1000),  # table 1000
        ("10.0.0.0", 8, 254, 2),
    ]
    links = {2: "eth0", 3: "tun0", 7: "jc0123456789abh"}
    kernel = _fake(monkeypatch, routes, links)
    assert netns_mod.routes_overlapping("100.64.0.0/10") == ["100.64.128.0/24 dev tun0"]
    assert kernel.batches == [[rtnl.RTM_GETROUTE], [rtnl.RTM_GETLINK, rtnl.RTM_GETLINK]]
    kernel = _fake(monkeypatch, routes, links)
    assert netns_mod.routes_overlapping("172.16.0.0/12") == []
    assert kernel.batches == [[rtnl.RTM_GETROUTE]]


def test_routes_overlapping_skips_a_route_whose_device_is_gone(monkeypatch):
    """The last cage's connected route outlives its veth by a moment (the kernel
    cleans a netns up asynchronously): the next first cage must not refuse it."""
    routes = [("100.64.0.0", 30, 254, 9), ("100.64.128.0", 24, 254, 3)]
    _fake(monkeypatch, routes, {3: "tun0"})  # link 9 no longer exists
    assert netns_mod.routes_overlapping("100.64.0.0/10") == ["100.64.128.0/24 dev tun0"]


def test_default_route_interface_single_and_multipath(monkeypatch):
    _fake(monkeypatch, [("10.0.0.0", 8, 254, 3), ("0.0.0.0", 0, 254, 2)], {2: "eno1"})
    assert netns_mod.default_route_interface() == "eno1"
    _fake(monkeypatch, [("0.0.0.0", 0, 254, None, None, 4)], {4: "bond0"})
    assert netns_mod.default_route_interface() == "bond0"
    _fake(monkeypatch, [("0.0.0.0", 0, 255, 2)], {2: "eno1"})
    with pytest.raises(NetworkError, match="set `uplink`"):
        netns_mod.default_route_interface()


def test_reap_keeps_a_lease_while_its_netns_is_still_there(tmp_path, monkeypatch):
    """The lease is what makes a netns this state dir's orphan (find_orphans): a lease
    released while its netns lingers would leave that netns to nobody."""
    config = Config(state_dir=str(tmp_path / "state"), address_pool="100.64.0.0/16")
    store = LeaseStore(config.state_dir, AddressPool(config.address_pool))
    lease, _ = store.acquire("j1")
    run_dir = tmp_path / "netns"
    run_dir.mkdir()
    monkeypatch.setattr(netns_mod, "NETNS_RUN_DIR", str(run_dir))
    lingering = run_dir / netns_name("j1")
    lingering.touch()
    orphan = Orphan("lease", str(lease.index))
    with pytest.raises(NetworkError, match="ip netns del"):
        remove_orphan(orphan, config)
    assert store.held() == {lease.index: "j1"}
    lingering.unlink()
    remove_orphan(orphan, config)
    assert store.held() == {}


class _RulesStuck:
    """A firewall whose rules of a cage would not go (a kernel error mid-removal)."""

    def counters(self, plan):
        return NetCounters()

    def remove(self, plan):
        raise NetworkError("removing the rules failed")


def test_teardown_keeps_the_lease_while_the_rules_are_left(tmp_path, monkeypatch):
    """With the lease released, the cage's rules would be no state dir's orphans."""
    store = LeaseStore(str(tmp_path), AddressPool("100.64.0.0/16"))
    lease, _ = store.acquire("1234.0")
    cage = NetworkCage(
        job_id="1234.0",
        netns_name="jobcage-1234.0",
        host_veth="jc0123456789abh",
        address=lease.job,
        host_address=lease.host,
        lease_index=lease.index,
        pool="100.64.0.0/16",
        campus_networks=("192.0.2.0/24",),
        allow_node_access=False,
        state_dir=str(tmp_path),
    )
    monkeypatch.setattr(cage, "_firewall", _RulesStuck)
    monkeypatch.setattr(netns_mod, "remove", lambda name: None)
    monkeypatch.setattr(resolv, "remove_resolv_conf", lambda name: None)
    with pytest.raises(TeardownError, match="removing the rules failed"):
        cage.destroy()
    assert store.held() == {lease.index: "1234.0"}


def test_reap_keeps_a_lease_while_another_object_of_its_job_is_left(tmp_path, monkeypatch):
    """Leases are released last in a reap pass; a job whose chain would not go keeps
    its lease (and so its chain stays this state dir's orphan for the next pass)."""
    from jobcage import network
    from jobcage.records import StateStore
    from jobcage.recovery.remove import reap_orphan_network

    config = Config(state_dir=str(tmp_path / "state"), address_pool="100.64.0.0/16")
    store = LeaseStore(config.state_dir, AddressPool(config.address_pool))
    stuck, _ = store.acquire("j1")
    fine, _ = store.acquire("j2")
    h1, h2 = (veth[2:-1] for veth in (veth_names("j1")[0], veth_names("j2")[0]))
    orphans = [
        Orphan("chain", f"JC-{h1}-LAN-TX", "ip jobcage", cage=h1),
        Orphan("chain", f"JC-{h2}-LAN-TX", "ip jobcage", cage=h2),
        Orphan("lease", str(stuck.index), cage=h1),
        Orphan("lease", str(fine.index), cage=h2),
    ]
    monkeypatch.setattr(network, "find_orphans", lambda config: list(orphans))
    removed = []

    def remove_orphan(orphan, config):
        if orphan.name == f"JC-{h1}-LAN-TX":
            raise NetworkError("EBUSY")
        if orphan.kind == "lease":
            store.release(int(orphan.name), store.held()[int(orphan.name)])
        removed.append(orphan.name)

    monkeypatch.setattr(network, "remove_orphan", remove_orphan)
    reaped = reap_orphan_network(StateStore(config.state_dir), config, dry_run=False)
    assert store.held() == {stuck.index: "j1"}
    assert removed == [f"JC-{h2}-LAN-TX", str(fine.index)]
    [kept] = [c for c in reaped if c.job_id == "j1" and not c.removed]
    assert any("lease" in e and "reap` again" in e for e in kept.errors)

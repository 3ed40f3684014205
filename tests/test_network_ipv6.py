"""Dual-stack cages in a dual-stack simulated world, and a job in an IPv6-only one.

Each traffic test runs for both families through the same dual-stack cage: IPv4 must
behave as in tests/test_network.py, IPv6 the same under the same policy. Bounds as
there, with IPv6's headers: a UDP or ICMPv6 datagram of S payload bytes counts S + 48
(IPv6 40 + UDP/ICMPv6 8). IPv6 is nftables-only (docs/network.md).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import re
import subprocess
import sys
from collections.abc import Iterator

import pytest

from jobcage.config import Config
from jobcage.errors import ConfigError
from jobcage.network import (
    NetCounters,
    NetworkCage,
    find_orphans,
    ipv6,
    read_counters,
    remove_orphan,
)
from jobcage.testing import networld as world_mod
from jobcage.testing.networld import (
    CAMPUS_HOST,
    CAMPUS_HOST6,
    INTERNET_HOST,
    INTERNET_HOST6,
    NODE_SERVER_PORT,
    NODE_UPLINK,
    NODE_UPLINK6,
    SERVER_PORT,
    NetWorld,
    wait_until,
)

from .conftest_network import run_in_cage, run_in_cage_lines

pytestmark = [pytest.mark.root, pytest.mark.network]

KiB, MiB = 1 << 10, 1 << 20
PORT = str(SERVER_PORT)
HOSTS = {
    "4": (CAMPUS_HOST, INTERNET_HOST, NODE_UPLINK),
    "6": (CAMPUS_HOST6, INTERNET_HOST6, NODE_UPLINK6),
}
HEADERS = {"4": 28, "6": 48}
SHARE = [f.name for f in dataclasses.fields(NetCounters) if f.name.startswith("net_ipv6_")]


@pytest.fixture(scope="module")
def networld() -> Iterator[NetWorld]:
    """This module's world: dual-stack (the `node` fixture checks it as before after
    each test, IPv6 routes, neighbour proxies and sysctls included)."""
    world = NetWorld(ipv6=True).build()
    try:
        yield world
    finally:
        world.destroy()
    assert not world.leftovers()


@pytest.fixture
def net_config(tmp_path) -> Config:
    """Dual-stack, nftables (make_cage's config)."""
    return Config(
        state_dir=str(tmp_path / "state"),
        campus_networks=(world_mod.CAMPUS_NETWORK, world_mod.CAMPUS_NETWORK6),
        address_pool=world_mod.POOL,
        ipv6_pool=world_mod.POOL6,
        firewall="nftables",
        ipv6="nat",
    )


def delta(after: NetCounters, before: NetCounters) -> dict[str, int]:
    return {
        f.name: (getattr(after, f.name) or 0) - (getattr(before, f.name) or 0)
        for f in dataclasses.fields(NetCounters)
    }


def assert_data(measured: int, payload: int, what: str, resent: int = 0) -> None:
    high = payload * 1.05 + 16 * KiB + resent
    assert payload <= measured <= high, f"{what}: {measured} not in [{payload}, {high:.0f}]"


def assert_share(d: dict[str, int], family: str) -> None:
    """The IPv6 share is the whole of an IPv6 transfer and none of an IPv4 one."""
    for name in SHARE:
        total = d[name.replace("net_ipv6_", "net_")]
        assert d[name] == (total if family == "6" else 0), name


def refused(networld: NetWorld, cage: NetworkCage, family: str) -> dict[str, int]:
    table = "ip6" if family == "6" else "ip"
    out = {}
    for way in ("tx", "rx"):
        name = f"JC-{cage.plan.cage_hash}-REFUSED-{way.upper()}"
        listing = networld.exec_in(
            networld.node, ["nft", "list", "counter", table, "jobcage", name]
        ).stdout
        out[way] = int(re.search(r"packets (\d+)", listing).group(1))
    return out


def in_cage(cage: NetworkCage, *argv: str) -> str:
    return subprocess.run(
        ["nsenter", f"--net={cage.netns_path}", *argv], capture_output=True, text=True, check=True
    ).stdout


both = pytest.mark.parametrize("family", ["4", "6"])


@both
def test_tcp_is_counted_in_its_class(make_cage, family):
    campus, internet, _ = HOSTS[family]
    cage = make_cage()
    before = cage.counters()
    assert run_in_cage(cage.netns_path, "get", campus, PORT, str(2 * MiB)) == str(2 * MiB)
    assert run_in_cage(cage.netns_path, "get", internet, PORT, str(3 * MiB)) == str(3 * MiB)
    *info, stored = run_in_cage_lines(cage.netns_path, "put", internet, PORT, str(MiB))
    assert stored == str(MiB) and info[0].startswith("retransmitted ")
    d = delta(cage.counters(), before)
    assert_data(d["net_lan_rx_bytes"], 2 * MiB, "lan download")
    assert_data(d["net_wan_rx_bytes"], 3 * MiB, "wan download")
    # What TCP sent twice the counters saw twice (as in tests/test_network.py).
    assert_data(d["net_wan_tx_bytes"], MiB, "wan upload", resent=int(info[0].split()[1]))
    assert 0 < d["net_lan_tx_bytes"] <= 2 * MiB * 0.05 + 16 * KiB
    assert_share(d, family)


@both
def test_udp_and_icmp_are_counted_exactly(make_cage, family):
    campus, internet, _ = HOSTS[family]
    cage = make_cage()
    count, size, extra = 50, 1000, HEADERS[family]
    assert run_in_cage(cage.netns_path, "udp-send", internet, PORT, str(count), str(size))
    got = int(run_in_cage(cage.netns_path, "udp-get", campus, PORT, "20", str(size)))
    assert run_in_cage(cage.netns_path, "ping", internet, "3", "500") == "3"
    d = delta(cage.counters(), NetCounters())
    assert got == 20
    assert d["net_wan_tx_packets"] == count + 3
    assert d["net_wan_tx_bytes"] == count * (size + extra) + 3 * (500 + extra)
    assert (d["net_wan_rx_packets"], d["net_wan_rx_bytes"]) == (3, 3 * (500 + extra))
    assert (d["net_lan_rx_packets"], d["net_lan_rx_bytes"]) == (20, 20 * (size + extra))
    assert (d["net_lan_tx_packets"], d["net_lan_tx_bytes"]) == (1, len(f"send 20 {size}") + extra)
    assert_share(d, family)


def test_job_sees_both_families_and_no_link_local(make_cage, net_config):
    status, text = ipv6.report(net_config)
    assert status == "ok" and text.startswith(
        f"NAT66 of {world_mod.POOL6} (a /64 a cage) out of eth0"
    )
    cage = make_cage()
    assert cage.ipv6 is not None
    assert run_in_cage(cage.netns_path, "ifaces") == "eth0 lo"
    addresses = in_cage(cage, "ip", "-6", "-o", "addr", "show", "dev", "eth0")
    assert f"inet6 {cage.ipv6.address} scope global" in addresses
    assert "fe80" not in addresses and "tentative" not in addresses
    routes = in_cage(cage, "ip", "-6", "route", "show", "default")
    assert f"default via {cage.ipv6.host_address.ip} dev eth0" in routes
    node_side = subprocess.run(
        ["ip", "-6", "-o", "addr", "show", "dev", cage.host_veth],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert str(cage.ipv6.host_address) in node_side and "fe80" not in node_side
    record = cage.to_record()["ipv6"]
    assert record["address"] == str(cage.ipv6.address) and record["mode"] == "nat"
    # The usage of a cage with IPv6 has the share; an IPv4-only cage's is null.
    assert cage.counters().net_ipv6_wan_tx_bytes == 0
    v4only = make_cage("v4", config=net_config.replace(ipv6="off"))
    assert v4only.ipv6 is None and v4only.counters().net_ipv6_wan_tx_bytes is None


def test_an_ipv6_off_cage_installs_nothing_ipv6(make_cage, net_config, networld):
    cage = make_cage(config=net_config.replace(ipv6="off"))
    ruleset = networld.exec_in(networld.node, ["nft", "list", "tables"]).stdout
    assert "ip jobcage" in ruleset and "ip6 jobcage" not in ruleset
    assert in_cage(cage, "ip", "-6", "-o", "addr", "show", "dev", "eth0") == ""
    with open(f"/proc/sys/net/ipv6/conf/{cage.host_veth}/disable_ipv6") as f:
        assert f.read().strip() == "1"
    assert run_in_cage(cage.netns_path, "connect", INTERNET_HOST6, PORT) == "ENETUNREACH"


@both
def test_cage_cannot_reach_another_cage(make_cage, networld, family):
    a, b = make_cage("a"), make_cage("b")
    target = str(a.address.ip) if family == "4" else str(a.ipv6.address.ip)
    listener = networld.popen_in(
        a.netns_path, [sys.executable, world_mod.CLIENT, "listen", "8000"], for_test=True
    )
    assert listener.stdout.readline().strip() == "ready"
    assert run_in_cage(b.netns_path, "connect", target, "8000") in ("EHOSTUNREACH", "EACCES")
    assert run_in_cage(b.netns_path, "ping", target, "1", "56") == "0"
    listener.kill()
    assert "accepted" not in listener.communicate()[0]
    assert b.counters().net_wan_tx_bytes == 0


@both
def test_inbound_connections_are_dropped(make_cage, networld, family):
    cage = make_cage()
    target = str(cage.address.ip) if family == "4" else str(cage.ipv6.address.ip)
    listener = networld.popen_in(
        cage.netns_path, [sys.executable, world_mod.CLIENT, "listen", "8000"], for_test=True
    )
    assert listener.stdout.readline().strip() == "ready"
    for host in (networld.internet, networld.campus):
        before = refused(networld, cage, family)["rx"]
        client = networld.popen_in(
            networld.netns_path(host),
            [sys.executable, world_mod.CLIENT, "connect", target, "8000"],
            for_test=True,
        )
        wait_until(
            lambda b=before: refused(networld, cage, family)["rx"] > b,
            "the SYN to hit the cage's DROP rule",
        )
        client.kill()
    assert delta(cage.counters(), NetCounters()) == delta(NetCounters(), NetCounters())
    listener.kill()
    assert "accepted" not in listener.communicate()[0]


@pytest.mark.parametrize("spoofed", ["fd6a:6f62:6361:ff::2", "fe80::99", "2001:db8:e::77"])
def test_spoofed_ipv6_sources_are_dropped(make_cage, networld, spoofed):
    """Only the cage's own address leaves it: another cage's, a link-local one, one of
    the world's."""
    cage = make_cage()
    # The node side resolved first, from the cage's own address: else the kernel would
    # solicit it from the spoofed one (refused once) and drop the datagrams itself.
    assert run_in_cage(cage.netns_path, "ping", INTERNET_HOST6, "1", "8") == "1"
    argv = ["ip", "-n", cage.netns_name, "addr", "add", f"{spoofed}/128", "dev", "eth0", "nodad"]
    networld.exec_in(networld.node, argv)
    target = INTERNET_HOST6 if not spoofed.startswith("fe80") else str(cage.ipv6.host_address.ip)
    start = cage.counters()
    before = refused(networld, cage, "6")["tx"]
    source = spoofed + ("%eth0" if spoofed.startswith("fe80") else "")
    run_in_cage(cage.netns_path, "udp-send", target, PORT, "10", "100", source)
    run_in_cage(cage.netns_path, "udp-send", NODE_UPLINK6, PORT, "10", "100", source)
    assert refused(networld, cage, "6")["tx"] - before >= 20
    d = delta(cage.counters(), start)
    assert d["net_wan_tx_bytes"] == d["net_lan_tx_bytes"] == 0


@both
def test_node_access_follows_the_config(make_cage, net_config, family):
    _, _, node_address = HOSTS[family]
    shut = make_cage("shut")
    # REJECT: the job fails at once (admin-prohibited is EACCES for IPv6, as Linux maps it).
    result = run_in_cage(shut.netns_path, "connect", node_address, str(NODE_SERVER_PORT))
    assert result == ("EHOSTUNREACH" if family == "4" else "EACCES")
    assert shut.counters().net_lan_tx_packets == 0
    open_ = make_cage("open", config=net_config.replace(allow_node_access=True))
    size = 2 * MiB
    out = run_in_cage(open_.netns_path, "get", node_address, str(NODE_SERVER_PORT), str(size))
    assert out == str(size)
    d = delta(open_.counters(), NetCounters())
    assert_data(d["net_lan_rx_bytes"], size, "node download")
    assert d["net_wan_rx_bytes"] == d["net_wan_tx_bytes"] == 0
    assert_share(d, family)


def test_twelve_cages_at_once_are_each_charged_their_own(make_cage):
    """Each downloads its own sizes, over IPv6 from campus and IPv4 from the internet,
    all at once: no cage is charged another's bytes, in either family."""
    sizes = {str(i): ((i + 1) * 256 * KiB, (12 - i) * 128 * KiB) for i in range(12)}
    cages = {k: make_cage(k) for k in sizes}

    def job(key: str) -> tuple[str, str]:
        lan, wan = sizes[key]
        path = cages[key].netns_path
        return (
            run_in_cage(path, "get", CAMPUS_HOST6, PORT, str(lan)),
            run_in_cage(path, "get", INTERNET_HOST, PORT, str(wan)),
        )

    with concurrent.futures.ThreadPoolExecutor(len(cages)) as pool:
        got = dict(zip(sizes, pool.map(job, sizes), strict=True))
    assert got == {k: (str(lan), str(wan)) for k, (lan, wan) in sizes.items()}
    counters = read_counters(list(cages.values()))
    for key, (lan, wan) in sizes.items():
        c = counters[cages[key].job_id]
        assert c == cages[key].counters()
        assert_data(c.net_lan_rx_bytes, lan, f"cage {key} lan")
        assert_data(c.net_ipv6_lan_rx_bytes, lan, f"cage {key} lan over IPv6")
        assert_data(c.net_wan_rx_bytes, wan, f"cage {key} wan")
        assert c.net_ipv6_wan_rx_bytes == 0


def sysctl(name: str) -> str:
    with open("/proc/sys/" + name.replace(".", "/")) as f:
        return f.read().strip()


def test_last_ipv6_cage_puts_the_node_back(node, net_config, job_id):
    """The `node` fixture compares the whole node (rules, routes, neighbour proxies,
    sysctls) after the test; here the middle state."""
    assert sysctl("net.ipv6.conf.all.forwarding") == "0"
    assert sysctl("net.ipv6.conf.eth0.accept_ra") == "1"
    a = NetworkCage.create(job_id + "a", net_config)
    b = NetworkCage.create(job_id + "b", net_config)
    assert sysctl("net.ipv6.conf.all.forwarding") == "1"
    assert sysctl("net.ipv6.conf.eth0.accept_ra") == "2"  # RAs still taken
    a.destroy()
    tables = node.exec_in(node.node, ["nft", "list", "tables"]).stdout
    assert "ip6 jobcage" in tables  # b still needs it
    assert sysctl("net.ipv6.conf.all.forwarding") == "1"
    b.destroy()
    assert sysctl("net.ipv6.conf.all.forwarding") == "0"
    assert sysctl("net.ipv6.conf.eth0.accept_ra") == "1"


def test_reap_removes_a_lost_cages_ipv6_rules(node, net_config, job_id):
    NetworkCage.create(job_id, net_config)  # its handle and record are lost
    orphans = [
        o for o in find_orphans(net_config) if o.cage == job_cage_hash(job_id) or not o.cage
    ]
    tables = {o.table for o in orphans if o.kind == "chain"}
    assert "ip6 jobcage" in tables and "ip jobcage" in tables
    order = {"netns": 0, "veth": 1, "chain": 2, "campus": 3, "shared": 3, "lease": 4}
    for orphan in sorted(orphans, key=lambda o: order[o.kind]):
        remove_orphan(orphan, net_config)
    node.wait_until_empty(
        lambda: [o for o in find_orphans(net_config) if o.kind != "veth"] or None,
        "the orphans to go",
    )


def job_cage_hash(job_id: str) -> str:
    from jobcage.ids import veth_names

    return veth_names(job_id)[0][2:-1]


def test_ipv6_with_the_x_tables_backend_is_one_clear_error(node, net_config, job_id):
    with pytest.raises(ConfigError, match='needs firewall = "nftables"'):
        NetworkCage.create(job_id, net_config.replace(firewall="iptables-legacy"))
    # auto: IPv4 only there, said in docs/network.md.
    cage = NetworkCage.create(job_id, net_config.replace(firewall="iptables-legacy", ipv6="auto"))
    try:
        assert cage.ipv6 is None
    finally:
        cage.destroy()


# -- an IPv6-only world --------------------------------------------------------------


def test_a_job_in_an_ipv6_only_world_reaches_the_internet(tmp_path, job_id):
    world = NetWorld(ipv4=False, ipv6=True).build()
    try:
        config = Config(
            state_dir=str(tmp_path / "state"),
            campus_networks=(world_mod.CAMPUS_NETWORK6,),
            ipv6_pool=world_mod.POOL6,
            firewall="nftables",
        )
        with world.node_thread():
            status, text = ipv6.report(config)
            assert status == "warn" and "the cages' IPv4 has no way out" in text
            cage = NetworkCage.create(job_id, config)  # ipv6 = "auto": NAT66
            try:
                size = 3 * MiB
                assert run_in_cage(cage.netns_path, "get", INTERNET_HOST6, PORT, str(size)) == str(
                    size
                )
                c = cage.counters()
                assert_data(c.net_wan_rx_bytes, size, "wan download")
                assert c.net_ipv6_wan_rx_bytes == c.net_wan_rx_bytes
                # IPv4 has no way out (no IPv4 anywhere but in the cages).
                assert run_in_cage(cage.netns_path, "connect", INTERNET_HOST, PORT) in (
                    "ENETUNREACH",
                    "EHOSTUNREACH",
                    "timeout",
                )
            finally:
                cage.destroy()
    finally:
        world.destroy()
    assert not world.leftovers()


def test_jobcage_spawn_bills_ipv6_against_ipv6_campus_networks(
    node, cage_config, net_config, job_id
):
    """Through the public API: campus_networks of both families (failed before: JobCage
    refused an IPv6 campus network), the usage record's IPv6 share."""
    from jobcage import JobCage

    config = cage_config.replace(
        campus_networks=net_config.campus_networks, ipv6="nat", ipv6_pool=world_mod.POOL6
    )
    with JobCage(job_id, network=True, config=config) as cage:
        argv = [sys.executable, world_mod.CLIENT, "get", CAMPUS_HOST6, PORT, str(MiB)]
        out, _ = cage.spawn(argv, stdout=subprocess.PIPE).communicate(timeout=60)
        assert out.decode().strip() == str(MiB)
    usage = cage.final_usage
    assert usage is not None
    assert_data(usage.net_lan_rx_bytes, MiB, "lan rx")
    assert usage.net_ipv6_lan_rx_bytes == usage.net_lan_rx_bytes
    assert usage.net_ipv6_wan_rx_bytes == 0


def test_a_flush_puts_both_families_rules_back(make_cage, networld):
    """`nft flush ruleset` takes ip6 jobcage too: usage() puts both back (one gap), and
    IPv6 is isolated and counted again (see tests/test_network_flush.py)."""
    a, b = make_cage("a"), make_cage("b")
    networld.exec_in(networld.node, ["nft", "flush", "ruleset"])
    assert a.counters().net_counts_gaps == 1
    networld.exec_in(networld.node, ["nft", "list", "table", "ip6", "jobcage"])
    other = str(b.ipv6.address.ip)
    assert run_in_cage(a.netns_path, "connect", other, PORT) != "connected"
    got = run_in_cage(a.netns_path, "get", INTERNET_HOST6, PORT, str(MiB))
    assert got == str(MiB)
    c = a.counters()
    assert c.net_ipv6_wan_rx_bytes >= MiB and c.net_counts_gaps == 1


def test_reap_puts_back_the_sysctls_a_killed_last_cage_left(node, net_config, job_id, monkeypatch):
    """The owner of the node's last IPv6 cage dies between removing ip6 jobcage and
    putting the sysctls back: reap does it (they stayed changed before)."""
    from jobcage.recovery import reap

    cage = NetworkCage.create(job_id, net_config)
    assert sysctl("net.ipv6.conf.all.forwarding") == "1"
    with monkeypatch.context() as m:
        m.setattr(ipv6, "restore", lambda state_dir: False)  # the owner is killed here
        cage.destroy()
    assert sysctl("net.ipv6.conf.all.forwarding") == "1"
    assert [o.kind for o in find_orphans(net_config)] == ["sysctls"]
    report = reap(net_config)
    assert not report.errors
    assert any("sysctls ipv6-sysctls" in c.removed for c in report.cages)
    assert sysctl("net.ipv6.conf.all.forwarding") == "0"
    assert sysctl("net.ipv6.conf.eth0.accept_ra") == "1"
    assert find_orphans(net_config) == []


ROUTED_POOL = "2001:db8:f::/48"
PEER = (
    "import socket; s = socket.create_server(('::', 9000), family=socket.AF_INET6, "
    "dualstack_ipv6=True); print('ready', flush=True); c, a = s.accept(); print(a[0], flush=True)"
)


def test_routed_mode_gives_the_job_a_global_address_without_nat(make_cage, networld, net_config):
    """The site's router treats ipv6_pool as on the node's link: it solicits each job's
    address there and the node answers for it (proxy NDP); the far end sees the job's
    own address. The node fixture checks the proxy entry and proxy_ndp are gone after."""
    from jobcage.testing.networld import ip

    ip("-n", networld.router, "-6", "route", "add", ROUTED_POOL, "dev", "rn")
    try:
        cage = make_cage(config=net_config.replace(ipv6="routed", ipv6_pool=ROUTED_POOL))
        assert str(cage.ipv6.address) == "2001:db8:f::2/64" and cage.ipv6.uplink == "eth0"
        proxies = ip("-n", networld.node, "-6", "neigh", "show", "proxy")
        assert "2001:db8:f::2 dev eth0 proxy" in proxies
        assert sysctl("net.ipv6.conf.eth0.proxy_ndp") == "1"
        table = networld.exec_in(networld.node, ["nft", "list", "table", "ip6", "jobcage"])
        assert "masquerade" not in table.stdout
        server = networld.popen_in(
            networld.netns_path(networld.internet), [sys.executable, "-c", PEER], for_test=True
        )
        assert server.stdout.readline().strip() == "ready"
        assert run_in_cage(cage.netns_path, "connect", INTERNET_HOST6, "9000") == "connected"
        assert server.stdout.readline().strip() == "2001:db8:f::2"
        assert run_in_cage(cage.netns_path, "get", INTERNET_HOST6, PORT, str(MiB)) == str(MiB)
        assert_data(cage.counters().net_ipv6_wan_rx_bytes, MiB, "routed download")
        cage.destroy()
        assert "2001:db8:f::2" not in ip("-n", networld.node, "-6", "neigh", "show", "proxy")
    finally:
        ip("-n", networld.router, "-6", "route", "del", ROUTED_POOL, "dev", "rn")


def test_reap_removes_the_proxy_entry_of_a_lost_routed_cage(node, net_config, job_id):
    from jobcage.testing.networld import ip

    config = net_config.replace(ipv6="routed", ipv6_pool=ROUTED_POOL)
    NetworkCage.create(job_id, config)  # its handle and record are lost
    assert "2001:db8:f::2 dev eth0 proxy" in ip("-n", node.node, "-6", "neigh", "show", "proxy")
    orphans = find_orphans(config)
    assert ("proxy", "2001:db8:f::2", "eth0") in [(o.kind, o.name, o.table) for o in orphans]
    order = {"netns": 0, "veth": 1, "chain": 2, "campus": 3, "shared": 3, "proxy": 4, "lease": 5}
    for orphan in sorted(orphans, key=lambda o: order.get(o.kind, 4)):
        remove_orphan(orphan, config)
    assert "2001:db8:f::2" not in ip("-n", node.node, "-6", "neigh", "show", "proxy")
    node.wait_until_empty(
        lambda: [o for o in find_orphans(config) if o.kind != "veth"] or None, "the orphans to go"
    )

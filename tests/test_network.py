"""Real traffic through network cages, inside the simulated world (jobcage/testing/networld.py).

Every test runs with its thread inside the simulated node (the ``node`` fixture), which
afterwards proves the node's iptables and links are as they were.

Byte bounds. The counters count IP packets (IP header and up, no Ethernet header) in
the filter hooks; GSO/GRO super-packets count once. So for a TCP transfer of P
payload bytes, the data direction counts between P and P + 5% (52 bytes of IP+TCP
headers per 1448-byte segment is 3.6% if no segment were merged) + 16 KiB (handshake,
HTTP headers, FIN); the other direction carries ACKs, at most 5% of P + 16 KiB. UDP
and ICMP are exact: a datagram of S payload bytes counts S + 28 (IP 20 + UDP/ICMP 8).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
import threading

import pytest

from jobcage.errors import (
    AddressPoolExhaustedError,
    CageExistsError,
    NetworkError,
)
from jobcage.netlink import rtnl
from jobcage.network import (
    NetCounters,
    NetworkCage,
    find_orphans,
    forwarding_enabled,
    read_counters,
)
from jobcage.network import resolv as resolv_mod
from jobcage.network.firewall import xtables as firewall_mod
from jobcage.network.firewall import xtables_iptc
from jobcage.network.firewall.nftables import NftablesFirewall
from jobcage.records import StateStore
from jobcage.records.model import network_part
from jobcage.testing import networld as world_mod
from jobcage.testing.networld import (
    CAMPUS_HOST,
    INTERNET_HOST,
    NODE_SERVER_PORT,
    NODE_UPLINK,
    SERVER_PORT,
    wait_until,
)

from .conftest_network import GUARDED_SCRIPT, run_in_cage, run_in_cage_lines

pytestmark = [pytest.mark.root, pytest.mark.network]

KiB = 1 << 10
MiB = 1 << 20
PORT = str(SERVER_PORT)
ZERO = NetCounters()


def delta(after: NetCounters, before: NetCounters) -> dict[str, int]:
    return {
        f.name: getattr(after, f.name) - getattr(before, f.name)
        for f in dataclasses.fields(NetCounters)
        if getattr(after, f.name) is not None  # the IPv6 share of an IPv4-only cage
    }


def assert_data(measured: int, payload: int, what: str, resent: int = 0) -> None:
    """Payload plus headers; ``resent``: bytes the sender retransmitted, which the
    counters see again if the first copy got past them before it was lost."""
    high = payload * 1.05 + 16 * KiB + resent
    assert payload <= measured <= high, f"{what}: {measured} not in [{payload}, {high:.0f}]"


def assert_acks(measured: int, payload: int, what: str) -> None:
    high = payload * 0.05 + 16 * KiB
    assert 0 < measured <= high, f"{what}: {measured} not in (0, {high:.0f}]"


# -- accounting ----------------------------------------------------------------------


def test_tcp_download_and_upload_are_counted_in_their_class(make_cage):
    cage = make_cage()
    path = cage.netns_path
    steps = [
        ("get", CAMPUS_HOST, 3 * MiB, "net_lan_rx_bytes", "net_lan_tx_bytes"),
        ("put", CAMPUS_HOST, 2 * MiB, "net_lan_tx_bytes", "net_lan_rx_bytes"),
        ("get", INTERNET_HOST, 4 * MiB, "net_wan_rx_bytes", "net_wan_tx_bytes"),
        ("put", INTERNET_HOST, 1 * MiB, "net_wan_tx_bytes", "net_wan_rx_bytes"),
    ]
    for verb, host, size, data_field, ack_field in steps:
        before = cage.counters()
        *info, result = run_in_cage_lines(path, verb, host, PORT, str(size))
        assert result == str(size)
        d = delta(cage.counters(), before)
        # A segment sent twice is counted twice (as it should be billed): seen on a
        # loaded machine, 96 KB of a 1 MiB upload. The client knows its own (TCP_INFO).
        again = sum(int(line.split()[1]) for line in info if line.startswith("retransmitted"))
        assert_data(d[data_field], size, f"{verb} {host} {data_field}", resent=again)
        assert_acks(d[ack_field], size, f"{verb} {host} {ack_field}")
        wrong = {k: v for k, v in d.items() if k.split("_")[1] != data_field.split("_")[1]}
        assert not any(wrong.values()), f"{verb} {host} leaked into {wrong}"


def test_curl_download_counts_as_lan(make_cage):
    cage = make_cage()
    out = subprocess.run(
        ["nsenter", f"--net={cage.netns_path}", "--", "curl", "-sS", "-o", "/dev/null",
         "-w", "%{size_download}", f"http://{CAMPUS_HOST}:{PORT}/bytes/{MiB}"],
        capture_output=True, text=True, check=True, timeout=60,
    )  # fmt: skip
    assert out.stdout == str(MiB)
    counters = cage.counters()
    assert_data(counters.net_lan_rx_bytes, MiB, "curl lan rx")
    assert counters.net_wan_rx_bytes == counters.net_wan_tx_bytes == 0


def test_udp_is_counted_exactly(make_cage):
    cage = make_cage()
    count, size = 200, 1000
    assert run_in_cage(cage.netns_path, "udp-send", INTERNET_HOST, PORT, str(count), str(size))
    c = cage.counters()
    assert (c.net_wan_tx_packets, c.net_wan_tx_bytes) == (count, count * (size + 28))
    assert c.net_lan_tx_bytes == c.net_lan_rx_bytes == c.net_wan_rx_bytes == 0

    before = cage.counters()
    got = int(run_in_cage(cage.netns_path, "udp-get", CAMPUS_HOST, PORT, "100", str(size)))
    d = delta(cage.counters(), before)
    assert got == 100
    assert (d["net_lan_rx_packets"], d["net_lan_rx_bytes"]) == (100, 100 * (size + 28))
    request = len(f"send 100 {size}") + 28
    assert (d["net_lan_tx_packets"], d["net_lan_tx_bytes"]) == (1, request)
    assert d["net_wan_rx_bytes"] == d["net_wan_tx_bytes"] == 0


def test_icmp_is_counted_exactly(make_cage):
    cage = make_cage()
    count, size = 5, 1000
    assert run_in_cage(cage.netns_path, "ping", CAMPUS_HOST, str(count), str(size)) == "5"
    assert run_in_cage(cage.netns_path, "ping", INTERNET_HOST, str(count), str(size)) == "5"
    each = count * (size + 28)
    assert cage.counters() == NetCounters(
        net_lan_rx_bytes=each,
        net_lan_tx_bytes=each,
        net_wan_rx_bytes=each,
        net_wan_tx_bytes=each,
        net_lan_rx_packets=count,
        net_lan_tx_packets=count,
        net_wan_rx_packets=count,
        net_wan_tx_packets=count,
    )


def test_job_to_node_traffic_is_lan_when_allowed(make_cage, net_config):
    cage = make_cage(config=net_config.replace(allow_node_access=True))
    size = 2 * MiB
    assert run_in_cage(cage.netns_path, "get", NODE_UPLINK, str(NODE_SERVER_PORT), str(size))
    # The node-side veth address is the node too.
    host = str(cage.host_address.ip)
    assert run_in_cage(cage.netns_path, "get", host, str(NODE_SERVER_PORT), str(size))
    c = cage.counters()
    assert_data(c.net_lan_rx_bytes, 2 * size, "node download")
    assert_acks(c.net_lan_tx_bytes, 2 * size, "node download acks")
    assert c.net_wan_rx_bytes == c.net_wan_tx_bytes == 0


def test_node_is_refused_by_default(make_cage):
    cage = make_cage()
    result = run_in_cage(cage.netns_path, "connect", NODE_UPLINK, str(NODE_SERVER_PORT))
    # REJECT with icmp-admin-prohibited: the job fails at once, not at its timeout.
    assert result == "EHOSTUNREACH"
    c = cage.counters()
    assert c.net_lan_tx_packets == 0  # the rejected SYN went nowhere
    assert c.net_lan_rx_packets == 1  # the node's ICMP error (RELATED)
    assert c.net_wan_rx_bytes == c.net_wan_tx_bytes == 0


def test_several_cages_are_each_charged_for_their_own(make_cage):
    sizes = {"a": (1 * MiB, 3 * MiB), "b": (2 * MiB, 1 * MiB), "c": (4 * MiB, 2 * MiB)}
    cages = {k: make_cage(k) for k in sizes}
    addresses = {str(c.address.ip) for c in cages.values()}
    assert len(addresses) == len(cages)
    failures: list[BaseException] = []

    def job(key: str) -> None:
        lan, wan = sizes[key]
        try:
            path = cages[key].netns_path
            assert run_in_cage(path, "get", CAMPUS_HOST, PORT, str(lan)) == str(lan)
            assert run_in_cage(path, "get", INTERNET_HOST, PORT, str(wan)) == str(wan)
        except BaseException as e:
            failures.append(e)

    threads = [threading.Thread(target=job, args=(k,)) for k in sizes]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures
    for key, (lan, wan) in sizes.items():
        c = cages[key].counters()
        assert_data(c.net_lan_rx_bytes, lan, f"cage {key} lan")
        assert_data(c.net_wan_rx_bytes, wan, f"cage {key} wan")
    # One read of the rules for every cage gives what each cage's own read gives.
    together = read_counters(list(cages.values()))
    assert together == {c.job_id: c.counters() for c in cages.values()}


def test_rules_compiled_once_per_shape_equal_python_iptables_renders(make_cage, net_config):
    """The patched raw entries are byte for byte what python-iptables builds."""
    if net_config.firewall != "iptables-legacy":
        pytest.skip("x_tables only: nftables rules are checked by `nft list`")
    cages = [make_cage(k) for k in "ab"]
    table = xtables_iptc._table("filter")
    try:
        for cage in cages:
            plan = cage.plan
            specs = [r for chain in plan.chains for r in chain.rules]
            for spec in [*specs, *(j.rule for j in plan.jumps)]:
                fresh = xtables_iptc._render(spec, table)
                fresh.final_check()
                entry = xtables_iptc._entry(spec, table)
                assert (entry.entry, entry.mask) == (bytes(fresh.rule), bytes(fresh.mask)), spec
    finally:
        table.close()


def test_counters_are_live_and_final_counters_come_from_destroy(make_cage):
    cage = make_cage()
    assert cage.counters() == ZERO
    run_in_cage(cage.netns_path, "get", CAMPUS_HOST, PORT, str(MiB))
    live = cage.counters()
    assert live.net_lan_rx_bytes >= MiB
    final = cage.destroy()
    assert final == live
    assert cage.destroy() == final  # idempotent
    assert cage.counters() == final


# -- isolation -----------------------------------------------------------------------


def test_job_sees_only_lo_and_eth0(make_cage):
    cage = make_cage()
    assert run_in_cage(cage.netns_path, "ifaces") == "eth0 lo"
    assert forwarding_enabled()


def test_no_ipv6_leaves_the_cage(make_cage):
    """The rules are IPv4 only: eth0 makes no link-local address, and the node drops
    every IPv6 packet of the cage's veth."""
    cage = make_cage()
    assert forwarding_enabled() is True
    with rtnl.Socket() as nl:  # the kernel answers the netconf request (no fallback)
        (answer,) = nl.check([rtnl.get_forwarding()])
    assert rtnl.netconf_forwarding(answer.replies[0]) is True
    with open("/proc/sys/net/ipv4/ip_forward") as f:
        assert f.read().strip() == "1"
    with open(f"/proc/sys/net/ipv6/conf/{cage.host_veth}/disable_ipv6") as f:
        assert f.read().strip() == "1"
    # The link-local address would be there (tentative) as soon as eth0 had carrier.
    argv = ["nsenter", f"--net={cage.netns_path}", "ip", "-6", "-o", "addr", "show", "dev", "eth0"]
    assert subprocess.run(argv, capture_output=True, text=True, check=True).stdout == ""
    argv = ["nsenter", f"--net={cage.netns_path}", "ip", "-d", "link", "show", "dev", "eth0"]
    assert "addrgenmode none" in subprocess.run(argv, capture_output=True, text=True).stdout


def test_cage_cannot_reach_another_cage(make_cage, networld):
    a, b = make_cage("a"), make_cage("b")
    listener = networld.popen_in(
        a.netns_path, [sys.executable, world_mod.CLIENT, "listen", "8000"], for_test=True
    )
    assert listener.stdout.readline().strip() == "ready"
    # Through the node, to the other job and to the other cage's node-side address.
    assert run_in_cage(b.netns_path, "connect", str(a.address.ip), "8000") == "EHOSTUNREACH"
    assert run_in_cage(b.netns_path, "ping", str(a.address.ip), "1", "56") == "0"
    assert run_in_cage(a.netns_path, "connect", "127.0.0.1", "8000") == "connected"
    # Its own connection is the first it accepted (waited for: the handshake completes
    # in the kernel before the listener's accept() prints), and there is no other.
    assert listener.stdout.readline().strip() == "accepted"
    listener.kill()
    assert "accepted" not in listener.communicate()[0]


def test_inbound_connections_from_hosts_are_dropped(make_cage, networld):
    """The router knows the way to the pool, so only the cage's rules stop these."""
    cage = make_cage()
    listener = networld.popen_in(
        cage.netns_path, [sys.executable, world_mod.CLIENT, "listen", "8000"], for_test=True
    )
    assert listener.stdout.readline().strip() == "ready"

    def dropped() -> int:
        return refused(networld, cage)["rx"]

    for host in (networld.internet, networld.campus):
        before = dropped()
        client = networld.popen_in(
            networld.netns_path(host),
            [sys.executable, world_mod.CLIENT, "connect", str(cage.address.ip), "8000"],
            for_test=True,
        )
        wait_until(lambda b=before: dropped() > b, "the SYN to hit the cage's DROP rule")
        client.kill()
    c = cage.counters()
    assert c == ZERO, "dropped inbound packets must not be billed"
    listener.kill()
    assert "accepted" not in listener.communicate()[0]


def test_spoofed_source_addresses_are_dropped(make_cage, networld):
    cage = make_cage()
    spoofed = "100.64.255.250"
    networld.exec_in(
        networld.node, ["ip", "-n", cage.netns_name, "addr", "add", f"{spoofed}/32", "dev", "eth0"]
    )
    run_in_cage(cage.netns_path, "udp-send", CAMPUS_HOST, PORT, "10", "100", spoofed)
    run_in_cage(cage.netns_path, "udp-send", NODE_UPLINK, PORT, "10", "100", spoofed)
    assert run_in_cage(cage.netns_path, "ping", INTERNET_HOST, "2", "56", spoofed) == "0"
    assert cage.counters() == ZERO
    # 10 + 2 forwarded, 10 to the node: every one refused by the anti-spoof rules.
    assert refused(networld, cage) == {"tx": 22, "rx": 0}


def refused(networld, cage: NetworkCage) -> dict[str, int]:
    """Packets the cage's rules refused (DROP or REJECT), from the job ("tx") and to it
    ("rx"), read with the node's own tools (`nft` or `iptables-legacy-save`)."""
    if cage.firewall_backend == "nftables":
        out = {}
        for way in ("tx", "rx"):
            name = f"JC-{cage.plan.cage_hash}-REFUSED-{way.upper()}"
            listing = networld.exec_in(
                networld.node, ["nft", "list", "counter", "ip", "jobcage", name]
            ).stdout
            out[way] = int(re.search(r"packets (\d+)", listing).group(1))
        return out
    saved = networld.exec_in(networld.node, ["iptables-legacy-save", "-c", "-t", "filter"])
    ftx, frx, ntx, nrx = cage.plan.chain_names
    chains = {"tx": (ftx, ntx), "rx": (frx, nrx)}
    return {
        way: sum(
            int(line.split(":")[0].strip("["))
            for line in saved.stdout.splitlines()
            if any(f"-A {chain} " in line for chain in names)
            and (line.endswith("-j DROP") or "-j REJECT" in line)
        )
        for way, names in chains.items()
    }


# -- lifecycle -----------------------------------------------------------------------


def test_last_cage_leaves_the_node_as_before(node, net_config, job_id):
    before = node.node_state()
    a = NetworkCage.create(job_id + "a", net_config)
    b = NetworkCage.create(job_id + "b", net_config)
    a.destroy()
    if net_config.firewall == "nftables":
        middle = node.exec_in(node.node, ["nft", "list", "ruleset"]).stdout
        assert "JOBCAGE-FWD-TX" in middle and "masquerade" in middle  # b still needs them
    else:
        middle = node.exec_in(node.node, ["iptables-legacy-save"]).stdout
        assert "JOBCAGE-FWD-TX" in middle and "MASQUERADE" in middle
    b.destroy()
    node.wait_until_empty(
        lambda: [n for n in node.node_state()["links"] if n.startswith("jc")], "veths to go"
    )
    assert node.node_state() == before


def test_same_job_twice_is_refused_and_changes_nothing(make_cage, net_config, job_id):
    cage = make_cage()
    with pytest.raises(CageExistsError, match="jobcage reap"):
        NetworkCage.create(job_id, net_config)
    assert run_in_cage(cage.netns_path, "get", CAMPUS_HOST, PORT, "1000") == "1000"


def test_recreating_a_job_right_after_destroy_works(make_cage, net_config, job_id):
    """The kernel deletes the old veth asynchronously; create waits for it."""
    first = NetworkCage.create(job_id, net_config)
    first.destroy()
    again = make_cage()
    assert run_in_cage(again.netns_path, "get", CAMPUS_HOST, PORT, "1000") == "1000"


def test_pool_exhausted(make_cage, net_config, job_id):
    tiny = net_config.replace(address_pool="100.64.9.0/30")
    make_cage("a", config=tiny)
    with pytest.raises(AddressPoolExhaustedError, match="address_pool"):
        NetworkCage.create(job_id + "b", tiny)


@pytest.mark.parametrize("stage", ["firewall", "uplink", "resolv"])
def test_failed_create_leaves_nothing(node, net_config, job_id, monkeypatch, stage):
    if stage == "firewall":

        def boom(*args, **kwargs):
            raise NetworkError("injected")

        monkeypatch.setattr(firewall_mod.IptablesLegacyFirewall, "install", boom)
        monkeypatch.setattr(NftablesFirewall, "install", boom)
        config = net_config
    elif stage == "uplink":  # the filter rules are in when the NAT step fails
        config = net_config.replace(uplink="nosuchlink0")
    else:
        monkeypatch.setattr(resolv_mod, "RESOLV_CONF", "/proc/self/nonexistent")
        monkeypatch.setattr(resolv_mod, "plan_resolv_conf", lambda *a, **kw: 1 / 0)
        config = net_config
    with pytest.raises((NetworkError, ZeroDivisionError)):
        NetworkCage.create(job_id, config)
    assert not os.path.exists(f"/run/netns/jobcage-{job_id}")
    leases = os.path.join(config.state_dir, "network", "leases")
    assert os.listdir(leases) == []
    # The node fixture checks links and iptables.


def test_teardown_from_the_record_of_a_dead_owner(node, net_config, job_id):
    cage = NetworkCage.create(job_id, net_config)
    run_in_cage(cage.netns_path, "get", INTERNET_HOST, PORT, str(MiB))
    record = json.loads(json.dumps(cage.to_record()))
    del cage  # the owner "dies" with its object
    orphan = NetworkCage.from_record(record, net_config)
    final = orphan.destroy()
    assert final is not None and final.net_wan_rx_bytes >= MiB
    # Everything is gone now; a second reaper finds nothing and does not fail.
    assert NetworkCage.from_record(record, net_config).destroy() is None


def mine(orphans: list, job_id: str) -> list:
    """The orphans of ``job_id``, and of no other run's jobs (leases are per state dir,
    chains and veths per simulated node; netns names are the machine's)."""
    from jobcage.ids import netns_name

    return [o for o in orphans if o.kind != "netns" or o.name == netns_name(job_id)]


def test_find_orphans_lists_what_has_no_record(node, net_config, job_id):
    cage = NetworkCage.create(job_id, net_config)
    try:
        kinds = {(o.kind, o.name) for o in find_orphans(net_config)}
        assert ("netns", cage.netns_name) in kinds
        assert ("veth", cage.host_veth) in kinds
        # x_tables: the cage's chains; nftables: its counters (JC-<hash>-...).
        assert any(k == "chain" and n.startswith(f"JC-{cage.plan.cage_hash}-") for k, n in kinds)
        assert ("lease", str(cage.lease_index)) in kinds
        store = StateStore(net_config.state_dir)
        store.claim(store.new_record(job_id, network=network_part(cage.to_record(), job_id)))
        assert mine(find_orphans(net_config), job_id) == []
        store.remove(job_id)
    finally:
        cage.destroy()


def test_find_orphans_leaves_another_state_dirs_cages_alone(node, net_config, job_id, tmp_path):
    """A reap run with another state dir (a second config, a test run beside
    production) shares the node's links and rules: a live cage of this state dir is
    no orphan of that one. (A second installation's cages are refused: see
    tests/test_network_pools.py.)"""
    other_config = net_config.replace(state_dir=str(tmp_path / "other"))
    os.makedirs(os.path.join(other_config.state_dir, "network", "leases"))
    mine_ = NetworkCage.create(f"{job_id}a", net_config)
    try:
        names = {o.name for o in find_orphans(net_config)}
        assert mine_.host_veth in names  # this state dir has no record of it
        names = {o.name for o in find_orphans(other_config)}
        assert mine_.host_veth not in names and mine_.netns_name not in names
        assert not [n for n in names if n.startswith(f"JC-{mine_.plan.cage_hash}-")]
    finally:
        mine_.destroy()


CONCURRENT_SCRIPT = (
    GUARDED_SCRIPT
    + """
import dataclasses
import json
config = Config(state_dir=sys.argv[1], campus_networks=("192.0.2.0/24",), firewall=sys.argv[3])
cage = NetworkCage.create(sys.argv[2], config)
print(json.dumps({"address": str(cage.address), "counters": str(cage.counters())}), flush=True)
sys.stdin.readline()  # hold the lease until every process has one
cage.destroy()
"""
)


def test_concurrent_creates_from_many_processes(node, net_config, job_id):
    env = dict(os.environ, JC_INITIAL_NETNS_INO=str(world_mod.INITIAL_NETNS_INO))
    procs = [
        subprocess.Popen(
            [
                "nsenter",
                f"--net={node.netns_path(node.node)}",
                "--",
                sys.executable,
                "-c",
                CONCURRENT_SCRIPT,
                net_config.state_dir,
                f"{job_id}p{i}",
                net_config.firewall,
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for i in range(8)
    ]
    # Every cage exists at once: read each one's line before letting any go.
    lines = [p.stdout.readline() for p in procs]
    results = [p.communicate("go\n", timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err for _, err in results]
    addresses = [json.loads(line)["address"] for line in lines]
    assert len(set(addresses)) == len(addresses)


def test_loopback_resolver_gives_the_job_a_resolv_conf(make_cage, monkeypatch, tmp_path):
    node_conf = tmp_path / "resolv.conf"
    node_conf.write_text("nameserver 127.0.0.53\nsearch example.org\n")
    resolved = tmp_path / "resolved.conf"
    resolved.write_text("nameserver 192.0.2.53\nsearch example.org\n")
    monkeypatch.setattr(resolv_mod, "RESOLV_CONF", str(node_conf))
    monkeypatch.setattr(resolv_mod, "RESOLVED_RESOLV_CONF", str(resolved))
    cage = make_cage()
    assert cage.resolv_conf_path == f"/etc/netns/{cage.netns_name}/resolv.conf"
    with open(cage.resolv_conf_path) as f:
        text = f.read()
    assert "nameserver 192.0.2.53" in text and "127.0.0.53" not in text
    # `ip netns exec` binds it over /etc/resolv.conf, as JobCage's spawn does.
    out = subprocess.run(
        ["ip", "netns", "exec", cage.netns_name, "cat", "/etc/resolv.conf"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert out.stdout == text
    cage.destroy()
    assert not os.path.exists(os.path.dirname(cage.resolv_conf_path))


# -- through JobCage -----------------------------------------------------------------


def test_jobcage_spawn_runs_the_job_in_the_cage(node, cage_config, job_id):
    from jobcage import JobCage

    config = cage_config.replace(campus_networks=(world_mod.CAMPUS_NETWORK,))
    with JobCage(job_id, network=True, config=config) as cage:
        proc = cage.spawn(
            [sys.executable, world_mod.CLIENT, "get", CAMPUS_HOST, PORT, str(2 * MiB)],
            stdout=subprocess.PIPE,
        )
        out, _ = proc.communicate(timeout=60)
        assert out.decode().strip() == str(2 * MiB)
        proc = cage.spawn(
            [sys.executable, world_mod.CLIENT, "put", INTERNET_HOST, PORT, str(MiB)],
            stdout=subprocess.PIPE,
        )
        *info, result = proc.communicate(timeout=60)[0].decode().split()
        assert result == str(MiB) and info[0] == "retransmitted"
        live = cage.usage()
        assert_data(live.net_lan_rx_bytes, 2 * MiB, "live lan rx")
    usage = cage.final_usage
    assert usage is not None
    assert_data(usage.net_lan_rx_bytes, 2 * MiB, "final lan rx")
    assert_data(usage.net_wan_tx_bytes, MiB, "final wan tx", resent=int(info[1]))


def test_remove_orphan_clears_a_cage_whose_record_is_lost(node, net_config, job_id):
    from jobcage.network import remove_orphan

    NetworkCage.create(job_id, net_config)  # and its handle and record are lost
    # Only this job's: /run/netns is the machine's, and another run may have cages.
    orphans = mine(find_orphans(net_config), job_id)
    assert {o.kind for o in orphans} == {"netns", "veth", "chain", "lease"}
    # netns first (the veth goes with it), then chains; the last chain takes the
    # shared chains and the NAT along.
    order = {"netns": 0, "veth": 1, "chain": 2, "lease": 3}
    for orphan in sorted(orphans, key=lambda o: order[o.kind]):
        remove_orphan(orphan, net_config)
    node.wait_until_empty(
        lambda: [o for o in mine(find_orphans(net_config), job_id) if o.kind != "veth"] or None,
        "the orphans to go",
    )

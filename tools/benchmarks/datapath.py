"""Datapath and accuracy: traffic from a cage to the simulated hosts vs from the node
itself, and what the cage's counters say against the payload the tools report.

* throughput: iperf3, one TCP stream to the internet host from the node, from a cage,
  and from a *plain path*: a netns behind a veth, forwarded and NATed by one
  masquerade rule and nothing of JobCage's. The three run back to back in a shuffled
  order per round (load from elsewhere falls on all of a round); each ratio is the
  median of the rounds' ratios, because the machine's own throughput drifts by more
  than the cage costs (seen here: 11.6 to 16.3 Gbit/s from the node within a minute).
  cage / plain is what JobCage's rules cost; plain / node what the design does (one
  more hop: a veth, forwarding, NAT), whoever builds it;
* request rate: sequential small GETs on one kept-alive connection (httpload.py);
* accuracy: the cage's counter deltas per class (LAN/WAN, rx/tx) against iperf3's
  payload bytes and the HTTP host's body bytes.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import random
import statistics
import subprocess
import sys
from collections.abc import Iterator

from jobcage.network.netns import NETNS_RUN_DIR

from . import floor
from .world import Node, networld

HTTP_PORT = 8090
HTTPLOAD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "httpload.py")


def start_http(node: Node) -> None:
    """A keep-alive server on the campus and internet hosts; the world stops them."""
    for host in (node.world.campus, node.world.internet):
        proc = node.world.popen_in(
            node.world.netns_path(host), [sys.executable, HTTPLOAD, "serve", str(HTTP_PORT)]
        )
        if proc.stdout.readline().strip() != "ready":
            raise RuntimeError(f"httpload server in {host} did not start")


def _nsenter(netns_path: str, argv: list[str], timeout: float) -> str:
    return subprocess.run(
        ["nsenter", f"--net={netns_path}", "--", *argv],
        capture_output=True, text=True, check=True, timeout=timeout,
    ).stdout  # fmt: skip


def iperf(netns_path: str, host: str, seconds: int, reverse: bool = False, omit: int = 0) -> dict:
    """``omit``: leave the first seconds (slow start) out of the figures."""
    argv = ["iperf3", "-c", host, "-p", str(networld.IPERF_PORT), "-t", str(seconds), "-J"]
    argv += ["-O", str(omit)] if omit else []
    out = json.loads(_nsenter(netns_path, argv + (["-R"] if reverse else []), seconds + 30))
    received = out["end"]["sum_received"]
    return {"gbps": received["bits_per_second"] / 1e9, "bytes": received["bytes"]}


def http(netns_path: str, host: str, count: int, size: int) -> dict:
    argv = [sys.executable, HTTPLOAD, "get", host, str(HTTP_PORT), str(count), str(size)]
    return json.loads(_nsenter(netns_path, argv, 120))


# RFC 2544's benchmarking range: neither the pool (JobCage's rules match it) nor the
# world's networks.
PLAIN_SUBNET = ipaddress.IPv4Network("198.18.0.0/30")


@contextlib.contextmanager
def plain_path(node: Node) -> Iterator[str]:
    """The cage's path without JobCage: floor.build_links' netns and veth (named
    without "jc", so JobCage's chains let it be), and one masquerade rule with the
    cage's firewall (nftables: in a table of its own). Yields the netns path; the
    world's end removes the rule if this does not."""
    name = node.job_id("plain")
    path = os.path.join(NETNS_RUN_DIR, name)
    host, job = (ipaddress.IPv4Interface(f"{a}/30") for a in PLAIN_SUBNET.hosts())
    table = f"{node.tag}plain"
    rule = ["POSTROUTING", "-s", str(PLAIN_SUBNET), "-j", "MASQUERADE"]
    legacy = node.config.firewall == "iptables-legacy"
    os.makedirs(NETNS_RUN_DIR, exist_ok=True)
    floor.build_links(path, f"{node.tag}p", host, job)
    try:
        if legacy:
            _run(["iptables-legacy", "-w", "-t", "nat", "-A", *rule])
        else:
            script = (
                f"add table ip {table}\n"
                f"add chain ip {table} post {{ type nat hook postrouting priority srcnat; }}\n"
                f"add rule ip {table} post ip saddr {PLAIN_SUBNET} masquerade\n"
            )
            _run(["nft", "-f", "-"], script)
        try:
            yield path
        finally:
            if legacy:
                _run(["iptables-legacy", "-w", "-t", "nat", "-D", *rule])
            else:
                _run(["nft", "delete", "table", "ip", table])
    finally:
        floor.remove_netns(path)


def _run(argv: list[str], stdin: str = "") -> None:
    subprocess.run(argv, input=stdin, text=True, check=True)


def _ratio(rounds: list[dict[str, float]], a: str, b: str) -> float:
    return round(statistics.median(r[a] / r[b] for r in rounds), 3)


def throughput(node: Node, paths: dict[str, str], seconds: int, reps: int, requests: int) -> dict:
    """``paths``: "cage" and "plain" -> netns path. Rounds in a seeded shuffled order."""
    paths = {"node": node.world.netns_path(node.world.node), **paths}
    host = networld.INTERNET_HOST
    order = list(paths)
    shuffle = random.Random(seconds * 1000 + reps).shuffle
    g: list[dict[str, float]] = []
    r: list[dict[str, float]] = []
    for _ in range(reps):
        shuffle(order)
        g.append({})
        r.append({})
        for who in order:
            g[-1][who] = iperf(paths[who], host, seconds, omit=1 if seconds > 1 else 0)["gbps"]
            r[-1][who] = http(paths[who], host, requests, 100)["rps"]
    out: dict = {}
    for who in paths:
        out[f"iperf_gbps_{who}"] = round(statistics.median(x[who] for x in g), 2)
    for a, b in (("cage", "node"), ("plain", "node"), ("cage", "plain")):
        out[f"iperf_{a}_vs_{b}"] = _ratio(g, a, b)
    out["iperf_samples_gbps"] = {w: [round(x[w], 2) for x in g] for w in paths}
    for who in paths:
        out[f"http_rps_{who}"] = round(statistics.median(x[who] for x in r))
    for a, b in (("cage", "node"), ("plain", "node"), ("cage", "plain")):
        out[f"http_{a}_vs_{b}"] = _ratio(r, a, b)
    out["http_rps_p5"] = {w: round(min(x[w] for x in r)) for w in paths}
    return out


def accuracy(cage_path: str, counters, seconds: int, http_bytes: int) -> list[dict]:
    """Counted bytes (the cage's rules) vs payload (the tools), one row per class."""
    rows = []
    lan, wan = networld.CAMPUS_HOST, networld.INTERNET_HOST
    cases = [
        ("iperf3 upload", "lan_tx", lambda: iperf(cage_path, lan, seconds)["bytes"]),
        ("iperf3 download", "lan_rx", lambda: iperf(cage_path, lan, seconds, True)["bytes"]),
        ("iperf3 upload", "wan_tx", lambda: iperf(cage_path, wan, seconds)["bytes"]),
        ("iperf3 download", "wan_rx", lambda: iperf(cage_path, wan, seconds, True)["bytes"]),
        ("HTTP GET", "lan_rx", lambda: http(cage_path, lan, 1, http_bytes)["body_bytes"]),
        ("HTTP GET", "wan_rx", lambda: http(cage_path, wan, 1, http_bytes)["body_bytes"]),
    ]
    for tool, cls, fn in cases:
        before = counters()
        payload = fn()
        after = counters()
        field = f"net_{cls}_bytes"
        rows.append(
            accuracy_row(tool, cls, payload, getattr(after, field) - getattr(before, field))
        )
    return rows


def accuracy_row(tool: str, cls: str, payload: int, counted: int) -> dict:
    return {
        "tool": tool,
        "class": cls,
        "payload_bytes": payload,
        "counted_bytes": counted,
        "counted_vs_payload": round(counted / payload, 5) if payload else None,
    }

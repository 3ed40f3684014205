"""Datapath and accuracy: traffic from a cage to the simulated hosts vs from the node
itself, and what the cage's counters say against the payload the tools report.

* throughput: iperf3, one TCP stream, node -> internet host vs cage -> internet host,
  in pairs run back to back, each pair in the other order from the one before (load
  from elsewhere falls on both of a pair); the ratio is the median of the pairs'
  ratios, because the machine's own throughput drifts by more than the cage costs
  (seen here: 11.6 to 16.3 Gbit/s from the node within a minute);
* request rate: sequential small GETs on one kept-alive connection (httpload.py);
* accuracy: the cage's counter deltas per class (LAN/WAN, rx/tx) against iperf3's
  payload bytes and the HTTP host's body bytes.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys

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


def throughput(node: Node, cage_path: str, seconds: int, reps: int, requests: int) -> dict:
    node_path = node.world.netns_path(node.world.node)
    host = networld.INTERNET_HOST
    g: dict[str, list[float]] = {"node": [], "cage": []}
    r: dict[str, list[float]] = {"node": [], "cage": []}
    order = [("node", node_path), ("cage", cage_path)]
    for rep in range(reps):
        for who, path in order if rep % 2 == 0 else order[::-1]:
            g[who].append(iperf(path, host, seconds, omit=1 if seconds > 1 else 0)["gbps"])
            r[who].append(http(path, host, requests, 100)["rps"])
    med = {k: statistics.median(v) for k, v in g.items()}
    rps = {k: statistics.median(v) for k, v in r.items()}
    pairs = [c / n for n, c in zip(g["node"], g["cage"], strict=True)]
    http_pairs = [c / n for n, c in zip(r["node"], r["cage"], strict=True)]
    return {
        "iperf_gbps_node": round(med["node"], 2),
        "iperf_gbps_cage": round(med["cage"], 2),
        "iperf_cage_vs_node": round(statistics.median(pairs), 3),
        "iperf_samples_gbps": {k: [round(x, 2) for x in v] for k, v in g.items()},
        "http_rps_node": round(rps["node"]),
        "http_rps_cage": round(rps["cage"]),
        "http_cage_vs_node": round(statistics.median(http_pairs), 3),
        "http_rps_p5": {k: round(min(v)) for k, v in r.items()},
    }


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
        counted = getattr(after, field) - getattr(before, field)
        rows.append(
            {
                "tool": tool,
                "class": cls,
                "payload_bytes": payload,
                "counted_bytes": counted,
                "counted_vs_payload": round(counted / payload, 5) if payload else None,
            }
        )
    return rows

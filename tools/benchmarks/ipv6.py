"""The ipv6 section of tools/bench (nftables: IPv6 cages are nftables-only), in a
dual-stack world of its own:

* lifecycle: JobCage(network=True) create -> spawn `true` -> wait -> destroy, with
  ``ipv6 = "nat"`` (dual-stack) against ``ipv6 = "off"`` (IPv4 only), interleaved;
  also the network part alone (NetworkCage create + destroy), both ways;
* datapath: one IPv6 TCP stream (iperf3) to the internet host from the node itself and
  from a dual-stack cage while N other dual-stack cages exist, in shuffled rounds
  (datapath.py's method), the ratio the median of the rounds';
* accuracy: the cage's IPv6 counter deltas per class against iperf3's payload.
"""

from __future__ import annotations

import random
import statistics

from jobcage import JobCage
from jobcage.network import NetworkCage

from .common import measure_interleaved, ratio
from .datapath import accuracy_row, iperf
from .scale import Crowd
from .world import Node, networld


def run(node: Node, quick: bool) -> dict:
    runs = 3 if quick else 30
    out: dict = {"lifecycle": lifecycle(node, runs)}
    # With a cage of each kind resident: what one more cage costs on a node that has
    # jobs (the shared tables and IPv6 forwarding stay), not the first and last's.
    resident = [
        NetworkCage.create(node.job_id("r4"), node.config.replace(ipv6="off")),
        NetworkCage.create(node.job_id("r6"), node.config),
    ]
    try:
        out["lifecycle_resident"] = lifecycle(node, runs)
    finally:
        for cage in resident:
            cage.destroy()
    seconds, reps = (1, 1) if quick else (3, 8)
    others = 20 if quick else 500
    probe = NetworkCage.create(node.job_id("v6dp"), node.config)
    crowd = Crowd(node)
    try:
        out["accuracy"] = accuracy(probe, seconds)
        out["others"] = others
        out["ms_per_cage_added"] = round(crowd.grow_to(others), 3)
        out["datapath"] = datapath(node, probe.netns_path, seconds, reps)
    finally:
        out["ms_per_cage_removed"] = round(crowd.clear(), 3)
        probe.destroy()
    return out


def lifecycle(node: Node, runs: int) -> dict:
    v4 = node.config.replace(ipv6="off")
    counter = iter(range(10**9))

    def cycle(config) -> None:
        job = node.job_id(f"l{next(counter)}")
        with JobCage(job, memory_limit="1G", pids_limit=1000, network=True, config=config) as c:
            c.spawn(["true"]).wait()

    def network_only(config) -> None:
        NetworkCage.create(node.job_id(f"m{next(counter)}"), config).destroy()

    figures = measure_interleaved(
        {
            "dual_stack": lambda: cycle(node.config),
            "ipv4_only": lambda: cycle(v4),
            "network_dual_stack": lambda: network_only(node.config),
            "network_ipv4_only": lambda: network_only(v4),
        },
        runs,
    )
    out = {name: f.as_dict() for name, f in figures.items()}
    out["dual_stack_vs_ipv4_only"] = ratio(figures["dual_stack"], figures["ipv4_only"])
    out["network_dual_stack_vs_ipv4_only"] = ratio(
        figures["network_dual_stack"], figures["network_ipv4_only"]
    )
    return out


def datapath(node: Node, cage_path: str, seconds: int, reps: int) -> dict:
    paths = {"node": node.world.netns_path(node.world.node), "cage": cage_path}
    order = list(paths)
    shuffle = random.Random(seconds * 1000 + reps + 6).shuffle
    rounds: list[dict[str, float]] = []
    for _ in range(reps):
        shuffle(order)
        rounds.append({})
        for who in order:
            omit = 1 if seconds > 1 else 0
            rounds[-1][who] = iperf(paths[who], networld.INTERNET_HOST6, seconds, omit=omit)[
                "gbps"
            ]
    return {
        "iperf_gbps_node": round(statistics.median(r["node"] for r in rounds), 2),
        "iperf_gbps_cage": round(statistics.median(r["cage"] for r in rounds), 2),
        "iperf_cage_vs_node": round(statistics.median(r["cage"] / r["node"] for r in rounds), 3),
        "iperf_samples_gbps": {w: [round(r[w], 2) for r in rounds] for w in paths},
    }


def accuracy(cage: NetworkCage, seconds: int) -> list[dict]:
    """IPv6 counted bytes (the cage's ip6 rules) vs iperf3's payload, per class."""
    lan, wan = networld.CAMPUS_HOST6, networld.INTERNET_HOST6
    cases = [
        ("iperf3 upload", "lan_tx", lan, False),
        ("iperf3 download", "lan_rx", lan, True),
        ("iperf3 upload", "wan_tx", wan, False),
        ("iperf3 download", "wan_rx", wan, True),
    ]
    rows = []
    for tool, cls, host, reverse in cases:
        field = f"net_ipv6_{cls}_bytes"
        before = getattr(cage.counters(), field)
        payload = iperf(cage.netns_path, host, seconds, reverse)["bytes"]
        rows.append(accuracy_row(tool, cls, payload, getattr(cage.counters(), field) - before))
    return rows


TITLE = "### IPv6 (dual-stack cages, nftables)"
LIFECYCLE_HEAD = "| lifecycle, ms | median | p95 | dual-stack / IPv4-only |\n|---|---|---|---|"


def markdown(figures: dict) -> list[str]:
    dp = figures["datapath"]
    lines = [TITLE, "", *LIFECYCLE_HEAD.splitlines()]
    for where, lc in (
        ("idle node", figures["lifecycle"]),
        ("one cage of each resident", figures["lifecycle_resident"]),
    ):
        for who, key in (("JobCage", ""), ("network part alone", "network_")):
            d, v4 = lc[f"{key}dual_stack"], lc[f"{key}ipv4_only"]
            ratio_ = lc[f"{key}dual_stack_vs_ipv4_only"]
            lines += [
                f"| {who}, dual-stack, {where} | {d['median_ms']} | {d['p95_ms']} | {ratio_} |",
                f"| {who}, IPv4 only, {where} | {v4['median_ms']} | {v4['p95_ms']} | 1 |",
            ]
    lines += [
        "",
        f"IPv6 data path with {figures['others']} other dual-stack cages: cage "
        f"{dp['iperf_gbps_cage']} Gbit/s, node {dp['iperf_gbps_node']} Gbit/s, cage / node "
        f"{dp['iperf_cage_vs_node']} (median of the rounds' ratios; samples "
        f"{dp['iperf_samples_gbps']}).",
        "",
        "| IPv6 accuracy | class | payload | counted | counted / payload |",
        "|---|---|---|---|---|",
        *(
            f"| {r['tool']} | {r['class']} | {r['payload_bytes']} | {r['counted_bytes']} | "
            f"{r['counted_vs_payload']} |"
            for r in figures["accuracy"]
        ),
        "",
    ]
    return lines

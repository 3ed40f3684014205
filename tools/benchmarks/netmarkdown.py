"""Markdown tables of the network sections (netbench.run's result)."""

from __future__ import annotations

from .common import idle_rows


def _fig(d: dict) -> str:
    return f"{d['median_ms']} / {d['p95_ms']}"


def network_markdown(net: dict) -> list[str]:
    life = net["lifecycle"]
    lines = [
        "#### Lifecycle, networked (create, spawn `true`, wait, destroy), ms, median / p95",
        "",
        "| | median / p95 | ratio |",
        "|---|---|---|",
        f"| JobCage(network=True) | {_fig(life['jobcage'])} | {life['jobcage_vs_floor']}x floor |",
        f"| floor (raw netlink + one rules transaction) | {_fig(life['floor'])} | 1 |",
        f"| recipe (shell: ip, iptables-legacy, cgroupfs) | {_fig(life['recipe'])} | "
        f"{life['recipe_vs_jobcage']}x JobCage |",
        f"| network part only: NetworkCage | {_fig(life['network_only_jobcage'])} | "
        f"{life['network_only_jobcage_vs_floor']}x floor's |",
        f"| network part only: floor | {_fig(life['network_only_floor'])} | 1 |",
        *idle_rows(life["after_idle"]),
        "",
    ]
    sc = net["scale"]
    lines += [
        "#### Scale: one cage while N others exist, ms, median / p95",
        "",
        "| N | create+destroy | vs N=0 | live usage() | vs N=0 | read all N, one pass "
        "| read all N, counters() per cage | per cage / one pass | fill ms/cage |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for n in sc["sizes"]:
        e = sc[str(n)]
        per = e.get("read_all_per_cage")
        lines.append(
            f"| {n} | {_fig(e['create_destroy'])} | {e.get('create_destroy_vs_n0', 1)} | "
            f"{_fig(e['usage_one'])} | {e.get('usage_one_vs_n0', 1)} | "
            f"{_fig(e['read_all_one_pass'])} | {_fig(per) if per else '-'} | "
            f"{e.get('per_cage_vs_one_pass', '-')} | {e['fill_ms_per_cage']} |"
        )
    lines += ["", f"Draining the crowd: {sc['drain_ms_per_cage']} ms per cage.", ""]
    lines += [
        "#### Datapath: job -> internet host through a cage vs from the node itself",
        "",
        "Medians of each; a ratio is the median of back-to-back rounds' ratios. *plain*:",
        "the cage's path (netns, veth, forwarding, one masquerade rule) without JobCage.",
        "",
        "| other cages | tool | node | plain | cage | cage / node | plain / node | cage / plain |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for n, d in net["datapath"].items():
        for tool, unit in (("iperf", "gbps"), ("http", "rps")):
            name = "iperf3 Gbit/s" if tool == "iperf" else "HTTP req/s"
            lines.append(
                f"| {n} | {name} | {d[f'{tool}_{unit}_node']} | {d[f'{tool}_{unit}_plain']} "
                f"| {d[f'{tool}_{unit}_cage']} | {d[f'{tool}_cage_vs_node']} "
                f"| {d[f'{tool}_plain_vs_node']} | {d[f'{tool}_cage_vs_plain']} |"
            )
    lines += [
        "",
        "#### Accuracy: counted bytes vs payload, per class",
        "",
        "| tool | class | payload bytes | counted bytes | counted / payload |",
        "|---|---|---|---|---|",
    ]
    for r in net["accuracy"]:
        lines.append(
            f"| {r['tool']} | {r['class']} | {r['payload_bytes']:,} | {r['counted_bytes']:,} | "
            f"{r['counted_vs_payload']} |"
        )
    lines.append("")
    return lines

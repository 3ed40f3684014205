"""tools/bench: measure JobCage against references taken in the same run.

Prints one JSON document; with --markdown also writes the tables of
docs/performance.md. --quick runs every section small, for the test suite.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from . import common, kill, lifecycle

SECTIONS = ("lifecycle", "kill", "network", "ipv6", "watch", "process")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tools/bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="few runs, small sizes")
    parser.add_argument("--only", choices=SECTIONS, action="append", help="run a section")
    parser.add_argument("--json", metavar="FILE", help="also write the JSON here")
    parser.add_argument("--markdown", metavar="FILE", help="write a markdown report here")
    parser.add_argument(
        "--firewall",
        choices=("nftables", "iptables-legacy"),
        action="append",
        help="network sections for this backend only (default: both)",
    )
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("tools/bench: run as root", file=sys.stderr)
        return 1
    sections = args.only or list(SECTIONS)
    result: dict = {
        "machine": common.machine(),
        "quick": args.quick,
        "started_unix": int(time.time()),
    }
    if "lifecycle" in sections:
        result["lifecycle"] = lifecycle.run(runs=5 if args.quick else 50)
    if "kill" in sections:
        sizes = [100] if args.quick else [1000, 5000]
        result["kill"] = kill.run(sizes, runs=1 if args.quick else 3)
    if "watch" in sections:
        from . import watch

        result["watch"] = watch.run(quick=args.quick)
    if "network" in sections:
        from . import netbench, world

        result["netns_suffix"] = world.RUN_SUFFIX
        result["network"] = netbench.run(
            quick=args.quick, firewalls=tuple(args.firewall or netbench.FIREWALLS)
        )
    if "ipv6" in sections:
        from . import ipv6, world

        result["netns_suffix"] = world.RUN_SUFFIX
        with world.node("nftables", ipv6=True) as node:
            result["ipv6"] = ipv6.run(node, quick=args.quick)
    if "process" in sections:
        from . import process

        result["process"] = process.run(runs=2 if args.quick else 15)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(markdown(result))
    return 0


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = [
        "## Measured",
        "",
        f"Machine: {m['cores']} cores, kernel {m['kernel']}, cgroup v"
        f"{m['cgroup_default_version']}, {m['iptables']}. "
        f"{'Quick run.' if result['quick'] else ''}",
        "",
    ]
    if "lifecycle" in result:
        c = result["lifecycle"]["cgroup_only"]
        lines += [
            "### Lifecycle, cgroup-only (create, spawn `true`, wait, destroy), ms",
            "",
            "| | median | p95 | ratio |",
            "|---|---|---|---|",
            f"| JobCage | {c['jobcage']['median_ms']} | {c['jobcage']['p95_ms']} | "
            f"{c['jobcage_vs_floor']}x floor |",
            f"| floor (raw cgroupfs) | {c['floor']['median_ms']} | {c['floor']['p95_ms']} | 1 |",
            f"| recipe (shell) | {c['recipe']['median_ms']} | {c['recipe']['p95_ms']} | "
            f"{c['recipe_vs_jobcage']}x JobCage |",
            *common.idle_rows(c["after_idle"], split=True),
            "",
        ]
        net = result.get("lifecycle", {}).get("networked")
        if net:
            lines += [f"Networked: {json.dumps(net)}", ""]
    if "kill" in result:
        lines += [
            "### Kill a fork storm of K processes (bounded by pids.max = K), ms",
            "",
            "| K | JobCage | naive loop | naive passes | cgroup.kill | JobCage / cgroup.kill |",
            "|---|---|---|---|---|---|",
        ]
        for k, e in result["kill"].items():
            ck = e.get("cgroup_kill", {})
            lines.append(
                f"| {k} | {e['jobcage']['median_ms']} (p95 {e['jobcage']['p95_ms']}) | "
                f"{e['naive']['median_ms']} | {e['naive_passes']} | "
                f"{ck.get('median_ms', 'n/a')} | {e.get('jobcage_vs_cgroup_kill', 'n/a')} |"
            )
        lines.append("")
    if "process" in result:
        from .process import markdown as process_markdown

        lines += process_markdown(result["process"])
    if "watch" in result:
        from .watch import markdown as watch_markdown

        lines += watch_markdown(result["watch"])
    if "network" in result:
        from .netmarkdown import network_markdown

        for firewall, figures in result["network"].items():
            lines += [f"### Network sections, firewall = {firewall}", ""]
            lines += network_markdown(figures)
    if "ipv6" in result:
        from .ipv6 import markdown as ipv6_markdown

        lines += ipv6_markdown(result["ipv6"])
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())

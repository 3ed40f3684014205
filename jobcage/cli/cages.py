"""The administrator's commands over the node's cages: list, stats, kill, reap,
doctor, and the node daemon `watch`."""

from __future__ import annotations

import argparse
import json
import time

from ..usage import human_bytes
from .common import EXIT_FAILED, EXIT_OK, config_of, error, warn


def cmd_list(args: argparse.Namespace) -> int:
    from .. import admin

    cages, bad = admin.list_cages_and_bad(config_of(args))
    for record in bad:
        warn(f"{record}; `jobcage reap` moves it aside")
    if args.json:
        for cage in cages:
            print(json.dumps(cage.to_dict(), separators=(",", ":")))
        return EXIT_OK
    rows = [("JOB ID", "STATUS", "OWNER", "ALIVE", "PROCS", "AGE", "ADDRESS", "NET RX/TX")]
    for c in cages:
        rows.append(
            (
                c.job_id,
                c.status,
                str(c.owner_pid) if c.owner_pid is not None else "-",
                "yes" if c.owner_alive else "no",
                str(c.processes) if c.processes is not None else "-",
                _age(c.age_seconds),
                c.address or "-",
                _net(c.network),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip())
    orphaned = sum(1 for c in cages if c.status in {"orphaned", "teardown-failed"})
    if orphaned:
        warn(f"{orphaned} cage(s) without a live owner: `jobcage reap` removes them")
    return EXIT_OK


def _net(counters: dict[str, int] | None) -> str:
    """LAN+WAN bytes into / out of the job, from the one-pass read of `list_cages`."""
    if counters is None:
        return "-"
    rx = counters["net_lan_rx_bytes"] + counters["net_wan_rx_bytes"]
    tx = counters["net_lan_tx_bytes"] + counters["net_wan_tx_bytes"]
    return f"{human_bytes(rx)}/{human_bytes(tx)}"


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def cmd_stats(args: argparse.Namespace) -> int:
    from .. import admin

    usage = admin.cage_stats(args.job_id, config_of(args))
    if args.json:
        print(json.dumps({"job_id": args.job_id, "time_unix": time.time(), **usage.to_dict()}))
    else:
        print(f"job {args.job_id}")
        print(usage.to_table())
    return EXIT_OK


def cmd_kill(args: argparse.Namespace) -> int:
    from .. import admin

    killed = admin.kill_cage(args.job_id, config_of(args))
    print(f"killed {killed} process(es) of job {args.job_id}")
    return EXIT_OK


def cmd_reap(args: argparse.Namespace) -> int:
    from .. import recovery

    report = recovery.reap(config_of(args), dry_run=args.dry_run)
    if args.json:
        print(json.dumps(report.to_dict(), separators=(",", ":")))
    else:
        verb = "would reap" if report.dry_run else "reaped"
        for cage in report.cages:
            what = f"{verb} {cage.job_id} ({cage.reason}"
            if cage.owner_pid is not None:
                what += f", owner pid {cage.owner_pid}"
            what += ")"
            if not report.dry_run:
                what += f": killed {cage.killed}"
                if cage.usage_file:
                    what += f", usage saved to {cage.usage_file}"
            print(what)
        if not report.cages:
            print(f"nothing to reap ({report.live} live cage(s) left alone)")
    for aside in report.set_aside:
        warn(str(aside))
    for job_id in report.restored:
        print(f"restored the rules of {job_id} (gone: a firewall reload?); its usage has a gap")
    for problem in report.errors:
        error(problem)
    return EXIT_FAILED if report.errors else EXIT_OK


def cmd_doctor(args: argparse.Namespace) -> int:
    from .. import doctor

    checks = doctor.run_checks(config_of(args), network=not args.no_network)
    for c in checks:
        if args.json:
            print(json.dumps(c.to_dict()))
        else:
            print(f"{c.status.value:<4}  {c.name}: {c.message}")
    is_ready = doctor.ready(checks)
    if not args.json:
        print("node is ready" if is_ready else "node is NOT ready: fix the FAIL lines above")
    return EXIT_OK if is_ready else EXIT_FAILED


def cmd_watch(args: argparse.Namespace) -> int:
    from ..watch import command

    return command.command(args, lambda: config_of(args))

"""Watch: what the proc-connector watcher handles, misses, reports, and costs the job.

- throughput: a job forks F children one after another (each exits at once); the
  watcher's CPU (this process's, whose main thread only waits) per 1000 forks and the
  events it applied per CPU second;
- storm: 8 workers fork until the cage holds S processes (pids.max bounds it), each
  child blocking; the fraction of those forks the watcher saw with the default buffer,
  then with a deliberately small one: every miss must be reported (a loss) and the
  table equal to the cgroup after the resync, "silent" counts the runs where not;
- escape: a root job moves itself out of its cage; time from its last write to
  cgroup.procs to its death (pidfd), when it then execs (seen at the exec) and when it
  stays quiet (seen by the sweep, every watch_sweep_seconds);
- overhead: the throughput job's wall time in a cage with and without a watcher,
  in interleaved rounds in random order.
"""

from __future__ import annotations

import os
import random
import select
import shutil
import statistics
import subprocess
import sys
import time
import uuid

from jobcage import Config, JobCage
from jobcage.watch import Watcher

from .common import Figure, ratio
from .kill import PR_SET_CHILD_SUBREAPER, _reap_orphans

FORKER = (
    "import os, sys\n"
    "for _ in range(int(sys.argv[1])):\n"
    "    if os.fork() == 0:\n"
    "        os._exit(0)\n"
    "    os.wait()\n"
)
STORM = (
    "import os, sys\n"
    "n, workers = int(sys.argv[1]), 8\n"
    "r, w = os.pipe()\n"
    "for _ in range(workers):\n"
    "    if os.fork() == 0:\n"
    "        for _ in range(n // workers - 1):\n"
    "            if os.fork() == 0:\n"
    "                os.close(w); os.read(r, 1); os._exit(0)\n"
    "        os.read(r, 1); os._exit(0)\n"
    "os.read(r, 1)\n"
)
ESCAPE = (
    "import os, sys, time\n"
    "for f in sys.argv[2:]:\n"
    "    with open(f, 'w') as out:\n"
    "        out.write(str(os.getpid()))\n"
    "t = time.monotonic_ns()\n"
    "print(t, flush=True)\n"
    "if sys.argv[1] == 'exec':\n"
    "    os.execv('/bin/sleep', ['sleep', '60'])\n"
    "os.read(0, 1)\n"
)


def _name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


def _cpu() -> float:
    t = os.times()
    return t.user + t.system


def throughput(config: Config, forks: int) -> dict:
    watcher = Watcher().start()
    try:
        with JobCage(_name("wt"), config=config) as cage:
            tree = watcher.watch_cage(cage.job_id, cage.cgroup_paths, owner_pid=os.getpid())
            events0, cpu0 = watcher.source.events, _cpu()
            t = time.perf_counter()
            proc = cage.spawn([sys.executable, "-c", FORKER, str(forks)])
            watcher.claim(cage.job_id, proc.pid)
            proc.wait()
            watcher.unwatch(cage.job_id, owner_pid=os.getpid())
            wall, cpu = time.perf_counter() - t, _cpu() - cpu0
            events = watcher.source.events - events0
            seen = tree.forks_seen
    finally:
        watcher.stop()
    return {
        "forks": forks,
        "forks_seen": seen,
        "events_node_wide": events,
        "watcher_cpu_ms_per_1000_forks": round(cpu * 1000 / (forks / 1000), 1),
        "events_per_cpu_second": round(events / cpu) if cpu else None,
        "job_wall_s": round(wall, 3),
    }


def storm(config: Config, size: int, buffer_bytes: int) -> dict:
    watcher = Watcher(buffer_bytes=buffer_bytes, sweep_seconds=3600).start()
    try:
        with JobCage(_name("ws"), config=config, pids_limit=size + 64) as cage:
            tree = watcher.watch_cage(cage.job_id, cage.cgroup_paths, owner_pid=os.getpid())
            proc = cage.spawn([sys.executable, "-c", STORM, str(size)])
            watcher.claim(cage.job_id, proc.pid)
            _until_full(cage, size + 1)
            watcher.sync(cage.job_id)  # every queued event applied, a sweep done
            with watcher.lock:
                in_table = set(tree.procs)
                summary = watcher.summary(tree)
                forks_seen = tree.forks_seen
            in_cgroup = cage.pids()
            forks = len(in_cgroup) - 1
            reported = summary["events_lost"] > 0 or watcher.source.overflows > 0
            missed = forks - forks_seen
    finally:
        watcher.stop()
        _reap_orphans()
    return {
        "forks": forks,
        "forks_seen": forks_seen,
        "fraction_seen": round(forks_seen / forks, 4) if forks else None,
        "events_lost": summary["events_lost"],
        "overflows": watcher.source.overflows,
        "resyncs": watcher.resyncs,
        "table_equals_cgroup": in_table == in_cgroup,
        "silent": bool(missed > 0 and not reported) or in_table != in_cgroup,
    }


def _until_full(cage: JobCage, n: int) -> None:
    deadline = time.monotonic() + 120
    while len(cage.pids()) < n:
        if time.monotonic() > deadline:
            raise RuntimeError(f"storm did not reach {n} processes")
        time.sleep(0.01)


def _escape_once(config: Config, mode: str) -> float:
    with JobCage(_name("we"), config=config, watch=True) as cage:
        targets = [
            os.path.join(os.path.dirname(p), "cgroup.procs") for p in cage.cgroup_paths.values()
        ]
        proc = cage.spawn(
            [sys.executable, "-c", ESCAPE, mode, *targets],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        fd = os.pidfd_open(proc.pid)
        try:
            t0 = int(proc.stdout.readline())
            if not select.select([fd], [], [], 30)[0]:
                raise RuntimeError("the escaped process was not killed within 30 s")
            t1 = time.monotonic_ns()
        finally:
            os.close(fd)
        proc.wait()
    return (t1 - t0) / 1e6


def overhead(config: Config, forks: int, rounds: int) -> dict:
    def run(watch: bool) -> float:
        with JobCage(_name("wo"), config=config, watch=watch) as cage:
            t = time.perf_counter()
            cage.spawn([sys.executable, "-c", FORKER, str(forks)]).wait()
            return (time.perf_counter() - t) * 1000

    samples: dict[str, list[float]] = {"with": [], "without": []}
    rng = random.Random(0)
    for name in samples:  # warm-up
        run(name == "with")
    for _ in range(rounds):
        order = list(samples)
        rng.shuffle(order)
        for name in order:
            samples[name].append(run(name == "with"))
    with_, without = Figure("with", samples["with"]), Figure("without", samples["without"])
    return {
        "forks": forks,
        "with_watcher": with_.as_dict(),
        "without": without.as_dict(),
        "ratio": ratio(with_, without),
    }


def run(quick: bool) -> dict:
    suffix = uuid.uuid4().hex[:6]
    config = Config(
        state_dir=f"/run/jobcage-bench-{suffix}", cgroup_parent=f"/jobcage-bench-{suffix}"
    )
    load = os.getloadavg()
    forks = 500 if quick else 5000
    size = 200 if quick else 5000
    runs = 1 if quick else 3
    escape_runs = 3 if quick else 30
    import ctypes

    # Killed storms' orphans come to us and are reaped, not left to pid 1.
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    out: dict = {"loadavg_at_start": [round(x, 1) for x in load]}
    out["throughput"] = throughput(config, forks)
    out["storm_default_buffer"] = [storm(config, size, 32 << 20) for _ in range(runs)]
    out["storm_small_buffer"] = [storm(config, size, 64 << 10) for _ in range(runs)]
    for mode in ("exec", "quiet"):
        lat = [_escape_once(config, mode) for _ in range(escape_runs)]
        fig = Figure(f"escape_{mode}", lat)
        out[f"escape_to_kill_{mode}"] = {
            **fig.as_dict(),
            "mean_ms": round(statistics.mean(lat), 3),
        }
    out["overhead"] = overhead(config, 300 if quick else 2000, 3 if quick else 15)
    out["loadavg_at_end"] = [round(x, 1) for x in os.getloadavg()]
    shutil.rmtree(config.state_dir, ignore_errors=True)  # ours, made for this run
    return out


def markdown(w: dict) -> list[str]:
    t = w["throughput"]
    lines = [
        "### Watch: the proc-connector watcher",
        "",
        f"Load average at start {w['loadavg_at_start']}, at end {w['loadavg_at_end']} "
        "(2 cores shared with other engineers' test runs).",
        "",
        f"- Throughput: {t['forks']} sequential forks, {t['forks_seen']} seen; watcher CPU "
        f"{t['watcher_cpu_ms_per_1000_forks']} ms per 1000 forks; "
        f"{t['events_per_cpu_second']} events (node-wide) per CPU second.",
        "",
        "| storm | forks | seen | fraction | events lost | overflows | resyncs | table = "
        "cgroup | silent loss |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for label, key in (
        ("32M buffer", "storm_default_buffer"),
        ("64K buffer", "storm_small_buffer"),
    ):
        for s in w[key]:
            lines.append(
                f"| {label} | {s['forks']} | {s['forks_seen']} | {s['fraction_seen']} | "
                f"{s['events_lost']} | {s['overflows']} | {s['resyncs']} | "
                f"{s['table_equals_cgroup']} | {s['silent']} |"
            )
    lines += [
        "",
        "| escape, then | median ms | p95 ms | runs |",
        "|---|---|---|---|",
    ]
    for mode in ("exec", "quiet"):
        e = w[f"escape_to_kill_{mode}"]
        lines.append(f"| {mode} | {e['median_ms']} | {e['p95_ms']} | {e['runs']} |")
    o = w["overhead"]
    lines += [
        "",
        f"Overhead on a job forking {o['forks']} times: with watcher "
        f"{o['with_watcher']['median_ms']} ms (p95 {o['with_watcher']['p95_ms']}), without "
        f"{o['without']['median_ms']} ms (p95 {o['without']['p95_ms']}): "
        f"**{o['ratio']}x**, {o['without']['runs']} interleaved rounds.",
        "",
    ]
    return lines

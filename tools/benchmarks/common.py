"""Timing helpers shared by the benchmarks: medians, p95s, ratios, machine facts."""

from __future__ import annotations

import functools
import os
import platform
import random
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass

# A pause long enough that the next cgroup migration waits for a grace period again.
IDLE_S = 0.1
# A short quiet before each call where sizes, not states, are compared (scale).
SETTLE_S = 0.02


@dataclass
class Figure:
    """One measured series, in milliseconds."""

    name: str
    samples_ms: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.samples_ms)

    @property
    def p95(self) -> float:
        s = sorted(self.samples_ms)
        return s[min(len(s) - 1, round(0.95 * (len(s) - 1)))]

    def as_dict(self) -> dict:
        return {
            "median_ms": round(self.median, 3),
            "p95_ms": round(self.p95, 3),
            "runs": len(self.samples_ms),
        }


def measure(name: str, fn: Callable[[], object], runs: int, warmup: int = 2) -> Figure:
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t) * 1000)
    return Figure(name, samples)


def measure_interleaved(
    fns: dict[str, Callable[[], object]],
    runs: int,
    warmup: int = 2,
    before: Callable[[], object] | None = None,
    seed: int = 0,
) -> dict[str, Figure]:
    """Measure several variants in rounds, so that load from elsewhere on a shared
    machine falls on all of them alike and the ratios stay meaningful.

    Each round runs the variants in a fresh (seeded) random order, and ``before`` (by
    default warm_cgroup_lock) runs untimed before every call so that every variant
    starts from the same kernel state. Without that, a fixed order made each variant
    pay for its predecessor: the first cgroup migration after ~50 ms without one waits
    for an RCU grace period (the rcu_sync of cgroup_threadgroup_rwsem, 7-12 ms here),
    so whatever followed the slow shell recipe started cold and the floor, which
    followed JobCage, started warm.
    """
    before = warm_cgroup_lock if before is None else before
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    rng = random.Random(seed)
    names = list(fns)
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(runs):
        for name in rng.sample(names, len(names)):
            before()
            t = time.perf_counter()
            fns[name]()
            samples[name].append((time.perf_counter() - t) * 1000)
    return {name: Figure(name, s) for name, s in samples.items()}


@functools.cache
def _own_procs_file() -> str:
    """cgroup.procs of the cgroup this process is in, in one mounted hierarchy."""
    from jobcage.cgroups import probe

    h = probe()
    if h.v1_own:
        controller, own = next(iter(h.v1_own.items()))
        return os.path.join(h.v1_mounts[controller], own.lstrip("/"), "cgroup.procs")
    assert h.v2_mount and h.v2_own is not None, "no cgroup hierarchy is mounted"
    return os.path.join(h.v2_mount, h.v2_own.lstrip("/"), "cgroup.procs")


def warm_cgroup_lock() -> None:
    """The state of a busy node, where another job started moments ago: move this
    process into the cgroup it is already in (a migration that changes nothing but
    takes cgroup_threadgroup_rwsem for writing), so the next migration, the cycle's
    own, does not wait for a grace period."""
    with open(_own_procs_file(), "w") as f:
        f.write(str(os.getpid()))


def idle() -> None:
    """The state of a quiet node: nothing has started for IDLE_S."""
    time.sleep(IDLE_S)


def settle() -> None:
    """A fixed short quiet before a call, for comparisons across sizes."""
    time.sleep(SETTLE_S)


def after_idle(figures: dict[str, Figure]) -> dict:
    """Each variant started after IDLE_S of quiet: what the first job after a pause
    costs, the kernel's wait included."""
    out = {"idle_s": IDLE_S}
    out.update({name: f.as_dict() for name, f in figures.items()})
    out["jobcage_vs_floor"] = ratio(figures["jobcage"], figures["floor"])
    out["recipe_vs_jobcage"] = ratio(figures["recipe"], figures["jobcage"])
    # The best any implementation could do against the recipe here: the kernel's wait
    # is in every variant.
    out["recipe_vs_floor"] = ratio(figures["recipe"], figures["floor"])
    return out


def idle_rows(quiet: dict, split: bool = False) -> list[str]:
    """Markdown rows for after_idle(): split puts median and p95 in columns of their own."""
    sep = " | " if split else " / "
    ms = int(quiet["idle_s"] * 1000)
    j, f, r = quiet["jobcage"], quiet["floor"], quiet["recipe"]
    return [
        f"| after {ms} ms idle: JobCage | {j['median_ms']}{sep}{j['p95_ms']} | "
        f"{quiet['jobcage_vs_floor']}x floor |",
        f"| after {ms} ms idle: floor | {f['median_ms']}{sep}{f['p95_ms']} | 1 |",
        f"| after {ms} ms idle: recipe | {r['median_ms']}{sep}{r['p95_ms']} | "
        f"{quiet['recipe_vs_jobcage']}x JobCage, {quiet['recipe_vs_floor']}x floor |",
    ]


def ratio(figure: Figure, reference: Figure) -> float:
    return round(figure.median / reference.median, 2) if reference.median else float("nan")


def machine() -> dict:
    from jobcage.cgroups import probe

    h = probe()
    try:
        ipt = subprocess.run(
            ["iptables", "--version"], capture_output=True, text=True, check=False
        ).stdout.strip()
    except FileNotFoundError:
        ipt = "not installed"
    return {
        "cores": os.cpu_count(),
        "kernel": platform.release(),
        "cgroup_default_version": h.default_version,
        "cgroup_v1_controllers": sorted(h.v1_mounts),
        "cgroup_v2_controllers": sorted(h.v2_controllers),
        "iptables": ipt,
        "python": platform.python_version(),
    }

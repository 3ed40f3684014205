"""Timing helpers shared by the benchmarks: medians, p95s, ratios, machine facts."""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass


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
    fns: dict[str, Callable[[], object]], runs: int, warmup: int = 2
) -> dict[str, Figure]:
    """Measure several variants in round-robin, so that load from elsewhere on a shared
    machine falls on all of them alike and the ratios stay meaningful."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(runs):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            samples[name].append((time.perf_counter() - t) * 1000)
    return {name: Figure(name, s) for name, s in samples.items()}


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

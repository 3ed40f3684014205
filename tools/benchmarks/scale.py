"""Scale: what one cage costs while N other cages exist on the node.

For each N (others are NetworkCages: the same rules as a JobCage's network side):
create+destroy of one more networked cage, a live ``usage()`` of one JobCage, and a
monitoring pass over every cage two ways -- ``read_counters`` (one read of the rules)
against the reference of one ``counters()`` call per cage -- interleaved.
"""

from __future__ import annotations

import time

from jobcage import JobCage
from jobcage.network import NetworkCage, read_counters

from .common import Figure, measure_interleaved, ratio, settle
from .world import Node


class Crowd:
    """The N other cages, grown and shrunk between measurements."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.cages: list[NetworkCage] = []
        self.serial = 0

    def grow_to(self, n: int) -> float:
        """Milliseconds per cage added."""
        start, added = time.perf_counter(), n - len(self.cages)
        while len(self.cages) < n:
            self.serial += 1
            self.cages.append(
                NetworkCage.create(self.node.job_id(f"c{self.serial}"), self.node.config)
            )
        return (time.perf_counter() - start) * 1000 / max(added, 1)

    def clear(self) -> float:
        start, n = time.perf_counter(), len(self.cages)
        while self.cages:
            self.cages.pop().destroy()
        return (time.perf_counter() - start) * 1000 / max(n, 1)


def measure_at(node: Node, crowd: Crowd, probe: JobCage, runs: int) -> dict:
    counter = iter(range(10**9))

    def create_destroy() -> None:
        NetworkCage.create(node.job_id(f"s{next(counter)}"), node.config).destroy()

    everyone = [*crowd.cages]
    figures = measure_interleaved(
        {
            "create_destroy": create_destroy,
            "usage_one": probe.usage,
            "read_all_one_pass": lambda: read_counters(everyone),
        },
        runs,
        warmup=1,
        # The same quiet before every call at every N: otherwise the cage at N = 500
        # follows a 15 ms read of every counter and the one at N = 0 follows nothing,
        # and a cycle after a pause costs ~1 ms more (caches, idle CPUs) whatever N is.
        before=settle,
    )
    out = {name: f.as_dict() for name, f in figures.items()}
    if everyone:
        # The reference: a monitoring pass that asks each cage (N table copies).
        per_cage = Figure("read_all_per_cage", [])
        for _ in range(max(3, runs // 5)):
            t = time.perf_counter()
            for cage in everyone:
                cage.counters()
            per_cage.samples_ms.append((time.perf_counter() - t) * 1000)
        out["read_all_per_cage"] = per_cage.as_dict()
        out["per_cage_vs_one_pass"] = ratio(per_cage, figures["read_all_one_pass"])
    return out


def run(node: Node, sizes: list[int], runs: int, at_size=None) -> dict:
    """``at_size(n, crowd)`` is called with the crowd in place at each size (the
    datapath uses it to measure with N others without building them twice)."""
    crowd = Crowd(node)
    out: dict = {"sizes": sizes}
    probe = JobCage(node.job_id("probe"), network=True, config=node.config)
    try:
        probe.create()
        for n in sizes:
            fill = crowd.grow_to(n)
            entry = measure_at(node, crowd, probe, runs)
            entry["fill_ms_per_cage"] = round(fill, 3)
            if at_size is not None:
                at_size(n, crowd)
            out[str(n)] = entry
        out["drain_ms_per_cage"] = round(crowd.clear(), 3)
    finally:
        crowd.clear()
        probe.destroy()
    first, last = out[str(sizes[0])], out[str(sizes[-1])]
    for n in sizes[1:]:
        e = out[str(n)]
        e["create_destroy_vs_n0"] = round(
            e["create_destroy"]["median_ms"] / first["create_destroy"]["median_ms"], 2
        )
        e["usage_one_vs_n0"] = round(
            e["usage_one"]["median_ms"] / first["usage_one"]["median_ms"], 2
        )
    out["largest"] = sizes[-1]
    out["usage_one_growth"] = last.get("usage_one_vs_n0")
    return out

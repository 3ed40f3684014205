"""The cost of one record write and one validated read (jobcage/records/).

destroy() of a networked cage saves its record once more (state tearing-down) before
it removes the network side, and every command validates each record it reads:
these say what that costs. Run: ``.venv/bin/python -m tools.benchmarks.records``.
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time

from jobcage.ids import netns_name, veth_names
from jobcage.records import CgroupPart, NetworkPart, StateStore, parse_record

JOB = "1234.0"


def _record(store: StateStore):
    network = NetworkPart(
        netns_name(JOB),
        veth_names(JOB)[0],
        address="100.64.0.6/30",
        host_address="100.64.0.5/30",
        lease_index=1,
        pool="100.64.0.0/16",
        campus_networks=("192.0.2.0/24", "198.51.100.0/24"),
        allow_node_access=True,
        firewall="iptables-legacy",
    )
    paths = {c: f"/sys/fs/cgroup/{c}/jobcage/{JOB}" for c in ("freezer", "memory", "cpuacct")}
    return store.new_record(JOB, cgroup=CgroupPart(1, paths), network=network)


def _ms(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {
        "median_ms": round(statistics.median(ordered) * 1e3, 4),
        "p95_ms": round(ordered[int(0.95 * len(ordered))] * 1e3, 4),
    }


def run(runs: int = 2000, where: str = "/run") -> dict[str, dict[str, float]]:
    directory = tempfile.mkdtemp(prefix="jobcage-bench-", dir=where)
    store = StateStore(directory)
    record = _record(store)
    store.claim(record)
    try:
        saves, reads = [], []
        for _ in range(runs):
            start = time.perf_counter()
            store.save(record)
            saves.append(time.perf_counter() - start)
        with open(store.path(JOB), "rb") as f:
            raw = f.read()
        for _ in range(runs):
            start = time.perf_counter()
            parse_record(json.loads(raw.decode("utf-8")), JOB)
            reads.append(time.perf_counter() - start)
        return {"save": _ms(saves), "parse_and_validate": _ms(reads)}
    finally:
        store.remove(JOB)
        os.rmdir(store.cages_dir)
        os.rmdir(directory)


if __name__ == "__main__":
    print(json.dumps(run()))

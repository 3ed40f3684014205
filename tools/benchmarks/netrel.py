"""What issue 17's network fixes cost, in the simulated node (not part of tools/bench's
sections: run ``.venv/bin/python -m tools.benchmarks.netrel``).

* an x_tables counter read with and without the xtables lock (shared), interleaved;
* the route lookup that keeps a held /30 from being leased (``netns.address_held``);
* `usage()` after `nft flush ruleset`: the read that notices it and puts the rules back.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import time

from jobcage.network import NetworkCage, netns
from jobcage.network.firewall import xtables

from .common import Figure, measure_interleaved
from .world import node

RUNS = 500
FLUSHES = 20


def main() -> None:
    out: dict = {}
    with node("iptables-legacy") as n:
        cage = NetworkCage.create(n.job_id("r"), n.config)
        try:
            locked = xtables.xtables_lock
            unlocked = lambda *a, **k: contextlib.nullcontext()  # noqa: E731

            def read(lock) -> None:
                xtables.xtables_lock = lock
                try:
                    cage.counters()
                finally:
                    xtables.xtables_lock = locked

            figures = measure_interleaved(
                {"read, locked": lambda: read(locked), "read, no lock": lambda: read(unlocked)},
                RUNS,
                before=lambda: None,
            )
            out["x_tables counters() of 1 cage"] = {k: f.as_dict() for k, f in figures.items()}
            free = ipaddress.IPv4Interface("100.64.200.2/30")
            figures = measure_interleaved(
                {
                    "held /30": lambda: netns.address_held(cage.address),
                    "free /30": lambda: netns.address_held(free),
                },
                RUNS,
                before=lambda: None,
            )
            out["address_held"] = {k: f.as_dict() for k, f in figures.items()}
        finally:
            cage.destroy()
    with node("nftables") as n:
        cage = NetworkCage.create(n.job_id("f"), n.config)
        try:
            after_flush, plain = [], []
            for _ in range(FLUSHES):
                t = time.perf_counter()
                cage.counters()
                plain.append((time.perf_counter() - t) * 1000)
                # In the node's netns by path, never by the calling thread's.
                n.world.exec_in(n.world.node, ["nft", "flush", "ruleset"])
                t = time.perf_counter()
                cage.counters()
                after_flush.append((time.perf_counter() - t) * 1000)
            figures = {
                "usage()": Figure("usage()", plain),
                "usage() after a flush (restore)": Figure("restore", after_flush),
            }
            out["nftables"] = {k: f.as_dict() for k, f in figures.items()}
        finally:
            cage.destroy()
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()

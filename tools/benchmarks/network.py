"""Network cage figures for docs/network.md, each against a reference from the same run.

Runs inside the simulated world of the tests (tests/networld.py): a node namespace
behind a router, a campus and an internet host; the machine's own network is never
touched. Measures

* networked create+destroy (NetworkCage only) with 0 and with N other cages present;
  reference: a bare netns create+destroy (unshare + bind mount) in the same run;
* counters() of one cage with 0 and N others present;
* iperf3 TCP throughput from inside a cage vs from the node itself, and for the cage
  whose jumps are last in the shared chains (a packet walks N other jumps first);
* counted bytes vs payload for a large download.

    .venv/bin/python -m tools.benchmarks.network [--quick] [--others N]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid

from jobcage.config import Config
from jobcage.network import NetworkCage, hooks

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
from tests import networld as world_mod
from tests.networld import CAMPUS_HOST, IPERF_PORT, SERVER_PORT, NetWorld

from .common import Figure

_libc = ctypes.CDLL(None, use_errno=True)


def _bare_netns_cycle(i: int) -> None:
    """The floor: a named netns made and removed the cheapest way, nothing inside."""
    path = f"/run/netns/jcbench-{os.getpid()}-{i}"
    err: list[int] = []

    def inside() -> None:
        if _libc.unshare(0x40000000) != 0:
            err.append(ctypes.get_errno())
            return
        os.close(os.open(path, os.O_RDONLY | os.O_CREAT | os.O_EXCL, 0))
        if _libc.mount(b"/proc/thread-self/ns/net", path.encode(), b"none", 4096, None) != 0:
            err.append(ctypes.get_errno())

    t = threading.Thread(target=inside)
    t.start()
    t.join()
    _libc.umount2(path.encode(), 2)
    os.unlink(path)
    if err:
        raise OSError(err[0], "bare netns cycle")


def _cycle_series(config: Config, runs: int, tag: str) -> tuple[Figure, Figure]:
    create, destroy, floor = [], [], []
    for i in range(runs):
        t = time.perf_counter()
        _bare_netns_cycle(i)
        floor.append((time.perf_counter() - t) * 1000)
        t = time.perf_counter()
        cage = NetworkCage.create(f"bench{tag}{i}", config)
        t2 = time.perf_counter()
        cage.destroy()
        t3 = time.perf_counter()
        create.append((t2 - t) * 1000)
        destroy.append((t3 - t2) * 1000)
    total = Figure("create+destroy", [a + b for a, b in zip(create, destroy, strict=True)])
    return total, Figure("floor", floor)


def _counters_series(cage: NetworkCage, runs: int) -> Figure:
    samples = []
    for _ in range(runs):
        t = time.perf_counter()
        cage.counters()
        samples.append((time.perf_counter() - t) * 1000)
    return Figure("counters", samples)


def _iperf(world: NetWorld, netns_path: str, seconds: int) -> float:
    out = subprocess.run(
        ["nsenter", f"--net={netns_path}", "--", "iperf3", "-c", CAMPUS_HOST,
         "-p", str(IPERF_PORT), "-t", str(seconds), "-J"],
        capture_output=True, text=True, check=True, timeout=seconds + 30,
    )  # fmt: skip
    return json.loads(out.stdout)["end"]["sum_received"]["bits_per_second"] / 1e9


def _overhead(cage: NetworkCage, payload: int) -> dict:
    before = cage.counters()
    subprocess.run(
        ["nsenter", f"--net={cage.netns_path}", "--", sys.executable, world_mod.CLIENT,
         "get", CAMPUS_HOST, str(SERVER_PORT), str(payload)],
        check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    after = cage.counters()
    rx = after.net_lan_rx_bytes - before.net_lan_rx_bytes
    tx = after.net_lan_tx_bytes - before.net_lan_tx_bytes
    packets = after.net_lan_rx_packets - before.net_lan_rx_packets
    return {
        "payload_bytes": payload,
        "counted_rx_bytes": rx,
        "counted_tx_bytes": tx,
        "rx_packets": packets,
        "rx_overhead_pct": round(100 * (rx - payload) / payload, 3),
        "tx_vs_payload_pct": round(100 * tx / payload, 3),
    }


def run(quick: bool = False, others: int | None = None) -> dict:
    others = (20 if quick else 200) if others is None else others
    runs = 5 if quick else 30
    seconds = 1 if quick else 5
    hooks.before_change = world_mod.guard
    world = NetWorld().build()
    state = tempfile.mkdtemp(prefix="jobcage-bench-")
    config = Config(state_dir=state, campus_networks=(world_mod.CAMPUS_NETWORK,))
    result: dict = {"others": others}
    crowd: list[NetworkCage] = []
    try:
        with world.node_thread():
            node_path = world.netns_path(world.node)
            empty, floor0 = _cycle_series(config, runs, "a")
            probe = NetworkCage.create(f"bench-probe-{uuid.uuid4().hex[:6]}", config)
            counters0 = _counters_series(probe, runs * 10)
            node_gbps = _iperf(world, node_path, seconds)
            cage_gbps = _iperf(world, probe.netns_path, seconds)
            result["overhead"] = _overhead(probe, (16 if quick else 256) << 20)
            t = time.perf_counter()
            for i in range(others):
                crowd.append(NetworkCage.create(f"benchcrowd{i}", config))
            fill_ms = (time.perf_counter() - t) * 1000
            crowded, floor_n = _cycle_series(config, runs, "b")
            counters_n = _counters_series(probe, runs * 10)
            # probe was made first: its jumps are last in the shared chains, so its
            # packets walk every other cage's jump first (the worst case).
            worst_gbps = _iperf(world, probe.netns_path, seconds)
            node_gbps_n = _iperf(world, node_path, seconds)
            t = time.perf_counter()
            for cage in crowd:
                cage.destroy()
            drain_ms = (time.perf_counter() - t) * 1000
            crowd.clear()
            probe.destroy()
    finally:
        with world.node_thread():
            for cage in crowd:
                cage.destroy()
        world.destroy()
    result.update(
        {
            "create_destroy_0": empty.as_dict(),
            "create_destroy_others": crowded.as_dict(),
            "bare_netns_floor": Figure("floor", floor0.samples_ms + floor_n.samples_ms).as_dict(),
            "create_destroy_others_vs_0": round(crowded.median / empty.median, 2),
            "create_destroy_0_vs_floor": round(
                empty.median / statistics.median(floor0.samples_ms), 2
            ),
            "fill_others_ms_per_cage": round(fill_ms / max(others, 1), 3),
            "drain_others_ms_per_cage": round(drain_ms / max(others, 1), 3),
            "counters_0": counters0.as_dict(),
            "counters_others": counters_n.as_dict(),
            "iperf_gbps": {
                "node_itself": round(node_gbps, 2),
                "cage": round(cage_gbps, 2),
                "cage_vs_node": round(cage_gbps / node_gbps, 3),
                "node_itself_with_others": round(node_gbps_n, 2),
                "cage_last_of_others": round(worst_gbps, 2),
                "cage_last_vs_node": round(worst_gbps / node_gbps_n, 3),
            },
        }
    )
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tools.benchmarks.network", description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--others", type=int, default=None)
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("run as root", file=sys.stderr)
        return 1
    print(json.dumps(run(quick=args.quick, others=args.others), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

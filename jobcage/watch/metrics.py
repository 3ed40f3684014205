"""Live metrics in the Prometheus text format, read from the kernel at each scrape.

Names follow the Prometheus conventions: a ``jobcage_`` prefix, base units in the name
(``_seconds``, ``_bytes``), ``_total`` on counters, the varying part in labels
(``job_id``; ``class`` lan|wan and ``direction`` rx|tx for traffic). Events per second
is ``rate(jobcage_watch_events_total[1m])``: a counter, as Prometheus wants rates.
A figure the kernel cannot give is left out, never exported as 0.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

from ..admin import list_cages, open_cage_cgroup
from ..config import Config
from ..errors import JobCageError
from ..records import CageRecord, StateStore

if TYPE_CHECKING:
    from .watcher import Watcher

_MEMORY_NOW = (("memory", "memory.usage_in_bytes"), ("unified", "memory.current"))


def memory_now_bytes(cgroup_paths: dict[str, str]) -> int | None:
    for key, name in _MEMORY_NOW:
        path = cgroup_paths.get(key)
        if path is None:
            continue
        try:
            with open(os.path.join(path, name)) as f:
                return int(f.read())
        except (OSError, ValueError):
            return None
    return None


class NodeCollector(Collector):
    """Every cage of the node's state dir, and the watcher's own counters."""

    def __init__(self, config: Config, watcher: Watcher | None) -> None:
        self.config = config
        self.watcher = watcher

    def collect(self) -> Iterator[Metric]:
        yield from self._cages()
        if self.watcher is not None:
            yield from self._watcher(self.watcher)

    def _cages(self) -> Iterator[Metric]:
        labels = ["job_id"]
        cpu = CounterMetricFamily(
            "jobcage_cage_cpu_seconds", "CPU time of the cage", labels=[*labels, "mode"]
        )
        memory = GaugeMetricFamily("jobcage_cage_memory_bytes", "memory in use now", labels=labels)
        peak = GaugeMetricFamily(
            "jobcage_cage_memory_peak_bytes", "most memory used at once", labels=labels
        )
        procs = GaugeMetricFamily("jobcage_cage_processes", "processes in the cage", labels=labels)
        net_labels = [*labels, "class", "direction"]
        net_bytes = CounterMetricFamily(
            "jobcage_cage_network_bytes", "traffic by class, rx into the job", labels=net_labels
        )
        net_packets = CounterMetricFamily(
            "jobcage_cage_network_packets", "packets by class, rx into the job", labels=net_labels
        )
        store = StateStore(self.config.state_dir)
        for info in list_cages(self.config):
            job = info.job_id
            if info.processes is not None:
                procs.add_metric([job], info.processes)
            stats = _stats(store.load_or_none(job, strict=False), self.config)
            if stats is not None:
                for mode in ("user", "system"):
                    value = getattr(stats, f"cpu_{mode}_seconds")
                    if value is not None:
                        cpu.add_metric([job, mode], value)
                if stats.memory_peak_bytes is not None:
                    peak.add_metric([job], stats.memory_peak_bytes)
            now = memory_now_bytes(info.cgroup_paths)
            if now is not None:
                memory.add_metric([job], now)
            for cls in ("lan", "wan"):
                for direction in ("rx", "tx"):
                    counters = info.network or {}
                    b = counters.get(f"net_{cls}_{direction}_bytes")
                    p = counters.get(f"net_{cls}_{direction}_packets")
                    if b is not None:
                        net_bytes.add_metric([job, cls, direction], b)
                    if p is not None:
                        net_packets.add_metric([job, cls, direction], p)
        yield from (cpu, memory, peak, procs, net_bytes, net_packets)

    @staticmethod
    def _watcher(w: Watcher) -> Iterator[Metric]:
        src = w.source

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            return CounterMetricFamily(f"jobcage_watch_{name}", doc, value=value)

        yield counter("events", "process events the watcher applied", src.events)
        yield counter("events_lost", "events the kernel dropped (per-CPU gaps)", src.events_lost)
        yield counter("overflows", "times the event socket overflowed (ENOBUFS)", src.overflows)
        yield counter("resyncs", "rebuilds of every tree after a loss", w.resyncs)
        found = CounterMetricFamily(
            "jobcage_watch_detections", "detections by kind", labels=["kind"]
        )
        from .detect import KINDS

        for kind in KINDS:
            found.add_metric([kind], w.detections.get(kind, 0))
        yield found
        yield GaugeMetricFamily(
            "jobcage_watch_trees", "cages and police trees watched", value=len(w.table.trees)
        )


def _stats(record: CageRecord | None, config: Config) -> Any | None:
    if record is None:
        return None
    try:
        cgroup = open_cage_cgroup(record, config)
        return cgroup.stats() if cgroup is not None else None
    except (OSError, JobCageError):
        return None


def serve(address: tuple[str, int], registry: CollectorRegistry) -> Any:
    """An HTTP server for /metrics on ``address``; returns it (``server_port``, ``shutdown``)."""
    from prometheus_client import start_http_server

    server, _thread = start_http_server(address[1], addr=address[0], registry=registry)
    return server


def registry_for(config: Config, watcher: Watcher | None) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(NodeCollector(config, watcher))
    return registry

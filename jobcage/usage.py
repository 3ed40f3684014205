"""The usage record: what a job used, as the kernel counted it.

Every field is a number with its unit in its name. ``None`` means the kernel of this
node cannot give that figure (a controller not mounted, no network cage): a bill must
never show a made-up 0.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

# The format of a usage document (`jobcage run --usage-file`, a reaped cage's bill).
USAGE_FORMAT = 1


@dataclass(frozen=True)
class Usage:
    wall_seconds: float | None = None
    cpu_user_seconds: float | None = None
    cpu_system_seconds: float | None = None
    memory_peak_bytes: int | None = None
    memory_limit_bytes: int | None = None
    oom_kills: int | None = None
    io_read_bytes: int | None = None
    io_write_bytes: int | None = None
    processes_killed: int | None = None
    net_lan_rx_bytes: int | None = None
    net_lan_tx_bytes: int | None = None
    net_wan_rx_bytes: int | None = None
    net_wan_tx_bytes: int | None = None
    net_lan_rx_packets: int | None = None
    net_lan_tx_packets: int | None = None
    net_wan_rx_packets: int | None = None
    net_wan_tx_packets: int | None = None
    # Processes still in the cage when teardown gave up (uninterruptible sleep that
    # outlived every bounded wait). 0 on a clean teardown; the cage record is kept so
    # `jobcage reap` retries.
    processes_surviving: int | None = None
    # The CPU limit (CPUs), and how the kernel enforced it: CFS periods in which the
    # job ran, those in which it was throttled, and the time it spent throttled.
    cpu_limit_cpus: float | None = None
    cpu_periods: int | None = None
    cpu_throttled_periods: int | None = None
    cpu_throttled_seconds: float | None = None
    # How often the network cage's rules were found gone (`nft flush ruleset`, a
    # firewall reload) and put back: the net_* counts miss what passed meanwhile (and
    # are None if the rules were gone at teardown). 0: whole; None: no network cage.
    net_counts_gaps: int | None = None
    # When the net_* counts start (Unix time) after such a gap; None when whole.
    net_counted_since_unix: float | None = None
    # The IPv6 share of the four classes above (they are the sums of both families);
    # None when the cage had no IPv6 (ipv6 off, or IPv6 disabled on the node).
    net_ipv6_lan_rx_bytes: int | None = None
    net_ipv6_lan_tx_bytes: int | None = None
    net_ipv6_wan_rx_bytes: int | None = None
    net_ipv6_wan_tx_bytes: int | None = None
    net_ipv6_lan_rx_packets: int | None = None
    net_ipv6_lan_tx_packets: int | None = None
    net_ipv6_wan_rx_packets: int | None = None
    net_ipv6_wan_tx_packets: int | None = None
    # From the proc-connector watcher (docs/watch.md); all None when no watcher ran.
    # events_lost counts what the kernel dropped while the cage was watched (the
    # three counts are then lower bounds); detections are the watcher's JSON records.
    processes_started: int | None = None
    execs: int | None = None
    max_processes: int | None = None
    events_lost: int | None = None
    detections: tuple[dict[str, Any], ...] | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=False, separators=(",", ":"))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Usage:
        names = {f.name for f in dataclasses.fields(cls)}
        fields = {k: v for k, v in data.items() if k in names}
        if isinstance(fields.get("detections"), list):
            fields["detections"] = tuple(fields["detections"])
        return cls(**fields)

    def to_table(self) -> str:
        """A human summary, one line per figure, units scaled for reading."""
        rows = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            rows.append((f.name, _human(f.name, value)))
        width = max(len(name) for name, _ in rows)
        return "\n".join(f"{name:<{width}}  {text}" for name, text in rows)


def _human(name: str, value: Any) -> str:
    if value is None:
        return "n/a"
    if name == "detections":
        return ", ".join(f"{d.get('kind')} pid {d.get('pid')}" for d in value) or "none"
    if name.endswith("_bytes"):
        return human_bytes(value)
    if name.endswith("_seconds"):
        return f"{value:.3f} s"
    return str(value)


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")

"""What a reap did (or, dry, would do), cage by cage: what the CLI prints."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..usage import Usage


@dataclass
class ReapedCage:
    job_id: str
    reason: str  # why it was reaped: "owner-dead", "teardown-failed", "no-record"
    owner_pid: int | None = None
    killed: int = 0
    surviving: int = 0
    usage_file: str | None = None
    usage: Usage | None = None
    removed: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "job_id": self.job_id,
            "reason": self.reason,
            "owner_pid": self.owner_pid,
            "killed": self.killed,
            "surviving": self.surviving,
            "usage_file": self.usage_file,
            "usage": self.usage.to_dict() if self.usage else None,
            "removed": self.removed,
            "errors": self.errors,
        }


@dataclass(frozen=True)
class SetAside:
    """A record that could not be believed, and where it was moved (None: dry run)."""

    path: str
    reason: str
    moved_to: str | None

    def __str__(self) -> str:
        where = f"; moved to {self.moved_to}" if self.moved_to else ""
        return f"bad cage record {self.path}: {self.reason}{where}"


@dataclass
class ReapReport:
    dry_run: bool
    cages: list[ReapedCage] = field(default_factory=list)
    # Cages left alone because their owner is alive (counted, to say so).
    live: int = 0
    set_aside: list[SetAside] = field(default_factory=list)
    # Leftovers of writers killed half-way: temporary record files, empty parents.
    removed_files: list[str] = field(default_factory=list)
    other_errors: list[str] = field(default_factory=list)
    # Live cages whose rules were gone (`nft flush ruleset`, a firewall reload) and
    # were put back; their usage says the counts have a gap.
    restored: list[str] = field(default_factory=list)

    @property
    def errors(self) -> list[str]:
        return [f"{c.job_id}: {e}" for c in self.cages for e in c.errors] + self.other_errors

    def to_dict(self) -> dict[str, Any]:
        return {
            "dry_run": self.dry_run,
            "live": self.live,
            "restored": self.restored,
            "cages": [c.to_dict() for c in self.cages],
            "set_aside": [
                {"path": s.path, "reason": s.reason, "moved_to": s.moved_to}
                for s in self.set_aside
            ],
            "removed_files": self.removed_files,
        }

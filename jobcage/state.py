"""The on-disk record of each cage: what crash recovery and the CLI work from.

A cage claims ``<state_dir>/cages/<job id>.json`` exclusively *before* it creates
anything, so that a second cage of the same id fails cleanly and an owner killed
half-way through ``create()`` still leaves a record naming what it may have built.
The record is rewritten (write to a temporary file, then swap it in) as the cage
grows, and removed last at teardown. The owner is identified by pid *and* start time,
so a recycled pid is never mistaken for a live owner.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import functools
import json
import os
import time
from collections.abc import Iterator
from typing import Any

from .errors import CageExistsError, CageNotFoundError, JobCageError

RECORD_FORMAT = 1


AT_FDCWD = -100
RENAME_EXCHANGE = 2


@functools.cache
def _renameat2() -> Any:
    try:
        return ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return None  # a libc without it (glibc < 2.28)


def _exchange(new: str, path: str) -> bool:
    """Swap ``new`` and ``path`` atomically (renameat2 RENAME_EXCHANGE); False where
    the file system or libc cannot, or ``path`` does not exist.

    Not os.replace: on ext4 (a /run that is not tmpfs, as on this project's test
    machine), renaming over an existing file starts writeback of the new one
    (auto_da_alloc), and unlinking it at teardown then waits for the disk (figures in
    docs/performance.md, "record writes on ext4").
    """
    rename = _renameat2()
    if rename is None:
        return False
    # Any failure (no such file yet, a file system without exchange: EINVAL, EXDEV on
    # some overlays) falls back to os.replace, which raises what is really wrong.
    return rename(AT_FDCWD, new.encode(), AT_FDCWD, path.encode(), RENAME_EXCHANGE) == 0


def _stat_fields(pid: int) -> list[bytes] | None:
    """/proc/PID/stat from field 3 (state) on, or None if there is no such process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    # The command name (field 2) may contain spaces and parentheses: split after it.
    return stat[stat.rindex(b")") + 2 :].split()


def process_start_ticks(pid: int) -> int | None:
    """Start time of ``pid`` in clock ticks since boot (/proc/PID/stat field 22)."""
    fields = _stat_fields(pid)
    return int(fields[19]) if fields is not None else None


def owner_alive(record: dict[str, Any]) -> bool:
    """The owner runs: same pid and start time, and not a zombie (an owner SIGKILLed
    while nobody reaps it yet keeps its pid but will never finish its teardown)."""
    pid = record.get("owner_pid")
    if not isinstance(pid, int):
        return False
    fields = _stat_fields(pid)
    if fields is None or fields[0] in (b"Z", b"X"):
        return False
    return int(fields[19]) == record.get("owner_start_ticks")


class StateStore:
    """The cage records of one node, under one state directory."""

    def __init__(self, state_dir: str) -> None:
        self.state_dir = state_dir
        self.cages_dir = os.path.join(state_dir, "cages")

    def _path(self, job_id: str) -> str:
        return os.path.join(self.cages_dir, f"{job_id}.json")

    def _ensure_dirs(self) -> None:
        try:
            os.makedirs(self.cages_dir, mode=0o755, exist_ok=True)
        except OSError as e:
            raise JobCageError(
                f"cannot create the state directory {self.cages_dir}: {e.strerror}; "
                "set state_dir in the config to a writable local directory"
            ) from e

    @contextlib.contextmanager
    def lock(self, name: str = "lock") -> Iterator[None]:
        """An exclusive node-wide lock (flock) for state shared between cages."""
        self._ensure_dirs()
        fd = os.open(os.path.join(self.state_dir, name), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def new_record(self, job_id: str, **fields: Any) -> dict[str, Any]:
        pid = os.getpid()
        return {
            "format": RECORD_FORMAT,
            "job_id": job_id,
            "owner_pid": pid,
            "owner_start_ticks": process_start_ticks(pid),
            "created_unix": time.time(),
            "state": "building",
            **fields,
        }

    def claim(self, record: dict[str, Any]) -> None:
        """Create the record only if none exists, never visible half-written.

        The record is written to a private temporary file and hard-linked into place:
        link(2) fails with EEXIST atomically, like O_EXCL, but the name only appears
        once the content is complete.
        """
        self._ensure_dirs()
        path = self._path(record["job_id"])
        tmp = f"{path}.{os.getpid()}.{id(record)}.claim"
        with open(tmp, "w") as f:
            json.dump(record, f)
        try:
            os.link(tmp, path)
        except FileExistsError:
            existing = self.load_or_none(record["job_id"])
            owner = existing.get("owner_pid") if existing else "?"
            raise CageExistsError(
                f"a cage for job {record['job_id']} already exists on this node (owner pid "
                f"{owner}, record {path}); if its owner is dead, run `jobcage reap`"
            ) from None
        finally:
            os.unlink(tmp)

    def save(self, record: dict[str, Any]) -> None:
        path = self._path(record["job_id"])
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(record, f)
        if _exchange(tmp, path):
            os.unlink(tmp)  # now the previous record
        else:
            os.replace(tmp, path)

    def load(self, job_id: str) -> dict[str, Any]:
        record = self.load_or_none(job_id)
        if record is None:
            raise CageNotFoundError(
                f"no cage for job {job_id} on this node (no record in {self.cages_dir}); "
                "`jobcage list` shows the cages there are"
            )
        return record

    def load_or_none(self, job_id: str) -> dict[str, Any] | None:
        try:
            with open(self._path(job_id)) as f:
                return json.load(f)
        except FileNotFoundError:
            return None
        except json.JSONDecodeError:
            # Records are only ever renamed or linked into place complete, so this is a
            # damaged file (or one from a writer without that rule): treat it as a claim
            # whose owner is unknown; `jobcage reap` removes it once it is stale.
            return {"job_id": job_id, "state": "building", "owner_pid": None}

    def remove(self, job_id: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._path(job_id))

    def records(self) -> list[dict[str, Any]]:
        try:
            names = sorted(os.listdir(self.cages_dir))
        except FileNotFoundError:
            return []
        out = []
        for name in names:
            if name.endswith(".json"):
                record = self.load_or_none(name[: -len(".json")])
                if record is not None:
                    out.append(record)
        return out

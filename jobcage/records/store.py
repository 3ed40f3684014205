"""The state dir's cage records: the only code that reads or writes one.

A cage claims ``<state_dir>/cages/<job id>.json`` exclusively *before* it creates
anything, so that a second cage of the same id fails cleanly and an owner killed
half-way through ``create()`` still leaves a record naming what it may have built.
The record is rewritten (write a temporary file, then swap it in) as the cage grows,
and removed last at teardown. The owner is a pid *and* its start time, so a recycled
pid is never mistaken for a live owner.

Every temporary file carries its writer's pid (``<id>.json.<pid>.tmp``,
``<id>.json.<pid>.<n>.claim``), so one left by a writer killed between open and
rename is recognisable as stale once that pid is gone (reap removes it).

The state dir decides what reap kills and removes, so one that another user could
write is refused (:meth:`StateStore.unsafe_reason`), and a record that fails
validation (:func:`.model.parse_record`) is reported and moved to ``cages/bad/``
instead of stopping every command on the node.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import functools
import itertools
import json
import os
import stat
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from ..errors import (
    CageExistsError,
    CageNotFoundError,
    NewerRecordError,
    RecordError,
    StateDirError,
)
from ..ids import is_job_id, validate_job_id
from .model import CageRecord, Owner, RecordState, parse_record, salvage_owner
from .owner import this_process

BAD_DIR = "bad"
AT_FDCWD = -100
RENAME_EXCHANGE = 2
_claims = itertools.count()


@dataclass(frozen=True)
class BadRecord:
    """A record file that could not be believed, and why."""

    path: str
    job_id: str | None  # from the file name, if that is a valid job id
    reason: str
    # Written by a newer JobCage: left in place, its job id still taken.
    newer: bool = False
    # The owner named by a record that is valid JSON but fails validation, if its
    # owner fields themselves are sound: while that owner runs, the record stays.
    owner: Owner | None = None

    def __str__(self) -> str:
        return f"bad cage record {self.path}: {self.reason}"


@functools.cache
def _renameat2() -> Any:
    try:
        return ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return None  # a libc without it (glibc < 2.28)


def _exchange(new: str, path: str) -> bool:
    """Swap ``new`` and ``path`` atomically (renameat2 RENAME_EXCHANGE); False where
    the file system or libc cannot, or ``path`` does not exist.

    Not os.replace: on ext4 (a /run that is not tmpfs), renaming over an existing
    file starts writeback of the new one (auto_da_alloc), and unlinking it at
    teardown then waits for the disk (figures in docs/performance.md).
    """
    rename = _renameat2()
    if rename is None:
        return False
    # Any failure (no such file yet, EINVAL, EXDEV on some overlays) falls back to
    # os.replace, which raises what is really wrong.
    return rename(AT_FDCWD, new.encode(), AT_FDCWD, path.encode(), RENAME_EXCHANGE) == 0


def unsafe_reason(path: str) -> str | None:
    """Why ``path`` (an existing directory) must not be trusted, or None."""
    st = os.stat(path)
    if not stat.S_ISDIR(st.st_mode):
        return f"{path} is not a directory"
    if st.st_uid not in (0, os.geteuid()):
        return f"{path} is owned by uid {st.st_uid}, not root"
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"{path} is writable by {'others' if st.st_mode & stat.S_IWOTH else 'its group'}"
    return None


class StateStore:
    """The cage records of one node, under one state directory."""

    def __init__(self, state_dir: str) -> None:
        self.state_dir = state_dir
        self.cages_dir = os.path.join(state_dir, "cages")
        self.bad_dir = os.path.join(self.cages_dir, BAD_DIR)
        self._checked = False

    def path(self, job_id: str) -> str:
        return os.path.join(self.cages_dir, f"{job_id}.json")

    # -- the directory -------------------------------------------------------------------

    def unsafe_reason(self) -> str | None:
        """Why this state dir is refused (others could write it), or None."""
        for path in (self.state_dir, self.cages_dir):
            with contextlib.suppress(FileNotFoundError):
                reason = unsafe_reason(path)
                if reason:
                    return reason
        return None

    def _check(self) -> None:
        if self._checked:
            return
        reason = self.unsafe_reason()
        if reason:
            raise StateDirError(
                f"refusing the state dir: {reason}, so another user could make `jobcage "
                f"reap` kill and remove what it names; chown root and chmod 755 "
                f"{self.state_dir} and {self.cages_dir}"
            )
        self._checked = True

    def ensure_dir(self, path: str) -> None:
        """Make a directory of the state dir (0755 whatever the umask), after the check."""
        self._check()
        try:
            os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
            with contextlib.suppress(FileExistsError):
                os.mkdir(path, 0o755)
                os.chmod(path, 0o755)
        except OSError as e:
            raise self._error(e, f"cannot create {path}") from e

    def _error(self, e: OSError, what: str) -> StateDirError:
        advice = {
            errno.ENOSPC: "free space on its file system",
            errno.EDQUOT: "raise the quota or free space",
            errno.EROFS: "remount it read-write or set state_dir to a writable local directory",
        }.get(e.errno or 0, "set state_dir in the config to a writable local directory")
        return StateDirError(f"{what} in the state dir {self.state_dir}: {e.strerror}; {advice}")

    @contextlib.contextmanager
    def lock(self, name: str = "lock") -> Iterator[None]:
        """An exclusive node-wide lock (flock) for state shared between cages."""
        self.ensure_dir(self.cages_dir)
        try:
            fd = os.open(os.path.join(self.state_dir, name), os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise self._error(e, f"cannot open the lock {name}") from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    # -- writing -------------------------------------------------------------------------

    def new_record(self, job_id: str, **fields: Any) -> CageRecord:
        return CageRecord(
            job_id=validate_job_id(job_id),
            state=fields.pop("state", RecordState.BUILDING),
            owner=this_process(),
            created_unix=time.time(),
            **fields,
        )

    def _write_temp(self, tmp: str, record: CageRecord) -> None:
        text = json.dumps(record.to_dict(self.state_dir), separators=(",", ":"))
        try:
            with open(tmp, "x") as f:
                f.write(text)
        except OSError as e:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise self._error(e, f"cannot write the record of job {record.job_id}") from e

    def claim(self, record: CageRecord) -> None:
        """Create the record only if none exists, never visible half-written.

        The record is written to a private temporary file and hard-linked into place:
        link(2) fails with EEXIST atomically, like O_EXCL, but the name only appears
        once the content is complete.
        """
        self.ensure_dir(self.cages_dir)
        path = self.path(record.job_id)
        tmp = f"{path}.{os.getpid()}.{next(_claims)}.claim"
        self._write_temp(tmp, record)
        try:
            os.link(tmp, path)
        except FileExistsError:
            existing = self.load_or_none(record.job_id, strict=False)
            owner = existing.owner.pid if existing else "?"
            raise CageExistsError(
                f"a cage for job {record.job_id} already exists on this node (owner pid "
                f"{owner}, record {path}); if its owner is dead, run `jobcage reap`"
            ) from None
        except OSError as e:
            raise self._error(e, f"cannot claim the record of job {record.job_id}") from e
        finally:
            with contextlib.suppress(OSError):
                os.unlink(tmp)

    def save(self, record: CageRecord) -> None:
        self._check()
        path = self.path(record.job_id)
        tmp = f"{path}.{os.getpid()}.tmp"
        self._write_temp(tmp, record)
        try:
            if _exchange(tmp, path):
                os.unlink(tmp)  # now the previous record
            else:
                os.replace(tmp, path)
        except OSError as e:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise self._error(e, f"cannot save the record of job {record.job_id}") from e

    def remove(self, job_id: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path(job_id))

    def take_over(
        self, job_id: str, reapable: Callable[[CageRecord], bool], lock: str
    ) -> CageRecord | None:
        """Make this process the owner of a record ``reapable`` accepts, under ``lock``.

        The record says state ``reaping`` and whom it was taken from, so a second
        reaper leaves it alone and a reaper that dies half-way leaves it for the next.
        """
        with self.lock(lock):
            record = self.load_or_none(job_id, strict=False)
            if record is None or not reapable(record):
                return None
            taken = record.replace(
                owner=this_process(),
                state=RecordState.REAPING,
                reaped_from=record.reaped_from or record.owner,
                reaped_from_state=record.reaped_from_state or record.state,
            )
            self.save(taken)
            return taken

    # -- reading -------------------------------------------------------------------------

    def load(self, job_id: str) -> CageRecord:
        """The record of ``job_id``; CageNotFoundError, or RecordError naming the file."""
        record = self.load_or_none(job_id)
        if record is None:
            raise CageNotFoundError(
                f"no cage for job {job_id} on this node (no record in {self.cages_dir}); "
                "`jobcage list` shows the cages there are"
            )
        return record

    def load_or_none(self, job_id: str, *, strict: bool = True) -> CageRecord | None:
        """None if there is no record; a bad one raises RecordError (or is None if not
        ``strict``)."""
        self._check()
        path = self.path(job_id)
        try:
            with open(path, "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            return None
        try:
            return parse_record(json.loads(raw.decode("utf-8")), job_id)
        except (UnicodeDecodeError, ValueError, RecordError) as e:
            if not strict:
                return None
            why = e if isinstance(e, RecordError) else f"is not UTF-8 JSON ({e})"
            raise RecordError(
                f"bad cage record {path}: {why}; `jobcage reap` moves it to {self.bad_dir}"
            ) from None

    def scan(self) -> tuple[list[CageRecord], list[BadRecord]]:
        """Every record that can be believed, and every one that cannot (with why)."""
        self._check()
        try:
            names = sorted(os.listdir(self.cages_dir))
        except FileNotFoundError:
            return [], []
        good: list[CageRecord] = []
        bad: list[BadRecord] = []
        for name in names:
            if not name.endswith(".json"):
                continue
            stem = name[: -len(".json")]
            job_id = stem if is_job_id(stem) else None  # a bad record's, from its name
            path = os.path.join(self.cages_dir, name)
            try:
                with open(path, "rb") as f:
                    raw = f.read()
            except FileNotFoundError:
                continue  # removed since the listing
            except OSError as e:
                bad.append(BadRecord(path, job_id, f"cannot be read: {e}"))
                continue
            try:
                data = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError:
                bad.append(BadRecord(path, job_id, "is not UTF-8"))
                continue
            except ValueError as e:  # JSONDecodeError
                bad.append(BadRecord(path, job_id, f"is not JSON ({e})"))
                continue
            try:
                good.append(parse_record(data, stem))
            except RecordError as e:
                newer = isinstance(e, NewerRecordError)
                bad.append(BadRecord(path, job_id, str(e), newer, salvage_owner(data)))
        return good, bad

    def records(self) -> list[CageRecord]:
        return self.scan()[0]

    def set_aside(self, bad: BadRecord) -> str:
        """Move a bad record to ``cages/bad/`` (kept for the administrator); its new path."""
        self.ensure_dir(self.bad_dir)
        target = os.path.join(self.bad_dir, f"{os.path.basename(bad.path)}.{time.time_ns()}")
        try:
            os.rename(bad.path, target)
        except OSError as e:
            raise self._error(e, f"cannot move {bad.path} aside") from e
        return target


def temp_file_writer(name: str) -> int | None:
    """The writer's pid in ``<id>.json.<pid>.tmp`` / ``<id>.json.<pid>.<n>.claim``."""
    parts = name.split(".")
    if name.endswith(".tmp") and len(parts) >= 4 and parts[-3] == "json":
        pid = parts[-2]
    elif name.endswith(".claim") and len(parts) >= 5 and parts[-4] == "json":
        pid = parts[-3]
    else:
        return None
    return int(pid) if pid.isdigit() else None


__all__ = ["BadRecord", "Owner", "StateStore", "temp_file_writer", "unsafe_reason"]

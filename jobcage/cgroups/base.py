"""The small interface every cgroup backend implements, and the kill protocol on it.

A :class:`CgroupBackend` knows one hierarchy layout (v1: a directory per controller;
v2: one unified directory). A :class:`CageCgroup` is one job's cgroup(s) in it, with a handful of
verbs: join files for a child, add a pid, list pids, freeze, thaw, kill, stats,
remove. The teardown protocol (:meth:`CageCgroup.kill_all`) is written once here on
top of those verbs.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import time
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from ..config import Config
from ..config_values import DEFAULT_CGROUP_PARENT_NAME
from ..errors import CageExistsError, KernelFeatureError

# Bounds of the teardown protocol. A task in uninterruptible sleep (D state: NFS,
# a stuck device) neither freezes nor dies until the kernel lets it go; these bounds
# keep teardown from hanging on it.
FREEZE_TIMEOUT_SECONDS = 5.0
EMPTY_TIMEOUT_SECONDS = 5.0
KILL_DEADLINE_SECONDS = 30.0

# errnos that mean "already gone" during teardown.
GONE_ERRNOS = frozenset({errno.ENOENT, errno.ENODEV, errno.ESRCH})
MKDIR_RETRIES = 5


@dataclass(frozen=True)
class CgroupStats:
    cpu_user_seconds: float | None = None
    cpu_system_seconds: float | None = None
    memory_peak_bytes: int | None = None
    memory_limit_bytes: int | None = None
    oom_kills: int | None = None
    io_read_bytes: int | None = None
    io_write_bytes: int | None = None
    cpu_limit_cpus: float | None = None
    cpu_periods: int | None = None
    cpu_throttled_periods: int | None = None
    cpu_throttled_seconds: float | None = None


# The CFS period a CPU limit is written with (the kernel's default, 100 ms).
CPU_PERIOD_US = 100_000
# The kernel refuses a quota under 1 ms.
CPU_MIN_QUOTA_US = 1000


def cpu_quota_us(cpus: float) -> int:
    return max(CPU_MIN_QUOTA_US, round(cpus * CPU_PERIOD_US))


@dataclass(frozen=True)
class KillResult:
    killed: int
    surviving: int
    froze: bool


class CageCgroup(ABC):
    """One job's cgroup(s). ``paths`` maps a controller (or "unified") to its dir."""

    version: int

    def __init__(self, paths: Mapping[str, str]) -> None:
        self.paths = dict(paths)

    # -- verbs each backend implements -------------------------------------------------

    @abstractmethod
    def join_files(self) -> list[str]:
        """cgroup.procs files a child writes "0" into to join the cage itself."""

    @abstractmethod
    def pids(self) -> set[int]:
        """Every process (thread group) in the cage and its sub-cgroups."""

    @abstractmethod
    def freeze(self, timeout: float = FREEZE_TIMEOUT_SECONDS) -> bool:
        """Freeze and wait until the kernel reports frozen; False on timeout."""

    @abstractmethod
    def thaw(self) -> None: ...

    @abstractmethod
    def wait_empty(self, timeout: float) -> bool:
        """Wait until no process is left, on the kernel's own signal where it has one."""

    @abstractmethod
    def stats(self) -> CgroupStats: ...

    @abstractmethod
    def remove(self) -> None:
        """Remove the cgroup(s) depth-first; tolerant of "already gone"."""

    def kill_signal_all(self) -> bool:
        """Kill everything in one kernel operation (cgroup.kill); False if unsupported."""
        return False

    # -- shared --------------------------------------------------------------------------

    def add_pid(self, pid: int) -> None:
        for path in self.join_files():
            write_file(path, str(pid))

    def kill_all(self, deadline: float = KILL_DEADLINE_SECONDS) -> KillResult:
        """Freeze → SIGKILL every process → thaw → wait until empty.

        Frozen, the cage cannot fork, so one read of its pids is complete and a fork
        storm cannot outrun the kill (a naive read-and-kill loop can, see "Teardown"
        in docs/cage.md). If a task never finishes freezing, the wait is bounded and
        the protocol falls back to repeated kill passes until ``deadline``.
        """
        end = time.monotonic() + deadline
        killed: set[int] = set()
        froze = True
        while True:
            frozen = self.freeze()
            froze = froze and frozen
            try:
                pids = self.pids()
                killed |= pids
                if not self.kill_signal_all():
                    for pid in pids:
                        _sigkill(pid)
            finally:
                # A failed freeze is thawed back too: never leave a cage FROZEN.
                self.thaw()
            remaining = end - time.monotonic()
            if self.wait_empty(min(EMPTY_TIMEOUT_SECONDS, max(remaining, 0.0))):
                return KillResult(killed=len(killed), surviving=0, froze=froze)
            if time.monotonic() >= end:
                return KillResult(killed=len(killed), surviving=len(self.pids()), froze=froze)


def _sigkill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


# -- small file helpers shared by the backends ---------------------------------------------


def read_file(path: str) -> str:
    with open(path) as f:
        return f.read()


def write_file(path: str, value: str) -> None:
    # One write() per value: cgroupfs takes one value per write call.
    fd = os.open(path, os.O_WRONLY | os.O_TRUNC)
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)


def read_int(path: str) -> int | None:
    """An integer file; None if the kernel does not have it."""
    try:
        text = read_file(path).strip()
    except FileNotFoundError:
        return None
    if text == "max":
        return None
    return int(text)


def read_pids(paths: Iterable[str]) -> set[int]:
    pids: set[int] = set()
    for path in paths:
        try:
            text = read_file(path)
        except OSError as e:
            if e.errno in GONE_ERRNOS:
                continue
            raise
        pids.update(int(line) for line in text.split())
    return pids


def subtree_dirs(top: str) -> list[str]:
    """``top`` and every cgroup below it, deepest first (the order rmdir needs)."""
    found = []
    for dirpath, _dirnames, _files in os.walk(top, topdown=False):
        found.append(dirpath)
    return found


def rmdir_tree(top: str) -> None:
    for path in subtree_dirs(top):
        try:
            os.rmdir(path)
        except OSError as e:
            if e.errno not in GONE_ERRNOS:
                raise


def wait_until(predicate, timeout: float) -> bool:
    """Poll a kernel state that has no notification, backing off from 50 µs to 10 ms.

    Used only where the kernel offers nothing to block on (the v1 freezer's
    freezer.state, v1 tasks emptiness); v2 blocks on cgroup.events instead.
    """
    end = time.monotonic() + timeout
    delay = 0.00005
    while True:
        if predicate():
            return True
        if time.monotonic() >= end:
            return False
        time.sleep(delay)
        delay = min(delay * 2, 0.01)


def mkdir_under_parent(parent: str, path: str, ensure_parent=None) -> None:
    """mkdir the cage's cgroup, creating the parent on demand.

    Another cage's teardown may remove an empty parent between the two mkdirs, so
    ENOENT on the second is retried, with the parent made again by ``ensure_parent``
    (v2 must also re-delegate controllers to a re-made parent).
    """
    for _ in range(MKDIR_RETRIES):
        try:
            if ensure_parent is not None:
                ensure_parent()
            else:
                os.mkdir(parent)
        except FileExistsError:
            pass
        except FileNotFoundError:
            raise KernelFeatureError(
                f"cannot create the cgroup parent {parent}: its own parent does not exist; "
                "create it or set cgroup_parent in the config"
            ) from None
        try:
            os.mkdir(path)
            return
        except FileExistsError:
            raise CageExistsError(
                f"cgroup {path} already exists: a cage of this job id is running, or a "
                "dead one was not cleaned up (run `jobcage reap`)"
            ) from None
        except FileNotFoundError:
            continue
    raise OSError(errno.ENOENT, f"parent cgroup {parent} kept disappearing")


def rmdir_if_empty(path: str) -> None:
    try:
        os.rmdir(path)
    except OSError as e:
        # EBUSY/ENOTEMPTY: other cages still live there. Gone: someone was faster.
        if e.errno not in GONE_ERRNOS | {errno.EBUSY, errno.ENOTEMPTY}:
            raise


class CgroupBackend:
    """Creates and reopens cages' cgroups under one parent in one layout."""

    version: int

    def create(
        self,
        name: str,
        *,
        memory_limit: int | None,
        pids_limit: int | None,
        cpu_limit: float | None = None,
    ) -> CageCgroup:
        raise NotImplementedError

    def open(self, paths: dict[str, str]) -> CageCgroup:
        raise NotImplementedError

    def paths_for(self, name: str) -> dict[str, str]:
        """Every directory a cage of this name may have; recorded before creating any."""
        raise NotImplementedError

    def remove_parent_if_empty(self) -> None:
        raise NotImplementedError

    def parents(self) -> dict[str, str]:
        """controller (or "unified") -> the directory this backend makes cages in."""
        raise NotImplementedError

    def mounts(self) -> dict[str, str]:
        """controller (or "unified") -> where its hierarchy is mounted."""
        raise NotImplementedError

    def is_cage_dir(self, controller: str, path: str, name: str) -> bool:
        """Whether ``path`` is a directory JobCage itself would make for cage ``name``:
        ``<parent>/<name>`` under this backend's parent, or under a parent named
        ``jobcage`` (the default, the caller's own cgroup + jobcage/, so a reaper in
        another cgroup than the batch system still knows its cages) in the hierarchy of
        ``controller``. What a record names is checked with this before it is acted on.
        """
        if os.path.normpath(path) != path or os.path.basename(path) != name:
            return False
        parent = os.path.dirname(path)
        if parent == self.parents().get(controller):
            return True
        mount = self.mounts().get(controller)
        return (
            mount is not None
            and os.path.basename(parent) == DEFAULT_CGROUP_PARENT_NAME
            and parent.startswith(mount.rstrip("/") + "/")
        )


def parent_path(own: str, config: Config) -> str:
    """The parent cgroup, relative to a hierarchy's mount point."""
    if config.cgroup_parent is None:
        return os.path.join(own, DEFAULT_CGROUP_PARENT_NAME)
    return config.cgroup_parent  # absolute and normalised by the config

"""cgroup v1 backend: a directory per controller (freezer, memory, cpuacct, blkio, pids).

cgroupspy's controller classes serve the memory files; it has no freezer or pids
class and its blkio class names files this kernel no longer has (since 5.0 and the
removal of CFQ, only ``blkio.throttle.*`` and ``blkio.bfq.*`` remain), so those few
files are read and written here directly.
"""

from __future__ import annotations

import os
import select
import time

from cgroupspy.controllers import MemoryController

from ..config import Config
from ..errors import KernelFeatureError
from .base import (
    CPU_PERIOD_US,
    FREEZE_TIMEOUT_SECONDS,
    GONE_ERRNOS,
    CageCgroup,
    CgroupBackend,
    CgroupStats,
    cpu_quota_us,
    mkdir_under_parent,
    parent_path,
    read_file,
    read_int,
    read_pids,
    rmdir_if_empty,
    rmdir_tree,
    subtree_dirs,
    wait_until,
    write_file,
)
from .hierarchies import Hierarchies

REQUIRED = ("freezer",)
_KERNEL_OPTION = {"memory": "MEMCG", "pids": "CGROUP_PIDS", "cpu": "CFS_BANDWIDTH"}


class _Directory:
    """Where a MemoryController reads and writes: all it asks of its node is
    ``full_path``. cgroupspy's own Node would also import logging, a per-job cost
    (docs/performance.md), to name one directory."""

    def __init__(self, path: str) -> None:
        self.full_path = os.fsencode(path)


def _memory(path: str) -> MemoryController:
    return MemoryController(_Directory(path))


class CgroupV1Backend(CgroupBackend):
    version = 1

    def __init__(self, hierarchies: Hierarchies, config: Config) -> None:
        self.h = hierarchies
        self.config = config
        missing = [c for c in REQUIRED if c not in hierarchies.v1_mounts]
        if missing:
            raise KernelFeatureError(
                f"the cgroup v1 {', '.join(missing)} controller is not mounted: mount it "
                f"(mount -t cgroup -o {missing[0]} cgroup /sys/fs/cgroup/{missing[0]}) or "
                "use a cgroup v2 node (kernel option CONFIG_CGROUP_FREEZER)"
            )
        self._parents = {
            c: os.path.join(
                hierarchies.v1_mounts[c], parent_path(hierarchies.v1_own[c], config).lstrip("/")
            )
            for c in hierarchies.v1_mounts
        }

    def _controllers(
        self, memory_limit: int | None, pids_limit: int | None, cpu_limit: float | None
    ) -> list[str]:
        # A limit brings its controller even when cgroup_controllers leaves it out.
        needed = (
            ("freezer",)
            + (("memory",) if memory_limit is not None else ())
            + (("pids",) if pids_limit is not None else ())
            + (("cpu",) if cpu_limit is not None else ())
        )
        wanted = list(dict.fromkeys((*self.config.cgroup_controllers, *needed)))
        for c in needed:
            if c not in self.h.v1_mounts:
                raise KernelFeatureError(
                    f"a limit needs the cgroup v1 {c} controller, which is not mounted on "
                    f"this node: mount it on /sys/fs/cgroup/{c} (kernel option "
                    f"CONFIG_{_KERNEL_OPTION.get(c, 'CGROUP_PIDS')})"
                )
        return [c for c in wanted if c in self.h.v1_mounts]

    def create(
        self,
        name: str,
        *,
        memory_limit: int | None,
        pids_limit: int | None,
        cpu_limit: float | None = None,
    ) -> V1Cgroup:
        made: dict[str, str] = {}
        try:
            for c in self._controllers(memory_limit, pids_limit, cpu_limit):
                path = os.path.join(self._parents[c], name)
                if path not in made.values():  # cpu and cpuacct are often co-mounted
                    mkdir_under_parent(self._parents[c], path)
                made[c] = path
            cg = V1Cgroup(made)
            cg.set_limits(memory_limit, pids_limit)
            if cpu_limit is not None:
                cg.set_cpu_limit(cpu_limit)
            return cg
        except BaseException:
            for path in made.values():
                rmdir_tree(path)
            raise

    def open(self, paths: dict[str, str]) -> V1Cgroup:
        return V1Cgroup({c: p for c, p in paths.items() if os.path.isdir(p)})

    def paths_for(self, name: str) -> dict[str, str]:
        wanted = (*self.config.cgroup_controllers, "memory", "pids", "cpu")
        return {c: os.path.join(self._parents[c], name) for c in wanted if c in self._parents}

    def remove_parent_if_empty(self) -> None:
        for parent in self._parents.values():
            rmdir_if_empty(parent)

    def parents(self) -> dict[str, str]:
        return dict(self._parents)

    def mounts(self) -> dict[str, str]:
        return dict(self.h.v1_mounts)


class V1Cgroup(CageCgroup):
    version = 1

    @property
    def _freezer(self) -> str:
        try:
            return self.paths["freezer"]
        except KeyError:
            raise FileNotFoundError("the cage has no freezer cgroup (already removed)") from None

    def set_limits(self, memory_limit: int | None, pids_limit: int | None) -> None:
        if memory_limit is not None:
            mem = _memory(self.paths["memory"])
            mem.limit_in_bytes = memory_limit
            # memsw (RAM + swap) exists when swap accounting is on (swapaccount=1 or
            # CONFIG_MEMCG_SWAP default); with it the job cannot swap past its limit.
            if os.path.exists(os.path.join(self.paths["memory"], "memory.memsw.limit_in_bytes")):
                mem.memsw_limit_in_bytes = memory_limit
        if pids_limit is not None:
            write_file(os.path.join(self.paths["pids"], "pids.max"), str(pids_limit))

    def set_cpu_limit(self, cpu_limit: float) -> None:
        """CFS bandwidth: ``cpu_limit`` CPUs' worth of run time per period."""
        cpu = self.paths["cpu"]
        try:
            write_file(os.path.join(cpu, "cpu.cfs_period_us"), str(CPU_PERIOD_US))
            write_file(os.path.join(cpu, "cpu.cfs_quota_us"), str(cpu_quota_us(cpu_limit)))
        except FileNotFoundError:
            raise KernelFeatureError(
                "a CPU limit needs CFS bandwidth control (cpu.cfs_quota_us), which this "
                "kernel lacks: build it with CONFIG_CFS_BANDWIDTH or drop the CPU limit"
            ) from None

    def join_files(self) -> list[str]:
        return [os.path.join(p, "cgroup.procs") for p in self.paths.values()]

    def pids(self) -> set[int]:
        return read_pids(os.path.join(d, "cgroup.procs") for d in subtree_dirs(self._freezer))

    def freeze(self, timeout: float = FREEZE_TIMEOUT_SECONDS) -> bool:
        state = os.path.join(self._freezer, "freezer.state")
        write_file(state, "FROZEN")
        # v1 has no notification for FREEZING -> FROZEN; freezer.state is re-evaluated
        # on each read (kernel/cgroup/legacy_freezer.c, update_if_frozen).
        return wait_until(lambda: read_file(state).strip() == "FROZEN", timeout)

    def thaw(self) -> None:
        try:
            write_file(os.path.join(self._freezer, "freezer.state"), "THAWED")
        except OSError as e:
            if e.errno not in GONE_ERRNOS:
                raise

    def wait_empty(self, timeout: float) -> bool:
        """Block on pidfds of the remaining processes: readable once each has exited."""
        return _wait_pids_gone(self.pids, timeout)

    def stats(self) -> CgroupStats:
        user = system = peak = limit = ooms = rd = wr = None
        if "cpuacct" in self.paths:
            acct = self.paths["cpuacct"]
            u = read_int(os.path.join(acct, "cpuacct.usage_user"))
            s = read_int(os.path.join(acct, "cpuacct.usage_sys"))
            total = read_int(os.path.join(acct, "cpuacct.usage"))
            if u is not None and s is not None:
                user, system = _split_precise(total, u, s)
            else:  # before 4.6: USER_HZ ticks only
                ticks = _keyed(read_file(os.path.join(acct, "cpuacct.stat")))
                hz = os.sysconf("SC_CLK_TCK")
                user, system = ticks["user"] / hz, ticks["system"] / hz
        if "memory" in self.paths:
            mem = _memory(self.paths["memory"])
            peak = mem.max_usage_in_bytes
            raw_limit = mem.limit_in_bytes
            # An unlimited v1 cgroup reports PAGE_COUNTER_MAX pages rounded down.
            limit = raw_limit if raw_limit < (1 << 62) else None
            # oom_kill in memory.oom_control since 4.13.
            ooms = mem.oom_control.get("oom_kill")
        if "blkio" in self.paths:
            rd, wr = _blkio_bytes(self.paths["blkio"])
        return CgroupStats(user, system, peak, limit, ooms, rd, wr, **self._cpu_stats())

    def _cpu_stats(self) -> dict[str, float | int | None]:
        """The CPU limit and its throttling, from the cpu controller (v1 names)."""
        if "cpu" not in self.paths:
            return {}
        quota = read_int(os.path.join(self.paths["cpu"], "cpu.cfs_quota_us"))
        period = read_int(os.path.join(self.paths["cpu"], "cpu.cfs_period_us"))
        try:
            stat = _keyed(read_file(os.path.join(self.paths["cpu"], "cpu.stat")))
        except FileNotFoundError:
            stat = {}
        throttled = stat.get("throttled_time")
        return {
            "cpu_limit_cpus": quota / period if quota and quota > 0 and period else None,
            "cpu_periods": stat.get("nr_periods"),
            "cpu_throttled_periods": stat.get("nr_throttled"),
            "cpu_throttled_seconds": throttled / 1e9 if throttled is not None else None,
        }

    def remove(self) -> None:
        errors = []
        for path in self.paths.values():
            try:
                rmdir_tree(path)
            except OSError as e:
                errors.append(e)
        if errors:
            raise errors[0]


def _keyed(text: str) -> dict[str, int]:
    out = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].lstrip("-").isdigit():
            out[parts[0]] = int(parts[1])
    return out


def _split_precise(total: int | None, user: int, system: int) -> tuple[float, float]:
    """(user, system) seconds summing to ``cpuacct.usage``, the only precise figure.

    usage_user and usage_sys are the kernel's tick-sampled cpustat (a whole tick
    charged to whoever runs at it): under a CPU quota, whose throttling also acts at
    ticks, their sum runs well past cpuacct.usage and bills more CPU than the quota
    allows. Their ratio only splits the precise total, as cgroup v2's cpu.stat does
    (cputime_adjust: all of it user time when no tick fell in either).
    """
    if total is None:
        return user / 1e9, system / 1e9
    if user + system == 0:
        return total / 1e9, 0.0
    user_ns = total * user // (user + system)
    return user_ns / 1e9, (total - user_ns) / 1e9


def _blkio_bytes(path: str) -> tuple[int | None, int | None]:
    """Read/write bytes from blk-throttle's counters, which count every bio.

    blkio.io_service_bytes (CFQ) is gone since 5.0; blkio.throttle.* is kept by
    blk-throttle. Buffered writes are charged to the root on v1 (no cgroup
    writeback), so only direct and synchronous I/O lands here.
    """
    name = os.path.join(path, "blkio.throttle.io_service_bytes_recursive")
    try:
        text = read_file(name)
    except FileNotFoundError:
        return None, None
    rd = wr = 0
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[1] == "Read":
            rd += int(parts[2])
        elif len(parts) == 3 and parts[1] == "Write":
            wr += int(parts[2])
    return rd, wr


def _wait_pids_gone(list_pids, timeout: float) -> bool:
    """Wait until ``list_pids()`` is empty, blocking on pidfds rather than sleeping.

    A pidfd polls readable when its process exits (Linux 5.3); the cgroup drops the
    task in do_exit, before that. Processes that appear later are picked up on the
    next pass.
    """
    end = time.monotonic() + timeout
    while True:
        pids = list_pids()
        if not pids:
            return True
        remaining = end - time.monotonic()
        if remaining <= 0:
            return False
        # epoll, not poll: with a storm of thousands, exits arrive a few at a time and
        # poll(2) would rescan every descriptor on each return.
        poller = select.epoll()
        fds = []
        try:
            for pid in pids:
                try:
                    fd = os.pidfd_open(pid)
                except ProcessLookupError:
                    continue
                fds.append(fd)
                poller.register(fd, select.EPOLLIN)
            pending = len(fds)
            while pending:
                remaining = end - time.monotonic()
                if remaining <= 0:
                    break
                for fd, _ev in poller.poll(remaining):
                    poller.unregister(fd)
                    pending -= 1
        finally:
            poller.close()
            for fd in fds:
                os.close(fd)

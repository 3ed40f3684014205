"""cgroup v2 backend: one directory in the unified hierarchy, written directly.

cgroupspy has no v2 support. Files used, and since when the kernel has them:
cgroup.freeze / cgroup.events "frozen" (5.2), cgroup.kill (5.14), memory.peak (5.19),
memory.events "oom_kill" (4.13), memory.swap.max (4.12), cpu.stat (4.15; user_usec
and system_usec are core stats, present without the cpu controller), io.stat (4.16).
Each is probed by existence, not by kernel version.
"""

from __future__ import annotations

import contextlib
import errno
import os
import select
import time

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
    write_file,
)
from .hierarchies import Hierarchies

# Controllers a cage wants enabled for its cgroup, when the parent offers them.
WANTED_CONTROLLERS = ("memory", "io", "pids", "cpu")
# Where the calling process moves itself when its own cgroup has to become an inner
# node (the "no internal processes" rule): a leaf beside the cages' parent.
OWNER_LEAF = "jobcage-owner"


class CgroupV2Backend(CgroupBackend):
    version = 2

    def __init__(self, hierarchies: Hierarchies, config: Config) -> None:
        if not hierarchies.v2_mount or hierarchies.v2_own is None:
            raise KernelFeatureError(
                "cgroup v2 is not mounted: mount -t cgroup2 none /sys/fs/cgroup "
                "(or boot with systemd.unified_cgroup_hierarchy=1)"
            )
        self.mount = hierarchies.v2_mount
        self.own = hierarchies.v2_own
        rel = parent_path(hierarchies.v2_own, config)
        self.parent = os.path.join(self.mount, rel.lstrip("/"))

    # -- the parent ------------------------------------------------------------------

    def _prepare_parent(self) -> None:
        """Create the parent and delegate the controllers down to it.

        A controller reaches a cage only if every ancestor lists it in
        cgroup.subtree_control, and a non-root cgroup with processes in it cannot
        enable controllers for its children (EBUSY; "no internal processes",
        Documentation/admin-guide/cgroup-v2.rst). Under systemd the caller usually sits
        in its unit's own cgroup; like other tools run under systemd we then move
        ourselves into a leaf beside the cages' parent and retry.
        """
        grand = os.path.dirname(self.parent)
        wanted = self._available(grand)
        if wanted:
            self._enable(grand, wanted)
        with contextlib.suppress(FileExistsError):
            os.mkdir(self.parent)
        if wanted:
            self._enable(self.parent, wanted)

    @staticmethod
    def _available(path: str) -> list[str]:
        try:
            offered = set(read_file(os.path.join(path, "cgroup.controllers")).split())
        except FileNotFoundError:
            raise KernelFeatureError(
                f"cgroup v2 directory {path} does not exist: create it or set cgroup_parent"
            ) from None
        return [c for c in WANTED_CONTROLLERS if c in offered]

    def _enable(self, path: str, controllers: list[str]) -> None:
        control = os.path.join(path, "cgroup.subtree_control")
        enabled = set(read_file(control).split())
        missing = [c for c in controllers if c not in enabled]
        if not missing:
            return
        value = " ".join(f"+{c}" for c in missing)
        try:
            write_file(control, value)
        except OSError as e:
            if e.errno != errno.EBUSY or os.path.normpath(path) != os.path.normpath(
                os.path.join(self.mount, self.own.lstrip("/"))
            ):
                raise KernelFeatureError(
                    f"cannot enable {value} in {control}: {e.strerror}. Delegate the "
                    "controllers to JobCage (systemd: Delegate=yes on its unit) or set "
                    "cgroup_parent to a cgroup that has them"
                ) from e
            self._move_self_to_leaf(path)
            write_file(control, value)

    @staticmethod
    def _move_self_to_leaf(own_dir: str) -> None:
        leaf = os.path.join(own_dir, OWNER_LEAF)
        with contextlib.suppress(FileExistsError):
            os.mkdir(leaf)
        write_file(os.path.join(leaf, "cgroup.procs"), "0")
        if read_pids([os.path.join(own_dir, "cgroup.procs")]):
            raise KernelFeatureError(
                f"other processes share JobCage's cgroup {own_dir}, so it cannot enable "
                "controllers for cages: run JobCage in a cgroup of its own (systemd: a "
                "service with Delegate=yes) or set cgroup_parent"
            )

    # -- cages -----------------------------------------------------------------------

    def create(
        self,
        name: str,
        *,
        memory_limit: int | None,
        pids_limit: int | None,
        cpu_limit: float | None = None,
    ) -> V2Cgroup:
        path = os.path.join(self.parent, name)
        mkdir_under_parent(self.parent, path, ensure_parent=self._prepare_parent)
        try:
            cg = V2Cgroup({"unified": path})
            cg.set_limits(memory_limit, pids_limit)
            if cpu_limit is not None:
                cg.set_cpu_limit(cpu_limit)
            return cg
        except BaseException:
            rmdir_tree(path)
            raise

    def open(self, paths: dict[str, str]) -> V2Cgroup:
        return V2Cgroup(paths)

    def paths_for(self, name: str) -> dict[str, str]:
        return {"unified": os.path.join(self.parent, name)}

    def remove_parent_if_empty(self) -> None:
        rmdir_if_empty(self.parent)

    def parents(self) -> dict[str, str]:
        return {"unified": self.parent}

    def mounts(self) -> dict[str, str]:
        return {"unified": self.mount}


class V2Cgroup(CageCgroup):
    version = 2

    @property
    def path(self) -> str:
        return self.paths["unified"]

    def _file(self, name: str) -> str:
        return os.path.join(self.path, name)

    def set_limits(self, memory_limit: int | None, pids_limit: int | None) -> None:
        if memory_limit is not None:
            self._write_controller_file("memory.max", str(memory_limit), "memory")
            # memory.max bounds RAM only; without swap.max = 0 a job could push the
            # rest of its working set to swap and run past its limit.
            if os.path.exists(self._file("memory.swap.max")):
                write_file(self._file("memory.swap.max"), "0")
        if pids_limit is not None:
            self._write_controller_file("pids.max", str(pids_limit), "pids")

    def set_cpu_limit(self, cpu_limit: float) -> None:
        """cpu.max: ``cpu_limit`` CPUs' worth of run time per period."""
        quota = f"{cpu_quota_us(cpu_limit)} {CPU_PERIOD_US}"
        self._write_controller_file("cpu.max", quota, "cpu")

    def _write_controller_file(self, name: str, value: str, controller: str) -> None:
        try:
            write_file(self._file(name), value)
        except FileNotFoundError:
            raise KernelFeatureError(
                f"the cgroup v2 {controller} controller is not enabled for {self.path}: "
                f"enable it in the parents' cgroup.subtree_control (+{controller}) or "
                "delegate it to JobCage (systemd: Delegate=yes)"
            ) from None

    def join_files(self) -> list[str]:
        return [self._file("cgroup.procs")]

    def pids(self) -> set[int]:
        return read_pids(os.path.join(d, "cgroup.procs") for d in subtree_dirs(self.path))

    def _wait_event(self, key: str, value: int, timeout: float) -> bool:
        """Block until cgroup.events shows ``key value``.

        kernfs signals a change of cgroup.events as POLLPRI|POLLERR on an open fd
        (cgroup_file_notify), so this sleeps in poll(), not in a loop.
        """
        end = time.monotonic() + timeout
        fd = os.open(self._file("cgroup.events"), os.O_RDONLY)
        try:
            poller = select.poll()
            poller.register(fd, select.POLLPRI | select.POLLERR)
            while True:
                os.lseek(fd, 0, os.SEEK_SET)
                text = os.read(fd, 4096).decode()
                events = dict(line.split() for line in text.splitlines())
                if int(events.get(key, -1)) == value:
                    return True
                remaining = end - time.monotonic()
                if remaining <= 0:
                    return False
                poller.poll(remaining * 1000)
        finally:
            os.close(fd)

    def freeze(self, timeout: float = FREEZE_TIMEOUT_SECONDS) -> bool:
        write_file(self._file("cgroup.freeze"), "1")
        return self._wait_event("frozen", 1, timeout)

    def thaw(self) -> None:
        try:
            write_file(self._file("cgroup.freeze"), "0")
        except OSError as e:
            if e.errno not in GONE_ERRNOS:
                raise

    def kill_signal_all(self) -> bool:
        # cgroup.kill (5.14) SIGKILLs the whole subtree in the kernel, frozen tasks too.
        try:
            write_file(self._file("cgroup.kill"), "1")
        except FileNotFoundError:
            return False
        return True

    def wait_empty(self, timeout: float) -> bool:
        return self._wait_event("populated", 0, timeout)

    def stats(self) -> CgroupStats:
        cpu = _keyed(self._file("cpu.stat"))
        user = cpu["user_usec"] / 1e6 if "user_usec" in cpu else None
        system = cpu["system_usec"] / 1e6 if "system_usec" in cpu else None
        peak = read_int(self._file("memory.peak"))
        limit = read_int(self._file("memory.max"))
        ooms = None
        if os.path.exists(self._file("memory.events")):
            ooms = _keyed(self._file("memory.events")).get("oom_kill", 0)
        rd = wr = None
        if os.path.exists(self._file("io.stat")):
            rd = wr = 0
            for line in read_file(self._file("io.stat")).splitlines():
                fields = dict(kv.split("=", 1) for kv in line.split()[1:] if "=" in kv)
                rd += int(fields.get("rbytes", 0))
                wr += int(fields.get("wbytes", 0))
        limit_cpus = None
        cpu_max = read_file(self._file("cpu.max")).split() if "nr_periods" in cpu else []
        if len(cpu_max) == 2 and cpu_max[0] != "max":
            limit_cpus = int(cpu_max[0]) / int(cpu_max[1])
        throttled = cpu.get("throttled_usec")
        return CgroupStats(
            user,
            system,
            peak,
            limit,
            ooms,
            rd,
            wr,
            cpu_limit_cpus=limit_cpus,
            cpu_periods=cpu.get("nr_periods"),
            cpu_throttled_periods=cpu.get("nr_throttled"),
            cpu_throttled_seconds=throttled / 1e6 if throttled is not None else None,
        )

    def remove(self) -> None:
        rmdir_tree(self.path)


def _keyed(path: str) -> dict[str, int]:
    try:
        text = read_file(path)
    except FileNotFoundError:
        return {}
    out = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2:
            out[parts[0]] = int(parts[1])
    return out

"""Where a node mounts its cgroup hierarchies, probed once from /proc/self/mountinfo.

A node mounts cgroup v1 (a hierarchy per controller), v2 (one unified hierarchy), or
both ("hybrid": v1 controllers, plus a unified hierarchy that has no resource
controllers but still freezes, kills and counts CPU). The probe records, per
controller, where it is mounted and where the calling process sits in it, so the
backend is chosen from that, never from a kernel version. A module of its own because
the backends and the caller-limit check read it too, below the package's selection.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field

V1_CONTROLLERS = (
    "cpu",
    "cpuacct",
    "cpuset",
    "memory",
    "devices",
    "freezer",
    "net_cls",
    "blkio",
    "perf_event",
    "net_prio",
    "hugetlb",
    "pids",
    "rdma",
    "misc",
)


@dataclass(frozen=True)
class Hierarchies:
    """Where each controller is mounted, and the calling process's cgroup in each."""

    v1_mounts: dict[str, str] = field(default_factory=dict)  # controller -> mount point
    v1_own: dict[str, str] = field(default_factory=dict)  # controller -> own cgroup path
    v2_mount: str | None = None
    v2_own: str | None = None
    v2_controllers: frozenset[str] = frozenset()  # enabled at the v2 root

    @property
    def default_version(self) -> int:
        """v2 once the unified hierarchy holds memory; v1 while memory is on v1."""
        if self.v2_mount and "memory" in self.v2_controllers:
            return 2
        if "memory" in self.v1_mounts or "freezer" in self.v1_mounts:
            return 1
        if self.v2_mount:
            return 2
        return 0


def parse_mountinfo(text: str) -> tuple[dict[str, str], str | None]:
    v1: dict[str, str] = {}
    v2: str | None = None
    for line in text.splitlines():
        pre, _, post = line.partition(" - ")
        fields = pre.split()
        post_fields = post.split()
        if len(fields) < 5 or len(post_fields) < 3:
            continue
        fstype, superopts = post_fields[0], post_fields[2]
        mountpoint = _unescape(fields[4])
        if fstype == "cgroup2":
            v2 = v2 or mountpoint
        elif fstype == "cgroup":
            for opt in superopts.split(","):
                if opt in V1_CONTROLLERS:
                    v1.setdefault(opt, mountpoint)
    return v1, v2


def parse_proc_cgroup(text: str) -> tuple[dict[str, str], str | None]:
    v1: dict[str, str] = {}
    v2: str | None = None
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        hier_id, controllers, path = parts
        if hier_id == "0" and controllers == "":
            v2 = path
        for c in controllers.split(","):
            if c in V1_CONTROLLERS:
                v1[c] = path
    return v1, v2


def _unescape(path: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo.
    return path.encode().decode("unicode_escape") if "\\" in path else path


def probe_from(mountinfo: str, proc_cgroup: str) -> Hierarchies:
    v1_mounts, v2_mount = parse_mountinfo(mountinfo)
    v1_own, v2_own = parse_proc_cgroup(proc_cgroup)
    controllers: frozenset[str] = frozenset()
    if v2_mount:
        try:
            with open(os.path.join(v2_mount, "cgroup.controllers")) as f:
                controllers = frozenset(f.read().split())
        except OSError:
            pass
    return Hierarchies(
        v1_mounts={c: m for c, m in v1_mounts.items() if c in v1_own},
        v1_own={c: p for c, p in v1_own.items() if c in v1_mounts},
        v2_mount=v2_mount,
        v2_own=v2_own if v2_mount else None,
        v2_controllers=controllers,
    )


@functools.cache
def probe() -> Hierarchies:
    """The running node's hierarchies; cached, since mounts do not move under a job."""
    with open("/proc/self/mountinfo") as f:
        mountinfo = f.read()
    with open("/proc/self/cgroup") as f:
        proc_cgroup = f.read()
    return probe_from(mountinfo, proc_cgroup)

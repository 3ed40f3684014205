"""Whether the caller's own cgroup is limited: then a cage must stay inside it.

A batch system that limits its job (Slurm's task/cgroup with ConstrainRAMSpace,
HTCondor's per-job cgroup) does it on the job's cgroup, and a cgroup's limits bind
everything below it. A cage made under ``cgroup_parent`` elsewhere would leave those
limits behind, so when the caller's cgroup or an ancestor carries a memory, pids or
CPU limit, the cage nests under the caller (the default parent, the caller's cgroup
plus ``jobcage``) in every hierarchy, whatever ``cgroup_parent`` says.
"""

from __future__ import annotations

import os

from .hierarchies import Hierarchies

# Anything at or above this is "no limit" (v1 reports PAGE_COUNTER_MAX in pages,
# rounded down to a page, for an unlimited memory cgroup).
UNLIMITED = 1 << 62


def caller_limit(h: Hierarchies, version: int) -> str | None:
    """The first limit found on the caller's cgroup or its ancestors, as text naming
    the file (for messages), or None when the caller is not limited."""
    if version == 2:
        if h.v2_mount is None or h.v2_own is None:
            return None
        for directory in _up(h.v2_mount, h.v2_own):
            for name in ("memory.max", "memory.high", "pids.max", "cpu.max"):
                value = _read(os.path.join(directory, name))
                if value is not None and value.split()[0] != "max":
                    return f"{os.path.join(directory, name)} = {value}"
        return None
    if "memory" in h.v1_mounts:
        own = os.path.join(h.v1_mounts["memory"], h.v1_own["memory"].lstrip("/"))
        stat = _read(os.path.join(own, "memory.stat")) or ""
        for line in stat.splitlines():
            key, _, value = line.partition(" ")
            if key == "hierarchical_memory_limit" and value.isdigit() and int(value) < UNLIMITED:
                return f"{own}/memory.stat hierarchical_memory_limit = {value}"
    for controller, name in (("pids", "pids.max"), ("cpu", "cpu.cfs_quota_us")):
        if controller not in h.v1_mounts:
            continue
        for directory in _up(h.v1_mounts[controller], h.v1_own[controller]):
            value = _read(os.path.join(directory, name))
            if value is not None and value not in {"max", "-1"}:
                return f"{os.path.join(directory, name)} = {value}"
    return None


def _up(mount: str, own: str):
    """The caller's cgroup directory and each ancestor below the mount point."""
    rel = own.strip("/")
    while rel:
        yield os.path.join(mount, rel)
        rel = os.path.dirname(rel)


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None

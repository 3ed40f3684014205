"""Cgroup membership, the truth the event-built tree is checked against.

A cage's cgroup.procs files say who is in it; ``/proc/<pid>/cgroup`` says where one
process is. A process is inside a cage when, in every hierarchy the cage uses, its path
is the cage's directory or below it (a root job may make sub-cgroups of its own cage).
"""

from __future__ import annotations

import os

from ..cgroups import probe
from ..cgroups.base import read_pids, subtree_dirs
from . import procfs
from .table import Proc

UNIFIED = "unified"


def relative_paths(cgroup_dirs: dict[str, str]) -> dict[str, str]:
    """Hierarchy -> the cage's path inside it, as /proc/<pid>/cgroup writes it."""
    h = probe()
    out = {}
    for key, path in cgroup_dirs.items():
        mount = h.v2_mount if key == UNIFIED else h.v1_mounts.get(key)
        if mount is None:
            continue
        rel = os.path.relpath(path, mount)
        out[key] = "/" if rel == "." else "/" + rel
    return out


def inside(pid: int, rel_paths: dict[str, str]) -> bool | None:
    """Whether ``pid`` is in the cage in every hierarchy; None when it is gone or exiting.

    An exiting task's v1 paths read "/" (kernel/cgroup/cgroup.c, proc_cgroup_show):
    the flags are read after the paths so that such a task is never called escaped.
    """
    found = procfs.cgroups(pid)
    st = procfs.stat(pid)
    if found is None or st is None or st.exiting:
        return None
    v1, v2 = found
    for key, rel in rel_paths.items():
        where = v2 if key == UNIFIED else v1.get(key)
        if where is None or not (where == rel or where.startswith(rel.rstrip("/") + "/")):
            return False
    return True


def members(cgroup_dirs: dict[str, str]) -> tuple[set[int], set[int]]:
    """Pids in every one of the cage's hierarchies, and in any of them."""
    every: set[int] | None = None
    anywhere: set[int] = set()
    for path in cgroup_dirs.values():
        if not os.path.isdir(path):
            continue
        found = read_pids(os.path.join(d, "cgroup.procs") for d in subtree_dirs(path))
        anywhere |= found
        every = found if every is None else every & found
    return every or set(), anywhere


def describe(pid: int) -> Proc | None:
    """A process found by a scan rather than by its fork event; None once it is exiting
    (a zombie still has a stat: adopted again after its exit was read, it was counted
    twice, and stayed in its tree for good)."""
    st = procfs.stat(pid)
    if st is None or st.exiting:
        return None
    ruid, euid = procfs.uids(pid) or (None, None)
    return Proc(
        pid,
        st.ppid,
        euid,
        ruid=ruid,
        starttime=st.starttime,
        comm=procfs.comm(pid),
        exe=procfs.exe(pid),
    )


def process_tree() -> dict[int, procfs.Stat]:
    """Every process on the node with its parent and start time: police mode's resync."""
    out = {}
    for pid in procfs.all_pids():
        st = procfs.stat(pid)
        if st is not None:
            out[pid] = st
    return out


def descendants(roots: set[int], tree: dict[int, procfs.Stat]) -> set[int]:
    kids: dict[int, list[int]] = {}
    for pid, st in tree.items():
        kids.setdefault(st.ppid, []).append(pid)
    found: set[int] = set()
    stack = [r for r in roots if r in tree]
    while stack:
        pid = stack.pop()
        if pid in found:
            continue
        found.add(pid)
        stack.extend(kids.get(pid, ()))
    return found

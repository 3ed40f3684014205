"""The process table: which process belongs to which watched cage, built from events.

A *tree* is what the watcher follows: a cage (its cgroups are the truth of membership,
the tree the independent cross-check) or, in police mode, the processes under one of
the batch system's per-job daemons (no cgroup at all). A forked child belongs to its
parent's tree; an exit removes the process. This module is pure bookkeeping: it reads
nothing from the kernel, so it is tested with made-up events.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass(slots=True)
class Proc:
    pid: int
    ppid: int
    uid: int | None
    starttime: int | None = None
    ruid: int | None = None  # known when read from /proc: who the job started as
    comm: str | None = None
    exe: str | None = None
    argv: list[str] | None = None
    # It, or the ancestor it forked from, called setsid() while in the tree.
    setsid: bool = False
    reported: set[str] | None = None  # detection kinds already reported for it

    def first_report(self, kind: str) -> bool:
        if self.reported is None:
            self.reported = set()
        elif kind in self.reported:
            return False
        self.reported.add(kind)
        return True


@dataclass
class Tree:
    """One cage (``cgroup_dirs`` set) or one police root (``cgroup_dirs`` empty)."""

    job_id: str
    cgroup_dirs: dict[str, str] = field(default_factory=dict)  # hierarchy -> abs dir
    rel_paths: dict[str, str] = field(default_factory=dict)  # as /proc/<pid>/cgroup says
    root_pid: int | None = None  # police mode: the batch system's per-job daemon
    job_uid: int | None = None  # the uid the job started as (privilege change baseline)
    procs: dict[int, Proc] = field(default_factory=dict)
    processes_started: int = 0
    forks_seen: int = 0  # fork events seen (processes_started also counts scans)
    execs: int = 0
    max_processes: int = 0
    resyncs: int = 0
    # the watcher's loss counters when this tree was added: its losses are the growth
    lost_base: int = 0
    overflow_base: int = 0
    detections: list[dict] = field(default_factory=list)
    # fork rate: forks counted in the current one-second window
    window_start: float = 0.0
    window_forks: int = 0
    rate_reported: bool = False
    removed: bool = False

    @property
    def policed(self) -> bool:
        return not self.cgroup_dirs

    def note_size(self) -> None:
        n = len(self.procs)
        if n > self.max_processes:
            self.max_processes = n


class ProcessTable:
    """Every watched tree, and an index from pid to the tree holding it."""

    def __init__(self) -> None:
        self.trees: dict[str, Tree] = {}
        self.owner: dict[int, Tree] = {}
        self.children: dict[int, set[int]] = {}

    def add_tree(self, tree: Tree) -> Tree:
        if tree.job_id in self.trees:
            raise ValueError(f"already watching {tree.job_id}")
        self.trees[tree.job_id] = tree
        return tree

    def remove_tree(self, job_id: str) -> Tree | None:
        tree = self.trees.pop(job_id, None)
        if tree is not None:
            for pid in list(tree.procs):
                self.drop(pid)
            tree.removed = True
        return tree

    def tree_of(self, pid: int) -> Tree | None:
        return self.owner.get(pid)

    def get(self, pid: int) -> Proc | None:
        tree = self.owner.get(pid)
        return tree.procs.get(pid) if tree is not None else None

    def add(self, tree: Tree, proc: Proc, *, counted: bool = True) -> None:
        """Put ``proc`` in ``tree`` (moving it from another tree if it was in one)."""
        old = self.owner.get(proc.pid)
        if old is not None and old is not tree:
            self.drop(proc.pid)
        tree.procs[proc.pid] = proc
        self.owner[proc.pid] = tree
        self.children.setdefault(proc.ppid, set()).add(proc.pid)
        if counted and old is not tree:
            tree.processes_started += 1
        tree.note_size()

    def fork(self, parent_pid: int, child: Proc) -> Tree | None:
        """A fork event: the child joins its parent's tree; None when the parent is not watched."""
        tree = self.owner.get(child.ppid)
        if tree is None:
            return None
        tree.forks_seen += 1
        if child.pid in tree.procs:
            return tree  # a sweep or resync found it first and counted it then
        parent = tree.procs[child.ppid]
        child.setsid = parent.setsid
        if child.uid is None:
            child.uid = parent.uid
        self.add(tree, child)
        return tree

    def drop(self, pid: int) -> Proc | None:
        tree = self.owner.pop(pid, None)
        if tree is None:
            return None
        proc = tree.procs.pop(pid, None)
        if proc is not None:
            siblings = self.children.get(proc.ppid)
            if siblings is not None:
                siblings.discard(pid)
                if not siblings:
                    del self.children[proc.ppid]
        return proc

    def exit(self, pid: int) -> tuple[Proc | None, list[Proc]]:
        """An exit: remove the process; return it and its watched children (now orphans)."""
        proc = self.drop(pid)
        orphans = [p for c in self.children.pop(pid, ()) if (p := self.get(c)) is not None]
        return proc, orphans

    def reparent(self, proc: Proc, ppid: int) -> None:
        siblings = self.children.get(proc.ppid)
        if siblings is not None:
            siblings.discard(proc.pid)
        proc.ppid = ppid
        self.children.setdefault(ppid, set()).add(proc.pid)

    def count_fork(self, tree: Tree, now: float | None = None) -> int:
        """Forks of ``tree`` in the current one-second window, this one included."""
        now = time.monotonic() if now is None else now
        if now - tree.window_start >= 1.0:
            tree.window_start = now
            tree.window_forks = 0
            tree.rate_reported = False
        tree.window_forks += 1
        return tree.window_forks

"""The watcher: kernel events applied to the process table, detections acted on.

Invariants:

* Every tree's processes are known from their fork events; a cage's are also checked
  against its cgroups by a periodic *sweep* (every ``sweep_seconds``) and at each exec:
  the proc connector has no event for a cgroup move, so an escape is seen at the
  escapee's next exec or at the next sweep, whichever is first.
* A loss (ENOBUFS) is counted, timed and followed by a *resync* of every tree from
  cgroup.procs and /proc before any later event is applied; each tree's record carries
  the losses that happened while it was watched. A lost event is never silent.
* A cage's first process is its builder's child: forks of a registered *owner* are
  candidates, adopted at their exec once /proc says they are in the cage's cgroups.
* Kills go through a pidfd checked against the process's start time.

One watcher per process is enough for any number of cages (the socket sees the whole
node); :func:`jobcage.watch.shared` hands it out.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import select
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from . import detect, membership, procfs
from .detect import Policy
from .events import DEFAULT_BUFFER_BYTES, EventSource, Loss, ProcEvent
from .table import Proc, ProcessTable, Tree

DEFAULT_SWEEP_SECONDS = 0.1
# The longest an event waits for others to be handled with it: adds at most this to
# an escape's detection, saves most of the watcher's CPU under a stream of forks.
DEFAULT_COALESCE_SECONDS = 0.002
# How long an owner's child may stay unmatched to a cage (not spawned into one).
PENDING_SECONDS = 30.0
Sink = Callable[[dict[str, Any]], None]


@dataclass(slots=True)
class Pending:
    """A child of a cage's owner, or its descendant, not yet matched to a cage."""

    proc: Proc
    since: float
    execs: int = 0
    exited: bool = False


class Watcher:
    def __init__(
        self,
        policy: Policy | None = None,
        *,
        buffer_bytes: int = DEFAULT_BUFFER_BYTES,
        sweep_seconds: float = DEFAULT_SWEEP_SECONDS,
        sink: Sink | None = None,
        emit_events: bool = False,
        police_names: Iterable[str] = (),
    ) -> None:
        self.policy = policy or Policy()
        self.sweep_seconds = sweep_seconds
        self.coalesce_seconds = DEFAULT_COALESCE_SECONDS
        self.sink = sink
        self.emit_events = emit_events
        self.police_names = frozenset(police_names)
        self.table = ProcessTable()
        self.lock = threading.RLock()
        self.resyncs = 0
        self.detections = collections.Counter[str]()
        self.started = time.monotonic()
        self._owners: collections.Counter[int] = collections.Counter()
        self._pending: dict[int, Pending] = {}
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.source = EventSource(buffer_bytes)

    # -- what is watched ---------------------------------------------------------------

    def watch_cage(
        self, job_id: str, cgroup_dirs: dict[str, str], *, owner_pid: int | None = None
    ) -> Tree:
        """Follow a cage: seeded from its cgroups now; ``owner_pid``'s children join at exec."""
        with self.lock:
            tree = self._new_tree(job_id, cgroup_dirs=dict(cgroup_dirs))
            tree.rel_paths = membership.relative_paths(tree.cgroup_dirs)
            if owner_pid is not None:
                self._owners[owner_pid] += 1
            _, anywhere = membership.members(tree.cgroup_dirs)
            for pid in anywhere:
                self._adopt(tree, pid)
            return tree

    def watch_daemon(self, pid: int, job_id: str | None = None) -> Tree | None:
        """Police a batch system's per-job daemon's tree (no cgroup); None if it is gone."""
        with self.lock:
            name = procfs.comm(pid)
            if name is None:
                return None
            tree = self._new_tree(job_id or f"{name}:{pid}")
            tree.root_pid = pid
            tree.job_uid = 0
            snapshot = membership.process_tree()
            for member in sorted(membership.descendants({pid}, snapshot)):
                self._adopt(tree, member)
            return tree

    def _new_tree(self, job_id: str, **fields: Any) -> Tree:
        tree = Tree(job_id, **fields)
        tree.lost_base = self.source.events_lost
        tree.overflow_base = self.source.overflows
        return self.table.add_tree(tree)

    def unwatch(self, job_id: str, owner_pid: int | None = None) -> dict[str, Any] | None:
        """Stop following a tree; its summary, with every event queued until now applied."""
        with self.lock:
            self.process_pending()
            tree = self.table.trees.get(job_id)
            if tree is None:
                return None
            summary = self.summary(tree)
            self.table.remove_tree(job_id)
            if owner_pid is not None and self._owners[owner_pid] > 0:
                self._owners[owner_pid] -= 1
                if not self._owners[owner_pid]:
                    del self._owners[owner_pid]
            return summary

    def summary(self, tree: Tree) -> dict[str, Any]:
        """The usage record's watcher fields for ``tree``."""
        lost = self.source.events_lost - tree.lost_base
        overflows = self.source.overflows - tree.overflow_base
        return {
            "processes_started": tree.processes_started,
            "execs": tree.execs,
            "max_processes": tree.max_processes,
            # a lower bound: an overflow is at least one event, the gap says how many
            "events_lost": max(lost, overflows),
            "detections": tuple(tree.detections),
        }

    def live_summary(self, job_id: str) -> dict[str, Any] | None:
        with self.lock:
            self.process_pending()
            tree = self.table.trees.get(job_id)
            return self.summary(tree) if tree is not None else None

    def claim(self, job_id: str, pid: int) -> None:
        """``pid`` was started in the cage by its owner: it and what it forked are the job's.

        Its events may still be queued or already applied as *pending* (an owner's child
        that has not yet been matched to a cage): either way it joins, counted once.
        """
        with self.lock:
            self.process_pending()
            tree = self.table.trees.get(job_id)
            if tree is None or pid in tree.procs:
                return
            if pid in self._pending:
                self._claim(tree, pid)
            else:
                self._adopt(tree, pid)

    def _claim(self, tree: Tree, root: int, *, adopted: bool = False) -> None:
        """``root`` and its pending descendants join ``tree``; an ``adopted`` root is in
        it already (a scan found it, and counted it)."""
        kids: dict[int, list[int]] = {}
        for pid, pending in self._pending.items():
            kids.setdefault(pending.proc.ppid, []).append(pid)
        stack = [root]
        while stack:
            pid = stack.pop()
            pending = self._pending.pop(pid, None)
            if pending is None:
                continue
            stack.extend(kids.get(pid, ()))
            tree.execs += pending.execs
            if adopted and pid == root:
                continue
            if pending.exited:
                tree.processes_started += 1
                continue
            proc = membership.describe(pid) or pending.proc
            proc.ppid = pending.proc.ppid
            if tree.job_uid is None:
                tree.job_uid = proc.ruid if proc.ruid is not None else proc.uid
            self.table.add(tree, proc)
            self._check_privilege(tree, proc)

    def sync(self, job_id: str) -> None:
        """Apply queued events and check the cage against its cgroups now."""
        with self.lock:
            self.process_pending()
            tree = self.table.trees.get(job_id)
            if tree is not None and not tree.policed:
                self._sweep_cage(tree)

    # -- the loop ----------------------------------------------------------------------

    def start(self) -> Watcher:
        self._thread = threading.Thread(target=self.run, name="jobcage-watch", daemon=True)
        self._thread.start()
        return self

    def run(self) -> None:
        """Handle events until :meth:`stop`; sweeps between them."""
        poller = select.poll()
        poller.register(self.source.fileno(), select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        next_sweep = time.monotonic() + self.sweep_seconds
        while not self._stop.is_set():
            wait = max(0.0, next_sweep - time.monotonic())
            poller.poll(wait * 1000)
            with self.lock:
                handled = self.process_pending()
                if time.monotonic() >= next_sweep:
                    self.sweep()
                    next_sweep = time.monotonic() + self.sweep_seconds
            if handled and self.coalesce_seconds:
                # Let events gather: one wake-up per batch instead of one per event
                # (a wake-up costs more than an event), bounded by the kernel buffer.
                self._stop.wait(self.coalesce_seconds)

    def stop(self) -> None:
        self._stop.set()
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        self._thread = None
        with self.lock:
            self.source.close()
            for fd in (self._wake_r, self._wake_w):
                with contextlib.suppress(OSError):
                    os.close(fd)

    def process_pending(self) -> int:
        """Apply everything the socket holds; the number of events applied."""
        n = 0
        with self.lock:
            while True:
                batch = self.source.read()
                if not batch:
                    return n
                for item in batch:
                    if isinstance(item, Loss):
                        self._lost(item)
                    else:
                        n += 1
                        self.handle(item)

    # -- events --------------------------------------------------------------------------

    def handle(self, ev: ProcEvent) -> None:
        kind = ev.kind
        if kind == "fork":
            if ev.pid != ev.tgid:
                return  # a thread
            ppid = ev.parent_tgid
            tree = self.table.owner.get(ppid)  # type: ignore[arg-type]
            if tree is None:
                if ev.tgid in self.table.owner:
                    return  # a sweep found it (and counted it) before this event was read
                if ppid in self._owners or ppid in self._pending:
                    proc = Proc(ev.tgid, ppid, None)  # type: ignore[arg-type]
                    self._pending[ev.tgid] = Pending(proc, time.monotonic())
                return
            child = Proc(ev.tgid, ppid, None)  # type: ignore[arg-type]
            self.table.fork(ppid, child)  # type: ignore[arg-type]
            forks = self.table.count_fork(tree)
            if forks > self.policy.fork_rate_per_second and not tree.rate_reported:
                tree.rate_reported = True
                parent = tree.procs.get(ppid)  # type: ignore[arg-type]
                if parent is not None:
                    self._detect("fork_rate", tree, parent, forks_in_last_second=forks)
            if self.emit_events:
                self._event(ev, tree, child)
            return
        if ev.pid != ev.tgid:
            return  # a thread's own event: its process is what the table follows
        if kind == "exit":
            pending = self._pending.get(ev.tgid)
            if pending is not None:
                pending.exited = True
            tree = self.table.owner.get(ev.tgid)
            proc, orphans = self.table.exit(ev.tgid)
            if tree is not None and proc is not None and self.emit_events:
                self._event(ev, tree, proc, exit_code=ev.exit_code)
            for orphan in orphans:
                self._orphaned(orphan)
            return
        proc = self.table.get(ev.tgid)
        if proc is None:
            if kind == "exec":
                self._exec_unwatched(ev.tgid)
            return
        tree = self.table.owner[ev.tgid]
        if kind == "exec":
            tree.execs += 1
            proc.comm = procfs.comm(proc.pid)
            proc.exe = procfs.exe(proc.pid)
            proc.argv = procfs.argv(proc.pid)
            uid = procfs.euid(proc.pid)
            if uid is not None:
                proc.uid = uid
            self._check_privilege(tree, proc)
            if tree.rel_paths and membership.inside(proc.pid, tree.rel_paths) is False:
                self._escaped(tree, proc)
        elif kind == "uid":
            proc.uid = ev.euid
            self._check_privilege(tree, proc)
        elif kind == "sid":
            proc.setsid = True
        elif kind == "comm":
            proc.comm = ev.comm
        if self.emit_events:
            self._event(ev, tree, proc)

    def _exec_unwatched(self, pid: int) -> None:
        pending = self._pending.get(pid)
        if pending is not None:
            pending.execs += 1
            if pending.proc.ppid in self._owners:
                # An owner's child execs once in its cage (spawn joins before exec).
                for tree in self.table.trees.values():
                    if tree.rel_paths and membership.inside(pid, tree.rel_paths):
                        self._claim(tree, pid)
                        return
        if self.police_names and procfs.comm(pid) in self.police_names:
            self.watch_daemon(pid)

    def _adopt(self, tree: Tree, pid: int) -> Proc | None:
        """A process found by a scan or an owner's exec: counted as started once."""
        if self.table.owner.get(pid) is tree:
            return tree.procs[pid]
        proc = membership.describe(pid)
        if proc is None:
            return None
        if tree.job_uid is None:
            tree.job_uid = proc.ruid if proc.ruid is not None else proc.uid
        self.table.add(tree, proc)
        self._check_privilege(tree, proc)
        if pid in self._pending:
            # Its fork was read while its parent was unmatched: counted now, its pending
            # entry goes, and what it forked meanwhile joins, once each.
            self._claim(tree, pid, adopted=True)
        return proc

    # -- detections ------------------------------------------------------------------------

    def _check_privilege(self, tree: Tree, proc: Proc) -> None:
        if tree.job_uid not in (0, None) and proc.uid == 0 and proc.first_report("privilege"):
            self._detect("privilege", tree, proc, job_uid=tree.job_uid)

    def _escaped(self, tree: Tree, proc: Proc) -> None:
        if proc.first_report("escape"):
            cgroups = procfs.cgroups(proc.pid)
            where = sorted({*cgroups[0].values(), cgroups[1] or ""} - {""}) if cgroups else []
            self._detect("escape", tree, proc, now_in=where)

    def _orphaned(self, proc: Proc) -> None:
        """The parent of ``proc`` exited; the kernel reparented it before saying so."""
        tree = self.table.owner.get(proc.pid)
        st = procfs.stat(proc.pid)
        if tree is None or st is None:
            return  # gone too; its exit event follows
        proc.starttime = st.starttime
        self.table.reparent(proc, st.ppid)
        if self.table.owner.get(st.ppid) is tree:
            return  # a subreaper inside the tree took it
        if (tree.policed or proc.setsid) and proc.first_report("daemonize"):
            self._detect("daemonize", tree, proc, new_parent=st.ppid)

    def _detect(self, kind: str, tree: Tree, proc: Proc, **extra: Any) -> None:
        action = self.policy.action(kind, tree, proc)
        if action == "ignore":
            return
        if proc.exe is None:
            proc.exe = procfs.exe(proc.pid)
        killed = False
        if action == "kill":
            if proc.starttime is None:
                st = procfs.stat(proc.pid)
                proc.starttime = st.starttime if st else None
            killed = procfs.kill(proc.pid, proc.starttime)
        rec = detect.record(kind, tree, proc, action, killed, **extra)
        tree.detections.append(rec)
        self.detections[kind] += 1
        self._emit(rec)

    # -- sweep and resync --------------------------------------------------------------------

    def sweep(self) -> None:
        with self.lock:
            stale = time.monotonic() - PENDING_SECONDS
            for pid in [p for p, v in self._pending.items() if v.since < stale]:
                del self._pending[pid]
            for tree in list(self.table.trees.values()):
                if not tree.policed:
                    self._sweep_cage(tree)
                elif not tree.procs:  # the daemon and all it started are gone
                    summary = self.summary(tree)
                    self.table.remove_tree(tree.job_id)
                    summary["detections"] = len(summary["detections"])
                    self._emit({"type": "summary", "job_id": tree.job_id, **summary})

    def _sweep_cage(self, tree: Tree) -> None:
        every, anywhere = membership.members(tree.cgroup_dirs)
        for pid in anywhere - tree.procs.keys():
            self._adopt(tree, pid)
        for pid in tree.procs.keys() - every:
            proc = tree.procs[pid]
            if membership.inside(pid, tree.rel_paths) is False:
                self._escaped(tree, proc)

    def _lost(self, loss: Loss) -> None:
        self._emit(
            {
                "type": "loss",
                "time": round(time.time(), 6),
                "overflows": self.source.overflows,
                "events_lost": self.source.events_lost,
            }
        )
        self.resync()

    def resync(self) -> None:
        """Rebuild every tree from cgroup.procs and /proc after events were lost."""
        with self.lock:
            self.resyncs += 1
            self._pending.clear()
            snapshot = None
            for tree in list(self.table.trees.values()):
                tree.resyncs += 1
                for pid, proc in list(tree.procs.items()):
                    st = procfs.stat(pid)
                    if st is None or (proc.starttime not in (None, st.starttime)):
                        self.table.drop(pid)  # its exit was among the lost events
                    else:
                        proc.starttime = st.starttime
                        if st.ppid != proc.ppid:
                            self.table.reparent(proc, st.ppid)
                if tree.policed:
                    snapshot = snapshot or membership.process_tree()
                    self._resync_police(tree, snapshot)
                else:
                    self._sweep_cage(tree)
            self._emit({"type": "resync", "time": round(time.time(), 6), "resyncs": self.resyncs})

    def _resync_police(self, tree: Tree, snapshot: dict[int, procfs.Stat]) -> None:
        roots = {tree.root_pid} if tree.root_pid in snapshot else set()
        inside = membership.descendants(roots, snapshot)  # type: ignore[arg-type]
        for pid in inside - tree.procs.keys():
            self._adopt(tree, pid)
        for pid in tree.procs.keys() - inside:
            proc = tree.procs[pid]
            if tree.policed and proc.first_report("daemonize"):
                self._detect("daemonize", tree, proc, new_parent=proc.ppid, after_loss=True)

    # -- output --------------------------------------------------------------------------------

    def _event(self, ev: ProcEvent, tree: Tree, proc: Proc, **extra: Any) -> None:
        self._emit(
            {
                "type": "event",
                "kind": ev.kind,
                **detect.process_fields(tree, proc),
                "time": round(time.time(), 6),
                **extra,
            }
        )

    def _emit(self, rec: dict[str, Any]) -> None:
        if self.sink is not None:
            self.sink(rec)


def json_lines(stream) -> Sink:
    """A sink writing one JSON object a line, flushed (a log shipper tails it)."""

    def write(rec: dict[str, Any]) -> None:
        stream.write(json.dumps(rec, separators=(",", ":")) + "\n")
        stream.flush()

    return write

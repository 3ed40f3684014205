"""Removing what :mod:`.find` found: a dead owner's cage from its record, cgroups and
network objects with no record, and the leftovers of writers killed half-way.

A cage with a record is taken over first (:meth:`StateStore.take_over`), so a second
reaper leaves it alone. A cgroup directory or network object with no record is removed
only while the reaper holds a claim on that job id itself, so a cage that claims the
id a moment later fails cleanly (CageExistsError) instead of losing its objects.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Collection, Iterator
from typing import Any

from ..admin import open_cage_cgroup, open_network, trusted_cgroup_paths, usage_from_record
from ..cgroups import open_backend
from ..cgroups.base import rmdir_if_empty, rmdir_tree
from ..config import Config
from ..errors import CageExistsError, JobCageError
from ..ids import veth_names
from ..records import CageRecord, RecordState, StateStore
from ..usage import Usage
from .bill import write_bill
from .find import orphan_cgroups, orphan_job_id
from .report import ReapedCage


def reap_record(store: StateStore, config: Config, record: CageRecord, reason: str) -> ReapedCage:
    """Kill, account, remove, bill; the record goes last and only if everything went."""
    previous = record.reaped_from
    cage = ReapedCage(record.job_id, reason, previous.pid if previous else None)
    cgroup = None
    try:
        cgroup = open_cage_cgroup(record, config)
        _kill(cgroup, cage)
    except (OSError, JobCageError) as e:
        cage.errors.append(f"killing the processes failed: {e}")
    end = time.time()
    net_counters = _network_side(record, config, cage)
    try:
        cage.usage = _final_usage(record, cgroup, net_counters, end, cage)
    except (OSError, ValueError) as e:
        cage.errors.append(f"reading the final usage failed: {e}")
    if cage.surviving:
        cage.errors.append(
            f"{cage.surviving} process(es) survived SIGKILL (uninterruptible sleep); "
            "the cgroup, network side and record are kept and the next `jobcage reap` retries"
        )
    else:
        with contextlib.suppress(JobCageError):  # untrusted paths failed above already
            cage.removed += remove_cgroup_dirs(trusted_cgroup_paths(record, config), cage)
    billed = record.billed
    if cage.usage is not None and _ran_a_job(record):
        try:
            cage.usage_file = billed = write_bill(store.state_dir, record, reason, cage.usage)
        except OSError as e:
            cage.errors.append(f"saving the final usage failed: {e}")
    if cage.errors:
        # Kept for the next run; this process is its owner only while it runs.
        kept = record.replace(
            state=RecordState.TEARDOWN_FAILED, final_usage=cage.usage, billed=billed
        )
        try:
            store.save(kept)
        except JobCageError as e:
            cage.errors.append(str(e))
    else:
        store.remove(record.job_id)
    return cage


def _ran_a_job(record: CageRecord) -> bool:
    """Whether the cage could have run a job, and so has a bill: not one whose owner
    died building it (spawn comes after create), nor a reaper's own claim on the id of
    objects with no record."""
    return record.reaping is None and record.reaped_from_state not in (
        RecordState.BUILDING,
        RecordState.REAPING,
    )


def _kill(cgroup: Any, cage: ReapedCage) -> None:
    """kill_all, where a process may be left. On v1 every process of a cage is in its
    freezer cgroup, which can only have been removed empty: with it gone (an owner
    killed half-way through removing the directories), nothing is left to kill."""
    if cgroup is None or (cgroup.version == 1 and "freezer" not in cgroup.paths):
        return
    result = cgroup.kill_all()
    cage.killed, cage.surviving = result.killed, result.surviving


def _network_side(record: CageRecord, config: Config, cage: ReapedCage) -> Any:
    """The network side's final counters, and the side removed (kept with survivors)."""
    try:
        net = open_network(record, config)
        if net is None:
            return None
        if cage.surviving:
            # The survivors hold the netns, its veth and address: all kept till they go.
            return net.counters()
        if record.reaped_from_state is RecordState.TEARING_DOWN:
            # The owner died removing it: its rules (and counts) may be gone already.
            # The bill then says None for the network, never a made-up 0.
            try:
                counters = net.counters()
            except JobCageError:
                counters = None
            net.destroy(read_counters=False)
            cage.removed.append("network side")
            return counters
        counters = net.destroy()
        cage.removed.append("network side")
        return counters
    except (JobCageError, OSError) as e:
        cage.errors.append(f"removing the network side failed: {e}")
        return None


def _final_usage(
    record: CageRecord, cgroup: Any, net_counters: Any, end: float, cage: ReapedCage
) -> Usage:
    if record.final_usage is not None:
        # The owner read it at its own teardown; only the kill count grew since.
        killed = (record.final_usage.processes_killed or 0) + cage.killed
        return Usage.from_dict(
            {
                **record.final_usage.to_dict(),
                "processes_killed": killed,
                "processes_surviving": cage.surviving,
            }
        )
    return usage_from_record(
        record,
        cgroup,
        net_counters,
        end_unix=end,
        processes_killed=cage.killed,
        processes_surviving=cage.surviving,
    )


def remove_cgroup_dirs(paths: dict[str, str], cage: ReapedCage) -> list[str]:
    """rmdir each cage directory, then its parent if no other cage lives there.

    The parent is tried even where the cage's own directory is missing: an owner
    killed between making the parent and the cage directory left it empty.
    """
    removed = []
    for path in paths.values():
        if os.path.isdir(path):
            try:
                rmdir_tree(path)
                removed.append(path)
            except OSError as e:
                cage.errors.append(f"removing {path} failed: {e.strerror}")
                continue
        with contextlib.suppress(OSError):
            rmdir_if_empty(os.path.dirname(path))
    return removed


@contextlib.contextmanager
def claimed(store: StateStore, job_id: str, reason: str) -> Iterator[bool]:
    """Hold the record of ``job_id`` ourselves; yields False if someone else holds it."""
    record = store.new_record(job_id, state=RecordState.REAPING, reaping=reason)
    try:
        store.claim(record)
    except CageExistsError:
        yield False
        return
    try:
        yield True
    finally:
        store.remove(job_id)


def reap_orphan_cgroups(
    store: StateStore, config: Config, parents: dict[str, str], dry_run: bool
) -> list[ReapedCage]:
    # A record left in place although bad (a newer format's) still takes its job id.
    good, bad = store.scan()
    recorded = {r.job_id for r in good} | {b.job_id for b in bad if b.job_id}
    out = []
    for job_id, paths in sorted(orphan_cgroups(parents, recorded).items()):
        cage = ReapedCage(job_id, "no-record")
        if dry_run:
            cage.removed = sorted(paths.values())
            out.append(cage)
            continue
        with claimed(store, job_id, "no-record") as ours:
            if not ours:
                continue  # a cage claimed this id since we looked: it is live
            # A cage being destroyed removes its cgroups, then its record: seen half-way
            # through, its directories are gone by the time its record is.
            paths = {c: p for c, p in paths.items() if os.path.isdir(p)}
            if not paths:
                continue
            try:
                version = "2" if "unified" in paths else "1"
                _kill(open_backend(config.replace(cgroup_version=version)).open(paths), cage)
            except (OSError, JobCageError) as e:
                cage.errors.append(f"killing the processes failed: {e}")
            if not cage.surviving:
                cage.removed += remove_cgroup_dirs(paths, cage)
        out.append(cage)
    return out


def reap_orphan_network(
    store: StateStore, config: Config, dry_run: bool, reaped: Collection[str] = ()
) -> list[ReapedCage]:
    """Network objects with JobCage's names and no record (``jobcage.network.find_orphans``).

    find_orphans reads the records, then the kernel. An object listed by a first call
    and again by a second existed before the second read the records, and no record
    named it then; a cage's record outlives its objects, so the object is no live
    cage's. netns and leases carry the job id and are removed under a claim on it,
    like cgroups. veths and chains carry only a hash of it.

    The veths of the cages ``reaped`` by this run are left out: the kernel deletes a
    veth with its netns, after the netns' last process is gone, in its own time.
    """
    from .. import network

    first = network.find_orphans(config)
    again = set(network.find_orphans(config))
    going = {veth_names(job_id)[0] for job_id in reaped}
    failed: set[str] = set()  # jobs (by hash) with an object that would not go
    out = []
    for orphan in first:  # leases come last
        if orphan not in again or (orphan.kind == "veth" and orphan.name in going):
            continue
        job_id = orphan_job_id(orphan, config)
        cage = ReapedCage(job_id or f"{orphan.kind}:{orphan.name}", "no-record")
        cage.removed.append(f"{orphan.kind} {orphan.name}")
        if orphan.kind == "lease" and orphan.cage in failed:
            # Released, it would leave the job's veth or rules to no state dir.
            cage.errors.append(
                f"lease {orphan.name} kept: the job's other objects could not be removed "
                "(see above); run `jobcage reap` again"
            )
            cage.removed.clear()
        elif not dry_run:
            if job_id is None:
                _remove_network_orphan(orphan, config, cage)
            else:
                with claimed(store, job_id, "no-record") as ours:
                    if not ours:
                        continue  # a cage claimed this id since: it is live
                    _remove_network_orphan(orphan, config, cage)
            if cage.errors and orphan.cage:
                failed.add(orphan.cage)
        out.append(cage)
    return out


def _remove_network_orphan(orphan: Any, config: Config, cage: ReapedCage) -> None:
    from .. import network

    try:
        network.remove_orphan(orphan, config)
    except (OSError, JobCageError) as e:
        cage.errors.append(f"removing {orphan.kind} {orphan.name} failed: {e}")
        cage.removed.clear()


def remove_leftovers(paths: list[str], parents: dict[str, str]) -> list[str]:
    """Remove stale temporary files and the empty JobCage parents; what went."""
    removed = []
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
            removed.append(path)
    for parent in sorted(parents):
        with contextlib.suppress(OSError):
            rmdir_if_empty(parent)
            if not os.path.isdir(parent):
                removed.append(parent)
    return removed

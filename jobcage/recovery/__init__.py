"""Crash recovery (``jobcage reap``): remove every cage whose owner is dead, and
anything half-built. :mod:`.find` finds, :mod:`.remove` removes, :mod:`.bill` bills.

``jobcage reap`` runs from cron or at boot, at any time, beside live cages being built
and destroyed by other processes. It rests on two facts of :mod:`jobcage.records`:

* a cage claims its record (link(2), exclusive) *before* it creates any kernel object,
  and removes the record *last*; so while a record exists no other cage of that job id
  can be built, and a kernel object with no record belongs to no live cage;
* the owner is identified by pid *and* start time, so a dead owner never comes back.

A record is input: one that cannot be believed is reported and moved to
``cages/bad/``, and reap acts only on names it derives itself from a valid job id
under its own cgroup parents and netns naming, never on a path a record names. What a
set-aside record's cage left is then found as objects with no record; so a damaged
record that still names a running owner stays, or that owner's job would be killed.

An owner killed inside ``NetworkCage.create`` leaves ``network: null`` in its record
while a netns and lease may exist: they carry the job id, and the network orphan pass,
which runs after the record is gone, removes them. After everything, the temporary
files of writers killed half-way and the empty JobCage parents go too: one reap after
any crash leaves nothing.
"""

from __future__ import annotations

from ..config import Config
from ..errors import JobCageError
from ..records import StateStore, owner_alive
from ..records.store import BadRecord
from .bill import USAGE_DIR, usage_dir
from .find import had_network, parent_dirs, reap_reason, stale_temp_files, untrusted_reason
from .remove import (
    reap_orphan_cgroups,
    reap_orphan_network,
    reap_record,
    remove_leftovers,
)
from .report import ReapedCage, ReapReport, SetAside

REAP_LOCK = "reap.lock"

__all__ = ["REAP_LOCK", "USAGE_DIR", "ReapReport", "ReapedCage", "SetAside", "reap"]


def reap(config: Config, *, dry_run: bool = False) -> ReapReport:
    """Remove dead owners' cages, then objects that carry JobCage's names and no record;
    then put back the rules of live cages that lost them (a firewall reload)."""
    store = StateStore(config.state_dir)
    report = ReapReport(dry_run=dry_run)
    records, bad = store.scan()
    believed = []
    for record in records:
        why = untrusted_reason(record, config)
        if why is None:
            believed.append(record)
        elif reap_reason(record) is None:
            report.live += 1  # a live owner's, built under another parent: left alone
            report.other_errors.append(f"{store.path(record.job_id)}: {why}")
        else:
            bad.append(BadRecord(store.path(record.job_id), record.job_id, why))
    for b in bad:
        _set_aside(store, b, report)
    for record in believed:
        reason = reap_reason(record)
        if reason is None:
            report.live += 1
            continue
        if dry_run:
            report.cages.append(_planned(record, reason))
            continue
        taken = store.take_over(record.job_id, lambda r: reap_reason(r) is not None, REAP_LOCK)
        if taken is None:
            report.live += 1
            continue
        report.cages.append(reap_record(store, config, taken, reason))
    reaped = {c.job_id for c in report.cages}
    parents = parent_dirs(config, believed)
    report.cages += reap_orphan_cgroups(store, config, parents, dry_run)
    if had_network(config):
        report.cages += reap_orphan_network(store, config, dry_run, reaped)
    if not dry_run and had_network(config):
        # The live cages' rules, after a firewall reload: this is the hook's command.
        from ..network.restore import restore_lost

        report.restored, restore_errors = restore_lost(config)
        report.other_errors += restore_errors
    if not dry_run:
        stale = stale_temp_files(store.cages_dir) + stale_temp_files(usage_dir(config.state_dir))
        report.removed_files += remove_leftovers(stale, parents)
    return report


def _set_aside(store: StateStore, bad: BadRecord, report: ReapReport) -> None:
    if bad.newer:
        report.other_errors.append(str(bad))
        return
    if bad.owner is not None and owner_alive(bad.owner):
        # Set aside, its cage would be reaped as unrecorded under a running owner.
        report.live += 1
        report.other_errors.append(
            f"{bad}; left in place with its cage while its owner (pid {bad.owner.pid}) "
            "runs: the owner rewrites it as it goes, or a later reap sets it aside"
        )
        return
    if report.dry_run:
        report.set_aside.append(SetAside(bad.path, bad.reason, None))
        return
    try:
        report.set_aside.append(SetAside(bad.path, bad.reason, store.set_aside(bad)))
    except JobCageError as e:
        report.other_errors.append(f"{bad}; and it could not be moved aside: {e}")


def _planned(record, reason: str) -> ReapedCage:
    import os

    cage = ReapedCage(record.job_id, reason, record.owner.pid)
    if record.cgroup is not None:
        cage.removed = [p for p in record.cgroup.paths.values() if os.path.isdir(p)]
    if record.network is not None:
        cage.removed.append("network side (netns, veth, rules, address)")
    return cage

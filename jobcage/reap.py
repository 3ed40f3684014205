"""Crash recovery: remove every cage whose owner is dead, and anything half-built.

``jobcage reap`` runs from cron or at boot, at any time, beside live cages being built
and destroyed by other processes. It rests on two facts of :mod:`jobcage.state`:

* a cage claims its record (O_EXCL) *before* it creates any kernel object, and removes
  the record *last*; so while a record exists no other cage of that job id can be
  built, and a kernel object with no record belongs to no live cage;
* the owner is identified by pid *and* start time, so a dead owner never comes back.

A dead owner's cage is taken over under the reap lock: the reaper rewrites the record
with itself as the owner (state ``reaping``) before touching anything, so a second
reaper run concurrently leaves it alone, and a reaper that dies half-way leaves a
record a later run picks up again. A cgroup directory with no record is removed only
while the reaper holds a claim on that job id itself, so a cage that claims the id a
moment later fails cleanly (CageExistsError) instead of losing its cgroup.

An owner killed inside ``NetworkCage.create`` leaves ``network: null`` in its record
while a netns and lease may exist: they carry the job id, and the network orphan pass,
which runs after the record is gone, removes them.

The final usage of a reaped cage is saved to ``<state_dir>/usage/<job id>.json``: the
batch system never got it from the dead owner, and an accounting job can pick it up.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

from .admin import (
    STATE_REAPING,
    STATE_TEARDOWN_FAILED,
    open_cage_cgroup,
    open_network,
    record_cgroup_paths,
    usage_from_record,
)
from .cgroups import open_backend
from .cgroups.base import rmdir_if_empty, rmdir_tree
from .config import Config
from .errors import CageExistsError, InvalidJobIdError, JobCageError
from .ids import NAME_PREFIX, validate_job_id, veth_names
from .state import StateStore, owner_alive, process_start_ticks
from .usage import Usage

REAP_LOCK = "reap.lock"
USAGE_DIR = "usage"
# A record file that is not valid JSON was claimed (O_EXCL) and not yet written: the
# owner is between open() and write(), or died there. Only once it is this old is
# it taken for dead; a live owner writes it within microseconds of the claim.
STALE_CLAIM_SECONDS = 60.0


@dataclass
class ReapedCage:
    job_id: str
    reason: str  # why it was reaped: "owner-dead", "teardown-failed", "no-record"
    owner_pid: int | None = None
    killed: int = 0
    surviving: int = 0
    usage_file: str | None = None
    usage: Usage | None = None
    removed: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "job_id": self.job_id,
            "reason": self.reason,
            "owner_pid": self.owner_pid,
            "killed": self.killed,
            "surviving": self.surviving,
            "usage_file": self.usage_file,
            "usage": self.usage.to_dict() if self.usage else None,
            "removed": self.removed,
            "errors": self.errors,
        }


@dataclass
class ReapReport:
    dry_run: bool
    cages: list[ReapedCage] = field(default_factory=list)
    # Cages left alone because their owner is alive (counted, to say so).
    live: int = 0
    # Live cages whose rules were gone (`nft flush ruleset`, a firewall reload) and
    # were put back; their usage says the counts have a gap.
    restored: list[str] = field(default_factory=list)
    restore_errors: list[str] = field(default_factory=list)

    @property
    def errors(self) -> list[str]:
        return [f"{c.job_id}: {e}" for c in self.cages for e in c.errors] + self.restore_errors

    def to_dict(self) -> dict[str, Any]:
        return {
            "dry_run": self.dry_run,
            "live": self.live,
            "restored": self.restored,
            "cages": [c.to_dict() for c in self.cages],
        }


def reap(config: Config, *, dry_run: bool = False) -> ReapReport:
    """Remove dead owners' cages, then objects that carry JobCage's names and no record;
    then put back the rules of live cages that lost them (a firewall reload)."""
    store = StateStore(config.state_dir)
    report = ReapReport(dry_run=dry_run)
    for record in store.records():
        job_id = str(record.get("job_id"))
        reason = _reap_reason(store, record)
        if reason is None:
            report.live += 1
            continue
        if dry_run:
            report.cages.append(_planned(record, reason))
            continue
        taken = _take_over(store, job_id)
        if taken is None:
            report.live += 1
            continue
        report.cages.append(_reap_record(store, config, taken, reason))
    reaped = {c.job_id for c in report.cages}
    report.cages += _reap_orphan_cgroups(store, config, dry_run)
    report.cages += _reap_orphan_network(store, config, dry_run, reaped)
    if not dry_run and os.path.isdir(os.path.join(config.state_dir, NETWORK_STATE_DIR)):
        # The live cages' rules, after a firewall reload: this is the hook's command.
        from .network.restore import restore_lost

        report.restored, report.restore_errors = restore_lost(config)
    return report


# -- cages with a record ---------------------------------------------------------------


def _reap_reason(store: StateStore, record: dict[str, Any]) -> str | None:
    """Why this record's cage is ours to remove, or None if it belongs to someone alive."""
    if record.get("state") == STATE_TEARDOWN_FAILED:
        # The owner's destroy() has given up on it (processes outlived every kill
        # pass) and will never come back to it, alive or not.
        return "teardown-failed"
    if owner_alive(record):
        return None
    if record.get("owner_pid") is None and _claim_age(store, str(record.get("job_id"))) < (
        STALE_CLAIM_SECONDS
    ):
        return None  # claimed a moment ago and still being written
    return "owner-dead"


def _claim_age(store: StateStore, job_id: str) -> float:
    try:
        return time.time() - os.stat(store._path(job_id)).st_mtime
    except FileNotFoundError:
        return 0.0


def _take_over(store: StateStore, job_id: str) -> dict[str, Any] | None:
    """Make this process the record's owner, if the cage is still reapable."""
    with store.lock(REAP_LOCK):
        record = store.load_or_none(job_id)
        if record is None or _reap_reason(store, record) is None:
            return None
        me = os.getpid()
        record["reaped_from"] = {
            "owner_pid": record.get("owner_pid"),
            "owner_start_ticks": record.get("owner_start_ticks"),
            "state": record.get("state"),
        }
        record["owner_pid"] = me
        record["owner_start_ticks"] = process_start_ticks(me)
        record["state"] = STATE_REAPING
        record["job_id"] = job_id
        store.save(record)
        return record


def _planned(record: dict[str, Any], reason: str) -> ReapedCage:
    pid = record.get("owner_pid")
    cage = ReapedCage(str(record.get("job_id")), reason, pid if isinstance(pid, int) else None)
    cage.removed = [p for p in record_cgroup_paths(record).values() if os.path.isdir(p)]
    if record.get("network"):
        cage.removed.append("network side (netns, veth, rules, address)")
    return cage


def _reap_record(
    store: StateStore, config: Config, record: dict[str, Any], reason: str
) -> ReapedCage:
    """Kill, account, remove; the record goes last and only if everything else went."""
    previous = record.get("reaped_from") or {}
    job_id = record["job_id"]
    cage = ReapedCage(job_id, reason, previous.get("owner_pid"))
    cgroup = None
    try:
        cgroup = open_cage_cgroup(record, config)
    except JobCageError as e:
        cage.errors.append(str(e))
    if cgroup is not None:
        try:
            result = cgroup.kill_all()
            cage.killed, cage.surviving = result.killed, result.surviving
        except OSError as e:
            cage.errors.append(f"killing the processes failed: {e}")
    end = time.time()
    net_counters = None
    try:
        net = open_network(record, config)
        if net is not None and cage.surviving:
            # The survivors hold the netns, its veth and address: all kept till they go.
            net_counters = net.counters()
        elif net is not None:
            net_counters = net.destroy()
            cage.removed.append("network side")
    except (ImportError, JobCageError, OSError) as e:
        cage.errors.append(f"removing the network side failed: {e}")
    try:
        cage.usage = _final_usage(record, cgroup, net_counters, end, cage)
    except (OSError, ValueError) as e:
        cage.errors.append(f"reading the final usage failed: {e}")
    if cage.usage is not None:
        try:
            cage.usage_file = save_usage(store, record, cage)
        except OSError as e:
            cage.errors.append(f"saving the final usage failed: {e}")
    if cage.surviving:
        cage.errors.append(
            f"{cage.surviving} process(es) survived SIGKILL (uninterruptible sleep); "
            "the cgroup, network side and record are kept and the next `jobcage reap` retries"
        )
    else:
        cage.removed += _remove_cgroup_dirs(record_cgroup_paths(record), cage)
    if cage.errors:
        # Keep the record for the next run; this process is its owner only while it runs.
        record["state"] = STATE_TEARDOWN_FAILED
        if cage.usage is not None:
            record["final_usage"] = cage.usage.to_dict()
        with contextlib.suppress(OSError):
            store.save(record)
    else:
        store.remove(job_id)
    return cage


def _final_usage(
    record: dict[str, Any], cgroup: Any, net_counters: Any, end: float, cage: ReapedCage
) -> Usage:
    earlier = record.get("final_usage")
    if isinstance(earlier, dict):
        # The owner read it at its own teardown; only the kill count grew since.
        usage = Usage.from_dict(earlier)
        killed = (usage.processes_killed or 0) + cage.killed
        return Usage.from_dict(
            {**usage.to_dict(), "processes_killed": killed, "processes_surviving": cage.surviving}
        )
    return usage_from_record(
        record,
        cgroup,
        net_counters,
        end_unix=end,
        processes_killed=cage.killed,
        processes_surviving=cage.surviving,
    )


def save_usage(store: StateStore, record: dict[str, Any], cage: ReapedCage) -> str:
    """Write ``{"job_id", "reaped", ..., "usage"}`` beside the records; never overwrite."""
    directory = os.path.join(store.state_dir, USAGE_DIR)
    os.makedirs(directory, mode=0o755, exist_ok=True)
    previous = record.get("reaped_from") or {}
    document = {
        "format": 1,
        "job_id": cage.job_id,
        "reaped": True,
        "reason": cage.reason,
        "owner_pid": previous.get("owner_pid"),
        "created_unix": record.get("created_unix"),
        "reaped_unix": time.time(),
        "exit_status": None,
        "usage": cage.usage.to_dict() if cage.usage else None,
    }
    path = os.path.join(directory, f"{cage.job_id}.json")
    n = 1
    while os.path.exists(path):
        path = os.path.join(directory, f"{cage.job_id}.{n}.json")
        n += 1
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write(json.dumps(document, separators=(",", ":")) + "\n")
    os.replace(tmp, path)
    return path


def _remove_cgroup_dirs(paths: dict[str, str], cage: ReapedCage) -> list[str]:
    """rmdir each cage directory, then its parent if no other cage lives there."""
    removed = []
    for path in paths.values():
        if not os.path.isdir(path):
            continue
        try:
            rmdir_tree(path)
            removed.append(path)
        except OSError as e:
            cage.errors.append(f"removing {path} failed: {e.strerror}")
            continue
        with contextlib.suppress(OSError):
            rmdir_if_empty(os.path.dirname(path))
    return removed


# -- objects with JobCage's names and no record --------------------------------------


@contextlib.contextmanager
def _claimed(store: StateStore, job_id: str, reason: str):
    """Hold the record of ``job_id`` ourselves; yields False if someone else holds it."""
    record = store.new_record(job_id, state=STATE_REAPING, reaping=reason)
    try:
        store.claim(record)
    except CageExistsError:
        yield False
        return
    try:
        yield True
    finally:
        store.remove(job_id)


def _parent_dirs(config: Config, store: StateStore) -> dict[str, str]:
    """parent dir -> controller, for every parent cages may live under.

    This config's parents, and those of every record: a reaper run from cron sits in
    another cgroup than the batch system, and with the default parent (the caller's
    own cgroup) their parents differ.
    """
    named: list[tuple[str, str]] = []
    try:
        backend = open_backend(config)
    except JobCageError:
        backend = None
    if backend is not None:
        named += [(c, p) for c, p in getattr(backend, "parents", {}).items()]
        if getattr(backend, "parent", None):
            named.append(("unified", backend.parent))
    for record in store.records():
        named += [(c, os.path.dirname(p)) for c, p in record_cgroup_paths(record).items()]
    # Co-mounted v1 controllers (cpu,cpuacct) share one directory: name it after the
    # controller a cage uses, so stats and the freezer are found under that key.
    preferred = {c: i for i, c in enumerate(("freezer", *config.cgroup_controllers))}
    named.sort(key=lambda cp: preferred.get(cp[0], len(preferred)))
    parents: dict[str, str] = {}
    for controller, parent in named:
        # Only a parent that carries JobCage's name is scanned: everything in it is a
        # cage. A site whose cgroup_parent is, say, "/batch" shares it with others,
        # and a directory there without a record may well not be ours.
        if os.path.basename(parent).startswith(NAME_PREFIX) and os.path.isdir(parent):
            parents.setdefault(parent, controller)
    return parents


def _orphan_cgroups(config: Config, store: StateStore) -> dict[str, dict[str, str]]:
    """job id -> {controller: dir} for every cage directory that has no record now."""
    found: dict[str, dict[str, str]] = {}
    for parent, controller in sorted(_parent_dirs(config, store).items()):
        with contextlib.suppress(FileNotFoundError):
            for entry in os.scandir(parent):
                if not entry.is_dir(follow_symlinks=False):
                    continue
                try:
                    validate_job_id(entry.name)
                except InvalidJobIdError:
                    continue
                found.setdefault(entry.name, {})[controller] = entry.path
    return {name: paths for name, paths in found.items() if store.load_or_none(name) is None}


def _reap_orphan_cgroups(store: StateStore, config: Config, dry_run: bool) -> list[ReapedCage]:
    out = []
    for job_id, paths in sorted(_orphan_cgroups(config, store).items()):
        cage = ReapedCage(job_id, "no-record")
        if dry_run:
            cage.removed = sorted(paths.values())
            out.append(cage)
            continue
        with _claimed(store, job_id, "no-record") as ours:
            if not ours:
                continue  # a cage claimed this id since we looked: it is live
            # A cage being destroyed removes its cgroups, then its record: seen half-way
            # through, its directories are gone by the time its record is.
            paths = {c: p for c, p in paths.items() if os.path.isdir(p)}
            if not paths:
                continue
            try:
                cgroup = open_cage_cgroup(
                    {"cgroup": {"version": 2 if "unified" in paths else 1, "paths": paths}},
                    config,
                )
                if cgroup is not None and (cgroup.version == 2 or "freezer" in paths):
                    result = cgroup.kill_all()
                    cage.killed, cage.surviving = result.killed, result.surviving
            except (OSError, JobCageError) as e:
                cage.errors.append(f"killing the processes failed: {e}")
            if not cage.surviving:
                cage.removed += _remove_cgroup_dirs(paths, cage)
        out.append(cage)
    return out


def _reap_orphan_network(
    store: StateStore, config: Config, dry_run: bool, reaped: Collection[str] = ()
) -> list[ReapedCage]:
    """Network objects with JobCage's names and no record (``jobcage.network.find_orphans``).

    Only for a state dir that has held a networked cage (its ``network/`` dir exists,
    made by the first lease): node-wide names such as /run/netns/jobcage-* are seen from
    every state dir, and one that never held a network cage owns none of them.

    find_orphans reads the records, then the kernel. An object listed by a first call
    and again by a second existed before the second read the records, and no record
    named it then; a cage's record outlives its objects, so the object is no live
    cage's. netns and leases carry the job id and are removed under a claim on it,
    like cgroups. veths and chains carry only a hash of it.

    The veths of the cages ``reaped`` by this run are left out: the kernel deletes a
    veth with its netns, after the netns' last process is gone, in its own time.
    """
    if not os.path.isdir(os.path.join(config.state_dir, NETWORK_STATE_DIR)):
        return []
    try:
        from . import network
    except ImportError:
        return []
    first = network.find_orphans(config)
    again = set(network.find_orphans(config))
    going = {veth_names(job_id)[0] for job_id in reaped}
    failed: set[str] = set()  # jobs (by hash) with an object that would not go
    out = []
    for orphan in first:  # leases come last
        if orphan not in again or (orphan.kind == "veth" and orphan.name in going):
            continue
        job_id = _orphan_job_id(orphan, config)
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
                with _claimed(store, job_id, "no-record") as ours:
                    if not ours:
                        continue  # a cage claimed this id since: it is live
                    _remove_network_orphan(orphan, config, cage)
            if cage.errors and getattr(orphan, "cage", ""):
                failed.add(orphan.cage)
        out.append(cage)
    return out


NETWORK_STATE_DIR = "network"


def _orphan_job_id(orphan: Any, config: Config) -> str | None:
    if orphan.kind == "netns":
        return orphan.name.removeprefix(f"{NAME_PREFIX}-")
    if orphan.kind == "lease":
        from .network.addresses import AddressPool, LeaseStore

        return (
            LeaseStore(config.state_dir, AddressPool(config.address_pool))
            .held()
            .get(int(orphan.name))
        )
    return None


def _remove_network_orphan(orphan: Any, config: Config, cage: ReapedCage) -> None:
    """HOOK: netns and leases are removed here; veths, chains and the shared chains
    need ``jobcage.network.remove_orphan(orphan, config)``, which the network side is
    asked to provide (only it knows its chains' jumps). Until then they are reported.
    """
    from . import network

    try:
        remover = getattr(network, "remove_orphan", None)
        if remover is not None:
            remover(orphan, config)
        elif orphan.kind == "netns":
            from .network import netns, resolv

            netns.remove(orphan.name)
            resolv.remove_resolv_conf(orphan.name)
        elif orphan.kind == "lease":
            from .network.addresses import AddressPool, LeaseStore

            LeaseStore(config.state_dir, AddressPool(config.address_pool)).release(
                int(orphan.name), cage.job_id
            )
        else:
            raise JobCageError(
                f"{orphan.kind} {orphan.name} has no cage record; this version cannot remove "
                "it: delete it by hand (ip link del / iptables-legacy -X)"
            )
    except (OSError, JobCageError) as e:
        cage.errors.append(f"removing {orphan.kind} {orphan.name} failed: {e}")
        cage.removed.clear()

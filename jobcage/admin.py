"""Looking at and acting on cages owned by other processes, from their records.

``jobcage list``, ``stats``, ``kill`` and ``reap`` run in a process that did not build
the cage, so everything here starts from the on-disk record (see :mod:`jobcage.records`)
and reopens the kernel objects it names: the cgroup directories through the backend
that made them, the network side through ``NetworkCage.from_record``. Nothing is
polled from /proc except the owner's liveness.
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass
from typing import Any

from .cgroups import CageCgroup, open_backend
from .config import Config
from .errors import CageStateError, JobCageError, NotRootError, RecordError
from .ids import validate_job_id
from .records import BadRecord, CageRecord, RecordState, StateStore, owner_alive
from .usage import Usage


@dataclass(frozen=True)
class CageInfo:
    """One line of ``jobcage list``: what the record says plus what the kernel says now."""

    job_id: str
    state: str
    owner_pid: int | None
    owner_alive: bool
    # None when the cgroup is gone or cannot be read (not root, already removed).
    processes: int | None
    age_seconds: float | None
    address: str | None
    cgroup_paths: dict[str, str]
    # Live LAN/WAN counters of a networked cage (NetCounters fields); None for a
    # cgroup-only cage or when its rules cannot be read.
    network: dict[str, int] | None = None

    @property
    def status(self) -> str:
        """The one word an administrator acts on."""
        if self.state == RecordState.TEARDOWN_FAILED.value:
            return "teardown-failed"
        if not self.owner_alive:
            return "orphaned"
        if self.state == RecordState.BUILT.value:
            return "running"
        return self.state  # building, tearing-down, reaping

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["status"] = self.status
        return out


def trusted_cgroup_paths(record: CageRecord, config: Config) -> dict[str, str]:
    """The record's cgroup directories that JobCage itself would make for its job id.

    A record is input: one that names any other directory (a foreign cgroup, a
    sibling's) is refused with RecordError, so that nothing is killed or removed on
    its word. The backend is opened at the version the record was built with.
    """
    if record.cgroup is None:
        return {}
    backend = open_backend(config.replace(cgroup_version=str(record.cgroup.version)))
    for controller, path in record.cgroup.paths.items():
        if not backend.is_cage_dir(controller, path, record.job_id):
            raise RecordError(
                f"the record of job {record.job_id} names the cgroup {path}, which is not "
                f"a JobCage cage directory (<parent>/{record.job_id} under "
                f"{backend.parents().get(controller, 'its parent')}); it is left alone: "
                "check it by hand"
            )
    return dict(record.cgroup.paths)


def open_cage_cgroup(record: CageRecord, config: Config) -> CageCgroup | None:
    """The cage's cgroup(s) as the record names them (checked); None if none is left."""
    paths = {c: p for c, p in trusted_cgroup_paths(record, config).items() if os.path.isdir(p)}
    if not paths:
        return None
    assert record.cgroup is not None
    backend = open_backend(config.replace(cgroup_version=str(record.cgroup.version)))
    return backend.open(paths)


def open_network(record: CageRecord, config: Config) -> Any | None:
    """``NetworkCage.from_record`` for a record with a network side, else None.

    The part's names were checked against the job id when the record was read.
    """
    if record.network is None:
        return None
    from .network import NetworkCage  # imported late: cgroup-only nodes never need it

    return NetworkCage.from_record(record.network.to_dict(record.job_id, config.state_dir), config)


def _network_counters(records: list[CageRecord], config: Config) -> dict[str, Any]:
    """job id -> NetCounters of every networked record, in one read of the rules (a
    per-cage read would copy the whole table once per cage)."""
    cages = []
    for record in records:
        try:
            net = open_network(record, config)
        except JobCageError:
            continue
        if net is not None:
            cages.append(net)
    if not cages:
        return {}
    from .network import read_counters

    try:
        return read_counters(cages)
    except (OSError, JobCageError):
        return {}


def list_cages(config: Config) -> list[CageInfo]:
    return list_cages_and_bad(config)[0]


def list_cages_and_bad(config: Config) -> tuple[list[CageInfo], list[BadRecord]]:
    """Every cage with a record to believe, and the records that cannot be (reap sets
    those aside; listing only reports them)."""
    now = time.time()
    out = []
    records, bad = StateStore(config.state_dir).scan()
    counters = _network_counters(records, config)
    for record in records:
        job_counters = counters.get(record.job_id)
        processes = None
        try:
            cgroup = open_cage_cgroup(record, config)
            if cgroup is not None:
                processes = len(cgroup.pids())
        except (OSError, JobCageError):
            processes = None
        created = record.created_unix
        out.append(
            CageInfo(
                job_id=record.job_id,
                state=record.state.value,
                owner_pid=record.owner.pid,
                owner_alive=owner_alive(record.owner),
                processes=processes,
                age_seconds=round(now - created, 3) if created is not None else None,
                address=record.network.address if record.network else None,
                cgroup_paths=dict(record.cgroup.paths) if record.cgroup else {},
                network=dataclasses.asdict(job_counters) if job_counters is not None else None,
            )
        )
    return out, bad


def usage_from_record(
    record: CageRecord,
    cgroup: CageCgroup | None,
    net_counters: Any | None,
    *,
    end_unix: float | None = None,
    **extra: Any,
) -> Usage:
    """A Usage from the kernel counters of a cage this process did not build.

    The wall time runs from the record's creation, the only start this process
    knows; the owner's own record of a finished job is more exact.
    """
    fields: dict[str, Any] = {}
    if cgroup is not None:
        fields.update(dataclasses.asdict(cgroup.stats()))
    if net_counters is not None:
        fields.update(dataclasses.asdict(net_counters))
    end = end_unix if end_unix is not None else time.time()
    if record.created_unix is not None:
        fields["wall_seconds"] = round(end - record.created_unix, 6)
    fields.update(extra)
    return Usage.from_dict(fields)


def cage_stats(job_id: str, config: Config) -> Usage:
    """Live usage of a cage owned by any process on this node."""
    record = StateStore(config.state_dir).load(validate_job_id(job_id))
    cgroup = open_cage_cgroup(record, config)
    if cgroup is None:
        raise CageStateError(
            f"cage {job_id} has a record but no cgroup (state {record.state.value}); "
            "if its owner is dead, `jobcage reap` removes the record"
        )
    net = open_network(record, config)
    counters = net.counters() if net is not None else None
    return usage_from_record(record, cgroup, counters)


def kill_cage(job_id: str, config: Config) -> int:
    """Kill every process of a cage from outside; returns how many were killed.

    Only the processes go: the owner's wait on its job returns and it finishes the
    teardown itself, so the cage's usage record is still written by the owner.
    """
    if os.geteuid() != 0:
        raise NotRootError("killing a cage's processes needs root: run `jobcage kill` as root")
    record = StateStore(config.state_dir).load(validate_job_id(job_id))
    cgroup = open_cage_cgroup(record, config)
    if cgroup is None:
        return 0
    result = cgroup.kill_all()
    if result.surviving:
        raise JobCageError(
            f"{result.surviving} process(es) of job {job_id} survived SIGKILL "
            "(uninterruptible sleep, often a hung NFS mount); `jobcage reap` retries later"
        )
    return result.killed

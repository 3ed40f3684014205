"""Looking at and acting on cages owned by other processes, from their records.

``jobcage list``, ``stats``, ``kill`` and ``reap`` run in a process that did not build
the cage, so everything here starts from the on-disk record (see :mod:`jobcage.state`)
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
from .errors import CageStateError, JobCageError, NotRootError
from .ids import validate_job_id
from .state import StateStore, owner_alive
from .usage import Usage

# Record states written by JobCage (cage.py) and by the reaper.
STATE_BUILDING = "building"
STATE_BUILT = "built"
STATE_TEARDOWN_FAILED = "teardown-failed"
STATE_REAPING = "reaping"


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
        if self.state == STATE_TEARDOWN_FAILED:
            return "teardown-failed"
        if not self.owner_alive:
            return "orphaned"
        if self.state == STATE_REAPING:
            return "reaping"
        if self.state == STATE_BUILDING:
            return "building"
        return "running"

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["status"] = self.status
        return out


def record_cgroup_paths(record: dict[str, Any]) -> dict[str, str]:
    cgroup = record.get("cgroup") or {}
    paths = cgroup.get("paths") or {}
    return {str(k): str(v) for k, v in paths.items()}


def record_address(record: dict[str, Any]) -> str | None:
    network = record.get("network")
    if isinstance(network, dict) and network.get("address"):
        return str(network["address"])
    return None


def open_cage_cgroup(record: dict[str, Any], config: Config) -> CageCgroup | None:
    """The cage's cgroup(s) as the record names them; None if no directory is left.

    The backend is opened at the version the record was built with, whatever this
    process's config says, since the directories are where the owner made them.
    """
    paths = {c: p for c, p in record_cgroup_paths(record).items() if os.path.isdir(p)}
    if not paths:
        return None
    version = (record.get("cgroup") or {}).get("version")
    if version is None:
        version = 2 if "unified" in paths else 1
    backend = open_backend(config.replace(cgroup_version=str(version)))
    return backend.open(paths)


def open_network(record: dict[str, Any], config: Config) -> Any | None:
    """``NetworkCage.from_record`` for a record with a network side, else None."""
    if not record.get("network"):
        return None
    from .network import NetworkCage  # imported late: cgroup-only nodes never need it

    return NetworkCage.from_record(record["network"], config)


def _network_counters(records: list[dict[str, Any]], config: Config) -> dict[str, Any]:
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
    store = StateStore(config.state_dir)
    now = time.time()
    out = []
    records = list(store.records())
    counters = _network_counters(records, config)
    for record in records:
        job_counters = counters.get(str(record.get("job_id")))
        processes = None
        try:
            cgroup = open_cage_cgroup(record, config)
            if cgroup is not None:
                processes = len(cgroup.pids())
        except (OSError, JobCageError):
            processes = None
        created = record.get("created_unix")
        pid = record.get("owner_pid")
        out.append(
            CageInfo(
                job_id=str(record.get("job_id")),
                state=str(record.get("state")),
                owner_pid=pid if isinstance(pid, int) else None,
                owner_alive=owner_alive(record),
                processes=processes,
                age_seconds=round(now - created, 3) if isinstance(created, int | float) else None,
                address=record_address(record),
                cgroup_paths=record_cgroup_paths(record),
                network=dataclasses.asdict(job_counters) if job_counters is not None else None,
            )
        )
    return out


def usage_from_record(
    record: dict[str, Any],
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
    created = record.get("created_unix")
    end = end_unix if end_unix is not None else time.time()
    if isinstance(created, int | float):
        fields["wall_seconds"] = round(end - created, 6)
    fields.update(extra)
    return Usage.from_dict(fields)


def cage_stats(job_id: str, config: Config) -> Usage:
    """Live usage of a cage owned by any process on this node."""
    record = StateStore(config.state_dir).load(validate_job_id(job_id))
    cgroup = open_cage_cgroup(record, config)
    if cgroup is None:
        raise CageStateError(
            f"cage {job_id} has a record but no cgroup (state {record.get('state')}); "
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

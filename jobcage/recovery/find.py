"""Finding what is reapable: records whose owner is gone, and JobCage-named objects
that no record claims. Read-only; :mod:`.remove` acts on what this finds.

Everything here believes names only where JobCage derives them itself: a cgroup is a
cage's if it is ``<parent>/<valid job id>`` under a JobCage parent; a netns, veth or
rule is judged by :func:`jobcage.network.find_orphans` from the job ids of the leases.
"""

from __future__ import annotations

import contextlib
import os

from ..admin import trusted_cgroup_paths
from ..cgroups import open_backend
from ..config import Config
from ..errors import JobCageError
from ..ids import NAME_PREFIX, is_job_id
from ..records import CageRecord, RecordState, owner_alive
from ..records.owner import pid_alive
from ..records.store import temp_file_writer

NETWORK_STATE_DIR = "network"


def reap_reason(record: CageRecord) -> str | None:
    """Why this record's cage is ours to remove, or None if it belongs to someone alive."""
    if record.state is RecordState.TEARDOWN_FAILED:
        # The owner's destroy() has given up on it (processes outlived every kill
        # pass) and will never come back to it, alive or not.
        return "teardown-failed"
    if owner_alive(record.owner):
        return None
    return "owner-dead"


def untrusted_reason(record: CageRecord, config: Config) -> str | None:
    """Why the record names cgroups JobCage would not have made, or None."""
    try:
        trusted_cgroup_paths(record, config)
    except JobCageError as e:
        return str(e)
    return None


def parent_dirs(config: Config, records: list[CageRecord]) -> dict[str, str]:
    """parent dir -> controller, for every parent cages may live under.

    This config's parents, and those of every record: a reaper run from cron sits in
    another cgroup than the batch system, and with the default parent (the caller's
    own cgroup) their parents differ.
    """
    named: list[tuple[str, str]] = []
    with contextlib.suppress(JobCageError):
        named += list(open_backend(config).parents().items())
    for record in records:
        if record.cgroup is not None:
            named += [(c, os.path.dirname(p)) for c, p in record.cgroup.paths.items()]
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


def orphan_cgroups(parents: dict[str, str], recorded: set[str]) -> dict[str, dict[str, str]]:
    """job id -> {controller: dir} for every cage directory whose id has no record."""
    found: dict[str, dict[str, str]] = {}
    for parent, controller in sorted(parents.items()):
        with contextlib.suppress(FileNotFoundError):
            for entry in os.scandir(parent):
                if not entry.is_dir(follow_symlinks=False):
                    continue
                if not is_job_id(entry.name):
                    continue
                found.setdefault(entry.name, {})[controller] = entry.path
    return {name: paths for name, paths in found.items() if name not in recorded}


def stale_temp_files(directory: str) -> list[str]:
    """Temporary files (``*.json.<pid>.tmp``, ``*.json.<pid>.<n>.claim``) of a writer
    that is dead: it was killed between writing them and renaming or linking them."""
    try:
        names = sorted(os.listdir(directory))
    except FileNotFoundError:
        return []
    return [
        os.path.join(directory, name)
        for name in names
        if (pid := temp_file_writer(name)) is not None and not pid_alive(pid)
    ]


def had_network(config: Config) -> bool:
    """Whether this state dir ever held a networked cage (its ``network/`` dir is made
    by the first lease): node-wide names such as /run/netns/jobcage-* are seen from
    every state dir, and one that never held a network cage owns none of them."""
    return os.path.isdir(os.path.join(config.state_dir, NETWORK_STATE_DIR))


def orphan_job_id(orphan, config: Config) -> str | None:
    """The job id a network orphan carries (netns, lease); None for veths and rules,
    which carry only a hash of it, and for a lease that holds no valid job id (its
    owner killed between creating and writing it, or damage): no cage can claim that."""
    job_id = None
    if orphan.kind == "netns":
        job_id = orphan.name.removeprefix(f"{NAME_PREFIX}-")
    elif orphan.kind == "lease":
        from ..network.addresses import AddressPool, LeaseStore

        job_id = (
            LeaseStore(config.state_dir, AddressPool(config.address_pool))
            .held()
            .get(int(orphan.name))
        )
    return job_id if is_job_id(job_id) else None

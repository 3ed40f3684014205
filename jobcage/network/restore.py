"""Rules found gone, put back; and which cages' counts have a gap because of it.

`nft flush ruleset` (a firewall reload does it) or an x_tables reload removes every
cage's rules and counters at once, and whoever notices first puts them back: the cage's
owner in ``usage()`` or ``destroy()``, another cage's owner, or `jobcage reap` (the
command a site runs from its firewall-reload hook). The counts start again from 0, so
the bill must say so, whichever process restored them: a file
``<state_dir>/network/gaps/<job id>`` holding ``{"gaps": n, "since_unix": t}``, read
with the counters and removed at teardown. A file, not a kernel object, because the
flush that causes a gap removes every kernel object we could mark it with.

Restoring and marking happen under ``<state_dir>/network/gaps.lock``, so two processes
that notice the same flush restore the rules once and count one gap.

Between the flush and its discovery the cages' traffic is neither filtered nor
counted by JobCage (a flush removes the rules that would drop it): how long that is
depends on who looks. Every ``usage()`` and ``destroy()`` looks at its own cage; a
site's firewall-reload hook should run `jobcage reap`, which looks at every live cage
of the state dir (:func:`restore_lost`), and the process watcher may do the same on a
timer. Fail closed: a cage whose rules cannot be put back has its veth set down.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from ..errors import JobCageError, NetworkError, RulesGoneError
from ..ids import netns_name, validate_job_id, veth_names
from ..records import StateStore
from . import netns
from .addresses import locked_file
from .firewall import Firewall, open_firewall
from .firewall.policy import CagePlan

if TYPE_CHECKING:
    from ..config import Config
    from .cage import NetworkCage


class GapStore:
    def __init__(self, state_dir: str) -> None:
        self.dir = os.path.join(state_dir, "network", "gaps")

    def _path(self, job_id: str) -> str:
        return os.path.join(self.dir, validate_job_id(job_id))

    def locked(self) -> contextlib.AbstractContextManager[None]:
        return locked_file(self.dir, self.dir + ".lock")

    def read(self, job_id: str) -> tuple[int, float | None]:
        """(gaps, since when the counts run) of a cage; (0, None) if it never had one."""
        try:
            with open(self._path(job_id), encoding="utf-8") as f:
                data = json.load(f)
            gaps, since = data["gaps"], data["since_unix"]
        except FileNotFoundError:
            return 0, None
        except (OSError, ValueError, KeyError, TypeError):
            # Unreadable: a gap there was, of unknown extent; never claim whole counts.
            return 1, None
        if not isinstance(gaps, int) or not isinstance(since, int | float):
            return 1, None
        return gaps, float(since)

    def add(self, job_id: str, when: float | None = None) -> tuple[int, float]:
        """Count one more gap, the counts running from ``when`` (now); the caller holds
        :meth:`locked`."""
        gaps = self.read(job_id)[0] + 1
        since = time.time() if when is None else when
        path = self._path(job_id)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump({"gaps": gaps, "since_unix": since}, f)
        os.replace(tmp, path)
        return gaps, since

    def remove(self, job_id: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._path(job_id))


def restore_cage_rules(cage: NetworkCage, uplink: Callable[[], str]) -> bool:
    """Put ``cage``'s rules back (of each family it has) if they are gone, and count a
    gap; True if this call did. Fail closed: rules that cannot be put back leave its
    veth down, and raise."""
    from . import ipv6

    parts = [(open_firewall(cage.firewall_backend), cage.plan, cage.pool, uplink)]
    if cage.ipv6 is not None and cage.plan6 is not None:
        uplink6 = lambda: cage.uplink or netns.default_route_interface(socket.AF_INET6)  # noqa: E731
        parts.append((ipv6.firewall(), cage.plan6, cage.ipv6.pool, uplink6))
    gaps = GapStore(cage.state_dir)
    with gaps.locked():
        if not os.path.exists(cage.netns_path):
            return False  # torn down meanwhile (teardown holds this lock)
        gone = [part for part in parts if _gone(*part[:2])]
        if not gone:
            return False  # another process put them back meanwhile
        try:
            for firewall, plan, pool, up in gone:
                firewall.restore(plan, pool, up)
        except BaseException as e:
            try:
                netns.set_link_down(cage.host_veth)
            except JobCageError as down:
                e.add_note(f"and setting {cage.host_veth} down failed too: {down}")
            raise NetworkError(
                f"the rules of cage {cage.job_id} were gone (`nft flush ruleset`, a firewall "
                f"reload?) and could not be put back: {e}; its veth {cage.host_veth} is down "
                "(no traffic) until its teardown or `jobcage reap`"
            ) from e
        gaps.add(cage.job_id)
    return True


def _gone(firewall: Firewall, plan: CagePlan) -> bool:
    try:
        firewall.counters(plan)
    except RulesGoneError:
        return True
    return False


def restore_lost(config: Config) -> tuple[list[str], list[str]]:
    """Put back the rules of every cage of the state dir whose rules are gone: the
    command for a site's firewall-reload hook (`jobcage reap` runs it). Returns (job
    ids restored, errors). A record is input: only a cage whose names are the ones
    JobCage derives from its job id, and whose netns is there, is touched."""
    from . import ipv6
    from .cage import NetworkCage, _uplink

    cages = []
    for record in _network_records(config.state_dir):
        try:
            cage = NetworkCage.from_record(record, config)
            validate_job_id(cage.job_id)
        except JobCageError:
            continue
        names = (veth_names(cage.job_id)[0], netns_name(cage.job_id))
        if (cage.host_veth, cage.netns_name) == names and os.path.exists(cage.netns_path):
            cages.append(cage)
    restored, errors = [], []
    for backend in sorted({c.firewall_backend for c in cages}):
        mine = [c for c in cages if c.firewall_backend == backend]
        try:
            found = open_firewall(backend).counters_many([c.plan for c in mine])
            # Dual-stack cages: None where either family's rules are gone.
            found = ipv6.with_ipv6(found, [c.plan6 for c in mine if c.plan6 is not None])
        except JobCageError as e:
            errors.append(f"reading the {backend} counters: {e}")
            continue
        for cage in mine:
            if found.get(cage.host_veth) is not None:
                continue
            try:
                if restore_cage_rules(cage, lambda c=cage: _uplink(c.uplink)):
                    restored.append(cage.job_id)
            except JobCageError as e:
                errors.append(f"{cage.job_id}: {e}")
    return restored, errors


def _network_records(state_dir: str) -> Iterator[dict[str, Any]]:
    """The network parts of the records the store believes (its names checked)."""
    for record in StateStore(state_dir).records():
        if record.network is not None:
            yield record.network.to_dict(record.job_id, state_dir)

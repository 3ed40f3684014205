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
from collections.abc import Callable
from typing import Protocol

from ..errors import JobCageError, NetworkError, RulesGoneError
from ..ids import validate_job_id
from . import ipv6, netns
from .addresses import locked_file
from .firewall import Firewall, open_firewall
from .firewall.policy import CagePlan


class RestorableCage(Protocol):
    """What :func:`restore_cage_rules` reads of a :class:`~.cage.NetworkCage` (a
    protocol, so that this module sits below the cage that uses it)."""

    job_id: str
    state_dir: str
    host_veth: str
    firewall_backend: str
    uplink: str | None
    ipv6: ipv6.Ipv6Part | None

    @property
    def plan(self) -> CagePlan: ...

    @property
    def plan6(self) -> CagePlan | None: ...

    @property
    def netns_path(self) -> str: ...


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


def restore_cage_rules(cage: RestorableCage, uplink: Callable[[], str]) -> bool:
    """Put ``cage``'s rules back (of each family it has) if they are gone, and count a
    gap; True if this call did. Fail closed: rules that cannot be put back leave its
    veth down, and raise."""
    backend = open_firewall(cage.firewall_backend)
    parts = [(backend, cage.plan, cage.pool, uplink)]
    if cage.ipv6 is not None and cage.plan6 is not None:
        uplink6 = lambda: cage.uplink or netns.default_route_interface(socket.AF_INET6)  # noqa: E731
        parts.append((ipv6.firewall(backend), cage.plan6, cage.ipv6.pool, uplink6))
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

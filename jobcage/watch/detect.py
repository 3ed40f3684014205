"""What the watcher reports as a failure of containment, and what it does about each.

Four kinds, each with an action an administrator chooses (``log``, ``kill``, ``ignore``):

* ``escape``: a process whose ancestry is a cage's but which is no longer in that cage's
  cgroups (a root job wrote its pid elsewhere). Default kill: the cage cannot kill it.
* ``privilege``: a job that started as a non-root user has a process with uid 0 (a
  setuid binary). Default log: setuid programs such as ``ping`` are legitimate.
* ``daemonize``: a process reparented out of its tree (to init or an outside subreaper).
  In a cage default log (the cage kills it at teardown anyway); in police mode, where
  nothing else would, default kill for non-root processes.
* ``fork_rate``: a cage forking faster than a threshold a second, before pids.max trips.
  Default log; kill signals the process that forked.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError
from .table import Proc, Tree

KINDS = ("escape", "privilege", "daemonize", "fork_rate")
ACTIONS = ("log", "kill", "ignore")
DEFAULT_FORK_RATE = 5000.0


def check_action(name: str, value: object) -> str:
    if value not in ACTIONS:
        raise ConfigError(
            f"{name} = {value!r} is not a watcher action; use one of {', '.join(ACTIONS)}"
        )
    return str(value)


@dataclass(frozen=True)
class Policy:
    escape: str = "kill"
    privilege: str = "log"
    daemonize: str = "log"
    fork_rate: str = "log"
    police: str = "kill"  # daemonize out of a policed tree, non-root processes only
    fork_rate_per_second: float = DEFAULT_FORK_RATE

    def __post_init__(self) -> None:
        for kind in (*KINDS, "police"):
            check_action(f"watch_{kind}_action", getattr(self, kind))
        rate = self.fork_rate_per_second
        if isinstance(rate, bool) or not isinstance(rate, int | float) or not rate > 0:
            raise ConfigError(
                f"watch_fork_rate = {rate!r} is not valid; give forks per second, a "
                "positive number such as 5000"
            )

    def action(self, kind: str, tree: Tree, proc: Proc) -> str:
        if kind == "daemonize" and tree.policed:
            return self.police if proc.uid != 0 else "log"
        return getattr(self, kind)


def process_fields(tree: Tree, proc: Proc) -> dict[str, Any]:
    """What every JSON line says of its process: the job, pid, ppid, uid, program."""
    return {
        "job_id": tree.job_id,
        "pid": proc.pid,
        "ppid": proc.ppid,
        "uid": proc.uid,
        "exe": proc.exe,
        "comm": proc.comm,
    }


def record(
    kind: str, tree: Tree, proc: Proc, action: str, killed: bool, **extra: Any
) -> dict[str, Any]:
    """One detection as it goes to the JSON lines and into the usage record."""
    return {
        "type": "detection",
        "kind": kind,
        **process_fields(tree, proc),
        "action": action,
        "killed": killed,
        "time": round(time.time(), 6),
        **extra,
    }

"""The proc-connector watcher: every fork, exec and exit of watched jobs, escapes and losses.

Layout: ``events.py`` (the socket and its decoding), ``table.py`` (trees of processes),
``membership.py`` (cgroups and /proc as the truth), ``detect.py`` (kinds, actions),
``watcher.py`` (the loop tying them), ``settings.py`` (config to typed settings),
``daemon.py`` and ``metrics.py`` (`jobcage watch`), ``command.py`` (its CLI part).

Names are imported on first use: pyroute2 costs about 0.2 s to import, which `jobcage
run` and the other commands must not pay when no watcher runs.
"""

from __future__ import annotations

import importlib
import threading
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .settings import WatchSettings
    from .watcher import Watcher

__all__ = [
    "ACTIONS",
    "KINDS",
    "EventSource",
    "Loss",
    "Policy",
    "ProcEvent",
    "WatchSettings",
    "Watcher",
    "acquire",
    "json_lines",
    "release",
]

_LAZY = {
    "ACTIONS": "detect",
    "KINDS": "detect",
    "Policy": "detect",
    "EventSource": "events",
    "Loss": "events",
    "ProcEvent": "events",
    "WatchSettings": "settings",
    "Watcher": "watcher",
    "json_lines": "watcher",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{module}", __name__), name)


_lock = threading.Lock()
_shared: Watcher | None = None
_users = 0


def acquire(settings: WatchSettings) -> Watcher:
    """The process's one running watcher (started on first use): one socket for all cages.

    The first caller's settings decide its policy and buffer; later callers share it.
    """
    global _shared, _users
    with _lock:
        if _shared is None:
            _shared = settings.watcher().start()
        _users += 1
        return _shared


def release(watcher: Watcher) -> None:
    """Give back :func:`acquire`'s watcher; the last user stops it."""
    global _shared, _users
    with _lock:
        if watcher is not _shared:
            return
        _users -= 1
        if _users == 0:
            _shared = None
            watcher.stop()

"""The proc-connector watcher: every fork, exec and exit of watched jobs, escapes and losses.

Layout: ``events.py`` (the socket and its decoding), ``table.py`` (trees of processes),
``membership.py`` (cgroups and /proc as the truth), ``detect.py`` (kinds, actions),
``watcher.py`` (the loop tying them), ``settings.py`` (config to typed settings).
"""

from __future__ import annotations

import threading

from .detect import ACTIONS, KINDS, Policy
from .events import EventSource, Loss, ProcEvent
from .settings import WatchSettings
from .watcher import Watcher, json_lines

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

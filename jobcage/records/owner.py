"""Who owns a record: a process by pid and start time, and whether it still runs."""

from __future__ import annotations

import os

from .model import Owner


def process_start_ticks(pid: int) -> int | None:
    """Start time of ``pid`` in clock ticks since boot (/proc/PID/stat field 22)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    # The command name (field 2) may contain spaces and parentheses: split after it.
    fields = stat[stat.rindex(b")") + 2 :].split()
    return int(fields[19])


def this_process() -> Owner:
    pid = os.getpid()
    return Owner(pid, process_start_ticks(pid))


def owner_alive(owner: Owner) -> bool:
    if owner.pid is None:
        return False
    ticks = process_start_ticks(owner.pid)
    return ticks is not None and ticks == owner.start_ticks


def pid_alive(pid: int) -> bool:
    """Whether any process has this pid now (a writer of a temporary file, say)."""
    return os.path.exists(f"/proc/{pid}")

"""Who owns a record: a process by pid and start time, and whether it still runs."""

from __future__ import annotations

import os

from .model import Owner


def _stat_fields(pid: int) -> list[bytes] | None:
    """/proc/PID/stat from field 3 (state) on, or None if there is no such process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    # The command name (field 2) may contain spaces and parentheses: split after it.
    return stat[stat.rindex(b")") + 2 :].split()


def process_start_ticks(pid: int) -> int | None:
    """Start time of ``pid`` in clock ticks since boot (/proc/PID/stat field 22)."""
    fields = _stat_fields(pid)
    return int(fields[19]) if fields is not None else None


def this_process() -> Owner:
    pid = os.getpid()
    return Owner(pid, process_start_ticks(pid))


def owner_alive(owner: Owner) -> bool:
    """The owner runs: same pid and start time, and not a zombie (an owner SIGKILLed
    while nobody reaps it yet keeps its pid but will never finish its teardown)."""
    if owner.pid is None:
        return False
    fields = _stat_fields(owner.pid)
    if fields is None or fields[0] in (b"Z", b"X"):
        return False
    return int(fields[19]) == owner.start_ticks


def pid_alive(pid: int) -> bool:
    """Whether any process has this pid now (a writer of a temporary file, say)."""
    return os.path.exists(f"/proc/{pid}")

"""What the proc connector does not say about a process, read from /proc, race-tolerant.

Every reader returns None when the process is already gone (it may exit between its
event and our read), never raises for that. A kill goes through a pidfd checked against
the process's start time, so a recycled pid is never signalled.
"""

from __future__ import annotations

import os
import signal
from typing import NamedTuple

from ..cgroups import parse_proc_cgroup

PROC = "/proc"
_GONE = (FileNotFoundError, ProcessLookupError)


PF_EXITING = 0x4  # include/linux/sched.h: set first thing in do_exit()


class Stat(NamedTuple):
    ppid: int
    session: int
    starttime: int  # clock ticks after boot: with the pid, a process's identity
    state: str
    flags: int

    @property
    def exiting(self) -> bool:
        """In do_exit() or a zombie: its cgroups read "/" on v1 from here on."""
        return self.state in "ZX" or bool(self.flags & PF_EXITING)


def stat(pid: int, proc: str = PROC) -> Stat | None:
    try:
        with open(f"{proc}/{pid}/stat", "rb") as f:
            text = f.read()
    except (*_GONE, PermissionError):
        return None
    # comm is in parentheses and may itself contain ") ": split at the last one.
    fields = text[text.rfind(b")") + 2 :].split()
    try:
        return Stat(
            int(fields[1]), int(fields[3]), int(fields[19]), fields[0].decode(), int(fields[6])
        )
    except (IndexError, ValueError):
        return None


def uids(pid: int, proc: str = PROC) -> tuple[int, int] | None:
    """Real and effective uid: a setuid program keeps the first and changes the second."""
    try:
        with open(f"{proc}/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"Uid:"):
                    fields = line.split()
                    return int(fields[1]), int(fields[2])
    except (*_GONE, PermissionError, ValueError, IndexError):
        return None
    return None


def euid(pid: int, proc: str = PROC) -> int | None:
    found = uids(pid, proc)
    return found[1] if found is not None else None


def exe(pid: int, proc: str = PROC) -> str | None:
    try:
        return os.readlink(f"{proc}/{pid}/exe")
    except OSError:
        return None  # gone, a kernel thread, or a zombie


def comm(pid: int, proc: str = PROC) -> str | None:
    try:
        with open(f"{proc}/{pid}/comm", "rb") as f:
            return f.read().rstrip(b"\n").decode("utf-8", "replace")
    except (*_GONE, PermissionError):
        return None


def argv(pid: int, proc: str = PROC) -> list[str] | None:
    """Best effort: read right after an exec, the program may already have rewritten it."""
    try:
        with open(f"{proc}/{pid}/cmdline", "rb") as f:
            raw = f.read()
    except (*_GONE, PermissionError):
        return None
    return [a.decode("utf-8", "replace") for a in raw.split(b"\0")[:-1]] or None


def cgroups(pid: int, proc: str = PROC) -> tuple[dict[str, str], str | None] | None:
    """The process's cgroup per v1 controller, and its v2 path."""
    try:
        with open(f"{proc}/{pid}/cgroup") as f:
            return parse_proc_cgroup(f.read())
    except (*_GONE, PermissionError):
        return None


def all_pids(proc: str = PROC) -> list[int]:
    return [int(name) for name in os.listdir(proc) if name.isdigit()]


def kill(pid: int, starttime: int | None, sig: int = signal.SIGKILL) -> bool:
    """Signal ``pid`` only if it is still the process that started at ``starttime``."""
    try:
        fd = os.pidfd_open(pid)
    except OSError:
        return False
    try:
        if starttime is not None:
            now = stat(pid)
            if now is None or now.starttime != starttime:
                return False  # the pid was recycled since we saw it
        signal.pidfd_send_signal(fd, sig)
        return True
    except ProcessLookupError:
        return False
    finally:
        os.close(fd)

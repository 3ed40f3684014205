"""``jobcage run``: one command in a cage, behaving like the command to whoever started it.

A batch system signals the process it started (here: ``jobcage run``) and reads its
exit status, so the runner is transparent both ways:

* SIGTERM, SIGINT, SIGHUP, SIGUSR1 and SIGUSR2 are forwarded to the job's process
  group (the job is a session leader, see :mod:`jobcage.spawn`). After a *stopping*
  signal (TERM, INT, HUP) the job has ``grace_seconds`` to finish; then the cage is
  killed. USR1/USR2 are only forwarded: batch systems use them as "checkpoint now".
* The exit status is the job's: its exit code, or 128+N when signal N ended it, as a
  shell reports it.

Waiting sleeps in poll(2) on a pidfd of the job and on the signal wakeup fd, so a
signal is forwarded the moment it arrives and the grace deadline is kept exactly.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .cage import JobCage
from .config import Config, check_value
from .errors import ConfigError, JobCageError, SpawnError
from .ids import validate_job_id
from .spawn import resolve_user
from .usage import USAGE_FORMAT, Usage

FORWARDED_SIGNALS = (
    signal.SIGTERM,
    signal.SIGINT,
    signal.SIGHUP,
    signal.SIGUSR1,
    signal.SIGUSR2,
)
STOPPING_SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT, signal.SIGHUP})
# Sent to us by the kernel when the thread that started us exits (PR_SET_PDEATHSIG);
# a real-time signal nobody else sends, checked against getppid() since a parent
# thread, not the parent process, may be what exited.
PARENT_DEATH_SIGNAL = signal.SIGRTMIN + 2
PR_SET_PDEATHSIG = 1


def generate_job_id(now: float | None = None) -> str:
    """``run-<host>-<pid>-<unix time>``: unique on a node, readable in `jobcage list`."""
    host = os.uname().nodename.split(".")[0] or "localhost"
    host = "".join(c if c.isalnum() or c in "-_" else "_" for c in host)[:40]
    stamp = int(now if now is not None else time.time())
    return validate_job_id(f"run-{host}-{os.getpid()}-{stamp}")


def exit_status(returncode: int) -> int:
    """A Popen returncode as a shell reports it: 128+N for death by signal N."""
    return 128 - returncode if returncode < 0 else returncode


@dataclass
class RunResult:
    job_id: str
    exit_status: int
    # The signal that ended the job, or None if it exited.
    term_signal: int | None
    started_unix: float
    ended_unix: float
    usage: Usage | None
    signals_received: list[str] = field(default_factory=list)
    grace_expired: bool = False
    # The process that started `jobcage run` exited while the job ran (a batch shell
    # killed by a cancel): the job was stopped as if by SIGTERM.
    parent_exited: bool = False
    # A teardown that failed after the job ran: the job's status still stands, the
    # record is kept and `jobcage reap` finishes the cage.
    teardown_error: str | None = None

    def to_record(self) -> dict[str, Any]:
        """The usage record, as written one JSON line per job."""
        return {
            "format": USAGE_FORMAT,
            "job_id": self.job_id,
            "host": os.uname().nodename,
            "exit_status": self.exit_status,
            "term_signal": self.term_signal,
            "started_unix": round(self.started_unix, 6),
            "ended_unix": round(self.ended_unix, 6),
            "signals_received": self.signals_received,
            "grace_expired": self.grace_expired,
            "parent_exited": self.parent_exited,
            "teardown_error": self.teardown_error,
            "usage": self.usage.to_dict() if self.usage else None,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_record(), separators=(",", ":"))


class _SignalRelay:
    """Catch the forwarded signals; wake poll() through the signal wakeup fd.

    Handlers are installed before the cage is built, so a vacate signal that comes
    during create() is not fatal (which would leave a cage for reap): it is kept and
    answered once the cage is built, by not starting the job at all.
    """

    def __init__(self, parent_pid: int | None = None) -> None:
        self.received: list[int] = []
        self.parent_pid = parent_pid
        self.parent_exited = False
        self._saved: dict[int, Any] = {}
        self._saved_wakeup = -1
        self.read_fd = -1
        self._write_fd = -1

    def __enter__(self) -> _SignalRelay:
        self.read_fd, self._write_fd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            self._saved_wakeup = signal.set_wakeup_fd(self._write_fd, warn_on_full_buffer=False)
        except ValueError:
            # Not the main thread: signals cannot be caught here; the job still runs.
            self._saved_wakeup = None  # type: ignore[assignment]
            return self
        for sig in FORWARDED_SIGNALS:
            self._saved[sig] = signal.signal(sig, self._handle)
        if self.parent_pid is not None:
            self._watch_parent(self.parent_pid)
        return self

    def _watch_parent(self, parent_pid: int) -> None:
        """Stop the job when our parent exits, as Slurm's batch shell does on scancel.

        Slurm signals the batch shell, not what it runs; the shell dies and
        ``jobcage run`` is SIGKILLed KillWait later with the cage still built. The
        kernel tells us of the parent's exit at once (PR_SET_PDEATHSIG), which leaves
        the grace and the teardown their time before that SIGKILL.
        """
        from . import syscalls

        self._saved[PARENT_DEATH_SIGNAL] = signal.signal(PARENT_DEATH_SIGNAL, self._handle)
        syscalls.libc.prctl(PR_SET_PDEATHSIG, int(PARENT_DEATH_SIGNAL), 0, 0, 0)
        if os.getppid() != parent_pid:  # it exited before prctl
            os.kill(os.getpid(), PARENT_DEATH_SIGNAL)

    def _handle(self, signum: int, _frame: Any) -> None:
        if signum == PARENT_DEATH_SIGNAL:
            if self.parent_exited or os.getppid() == self.parent_pid:
                return  # a thread of the parent exited, not the parent
            self.parent_exited = True
            signum = signal.SIGTERM
        self.received.append(signum)

    def drain(self) -> None:
        with contextlib.suppress(BlockingIOError):
            while os.read(self.read_fd, 512):
                pass

    def __exit__(self, *exc: object) -> None:
        if self.parent_pid is not None and self._saved:
            from . import syscalls

            syscalls.libc.prctl(PR_SET_PDEATHSIG, 0, 0, 0, 0)
        for sig, handler in self._saved.items():
            signal.signal(sig, handler)
        if self._saved_wakeup is not None:
            signal.set_wakeup_fd(self._saved_wakeup)
        os.close(self.read_fd)
        os.close(self._write_fd)


def run_job(
    argv: Sequence[str],
    *,
    job_id: str | None = None,
    config: Config,
    memory_limit: str | int | None = None,
    pids_limit: int | None = None,
    network: bool = False,
    campus_networks: Sequence[str] | None = None,
    user: str | int | None = None,
    cwd: str | None = None,
    env: Mapping[str, str] | None = None,
    grace_seconds: float | None = None,
    on_started: Callable[[JobCage, int], None] | None = None,
    parent_pid: int | None = None,
    watch: bool = False,
) -> RunResult:
    """Build a cage, run ``argv`` in it, forward signals, tear down, return the result.

    Errors before the job starts (bad id, not root, missing kernel feature, command
    not found) raise JobCageError subclasses with nothing left behind. Once the job
    has run, a teardown failure is reported in the result rather than raised, so the
    caller still gets the job's exit status. With ``parent_pid`` (the pid that
    started this process), that process exiting stops the job like a SIGTERM.
    """
    job_id = validate_job_id(job_id) if job_id is not None else generate_job_id()
    grace = config.grace_seconds
    if grace_seconds is not None:
        grace = check_value("grace_seconds", grace_seconds, "run_job argument")  # type: ignore[assignment]
    # What would only fail in the child is refused before anything is built.
    if user is not None:
        resolve_user(user)
    if cwd is not None and not os.path.isdir(cwd):
        raise SpawnError(
            f"the working directory (cwd) {cwd!r} does not exist or is not a "
            "directory; give an existing one"
        )
    job_env = dict(os.environ if env is None else env)
    job_env["JOBCAGE_JOB_ID"] = job_id
    cage = JobCage(
        job_id,
        memory_limit=memory_limit,
        pids_limit=pids_limit,
        network=network,
        campus_networks=campus_networks,
        config=config,
        watch=watch,
    )
    with _SignalRelay(parent_pid) as relay:
        started = time.time()
        cage.create()
        try:
            stopping = [s for s in relay.received if s in STOPPING_SIGNALS]
            if stopping:
                # Vacated before the job started: do not start it.
                cage.destroy()
                return RunResult(
                    job_id,
                    128 + stopping[0],
                    stopping[0],
                    started,
                    time.time(),
                    cage.final_usage,
                    [signal.Signals(s).name for s in relay.received],
                )
            proc = cage.spawn(argv, user=user, cwd=cwd, env=job_env)
        except BaseException:
            with contextlib.suppress(JobCageError):
                cage.destroy()
            raise
        if on_started is not None:
            on_started(cage, proc.pid)
        returncode, grace_expired = _supervise(cage, proc, relay, grace)
        ended = time.time()
        teardown_error = None
        try:
            cage.destroy()
        except JobCageError as e:
            teardown_error = str(e)
        return RunResult(
            job_id=job_id,
            exit_status=exit_status(returncode),
            term_signal=-returncode if returncode < 0 else None,
            started_unix=started,
            ended_unix=ended,
            usage=cage.final_usage,
            signals_received=[signal.Signals(s).name for s in relay.received],
            grace_expired=grace_expired,
            parent_exited=relay.parent_exited,
            teardown_error=teardown_error,
        )


def _supervise(cage: JobCage, proc: Any, relay: _SignalRelay, grace: float) -> tuple[int, bool]:
    """Wait for the job, forwarding signals; kill the cage when the grace runs out."""
    pidfd = os.pidfd_open(proc.pid)
    try:
        poller = select.poll()
        poller.register(pidfd, select.POLLIN)
        poller.register(relay.read_fd, select.POLLIN)
        forwarded = 0
        deadline: float | None = None
        while True:
            relay.drain()
            while forwarded < len(relay.received):
                sig = relay.received[forwarded]
                forwarded += 1
                _forward(proc.pid, sig)
                if sig in STOPPING_SIGNALS and deadline is None:
                    deadline = time.monotonic() + grace
            if proc.poll() is not None:
                return proc.returncode, False
            timeout_ms = None
            if deadline is not None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    cage.kill()
                    return proc.wait(), True
                timeout_ms = remaining * 1000
            poller.poll(timeout_ms)
    finally:
        os.close(pidfd)


def _forward(pid: int, sig: int) -> None:
    """Signal the job's process group, as a terminal or a batch system would."""
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def check_usage_destination(destination: str) -> None:
    """Refuse a usage file that could not be written, before the job runs."""
    if destination == "-":
        return
    directory = os.path.dirname(os.path.abspath(destination))
    if os.path.isdir(destination):
        problem = "is a directory"
    elif not os.path.isdir(directory):
        problem = f"is in {directory}, which does not exist"
    elif not os.access(destination if os.path.exists(destination) else directory, os.W_OK):
        problem = "cannot be written (permissions or a read-only filesystem)"
    else:
        return
    raise ConfigError(
        f"--usage-file {destination} {problem}: the job's bill would be lost; give a "
        "writable file in an existing directory"
    )


def write_usage_record(result: RunResult, destination: str) -> None:
    """Append the record as one JSON line: to ``destination``, or stdout for ``-``.

    Appending (O_APPEND, one write) lets one file collect every job of a node.
    """
    line = (result.to_json() + "\n").encode()
    if destination == "-":
        os.write(1, line)
        return
    fd = os.open(destination, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


def summary(result: RunResult) -> str:
    """What a person at a terminal wants after the job: how it ended and what it used."""
    if result.term_signal is not None:
        how = f"killed by {signal.Signals(result.term_signal).name} (status {result.exit_status})"
    else:
        how = f"exited with status {result.exit_status}"
    lines = [f"job {result.job_id} {how}"]
    if result.grace_expired:
        lines.append("the grace period ran out after a stop signal: the cage was killed")
    if result.teardown_error:
        lines.append(f"teardown failed: {result.teardown_error}")
    if result.usage is not None:
        lines.append(result.usage.to_table())
    return "\n".join(lines)

"""The ``jobcage`` command: a thin layer over the library for administrators and wrappers.

It parses arguments, loads the config (command line > environment > file > defaults),
calls one library function and maps JobCageError subclasses to the exit codes below,
printing one line on stderr that says what to do. Expected errors never show a
traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from collections.abc import Sequence
from typing import Any, NoReturn

# Only what `run` needs is imported here: a batch system starts `jobcage run` once per
# job, so every module it does not use would be a per-job cost (docs/performance.md).
from . import fetch, runner
from .config import Config, check_value, load_config
from .errors import (
    CageExistsError,
    CageNotFoundError,
    ConfigError,
    InvalidJobIdError,
    JobCageError,
    KernelFeatureError,
    NotRootError,
    SpawnError,
)
from .usage import human_bytes
from .watch import command as watch_command

# Exit codes of every command but `run` (documented in docs/admin-guide.md).
EXIT_OK = 0
EXIT_FAILED = 1  # the operation failed (teardown, reap errors); doctor: node not ready
EXIT_USAGE = 2  # bad arguments, config or job id
EXIT_NOT_FOUND = 3  # no cage of that job id
EXIT_NOT_ROOT = 4
EXIT_KERNEL = 5  # a kernel feature is missing
EXIT_EXISTS = 6  # a cage of that job id already exists
# `run` exits with the job's status, so its own failures use the codes that env(1),
# timeout(1) and chroot(1) use for the same situations.
EXIT_RUN_FAILED = 125  # jobcage could not build the cage or start the job
EXIT_RUN_CANNOT_EXEC = 126  # the command exists but cannot be executed
EXIT_RUN_NOT_FOUND = 127  # the command does not exist
EXIT_INTERRUPTED = 130

EPILOG = """\
exit codes (all commands but run):
  0 success   1 failed / doctor: node not ready   2 bad arguments, config or job id
  3 no such cage   4 not root   5 kernel feature missing   6 cage already exists
run exits with the job's status (128+N if signal N killed it); its own failures:
  125 the cage could not be built   126 command not executable   127 command not found

config: /etc/jobcage/jobcage.toml, or --config / $JOBCAGE_CONFIG; every key can also be
set as $JOBCAGE_<KEY> or with --set KEY=VALUE. See docs/admin-guide.md.
"""

RUN_EPILOG = """\
The job runs in its own session. SIGTERM, SIGINT and SIGHUP sent to jobcage run are
forwarded to the job's process group, which then has --grace seconds to exit before
the cage is killed; SIGUSR1 and SIGUSR2 are forwarded only. jobcage run exits with
the job's status, 128+N if signal N ended it.

examples:
  jobcage run --job-id 1234.0 --memory 2G --usage-file /var/log/jobcage.jsonl -- ./job.sh
  jobcage run --batch slurm --summary -- ./step.sh
  jobcage run --network --campus 129.93.0.0/16 -- curl -sO https://example.org/data
"""


class UsageError(Exception):
    """A bad command line, caught by main() and printed as one line."""

    def __init__(self, prog: str, message: str) -> None:
        super().__init__(message)
        self.prog = prog


class _Parser(argparse.ArgumentParser):
    """argparse that raises instead of printing usage and exiting 2: main() prints one
    line and picks the exit code (125 for `run`, whose own codes are the job's)."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(self.prog, message)


def _common_options(parser: argparse.ArgumentParser, *, suppress: bool) -> None:
    """Config options, accepted before and after the command name."""
    default = argparse.SUPPRESS if suppress else None
    group = parser.add_argument_group("configuration")
    group.add_argument(
        "--config",
        metavar="PATH",
        default=default,
        help="TOML config file (default: $JOBCAGE_CONFIG, else /etc/jobcage/jobcage.toml)",
    )
    group.add_argument(
        "--state-dir", metavar="DIR", default=default, help="where cage records are kept"
    )
    group.add_argument(
        "--cgroup-parent", metavar="PATH", default=default, help="parent cgroup of the cages"
    )
    group.add_argument(
        "--set",
        metavar="KEY=VALUE",
        action="append",
        default=default,
        dest="settings",
        help="set any config key for this command (repeatable)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="jobcage",
        description="Contain a batch job in cgroups (and optionally a network namespace) "
        "and report what it used.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _common_options(parser, suppress=False)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def add(name: str, help_text: str, **kwargs: Any) -> argparse.ArgumentParser:
        p = sub.add_parser(
            name,
            help=help_text,
            description=help_text,
            formatter_class=argparse.RawDescriptionHelpFormatter,
            **kwargs,
        )
        _common_options(p, suppress=True)
        return p

    run = add("run", "run a command in a new cage", epilog=RUN_EPILOG)
    run.add_argument("--job-id", metavar="ID", help="job id (default: run-<host>-<pid>-<time>)")
    run.add_argument(
        "--batch",
        choices=("condor", "slurm"),
        help="take the job id from the batch system (condor: also RequestMemory, the "
        "scratch dir for the usage record, condor_chirp; slurm: $SLURM_JOB_ID.$SLURM_STEP_ID, "
        "--mem, a grace inside KillWait, the record in <state_dir>/usage/<id>.json)",
    )
    run.add_argument("--memory", metavar="SIZE", help="memory limit, e.g. 2G or 512M")
    run.add_argument("--pids", metavar="N", help="limit on the number of processes")
    run.add_argument(
        "--watch",
        action="store_true",
        help="watch the job's processes (docs/watch.md): the record gains processes_started, "
        "execs, max_processes, events_lost and detections",
    )
    run.add_argument(
        "--cpus",
        metavar="N",
        help="CPU limit in CPUs, e.g. 2 or 0.5 (default: cpu_limit; --batch: the job's request)",
    )
    run.add_argument(
        "--network", action="store_true", help="give the job its own accounted network"
    )
    run.add_argument(
        "--campus",
        metavar="CIDR",
        action="append",
        help="a network counted as on-campus (LAN); repeatable (default: campus_networks)",
    )
    run.add_argument("--user", metavar="USER", help="run the command as USER (name or uid)")
    run.add_argument("--cwd", metavar="DIR", help="working directory of the command")
    run.add_argument(
        "--usage-file",
        metavar="PATH",
        help="append the usage record as one JSON line to PATH ('-': stdout)",
    )
    run.add_argument(
        "--summary", action="store_true", help="print a human summary to stderr at the end"
    )
    run.add_argument(
        "--grace",
        metavar="SECONDS",
        help="time between a forwarded SIGTERM and killing the cage (default: grace_seconds)",
    )
    run.add_argument("argv", nargs=argparse.REMAINDER, metavar="-- CMD [ARG...]")

    lst = add("list", "list the cages on this node, from their records")
    lst.add_argument("--json", action="store_true", help="one JSON object per line")

    stats = add("stats", "show the live usage of one cage")
    stats.add_argument("job_id", metavar="ID")
    stats.add_argument("--json", action="store_true", help="one JSON line")

    kill = add("kill", "kill every process of a cage (its owner then tears it down)")
    kill.add_argument("job_id", metavar="ID")

    rp = add(
        "reap",
        "remove cages whose owner is dead and half-built leftovers (safe at any time)",
    )
    rp.add_argument("--dry-run", action="store_true", help="say what would be removed")
    rp.add_argument("--json", action="store_true", help="the report as one JSON line")

    doc = add("doctor", "check whether this node is ready to cage jobs, and say what to fix")
    doc.add_argument("--json", action="store_true", help="one JSON object per check")
    doc.add_argument(
        "--no-network", action="store_true", help="skip the checks only --network needs"
    )
    fetch.add_arguments(
        add("fetch", "fetch a job input through the site's squid first, then directly")
    )
    watch_command.add_arguments(add("watch", watch_command.HELP))
    return parser


def _config(
    args: argparse.Namespace, flags: dict[str, str] | None = None, **overrides: Any
) -> Config:
    """The config with the command line on top; ``flags`` names the flag that set each
    override, so that a bad value's error names it."""
    origins = dict(flags or {})
    for item in getattr(args, "settings", None) or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--set {item!r}: write KEY=VALUE, e.g. --set grace_seconds=60")
        key = key.strip().replace("-", "_")
        # Checked even when a flag of its own overrides it: a bad value is never silent.
        check_value(key, value, f"--set {key}")
        if key not in overrides:
            overrides[key], origins[key] = value, f"--set {key}"
    for key in ("state_dir", "cgroup_parent"):
        if getattr(args, key, None):
            overrides[key], origins[key] = getattr(args, key), "--" + key.replace("_", "-")
    return load_config(getattr(args, "config", None), origins=origins, **overrides)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version
        return int(e.code or 0) if isinstance(e.code, int) else EXIT_USAGE
    except UsageError as e:
        _error(f"{e} (see `{e.prog} --help`)")
        return EXIT_RUN_FAILED if e.prog.split()[1:2] == ["run"] else EXIT_USAGE
    command = args.command
    try:
        return COMMANDS[command](args)
    except SpawnError as e:
        _error(e)
        if command == "run":
            return {2: EXIT_RUN_NOT_FOUND, 13: EXIT_RUN_CANNOT_EXEC}.get(
                e.errno or 0, EXIT_RUN_FAILED
            )
        return EXIT_FAILED
    except JobCageError as e:
        _error(e)
        if command == "run":
            return EXIT_RUN_FAILED
        return _exit_code(e)
    except PermissionError as e:
        _error(f"permission denied: {e.filename or e}; run jobcage as root")
        return EXIT_RUN_FAILED if command == "run" else EXIT_NOT_ROOT
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


def _exit_code(e: JobCageError) -> int:
    for kind, code in (
        (ConfigError, EXIT_USAGE),
        (InvalidJobIdError, EXIT_USAGE),
        (CageNotFoundError, EXIT_NOT_FOUND),
        (NotRootError, EXIT_NOT_ROOT),
        (KernelFeatureError, EXIT_KERNEL),
        (CageExistsError, EXIT_EXISTS),
    ):
        if isinstance(e, kind):
            return code
    return EXIT_FAILED


def _error(e: BaseException | str) -> None:
    # An OSError-derived error (SpawnError) would print as "[Errno 2] ...".
    message = e.strerror if isinstance(e, OSError) and e.strerror else e
    text = " ".join(str(message).split())
    print(f"jobcage: error: {text}", file=sys.stderr)


def _warn(text: str) -> None:
    print(f"jobcage: warning: {' '.join(text.split())}", file=sys.stderr)


# -- commands ----------------------------------------------------------------------------


def cmd_run(args: argparse.Namespace) -> int:
    parent_pid = os.getppid()
    argv = list(args.argv)
    if argv and argv[0] == "--":
        argv = argv[1:]
    if not argv:
        raise ConfigError("nothing to run: give the command after --, e.g. jobcage run -- ./job")
    overrides: dict[str, Any] = {}
    flags = {}
    for key, flag, value in (
        ("memory_limit", "--memory", args.memory),
        ("pids_limit", "--pids", args.pids),
        ("cpu_limit", "--cpus", args.cpus),
        ("campus_networks", "--campus", args.campus),
        ("grace_seconds", "--grace", args.grace),
    ):
        if value is not None:
            overrides[key], flags[key] = value, flag
    job_id, usage_file = args.job_id, args.usage_file
    condor: batch.CondorJob | None = None
    if args.batch:
        from . import batch
    try:
        config = _config(args, flags, **overrides)
        if args.batch == "condor":
            condor = batch.condor_job()
            job_id = job_id or condor.job_id
            if args.memory is None and condor.memory_limit_bytes is not None:
                config = config.replace(memory_limit=condor.memory_limit_bytes)
            if args.cpus is None and condor.cpu_limit is not None:
                config = config.replace(cpu_limit=condor.cpu_limit)
            if usage_file is None and condor.scratch_dir:
                usage_file = f"{condor.scratch_dir}/{batch.CONDOR_USAGE_FILE}"
            if args.grace is None:
                config = config.replace(
                    grace_seconds=batch.condor_grace(
                        config.grace_seconds, condor.max_vacate_seconds
                    )
                )
        elif args.batch == "slurm":
            slurm = batch.slurm_job()
            job_id = job_id or slurm.job_id
            if args.memory is None and slurm.memory_limit_bytes is not None:
                config = config.replace(memory_limit=slurm.memory_limit_bytes)
            if args.cpus is None and slurm.cpu_limit is not None:
                config = config.replace(cpu_limit=slurm.cpu_limit)
            if usage_file is None:
                usage_file = batch.slurm_usage_file(config.state_dir, job_id)
            if args.grace is None:
                config = config.replace(
                    grace_seconds=batch.slurm_grace(config.grace_seconds, slurm.kill_wait_seconds)
                )
        if args.usage_file is not None:
            # Refused before the job runs: a bill that cannot be written is lost.
            # (The batch systems' default places are JobCage's own, made when written.)
            runner.check_usage_destination(args.usage_file)
        result = runner.run_job(
            argv,
            job_id=job_id,
            config=config,
            network=args.network,
            user=int(args.user) if args.user and args.user.isdigit() else args.user,
            cwd=args.cwd,
            parent_pid=parent_pid,
            watch=args.watch,
        )
    except JobCageError as e:
        if args.batch == "condor":
            batch.write_wrapper_error(os.environ.get("_CONDOR_WRAPPER_ERROR_FILE"), f"{e}")
        raise
    if usage_file is not None:
        try:
            if args.batch == "slurm" and args.usage_file is None:
                os.makedirs(os.path.dirname(usage_file), exist_ok=True)
            runner.write_usage_record(result, usage_file)
        except OSError as e:
            _warn(f"cannot write the usage record to {usage_file}: {e.strerror}")
    if condor is not None and result.usage is not None:
        for failure in batch.chirp_usage(result.usage):
            _warn(failure)
    if result.teardown_error:
        _warn(f"job {result.job_id}: {result.teardown_error}; `jobcage reap` will finish the cage")
    if args.summary:
        print(runner.summary(result), file=sys.stderr)
    return result.exit_status


def cmd_list(args: argparse.Namespace) -> int:
    from . import admin

    cages, bad = admin.list_cages_and_bad(_config(args))
    for record in bad:
        _warn(f"{record}; `jobcage reap` moves it aside")
    if args.json:
        for cage in cages:
            print(json.dumps(cage.to_dict(), separators=(",", ":")))
        return EXIT_OK
    rows = [("JOB ID", "STATUS", "OWNER", "ALIVE", "PROCS", "AGE", "ADDRESS", "NET RX/TX")]
    for c in cages:
        rows.append(
            (
                c.job_id,
                c.status,
                str(c.owner_pid) if c.owner_pid is not None else "-",
                "yes" if c.owner_alive else "no",
                str(c.processes) if c.processes is not None else "-",
                _age(c.age_seconds),
                c.address or "-",
                _net(c.network),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip())
    orphaned = sum(1 for c in cages if c.status in {"orphaned", "teardown-failed"})
    if orphaned:
        _warn(f"{orphaned} cage(s) without a live owner: `jobcage reap` removes them")
    return EXIT_OK


def _net(counters: dict[str, int] | None) -> str:
    """LAN+WAN bytes into / out of the job, from the one-pass read of `list_cages`."""
    if counters is None:
        return "-"
    rx = counters["net_lan_rx_bytes"] + counters["net_wan_rx_bytes"]
    tx = counters["net_lan_tx_bytes"] + counters["net_wan_tx_bytes"]
    return f"{human_bytes(rx)}/{human_bytes(tx)}"


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def cmd_stats(args: argparse.Namespace) -> int:
    from . import admin

    usage = admin.cage_stats(args.job_id, _config(args))
    if args.json:
        print(json.dumps({"job_id": args.job_id, "time_unix": time.time(), **usage.to_dict()}))
    else:
        print(f"job {args.job_id}")
        print(usage.to_table())
    return EXIT_OK


def cmd_kill(args: argparse.Namespace) -> int:
    from . import admin

    killed = admin.kill_cage(args.job_id, _config(args))
    print(f"killed {killed} process(es) of job {args.job_id}")
    return EXIT_OK


def cmd_reap(args: argparse.Namespace) -> int:
    from . import recovery

    report = recovery.reap(_config(args), dry_run=args.dry_run)
    if args.json:
        print(json.dumps(report.to_dict(), separators=(",", ":")))
    else:
        verb = "would reap" if report.dry_run else "reaped"
        for cage in report.cages:
            what = f"{verb} {cage.job_id} ({cage.reason}"
            if cage.owner_pid is not None:
                what += f", owner pid {cage.owner_pid}"
            what += ")"
            if not report.dry_run:
                what += f": killed {cage.killed}"
                if cage.usage_file:
                    what += f", usage saved to {cage.usage_file}"
            print(what)
        if not report.cages:
            print(f"nothing to reap ({report.live} live cage(s) left alone)")
    for aside in report.set_aside:
        _warn(str(aside))
        for job_id in report.restored:
            print(
                f"restored the rules of {job_id} (gone: a firewall reload?); its usage has a gap"
            )
    for error in report.errors:
        _error(error)
    return EXIT_FAILED if report.errors else EXIT_OK


def cmd_doctor(args: argparse.Namespace) -> int:
    from . import doctor

    checks = doctor.run_checks(_config(args), network=not args.no_network)
    for c in checks:
        if args.json:
            print(json.dumps(c.to_dict()))
        else:
            print(f"{c.status.value:<4}  {c.name}: {c.message}")
    is_ready = doctor.ready(checks)
    if not args.json:
        print("node is ready" if is_ready else "node is NOT ready: fix the FAIL lines above")
    return EXIT_OK if is_ready else EXIT_FAILED


def cmd_watch(args: argparse.Namespace) -> int:
    return watch_command.command(args, lambda: _config(args))


COMMANDS = {
    "run": cmd_run,
    "list": cmd_list,
    "stats": cmd_stats,
    "kill": cmd_kill,
    "reap": cmd_reap,
    "watch": cmd_watch,
    "doctor": cmd_doctor,
    "fetch": fetch.command,
}


if __name__ == "__main__":  # pragma: no cover
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    sys.exit(main())

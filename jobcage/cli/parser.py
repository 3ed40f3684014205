"""The ``jobcage`` command line. Only the parser of the command being run is built,
and only its module imported: a batch system starts ``jobcage run`` once per job, so
every subcommand's parser and module it does not need is a per-job cost
(docs/performance.md)."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn

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

# Options of the top-level parser that take a value (see command_of).
_VALUED = frozenset({"--config", "--state-dir", "--cgroup-parent", "--set"})


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


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """argparse's formatter, sized without importing shutil (and with it bz2 and lzma)
    for every parser built: the same answer as shutil.get_terminal_size()."""

    def __init__(self, prog: str, *args: object, **kwargs: object) -> None:
        if not args and kwargs.get("width") is None:
            kwargs["width"] = _columns() - 2
        super().__init__(prog, *args, **kwargs)


def _columns() -> int:
    try:
        columns = int(os.environ["COLUMNS"])
    except (KeyError, ValueError):
        columns = 0
    if columns <= 0:
        try:
            columns = os.get_terminal_size(sys.__stdout__.fileno()).columns
        except (AttributeError, ValueError, OSError):
            columns = 0
    return columns or 80


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


def _run(run: argparse.ArgumentParser) -> None:
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


def _json(p: argparse.ArgumentParser, help_text: str = "one JSON object per line") -> None:
    p.add_argument("--json", action="store_true", help=help_text)


def _one_cage(p: argparse.ArgumentParser) -> None:
    p.add_argument("job_id", metavar="ID")


def _stats(p: argparse.ArgumentParser) -> None:
    _one_cage(p)
    _json(p, "one JSON line")


def _reap(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dry-run", action="store_true", help="say what would be removed")
    _json(p, "the report as one JSON line")


def _doctor(p: argparse.ArgumentParser) -> None:
    _json(p, "one JSON object per check")
    p.add_argument(
        "--no-network", action="store_true", help="skip the checks only --network needs"
    )


def _fetch(p: argparse.ArgumentParser) -> None:
    from .. import fetch

    fetch.add_arguments(p)


def _watch(p: argparse.ArgumentParser) -> None:
    from ..watch import command

    command.add_arguments(p)


WATCH_HELP = (
    "the node daemon: watch every cage's processes (and police batch daemons' trees), "
    "one JSON line per event or detection, Prometheus metrics when configured"
)

# name -> (help, what adds its arguments, extra keywords of its parser)
SUBCOMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], dict]] = {
    "run": ("run a command in a new cage", _run, {"epilog": RUN_EPILOG}),
    "list": ("list the cages on this node, from their records", _json, {}),
    "stats": ("show the live usage of one cage", _stats, {}),
    "kill": ("kill every process of a cage (its owner then tears it down)", _one_cage, {}),
    "reap": (
        "remove cages whose owner is dead and half-built leftovers (safe at any time)",
        _reap,
        {},
    ),
    "doctor": ("check whether this node is ready to cage jobs, and say what to fix", _doctor, {}),
    "fetch": ("fetch a job input through the site's squid first, then directly", _fetch, {}),
    "watch": (WATCH_HELP, _watch, {}),
}


def command_of(argv: Sequence[str]) -> str | None:
    """The subcommand argv names, or None when that is not plain to see (then the whole
    parser is built, and argparse decides)."""
    tokens = iter(argv)
    for token in tokens:
        if token in _VALUED:
            next(tokens, None)
        elif token == "--" or not token.startswith("-"):
            return token if token in SUBCOMMANDS else None
    return None


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The parser of every subcommand, or of ``only`` (which must be in SUBCOMMANDS)."""
    parser = _Parser(
        prog="jobcage",
        description="Contain a batch job in cgroups (and optionally a network namespace) "
        "and report what it used.",
        epilog=EPILOG,
        formatter_class=_Formatter,
    )
    _common_options(parser, suppress=False)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (help_text, add_arguments, extra) in SUBCOMMANDS.items():
        if only is not None and name != only:
            continue
        p = sub.add_parser(
            name,
            help=help_text,
            description=help_text,
            formatter_class=_Formatter,
            **extra,
        )
        _common_options(p, suppress=True)
        add_arguments(p)
    return parser

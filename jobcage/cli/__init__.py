"""The ``jobcage`` command: a thin layer over the library for administrators and wrappers.

It parses arguments, loads the config (command line > environment > file > defaults),
calls one library function and maps JobCageError subclasses to the exit codes in
common.py, printing one line on stderr that says what to do. Expected errors never
show a traceback. Each command's code lives in the module named in COMMANDS and is
imported only when that command runs.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence

from ..errors import (
    CageExistsError,
    CageNotFoundError,
    ConfigError,
    InvalidJobIdError,
    JobCageError,
    KernelFeatureError,
    NotRootError,
    SpawnError,
)
from .common import (
    EXIT_EXISTS,
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_KERNEL,
    EXIT_NOT_FOUND,
    EXIT_NOT_ROOT,
    EXIT_RUN_CANNOT_EXEC,
    EXIT_RUN_FAILED,
    EXIT_RUN_NOT_FOUND,
    EXIT_USAGE,
    error,
)
from .parser import UsageError, build_parser, command_of

__all__ = ["COMMANDS", "build_parser", "main"]

# command -> "module:function", imported by _command() when that command runs.
COMMANDS = {
    "run": "jobcage.cli.run:cmd_run",
    "list": "jobcage.cli.cages:cmd_list",
    "stats": "jobcage.cli.cages:cmd_stats",
    "kill": "jobcage.cli.cages:cmd_kill",
    "reap": "jobcage.cli.cages:cmd_reap",
    "doctor": "jobcage.cli.cages:cmd_doctor",
    "watch": "jobcage.cli.cages:cmd_watch",
    "fetch": "jobcage.fetch:command",
}


def _command(name: str) -> Callable[[argparse.Namespace], int]:
    module, _, function = COMMANDS[name].partition(":")
    return getattr(importlib.import_module(module), function)


def _parse(argv: Sequence[str]) -> argparse.Namespace:
    only = command_of(argv)
    try:
        return build_parser(only).parse_args(argv)
    except UsageError:
        if only is None:
            raise
    # command_of guessed from a line argparse reads otherwise (an abbreviated option
    # whose value is a command's name): the whole parser gives the right answer.
    return build_parser().parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args = _parse(argv)
    except SystemExit as e:  # --help, --version
        return int(e.code or 0) if isinstance(e.code, int) else EXIT_USAGE
    except UsageError as e:
        error(f"{e} (see `{e.prog} --help`)")
        return EXIT_RUN_FAILED if e.prog.split()[1:2] == ["run"] else EXIT_USAGE
    command = args.command
    try:
        return _command(command)(args)
    except SpawnError as e:
        error(e)
        if command == "run":
            return {2: EXIT_RUN_NOT_FOUND, 13: EXIT_RUN_CANNOT_EXEC}.get(
                e.errno or 0, EXIT_RUN_FAILED
            )
        return EXIT_FAILED
    except JobCageError as e:
        error(e)
        if command == "run":
            return EXIT_RUN_FAILED
        return _exit_code(e)
    except PermissionError as e:
        error(f"permission denied: {e.filename or e}; run jobcage as root")
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

"""`jobcage watch`'s part of the CLI, light to import: jobcage/cli/parser.py registers
these, and holds the command's help line with the others'."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..config import Config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--police-pid",
        metavar="PID",
        type=int,
        action="append",
        default=[],
        help="police the tree under this per-job daemon's pid (repeatable; names: "
        "watch_police_daemons)",
    )


def command(args: argparse.Namespace, load: Callable[[], Config]) -> int:
    from .daemon import NodeDaemon

    return NodeDaemon(load, police_pids=args.police_pid).run()

"""What every command of the ``jobcage`` CLI shares: exit codes, the config with the
command line on top, and the one-line error and warning shape."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from ..config import Config, check_value, load_config
from ..errors import ConfigError

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


def config_of(
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


def error(e: BaseException | str) -> None:
    # An OSError-derived error (SpawnError) would print as "[Errno 2] ...".
    message = e.strerror if isinstance(e, OSError) and e.strerror else e
    text = " ".join(str(message).split())
    print(f"jobcage: error: {text}", file=sys.stderr)


def warn(text: str) -> None:
    print(f"jobcage: warning: {' '.join(text.split())}", file=sys.stderr)

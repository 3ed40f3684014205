"""``jobcage run``: what a batch system's job wrapper calls once per job."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from .. import runner
from ..errors import ConfigError, JobCageError
from .common import config_of, warn


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
    job_id, usage_file, condor = args.job_id, args.usage_file, None
    if args.batch:
        from .. import batch
    try:
        config = config_of(args, flags, **overrides)
        if args.batch:
            settings = batch.batch_run(
                args.batch,
                config,
                job_id=job_id,
                usage_file=usage_file,
                given=frozenset(flags),
            )
            job_id, config = settings.job_id, settings.config
            usage_file, condor = settings.usage_file, settings.condor
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
            warn(f"cannot write the usage record to {usage_file}: {e.strerror}")
    if condor is not None and result.usage is not None:
        for failure in batch.chirp_usage(result.usage):
            warn(failure)
    if result.teardown_error:
        warn(f"job {result.job_id}: {result.teardown_error}; `jobcage reap` will finish the cage")
    if args.summary:
        print(runner.summary(result), file=sys.stderr)
    return result.exit_status

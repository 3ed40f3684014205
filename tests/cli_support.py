"""Helpers for driving `jobcage` in-process (main([...])) and as a process."""

from __future__ import annotations

import contextlib
import io
import json
import os
import select
import subprocess
import sys
from pathlib import Path

from jobcage import Config
from jobcage.cli import main

JOBCAGE = str(Path(sys.executable).parent / "jobcage")
REPO = Path(__file__).resolve().parent.parent


def config_args(config: Config) -> list[str]:
    """Command-line options that point the CLI at a test's Config."""
    args = ["--state-dir", config.state_dir, "--cgroup-parent", str(config.cgroup_parent)]
    if config.cgroup_version != "auto":
        args += ["--set", f"cgroup_version={config.cgroup_version}"]
    return args


def config_env(config: Config, **extra: str) -> dict[str, str]:
    """The environment for a `jobcage` process: the test's Config as JOBCAGE_* vars."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("JOBCAGE_")}
    env["JOBCAGE_STATE_DIR"] = config.state_dir
    env["JOBCAGE_CGROUP_PARENT"] = str(config.cgroup_parent)
    env["JOBCAGE_CGROUP_VERSION"] = config.cgroup_version
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '/usr/bin:/bin')}"
    env.update(extra)
    return env


def run_main(args: list[str]) -> tuple[int, str, str]:
    """main(args) in-process; returns (status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = main(args)
    return status, out.getvalue(), err.getvalue()


def list_json(config: Config) -> dict[str, dict]:
    status, out, err = run_main(["list", "--json", *config_args(config)])
    assert status == 0, err
    return {d["job_id"]: d for d in map(json.loads, out.splitlines())}


def start_run(config: Config, job_args: list[str], *shell: str, **popen) -> subprocess.Popen:
    """`jobcage run ... -- sh -c SCRIPT` as a process, with pipes to talk to the job.

    The job reports readiness by printing a line (read with ready()); it inherits
    jobcage run's stdin, so closing p.stdin releases a job blocked in `read`.
    """
    return subprocess.Popen(
        [JOBCAGE, "run", *job_args, "--", "sh", "-c", *shell],
        env=config_env(config),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        **popen,
    )


def ready(proc: subprocess.Popen) -> str:
    """Block until the job prints its first line: its own word that it is ready."""
    line = proc.stdout.readline()
    assert line, f"job ended before it was ready: {proc.stderr.read().decode()}"
    return line.decode().strip()


def wait_exit(pid: int, timeout: float = 30.0) -> bool:
    """Block on a pidfd until ``pid`` exits; False on timeout. Works for non-children."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        return bool(select.select([fd], [], [], timeout)[0])
    finally:
        os.close(fd)


def alive(pid: int) -> bool:
    return not wait_exit(pid, 0)


def cgroup_dirs_exist(paths: dict[str, str]) -> list[str]:
    return [p for p in paths.values() if os.path.isdir(p)]

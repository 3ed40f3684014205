"""A full or read-only state dir: create() is one JobCageError naming the directory and
what to do (the CLI: one line, exit 125), and nothing is left behind, neither cgroups
nor temporary record files. Temporary files of writers killed half-way are reap's."""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess

import pytest

from jobcage import JobCage
from jobcage.errors import StateDirError
from jobcage.recovery import reap

from .cli_support import config_args, run_main

pytestmark = pytest.mark.root

DEAD_PID = 2**22 + 1  # above pid_max's ceiling: never a live process


@pytest.fixture
def small_state_dir(cage_config, tmp_path):
    """The config's state dir on a 64 KiB tmpfs of its own, cages/ already made."""
    state = cage_config.state_dir
    os.makedirs(state)
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k,mode=755", "jc-state", state], check=True
    )
    try:
        os.makedirs(os.path.join(state, "cages"))
        yield state
    finally:
        subprocess.run(["umount", "-l", state], check=False)


def _fill(directory: str) -> None:
    fd = os.open(os.path.join(directory, "filler"), os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        with contextlib.suppress(OSError):
            while True:
                os.write(fd, b"\0" * 4096)
    finally:
        os.close(fd)


def _leftovers(state: str) -> list[str]:
    return [n for n in os.listdir(os.path.join(state, "cages")) if n != "filler"]


def test_a_full_state_dir_is_one_clear_error_and_leaves_nothing(cage_config, small_state_dir):
    _fill(small_state_dir)
    with pytest.raises(StateDirError) as err:
        JobCage("full.1", config=cage_config).create()
    assert small_state_dir in str(err.value) and "free space" in str(err.value)
    assert isinstance(err.value.__cause__, OSError)
    assert err.value.__cause__.errno == errno.ENOSPC
    assert _leftovers(small_state_dir) == []

    status, out, errtext = run_main(
        ["run", "--job-id", "full.2", *config_args(cage_config), "--", "true"]
    )
    assert status == 125 and out == ""
    assert errtext.count("\n") == 1 and "Traceback" not in errtext
    assert small_state_dir in errtext
    assert _leftovers(small_state_dir) == []
    os.unlink(os.path.join(small_state_dir, "filler"))


def test_a_read_only_state_dir_is_one_clear_error_and_leaves_nothing(cage_config, small_state_dir):
    subprocess.run(["mount", "-o", "remount,ro", small_state_dir], check=True)
    with pytest.raises(StateDirError, match="remount it read-write") as err:
        JobCage("ro.1", config=cage_config).create()
    assert small_state_dir in str(err.value)
    status, _out, errtext = run_main(
        ["run", "--job-id", "ro.2", *config_args(cage_config), "--", "true"]
    )
    assert status == 125 and errtext.count("\n") == 1 and "Read-only" in errtext
    subprocess.run(["mount", "-o", "remount,rw", small_state_dir], check=True)
    assert _leftovers(small_state_dir) == []


def test_reap_removes_temporary_files_of_dead_writers_only(cage_config):
    cages = os.path.join(cage_config.state_dir, "cages")
    usage = os.path.join(cage_config.state_dir, "usage")
    os.makedirs(cages)
    os.makedirs(usage)
    dead = [
        os.path.join(cages, f"a.1.json.{DEAD_PID}.tmp"),
        os.path.join(cages, f"a.2.json.{DEAD_PID}.3.claim"),
        os.path.join(usage, f"a.3.json.{DEAD_PID}.tmp"),
    ]
    live = os.path.join(cages, f"a.4.json.{os.getpid()}.tmp")
    for path in [*dead, live]:
        open(path, "w").close()
    report = reap(cage_config)
    assert sorted(report.removed_files) == sorted(dead)
    assert os.listdir(cages) == [os.path.basename(live)]
    os.unlink(live)

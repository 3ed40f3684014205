"""Crash recovery: `jobcage reap` after a SIGKILLed owner, beside live cages, and after an
owner killed half-way through create(). Every cage here is under a test-only parent."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from jobcage import JobCage, Usage
from jobcage.cgroups.base import read_pids
from jobcage.records import RecordState, StateStore
from jobcage.recovery import reap

from .cli_support import (
    JOBCAGE,
    alive,
    cgroup_dirs_exist,
    config_args,
    config_env,
    list_json,
    ready,
    run_main,
    start_run,
    wait_exit,
)
from .conftest import parent_dirs

pytestmark = pytest.mark.root


def _cage_pids(paths: dict[str, str]) -> set[int]:
    # The freezer cgroup on v1 (it holds every process), the one directory on v2.
    return read_pids([os.path.join(paths.get("freezer", paths.get("unified")), "cgroup.procs")])


def _sigkill_owner(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL


def test_sigkilled_run_is_contained_listed_orphaned_and_reaped(cage_config):
    proc = start_run(
        cage_config,
        ["--job-id", "crash.1"],
        "sleep 1000 & sleep 1000 & echo ready; wait",
    )
    assert ready(proc) == "ready"
    store = StateStore(cage_config.state_dir)
    paths = dict(store.load("crash.1").cgroup.paths)
    pids = _cage_pids(paths)
    assert len(pids) == 3

    _sigkill_owner(proc)

    # Contained: every process is alive and still inside the cage.
    assert all(alive(pid) for pid in pids)
    assert _cage_pids(paths) == pids
    cage = list_json(cage_config)["crash.1"]
    assert cage["status"] == "orphaned" and not cage["owner_alive"]
    assert cage["owner_pid"] == proc.pid and cage["processes"] == 3

    # A dry run changes nothing.
    status, out, _ = run_main(["reap", "--dry-run", *config_args(cage_config)])
    assert status == 0 and "would reap crash.1" in out
    assert all(alive(pid) for pid in pids)

    done = subprocess.run(
        [JOBCAGE, "reap", "--json"], env=config_env(cage_config), capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    [reaped] = report["cages"]
    assert reaped["job_id"] == "crash.1" and reaped["reason"] == "owner-dead"
    assert reaped["killed"] == 3 and reaped["errors"] == []
    assert all(wait_exit(pid, 10) for pid in pids)
    assert cgroup_dirs_exist(paths) == []
    assert store.records() == []
    saved = json.loads(Path(reaped["usage_file"]).read_text())
    assert saved["job_id"] == "crash.1" and saved["reaped"] is True
    assert saved["owner_pid"] == proc.pid
    assert saved["usage"]["processes_killed"] == 3
    assert saved["usage"]["memory_peak_bytes"] > 0
    assert saved["usage"]["wall_seconds"] > 0
    # The parent goes too, once no cage is left under it.
    assert not any(os.path.isdir(d) for d in parent_dirs(cage_config.cgroup_parent))


def test_reap_never_touches_a_cage_whose_owner_is_alive(cage_config):
    with JobCage("live.1", config=cage_config) as cage:
        proc = cage.spawn(["sleep", "1000"])
        report = reap(cage_config)
        assert report.cages == [] and report.live == 1
        assert proc.poll() is None and cage.pids() == {proc.pid}
    proc.wait()


def test_reap_beside_20_cages_being_built_and_destroyed_touches_none(cage_config):
    """20 `jobcage run`s at once, two rounds, while reap runs in a tight loop."""
    reports = []
    stop = threading.Event()

    def reap_loop() -> None:
        while not stop.is_set():
            reports.append(reap(cage_config))

    reaper = threading.Thread(target=reap_loop)
    reaper.start()
    try:
        for round_ in range(2):
            runs = [
                start_run(
                    cage_config,
                    ["--job-id", f"busy.{round_}.{i}"],
                    "echo ready; read x; exit 7",
                )
                for i in range(20)
            ]
            for run in runs:
                assert ready(run) == "ready"
            live = list_json(cage_config)
            assert len(live) == 20 and all(c["status"] == "running" for c in live.values())
            for run in runs:
                run.stdin.close()
            for run in runs:
                assert run.wait(timeout=60) == 7, run.stderr.read().decode()
    finally:
        stop.set()
        reaper.join()
    assert len(reports) > 1
    assert [(c.job_id, c.reason, c.removed) for r in reports for c in r.cages] == []
    assert reap(cage_config).cages == []


OWNER_DIES_IN_CREATE = textwrap.dedent(
    """
    import sys
    from jobcage import Config, JobCage
    from jobcage.cgroups.v1 import V1Cgroup
    from jobcage.cgroups.v2 import V2Cgroup

    def set_limits(self, memory_limit, pids_limit):
        print("cgroups-made", flush=True)
        sys.stdin.read()  # the test SIGKILLs us here

    V1Cgroup.set_limits = V2Cgroup.set_limits = set_limits
    config = Config(state_dir=sys.argv[1], cgroup_parent=sys.argv[2])
    JobCage("half.1", config=config, memory_limit="64M").create()
    """
)


def test_owner_killed_during_create_is_reaped_cleanly(cage_config):
    owner = subprocess.Popen(
        [
            sys.executable,
            "-c",
            OWNER_DIES_IN_CREATE,
            cage_config.state_dir,
            cage_config.cgroup_parent,
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    assert owner.stdout.readline() == b"cgroups-made\n"
    _sigkill_owner(owner)
    store = StateStore(cage_config.state_dir)
    record = store.load("half.1")
    assert record.state is RecordState.BUILDING
    made = cgroup_dirs_exist(dict(record.cgroup.paths))
    assert made, "the owner had created cgroups before it died"
    assert list_json(cage_config)["half.1"]["status"] == "orphaned"

    report = reap(cage_config)
    assert [(c.job_id, c.reason, c.errors) for c in report.cages] == [("half.1", "owner-dead", [])]
    assert cgroup_dirs_exist(dict(record.cgroup.paths)) == []
    assert store.records() == []
    # No job ever ran in it (spawn comes after create): nothing to bill.
    assert report.cages[0].usage_file is None
    assert not os.path.exists(os.path.join(cage_config.state_dir, "usage"))


def test_an_empty_record_is_set_aside_and_its_cage_reaped_as_unrecorded(cage_config):
    """Records are linked into place complete: an empty one is damage, not a claim."""
    cage = JobCage("empty.1", config=cage_config).create()
    proc = cage.spawn(["sleep", "1000"])
    store = StateStore(cage_config.state_dir)
    open(store.path("empty.1"), "w").close()
    report = reap(cage_config)
    [aside] = report.set_aside
    assert aside.path == store.path("empty.1") and "not JSON" in aside.reason
    assert os.path.dirname(aside.moved_to) == store.bad_dir
    [reaped] = report.cages
    assert (reaped.job_id, reaped.reason, reaped.killed, reaped.errors) == (
        "empty.1",
        "no-record",
        1,
        [],
    )
    assert proc.wait(timeout=10) == -signal.SIGKILL
    assert store.records() == [] and os.listdir(store.cages_dir) == ["bad"]
    shutil.rmtree(store.bad_dir)
    cage._state = type(cage._state).DESTROYED


def test_cgroup_without_a_record_is_removed_with_its_processes(cage_config):
    """A cage whose record is gone (say, a wiped state dir) leaves only cgroups."""
    cage = JobCage("norecord.1", config=cage_config).create()
    proc = cage.spawn(["sleep", "1000"])
    paths = cage.cgroup_paths
    StateStore(cage_config.state_dir).remove("norecord.1")
    status, out, _ = run_main(["reap", "--dry-run", *config_args(cage_config)])
    assert status == 0 and "would reap norecord.1 (no-record)" in out
    assert proc.poll() is None

    report = reap(cage_config)
    [reaped] = report.cages
    assert (reaped.job_id, reaped.reason, reaped.killed, reaped.errors) == (
        "norecord.1",
        "no-record",
        1,
        [],
    )
    assert proc.wait(timeout=10) == -signal.SIGKILL
    assert cgroup_dirs_exist(paths) == []
    # The reaper's own claim on the id is released again.
    assert StateStore(cage_config.state_dir).records() == []
    cage._state = type(cage._state).DESTROYED  # its cgroups are gone; nothing to tear down


def test_teardown_failed_record_is_reaped_even_with_a_live_owner(cage_config):
    """destroy() gave up on a cage (D-state survivors): the owner never returns to it."""
    cage = JobCage("gaveup.1", config=cage_config).create()
    proc = cage.spawn(["sleep", "1000"])
    store = StateStore(cage_config.state_dir)
    record = store.load("gaveup.1")
    store.save(
        record.replace(
            state=RecordState.TEARDOWN_FAILED,
            final_usage=Usage(wall_seconds=1.5, processes_killed=0),
        )
    )
    [reaped] = reap(cage_config).cages
    assert reaped.reason == "teardown-failed" and reaped.errors == []
    assert reaped.usage.wall_seconds == 1.5 and reaped.usage.processes_killed == 1
    assert proc.wait(timeout=10) == -signal.SIGKILL
    assert store.records() == []
    cage._state = type(cage._state).DESTROYED


def test_two_reapers_at_once_reap_each_cage_once(cage_config):
    runs = [
        start_run(cage_config, ["--job-id", f"twice.{i}"], "echo ready; sleep 1000")
        for i in range(5)
    ]
    for run in runs:
        assert ready(run) == "ready"
        _sigkill_owner(run)
    reapers = [
        subprocess.Popen(
            [JOBCAGE, "reap", "--json"], env=config_env(cage_config), stdout=subprocess.PIPE
        )
        for _ in range(3)
    ]
    reaped = []
    for r in reapers:
        out, _ = r.communicate(timeout=60)
        assert r.returncode == 0
        reaped += [c["job_id"] for c in json.loads(out)["cages"]]
    assert sorted(reaped) == [f"twice.{i}" for i in range(5)]
    usage_dir = os.path.join(cage_config.state_dir, "usage")
    assert sorted(os.listdir(usage_dir)) == [f"twice.{i}.json" for i in range(5)]

"""A record is input: reap, list, stats and kill never act on what a record names
unless JobCage derives that name itself from a valid job id under its own parent, and
one record that cannot be believed is reported, set aside, and stops nothing else."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import uuid

import pytest

from jobcage import JobCage
from jobcage.cgroups import probe
from jobcage.cgroups.base import read_pids, rmdir_tree, write_file
from jobcage.records import StateStore
from jobcage.recovery import reap

from .cli_support import config_args, list_json, run_main

pytestmark = pytest.mark.root

DEAD_PID = 2**22 + 1  # above pid_max's ceiling: never a live process


def _write_record(store: StateStore, name: str, content: bytes) -> str:
    os.makedirs(store.cages_dir, exist_ok=True)
    path = os.path.join(store.cages_dir, f"{name}.json")
    with open(path, "wb") as f:
        f.write(content)
    return path


def _dead_record(job_id: object, **fields) -> bytes:
    record = {
        "format": 1,
        "job_id": job_id,
        "owner_pid": DEAD_PID,
        "owner_start_ticks": 1,
        "created_unix": 1.0,
        "state": "built",
        "cgroup": None,
        "network": None,
        **fields,
    }
    return json.dumps(record).encode()


@pytest.fixture
def foreign_cgroup():
    """A cgroup that is not a cage's, with a process in it: what a record must not kill."""
    h = probe()
    if "freezer" in h.v1_mounts:
        controller, mount = "freezer", h.v1_mounts["freezer"]
    else:
        controller, mount = "unified", h.v2_mount
    top = os.path.join(mount, f"jobcage-test-{uuid.uuid4().hex[:8]}-foreign")
    path = os.path.join(top, "victim.1")
    os.makedirs(path)
    proc = subprocess.Popen(["sleep", "1000"])
    try:
        write_file(os.path.join(path, "cgroup.procs"), str(proc.pid))
        yield controller, path, proc
    finally:
        proc.kill()
        proc.wait()
        rmdir_tree(top)


def test_a_record_naming_a_foreign_cgroup_gets_nothing_killed_or_removed(
    cage_config, foreign_cgroup
):
    controller, path, proc = foreign_cgroup
    store = StateStore(cage_config.state_dir)
    _write_record(
        store,
        "victim.1",
        _dead_record(
            "victim.1",
            cgroup={"version": 1 if controller != "unified" else 2, "paths": {controller: path}},
        ),
    )
    report = reap(cage_config)
    assert proc.poll() is None and os.path.isdir(path)
    assert read_pids([os.path.join(path, "cgroup.procs")]) == {proc.pid}
    [aside] = report.set_aside
    assert path in aside.reason and "not a JobCage cage directory" in aside.reason
    assert [c.job_id for c in report.cages] == []
    shutil.rmtree(store.bad_dir)


@pytest.mark.network
def test_a_netns_name_that_climbs_out_of_run_netns_is_not_unmounted(node, cage_config, tmp_path):
    """In the simulated node: what reap did before (read and remove rules) stays there."""
    victim = tmp_path / "victim"
    victim.mkdir()
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k", "jc-victim", str(victim)], check=True
    )
    try:
        store = StateStore(cage_config.state_dir)
        climbing = os.path.relpath(victim, "/run/netns")
        network = {
            "netns_name": climbing,
            "host_veth": "jc000000000000h",
            "address": "100.64.0.2/30",
            "host_address": "100.64.0.1/30",
            "lease_index": 0,
            "pool": "100.64.0.0/16",
            "campus_networks": [],
            "allow_node_access": False,
            "firewall": "nftables",
        }
        _write_record(store, "climb.1", _dead_record("climb.1", network=network))
        status, _out, err = run_main(["reap", *config_args(cage_config)])
        assert os.path.ismount(victim)
        assert status == 0, err
        assert f"network.netns_name {climbing!r}" in err and "moved to" in err
        shutil.rmtree(store.bad_dir)
    finally:
        subprocess.run(["umount", str(victim)], check=False)


BAD_RECORDS = {
    "list.1": b"[1, 2, 3]",
    "string.1": b'"a string"',
    "number.1": b"42",
    "types.1": _dead_record("types.1", owner_pid="4242", state=7),
    "binary.1": b'{"job_id": "\xff\xfe\xfd"}',
    "nullid.1": _dead_record(None),
    "missingid.1": b'{"state": "built", "owner_pid": 1}',
    "mismatch.1": _dead_record("other.1"),
    "climbid.1": _dead_record("../../etc"),
}


def test_malformed_records_stop_nothing_and_are_set_aside(cage_config):
    """Beside every kind of bad record: list and stats work, a real orphan is reaped,
    and each bad record is reported with its path and moved to cages/bad/."""
    store = StateStore(cage_config.state_dir)
    live = JobCage("live.1", config=cage_config).create()
    orphan = JobCage("orphan.1", config=cage_config).create()
    orphan_proc = orphan.spawn(["sleep", "1000"])
    store.remove("orphan.1")  # its record gone: an orphan reap must still find
    for name, content in BAD_RECORDS.items():
        _write_record(store, name, content)
    try:
        status, _out, err = run_main(["list", *config_args(cage_config)])
        assert status == 0
        for name in BAD_RECORDS:
            assert store.path(name) in err
        assert set(list_json(cage_config)) == {"live.1"}
        assert run_main(["stats", "live.1", *config_args(cage_config)])[0] == 0
        status, _out, err = run_main(["kill", "list.1", *config_args(cage_config)])
        assert status == 1 and "JSON array" in err and "Traceback" not in err

        status, out, err = run_main(["reap", *config_args(cage_config)])
        assert status == 0, err
        assert "reaped orphan.1 (no-record)" in out
        assert orphan_proc.wait(timeout=10) == -signal.SIGKILL
        assert sorted(os.listdir(store.cages_dir)) == ["bad", "live.1.json"]
        assert len(os.listdir(store.bad_dir)) == len(BAD_RECORDS)
        for name in BAD_RECORDS:
            assert store.path(name) in err
        assert run_main(["reap", *config_args(cage_config)])[1].startswith("nothing to reap")
    finally:
        live.destroy()
        orphan._state = type(orphan._state).DESTROYED
        shutil.rmtree(store.bad_dir, ignore_errors=True)


def test_doctor_and_every_command_refuse_a_world_writable_state_dir(cage_config):
    os.makedirs(cage_config.state_dir)
    os.chmod(cage_config.state_dir, 0o777)
    for command in (["list"], ["reap"], ["stats", "x.1"]):
        status, _out, err = run_main([*command, *config_args(cage_config)])
        assert status == 1 and "refusing the state dir" in err and "writable by others" in err
    with pytest.raises(Exception, match="refusing the state dir"):
        JobCage("ww.1", config=cage_config).create()
    status, out, _err = run_main(["doctor", "--no-network", *config_args(cage_config)])
    assert "FAIL  state dir" in out and "writable by others" in out


def test_a_newer_formats_record_is_left_alone_and_so_is_its_cage(cage_config):
    """An upgrade under way: a cage built by a newer JobCage is neither set aside nor
    reaped as unrecorded by this one; reap says so and exits 1."""
    store = StateStore(cage_config.state_dir)
    cage = JobCage("newer.1", config=cage_config).create()
    proc = cage.spawn(["sleep", "1000"])
    _write_record(store, "newer.1", json.dumps({"format": 99, "job_id": "newer.1"}).encode())
    try:
        status, _out, err = run_main(["reap", *config_args(cage_config)])
        assert status == 1 and "newer than this JobCage reads" in err
        assert proc.poll() is None and os.path.exists(store.path("newer.1"))
    finally:
        store.remove("newer.1")
        cage.destroy()


def test_a_damaged_record_of_a_running_owner_stays_and_so_does_its_cage(cage_config):
    """A record that fails validation but names its owner soundly: while that owner runs,
    reap neither sets it aside nor kills the cage as unrecorded; once the owner is gone
    (here: the record names a dead one), it is set aside as before."""
    store = StateStore(cage_config.state_dir)
    cage = JobCage("damaged.1", config=cage_config).create()
    proc = cage.spawn(["sleep", "1000"])
    path = store.path("damaged.1")
    with open(path, "rb") as f:
        sound = f.read()
    damaged = json.loads(sound)
    damaged["state"] = 7
    _write_record(store, "damaged.1", json.dumps(damaged).encode())
    try:
        status, _out, err = run_main(["reap", *config_args(cage_config)])
        assert status == 1 and "has state 7" in err and f"owner (pid {os.getpid()})" in err
        assert proc.poll() is None and os.path.exists(path)
        assert not os.path.exists(store.bad_dir)

        damaged["owner_pid"] = DEAD_PID
        _write_record(store, "damaged.1", json.dumps(damaged).encode())
        report = reap(cage_config)
        [aside] = report.set_aside
        assert aside.path == path
        assert [(c.job_id, c.reason) for c in report.cages] == [("damaged.1", "no-record")]
        assert proc.wait(timeout=10) == -signal.SIGKILL
    finally:
        shutil.rmtree(store.bad_dir, ignore_errors=True)
        if os.path.exists(path):
            _write_record(store, "damaged.1", sound)
            cage.destroy()
        else:
            cage._state = type(cage._state).DESTROYED

"""The record store on a real file system (a temp dir): a claim is exclusive, an update
replaces the record whole and leaves no temporary file behind, and a record is input:
anything that cannot be believed is a RecordError naming the file and why."""

from __future__ import annotations

import json
import os

import pytest

from jobcage.errors import CageExistsError, RecordError, StateDirError
from jobcage.ids import netns_name, veth_names
from jobcage.records import (
    RECORD_FORMAT,
    CgroupPart,
    RecordState,
    StateStore,
    parse_record,
)
from jobcage.records.store import temp_file_writer


def test_updates_replace_the_record_and_leave_only_it(tmp_path):
    store = StateStore(str(tmp_path / "state"))
    record = store.new_record("j1")
    store.claim(record)
    for state in (RecordState.BUILT, RecordState.TEARDOWN_FAILED):
        record = record.replace(state=state)
        store.save(record)
        assert store.load("j1").state is state
    assert os.listdir(store.cages_dir) == ["j1.json"]
    with pytest.raises(CageExistsError, match="already exists"):
        store.claim(store.new_record("j1"))
    store.remove("j1")
    assert os.listdir(store.cages_dir) == []


def test_saving_a_record_that_is_not_there_creates_it(tmp_path):
    """RENAME_EXCHANGE needs both names; without the old one, save renames."""
    store = StateStore(str(tmp_path / "state"))
    record = store.new_record("j2")
    store.claim(record)
    store.remove("j2")
    store.save(record)
    assert store.load("j2").job_id == "j2"
    assert os.listdir(store.cages_dir) == ["j2.json"]


def test_a_record_round_trips_with_the_one_format(tmp_path):
    store = StateStore(str(tmp_path / "state"))
    record = store.new_record("j3", cgroup=CgroupPart(1, {"freezer": "/sys/fs/cgroup/x/j3"}))
    store.claim(record)
    with open(store.path("j3")) as f:
        data = json.load(f)
    assert data["format"] == RECORD_FORMAT and data["state"] == "building"
    assert store.load("j3") == record


FORMAT_1 = {
    "format": 1,
    "job_id": "1234.0",
    "owner_pid": 4242,
    "owner_start_ticks": 99,
    "created_unix": 1700000000.5,
    "state": "built",
    "cgroup": {"version": 1, "paths": {"freezer": "/sys/fs/cgroup/freezer/jobcage/1234.0"}},
    "network": {
        "format": 1,
        "job_id": "1234.0",
        "netns_name": netns_name("1234.0"),
        "netns_path": f"/run/netns/{netns_name('1234.0')}",
        "host_veth": veth_names("1234.0")[0],
        "address": "100.64.0.2/30",
        "host_address": "100.64.0.1/30",
        "lease_index": 0,
        "pool": "100.64.0.0/16",
        "campus_networks": ["192.0.2.0/24"],
        "allow_node_access": False,
        "state_dir": "/run/jobcage",
        "resolv_conf_path": None,
        "firewall": "nftables",
        "chains": {},
    },
    "limits": {"memory_bytes": None, "pids": None},
    "config": {"state_dir": "/run/jobcage", "cgroup_version": 1, "cgroup_parent": None},
}


def test_a_format_1_record_still_reads():
    record = parse_record(json.loads(json.dumps(FORMAT_1)), "1234.0")
    assert record.state is RecordState.BUILT and record.owner.pid == 4242
    assert record.network.netns_name == netns_name("1234.0")
    assert record.network.address == "100.64.0.2/30"


def _with(**changes):
    data = json.loads(json.dumps(FORMAT_1))
    for dotted, value in changes.items():
        *path, key = dotted.split("__")
        where = data
        for p in path:
            where = where[p]
        where[key] = value
    return data


@pytest.mark.parametrize(
    ("data", "why"),
    [
        ([1, 2], "JSON array"),
        ("a string", "JSON string"),
        (42, "JSON number"),
        (None, "JSON null"),
        (_with(job_id=None), "bad job id"),
        (_with(job_id="../../etc"), "bad job id"),
        (_with(job_id="other.1"), "not the '1234.0' of its file name"),
        (_with(owner_pid="4242"), "owner_pid"),
        (_with(owner_pid=True), "owner_pid"),
        (_with(state="running"), "state 'running'"),
        (_with(created_unix="yesterday"), "created_unix"),
        (_with(format=99), "format 99"),
        (_with(cgroup=[]), "cgroup of type array"),
        (_with(cgroup__version=3), "cgroup.version"),
        (_with(cgroup__paths__freezer="/sys/fs/cgroup/freezer/foreign"), "not <parent>/1234.0"),
        (_with(cgroup__paths__freezer="/sys/fs/cgroup/a/../1234.0"), "not <parent>/1234.0"),
        (_with(cgroup__paths__freezer="relative/1234.0"), "not an absolute path"),
        (_with(network__netns_name="../../x"), "network.netns_name '../../x'"),
        (_with(network__netns_path="/proc/1/ns/net"), "network.netns_path"),
        (_with(network__host_veth="eth0"), "network.host_veth 'eth0'"),
        (_with(network__resolv_conf_path="/etc/resolv.conf"), "resolv_conf_path"),
        (_with(network__lease_index=-1), "lease_index"),
        (_with(network__address="not-an-address"), "bad network address"),
        (_with(network__firewall="pf"), "network.firewall 'pf'"),
        (_with(network__allow_node_access="yes"), "allow_node_access"),
        (_with(network__ipv6={"address": "eth0"}), "bad network.ipv6 address"),
        (_with(network__uplink="../eth0"), "network.uplink"),
        (_with(final_usage={"wall_seconds": "long"}), "final_usage.wall_seconds"),
    ],
)
def test_a_record_that_cannot_be_believed_is_refused_saying_why(data, why):
    with pytest.raises(RecordError, match=why.replace("(", r"\(").replace(".", r"\.")):
        parse_record(data, "1234.0")


def test_load_of_a_bad_record_names_the_file_and_scan_goes_on(tmp_path):
    store = StateStore(str(tmp_path / "state"))
    store.claim(store.new_record("good.1"))
    with open(os.path.join(store.cages_dir, "list.1.json"), "w") as f:
        f.write("[1, 2]")
    with open(os.path.join(store.cages_dir, "bytes.1.json"), "wb") as f:
        f.write(b'{"job_id": "\xff\xfe"}')
    with pytest.raises(RecordError, match=r"list\.1\.json: is a JSON array"):
        store.load("list.1")
    good, bad = store.scan()
    assert [r.job_id for r in good] == ["good.1"]
    assert sorted((b.job_id, b.reason) for b in bad) == [
        ("bytes.1", "is not UTF-8"),
        ("list.1", "is a JSON array, not an object"),
    ]
    moved = store.set_aside(bad[0])
    assert os.path.dirname(moved) == store.bad_dir and not os.path.exists(bad[0].path)
    store.remove("good.1")


@pytest.mark.parametrize("mode", [0o777, 0o775, 0o757])
def test_a_state_dir_others_can_write_is_refused(tmp_path, mode):
    state = tmp_path / "state"
    state.mkdir()
    state.chmod(mode)
    store = StateStore(str(state))
    assert "writable by" in store.unsafe_reason()
    with pytest.raises(StateDirError, match=r"refusing the state dir.*chmod 755"):
        store.claim(store.new_record("j4"))
    with pytest.raises(StateDirError):
        store.scan()
    assert not (state / "cages").exists()


def test_temporary_files_name_their_writer():
    assert temp_file_writer("1234.0.json.4242.tmp") == 4242
    assert temp_file_writer("1234.0.json.4242.7.claim") == 4242
    assert temp_file_writer("1234.0.json") is None
    assert temp_file_writer("tmp") is None


def test_the_network_part_round_trips_and_keeps_what_a_newer_writer_added():
    data = _with(network__uplink="eth0", network__future_field={"x": 1})
    record = parse_record(data, "1234.0")
    again = parse_record(record.to_dict("/run/jobcage"), "1234.0")
    assert again == record
    assert again.network.uplink == "eth0" and again.network.extra == {"future_field": {"x": 1}}

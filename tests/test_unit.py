"""Pure logic: ids, sizes, config, probes, usage records, fake cgroupfs trees. No root."""

from __future__ import annotations

import ipaddress
import json
import os

import pytest

import jobcage
from jobcage import Config, ConfigError, InvalidJobIdError, Usage
from jobcage.cgroups import Hierarchies, open_backend, parse_mountinfo, probe_from
from jobcage.cgroups.base import CageCgroup, CgroupStats
from jobcage.cgroups.v1 import V1Cgroup
from jobcage.cgroups.v2 import CgroupV2Backend, V2Cgroup
from jobcage.config import load_config, parse_size
from jobcage.ids import validate_job_id, veth_names

MOUNTINFO = """\
25 30 0:22 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro,mode=755
26 25 0:23 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
27 25 0:24 / /sys/fs/cgroup/cpu,cpuacct rw,relatime - cgroup cgroup rw,cpu,cpuacct
28 25 0:25 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
29 25 0:26 / /sys/fs/cgroup/freezer rw,relatime - cgroup cgroup rw,freezer
30 25 0:27 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,xattr,name=systemd
"""
PROC_CGROUP = """\
5:name=systemd:/user.slice
4:freezer:/
3:memory:/user.slice/session-1.scope
2:cpu,cpuacct:/user.slice
0::/user.slice/session-1.scope
"""


def test_public_names_are_pinned():
    assert sorted(jobcage.__all__) == sorted(
        [
            "AddressPoolExhaustedError",
            "CageExistsError",
            "CageNotFoundError",
            "CageStateError",
            "Config",
            "ConfigError",
            "InvalidJobIdError",
            "JobCage",
            "JobCageError",
            "KernelFeatureError",
            "NetworkError",
            "NotRootError",
            "SpawnError",
            "TeardownError",
            "Usage",
        ]
    )


@pytest.mark.parametrize("job_id", ["1234.0", "slurm-99.batch", "a", "x" * 128, "c:1@h+2=3,4"])
def test_good_job_ids(job_id):
    assert validate_job_id(job_id) == job_id


@pytest.mark.parametrize(
    "job_id",
    [
        "",
        "a/b",
        "..",
        "a..b",
        ".",
        ".hidden",
        "-rf",
        "has space",
        "tab\tx",
        "nl\n",
        "ctl\x01",
        "x" * 129,
        "é",
        1234,
        None,
    ],
)
def test_bad_job_ids(job_id):
    with pytest.raises(InvalidJobIdError):
        validate_job_id(job_id)


def test_veth_names_fit_ifnamsiz_and_differ():
    host, job = veth_names("x" * 128)
    assert len(host.encode()) <= 15 and len(job.encode()) <= 15
    assert veth_names("1.0") != veth_names("1.1")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2G", 2 << 30),
        ("512M", 512 << 20),
        ("512MiB", 512 << 20),
        ("1048576", 1 << 20),
        ("1.5G", 3 << 29),
        ("1.5m", 1536 << 10),
        (4 << 20, 4 << 20),
        (None, None),
    ],
)
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["lots", "-1G", "0", "2X", "1.5k", 4096, "1e99", "inf", 2**70])
def test_parse_size_rejects(text):
    with pytest.raises(ConfigError):
        parse_size(text)


def test_config_precedence(tmp_path):
    path = tmp_path / "jobcage.toml"
    path.write_text(
        'state_dir = "/from/file"\npids_limit = 10\ncampus_networks = ["10.0.0.0/8"]\n'
    )
    env = {"JOBCAGE_PIDS_LIMIT": "20"}
    config = load_config(str(path), env, state_dir="/from/cli")
    assert config.state_dir == "/from/cli"  # command line beats everything
    assert config.pids_limit == 20  # environment beats file
    assert config.campus_networks == (ipaddress.IPv4Network("10.0.0.0/8"),)  # file beats default
    assert config.address_pool == Config().address_pool


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ("colour = 1\n", ["unknown key", "'colour'"]),
        ("pids_limit = -3\n", ["pids_limit"]),
        ("allow_node_access = 'sometimes'\n", ["allow_node_access"]),
        ("state_dir = [\n", ["not valid TOML"]),
    ],
)
def test_config_errors_name_key_and_file(tmp_path, body, words):
    path = tmp_path / "bad.toml"
    path.write_text(body)
    with pytest.raises(ConfigError) as err:
        load_config(str(path), {})
    assert str(path) in str(err.value)
    for word in words:
        assert word in str(err.value)


def test_probe_hybrid_layout():
    v1, v2 = parse_mountinfo(MOUNTINFO)
    assert v1 == {
        "cpu": "/sys/fs/cgroup/cpu,cpuacct",
        "cpuacct": "/sys/fs/cgroup/cpu,cpuacct",
        "memory": "/sys/fs/cgroup/memory",
        "freezer": "/sys/fs/cgroup/freezer",
    }
    assert v2 == "/sys/fs/cgroup/unified"
    h = probe_from(MOUNTINFO, PROC_CGROUP)
    assert h.v1_own["memory"] == "/user.slice/session-1.scope"
    assert h.v2_own == "/user.slice/session-1.scope"
    assert h.default_version == 1  # memory is on v1


def test_probe_pure_v2_picks_v2():
    h = Hierarchies(
        v2_mount="/sys/fs/cgroup", v2_own="/x", v2_controllers=frozenset({"memory", "io", "pids"})
    )
    assert h.default_version == 2


def test_usage_json_keeps_none_and_units():
    u = Usage(wall_seconds=1.5, cpu_user_seconds=0.25, memory_peak_bytes=1024)
    data = json.loads(u.to_json())
    assert data["memory_peak_bytes"] == 1024
    assert data["io_read_bytes"] is None  # unknown, never a made-up 0
    assert Usage.from_dict(data) == u
    assert all(
        name.split("_")[-1]
        in {
            "seconds",
            "bytes",
            "kills",
            "packets",
            "killed",
            "surviving",
            "gaps",
            "unix",
            "cpus",
            "periods",
        }
        | {"started", "execs", "processes", "lost", "detections"}  # the watcher's counts
        for name in data
    )
    table = u.to_table()
    assert "1.0 KiB" in table and "n/a" in table


# -- fake cgroupfs trees ------------------------------------------------------------


def _lay_out(root, files: dict[str, str]) -> None:
    for name, content in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content)


def test_v2_stats_from_fake_tree(tmp_path):
    _lay_out(
        tmp_path,
        {
            "cpu.stat": "usage_usec 3500000\nuser_usec 2500000\nsystem_usec 1000000\n",
            "memory.peak": "73400320\n",
            "memory.max": "104857600\n",
            "memory.events": "low 0\nhigh 0\nmax 12\noom 2\noom_kill 1\n",
            "io.stat": "254:0 rbytes=4096 wbytes=8388608 rios=1 wios=8 dbytes=0 dios=0\n"
            "8:0 rbytes=1000 wbytes=0 rios=1 wios=0 dbytes=0 dios=0\n",
        },
    )
    stats = V2Cgroup({"unified": str(tmp_path)}).stats()
    assert stats == CgroupStats(2.5, 1.0, 73400320, 104857600, 1, 5096, 8388608)


def test_v2_stats_without_controllers_are_none(tmp_path):
    # The hybrid unified hierarchy: core files only, as on this machine.
    _lay_out(tmp_path, {"cpu.stat": "usage_usec 10\nuser_usec 6\nsystem_usec 4\n"})
    stats = V2Cgroup({"unified": str(tmp_path)}).stats()
    assert stats.cpu_user_seconds == 6e-6
    assert stats.memory_peak_bytes is None and stats.oom_kills is None
    assert stats.io_read_bytes is None and stats.memory_limit_bytes is None


def test_v2_limits_written_and_swap_closed(tmp_path):
    _lay_out(tmp_path, {"memory.max": "max\n", "memory.swap.max": "max\n", "pids.max": "max\n"})
    V2Cgroup({"unified": str(tmp_path)}).set_limits(64 << 20, 100)
    assert (tmp_path / "memory.max").read_text() == str(64 << 20)
    assert (tmp_path / "memory.swap.max").read_text() == "0"
    assert (tmp_path / "pids.max").read_text() == "100"


def test_v2_missing_controller_is_named(tmp_path):
    with pytest.raises(jobcage.KernelFeatureError) as err:
        V2Cgroup({"unified": str(tmp_path)}).set_limits(None, 100)
    assert "pids" in str(err.value) and "subtree_control" in str(err.value)


def test_v2_parent_delegates_controllers(tmp_path):
    _lay_out(
        tmp_path,
        {
            "cgroup.controllers": "cpuset cpu io memory hugetlb pids rdma\n",
            "cgroup.subtree_control": "",
            "jobs/cgroup.controllers": "cpu io memory pids\n",
            "jobs/cgroup.subtree_control": "",
        },
    )
    h = Hierarchies(v2_mount=str(tmp_path), v2_own="/", v2_controllers=frozenset())
    backend = CgroupV2Backend(h, Config(cgroup_parent="/jobs"))
    backend._prepare_parent()
    assert set((tmp_path / "cgroup.subtree_control").read_text().split()) == {
        "+memory",
        "+io",
        "+pids",
        "+cpu",
    }
    assert set((tmp_path / "jobs/cgroup.subtree_control").read_text().split()) == {
        "+memory",
        "+io",
        "+pids",
        "+cpu",
    }


def test_v1_stats_from_fake_tree(tmp_path):
    _lay_out(
        tmp_path,
        {
            "cpuacct/cpuacct.usage_user": "1500000000\n",
            "cpuacct/cpuacct.usage_sys": "500000000\n",
            "memory/memory.max_usage_in_bytes": "5242880\n",
            "memory/memory.limit_in_bytes": "9223372036854771712\n",
            "memory/memory.oom_control": "oom_kill_disable 0\nunder_oom 0\noom_kill 3\n",
            "blkio/blkio.throttle.io_service_bytes_recursive": (
                "254:0 Read 4096\n254:0 Write 1048576\n"
                "254:0 Sync 0\n254:0 Total 1052672\nTotal 1052672\n"
            ),
        },
    )
    cg = V1Cgroup({c: str(tmp_path / c) for c in ("cpuacct", "memory", "blkio")})
    assert cg.stats() == CgroupStats(1.5, 0.5, 5242880, None, 3, 4096, 1048576)


class _StuckCgroup(CageCgroup):
    """A cage whose one task never freezes nor dies: D state, as on a hung NFS mount."""

    version = 1

    def __init__(self):
        super().__init__({})
        self.thawed = 0
        self.signalled = 0

    def join_files(self):
        return []

    def pids(self):
        return {os.getpid()}  # never signalled: kill_signal_all claims the kill

    def kill_signal_all(self):
        self.signalled += 1
        return True

    def freeze(self, timeout=0.0):
        return False

    def thaw(self):
        self.thawed += 1

    def wait_empty(self, timeout):
        return False

    def stats(self):
        return CgroupStats()

    def remove(self):
        pass


def test_kill_protocol_is_bounded_and_never_leaves_frozen():
    cg = _StuckCgroup()
    result = cg.kill_all(deadline=0.05)
    assert result.surviving == 1 and not result.froze
    assert cg.thawed == cg.signalled >= 1  # every freeze attempt was thawed back


def test_unknown_cgroup_version_is_config_error():
    with pytest.raises(ConfigError):
        open_backend(Config(cgroup_version="3"), Hierarchies())

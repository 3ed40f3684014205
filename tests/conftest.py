"""Shared fixtures: a test-only cgroup parent and state dir per test, and leak checks.

Every cgroup a test makes lives under ``/jobcage-test-<suffix>`` (a unique suffix per
test, so overlapping runs never meet) and every record under the test's tmp_path.
After each test the fixture proves the parent is empty of cages, then removes it; a
test that leaked fails here rather than leaving the shared machine dirty.
"""

from __future__ import annotations

import contextlib
import os
import uuid

import pytest

from jobcage import Config
from jobcage.cgroups import probe
from jobcage.cgroups.base import rmdir_tree

pytest_plugins = ["tests.conftest_network"]

IS_ROOT = os.geteuid() == 0
IN_VM = os.environ.get("JOBCAGE_IN_VM") == "1"


PR_SET_CHILD_SUBREAPER = 36


def pytest_configure(config):
    """Make the test process the reaper of every orphan its jobs leave.

    Killed jobs' orphans are reparented to the nearest subreaper, else to pid 1; on
    this machine pid 1 (a VM agent) does not reap them, so without this every
    orphan of a killed fork storm would stay a zombie until reboot.
    """
    if IS_ROOT:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


@pytest.fixture(autouse=True)
def _reap_orphans():
    yield
    reap_zombie_children()


def reap_zombie_children() -> None:
    """waitpid() our own zombie children: orphans of killed jobs we became parent of."""
    me = os.getpid()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rindex(b")") + 2 :].split()
        if fields[0] == b"Z" and int(fields[1]) == me:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(int(entry.name), os.WNOHANG)


def pytest_collection_modifyitems(config, items):
    skip_root = pytest.mark.skip(reason="needs root: real cgroups, namespaces and iptables")
    for item in items:
        if "root" in item.keywords and not IS_ROOT:
            item.add_marker(skip_root)


def unique(prefix: str = "t") -> str:
    return f"{prefix}{uuid.uuid4().hex[:8]}"


def parent_dirs(parent: str) -> list[str]:
    """The test parent's directory in every hierarchy this node mounts."""
    h = probe()
    dirs = [os.path.join(m, parent.lstrip("/")) for m in h.v1_mounts.values()]
    if h.v2_mount:
        dirs.append(os.path.join(h.v2_mount, parent.lstrip("/")))
    return dirs


def _clean_parent(parent: str) -> list[str]:
    """Kill and remove whatever a test left under ``parent``; return what was left.

    Everything is killed first, in every hierarchy, and only then removed: a v1
    memory cgroup cannot be removed while the freezer one still holds live processes.
    """
    dirs = [d for d in parent_dirs(parent) if os.path.isdir(d)]
    leaked = [e.path for d in dirs for e in os.scandir(d) if e.is_dir()]
    for path in leaked:
        _kill_cgroup(path)
    for d in dirs:
        rmdir_tree(d)
    return leaked


def _kill_cgroup(path: str) -> None:
    from jobcage.cgroups.v1 import V1Cgroup
    from jobcage.cgroups.v2 import V2Cgroup

    if "/unified/" in path or os.path.exists(os.path.join(path, "cgroup.events")):
        V2Cgroup({"unified": path}).kill_all(deadline=10)
    elif os.path.exists(os.path.join(path, "freezer.state")):
        V1Cgroup({"freezer": path}).kill_all(deadline=10)


def _make_config(tmp_path, **changes) -> Config:
    parent = f"/jobcage-test-{uuid.uuid4().hex[:8]}"
    return Config(state_dir=str(tmp_path / "state"), cgroup_parent=parent, **changes)


@pytest.fixture
def cage_config(tmp_path):
    """A Config with a unique test-only cgroup parent and state dir; checks for leaks."""
    config = _make_config(tmp_path)
    yield config
    _finish(config)


@pytest.fixture
def cage_config_v2(tmp_path):
    """Like cage_config, on the cgroup v2 backend (the unified hierarchy here)."""
    h = probe()
    if not h.v2_mount:
        pytest.skip("no cgroup v2 hierarchy mounted on this node")
    config = _make_config(tmp_path, cgroup_version="2")
    yield config
    _finish(config)


def _finish(config: Config) -> None:
    leaked = _clean_parent(config.cgroup_parent)
    records = os.path.join(config.state_dir, "cages")
    left = os.listdir(records) if os.path.isdir(records) else []
    assert not leaked, f"test leaked cgroups: {leaked}"
    assert not left, f"test leaked cage records: {left}"

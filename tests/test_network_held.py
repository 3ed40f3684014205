"""An address is free only when nothing holds it (issue 17, item 2).

A cage's netns lives as long as a process is in it, and with it the node-side veth,
its address and its connected route. A process stuck in D state survives every kill
pass; a process that left the cage's cgroup (or an administrator's `ip netns exec`)
is never killed by teardown at all. A new cage given that /30 while the old veth
still holds it would get none of its traffic (the node routes it to the old veth).

The D state here is real: a frozen ext4 filesystem in a loop device, which the job
writes to (``sb_start_write`` sleeps uninterruptibly until the filesystem thaws).
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

from jobcage import JobCage
from jobcage.cgroups.base import CageCgroup
from jobcage.cgroups.v1 import V1Cgroup
from jobcage.cgroups.v2 import V2Cgroup
from jobcage.errors import TeardownError
from jobcage.network import NetworkCage
from jobcage.recovery import reap
from jobcage.testing import networld as world_mod
from jobcage.testing.networld import CAMPUS_HOST, SERVER_PORT, wait_until

from .conftest_network import run_in_cage

pytestmark = [pytest.mark.root, pytest.mark.network]

PORT = str(SERVER_PORT)
IMAGE_BYTES = 8 << 20


def _state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except FileNotFoundError:
        return ""
    return stat[stat.rindex(b")") + 2 :].split()[0].decode()


# openat(2)'s number, where a shell blocks creating a file on a frozen file system.
OPENAT = {"x86_64": 257, "aarch64": 56}[platform.machine()]


def spawn_blocked_writer(cage: JobCage, mnt: str) -> subprocess.Popen:
    """A job blocked creating a file on the frozen file system at ``mnt``. D state alone
    proves nothing: where the root is slow to read (tools/vm-test's 9p root) the shell
    is in D while it pages itself in, and killed then it never reaches the frozen fs
    (the v2 VM run's destroy then raised nothing). So: once it said it runs, in D
    inside the openat of the file."""
    hung = cage.spawn(["sh", "-c", f"echo running; echo x > {mnt}/file"], stdout=subprocess.PIPE)
    assert hung.stdout.readline() == b"running\n"
    hung.stdout.close()
    wait_until(lambda: _blocked_in_openat(hung.pid), "the job to block on the frozen fs")
    return hung


def _blocked_in_openat(pid: int) -> bool:
    if _state(pid) != "D":
        return False
    try:
        with open(f"/proc/{pid}/syscall", encoding="ascii") as f:
            return f.read().split()[:1] == [str(OPENAT)]
    except OSError:
        return False


def _leases(config) -> list[str]:
    leases = os.path.join(config.state_dir, "network", "leases")
    return sorted(os.listdir(leases)) if os.path.isdir(leases) else []


def _assert_next_cage_gets_another_subnet(job_id: str, config, held) -> None:
    """A new cage gets a subnet nothing holds, and so its traffic."""
    cage = NetworkCage.create(job_id, config)
    try:
        assert cage.address != held
        assert run_in_cage(cage.netns_path, "get", CAMPUS_HOST, PORT, "1000") == "1000"
    finally:
        cage.destroy()


@pytest.fixture
def frozen_fs(tmp_path):
    """An ext4 filesystem in a loop device, mounted under tmp_path; yields a function
    that freezes it. Thawed, unmounted and detached (autoclear) whatever happens."""
    image, mnt = tmp_path / "fs.img", tmp_path / "mnt"
    mnt.mkdir()
    with open(image, "wb") as f:
        f.truncate(IMAGE_BYTES)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], check=True, capture_output=True)
    subprocess.run(["mount", "-o", "loop", str(image), str(mnt)], check=True)
    frozen = []

    def freeze() -> str:
        subprocess.run(["fsfreeze", "--freeze", str(mnt)], check=True)
        frozen.append(True)
        return str(mnt)

    try:
        yield freeze
    finally:
        if frozen:
            subprocess.run(["fsfreeze", "--unfreeze", str(mnt)], check=False)
        subprocess.run(["umount", str(mnt)], check=False)


@pytest.fixture
def short_kill(monkeypatch):
    """Bounds the kill passes to about a second: a D-state process survives them all
    anyway, and the default 30 s deadline is for production."""
    monkeypatch.setattr(CageCgroup.kill_all, "__defaults__", (1.0,))
    for cls in (V1Cgroup, V2Cgroup):
        monkeypatch.setattr(cls.freeze, "__defaults__", (0.5,))


def test_a_job_in_d_state_keeps_its_address_until_reaped(
    node, cage_config, job_id, frozen_fs, short_kill
):
    config = cage_config.replace(campus_networks=(world_mod.CAMPUS_NETWORK,))
    cage = JobCage(job_id, network=True, config=config).create()
    hung = None
    mnt = frozen_fs()
    try:
        hung = spawn_blocked_writer(cage, mnt)
        with pytest.raises(TeardownError, match="survived SIGKILL"):
            cage.destroy()
        # The survivor's netns, veth and address are all still there, and so its lease.
        assert os.path.exists(f"/run/netns/{cage.netns_name}")
        assert len(_leases(config)) == 1
        _assert_next_cage_gets_another_subnet(job_id + "b", config, cage.address)
    finally:
        subprocess.run(["fsfreeze", "--unfreeze", mnt], check=False)
        if hung is not None:
            hung.wait(timeout=30)  # SIGKILLed: dies as soon as the fs thaws
    report = reap(config)
    assert not report.errors, report.errors
    assert [c.job_id for c in report.cages] == [job_id]
    assert _leases(config) == []
    assert not os.path.exists(f"/run/netns/{cage.netns_name}")


def test_a_netns_held_from_outside_keeps_its_subnet_from_new_cages(node, net_config, job_id):
    """A process that is not the cage's (one that left its cgroup, an administrator's
    `ip netns exec`) keeps the netns, its veth and route after a clean destroy."""
    first = NetworkCage.create(job_id + "a", net_config)
    holder = subprocess.Popen(
        ["nsenter", f"--net={first.netns_path}", "--", sys.executable, "-c", "input()"],
        stdin=subprocess.PIPE,
    )
    try:
        wait_until(
            lambda: (
                os.stat(f"/proc/{holder.pid}/ns/net").st_ino == os.stat(first.netns_path).st_ino
            ),
            "the holder to enter the netns",
        )
        first.destroy()
        _assert_next_cage_gets_another_subnet(job_id + "b", net_config, first.address)
    finally:
        holder.communicate(b"\n", timeout=30)

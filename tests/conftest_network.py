"""Fixtures of the network tests: the simulated world (jobcage/testing/networld.py) and a node
to run JobCage in. Registered from tests/conftest.py with
``pytest_plugins = ["tests.conftest_network"]``.

    networld (session)  four namespaces, servers on the campus and internet hosts
      └─ node (test)    the test thread inside the node netns; after the test: every
                        cage gone, the node's iptables and links as before
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator

import pytest

from jobcage.config import Config
from jobcage.errors import TeardownError
from jobcage.network import NetworkCage, hooks
from jobcage.network.netns import is_cage_veth
from jobcage.network.resolv import NETNS_ETC_DIR
from jobcage.testing import networld as world_mod
from jobcage.testing.networld import NetWorld

# Every kernel change made by jobcage.network in this process first asks the guard.
hooks.before_change = world_mod.guard


def _need_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root: builds network namespaces")


@pytest.fixture(scope="session")
def networld_session() -> Iterator[NetWorld]:
    _need_root()
    world = NetWorld().build()
    try:
        yield world
    finally:
        world.destroy()
        leftovers = world.leftovers()
        assert not leftovers, f"the network tests left namespaces behind: {leftovers}"


@pytest.fixture
def networld(networld_session: NetWorld) -> NetWorld:
    return networld_session


@pytest.fixture
def job_id() -> str:
    """A job id unique to this test and run."""
    return f"t{uuid.uuid4().hex[:10]}"


@pytest.fixture(params=["nftables", "iptables-legacy"])
def net_config(request, tmp_path) -> Config:
    """A node config, once per firewall backend: each test proves both layouts."""
    return Config(
        state_dir=str(tmp_path / "state"),
        campus_networks=(world_mod.CAMPUS_NETWORK,),
        address_pool=world_mod.POOL,
        firewall=request.param,
    )


@pytest.fixture
def node(networld: NetWorld) -> Iterator[NetWorld]:
    """Run the test thread in the node; afterwards check the node is as it was."""
    before = networld.node_state()
    etc_before = set(os.listdir(NETNS_ETC_DIR)) if os.path.isdir(NETNS_ETC_DIR) else set()
    try:
        with networld.node_thread():
            yield networld
    finally:
        networld.stop_processes_started_in_test()
    # Veths go with their netns, asynchronously (cleanup_net): wait on the kernel.
    networld_links = lambda: [  # noqa: E731
        n for n in networld.node_state()["links"] if is_cage_veth(n)
    ]
    networld.wait_until_empty(networld_links, "the cages' veths to go")
    after = networld.node_state()
    assert after == before, "the node's iptables or links differ from before the test"
    etc_after = set(os.listdir(NETNS_ETC_DIR)) if os.path.isdir(NETNS_ETC_DIR) else set()
    # /etc/netns is the machine's, shared by overlapping runs: what another run's live
    # cage has there is not ours. A leak is a directory whose namespace is gone.
    left = {n for n in etc_after - etc_before if not os.path.exists(f"/run/netns/{n}")}
    assert not left, f"left in {NETNS_ETC_DIR}: {left}"


# The start of a script a test runs in the node in a process of its own: the same
# guard as this process's (with $JC_INITIAL_NETNS_INO), then what the script needs.
GUARDED_SCRIPT = """
import os, sys
from jobcage.config import Config
from jobcage.network import NetworkCage, hooks
initial = int(os.environ["JC_INITIAL_NETNS_INO"])
def guard():
    assert os.stat("/proc/thread-self/ns/net").st_ino != initial, "in the machine's netns"
hooks.before_change = guard
guard()
"""


def run_in_cage(netns_path: str, *args: str, timeout: float = 60) -> str:
    """Run jobcage/testing/netclient.py inside a cage's netns; return its result (last) line."""
    return run_in_cage_lines(netns_path, *args, timeout=timeout)[-1]


def run_in_cage_lines(netns_path: str, *args: str, timeout: float = 60) -> list[str]:
    """Run jobcage/testing/netclient.py inside a cage's netns; return every line it printed."""
    out = subprocess.run(
        ["nsenter", f"--net={netns_path}", "--", sys.executable, world_mod.CLIENT, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if out.returncode != 0:
        raise AssertionError(f"netclient {args} failed: {out.stderr}")
    return out.stdout.strip().splitlines()


@pytest.fixture
def make_cage(node, net_config, job_id):
    """Create cages in the node; destroy whatever the test did not."""
    made: list[NetworkCage] = []

    def make(suffix: str = "", config=None, campus=None) -> NetworkCage:
        cage = NetworkCage.create(job_id + suffix, config or net_config, campus)
        made.append(cage)
        return cage

    yield make
    errors = []
    for cage in reversed(made):
        try:
            cage.destroy()
        except TeardownError as e:
            errors.append(e)
    assert not errors

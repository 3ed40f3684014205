"""The simulated node the network benchmarks run in, built and removed by the bench.

Reuses the tests' world (jobcage/testing/networld.py: node, router, campus and internet hosts in
namespaces with a per-run suffix), so nothing here ever changes the machine's own
network: every change runs in a thread that setns()ed into the node, and
jobcage.network's guard refuses any change made from the namespace we started in.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass

from jobcage.config import Config
from jobcage.network import hooks, netns, resolv
from jobcage.network.netns import NETNS_RUN_DIR
from jobcage.testing import networld
from jobcage.testing.networld import NetWorld

# In every name this process makes (worlds, cages, floor namespaces), so that a check
# for leftovers finds ours and not those of a test suite running beside the bench.
RUN_SUFFIX = networld.unique_suffix()
_worlds = itertools.count()


@dataclass
class Node:
    world: NetWorld
    config: Config
    # Every name this run makes starts with it (job ids, floor namespaces), so that a
    # failed run's leftovers are found by name and only ours are removed.
    tag: str

    def job_id(self, what: str) -> str:
        return f"{self.tag}{what}"


@contextlib.contextmanager
def node(firewall: str = "auto", ipv6: bool = False) -> Iterator[Node]:
    """Build the world, run the calling thread in its node, tear it all down after,
    even on failure: cages' and floor namespaces with our tag, the world, the state.
    ``ipv6``: a dual-stack world, and cages dual-stack (NAT66) by the config."""
    hooks.before_change = networld.guard
    state = tempfile.mkdtemp(prefix="jobcage-bench-")
    suffix = f"{RUN_SUFFIX}{next(_worlds)}"
    campus = (networld.CAMPUS_NETWORK, networld.CAMPUS_NETWORK6)
    config = Config(
        state_dir=state,
        campus_networks=campus if ipv6 else campus[:1],
        address_pool=networld.POOL,
        cgroup_parent=f"/jobcage-bench-{suffix}",
        firewall=firewall,
        ipv6="nat" if ipv6 else "off",
        ipv6_pool=networld.POOL6,
    )
    world = NetWorld(suffix=suffix, ipv6=ipv6).build()
    tag = f"b{suffix}"
    try:
        with world.node_thread():
            try:
                yield Node(world, config, tag)
            finally:
                _remove_leftovers(tag)
    finally:
        try:
            world.destroy()
        finally:
            shutil.rmtree(state, ignore_errors=True)


def _remove_leftovers(tag: str) -> None:
    """Namespaces of a run that failed half-way; unmounting takes their veths along.
    The node's rules go with the node's namespace."""
    for name in os.listdir(NETNS_RUN_DIR) if os.path.isdir(NETNS_RUN_DIR) else []:
        if tag in name:
            with contextlib.suppress(OSError):
                netns.remove(name)
            with contextlib.suppress(OSError):
                resolv.remove_resolv_conf(name)

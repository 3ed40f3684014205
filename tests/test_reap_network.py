"""Crash recovery of a *networked* cage, inside the simulated node: SIGKILL `jobcage run`
in the middle of a job; the job stays contained, `jobcage list` shows it orphaned, and
`jobcage reap` kills it, saves the final usage (network counters included) and leaves
no cgroup, netns, veth, rule, address lease or record."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest

from jobcage.cgroups.base import read_pids
from jobcage.errors import CageExistsError
from jobcage.ids import netns_name, veth_names
from jobcage.network import NetworkCage
from jobcage.network import netns as netns_mod
from jobcage.records import StateStore
from jobcage.recovery import reap
from jobcage.testing import networld as world_mod

from .cli_support import (
    alive,
    cgroup_dirs_exist,
    config_args,
    list_json,
    ready,
    run_main,
    start_run,
    wait_exit,
)

pytestmark = [pytest.mark.root, pytest.mark.network]


def test_sigkilled_networked_run_is_reaped_completely(node, cage_config):
    config = cage_config.replace(
        campus_networks=(world_mod.CAMPUS_NETWORK,), address_pool=world_mod.POOL
    )
    job = f"netcrash.{world_mod.unique_suffix()}"
    url = f"http://{world_mod.CAMPUS_HOST}:{world_mod.SERVER_PORT}/bytes/{1 << 20}"
    # Started from the test thread, which is inside the node: `jobcage run` runs there.
    proc = start_run(
        config,
        ["--job-id", job, "--network", "--campus", world_mod.CAMPUS_NETWORK],
        f"curl -sf -o /dev/null {url}; sleep 1000 & echo ready; wait",
    )
    assert ready(proc) == "ready"
    store = StateStore(config.state_dir)
    record = store.load(job)
    paths = dict(record.cgroup.paths)
    netns_file = record.network.netns_path
    assert os.path.exists(netns_file)
    pids = read_pids([os.path.join(paths.get("freezer", paths.get("unified")), "cgroup.procs")])
    assert pids
    # Live usage of a cage owned by another process, network counters included.
    status, out, err = run_main(["stats", job, "--json", *config_args(config)])
    assert status == 0, err
    assert json.loads(out)["net_lan_rx_bytes"] >= 1 << 20

    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL

    # Contained: alive, in the cage, and its netns is still there.
    assert all(alive(pid) for pid in pids)
    assert os.path.exists(netns_file)
    listed = list_json(config)[job]
    assert listed["status"] == "orphaned"

    report = reap(config)
    [reaped] = report.cages
    assert reaped.job_id == job and reaped.errors == [], reaped.errors
    assert all(wait_exit(pid, 10) for pid in pids)
    assert cgroup_dirs_exist(paths) == []
    assert not os.path.exists(netns_file)
    assert store.records() == []
    saved = json.loads(Path(reaped.usage_file).read_text())
    usage = saved["usage"]
    assert usage["processes_killed"] == len(pids)
    # The download finished before the owner died: it is on the bill.
    assert usage["net_lan_rx_bytes"] >= 1 << 20
    # The `node` fixture then proves the node's iptables and links are as before.


def test_a_leftover_veth_of_the_jobs_name_is_refused_until_reaped(
    node, net_config, job_id, monkeypatch
):
    """create() waits for a veth of the cage's name to go (the kernel deletes a destroyed
    cage's asynchronously); one that stays is refused with a hint to reap, leaving
    nothing; once reap's delete_link removed it, the job gets its cage."""
    monkeypatch.setattr(netns_mod, "LINK_GONE_TIMEOUT_SECONDS", 0.05)
    host_veth, _ = veth_names(job_id)
    peer = host_veth[:-1] + "p"  # not a cage veth's name
    world_mod.ip("-n", node.node, "link", "add", host_veth, "type", "veth", "peer", "name", peer)
    try:
        with pytest.raises(CageExistsError, match="jobcage reap"):
            NetworkCage.create(job_id, net_config)
        assert not os.path.exists(f"/run/netns/{netns_name(job_id)}")
        assert host_veth in netns_mod.cage_veths()
        netns_mod.delete_link(host_veth)
        netns_mod.delete_link(host_veth)  # idempotent
        assert not netns_mod.link_exists(peer)
        NetworkCage.create(job_id, net_config).destroy()
    finally:
        # Tolerant of "already gone": the kernel deletes a destroyed cage's veth in its
        # own time, and an error here would hide the test's own failure.
        netns_mod.delete_link(host_veth)

"""x_tables counters are read whole while other processes change the table (issue 17,
item 1).

libiptc (JobCage's own changes) and `iptables` write a legacy table in two calls:
IPT_SO_SET_REPLACE swaps in the new table with every counter 0, then
IPT_SO_SET_ADD_COUNTERS adds the old counts back. A copy of the table taken between the
two read 0 for every rule, and a teardown that read then billed the job 0 bytes. Every
such writer holds /run/xtables.lock across both calls; JobCage's reads now hold it too
(shared). Real concurrency here: writer processes creating and destroying cages and
running `iptables-legacy -w` while this process reads a busy cage's counters.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from jobcage.config import Config
from jobcage.network import NetworkCage
from jobcage.testing import networld as world_mod
from jobcage.testing.networld import INTERNET_HOST, SERVER_PORT

from .conftest_network import GUARDED_SCRIPT, run_in_cage

pytestmark = [pytest.mark.root, pytest.mark.network]

MiB = 1 << 20
WRITERS = 3
CYCLES = 60
IPTABLES_CYCLES = 150

# One writer: create and destroy cages, $JC_CYCLES times (argv: state dir, job id prefix).
CAGE_WRITER = (
    GUARDED_SCRIPT
    + """
config = Config(state_dir=sys.argv[1], campus_networks=("192.0.2.0/24",),
                firewall="iptables-legacy")
for i in range(int(os.environ["JC_CYCLES"])):
    NetworkCage.create(f"{sys.argv[2]}c{i}", config).destroy()
"""
)

# `iptables-legacy -w`: a writer of the iptables kind, in the node's netns only.
IPTABLES_WRITER = """
for i in $(seq {n}); do
  iptables-legacy -w -I INPUT -s 198.51.100.99/32 -j ACCEPT
  iptables-legacy -w -D INPUT -s 198.51.100.99/32 -j ACCEPT
done
"""


def test_counters_are_never_read_torn_while_others_write(node, job_id, tmp_path):
    config = Config(
        state_dir=str(tmp_path / "state"),
        campus_networks=(world_mod.CAMPUS_NETWORK,),
        address_pool=world_mod.POOL,
        firewall="iptables-legacy",
    )
    cage = NetworkCage.create(job_id, config)
    writers: list[subprocess.Popen] = []
    try:
        run_in_cage(cage.netns_path, "get", INTERNET_HOST, str(SERVER_PORT), str(MiB))
        billed = cage.counters().net_wan_rx_bytes
        assert billed >= MiB
        env = dict(os.environ, JC_INITIAL_NETNS_INO=str(world_mod.INITIAL_NETNS_INO))
        env["JC_CYCLES"] = str(CYCLES)
        enter = ["nsenter", f"--net={node.netns_path(node.node)}", "--"]
        writers = [
            subprocess.Popen(
                [*enter, sys.executable, "-c", CAGE_WRITER, config.state_dir, f"{job_id}w{i}"],
                env=env,
                stderr=subprocess.PIPE,
            )
            for i in range(WRITERS)
        ]
        script = IPTABLES_WRITER.format(n=IPTABLES_CYCLES)
        writers.append(subprocess.Popen([*enter, "sh", "-c", script], stderr=subprocess.PIPE))
        reads = torn = 0
        while any(w.poll() is None for w in writers):
            seen = cage.counters().net_wan_rx_bytes
            reads += 1
            torn += seen < billed
        for w in writers:
            _, err = w.communicate(timeout=120)
            assert w.returncode == 0, err
        assert reads >= 200, f"only {reads} reads while the writers ran"
        assert torn == 0, f"{torn} of {reads} reads were torn (counters read as 0)"
    finally:
        for w in writers:
            if w.poll() is None:
                w.kill()
                w.wait()
        cage.destroy()

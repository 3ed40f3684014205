"""Run a real job in a networked cage inside a simulated worker node, print its usage.

The machine's own network is never touched: the demo builds the simulated world the
tests use (jobcage/testing/networld.py) — a *node* namespace with an uplink, a router, a
*campus* host (192.0.2.10) and an *internet* host (203.0.113.10), each serving HTTP —
runs JobCage inside the node, and removes everything at the end. The job downloads
1 MiB from the campus and 2 MiB from the internet with curl, burns a little CPU and
memory, and its usage record is printed as a table and as one JSON line.
"""

from __future__ import annotations

import os
import sys
import tempfile

from jobcage import Config, JobCage
from jobcage.network import hooks
from jobcage.testing import networld
from jobcage.usage import human_bytes

MiB = 1 << 20
JOB = f"""
set -e
curl -sf -o /dev/null http://{networld.CAMPUS_HOST}:{networld.SERVER_PORT}/bytes/{MiB}
curl -sf -o /dev/null http://{networld.INTERNET_HOST}:{networld.SERVER_PORT}/bytes/{2 * MiB}
python3 -c 'b = bytearray(32 << 20); sum(range(3_000_000))'
echo "job done"
"""


def main() -> int:
    hooks.before_change = networld.guard  # refuse to touch the machine's own network
    world = networld.NetWorld().build()
    try:
        with tempfile.TemporaryDirectory(prefix="jobcage-demo-") as state:
            config = Config(
                state_dir=state,
                cgroup_parent=f"/jobcage-demo-{world.suffix}",
                campus_networks=(networld.CAMPUS_NETWORK,),
            )
            with (
                world.node_thread(),
                JobCage(
                    f"demo-{world.suffix}",
                    memory_limit="256M",
                    pids_limit=64,
                    network=True,
                    config=config,
                ) as cage,
            ):
                print(
                    f"cage {cage.job_id}: netns {cage.netns_name}, address {cage.address}, "
                    f"cgroups {', '.join(sorted(cage.cgroup_paths))}"
                )
                status = cage.spawn(["sh", "-c", JOB]).wait()
                print(f"job exited with status {status}")
    finally:
        world.destroy()
    u = cage.final_usage
    assert u is not None
    print()
    print(
        f"LAN in {human_bytes(u.net_lan_rx_bytes)}, LAN out {human_bytes(u.net_lan_tx_bytes)}, "
        f"WAN in {human_bytes(u.net_wan_rx_bytes)}, WAN out {human_bytes(u.net_wan_tx_bytes)}"
    )
    print()
    print(u.to_table())
    print()
    print(u.to_json())
    return 0 if status == 0 else 1


if __name__ == "__main__":
    if os.geteuid() != 0:
        sys.exit("tools/demo: run as root")
    sys.exit(main())

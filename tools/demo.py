"""Run a small real job in a cage and print its usage record, as a table and as JSON.

Everything is made under a demo-only cgroup parent and state directory, and removed
at the end.
"""

from __future__ import annotations

import os
import sys
import tempfile
import uuid

from jobcage import Config, JobCage

JOB = r"""
import os, time
data = bytearray(48 << 20)          # 48 MiB resident
for i in range(0, len(data), 4096):
    data[i] = 1
end = time.process_time() + 0.5     # half a second of CPU
while time.process_time() < end:
    sum(range(10000))
for _ in range(20):                 # 20 short-lived children
    if os.fork() == 0:
        os._exit(0)
    os.wait()
print("job done")
"""


def main() -> int:
    suffix = uuid.uuid4().hex[:6]
    with tempfile.TemporaryDirectory(prefix="jobcage-demo-") as state:
        config = Config(state_dir=state, cgroup_parent=f"/jobcage-demo-{suffix}")
        with JobCage(f"demo-{suffix}", memory_limit="256M", pids_limit=64, config=config) as cage:
            print(f"cage {cage.job_id}: cgroups {', '.join(sorted(cage.cgroup_paths))}")
            proc = cage.spawn([sys.executable, "-c", JOB])
            status = proc.wait()
            print(f"job exited with status {status}")
    usage = cage.final_usage
    assert usage is not None
    print()
    print(usage.to_table())
    print()
    print(usage.to_json())
    return 0 if status == 0 else 1


if __name__ == "__main__":
    if os.geteuid() != 0:
        sys.exit("tools/demo: run as root")
    sys.exit(main())

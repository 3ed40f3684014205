"""Lifecycle: create -> spawn `true` -> wait -> destroy, for a cgroup-only cage.

References measured in the same run:
- floor: the same kernel objects with the least work from Python (mkdir, write the
  limits, fork+exec `true` that joins the cgroups between fork and exec, rmdir);
- recipe: the manual steps an administrator would script, run by a shell (mkdir,
  echo > files, the job started from a shell that moved itself into the cgroups,
  rmdir), as the 2011 recipe did.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import uuid

from jobcage import Config, JobCage
from jobcage.cgroups import probe
from jobcage.cgroups.base import write_file

from .common import after_idle, idle, measure_interleaved, ratio

CONTROLLERS = ("freezer", "memory", "cpuacct", "blkio", "pids")


def run(runs: int) -> dict:
    h = probe()
    parent = f"/jobcage-bench-{uuid.uuid4().hex[:6]}"
    config = Config(state_dir=f"/run/jobcage-bench-{uuid.uuid4().hex[:6]}", cgroup_parent=parent)
    mounts = {c: h.v1_mounts[c] for c in CONTROLLERS if c in h.v1_mounts}
    counter = iter(range(10**9))

    def jobcage_cycle() -> None:
        with JobCage(
            f"b{next(counter)}", memory_limit="1G", pids_limit=1000, config=config
        ) as cage:
            cage.spawn(["true"]).wait()

    def empty_cycle() -> None:
        with JobCage(f"e{next(counter)}", config=config):
            pass

    def floor_cycle() -> None:
        name = f"f{next(counter)}"
        for m in mounts.values():  # a JobCage cycle removes the empty parent
            with contextlib.suppress(FileExistsError):
                os.mkdir(os.path.join(m, parent.lstrip("/")))
        where = {c: os.path.join(m, parent.lstrip("/"), name) for c, m in mounts.items()}
        dirs = list(where.values())
        for d in dirs:
            os.mkdir(d)
        write_file(os.path.join(where["memory"], "memory.limit_in_bytes"), "1073741824")
        write_file(os.path.join(where["pids"], "pids.max"), "1000")
        fds = [os.open(os.path.join(d, "cgroup.procs"), os.O_WRONLY) for d in dirs]

        def join() -> None:
            for fd in fds:
                os.write(fd, b"0")

        subprocess.Popen(["true"], preexec_fn=join).wait()
        for fd in fds:
            os.close(fd)
        write_file(os.path.join(where["freezer"], "freezer.state"), "FROZEN")
        write_file(os.path.join(where["freezer"], "freezer.state"), "THAWED")
        for d in dirs:
            os.rmdir(d)

    recipe = _recipe_script(mounts, parent)

    def recipe_cycle() -> None:
        subprocess.run(["sh", "-c", recipe, "sh", f"r{next(counter)}"], check=True)

    try:
        figures = measure_interleaved(
            {
                "jobcage": jobcage_cycle,
                "empty": empty_cycle,
                "floor": floor_cycle,
                "recipe": recipe_cycle,
            },
            runs,
        )
        ours, empty = figures["jobcage"], figures["empty"]
        floor, scripted = figures["floor"], figures["recipe"]
        quiet = measure_interleaved(
            {"jobcage": jobcage_cycle, "floor": floor_cycle, "recipe": recipe_cycle},
            max(3, runs // 3),
            warmup=0,
            before=idle,
        )
    finally:
        for m in mounts.values():
            with contextlib.suppress(OSError):
                os.rmdir(os.path.join(m, parent.lstrip("/")))
        shutil.rmtree(config.state_dir, ignore_errors=True)
    return {
        "cgroup_only": {
            "jobcage": ours.as_dict(),
            "jobcage_empty_create_destroy": empty.as_dict(),
            "floor": floor.as_dict(),
            "recipe": scripted.as_dict(),
            "jobcage_vs_floor": ratio(ours, floor),
            "recipe_vs_jobcage": ratio(scripted, ours),
            "after_idle": after_idle(quiet),
        }
    }


def _recipe_script(mounts: dict[str, str], parent: str) -> str:
    lines = ["set -e", 'job="$1"']
    for m in mounts.values():  # a JobCage cycle removes the parent when it empties it
        lines.append(f'mkdir -p "{m}{parent}"; mkdir "{m}{parent}/$job"')
    lines.append(f'echo 1073741824 > "{mounts["memory"]}{parent}/$job/memory.limit_in_bytes"')
    if "pids" in mounts:
        lines.append(f'echo 1000 > "{mounts["pids"]}{parent}/$job/pids.max"')
    # A subshell moves itself in ("0" is the writer) and then becomes the job.
    joins = "; ".join(f'echo 0 > "{m}{parent}/$job/cgroup.procs"' for m in mounts.values())
    lines.append(f"( {joins}; exec true )")
    fr = f"{mounts['freezer']}{parent}/$job/freezer.state"
    lines.append(f'echo FROZEN > "{fr}"; echo THAWED > "{fr}"')
    for m in mounts.values():
        lines.append(f'rmdir "{m}{parent}/$job"')
    return "\n".join(lines)

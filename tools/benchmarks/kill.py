"""Kill: time until a fork storm of K processes is gone, three ways.

The storm is bounded by a v1 pids cgroup (pids.max = K) so the machine stays healthy.
- jobcage: JobCage.kill() (freeze, SIGKILL every pid, thaw, wait until empty);
- naive: read cgroup.procs, SIGKILL each, repeat until empty; we count the passes
  and whether a pass ever left survivors behind;
- cgroup.kill: one write to a v2 cgroup that holds the same storm (on this hybrid
  node the unified hierarchy has cgroup.kill), then wait for `populated 0`.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid

from jobcage import Config, JobCage
from jobcage.cgroups import probe
from jobcage.cgroups.base import read_file, write_file
from jobcage.cgroups.v2 import V2Cgroup

from .common import Figure, ratio

# Each process forks until the pids limit refuses, then waits: the storm stays at K.
STORM = (
    "import os, time\n"
    "while True:\n"
    "    try:\n"
    "        os.fork()\n"
    "    except OSError:\n"
    "        time.sleep(0.01)\n"
)


def _fill(pids_current: str, k: int) -> None:
    """Wait until the storm is within 2% of its bound (the pids controller's count)."""
    deadline = time.monotonic() + 120
    while int(read_file(pids_current)) < k * 0.98:
        if time.monotonic() > deadline:
            raise RuntimeError(f"storm did not reach {k} processes")
        time.sleep(0.005)


def _jobcage(k: int, config: Config) -> float:
    with JobCage(f"kill-{uuid.uuid4().hex[:6]}", pids_limit=k, config=config) as cage:
        cage.spawn([sys.executable, "-c", STORM])
        _fill(os.path.join(cage.cgroup_paths["pids"], "pids.current"), k)
        t = time.perf_counter()
        cage.kill()
        elapsed = time.perf_counter() - t
        assert not cage.pids()
    _reap_orphans()
    return elapsed * 1000


def _pids_cgroup(k: int) -> str:
    path = os.path.join(probe().v1_mounts["pids"], f"jobcage-bench-{uuid.uuid4().hex[:6]}")
    os.mkdir(path)
    write_file(os.path.join(path, "pids.max"), str(k))
    return path


def _spawn_into(files: list[str]) -> subprocess.Popen:
    fds = [os.open(f, os.O_WRONLY) for f in files]

    def join() -> None:
        for fd in fds:
            os.write(fd, b"0")

    try:
        return subprocess.Popen([sys.executable, "-c", STORM], preexec_fn=join)
    finally:
        for fd in fds:
            os.close(fd)


def _naive(k: int) -> tuple[float, int]:
    path = _pids_cgroup(k)
    procs = os.path.join(path, "cgroup.procs")
    try:
        root = _spawn_into([procs])
        _fill(os.path.join(path, "pids.current"), k)
        passes = 0
        t = time.perf_counter()
        while True:
            pids = [int(p) for p in read_file(procs).split()]
            if not pids:
                break
            passes += 1
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        elapsed = time.perf_counter() - t
        root.wait()
        _reap_orphans()
        return elapsed * 1000, passes
    finally:
        os.rmdir(path)


def _cgroup_kill(k: int) -> float | None:
    h = probe()
    if not h.v2_mount:
        return None
    v2 = os.path.join(h.v2_mount, f"jobcage-bench-{uuid.uuid4().hex[:6]}")
    os.mkdir(v2)
    if not os.path.exists(os.path.join(v2, "cgroup.kill")):
        os.rmdir(v2)
        return None
    path = _pids_cgroup(k)
    try:
        root = _spawn_into([os.path.join(path, "cgroup.procs"), os.path.join(v2, "cgroup.procs")])
        _fill(os.path.join(path, "pids.current"), k)
        cg = V2Cgroup({"unified": v2})
        t = time.perf_counter()
        cg.kill_signal_all()
        assert cg.wait_empty(60)
        elapsed = time.perf_counter() - t
        root.wait()
        _reap_orphans()
        return elapsed * 1000
    finally:
        os.rmdir(path)
        os.rmdir(v2)


PR_SET_CHILD_SUBREAPER = 36


def _reap_orphans() -> None:
    """Reap the storm's orphans, which this process adopted as a subreaper.

    Without it they go to pid 1, which on some machines (this VM agent among them)
    reaps slowly: thousands of zombies pile up and keep their pids charged.
    """
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def run(sizes: list[int], runs: int) -> dict:
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    config = Config(
        state_dir=f"/run/jobcage-bench-{uuid.uuid4().hex[:6]}",
        cgroup_parent=f"/jobcage-bench-{uuid.uuid4().hex[:6]}",
    )
    out = {}
    try:
        for k in sizes:
            ours = Figure("jobcage", [_jobcage(k, config) for _ in range(runs)])
            naive_runs = [_naive(k) for _ in range(runs)]
            naive = Figure("naive", [t for t, _ in naive_runs])
            passes = [p for _, p in naive_runs]
            entry = {
                "jobcage": ours.as_dict(),
                "naive": naive.as_dict(),
                "naive_passes": passes,
                "naive_missed_some_in_one_pass": any(p > 1 for p in passes),
                "naive_vs_jobcage": ratio(naive, ours),
            }
            kills = [_cgroup_kill(k) for _ in range(runs)]
            if all(x is not None for x in kills):
                ck = Figure("cgroup.kill", kills)  # type: ignore[arg-type]
                entry["cgroup_kill"] = ck.as_dict()
                entry["jobcage_vs_cgroup_kill"] = ratio(ours, ck)
            out[str(k)] = entry
    finally:
        import shutil

        shutil.rmtree(config.state_dir, ignore_errors=True)
    return out

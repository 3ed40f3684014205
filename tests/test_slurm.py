"""JobCage under a real Slurm, as docs/admin-guide.md tells an administrator to run it.

One Slurm (munged, slurmctld, slurmd: jobcage/testing/slurm.py) for the module, in the
simulated world's node. Its KillWait is short (8 s) so that a cancel is quick; the
config sets ``cgroup_parent``, as the guide and doctor ask. Each test checks Slurm's
own view (``scontrol show job``), the usage records and the residue: no process left
in Slurm's cgroups but the daemons, no cage record, no cage cgroup, the node not
drained.
"""

from __future__ import annotations

import json
import os
import re
import select
import sys
import time
from collections.abc import Iterator

import pytest

from jobcage.testing import networld as world_mod
from jobcage.testing import slurm as slurm_mod
from jobcage.testing.networld import NetWorld, wait_until

pytestmark = pytest.mark.root

JOBCAGE = os.path.join(os.path.dirname(sys.executable), "jobcage")
KILL_WAIT = 8
DOCS = os.path.join(os.path.dirname(__file__), "..", "docs", "admin-guide.md")
JOB_END_SECONDS = 60.0


@pytest.fixture(scope="module")
def slurm(networld_session: NetWorld) -> Iterator[slurm_mod.Slurm]:
    why = slurm_mod.available()
    if why:
        pytest.skip(why)
    with slurm_mod.running_slurm(networld_session, kill_wait=KILL_WAIT) as s:
        yield s


@pytest.fixture
def site(slurm, tmp_path) -> Iterator[dict[str, str]]:
    """The node's JobCage config (cgroup_parent set), and the jobs' environment."""
    state = tmp_path / "state"
    conf = tmp_path / "jobcage.toml"
    conf.write_text(
        f'state_dir = "{state}"\n'
        f'cgroup_parent = "/jobcage"\n'
        f'campus_networks = ["{world_mod.CAMPUS_NETWORK}"]\n'
        f'address_pool = "{world_mod.POOL}"\n'
    )
    os.chmod(tmp_path, 0o755)
    env = {
        "JOBCAGE_CONFIG": str(conf),
        "PATH": f"{os.path.dirname(JOBCAGE)}:{os.environ['PATH']}",
    }
    daemons = slurm.leftover_pids()  # munged, slurmctld, slurmscriptd, slurmd
    yield {"state": str(state), "dir": str(tmp_path), **env}
    # The residue: Slurm's cgroups hold the daemons only, no cage is left.
    wait_until(lambda: slurm.leftover_pids() <= daemons, "the jobs' processes to go", 30)
    assert not os.listdir(state / "cages") if (state / "cages").exists() else True
    cages = [
        d
        for c in ("memory", "freezer")
        for d, _subdirs, _files in os.walk(slurm.cgroup_dir(c))
        if os.path.basename(os.path.dirname(d)) == "jobcage"
    ]
    assert not cages, f"cage cgroups left: {cages}"
    node = slurm.show_node()
    assert "DRAIN" not in node["State"], f"the node was drained: {node.get('Reason')}"
    slurm.set_epilog("#!/bin/sh\nexit 0\n")


def sbatch(slurm, site, *args: str, wait: bool = True) -> str:
    env = {k: v for k, v in site.items() if k in {"JOBCAGE_CONFIG", "PATH"}}
    argv = ["sbatch", "--parsable", f"--chdir={site['dir']}", f"--output={site['dir']}/%j.out"]
    out = slurm.client([*argv, *(["--wait"] if wait else []), *args], env=env, check=False)
    job = out.stdout.strip().split(";")[0]
    assert job.isdigit(), f"sbatch failed: {out.stderr}"
    return job


def records(site, job_id: str) -> dict[str, dict]:
    """Every usage record under the default place for Slurm, by cage id."""
    usage = os.path.join(site["state"], "usage")
    found = {}
    for name in sorted(os.listdir(usage)) if os.path.isdir(usage) else []:
        if name.startswith(f"{job_id}."):
            with open(os.path.join(usage, name)) as f:
                lines = f.read().splitlines()
            assert len(lines) == 1, f"{name}: one bill per cage, not {len(lines)}"
            found[name.removesuffix(".json")] = json.loads(lines[0])
    return found


def job_output(site, job_id: str) -> str:
    with open(os.path.join(site["dir"], f"{job_id}.out")) as f:
        return f.read()


def wait_started(fifo: str) -> None:
    """Block until the job writes to the FIFO (opened non-blocking, polled with a bound)."""
    fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    try:
        end = time.monotonic() + JOB_END_SECONDS
        data = b""
        while b"\n" not in data:
            ready, _, _ = select.select([fd], [], [], max(0.0, end - time.monotonic()))
            assert ready, "the job did not start"
            data += os.read(fd, 100)
    finally:
        os.close(fd)


def wait_ended(slurm, job_id: str) -> dict[str, str]:
    """Slurm has no notification for a job's end: poll its state, bounded."""
    done = {"COMPLETED", "CANCELLED", "FAILED", "OUT_OF_MEMORY", "TIMEOUT", "NODE_FAIL"}
    wait_until(
        lambda: (
            slurm.show_job(job_id)["JobState"] in done
            and "COMPLETING" not in slurm.show_job(job_id).get("Reason", "")
        ),
        f"Slurm job {job_id} to end",
        JOB_END_SECONDS,
    )
    wait_until(lambda: slurm.show_node()["State"].split("+")[0] == "IDLE", "the node", 30)
    return slurm.show_job(job_id)


# -- steps -------------------------------------------------------------------------------


def test_each_task_of_a_step_gets_its_cage_the_jobs_memory_and_a_record(slurm, site):
    script = 'srun jobcage run --batch slurm -- sh -c "cat /proc/self/cgroup"'
    job = sbatch(slurm, site, "-n", "2", "--mem=200M", "--wrap", script)
    view = slurm.show_job(job)
    assert view["JobState"] == "COMPLETED" and view["ExitCode"] == "0:0", view
    found = records(site, job)
    assert set(found) == {f"{job}.0.0", f"{job}.0.1"}, job_output(site, job)
    for cage_id, record in found.items():
        assert record["job_id"] == cage_id and record["exit_status"] == 0
        assert record["usage"]["memory_limit_bytes"] == 200 << 20  # SLURM_MEM_PER_NODE
        assert record["usage"]["cpu_limit_cpus"] == 1.0  # a CPU per task
    # cgroup_parent is set, yet each cage sits inside Slurm's task cgroup (its limit).
    memory_lines = [line for line in job_output(site, job).splitlines() if ":memory:" in line]
    assert len(memory_lines) == 2
    for line in memory_lines:
        assert re.search(rf"/job_{job}/step_0/task_\d/jobcage/{job}\.0\.\d$", line), line


def test_slurm_memory_limit_holds_even_when_the_job_asks_for_more(slurm, site):
    """ConstrainRAMSpace bounds the step at 100 MiB; the cage asks for 1 GiB (and
    cgroup_parent is set): touching 300 MiB must still be killed by Slurm's limit."""
    touch = "b = bytearray(300 << 20); b[::4096] = b'x' * len(b[::4096])"
    script = f'srun jobcage run --batch slurm --memory 1G -- python3 -c "{touch}"'
    job = sbatch(slurm, site, "--mem=100M", "--wrap", script)
    (record,) = records(site, job).values()
    assert record["exit_status"] == 137 and record["term_signal"] == 9, record
    assert record["usage"]["oom_kills"] >= 1
    assert record["usage"]["memory_peak_bytes"] <= 110 << 20
    assert slurm.show_job(job)["JobState"] in {"FAILED", "OUT_OF_MEMORY"}


def test_networked_tasks_in_parallel_each_pay_their_own_bytes(slurm, site, networld):
    before = networld.node_state()
    host, port = world_mod.INTERNET_HOST, world_mod.SERVER_PORT
    # Task 0 sends 1 MB, task 1 sends 3 MB, at the same time.
    put = f"put {host} {port} $(( (SLURM_PROCID * 2 + 1) * 1000000 ))"
    client = f"python3 {world_mod.CLIENT} {put}"
    script = f"srun jobcage run --batch slurm --network -- sh -c '{client}'"
    job = sbatch(slurm, site, "-n", "2", "--wrap", script)
    found = records(site, job)
    assert slurm.show_job(job)["ExitCode"] == "0:0", job_output(site, job)
    for task, sent in ((0, 1_000_000), (1, 3_000_000)):
        usage = found[f"{job}.0.{task}"]["usage"]
        assert sent <= usage["net_wan_tx_bytes"] < sent * 1.1, (task, usage)
        assert usage["net_lan_tx_bytes"] == 0
    wait_until(lambda: networld.node_state() == before, "the node's rules and links", 30)


# -- cancels -----------------------------------------------------------------------------


def test_scancel_of_a_batch_script_form_job_is_reaped_by_the_guides_epilog(slurm, site, tmp_path):
    """The batch script runs jobcage run without exec: on scancel Slurm signals the
    shell, which dies, and then SIGKILLs what is left in the step (jobcage run) at
    once. The guide's Epilog reaps the cage: the daemon the job left is killed and the
    record written (by reap, with what the kernel still had), and the Epilog cannot
    fail the node."""
    slurm.set_epilog(epilog(site))
    fifo = tmp_path / "started"
    os.mkfifo(fifo)
    script = tmp_path / "job.sh"
    script.write_text(
        "#!/bin/bash\n"
        "jobcage run --batch slurm -- sh -c "
        f"'setsid sleep 600 & echo started > {fifo}; sleep 600'\n"
        "echo after\n"
    )
    job = sbatch(slurm, site, "-n", "2", str(script), wait=False)
    wait_started(str(fifo))
    slurm.client(["scancel", job])
    view = wait_ended(slurm, job)
    assert view["JobState"] == "CANCELLED"
    # The Epilog may still be reaping when the node shows idle.
    wait_until(lambda: records(site, job), "the record", 30)
    found = records(site, job)
    assert list(found) == [f"{job}.batch"], found  # N.batch, not N.batch.0; one bill
    record = found[f"{job}.batch"]
    # Written by jobcage run when it finished its teardown between the shell's exit
    # and Slurm's SIGKILL (it stops the job when its parent exits), else by the
    # Epilog's reap; either way the daemon is gone (the `site` fixture checks).
    assert record.get("reaped") is True or record["parent_exited"] is True, record


def test_the_guides_epilog_cannot_drain_the_node(slurm, site):
    """A reap that fails (here: the config file is gone) must not fail the Epilog:
    Slurm drains a node whose Epilog exits non-zero."""
    slurm.set_epilog(epilog({**site, "JOBCAGE_CONFIG": site["dir"] + "/missing.toml"}))
    job = sbatch(slurm, site, "--wrap", "true")
    wait_ended(slurm, job)
    assert "DRAIN" not in slurm.show_node()["State"]


def test_scancel_of_a_step_ignoring_sigterm_ends_within_killwait(slurm, site, tmp_path):
    """The grace is cut to fit KillWait: the cage is killed, the record written and
    the node stays up (with the grace at KillWait, Slurm SIGKILLs jobcage run, loses
    the record and drains the node: "Kill task failed")."""
    fifo = tmp_path / "started"
    os.mkfifo(fifo)
    job_sh = f"trap '' TERM; echo started > {fifo}; sleep 600"
    script = tmp_path / "job.sh"
    script.write_text(f'#!/bin/bash\nsrun jobcage run --batch slurm -- sh -c "{job_sh}"\n')
    job = sbatch(slurm, site, str(script), wait=False)
    wait_started(str(fifo))
    start = time.monotonic()
    slurm.client(["scancel", job])
    view = wait_ended(slurm, job)
    assert view["JobState"] == "CANCELLED"
    assert time.monotonic() - start < KILL_WAIT + 5
    record = records(site, job)[f"{job}.0"]
    assert record["grace_expired"] and record["exit_status"] == 137, record
    assert "SIGTERM" in record["signals_received"]


# -- the guide's recipes -------------------------------------------------------------------


def guide_block(after: str) -> str:
    """The first fenced block after the line containing ``after`` in the guide."""
    with open(DOCS) as f:
        text = f.read()
    start = text.index(after)
    block = re.search(r"```\w*\n(.*?)```", text[start:], re.S)
    assert block, f"no code block after {after!r} in the guide"
    return block.group(1)


def epilog(site) -> str:
    """The guide's Epilog, with this test's config file and jobcage."""
    text = guide_block("### Epilog")
    text = text.replace("/etc/jobcage/jobcage.toml", site["JOBCAGE_CONFIG"])
    return text.replace("/usr/local/bin/jobcage", JOBCAGE)


def test_the_guides_srun_wrapper_runs_each_task_in_its_cage(slurm, site, tmp_path):
    wrapper = tmp_path / "csrun"
    wrapper.write_text(guide_block("As an `srun` wrapper"))
    wrapper.chmod(0o755)
    job = sbatch(slurm, site, "-n", "2", "--wrap", f"{wrapper} -n 2 -- true")
    assert slurm.show_job(job)["ExitCode"] == "0:0", job_output(site, job)
    assert set(records(site, job)) == {f"{job}.0.0", f"{job}.0.1"}

"""Batch systems: the HTCondor job ad, tools/condor-job-wrapper with a fake condor_chirp,
and Slurm job ids."""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
from pathlib import Path

import pytest

from jobcage import Config, ConfigError, Usage
from jobcage.batch import (
    chirp_attribute,
    chirp_usage,
    condor_grace,
    condor_job,
    slurm_grace,
    slurm_job,
    slurm_job_id,
    slurm_kill_wait,
)
from jobcage.batchcheck import check_slurm
from jobcage.config import load_config
from jobcage.errors import ClassAdError

from .cli_support import JOBCAGE, REPO, config_env, list_json

WRAPPER = str(REPO / "tools" / "condor-job-wrapper")

# A job ad as condor_starter writes it to $_CONDOR_SCRATCH_DIR/.job.ad (old format),
# trimmed of attributes nothing here reads; RequestMemory is HTCondor's own default
# expression with the user's request_memory = 2048.
JOB_AD = """\
Arguments = "say \\"hi\\""
ClusterId = 4321
Cmd = "/home/alice/job.sh"
CondorVersion = "$CondorVersion: 24.0.1 2024-10-31 BuildID: 765651 PackageID: 24.0.1-1 $"
CumulativeSlotTime = 0
DiskUsage = 2500000
ExecutableSize = 1
GlobalJobId = "submit.example.org#4321.7#1700000000"
ImageSize = 2500000
JobMaxVacateTime = 20
JobStatus = 2
JobUniverse = 5
MemoryUsage = ((ResidentSetSize + 1023) / 1024)
Owner = "alice"
ProcId = 7
QDate = 1700000000
Rank = 0.0
RequestCpus = 2
RequestDisk = DiskUsage
RequestMemory = ifThenElse(MemoryUsage =!= undefined,MemoryUsage,( 2048 ))
Requirements = (TARGET.Arch == "X86_64") && (TARGET.OpSys == "LINUX") && \
(TARGET.Disk >= RequestDisk) && (TARGET.Memory >= RequestMemory) && \
(TARGET.Cpus >= RequestCpus)
WantIOProxy = true
"""

# The slot's ad ($_CONDOR_MACHINE_AD): 3 GiB, which must not become the job's limit.
MACHINE_AD = """\
Arch = "X86_64"
Cpus = 4
Disk = 10000000
Machine = "node12.example.org"
Memory = 3072
Name = "slot1_1@node12.example.org"
OpSys = "LINUX"
SlotType = "Dynamic"
"""


def starter_files(tmp_path, job_ad: str = JOB_AD) -> dict[str, str]:
    """The files and environment condor_starter gives a USER_JOB_WRAPPER."""
    scratch = tmp_path / "execute" / "dir_12345"
    scratch.mkdir(parents=True)
    (scratch / ".job.ad").write_text(job_ad)
    (scratch / ".machine.ad").write_text(MACHINE_AD)
    return {
        "_CONDOR_JOB_AD": str(scratch / ".job.ad"),
        "_CONDOR_MACHINE_AD": str(scratch / ".machine.ad"),
        "_CONDOR_SCRATCH_DIR": str(scratch),
        "_CONDOR_WRAPPER_ERROR_FILE": str(scratch / ".job_wrapper_failure"),
        "_CONDOR_SLOT": "slot1_1",
    }


def test_condor_job_evaluates_the_ad_with_htcondors_library(tmp_path):
    env = starter_files(tmp_path)
    job = condor_job(env)
    assert job.job_id == "4321.7"
    # ResidentSetSize is not in the ad before the job ran, so MemoryUsage is undefined
    # and RequestMemory the user's 2048, not the slot's 3072.
    assert job.memory_limit_bytes == 2048 << 20
    assert job.cpu_limit == 2
    assert job.scratch_dir == env["_CONDOR_SCRATCH_DIR"]
    assert job.max_vacate_seconds == 20


def test_a_request_memory_without_a_value_falls_back_to_the_slot_memory(tmp_path):
    ad = JOB_AD.replace("( 2048 )", "undefined")
    job = condor_job(starter_files(tmp_path, ad))
    assert job.memory_limit_bytes == 3072 << 20
    env = starter_files(tmp_path / "no-machine", ad)
    del env["_CONDOR_MACHINE_AD"]
    assert condor_job(env).memory_limit_bytes is None


def test_condor_job_errors_say_what_to_do(tmp_path):
    with pytest.raises(ConfigError, match="USER_JOB_WRAPPER"):
        condor_job({})
    ad = tmp_path / "ad"
    ad.write_text('Owner = "bob"\n')
    with pytest.raises(ConfigError, match="ClusterId"):
        condor_job({"_CONDOR_JOB_AD": str(ad)})
    with pytest.raises(ConfigError, match="cannot read"):
        condor_job({"_CONDOR_JOB_AD": str(tmp_path / "missing")})
    ad.write_text("ClusterId = 1\nProcId = (\n")
    with pytest.raises(ClassAdError, match="does not parse"):
        condor_job({"_CONDOR_JOB_AD": str(ad)})


def test_grace_stays_inside_htcondors_vacate_time():
    assert condor_grace(30, None) == 30
    assert condor_grace(30, 10) == 9
    assert condor_grace(5, 10) == 5
    assert condor_grace(30, 0) == 0


def test_chirp_attribute_names():
    assert chirp_attribute("memory_peak_bytes") == "JobCageMemoryPeakBytes"
    assert chirp_attribute("net_wan_tx_bytes") == "JobCageNetWanTxBytes"


def _fake_chirp(tmp_path, status: int = 0) -> tuple[str, str]:
    log = tmp_path / "chirp.log"
    exe = tmp_path / "bin" / "condor_chirp"
    exe.parent.mkdir(exist_ok=True)
    exe.write_text(f'#!/bin/sh\necho "$@" >> {log}\nexit {status}\n')
    exe.chmod(0o755)
    return str(exe), str(log)


def test_chirp_sets_known_figures_and_skips_unknown_ones(tmp_path):
    exe, log = _fake_chirp(tmp_path)
    usage = Usage(wall_seconds=1.25, memory_peak_bytes=4096, net_wan_tx_bytes=None)
    assert chirp_usage(usage, exe) == []
    assert Path(log).read_text().splitlines() == [
        "set_job_attr JobCageWallSeconds 1.25",
        "set_job_attr JobCageMemoryPeakBytes 4096",
    ]


def test_failing_chirp_is_reported_once_not_raised(tmp_path):
    exe, log = _fake_chirp(tmp_path, status=1)
    failures = chirp_usage(Usage(wall_seconds=1.0, oom_kills=0), exe)
    assert len(failures) == 1 and "WantIOProxy" in failures[0]
    assert len(Path(log).read_text().splitlines()) == 1


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"SLURM_JOB_ID": "812", "SLURM_STEP_ID": "0"}, "812.0"),
        ({"SLURM_JOB_ID": "812"}, "812.batch"),
        ({"SLURM_JOB_ID": "812", "SLURM_STEP_ID": "3", "SLURM_STEP_NUM_TASKS": "1"}, "812.3"),
        (
            {
                "SLURM_JOB_ID": "812",
                "SLURM_STEP_ID": "3",
                "SLURM_STEP_NUM_TASKS": "4",
                "SLURM_PROCID": "2",
            },
            "812.3.2",
        ),
        ({"SLURM_JOBID": "9", "SLURM_STEPID": "1"}, "9.1"),
        # sbatch -n 2: the batch script sees the job's task count, but is one task.
        ({"SLURM_JOB_ID": "812", "SLURM_NTASKS": "2", "SLURM_PROCID": "0"}, "812.batch"),
    ],
)
def test_slurm_job_id(env, expected):
    assert slurm_job_id(env) == expected


def test_slurm_job_id_outside_slurm_says_what_to_do():
    with pytest.raises(ConfigError, match="--job-id"):
        slurm_job_id({})


@pytest.mark.parametrize(
    ("env", "memory", "cpus"),
    [
        ({"SLURM_MEM_PER_NODE": "200", "SLURM_CPUS_ON_NODE": "2"}, 200 << 20, 2),
        ({"SLURM_MEM_PER_CPU": "100", "SLURM_CPUS_ON_NODE": "3"}, 300 << 20, 3),
        (
            {
                "SLURM_STEP_ID": "0",
                "SLURM_STEP_NUM_TASKS": "4",
                "SLURM_CPUS_PER_TASK": "2",
                "SLURM_MEM_PER_CPU": "50",
                "SLURM_PROCID": "1",
            },
            100 << 20,
            2,
        ),
        ({}, None, None),
    ],
)
def test_slurm_job_takes_the_jobs_memory_and_cpus(env, memory, cpus):
    job = slurm_job({"SLURM_JOB_ID": "5", "SLURM_CONF": "/nonexistent", **env})
    assert job.memory_limit_bytes == memory and job.cpu_limit == cpus


def test_slurm_grace_fits_inside_killwait(tmp_path):
    conf = tmp_path / "slurm.conf"
    conf.write_text("ClusterName=c\nKillWait=8 # short\n")
    assert slurm_kill_wait({"SLURM_CONF": str(conf)}) == 8
    assert slurm_grace(20, 8) == 3
    conf.write_text("ClusterName=c\n")
    assert slurm_kill_wait({"SLURM_CONF": str(conf)}) == 30  # Slurm's default
    assert slurm_kill_wait({"SLURM_CONF": str(tmp_path / "none")}) is None
    # The default grace and its teardown fit Slurm's default KillWait.
    assert slurm_grace(Config().grace_seconds, 30) == Config().grace_seconds


def test_doctor_warns_when_the_grace_does_not_fit_killwait(tmp_path):
    conf = tmp_path / "slurm.conf"
    conf.write_text("KillWait=30\nProctrackType=proctrack/pgid\n")
    lines = {name: (status, text) for name, status, text in check_slurm(Config(), str(conf))}
    assert lines["slurm kill wait"][0] == "ok"
    assert lines["slurm proctrack"][0] == "warn"
    late = {n: (s, t) for n, s, t in check_slurm(Config(grace_seconds=30.0), str(conf))}
    assert (
        late["slurm kill wait"][0] == "warn"
        and "grace_seconds <= 25" in late["slurm kill wait"][1]
    )


# -- the wrapper for real ----------------------------------------------------------------


def _condor_env(cage_config, tmp_path, **extra):
    starter = starter_files(tmp_path)
    scratch = Path(starter["_CONDOR_SCRATCH_DIR"])
    exe, log = _fake_chirp(tmp_path)
    env = config_env(cage_config, **starter, **extra)
    env["PATH"] = f"{os.path.dirname(exe)}:{env['PATH']}"
    return env, scratch, log


@pytest.mark.root
def test_condor_wrapper_runs_the_job_in_a_cage_and_reports(cage_config, tmp_path):
    env, scratch, chirp_log = _condor_env(cage_config, tmp_path)
    done = subprocess.run(
        [WRAPPER, "/bin/sh", "-c", 'echo "$JOBCAGE_JOB_ID"; cat /proc/self/cgroup; exit 5'],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 5, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "4321.7"
    assert any(f"{cage_config.cgroup_parent}/4321.7" in line for line in lines[1:])
    record = json.loads((scratch / "jobcage-usage.json").read_text())
    assert record["job_id"] == "4321.7" and record["exit_status"] == 5
    assert record["usage"]["memory_limit_bytes"] == 2048 << 20  # RequestMemory evaluated
    assert record["usage"]["cpu_limit_cpus"] == 2  # RequestCpus
    chirps = Path(chirp_log).read_text().splitlines()
    assert "set_job_attr JobCageMemoryPeakBytes" in "\n".join(chirps)
    assert all(line.startswith("set_job_attr JobCage") for line in chirps)
    assert not (scratch / ".job_wrapper_failure").exists()
    assert list_json(cage_config) == {}


@pytest.mark.root
def test_condor_wrapper_failure_holds_the_job_with_a_reason(cage_config, tmp_path):
    env, scratch, _ = _condor_env(cage_config, tmp_path, JOBCAGE_WRAPPER_ARGS="--memory 0")
    done = subprocess.run([WRAPPER, "/bin/true"], env=env, capture_output=True, text=True)
    assert done.returncode == 125
    reason = (scratch / ".job_wrapper_failure").read_text()
    assert "memory_limit" in reason and reason.count("\n") == 1


def test_condor_wrapper_without_jobcage_on_path(tmp_path):
    err = tmp_path / "err"
    done = subprocess.run(
        [WRAPPER, "/bin/true"],
        env={
            "PATH": "/usr/bin:/bin",
            "JOBCAGE": "no-such-jobcage",
            "_CONDOR_WRAPPER_ERROR_FILE": str(err),
        },
        capture_output=True,
        text=True,
    )
    assert done.returncode == 125 and "not on PATH" in err.read_text()


@pytest.mark.root
def test_slurm_step_id_reaches_the_cage(cage_config):
    env = config_env(cage_config, SLURM_JOB_ID="812", SLURM_STEP_ID="4")
    done = subprocess.run(
        [
            JOBCAGE,
            "run",
            "--batch",
            "slurm",
            "--usage-file",
            "-",
            "--",
            "sh",
            "-c",
            'test "$JOBCAGE_JOB_ID" = 812.4',
        ],
        env=env,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["job_id"] == "812.4"


# -- the caller going away -------------------------------------------------------------


@pytest.mark.root
def test_run_stops_the_job_when_the_shell_that_started_it_dies(cage_config, tmp_path):
    """A batch shell killed by a cancel: jobcage run stops the job (its daemon too),
    tears the cage down and writes the record, without any signal of its own."""
    record = tmp_path / "record.jsonl"
    fifo = tmp_path / "started"
    os.mkfifo(fifo)
    job = f"setsid sleep 600 & echo started > {fifo}; sleep 600"
    shell = subprocess.Popen(
        [
            "bash",
            "-c",
            f"{JOBCAGE} run --usage-file {record} -- sh -c '{job}'; echo after",
        ],
        env=config_env(cage_config),
        stdout=subprocess.PIPE,
    )
    with open(fifo) as f:
        assert f.readline() == "started\n"
    runner_pid = int(
        subprocess.run(
            ["pgrep", "-P", str(shell.pid)], capture_output=True, text=True, check=True
        ).stdout.split()[0]
    )
    runner = os.pidfd_open(runner_pid)
    shell.kill()
    shell.wait()
    select.select([runner], [], [], 30)
    os.close(runner)
    (line,) = record.read_text().splitlines()
    result = json.loads(line)
    assert result["parent_exited"] is True
    assert result["exit_status"] == 143 and result["usage"]["processes_killed"] >= 1  # the daemon


@pytest.mark.root
def test_doctor_does_not_call_forwarding_off_a_failure():
    """JobCage turns ip_forward on itself: 0 is no reason to warn that cages cannot
    get out (a fresh netns of our own has it at 0)."""
    name = f"jct-fwd-{os.urandom(3).hex()}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        out = subprocess.run(
            [
                "ip",
                "netns",
                "exec",
                name,
                sys.executable,
                "-c",
                "from jobcage.doctor import check_forwarding as c; r = c(); "
                "print(r.status.value, r.message)",
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    finally:
        subprocess.run(["ip", "netns", "del", name], check=True)
    assert out.startswith("ok net.ipv4.ip_forward = 0"), out
    assert "cannot" not in out and "first networked cage turns it on" in out


def test_cpu_limit_is_a_config_key_checked_like_the_others(tmp_path):
    assert load_config(environ={"JOBCAGE_CPU_LIMIT": "1.5"}).cpu_limit == 1.5
    conf = tmp_path / "c.toml"
    conf.write_text("cpu_limit = 2\n")
    assert load_config(str(conf), environ={}).cpu_limit == 2.0
    conf.write_text('cpu_limit = "many"\n')
    with pytest.raises(ConfigError, match=r"cpu_limit.*many"):
        load_config(str(conf), environ={})

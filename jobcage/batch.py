"""What a batch system tells its job about itself: job id, memory request, scratch dir.

HTCondor hands a job wrapper the job's ClassAd in the file ``$_CONDOR_JOB_AD`` (and the
slot's in ``$_CONDOR_MACHINE_AD``) and a scratch directory in ``$_CONDOR_SCRATCH_DIR``;
it puts the job on hold with the text of ``$_CONDOR_WRAPPER_ERROR_FILE`` when the
wrapper writes one. Slurm puts ``SLURM_JOB_ID``, ``SLURM_STEP_ID`` and
``SLURM_PROCID`` into the environment of each task.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .errors import ConfigError
from .ids import validate_job_id
from .usage import Usage

if TYPE_CHECKING:
    from .config import Config

MIB = 1 << 20
CONDOR_USAGE_FILE = "jobcage-usage.json"
# Usage figures set as job attributes through condor_chirp (one call each, so few).
CHIRP_FIELDS = (
    "wall_seconds",
    "cpu_user_seconds",
    "cpu_system_seconds",
    "memory_peak_bytes",
    "oom_kills",
    "io_read_bytes",
    "io_write_bytes",
    "net_lan_rx_bytes",
    "net_lan_tx_bytes",
    "net_wan_rx_bytes",
    "net_wan_tx_bytes",
)
CHIRP_TIMEOUT_SECONDS = 30.0


# -- HTCondor ----------------------------------------------------------------------------


@dataclass(frozen=True)
class CondorJob:
    """What ``jobcage run --batch condor`` takes from HTCondor."""

    job_id: str
    memory_limit_bytes: int | None
    scratch_dir: str | None
    # The time HTCondor waits between its soft kill (SIGTERM) and SIGKILL.
    max_vacate_seconds: float | None
    # RequestCpus: the CPU limit.
    cpu_limit: float | None = None


def condor_job(environ: Mapping[str, str] | None = None) -> CondorJob:
    """Read the job ad named by ``$_CONDOR_JOB_AD``: ClusterId.ProcId, RequestMemory
    (MiB), RequestCpus, JobMaxVacateTime.

    The ad is evaluated with HTCondor's own ClassAd library (the ``condor`` extra),
    since RequestMemory is often an expression, e.g. HTCondor's
    ``ifThenElse(MemoryUsage =!= undefined, MemoryUsage, 2048)``: 2048 at the start of
    a job. Only when it evaluates to no positive number is the slot's provisioned
    Memory from ``$_CONDOR_MACHINE_AD`` used.
    """
    from . import classads

    env = os.environ if environ is None else environ
    path = env.get("_CONDOR_JOB_AD")
    if not path:
        raise ConfigError(
            "--batch condor needs $_CONDOR_JOB_AD: run it as HTCondor's USER_JOB_WRAPPER "
            "(tools/condor-job-wrapper), or give --job-id instead"
        )
    ad = _read_ad(path, classads)
    cluster, proc = _evaluate(ad, "ClusterId", classads), _evaluate(ad, "ProcId", classads)
    if not _is_int(cluster) or not _is_int(proc):
        raise ConfigError(
            f"the job ad {path} has no integer ClusterId and ProcId; give --job-id instead"
        )
    memory_mib = _number(_evaluate(ad, "RequestMemory", classads))
    if memory_mib is None:
        machine_path = env.get("_CONDOR_MACHINE_AD")
        if machine_path and os.path.exists(machine_path):
            machine = _read_ad(machine_path, classads)
            memory_mib = _number(_evaluate(machine, "Memory", classads))
    vacate = _evaluate(ad, "JobMaxVacateTime", classads)
    return CondorJob(
        job_id=validate_job_id(f"{cluster}.{proc}"),
        memory_limit_bytes=int(memory_mib * MIB) if memory_mib else None,
        scratch_dir=env.get("_CONDOR_SCRATCH_DIR") or None,
        max_vacate_seconds=float(vacate) if _is_int(vacate) or isinstance(vacate, float) else None,
        cpu_limit=_number(_evaluate(ad, "RequestCpus", classads)),
    )


def _read_ad(path: str, classads: Any) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read the HTCondor ad {path}: {e}") from None
    return classads.parse_ad(text)


def _evaluate(ad: Any, name: str, classads: Any) -> Any:
    """An attribute's value; an expression that evaluates to ERROR counts as absent
    (HTCondor itself would not match such a job), the rest of the ad still serves."""
    from .errors import ClassAdError

    try:
        return classads.evaluate(ad, name)
    except ClassAdError:
        return None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value: Any) -> float | None:
    """A positive number, else None (booleans, strings, undefined, 0)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        return None
    return value


def condor_grace(grace_seconds: float, max_vacate_seconds: float | None) -> float:
    """Keep the grace period inside HTCondor's own vacate time.

    HTCondor SIGKILLs the wrapper when JobMaxVacateTime runs out; a cage whose owner
    is SIGKILLed is left for `jobcage reap`, so the cage must be torn down first.
    """
    if max_vacate_seconds is None:
        return grace_seconds
    return max(0.0, min(grace_seconds, max_vacate_seconds - 1.0))


def chirp_attribute(field: str) -> str:
    """``memory_peak_bytes`` -> ``JobCageMemoryPeakBytes``."""
    return "JobCage" + "".join(part.capitalize() for part in field.split("_"))


def chirp_usage(usage: Usage, exe: str | None = None) -> list[str]:
    """Set the usage as job attributes with ``condor_chirp set_job_attr``.

    Needs the job's I/O proxy (``+WantIOProxy = true``). Returns the failures, as one
    line each; a failed chirp must not change the job's exit status.
    """
    exe = exe or shutil.which("condor_chirp")
    if exe is None:
        return []
    failures = []
    values = dataclasses.asdict(usage)
    for name in CHIRP_FIELDS:
        value = values.get(name)
        if value is None:
            continue
        text = repr(round(value, 6)) if isinstance(value, float) else str(value)
        try:
            done = subprocess.run(
                [exe, "set_job_attr", chirp_attribute(name), text],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                timeout=CHIRP_TIMEOUT_SECONDS,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as e:
            failures.append(f"condor_chirp set_job_attr {chirp_attribute(name)}: {e}")
            break
        if done.returncode != 0:
            err = done.stderr.decode(errors="replace").strip().splitlines()
            failures.append(
                f"condor_chirp set_job_attr {chirp_attribute(name)} failed "
                f"({err[-1] if err else f'status {done.returncode}'}); "
                "is +WantIOProxy = true in the job?"
            )
            break
    return failures


def write_wrapper_error(path: str | None, message: str) -> None:
    """Tell HTCondor why the wrapper could not start the job; it holds the job with it."""
    if not path:
        return
    with contextlib.suppress(OSError), open(path, "w") as f:
        f.write(message + "\n")


# -- Slurm -------------------------------------------------------------------------------


def slurm_job_id(environ: Mapping[str, str] | None = None) -> str:
    """``$SLURM_JOB_ID.$SLURM_STEP_ID``, plus ``.$SLURM_PROCID`` when the step has
    several tasks (each task of an ``srun`` wrapper builds its own cage).

    In the batch script itself no step id is set: that is Slurm's "batch" step, which
    has one task whatever ``sbatch -n`` asked for (``SLURM_NTASKS`` there is the job's
    task count, for the steps to come), so its cage is ``N.batch``.
    """
    env = os.environ if environ is None else environ
    job = env.get("SLURM_JOB_ID") or env.get("SLURM_JOBID")
    if not job:
        raise ConfigError(
            "--batch slurm needs $SLURM_JOB_ID: run it inside a Slurm job, or give --job-id"
        )
    step = env.get("SLURM_STEP_ID") or env.get("SLURM_STEPID")
    if not step:
        return validate_job_id(f"{job}.batch")
    parts = [job, step]
    ntasks = env.get("SLURM_STEP_NUM_TASKS") or env.get("SLURM_NTASKS")
    procid = env.get("SLURM_PROCID")
    if procid is not None and ntasks is not None and ntasks.isdigit() and int(ntasks) > 1:
        parts.append(procid)
    return validate_job_id(".".join(parts))


@dataclass(frozen=True)
class SlurmJob:
    """What ``jobcage run --batch slurm`` takes from Slurm."""

    job_id: str
    memory_limit_bytes: int | None
    cpu_limit: float | None
    # Slurm's KillWait: the time between the SIGTERM of a cancel and its SIGKILL.
    kill_wait_seconds: float | None


def slurm_job(environ: Mapping[str, str] | None = None) -> SlurmJob:
    """The cage id, and the job's memory and CPU request, from a task's environment.

    Memory: ``SLURM_MEM_PER_NODE`` (``--mem``), else ``SLURM_MEM_PER_CPU``
    (``--mem-per-cpu``) times the CPUs of this task, both in MiB. CPUs: a step's
    ``SLURM_CPUS_PER_TASK`` (default 1 when the step has several tasks), the batch
    script's or a one-task step's ``SLURM_CPUS_ON_NODE``.
    """
    env = os.environ if environ is None else environ
    job_id = slurm_job_id(env)
    cpus = _slurm_cpus(env)
    memory_mib = _positive(env.get("SLURM_MEM_PER_NODE"))
    if memory_mib is None:
        per_cpu = _positive(env.get("SLURM_MEM_PER_CPU"))
        if per_cpu is not None:
            memory_mib = per_cpu * (cpus or 1)
    return SlurmJob(
        job_id=job_id,
        memory_limit_bytes=int(memory_mib * MIB) if memory_mib else None,
        cpu_limit=cpus,
        kill_wait_seconds=slurm_kill_wait(env),
    )


def _slurm_cpus(env: Mapping[str, str]) -> float | None:
    in_step = bool(env.get("SLURM_STEP_ID") or env.get("SLURM_STEPID"))
    ntasks = _positive(env.get("SLURM_STEP_NUM_TASKS") or env.get("SLURM_NTASKS"))
    per_task = _positive(env.get("SLURM_CPUS_PER_TASK"))
    if in_step and ntasks is not None and ntasks > 1:
        return per_task or 1.0
    return _positive(env.get("SLURM_CPUS_ON_NODE")) or per_task


def _positive(text: str | None) -> float | None:
    if not text:
        return None
    try:
        value = float(text.strip())
    except ValueError:
        return None
    return value if value > 0 else None


DEFAULT_SLURM_CONF = "/etc/slurm/slurm.conf"
# Slurm's own default KillWait (slurm.conf(5)).
SLURM_DEFAULT_KILL_WAIT = 30.0
# What the teardown after the grace needs, kept free inside KillWait: kill, read the
# counters, remove the cage, write the record (well under a second even for large
# jobs; a few seconds cover a loaded node).
SLURM_TEARDOWN_MARGIN = 5.0


def slurm_kill_wait(environ: Mapping[str, str] | None = None) -> float | None:
    """KillWait from ``$SLURM_CONF`` (else /etc/slurm/slurm.conf); None without a file."""
    env = os.environ if environ is None else environ
    path = env.get("SLURM_CONF") or DEFAULT_SLURM_CONF
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        return None
    for line in text.splitlines():
        key, sep, value = line.split("#", 1)[0].partition("=")
        if sep and key.strip().lower() == "killwait":
            found = _positive(value.split()[0] if value.split() else "")
            return found if found is not None else SLURM_DEFAULT_KILL_WAIT
    return SLURM_DEFAULT_KILL_WAIT


def slurm_grace(grace_seconds: float, kill_wait_seconds: float | None) -> float:
    """Keep the grace and the teardown after it inside Slurm's KillWait.

    Slurm SIGKILLs what it tracks KillWait seconds after the SIGTERM of a cancel; a
    ``jobcage run`` killed before its teardown leaves the cage to `jobcage reap` and
    keeps the step's stdio open, and slurmd drains the node ("Kill task failed").
    """
    if kill_wait_seconds is None:
        return grace_seconds
    return max(0.0, min(grace_seconds, kill_wait_seconds - SLURM_TEARDOWN_MARGIN))


def slurm_usage_file(state_dir: str, job_id: str) -> str:
    """The default record place under Slurm: beside the bills `jobcage reap` writes."""
    return os.path.join(state_dir, "usage", f"{job_id}.json")


# -- what `jobcage run --batch` takes --------------------------------------------------


@dataclass(frozen=True)
class BatchRun:
    """A cage's id, config and record place once the batch system's word is in."""

    job_id: str
    config: Config
    usage_file: str | None
    condor: CondorJob | None


def batch_run(
    kind: str,
    config: Config,
    *,
    job_id: str | None,
    usage_file: str | None,
    given: frozenset[str],
) -> BatchRun:
    """The job's own request (memory, CPUs), a grace inside the batch system's kill
    delay and its default record place, for each of those the command line did not
    give (``given`` names the config keys it did)."""
    job: CondorJob | SlurmJob
    if kind == "condor":
        job = condor_job()
        job_id = job_id or job.job_id
        grace = condor_grace(config.grace_seconds, job.max_vacate_seconds)
        default_usage = f"{job.scratch_dir}/{CONDOR_USAGE_FILE}" if job.scratch_dir else None
    else:
        job = slurm_job()
        job_id = job_id or job.job_id
        grace = slurm_grace(config.grace_seconds, job.kill_wait_seconds)
        default_usage = slurm_usage_file(config.state_dir, job_id)
    changes: dict[str, object] = {}
    for key, value in (("memory_limit", job.memory_limit_bytes), ("cpu_limit", job.cpu_limit)):
        if key not in given and value is not None:
            changes[key] = value
    if "grace_seconds" not in given:
        changes["grace_seconds"] = grace
    return BatchRun(
        job_id=job_id,
        config=config.replace(**changes),
        usage_file=usage_file if usage_file is not None else default_usage,
        condor=job if isinstance(job, CondorJob) else None,
    )

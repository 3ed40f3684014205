"""``jobcage doctor``'s batch-system lines: what it can see of Slurm and the caller.

Each line is ``(name, "ok" | "warn", message)``; doctor makes its checks of them.

Slurm: KillWait against the grace (a ``jobcage run`` SIGKILLed before its teardown
loses the record, keeps the step's stdio and drains the node) and the proctrack
plugin. Caller: whether a cage made now would have to nest under a limited cgroup.
"""

from __future__ import annotations

import os

from . import batch
from .config import Config

Line = tuple[str, str, str]


def batch_checks(config: Config, environ: dict[str, str] | None = None) -> list[Line]:
    env = dict(os.environ if environ is None else environ)
    checks = [check_caller_limits(config)]
    conf = env.get("SLURM_CONF") or batch.DEFAULT_SLURM_CONF
    if os.path.exists(conf):
        checks += check_slurm(config, conf)
    return checks


def check_caller_limits(config: Config) -> Line:
    from .cgroups import open_backend, probe
    from .cgroups.caller import caller_limit

    name = "batch limits"
    h = probe()
    try:
        version = open_backend(config, h).version
    except Exception as e:  # the cgroup lines above say what is wrong
        return (name, "warn", f"cannot tell: {e}")
    found = caller_limit(h, version)
    if found is None:
        return (
            name,
            "ok",
            "this caller's cgroup has no limit; a cage made inside a batch job's limited "
            "cgroup nests under it, whatever cgroup_parent says",
        )
    return (
        name,
        "ok",
        f"this caller is limited ({found}): cages nest under its cgroup, not "
        f"{config.cgroup_parent or 'the default parent'}, so the limit holds",
    )


def slurm_setting(conf_text: str, key: str) -> str | None:
    for line in conf_text.splitlines():
        name, sep, value = line.split("#", 1)[0].partition("=")
        if sep and name.strip().lower() == key.lower():
            return value.strip().split()[0] if value.strip() else ""
    return None


def check_slurm(config: Config, conf: str) -> list[Line]:
    try:
        with open(conf) as f:
            text = f.read()
    except OSError as e:
        return [("slurm", "warn", f"cannot read {conf}: {e.strerror}")]
    checks = []
    kill_wait = batch.slurm_kill_wait({"SLURM_CONF": conf}) or batch.SLURM_DEFAULT_KILL_WAIT
    room = kill_wait - batch.SLURM_TEARDOWN_MARGIN
    if config.grace_seconds > room:
        checks.append(
            (
                "slurm kill wait",
                "warn",
                f"grace_seconds {config.grace_seconds:g} does not finish inside {conf}'s "
                f"KillWait {kill_wait:g} with {batch.SLURM_TEARDOWN_MARGIN:g} s for the "
                "teardown: `--batch slurm` shortens its grace itself, but a `--job-id` run "
                f"would lose its record and drain the node; set grace_seconds <= {room:g} "
                f"or KillWait >= {config.grace_seconds + batch.SLURM_TEARDOWN_MARGIN:g}",
            )
        )
    else:
        checks.append(
            (
                "slurm kill wait",
                "ok",
                f"grace_seconds {config.grace_seconds:g} + teardown fit in KillWait {kill_wait:g}",
            )
        )
    proctrack = slurm_setting(text, "ProctrackType") or "proctrack/cgroup"
    if proctrack == "proctrack/pgid":
        checks.append(
            (
                "slurm proctrack",
                "warn",
                "ProctrackType=proctrack/pgid: Slurm signals only jobcage run's process "
                "group, never the caged job (its own session); set "
                "ProctrackType=proctrack/cgroup",
            )
        )
    else:
        checks.append(("slurm proctrack", "ok", f"ProctrackType={proctrack}"))
    return checks

"""The bill of a reaped cage: ``<state_dir>/usage/<job id>.json``, once per job.

The batch system never got the usage from a dead owner, so an accounting job picks it
up here. A cage may take several reaps (processes in D state outlive the first), or be
destroyed by its owner and reaped later; it is billed once. The record says
``billed`` once a bill is written, and the bill itself is linked into place
exclusively (link(2) fails with EEXIST, like O_EXCL), so two reapers, or a reaper that
died between writing the bill and saving the record, never make a second one. A bill
for the same job id from an earlier cage (the id was reused: ``created_unix``
differs) keeps its name, and the new one gets ``<job id>.<n>.json``. Under Slurm
``jobcage run`` writes its own usage record here too (jobcage/batch.py): a cage whose
owner wrote it before its teardown failed is billed by that record alone.
"""

from __future__ import annotations

import contextlib
import json
import os
import time

from ..records import CageRecord
from ..usage import USAGE_FORMAT, Usage

USAGE_DIR = "usage"
MAX_BILLS_PER_JOB_ID = 1000


def usage_dir(state_dir: str) -> str:
    return os.path.join(state_dir, USAGE_DIR)


def write_bill(state_dir: str, record: CageRecord, reason: str, usage: Usage | None) -> str:
    """Bill ``record``'s cage unless it already was; the bill's path either way."""
    if record.billed:  # an accounting job may have taken the file away since
        return record.billed
    directory = usage_dir(state_dir)
    os.makedirs(directory, mode=0o755, exist_ok=True)
    previous = record.reaped_from
    document = {
        "format": USAGE_FORMAT,
        "job_id": record.job_id,
        "reaped": True,
        "reason": reason,
        "owner_pid": previous.pid if previous else None,
        "created_unix": record.created_unix,
        "reaped_unix": time.time(),
        "exit_status": None,
        "usage": usage.to_dict() if usage else None,
    }
    tmp = os.path.join(directory, f"{record.job_id}.json.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        f.write(json.dumps(document, separators=(",", ":")) + "\n")
    try:
        for n in range(MAX_BILLS_PER_JOB_ID):
            name = f"{record.job_id}.json" if n == 0 else f"{record.job_id}.{n}.json"
            path = os.path.join(directory, name)
            try:
                os.link(tmp, path)
                return path
            except FileExistsError:
                if _bills_this_cage(path, record):
                    return path
        raise OSError(f"{MAX_BILLS_PER_JOB_ID} bills of job {record.job_id} in {directory}")
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)


def _bills_this_cage(path: str, record: CageRecord) -> bool:
    """Whether the bill at ``path`` is of this very cage (not of an earlier job id twin)."""
    try:
        with open(path, "rb") as f:
            bill = json.loads(f.read().decode("utf-8"))
    except (OSError, ValueError):
        return False  # not ours to judge: leave it, bill beside it
    if not isinstance(bill, dict) or bill.get("job_id") != record.job_id:
        return False
    if bill.get("created_unix") is not None:  # a reap's bill
        return bill["created_unix"] == record.created_unix
    # `jobcage run`'s own record (under Slurm it is written here too): its job started
    # in this cage if it started after the cage was created.
    started = bill.get("started_unix")
    return (
        isinstance(started, int | float)
        and record.created_unix is not None
        and started >= record.created_unix
    )

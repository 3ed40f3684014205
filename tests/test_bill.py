"""One job, one bill: a cage reaped in two passes (a process in D state outlives the
first), or destroyed by its owner and reaped later, gets exactly one
``usage/<job id>.json``."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from jobcage import JobCage
from jobcage.errors import TeardownError
from jobcage.records import StateStore
from jobcage.recovery import reap
from jobcage.recovery.bill import usage_dir, write_bill
from jobcage.usage import Usage

from .test_network_held import frozen_fs, short_kill, spawn_blocked_writer  # noqa: F401


def test_a_bill_is_written_once_per_cage_and_a_reused_id_gets_its_own(tmp_path):
    store = StateStore(str(tmp_path / "state"))
    record = store.new_record("bill.1")
    first = write_bill(store.state_dir, record, "owner-dead", Usage(wall_seconds=1.0))
    # A reaper that died between the bill and the record's "billed": the bill is found.
    assert write_bill(store.state_dir, record, "owner-dead", Usage(wall_seconds=2.0)) == first
    assert write_bill(store.state_dir, record.replace(billed=first), "x", None) == first
    assert os.listdir(usage_dir(store.state_dir)) == ["bill.1.json"]
    with open(first) as f:
        assert json.load(f)["usage"]["wall_seconds"] == 1.0
    # The same job id, a later cage (the batch system reused it): billed beside it.
    later = record.replace(created_unix=record.created_unix + 10)
    assert write_bill(store.state_dir, later, "owner-dead", None).endswith("bill.1.1.json")


def test_a_cage_its_owner_billed_under_slurm_is_not_billed_again(tmp_path):
    """`jobcage run --batch slurm` writes its record to usage/<id>.json itself; a
    teardown that failed after that leaves the cage to reap, which must not bill it
    twice. A record of an earlier job of the same id (started before this cage) is
    no bill of this one."""
    store = StateStore(str(tmp_path / "state"))
    record = store.new_record("7.batch")
    os.makedirs(usage_dir(store.state_dir))
    own = os.path.join(usage_dir(store.state_dir), "7.batch.json")
    with open(own, "w") as f:
        json.dump({"job_id": "7.batch", "started_unix": record.created_unix + 0.01}, f)
    assert write_bill(store.state_dir, record, "teardown-failed", None) == own
    assert os.listdir(usage_dir(store.state_dir)) == ["7.batch.json"]
    with open(own, "w") as f:
        json.dump({"job_id": "7.batch", "started_unix": record.created_unix - 100}, f)
    assert write_bill(store.state_dir, record, "owner-dead", None).endswith("7.batch.1.json")


@pytest.mark.root
def test_destroyed_then_reaped_in_two_passes_is_billed_once(cage_config, frozen_fs, short_kill):  # noqa: F811
    cage = JobCage("twopass.1", config=cage_config).create()
    mnt = frozen_fs()
    hung = spawn_blocked_writer(cage, mnt)
    try:
        with pytest.raises(TeardownError, match="survived SIGKILL"):
            cage.destroy()
        first = reap(cage_config)
        [reaped] = first.cages
        assert reaped.surviving == 1 and reaped.usage_file is not None
    finally:
        subprocess.run(["fsfreeze", "--unfreeze", mnt], check=False)
        hung.wait(timeout=30)
    second = reap(cage_config)
    assert not second.errors, second.errors
    [again] = second.cages
    assert again.usage_file == reaped.usage_file
    assert os.listdir(usage_dir(cage_config.state_dir)) == ["twopass.1.json"]
    assert StateStore(cage_config.state_dir).records() == []

"""The record store on a real file system (a temp dir): a claim is exclusive, an update
replaces the record whole and leaves no temporary file behind."""

from __future__ import annotations

import os

import pytest

from jobcage.errors import CageExistsError
from jobcage.state import StateStore


def test_updates_replace_the_record_and_leave_only_it(tmp_path):
    store = StateStore(str(tmp_path / "state"))
    record = store.new_record("j1", cgroup=None)
    store.claim(record)
    for state in ("built", "teardown-failed"):
        record["state"] = state
        store.save(record)
        assert store.load("j1")["state"] == state
    assert os.listdir(store.cages_dir) == ["j1.json"]
    with pytest.raises(CageExistsError, match="already exists"):
        store.claim(store.new_record("j1"))
    store.remove("j1")
    assert os.listdir(store.cages_dir) == []


def test_saving_a_record_that_is_not_there_creates_it(tmp_path):
    """RENAME_EXCHANGE needs both names; without the old one, save renames."""
    store = StateStore(str(tmp_path / "state"))
    record = store.new_record("j2")
    store.claim(record)
    store.remove("j2")
    store.save(record)
    assert store.load("j2")["job_id"] == "j2"
    assert os.listdir(store.cages_dir) == ["j2.json"]

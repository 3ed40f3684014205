"""spawn()'s Popen options and the cgroup controllers a cage joins, for real (root)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from jobcage import JobCage, SpawnError
from jobcage.cgroups import probe
from jobcage.cgroups.base import read_file

from .conftest import unique

pytestmark = pytest.mark.root


def test_spawn_takes_popens_everyday_options(cage_config):
    read_end, write_end = os.pipe()
    try:
        with JobCage(unique("popen"), config=cage_config) as cage:
            writer = f"import os; os.write({write_end}, b'fd-ok'); print(os.getsid(0))"
            proc = cage.spawn(
                [sys.executable, "-c", writer],
                stdout=subprocess.PIPE,
                text=True,
                encoding="utf-8",
                errors="strict",
                bufsize=1,
                pass_fds=(write_end,),
                start_new_session=False,
            )
            os.close(write_end)  # the job holds the only copy now: EOF when it exits
            write_end = -1
            out, _ = proc.communicate(timeout=30)
            assert isinstance(out, str)  # text= reached Popen
            assert os.read(read_end, 100) == b"fd-ok"  # pass_fds= reached Popen
            # start_new_session=False: the job stays in our session.
            assert int(out) == os.getsid(0)
            proc = cage.spawn(
                [sys.executable, "-c", "import os; print(os.getsid(0))"], stdout=subprocess.PIPE
            )
            assert int(proc.communicate(timeout=30)[0]) == proc.pid  # default: own session
    finally:
        os.close(read_end)
        if write_end >= 0:
            os.close(write_end)


@pytest.mark.parametrize("option", ["preexec_fn", "group", "extra_groups"])
def test_options_that_would_break_the_cage_are_refused(cage_config, option):
    value = {"preexec_fn": os.getpid, "group": 0, "extra_groups": [0]}[option]
    with JobCage(unique("refuse"), config=cage_config) as cage:
        with pytest.raises(SpawnError, match=rf"cannot take {option}=") as err:
            cage.spawn(["true"], **{option: value})
        assert "\n" not in str(err.value)
        assert cage.pids() == set()


def test_a_missing_cwd_blames_the_directory_not_the_command(cage_config, tmp_path):
    missing = str(tmp_path / "no-such-dir")
    with JobCage(unique("cwd"), config=cage_config) as cage:
        with pytest.raises(SpawnError, match="working directory") as err:
            cage.spawn(["true"], cwd=missing)
        # No errno: the CLI maps ENOENT to 127, "command not found", which it is not.
        assert missing in str(err.value) and err.value.errno is None


@pytest.mark.cgroup_v1
def test_a_memory_limit_brings_the_memory_controller_when_not_listed(cage_config):
    if "memory" not in probe().v1_mounts:
        pytest.skip("no cgroup v1 memory hierarchy on this node")
    config = cage_config.replace(cgroup_version="1", cgroup_controllers=("freezer",))
    with JobCage(unique("mem"), memory_limit="64M", config=config) as cage:
        assert set(cage.cgroup_paths) >= {"freezer", "memory"}
        limit = read_file(os.path.join(cage.cgroup_paths["memory"], "memory.limit_in_bytes"))
        assert int(limit) == 64 << 20

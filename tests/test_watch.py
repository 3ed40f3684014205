"""The proc-connector watcher against the real kernel: real forks, execs, exits, escapes.

The proc connector is node-wide and other test runs fork on this machine at the same
time: every assertion is about our own cages' or our own processes' pids, never about
the machine being quiet. Waits are on the kernel: a pid's exit (pidfd), an event the
watcher has applied (bounded polls of its table), a line a job prints.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator

import pytest

from jobcage import Config, JobCage
from jobcage.errors import ConfigError, NotRootError
from jobcage.watch import Policy, Watcher, WatchSettings
from jobcage.watch.detect import record
from jobcage.watch.table import Proc, ProcessTable, Tree

from .cli_support import wait_exit
from .conftest import unique

NOBODY = 65534


def wait_for(predicate, timeout: float = 10.0):
    """Until the watcher has applied the event ``predicate`` looks for (bounded)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.01)


def job(code: str) -> list[str]:
    return ["/usr/bin/python3", "-c", textwrap.dedent(code)]  # the venv is not for nobody


# -- pure logic -------------------------------------------------------------------------


def test_table_fork_exit_and_orphans_without_kernel():
    table = ProcessTable()
    tree = table.add_tree(Tree("j1", cgroup_dirs={"freezer": "/x"}))
    table.add(tree, Proc(10, 1, 1000))
    assert table.fork(10, Proc(11, 10, None)) is tree
    assert table.fork(11, Proc(12, 11, None)) is tree
    assert table.fork(99, Proc(13, 99, None)) is None  # not watched
    assert tree.processes_started == 3 and tree.max_processes == 3
    assert table.get(12).uid == 1000  # inherited from the parent
    gone, orphans = table.exit(11)
    assert gone.pid == 11 and [p.pid for p in orphans] == [12]
    assert table.fork(10, Proc(12, 10, None)) is tree  # already known: not counted twice
    assert tree.processes_started == 3


def test_policy_and_settings_reject_bad_values_by_name():
    with pytest.raises(ConfigError, match="watch_escape_action = 'shoot'"):
        Policy(escape="shoot")
    with pytest.raises(ConfigError, match="watch_fork_rate"):
        WatchSettings.from_config(Config(watch_fork_rate=-1.0))
    with pytest.raises(ConfigError, match="watch_sweep_seconds"):
        WatchSettings.from_config(Config(watch_sweep_seconds=0.0))
    with pytest.raises(ConfigError, match=re.escape("watch_metrics_address = '0.0.0.0'")):
        WatchSettings.from_config(Config(watch_metrics_address="0.0.0.0"))
    with pytest.raises(ConfigError, match="watch_buffer_size"):
        WatchSettings.from_config(Config(watch_buffer_size="12Q"))
    settings = WatchSettings.from_config(Config(watch_metrics_address="127.0.0.1:0"))
    assert settings.metrics_address == ("127.0.0.1", 0)
    tree = Tree("j", cgroup_dirs={})
    assert Policy().action("daemonize", tree, Proc(5, 1, 1000)) == "kill"  # police
    assert Policy().action("daemonize", tree, Proc(5, 1, 0)) == "log"  # root: only logged
    rec = record("escape", tree, Proc(5, 1, 0, exe="/bin/sh"), "kill", True)
    assert {"job_id", "pid", "ppid", "uid", "exe"} <= rec.keys()


def test_config_file_rejects_a_bad_action(tmp_path):
    from jobcage.config import load_config

    path = tmp_path / "jobcage.toml"
    path.write_text('watch_daemonize_action = "nuke"\n')
    with pytest.raises(ConfigError, match="watch_daemonize_action = 'nuke'"):
        load_config(str(path), environ={})


# -- the real kernel --------------------------------------------------------------------


@pytest.mark.root
def test_without_root_is_one_clear_error():
    code = (
        "import os\n"
        "from jobcage.watch import EventSource\n"  # imported as root: nobody cannot read it
        "os.setgid(65534); os.setuid(65534)\n"
        "try:\n    EventSource()\nexcept Exception as e:\n"
        "    print(type(e).__name__, e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.startswith(NotRootError.__name__), out
    assert "root" in out.stdout and out.stderr == ""


@pytest.mark.root
def test_bad_watch_config_builds_nothing(cage_config):
    with pytest.raises(ConfigError, match="explode"):  # refused by the config itself
        bad = cage_config.replace(watch_escape_action="explode")
        JobCage(unique("w"), config=bad, watch=True)


@pytest.mark.root
def test_n_forks_are_seen_as_n_and_no_watcher_means_none(cage_config):
    n = 200
    with JobCage(unique("w"), config=cage_config, watch=True) as cage:
        code = f"""
            import os
            for _ in range({n}):
                if os.fork() == 0:
                    os._exit(0)
            while True:
                try:
                    os.wait()
                except ChildProcessError:
                    break
        """
        assert cage.spawn(job(code), user=NOBODY).wait() == 0
    usage = cage.final_usage
    # A loaded machine may drop an event (the kernel's allocation failed): then the
    # record must say so; otherwise every fork is counted, exactly.
    assert usage.processes_started == n + 1 or usage.events_lost > 0, usage
    assert usage.processes_started <= n + 1
    assert usage.execs == 1
    assert usage.max_processes >= 2
    assert usage.detections == ()
    with JobCage(unique("w"), config=cage_config) as plain:
        plain.spawn(["/bin/true"]).wait()
    assert plain.final_usage.processes_started is None
    assert plain.final_usage.events_lost is None and plain.final_usage.detections is None


@pytest.mark.root
def test_a_process_a_sweep_found_before_its_fork_event_is_counted_once(cage_config):
    """Under load the watcher reads events late: a sweep finds the owner's child (and
    its child) in the cgroup before their fork events are read. They were counted then;
    the owner's claim after they exited counted the first again (3 for 2, seen in
    test_run_watch_puts_the_watcher_fields_in_the_record with CPU burners)."""
    job_id = unique("w")
    watcher = Watcher(sweep_seconds=3600)  # not started: the test says when to read
    try:
        with JobCage(job_id, config=cage_config) as cage:
            tree = watcher.watch_cage(job_id, cage.cgroup_paths, owner_pid=os.getpid())
            proc = cage.spawn(
                ["/bin/sh", "-c", "sleep 1000 & echo $!; read x; exit 0"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
            )
            sleeper = int(proc.stdout.readline())
            watcher.sweep()  # before any event is read: finds both in the cgroup
            assert set(tree.procs) == {proc.pid, sleeper}
            watcher.process_pending()
            os.kill(sleeper, signal.SIGKILL)
            proc.stdin.close()
            assert proc.wait(timeout=10) == 0 and wait_exit(sleeper)
            watcher.process_pending()
            watcher.claim(job_id, proc.pid)  # what spawn does once Popen returns
            assert tree.processes_started == 2, watcher.summary(tree)
    finally:
        watcher.stop()


@pytest.mark.root
def test_a_zombie_the_owner_claims_after_its_exit_was_read_is_not_counted_again(cage_config):
    """The owner claims its child after spawn; under load the child may have exited by
    then, its exit read, but not yet been reaped: /proc still has it (a zombie)."""
    job_id = unique("w")
    watcher = Watcher(sweep_seconds=3600)
    try:
        with JobCage(job_id, config=cage_config) as cage:
            tree = watcher.watch_cage(job_id, cage.cgroup_paths, owner_pid=os.getpid())
            proc = cage.spawn(["/bin/sh", "-c", "read x; exit 0"], stdin=subprocess.PIPE)
            watcher.sync(job_id)  # its fork and exec read, and the cgroup swept: counted
            proc.stdin.close()
            assert wait_exit(proc.pid)  # exited, not reaped: a zombie
            watcher.process_pending()
            assert proc.pid not in tree.procs
            watcher.claim(job_id, proc.pid)
            assert tree.processes_started == 1 and proc.pid not in tree.procs
            assert proc.wait() == 0
    finally:
        watcher.stop()


@contextlib.contextmanager
def _beside(cage: JobCage) -> Iterator[list[str]]:
    """A leaf cgroup beside the cage in each of its hierarchies, for a job to escape to.
    Not the cage's parent: on cgroup v2 that is an inner node with controllers enabled,
    which holds no process (the no-internal-processes rule refuses the move with
    EBUSY). Left for the test's parent cleanup (which kills what is inside) if a
    process is still in it."""
    dirs = [
        os.path.join(os.path.dirname(path), f"out-{os.path.basename(path)}")
        for path in cage.cgroup_paths.values()
    ]
    for d in dirs:
        os.mkdir(d)
    try:
        yield dirs
    finally:
        for d in dirs:
            with contextlib.suppress(OSError):
                os.rmdir(d)


def _escape_job(into: list[str], then: str) -> list[str]:
    targets = " ".join(os.path.join(d, "cgroup.procs") for d in into)
    return ["/bin/sh", "-c", f"for f in {targets}; do echo $$ > $f; done; echo out; {then}"]


@pytest.mark.root
@pytest.mark.parametrize("then", ["exec sleep 60", "read x"], ids=["exec", "quiet"])
def test_root_job_moving_out_of_its_cage_is_killed_and_recorded(cage_config, then):
    with JobCage(unique("w"), config=cage_config, watch=True) as cage, _beside(cage) as out:
        proc = cage.spawn(_escape_job(out, then), stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert proc.stdout.readline() == b"out\n"
        assert proc.pid not in cage.pids()  # really outside: the cage cannot kill it
        assert proc.wait(timeout=10) == -9  # the watcher did
        live = cage.usage()
    escapes = [d for d in cage.final_usage.detections if d["kind"] == "escape"]
    assert [d["pid"] for d in escapes] == [proc.pid]
    assert escapes[0]["killed"] is True and escapes[0]["action"] == "kill"
    assert escapes[0]["uid"] == 0 and escapes[0]["job_id"] == cage.job_id
    assert live.detections == cage.final_usage.detections


@pytest.mark.root
def test_setsid_daemon_is_reported(cage_config):
    code = """
        import os, sys, time
        r, w = os.pipe()
        child = os.fork()
        if child == 0:
            os.setsid()
            if os.fork() == 0:
                os.close(w)
                os.read(r, 1)  # the daemon: lives until the cage is killed
                os._exit(0)
            os._exit(0)
        os.waitpid(child, 0)
        print("detached", flush=True)
        os.read(r, 1)
    """
    with JobCage(unique("w"), config=cage_config, watch=True, pids_limit=64) as cage:
        proc = cage.spawn(job(code), user=NOBODY, stdout=subprocess.PIPE)
        assert proc.stdout.readline() == b"detached\n"
        found = wait_for(lambda: cage.usage().detections)
        assert len(cage.pids()) == 2  # the job and its daemon, both still caged
    [daemon] = [d for d in found if d["kind"] == "daemonize"]
    assert daemon["action"] == "log" and daemon["killed"] is False
    assert daemon["uid"] == NOBODY and daemon["ppid"] != proc.pid
    assert cage.final_usage.processes_started == 3


@pytest.mark.root
def test_overflow_is_reported_and_the_table_is_right_after_resync(cage_config):
    code = """
        import os
        r, w = os.pipe()
        for _ in range(100):  # these stay, to be found by the resync
            if os.fork() == 0:
                os.close(w)
                os.read(r, 1)
                os._exit(0)
        for _ in range(3000):  # these flood the watcher's tiny buffer
            pid = os.fork()
            if pid == 0:
                os._exit(0)
            os.waitpid(pid, 0)
        print("flooded", flush=True)
        os.read(r, 1)
    """
    job_id = unique("w")
    watcher = Watcher(buffer_bytes=4096, sweep_seconds=3600)  # no sweep: only the resync
    try:
        with JobCage(job_id, config=cage_config, pids_limit=512) as cage:
            tree = watcher.watch_cage(job_id, cage.cgroup_paths, owner_pid=os.getpid())
            proc = cage.spawn(job(code), stdout=subprocess.PIPE)
            assert proc.stdout.readline() == b"flooded\n"
            watcher.process_pending()  # not started: nothing read until now
            summary = watcher.summary(tree)
            assert watcher.source.overflows > 0 and watcher.resyncs > 0
            assert summary["events_lost"] > 0  # reported, never silent
            assert set(tree.procs) == cage.pids()  # 101 processes, as the cgroup says
            assert len(tree.procs) == 101
    finally:
        watcher.stop()


STORM = """
    import os
    print("storm", flush=True)
    for _ in range(3000):
        pid = os.fork()
        if pid == 0:
            os._exit(0)
        os.waitpid(pid, 0)
    print("done", flush=True)
"""


@pytest.mark.root
@pytest.mark.parametrize("action", ["log", "kill"])
def test_a_fork_storm_is_reported_with_its_rate_and_killed_when_asked(cage_config, action):
    """3000 forks one after another (each reaped: never near pids.max) against a
    threshold of 100 a second: reported once per one-second window, naming the forking
    process; with `kill`, that process dies at the first report and forks no more."""
    config = cage_config.replace(watch_fork_rate=100.0, watch_fork_rate_action=action)
    with JobCage(unique("w"), config=config, watch=True, pids_limit=64) as cage:
        proc = cage.spawn(job(STORM), user=NOBODY, stdout=subprocess.PIPE)
        status = proc.wait(timeout=120)
        out = proc.stdout.read()
    storms = [d for d in cage.final_usage.detections if d["kind"] == "fork_rate"]
    assert storms, cage.final_usage.detections
    for found in storms:
        assert found["pid"] == proc.pid and found["uid"] == NOBODY
        assert found["forks_in_last_second"] == 101  # reported as it crossed, once a window
        assert found["action"] == action and found["killed"] is (action == "kill")
    if action == "kill":
        assert status == -9 and out == b"storm\n" and len(storms) == 1
        assert cage.final_usage.processes_started < 3000
    else:
        assert status == 0 and out == b"storm\ndone\n"


STARTER = """#!/bin/sh
# A stand-in for a batch system's per-job daemon: runs as root, starts the job as nobody.
exec 3<&0
setpriv --reuid=65534 --regid=65534 --clear-groups "$@" <&3 &
echo "job $!"
read x
"""


@pytest.mark.root
@pytest.mark.parametrize("by", ["pid", "name"])
def test_police_mode_kills_a_job_process_daemonizing_out_of_the_starter(tmp_path, by):
    name = "jc_starter_" + unique("")[:3]
    starter = tmp_path / name
    starter.write_text(STARTER)
    starter.chmod(0o755)
    double_fork = """
        import os, sys, time
        if os.fork() == 0:
            os.setsid()
            daemon = os.fork()
            if daemon == 0:
                time.sleep(60)
                os._exit(0)
            print(daemon, flush=True)  # its parent says: it is killed once orphaned
            os._exit(0)
        os.wait()
        sys.stdin.read()
    """
    watcher = Watcher(police_names={name} if by == "name" else ()).start()
    proc = subprocess.Popen(
        [str(starter), *job(double_fork)], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    try:
        if by == "pid":
            assert watcher.watch_daemon(proc.pid) is not None
        job_pid = int(proc.stdout.readline().split()[1])
        if by == "name":
            assert wait_for(lambda: job_pid in watcher.table.owner)
        daemon = int(proc.stdout.readline())
        assert wait_exit(daemon), "the daemonized job process outlived its tree"
        with watcher.lock:  # the watcher kills, then records: under its lock
            [found] = [
                d for t in watcher.table.trees.values() for d in t.detections if d["pid"] == daemon
            ]
        assert found["kind"] == "daemonize" and found["killed"] is True
        assert found["uid"] == NOBODY and found["action"] == "kill"
        assert os.path.exists(f"/proc/{job_pid}")  # the job itself was not touched
    finally:
        proc.stdin.close()
        proc.wait(timeout=10)
        watcher.stop()


@pytest.mark.root
def test_police_mode_finds_a_daemon_whose_parent_exited_among_lost_events(tmp_path):
    """The exit that orphaned the daemon is lost (the watcher held off while a fork flood
    overran its socket): the resync after the loss finds the daemon outside its tree
    and kills it, and says it was found after a loss."""
    starter = tmp_path / "jc_starter"
    starter.write_text(STARTER)
    starter.chmod(0o755)
    code = """
        import os, signal, sys, time
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
        r, w = os.pipe()
        keeper = os.fork()
        if keeper == 0:
            os.close(w)
            os.setsid()
            daemon = os.fork()
            if daemon == 0:
                time.sleep(60)
                os._exit(0)
            print(os.getpid(), daemon, flush=True)
            os.read(r, 1)  # its parent until the flood is over
            os._exit(0)
        os.close(r)
        signal.sigwait({signal.SIGUSR1})
        for _ in range(3000):
            pid = os.fork()
            if pid == 0:
                os._exit(0)
            os.waitpid(pid, 0)
        os.close(w)
        os.waitpid(keeper, 0)
        print("flooded", flush=True)
        sys.stdin.read()
    """
    watcher = Watcher(buffer_bytes=4096).start()
    proc = subprocess.Popen(
        [str(starter), *job(code)], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    try:
        tree = watcher.watch_daemon(proc.pid)
        assert tree is not None
        job_pid = int(proc.stdout.readline().split()[1])
        keeper, daemon = map(int, proc.stdout.readline().split())
        assert wait_for(lambda: daemon in tree.procs and keeper in tree.procs)
        with watcher.lock:  # the watcher reads nothing now: the flood overruns it
            os.kill(job_pid, signal.SIGUSR1)
            assert proc.stdout.readline() == b"flooded\n"
            overflows = watcher.source.overflows
        assert wait_exit(daemon), "the daemon outlived its tree"
        with watcher.lock:  # the watcher kills, then records: under its lock
            [found] = [d for d in tree.detections if d["pid"] == daemon]
        assert watcher.source.overflows > overflows and watcher.resyncs > 0
        assert found["kind"] == "daemonize" and found["killed"] is True
        assert found["after_loss"] is True and found["uid"] == NOBODY
        assert os.path.exists(f"/proc/{job_pid}")  # the job itself was not touched
    finally:
        proc.stdin.close()
        proc.wait(timeout=10)
        watcher.stop()


@pytest.mark.root
def test_setuid_program_of_a_nobody_job_is_reported(cage_config):
    import shutil
    import tempfile

    where = tempfile.mkdtemp(prefix="jobcage-test-suid-")
    try:
        os.chmod(where, 0o755)  # nobody must reach it; pytest's own tmp dirs are 0700
        suid_sleep = os.path.join(where, "suid-sleep")
        shutil.copy("/bin/sleep", suid_sleep)
        os.chmod(suid_sleep, 0o4755)  # a setuid-root program, as a job may find one
        with JobCage(unique("w"), config=cage_config, watch=True) as cage:
            proc = cage.spawn([suid_sleep, "30"], user=NOBODY)
            found = wait_for(lambda: cage.usage().detections)
            proc.kill()
            proc.wait()
        [rec] = found
        assert rec["kind"] == "privilege" and rec["action"] == "log"
        assert rec["uid"] == 0 and rec["job_uid"] == NOBODY and rec["pid"] == proc.pid
        assert rec["exe"] == suid_sleep and rec["killed"] is False
    finally:
        shutil.rmtree(where)

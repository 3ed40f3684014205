"""The cgroup cage for real: v1 controllers here, v2 freeze/kill/cpu.stat on the unified
hierarchy. Every test runs under a test-only cgroup parent (conftest.cage_config)."""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import subprocess
import sys
import textwrap

import pytest

from jobcage import (
    CageExistsError,
    CageStateError,
    ConfigError,
    InvalidJobIdError,
    JobCage,
    NotRootError,
    SpawnError,
)
from jobcage.cage import State
from jobcage.cgroups import probe
from jobcage.cgroups.base import read_file

from .conftest import parent_dirs, unique

pytestmark = pytest.mark.root


def _wait_for_line(stream) -> str:
    """Block until the job prints a line: the job's own signal that it is ready."""
    line = stream.readline()
    assert line, "job exited before it was ready"
    return line.decode().strip()


def _proc_cgroups(pid: int) -> dict[str, str]:
    out = {}
    for line in read_file(f"/proc/{pid}/cgroup").splitlines():
        _, controllers, path = line.split(":", 2)
        for c in controllers.split(",") or [""]:
            out[c] = path
    return out


def _file(cage: JobCage, controller: str, name: str) -> str:
    """A controller file of the cage: its v1 directory, or the one v2 directory."""
    return os.path.join(cage.cgroup_paths.get(controller, cage.cgroup_paths.get("unified")), name)


def _frozen(cage: JobCage) -> bool:
    if "freezer" in cage.cgroup_paths:
        return read_file(_file(cage, "freezer", "freezer.state")).strip() == "FROZEN"
    return "frozen 1" in read_file(_file(cage, "unified", "cgroup.events"))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead for our purposes.
    return read_file(f"/proc/{pid}/stat").split(")")[-1].split()[0] != "Z"


def test_lifecycle_spawn_is_inside_every_cgroup_before_exec(cage_config):
    job = unique("life")
    with JobCage(job, memory_limit="128M", pids_limit=64, config=cage_config) as cage:
        assert cage.state is State.BUILT
        if cage.cgroup_paths.keys() != {"unified"}:  # v1; a pure v2 node has one dir
            assert set(cage.cgroup_paths) == {"freezer", "memory", "cpuacct", "blkio", "pids"}
        # The job reports its own cgroups as its very first action after exec.
        proc = cage.spawn(["cat", "/proc/self/cgroup"], stdout=subprocess.PIPE)
        out, _ = proc.communicate()
        for line in out.decode().splitlines():
            _, controllers, path = line.split(":", 2)
            if controllers in cage.cgroup_paths:
                assert path.endswith(f"/{job}"), line
        record = os.path.join(cage_config.state_dir, "cages", f"{job}.json")
        assert os.path.exists(record)
        paths = list(cage.cgroup_paths.values())
    assert cage.state is State.DESTROYED
    assert not any(os.path.exists(p) for p in paths)
    assert not os.path.exists(record)
    assert not any(os.path.exists(d) for d in parent_dirs(cage_config.cgroup_parent))
    usage = cage.final_usage
    assert usage.memory_limit_bytes == 128 << 20
    assert usage.wall_seconds > 0 and usage.processes_surviving == 0
    assert usage.net_lan_rx_bytes is None  # no network cage: unknown, not 0


def test_fork_storm_and_setsid_daemon_are_all_killed(cage_config):
    storm = textwrap.dedent("""
        import os, time
        # A double-forked, setsid() daemon that would escape a process-group kill.
        child = os.fork()
        if child == 0:
            os.setsid()
            if os.fork() == 0:
                print(os.getpid(), flush=True)
                time.sleep(3600)
            os._exit(0)
        # The daemon is forked before the storm can take every pid (under load the
        # storm reached pids.max first, the daemon's fork failed and nothing printed).
        os.waitpid(child, 0)
        # A fork storm up to the pids limit: every process forks again, forever.
        while True:
            try:
                os.fork()
            except OSError:
                pass
    """)
    with JobCage(unique("storm"), pids_limit=200, config=cage_config) as cage:
        proc = cage.spawn([sys.executable, "-c", storm], stdout=subprocess.PIPE)
        daemon = int(_wait_for_line(proc.stdout))
        assert os.getsid(daemon) != os.getsid(proc.pid)  # its own session
        # Let the storm reach its bound: wait on the pids controller's own counter.
        pids_current = _file(cage, "pids", "pids.current")
        while int(read_file(pids_current)) < 150:
            pass
        killed = cage.kill()
        assert killed >= 150
        assert cage.pids() == set()
        assert not _alive(daemon)
        assert proc.wait() == -9


def test_double_forked_setsid_daemon_is_killed(cage_config):
    script = "sh -c 'setsid sh -c \"sleep 3600 & echo \\$!\" ' "
    with JobCage(unique("daemon"), config=cage_config) as cage:
        proc = cage.spawn(["sh", "-c", script], stdout=subprocess.PIPE)
        daemon = int(_wait_for_line(proc.stdout))
        proc.wait()
        # The job's own process is gone; its daemon lives on, reparented, in the cage.
        assert _alive(daemon) and daemon in cage.pids()
        assert os.getsid(daemon) != proc.pid  # spawn() made the job a session leader
    assert not _alive(daemon)
    assert cage.final_usage.processes_killed == 1


def test_memory_hog_is_oom_killed_and_peak_is_near_the_limit(cage_config):
    limit = 64 << 20
    hog = "b = []\nwhile True: b.append(bytearray(1 << 20))"
    with JobCage(unique("hog"), memory_limit=limit, config=cage_config) as cage:
        proc = cage.spawn([sys.executable, "-c", hog])
        assert proc.wait() == -9  # the OOM killer's SIGKILL
        usage = cage.usage()
    assert usage.oom_kills >= 1
    assert 0.8 * limit <= usage.memory_peak_bytes <= limit
    assert cage.final_usage.oom_kills == usage.oom_kills


def test_cpu_burner_is_accounted_within_tolerance(cage_config):
    burner = textwrap.dedent("""
        import os, time
        end = time.process_time() + 0.6
        while time.process_time() < end:
            for _ in range(100_000):  # user time; process_time() itself is a syscall
                pass
        t = os.times()
        print(t.user + t.system)
    """)
    with JobCage(unique("cpu"), config=cage_config) as cage:
        proc = cage.spawn([sys.executable, "-c", burner], stdout=subprocess.PIPE)
        measured = float(proc.communicate()[0])
    usage = cage.final_usage
    accounted = usage.cpu_user_seconds + usage.cpu_system_seconds
    # The cgroup also counts the interpreter's start-up before os.times() began and
    # its exit; USER_HZ (10 ms) granularity of os.times() on top. Tolerance: 15% + 50 ms.
    assert measured >= 0.6
    assert abs(accounted - measured) <= 0.15 * measured + 0.05, (accounted, measured)
    assert usage.cpu_user_seconds > usage.cpu_system_seconds


def _device_sectors_written(path) -> tuple[str, int]:
    """Sectors the block device under ``path`` has written (/sys/dev/block/M:m/stat)."""
    st = os.stat(path)
    dev = f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}"
    stat = read_file(f"/sys/dev/block/{dev}/stat").split()
    return dev, int(stat[6])


def test_direct_io_is_accounted(cage_config, tmp_path):
    target = tmp_path / "direct.bin"
    dev, before = _device_sectors_written(tmp_path)
    with JobCage(unique("io"), config=cage_config) as cage:
        proc = cage.spawn(
            [
                "dd",
                "if=/dev/zero",
                f"of={target}",
                "bs=1M",
                "count=8",
                "oflag=direct",
                "status=none",
            ]
        )
        assert proc.wait() == 0
        proc = cage.spawn(
            ["dd", f"if={target}", "of=/dev/null", "bs=1M", "iflag=direct", "status=none"]
        )
        assert proc.wait() == 0
        usage = cage.usage()
    device_wrote = (_device_sectors_written(tmp_path)[1] - before) * 512
    if usage.io_write_bytes == 0 and usage.io_read_bytes == 0:
        assert device_wrote >= 8 << 20, "the device itself saw no writes: test is broken"
        pytest.skip(
            f"block device {dev} wrote {device_wrote} bytes of direct I/O but this kernel's "
            "cgroup v1 blkio counters (blkio.throttle.io_service_bytes) stayed 0: "
            "nothing to assert here (tools/vm-test checks io.stat on v2)"
        )
    assert usage.io_write_bytes >= 8 << 20
    assert usage.io_read_bytes >= 8 << 20


def test_storm_faster_than_a_naive_kill_loop_is_still_fully_killed(cage_config):
    """A naive loop (read pids, kill them, repeat) races with forks; freezing does not."""
    storm = (
        "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    )
    with JobCage(unique("race"), pids_limit=500, config=cage_config) as cage:
        cage.spawn([sys.executable, "-c", storm])
        pids_current = _file(cage, "pids", "pids.current")
        while int(read_file(pids_current)) < 400:
            pass
        # A few naive passes first (read pids, SIGKILL them): forks in between refill
        # the cage. How often that misses is measured by tools/bench, not asserted here.
        for _ in range(3):
            for pid in cage.pids():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, 9)
        cage.kill()
        assert cage.pids() == set()


def test_bad_job_id_creates_nothing(cage_config):
    for bad in ["../etc", "a/b", "with space", "x" * 200, ""]:
        with pytest.raises(InvalidJobIdError):
            JobCage(bad, config=cage_config)
    assert not os.path.exists(cage_config.state_dir)
    assert not any(os.path.exists(d) for d in parent_dirs(cage_config.cgroup_parent))


def test_duplicate_job_id_is_refused_and_first_cage_unharmed(cage_config):
    job = unique("dup")
    with JobCage(job, config=cage_config) as first:
        proc = first.spawn(["sleep", "3600"])
        with pytest.raises(CageExistsError) as err:
            JobCage(job, config=cage_config).create()
        assert "jobcage reap" in str(err.value)
        assert proc.pid in first.pids() and proc.poll() is None
    assert proc.wait() == -9


def test_failure_half_way_through_create_leaves_nothing(cage_config, monkeypatch):
    from jobcage.cgroups import v1, v2

    def broken(self, memory_limit, pids_limit):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(v1.V1Cgroup, "set_limits", broken)
    monkeypatch.setattr(v2.V2Cgroup, "set_limits", broken)
    cage = JobCage(unique("half"), memory_limit="64M", config=cage_config)
    with pytest.raises(OSError):
        cage.create()
    assert cage.state is State.DESTROYED
    assert not any(os.path.exists(d) for d in parent_dirs(cage_config.cgroup_parent))
    assert os.listdir(os.path.join(cage_config.state_dir, "cages")) == []


def test_exception_in_body_still_tears_down(cage_config):
    with pytest.raises(ZeroDivisionError), JobCage(unique("exc"), config=cage_config) as cage:
        proc = cage.spawn(["sleep", "3600"])
        1 / 0  # noqa: B018
    assert proc.wait() == -9
    assert cage.state is State.DESTROYED and cage.final_usage.processes_killed == 1


def test_state_machine_and_idempotent_destroy(cage_config):
    cage = JobCage(unique("sm"), config=cage_config)
    with pytest.raises(CageStateError):
        cage.spawn(["true"])
    cage.create()
    with pytest.raises(CageStateError):
        cage.create()
    first = cage.destroy()
    assert cage.destroy() is first
    with pytest.raises(CageStateError):
        cage.usage()


def test_not_root_is_refused_before_anything(cage_config, monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(NotRootError):
        JobCage(unique("nr"), config=cage_config).create()
    assert not os.path.exists(cage_config.state_dir)


def test_spawn_drops_privileges_and_reports_failures_in_the_parent(cage_config):
    with JobCage(unique("user"), config=cage_config) as cage:
        proc = cage.spawn(["id", "-u"], user="nobody", stdout=subprocess.PIPE)
        assert proc.communicate()[0].decode().strip() == str(65534)
        with pytest.raises(SpawnError, match="no such user"):
            cage.spawn(["true"], user="no-such-user-xyz")
        with pytest.raises(SpawnError, match="no such file"):
            cage.spawn(["/nonexistent/binary"])
        with pytest.raises(SpawnError, match="permission denied"):
            cage.spawn(["/etc/shadow"], user="nobody")
        assert cage.pids() == set()


def test_attach_moves_an_existing_process_and_its_children(cage_config):
    outside = subprocess.Popen(
        ["sh", "-c", "read x; sleep 3600 & wait"], stdin=subprocess.PIPE, start_new_session=True
    )
    try:
        with JobCage(unique("att"), config=cage_config) as cage:
            cage.attach(outside.pid)
            outside.stdin.write(b"go\n")
            outside.stdin.flush()
            # The child forked after attach() is in the cage too.
            while len(cage.pids()) < 2:
                pass
            assert outside.pid in cage.pids()
            own = _proc_cgroups(outside.pid)
            assert own.get("freezer", own.get("")).endswith(cage.job_id)
        assert outside.wait() == -9
    finally:
        if outside.poll() is None:
            outside.kill()
            outside.wait()


def test_freeze_and_thaw_are_real(cage_config):
    with JobCage(unique("frz"), config=cage_config) as cage:
        proc = cage.spawn(["sleep", "3600"])
        cage.freeze()
        assert _frozen(cage) is True
        cage.thaw()
        assert _frozen(cage) is False
    assert proc.wait() == -9


def _create_spawn_destroy(config, job: str) -> int:
    with JobCage(job, config=config) as cage:
        rc = cage.spawn(["true"]).wait()
    assert cage.final_usage is not None
    return rc


def test_fifty_cages_at_once_from_threads(cage_config):
    with concurrent.futures.ThreadPoolExecutor(max_workers=50) as pool:
        jobs = [
            pool.submit(_create_spawn_destroy, cage_config, unique(f"th{i}-")) for i in range(50)
        ]
        assert [j.result() for j in jobs] == [0] * 50


@pytest.mark.slow  # 111 s under software emulation in tools/vm-test
def test_fifty_cages_at_once_from_processes(cage_config):
    script = textwrap.dedent(f"""
        import sys
        from jobcage import Config, JobCage
        config = Config(state_dir={cage_config.state_dir!r},
                        cgroup_parent={cage_config.cgroup_parent!r})
        with JobCage(sys.argv[1], config=config) as cage:
            sys.exit(cage.spawn(["true"]).wait())
    """)
    procs = [
        subprocess.Popen([sys.executable, "-c", script, unique(f"pr{i}-")]) for i in range(50)
    ]
    assert [p.wait() for p in procs] == [0] * 50


# -- the v2 backend, for real on the unified hierarchy (freeze, kill, cpu.stat) ----------


@pytest.mark.root
def test_v1_cpu_time_is_cpuacct_usage_not_its_ticks(cage_config):
    """On v1 the record's user + system CPU is cpuacct.usage (precise), not the sum of
    usage_user and usage_sys, which are tick-sampled: under a small quota that sum
    ran past the quota (test_cpu_limit_throttles... failed with it, on a loaded
    machine). Fails before the fix unless the ticks happen to match to the ns."""
    burn = "import time\nend = time.process_time() + 0.05\nwhile time.process_time() < end: pass\n"
    with JobCage(unique("ticks"), cpu_limit=0.1, config=cage_config) as cage:
        acct = cage.cgroup_paths.get("cpuacct")
        if acct is None:
            pytest.skip("no v1 cpuacct controller here: v2's cpu.stat is precise already")
        assert cage.spawn([sys.executable, "-c", burn]).wait() == 0
        usage = cage.usage()
        precise = int(read_file(os.path.join(acct, "cpuacct.usage")))
    assert precise > 50_000_000
    used_ns = round((usage.cpu_user_seconds + usage.cpu_system_seconds) * 1e9)
    assert abs(used_ns - precise) <= 2, (used_ns, precise)


@pytest.mark.cgroup_v2
def test_v2_freeze_kill_and_cpu_stat(cage_config_v2):
    burn = "import time\nend = time.process_time() + 0.2\nwhile time.process_time() < end: pass\n"
    with JobCage(unique("v2"), config=cage_config_v2) as cage:
        path = cage.cgroup_paths["unified"]
        assert cage.spawn([sys.executable, "-c", burn]).wait() == 0
        sleeper = cage.spawn(["sleep", "3600"])
        cage.freeze()
        assert "frozen 1" in read_file(os.path.join(path, "cgroup.events"))
        cage.thaw()
        assert "frozen 0" in read_file(os.path.join(path, "cgroup.events"))
        usage = cage.usage()
        assert usage.cpu_user_seconds + usage.cpu_system_seconds >= 0.2
        assert cage.kill() == 1
        assert "populated 0" in read_file(os.path.join(path, "cgroup.events"))
        assert sleeper.wait() == -9
    assert not os.path.exists(path)
    # This hybrid unified hierarchy has no memory or io controller: unknown, not 0.
    if "memory" not in read_file(os.path.join(probe().v2_mount, "cgroup.controllers")).split():
        assert cage.final_usage.memory_peak_bytes is None
        assert cage.final_usage.io_read_bytes is None


@pytest.mark.root
@pytest.mark.parametrize("cpus", [0.1, "0.05"])
def test_cpu_limit_throttles_the_job_and_the_record_says_so(cage_config, cpus):
    """Two busy processes (wanting two CPUs) under a limit of ``cpus``: the kernel
    throttles them, CPU time stays near the quota, and the record carries the limit
    and the throttling. Each spins for CPU time, not wall time, so a loaded machine
    only makes the test longer, and the limits are small enough that a busy shared
    machine still gives the job more than its quota in a period."""
    burner = textwrap.dedent("""
        import os, time
        pid = os.fork()
        end = time.process_time() + 0.04
        while time.process_time() < end:
            pass
        if pid:
            os.waitpid(pid, 0)
    """)
    with JobCage(unique("cpu"), cpu_limit=cpus, config=cage_config) as cage:
        cage.spawn([sys.executable, "-c", burner]).wait()
    usage = cage.final_usage
    assert usage.cpu_limit_cpus == float(cpus)
    assert usage.cpu_periods >= 3 and usage.cpu_throttled_periods >= 1
    assert usage.cpu_throttled_seconds > 0
    # 0.6 s of wall at most `cpus` CPUs, plus the interpreter's start and a period.
    used = usage.cpu_user_seconds + usage.cpu_system_seconds
    assert used <= float(cpus) * (usage.wall_seconds + 0.1) + 0.05, (used, usage)


@pytest.mark.parametrize("bad", [0, -1, "lots", True, float("inf")])
def test_bad_cpu_limit_is_one_clear_error_and_nothing_built(cage_config, bad):
    with pytest.raises(ConfigError, match="cpu_limit"):
        JobCage(unique("cpu"), cpu_limit=bad, config=cage_config)


NESTED_CALLER = textwrap.dedent("""
    import json, os, sys
    from jobcage import Config, JobCage
    procs, parent, state = json.loads(sys.argv[1])
    for path in procs:  # become the batch system's limited job
        with open(path, "w") as f:
            f.write(str(os.getpid()))
    touch = "b = bytearray(160 << 20); b[::4096] = b'x' * len(b[::4096])"
    config = Config(cgroup_parent=parent, state_dir=state)
    with JobCage("nested", memory_limit="1G", config=config) as cage:
        code = cage.spawn([sys.executable, "-c", touch]).wait()
        paths = cage.cgroup_paths
    print(json.dumps({"code": code, "paths": paths, "usage": cage.final_usage.to_dict()}))
""")


def test_a_cage_never_leaves_a_limited_callers_cgroup(cage_config, tmp_path):
    """The caller sits in a cgroup limited to 64 MiB (as Slurm's task/cgroup or
    HTCondor put a job); cgroup_parent is set elsewhere and the cage asks for 1 GiB:
    the cage is made under the caller, and touching 160 MiB is OOM-killed."""
    h = probe()
    name = f"{cage_config.cgroup_parent}-batch"
    if h.default_version == 2:
        assert h.v2_mount is not None
        dirs = [os.path.join(h.v2_mount, name.lstrip("/"))]
        limit_file = "memory.max"
    else:
        # Not cpuset: a new one has no CPUs to run on until given some.
        mounts = [m for c, m in h.v1_mounts.items() if c != "cpuset"]
        dirs = [os.path.join(m, name.lstrip("/")) for m in mounts]
        limit_file = "memory.limit_in_bytes"
    for d in dirs:
        os.mkdir(d)
    try:
        memory_dir = next(d for d in dirs if h.default_version == 2 or "/memory/" in d)
        with open(os.path.join(memory_dir, limit_file), "w") as f:
            f.write(str(64 << 20))
        procs = [os.path.join(d, "cgroup.procs") for d in dirs]
        arg = json.dumps([procs, cage_config.cgroup_parent, cage_config.state_dir])
        out = subprocess.run(
            [sys.executable, "-c", NESTED_CALLER, arg],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout
    finally:
        for d in dirs:
            for sub in sorted((p for p, _, _ in os.walk(d)), reverse=True):
                os.rmdir(sub)
    result = json.loads(out)
    assert result["code"] == -9, result
    assert result["usage"]["oom_kills"] >= 1
    for path in result["paths"].values():
        if h.default_version == 2 or "/memory/" in path:
            assert f"{name}/" in path and path.endswith("/jobcage/nested"), path

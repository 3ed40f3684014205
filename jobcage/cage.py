"""JobCage: one job's cage, from create() to destroy().

Lifecycle, an explicit state machine::

    NEW --create()--> BUILT --destroy()--> DESTROYED
     |                                        ^
     +------------- destroy() ----------------+

Re-entering a state is an error; ``destroy()`` is idempotent and ``__exit__`` always
calls it. Order of teardown: kill every process (freeze, SIGKILL, thaw, wait until
empty), read the final usage, remove the network side (which reads its counters
first), remove the cgroups depth-first, then the record.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import ipaddress
import os
import subprocess
import time
from collections.abc import Mapping, Sequence
from typing import IO, TYPE_CHECKING, Any

from .cgroups import CageCgroup, CgroupBackend, open_backend
from .config import Config, check_value, load_config
from .errors import (
    CageStateError,
    ConfigError,
    JobCageError,
    NotRootError,
    TeardownError,
)
from .ids import validate_job_id
from .records import CageRecord, CgroupPart, RecordState, StateStore
from .records.model import network_part
from .spawn import spawn as _spawn
from .usage import Usage

if TYPE_CHECKING:
    from .network import NetworkCage
    from .watch import Watcher, WatchSettings

_File = int | IO[Any] | None


class State(enum.Enum):
    NEW = "new"
    BUILT = "built"
    DESTROYED = "destroyed"


class JobCage:
    """Contains one batch job and accounts for what it used (docs/cage.md).

    Every argument is checked like the config key of the same name, before anything
    is built: a bad one is a ConfigError naming it.
    """

    def __init__(
        self,
        job_id: str,
        *,
        memory_limit: str | int | None = None,
        pids_limit: int | None = None,
        cpu_limit: float | None = None,
        network: bool = False,
        campus_networks: Sequence[str | ipaddress.IPv4Network] | None = None,
        config: Config | None = None,
        watch: bool = False,
    ) -> None:
        self.job_id = validate_job_id(job_id)
        if config is not None and not isinstance(config, Config):
            raise ConfigError(
                f"JobCage argument: config = {type(config).__name__} is not valid; expected "
                "a jobcage.Config (or None: load_config())"
            )
        if not isinstance(network, bool):
            raise ConfigError(
                f"JobCage argument: network = {network!r} is not valid; expected True or False"
            )
        base = config if config is not None else load_config()
        arguments = {
            "memory_limit": memory_limit,
            "pids_limit": pids_limit,
            "cpu_limit": cpu_limit,
            "campus_networks": campus_networks,
        }
        changes = {
            key: check_value(key, value, "JobCage argument")
            for key, value in arguments.items()
            if value is not None
        }
        # The arguments win over the config's keys; checks across keys see them too.
        self.config = base.replace(**changes) if changes else base
        self.memory_limit = self.config.memory_limit
        self.pids_limit = self.config.pids_limit
        self.cpu_limit = self.config.cpu_limit
        self.network = network
        self.campus_networks = self.config.campus_networks
        # Checked now: a bad watch_* value is an error before anything is built. The
        # import waits until a watcher is asked for: `jobcage run` starts without it.
        self._watch_settings: WatchSettings | None = None
        if watch:
            from .watch import WatchSettings

            self._watch_settings = WatchSettings.from_config(self.config)
        self._watcher: Watcher | None = None
        self._watch_summary: dict[str, Any] | None = None
        self.final_usage: Usage | None = None
        self._state = State.NEW
        self._store = StateStore(self.config.state_dir)
        self._backend: CgroupBackend | None = None
        self._cgroup: CageCgroup | None = None
        self._net: NetworkCage | None = None
        self._record: CageRecord | None = None
        self._started: float | None = None
        self._ended: float | None = None
        self._killed = 0
        self._surviving = 0

    # -- what was built --------------------------------------------------------------

    @property
    def state(self) -> State:
        return self._state

    @property
    def netns_name(self) -> str | None:
        return self._net.netns_name if self._net else None

    @property
    def address(self) -> ipaddress.IPv4Interface | None:
        return self._net.address if self._net else None

    @property
    def cgroup_paths(self) -> dict[str, str]:
        return dict(self._cgroup.paths) if self._cgroup else {}

    def __repr__(self) -> str:
        return f"<JobCage {self.job_id!r} {self._state.value}>"

    # -- lifecycle -------------------------------------------------------------------

    def __enter__(self) -> JobCage:
        self.create()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            self.destroy()
        except JobCageError as teardown:
            if exc is None:
                raise
            # The body's exception wins; the teardown failure rides along with it.
            exc.add_note(f"and tearing down the cage failed too: {teardown}")

    def create(self) -> JobCage:
        """Build the cage; on any failure remove what was built and re-raise."""
        if self._state is not State.NEW:
            raise CageStateError(
                f"cage {self.job_id} is {self._state.value}; create() runs once, on a new JobCage"
            )
        if os.geteuid() != 0:
            raise NotRootError(
                "JobCage must run as root to create cgroups and namespaces "
                "(run it from the batch system's root-owned starter)"
            )
        backend = open_backend(self.config)
        record = self._store.new_record(
            self.job_id,
            cgroup=CgroupPart(backend.version, backend.paths_for(self.job_id)),
            memory_limit_bytes=self.memory_limit,
            pids_limit=self.pids_limit,
            cpu_limit=self.cpu_limit,
            cgroup_parent=self.config.cgroup_parent,
        )
        self._store.claim(record)
        self._record = record
        self._backend = backend
        try:
            self._cgroup = backend.create(
                self.job_id,
                memory_limit=self.memory_limit,
                pids_limit=self.pids_limit,
                cpu_limit=self.cpu_limit,
            )
            record = record.replace(cgroup=CgroupPart(backend.version, self._cgroup.paths))
            if self.network:
                self._store.save(record)
                from .network import NetworkCage

                self._net = NetworkCage.create(self.job_id, self.config)
                record = record.replace(network=network_part(self._net.to_record(), self.job_id))
            if self._watch_settings is not None:
                from .watch import acquire

                # Before any job process exists: its first fork is seen.
                self._watcher = acquire(self._watch_settings)
                self._watcher.watch_cage(self.job_id, self._cgroup.paths, owner_pid=os.getpid())
            record = record.replace(state=RecordState.BUILT)
            self._store.save(record)
            self._record = record
        except BaseException:
            self._rollback()
            raise
        self._started = time.monotonic()
        self._state = State.BUILT
        return self

    def _rollback(self) -> None:
        errors: list[BaseException] = []
        if self._watcher is not None:
            _collect(errors, self._stop_watching)
        if self._net is not None:
            _collect(errors, self._net.destroy)
        if self._cgroup is not None:
            _collect(errors, self._cgroup.remove)
        if self._backend is not None:
            _collect(errors, self._backend.remove_parent_if_empty)
        if not errors:
            self._store.remove(self.job_id)
        self._net = self._cgroup = None
        self._state = State.DESTROYED

    def _require_built(self, what: str) -> CageCgroup:
        if self._state is not State.BUILT or self._cgroup is None:
            raise CageStateError(f"cannot {what}: cage {self.job_id} is {self._state.value}")
        return self._cgroup

    # -- processes -------------------------------------------------------------------

    def spawn(
        self,
        argv: Sequence[str],
        *,
        user: str | int | None = None,
        cwd: str | None = None,
        env: Mapping[str, str] | None = None,
        stdin: _File = None,
        stdout: _File = None,
        stderr: _File = None,
        **popen_options: Any,
    ) -> subprocess.Popen:
        """Start ``argv`` inside every cgroup and the netns before it execs.

        Popen's everyday options (``text``, ``encoding``, ``errors``, ``pass_fds``,
        ``bufsize``, ``start_new_session``…) pass through; those that would break the
        cage (``preexec_fn``, ``group``, ``extra_groups``: use ``user=``) are a
        SpawnError. The job leads its own session unless told otherwise.
        """
        cgroup = self._require_built("spawn")
        proc = _spawn(
            argv,
            join_files=cgroup.join_files(),
            netns_path=self._net.netns_path if self._net else None,
            resolv_conf=self._net.resolv_conf_path if self._net else None,
            user=user,
            cwd=cwd,
            env=env,
            stdin=stdin,
            stdout=stdout,
            stderr=stderr,
            **popen_options,
        )
        if self._watcher is not None:
            self._watcher.claim(self.job_id, proc.pid)
        return proc

    def attach(self, pid: int) -> None:
        """Move a running process, and so its future children, into the cgroups.

        A process cannot be moved into another network namespace from outside, so a
        networked cage refuses: its jobs must be started with spawn().
        """
        cgroup = self._require_built("attach")
        if self._net is not None:
            raise CageStateError(
                "attach() cannot move a process into the cage's network namespace; start "
                "networked jobs with spawn() (or `jobcage run`)"
            )
        try:
            cgroup.add_pid(pid)
        except ProcessLookupError:  # ESRCH from cgroup.procs
            raise JobCageError(f"cannot attach pid {pid}: no such process") from None
        if self._watcher is not None:
            self._watcher.sync(self.job_id)  # its future forks are counted from here

    def pids(self) -> set[int]:
        return self._require_built("list pids").pids()

    def freeze(self) -> None:
        cgroup = self._require_built("freeze")
        if not cgroup.freeze():
            cgroup.thaw()
            raise JobCageError(
                f"cage {self.job_id} did not freeze in time: a process is in "
                "uninterruptible sleep (D state, often a hung NFS mount); it was thawed"
            )

    def thaw(self) -> None:
        self._require_built("thaw").thaw()

    def kill(self) -> int:
        """Freeze, SIGKILL every process, thaw, wait until empty; the cage stays."""
        result = self._require_built("kill").kill_all()
        self._killed += result.killed
        self._surviving = result.surviving
        return result.killed

    # -- accounting ------------------------------------------------------------------

    def usage(self) -> Usage:
        """Live usage, read from the kernel's counters now."""
        cgroup = self._require_built("read usage")
        return self._usage(cgroup, self._net.counters() if self._net else None)

    def _usage(self, cgroup: CageCgroup, net: Any) -> Usage:
        stats = cgroup.stats()
        end = self._ended if self._ended is not None else time.monotonic()
        fields: dict[str, Any] = dataclasses.asdict(stats)
        if net is not None:
            fields.update(dataclasses.asdict(net))
        if self._watch_summary is not None:
            fields.update(self._watch_summary)
        elif self._watcher is not None:
            fields.update(self._watcher.live_summary(self.job_id) or {})
        return Usage(
            wall_seconds=round(end - self._started, 6) if self._started else None,
            processes_killed=self._killed,
            processes_surviving=self._surviving,
            **fields,
        )

    # -- teardown --------------------------------------------------------------------

    def destroy(self) -> Usage | None:
        """Kill, account, remove everything; idempotent. Returns the final usage.

        Every step runs even if an earlier one failed; failures are raised together as
        one TeardownError at the end. If processes survive every bounded kill pass, the
        cgroups and record are kept so that `jobcage reap` can finish later.
        """
        if self._state is State.DESTROYED:
            return self.final_usage
        if self._state is State.NEW:
            self._state = State.DESTROYED
            return None
        cgroup = self._cgroup
        assert cgroup is not None
        errors: list[BaseException] = []
        _collect(errors, self.kill)
        self._ended = time.monotonic()
        if self._watcher is not None:
            _collect(errors, self._stop_watching)
        stats_usage = _collect(errors, self._usage, cgroup, None)
        net_counters = None
        if self._net is not None and self._surviving:
            # A process that survived every kill (D state) keeps the netns alive, and so
            # its veth and address: the network side stays whole (rules, address lease)
            # until `jobcage reap` finds the processes gone. Counted up to now.
            net_counters = _collect(errors, self._net.counters)
        elif self._net is not None:
            # Said before anything goes: a reaper finding the owner dead from here on
            # knows the rules (and their counters) may already be gone.
            self._save_state(RecordState.TEARING_DOWN)
            try:
                net_counters = self._net.destroy()
            except TeardownError as e:
                # Counters are read before anything is removed: keep them for the bill.
                errors.append(e)
                net_counters = getattr(e, "final_counters", None)
            except Exception as e:
                errors.append(e)
        if stats_usage is not None:
            net_fields = dataclasses.asdict(net_counters) if net_counters is not None else {}
            self.final_usage = dataclasses.replace(stats_usage, **net_fields)
        if self._surviving == 0:
            _collect(errors, cgroup.remove)
            assert self._backend is not None
            _collect(errors, self._backend.remove_parent_if_empty)
        if not errors and self._surviving == 0:
            self._store.remove(self.job_id)
        elif self._record is not None:
            record = self._record.replace(
                state=RecordState.TEARDOWN_FAILED, final_usage=self.final_usage
            )
            _collect(errors, self._store.save, record)
        self._state = State.DESTROYED
        if self._surviving:
            errors.append(
                JobCageError(
                    f"{self._surviving} process(es) of job {self.job_id} survived SIGKILL "
                    "(uninterruptible sleep); the cgroup (and the network namespace and "
                    "address) are kept and `jobcage reap` will remove them once they are gone"
                )
            )
        if errors:
            raise TeardownError(f"tearing down cage {self.job_id} failed", errors)
        return self.final_usage

    def _save_state(self, state: RecordState) -> None:
        if self._record is None:
            return
        self._record = self._record.replace(state=state)
        # Only a hint for reap: teardown goes on even where the state dir is full.
        with contextlib.suppress(JobCageError):
            self._store.save(self._record)

    def _stop_watching(self) -> None:
        """The watcher's final figures for this cage, every queued event applied."""
        from .watch import release

        watcher, self._watcher = self._watcher, None
        if watcher is None:
            return
        try:
            self._watch_summary = watcher.unwatch(self.job_id, owner_pid=os.getpid())
        finally:
            release(watcher)


def _collect(errors: list[BaseException], fn, *args):
    try:
        return fn(*args)
    except Exception as e:
        errors.append(e)
        return None

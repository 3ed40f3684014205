"""`jobcage watch`: the node daemon. Foreground, one JSON line per event or detection.

It watches every cage the node's state dir lists (found again every second: a cage
appears when `jobcage run` builds it and goes when its record goes, with a ``summary``
line of its watcher figures), polices the trees of the batch system's per-job daemons
given by pid or executable name, and serves Prometheus metrics when configured.
Signals: SIGTERM/SIGINT end it cleanly (unsubscribed, metrics server closed, the log
flushed); SIGHUP reloads the config (policy, sweep, police names) and reopens the log
file, so logrotate can move it.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable
from typing import IO, Any

from ..admin import trusted_cgroup_paths
from ..config import Config
from ..errors import ConfigError, JobCageError
from ..records import RecordState, StateStore
from . import procfs
from .settings import WatchSettings
from .watcher import Watcher, json_lines

DISCOVER_SECONDS = 1.0


class NodeDaemon:
    def __init__(
        self,
        load: Callable[[], Config],
        *,
        police_pids: Iterable[int] = (),
        stdout: IO[str] | None = None,
    ) -> None:
        """``load`` builds the config; it is called again on SIGHUP."""
        self._load = load
        self.config = load()
        self.settings = WatchSettings.from_config(self.config)
        self._stdout = stdout or sys.stdout
        self._write_lock = threading.Lock()
        self._log: IO[str] | None = None
        self._open_log()
        self.watcher: Watcher = self.settings.watcher(sink=self._write, emit_events=True)
        self._cages: dict[str, int | None] = {}  # job id -> owner pid
        self._server: Any = None
        self._stop = False
        self._reload = False
        try:
            for pid in police_pids:
                if self.watcher.watch_daemon(pid) is None:
                    raise ConfigError(f"--police-pid {pid}: no such process")
            self._police_by_name()
            if self.settings.metrics_address is not None:
                from .metrics import registry_for, serve

                registry = registry_for(self.config, self.watcher)
                self._server = serve(self.settings.metrics_address, registry)
        except BaseException:
            self.close()
            raise

    @property
    def metrics_port(self) -> int | None:
        return self._server.server_port if self._server is not None else None

    # -- output --------------------------------------------------------------------------

    def _open_log(self) -> None:
        path = self.settings.log_path
        old, self._log = self._log, None
        if old is not None:
            old.close()
        if path is not None:
            try:
                self._log = open(path, "a", buffering=1)  # noqa: SIM115 (kept open)
            except OSError as e:
                raise ConfigError(f"watch_log = {path!r}: cannot open it: {e.strerror}") from e
        self._sink = json_lines(self._log or self._stdout)

    def _write(self, rec: dict[str, Any]) -> None:
        with self._write_lock:  # the watcher's thread and this one both write
            self._sink(rec)

    # -- what is watched -------------------------------------------------------------------

    def _police_by_name(self) -> None:
        names = set(self.settings.police_names)
        if not names:
            return
        watched = {t.root_pid for t in self.watcher.table.trees.values()}
        for pid in procfs.all_pids():
            if pid not in watched and procfs.comm(pid) in names:
                self.watcher.watch_daemon(pid)

    def discover(self) -> None:
        """Follow new cages of the state dir; say goodbye to those whose record went."""
        records = {r.job_id: r for r in StateStore(self.config.state_dir).records()}
        for job_id, record in records.items():
            if job_id in self._cages or record.state is not RecordState.BUILT:
                continue
            try:  # only the directories JobCage itself makes for this job id
                trusted = trusted_cgroup_paths(record, self.config)
            except JobCageError:
                continue
            paths = {k: p for k, p in trusted.items() if os.path.isdir(p)}
            if not paths:
                continue
            owner = record.owner.pid
            self.watcher.watch_cage(job_id, paths, owner_pid=owner)
            self._cages[job_id] = owner
            self._write({"type": "watch", "job_id": job_id, "time": round(time.time(), 6)})
        for job_id in [j for j in self._cages if j not in records]:
            owner = self._cages.pop(job_id)
            summary = self.watcher.unwatch(job_id, owner_pid=owner)
            if summary is not None:
                summary["detections"] = len(summary["detections"])
                self._write({"type": "summary", "job_id": job_id, **summary})

    def reload(self) -> None:
        """SIGHUP: a new config; a bad one is reported and the old one kept."""
        try:
            config = self._load()
            settings = WatchSettings.from_config(config)
        except ConfigError as e:
            self._write({"type": "error", "reload": "refused", "error": str(e)})
            return
        with self.watcher.lock:
            self.config, self.settings = config, settings
            self.watcher.policy = settings.policy
            self.watcher.sweep_seconds = settings.sweep_seconds
            self.watcher.police_names = frozenset(settings.police_names)
        self._open_log()
        self._police_by_name()
        self._write({"type": "reload", "time": round(time.time(), 6)})

    # -- the loop ----------------------------------------------------------------------------

    def run(self) -> int:
        wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        old_fd = signal.set_wakeup_fd(wake_w)
        handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
        signal.signal(signal.SIGTERM, self._on_stop)
        signal.signal(signal.SIGINT, self._on_stop)
        signal.signal(signal.SIGHUP, self._on_hup)
        self.watcher.start()
        start: dict[str, Any] = {"type": "start", "pid": os.getpid()}
        if self._server is not None:
            host, port = self._server.server_address[:2]
            start["metrics"] = f"{host}:{port}"
        self._write({**start, "time": round(time.time(), 6)})
        try:
            while not self._stop:
                self.discover()
                select.select([wake_r], [], [], DISCOVER_SECONDS)
                with contextlib.suppress(BlockingIOError):
                    os.read(wake_r, 512)
                if self._reload:
                    self._reload = False
                    self.reload()
        finally:
            signal.set_wakeup_fd(old_fd)
            for sig, handler in handlers.items():
                signal.signal(sig, handler)
            os.close(wake_r)
            os.close(wake_w)
            self._write({"type": "stop", "time": round(time.time(), 6)})
            self.close()
        return 0

    def _on_stop(self, signum: int, frame: Any) -> None:
        self._stop = True

    def _on_hup(self, signum: int, frame: Any) -> None:
        self._reload = True

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if getattr(self, "watcher", None) is not None:
            self.watcher.stop()
        if self._log is not None:
            self._log.close()
            self._log = None

"""A real squid for the fetcher's tests, inside one of the simulated world's namespaces.

Everything it owns lives in a private directory: a generated config, the memory-only
cache (no cache_dir, so no ``squid -z``), the access and cache logs and the pid file.
It listens on one namespace address only, runs in the foreground (``-N``: one process,
whose pid we hold) and is ended by that pid.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import subprocess
import tempfile
from dataclasses import dataclass

from .networld import NetWorld, end_process, tcp_listening, wait_until

PORT = 3128
WAIT_SECONDS = 30.0

CONFIG = """\
http_port {address}:{port}
pid_filename {dir}/squid.pid
access_log stdio:{dir}/access.log squid
cache_log {dir}/cache.log
cache_store_log none
coredump_dir {dir}
netdb_filename none
logfile_rotate 0
cache_effective_user {user}
visible_hostname jobcage-test-squid
cache_mem 64 MB
maximum_object_size_in_memory 32 MB
maximum_object_size 32 MB
memory_cache_mode always
refresh_pattern . 60 20% 4320
shutdown_lifetime 0 seconds
pinger_enable off
icp_port 0
htcp_port 0
snmp_port 0
acl clients src {clients}
http_access allow clients
http_access deny all
"""


@dataclass
class Squid:
    world: NetWorld
    namespace: str
    address: str
    directory: str
    process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://{self.address}:{PORT}"

    def start(self, clients: tuple[str, ...]) -> Squid:
        user = "proxy" if _has_user("proxy") else "nobody"
        conf = os.path.join(self.directory, "squid.conf")
        with open(conf, "w") as f:
            f.write(
                CONFIG.format(
                    address=self.address,
                    port=PORT,
                    dir=self.directory,
                    user=user,
                    clients=" ".join(clients),
                )
            )
        entry = pwd.getpwnam(user)
        os.chown(self.directory, entry.pw_uid, entry.pw_gid)  # logs are written as `user`
        squid = shutil.which("squid") or "/usr/sbin/squid"
        netns = self.world.netns_path(self.namespace)
        # nsenter execs squid in place: the pid we hold is squid's own
        self.process = subprocess.Popen(
            ["nsenter", f"--net={netns}", "--", squid, "-N", "-f", conf],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            wait_until(self._listening, f"squid on {self.address}:{PORT}", WAIT_SECONDS)
        except BaseException:
            self.stop()
            raise
        return self

    def _listening(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise RuntimeError(f"squid exited at start: {self.process.stderr.read()}{self.log()}")
        return tcp_listening(self.process.pid, PORT)

    def stop(self) -> None:
        """SIGTERM by pid (shutdown_lifetime 0: it goes at once), then reap; idempotent."""
        proc, self.process = self.process, None
        if proc is None:
            return
        end_process(proc, WAIT_SECONDS)
        if proc.stderr:
            proc.stderr.close()

    def access_log(self) -> list[str]:
        """The access log's lines: squid writes them when it stops at the latest."""
        return self._read("access.log").splitlines()

    def log(self) -> str:
        return self._read("cache.log")

    def _read(self, name: str) -> str:
        try:
            with open(os.path.join(self.directory, name)) as f:
                return f.read()
        except FileNotFoundError:
            return ""


@contextlib.contextmanager
def running_squid(world: NetWorld, namespace: str, address: str, clients: tuple[str, ...]):
    """A started :class:`Squid`, stopped and its directory removed afterwards."""
    directory = tempfile.mkdtemp(prefix=f"jobcage-test-squid-{world.suffix}-")
    squid = Squid(world, namespace, address, directory)
    try:
        yield squid.start(clients)
    finally:
        squid.stop()
        shutil.rmtree(directory, ignore_errors=True)


def _has_user(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True

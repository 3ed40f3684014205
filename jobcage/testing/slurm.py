"""A real one-node Slurm (munged, slurmctld, slurmd) for the batch tests.

Everything it owns is private: a temp directory with the generated ``slurm.conf`` and
``cgroup.conf``, a munge key, the state and spool directories, the logs; a cluster
name, a node name and two ports of its own. The daemons run in the simulated world's
node netns and in a mount, UTS and cgroup namespace of their own whose cgroup root is
``/jobcage-test-slurm-<suffix>`` in every hierarchy: Slurm's cgroup plugins build
``/slurm/uid_0/job_N/...`` at what they take for the root, so everything they create
lands under the test's cgroup, never under the machine's ``/slurm``.

Each daemon runs in the foreground (``-F`` / ``-D``), is the very process we started
(the launcher execs it), and is ended by that pid.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import shlex
import shutil
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from jobcage.cgroups import probe
from jobcage.cgroups.base import rmdir_tree

from .networld import NetWorld, end_process, tcp_listening, wait_until

START_SECONDS = 30.0
NODE_CPUS = 2
NODE_MEMORY_MIB = 1000
NODE_ADDRESS = "127.0.0.1"

SLURM_CONF = """\
ClusterName=jct{suffix}
FirstJobId={first_job_id}
SlurmctldHost={node}({address})
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={dir}/munge.socket
CredType=cred/munge
StateSaveLocation={dir}/ctld
SlurmdSpoolDir={dir}/spool
SlurmctldPidFile={dir}/slurmctld.pid
SlurmdPidFile={dir}/slurmd.pid
SlurmctldLogFile={dir}/slurmctld.log
SlurmdLogFile={dir}/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
PlugStackConfig={dir}/plugstack.conf
Epilog={dir}/epilog
ProctrackType=proctrack/cgroup
TaskPlugin=task/cgroup
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
ReturnToService=2
KillWait={kill_wait}
UnkillableStepTimeout={unkillable}
InactiveLimit=0
MinJobAge=300
SlurmdTimeout=300
{extra}
NodeName={node} NodeAddr={address} CPUs={cpus} RealMemory={memory} State=UNKNOWN
PartitionName=p{suffix} Nodes={node} Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
"""

CGROUP_CONF = """\
CgroupPlugin=cgroup/v1
CgroupMountpoint=/sys/fs/cgroup
ConstrainRAMSpace=yes
ConstrainSwapSpace=yes
AllowedSwapSpace=0
ConstrainCores=no
ConstrainDevices=no
"""

# Run inside the new namespaces, before the daemon: a cgroup hierarchy mounted in a
# cgroup namespace has that namespace's root as its own root.
NAMESPACE_SETUP = """\
set -e
hostname {node}
mount -t tmpfs -o mode=755 jobcage-test-cgroup /sys/fs/cgroup
for c in {controllers}; do
  mkdir -p /sys/fs/cgroup/$c
  mount -t cgroup -o $c cgroup /sys/fs/cgroup/$c
done
exec "$@"
"""


def available() -> str | None:
    """Why Slurm cannot run here, or None when it can."""
    missing = [
        exe
        for exe in ("munged", "slurmctld", "slurmd", "slurmstepd", "sbatch", "srun")
        if shutil.which(exe, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin") is None
    ]
    if missing:
        return (
            f"Slurm is not installed ({', '.join(missing)} missing): tools/setup installs "
            "slurmctld slurmd slurm-client munge"
        )
    if os.geteuid() != 0:
        return "needs root: Slurm's daemons run as root here"
    h = probe()
    if "memory" not in h.v1_mounts or "freezer" not in h.v1_mounts:
        return "the Slurm tests use cgroup v1 (freezer and memory mounted); this node has not"
    return None


def _free_port() -> int:
    return random.randint(20000, 59999)


@dataclass
class Slurm:
    world: NetWorld
    directory: str
    kill_wait: int = 30
    extra_conf: str = ""
    suffix: str = field(default_factory=lambda: os.urandom(3).hex())
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)
    ctld_port: int = field(default_factory=_free_port)
    slurmd_port: int = field(default_factory=_free_port)

    @property
    def node(self) -> str:
        return f"jct-slurm-{self.suffix}"

    @property
    def cgroup(self) -> str:
        """The daemons' cgroup root, the same path in every hierarchy."""
        return f"/jobcage-test-slurm-{self.suffix}"

    @property
    def conf(self) -> str:
        return os.path.join(self.directory, "slurm.conf")

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "SLURM_CONF": self.conf}

    def cgroup_dir(self, controller: str) -> str:
        return os.path.join(probe().v1_mounts[controller], self.cgroup.lstrip("/"))

    # -- starting --------------------------------------------------------------------

    def start(self) -> Slurm:
        self._write_files()
        for c in probe().v1_mounts:
            os.makedirs(self.cgroup_dir(c), exist_ok=True)
        try:
            socket = os.path.join(self.directory, "munge.socket")
            self._launch(
                "munged",
                [
                    "munged",
                    "--foreground",
                    "--force",
                    f"--socket={socket}",
                    f"--key-file={self.directory}/munge.key",
                    f"--pid-file={self.directory}/munged.pid",
                    f"--log-file={self.directory}/munged.log",
                    f"--seed-file={self.directory}/munged.seed",
                ],
            )
            wait_until(lambda: self._alive("munged") and os.path.exists(socket), "munged")
            self._launch("slurmctld", ["slurmctld", "-D", "-i", "-f", self.conf])
            wait_until(
                lambda: (
                    self._alive("slurmctld")
                    and tcp_listening(self.processes["slurmctld"].pid, self.ctld_port)
                ),
                "slurmctld to listen",
                START_SECONDS,
            )
            self._launch("slurmd", ["slurmd", "-D", "-f", self.conf, "-N", self.node])
            wait_until(self._node_idle, "the Slurm node to be idle", START_SECONDS)
        except BaseException:
            self.stop()
            raise
        return self

    def _write_files(self) -> None:
        for sub in ("ctld", "spool"):
            os.makedirs(os.path.join(self.directory, sub))
        with open(self.conf, "w") as f:
            f.write(
                SLURM_CONF.format(
                    suffix=self.suffix,
                    # Job ids name the cages: overlapping runs must not share them.
                    first_job_id=1000 + int(self.suffix, 16),
                    node=self.node,
                    address=NODE_ADDRESS,
                    ctld_port=self.ctld_port,
                    slurmd_port=self.slurmd_port,
                    dir=self.directory,
                    kill_wait=self.kill_wait,
                    unkillable=max(self.kill_wait + 30, 60),
                    cpus=NODE_CPUS,
                    memory=NODE_MEMORY_MIB,
                    extra=self.extra_conf,
                )
            )
        with open(os.path.join(self.directory, "cgroup.conf"), "w") as f:
            f.write(CGROUP_CONF)
        open(os.path.join(self.directory, "plugstack.conf"), "w").close()
        self.set_epilog("#!/bin/sh\nexit 0\n")
        key = os.path.join(self.directory, "munge.key")
        fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o400)
        with os.fdopen(fd, "wb") as f:
            f.write(os.urandom(1024))

    def _launch(self, name: str, argv: list[str]) -> None:
        """Start a daemon in the test's cgroups and the private namespaces; it is the
        process we hold (every step execs the next)."""
        join = " ".join(
            f"echo $$ > {shlex.quote(os.path.join(self.cgroup_dir(c), 'cgroup.procs'))};"
            for c in probe().v1_mounts
        )
        setup = NAMESPACE_SETUP.format(
            node=self.node, controllers=" ".join(sorted(probe().v1_mounts))
        )
        netns = self.world.netns_path(self.world.node)
        inner = ["unshare", "--mount", "--uts", "--cgroup", "--propagation", "slave"]
        script = (
            f"{join} exec nsenter --net={shlex.quote(netns)} -- "
            + " ".join(shlex.quote(a) for a in inner)
            + " sh -c "
            + shlex.quote(setup)
            + " setup "
            + " ".join(shlex.quote(a) for a in argv)
        )
        log = open(os.path.join(self.directory, f"{name}.out"), "wb")  # noqa: SIM115
        try:
            self.processes[name] = subprocess.Popen(
                ["sh", "-c", script],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
            )
        finally:
            log.close()

    def _alive(self, name: str) -> bool:
        proc = self.processes[name]
        if proc.poll() is not None:
            raise RuntimeError(
                f"{name} exited at start (status {proc.returncode}):\n{self.log(name)}"
            )
        return True

    def _node_idle(self) -> bool:
        self._alive("slurmd")
        out = self.client(["sinfo", "-h", "-n", self.node, "-o", "%t"], check=False)
        return out.stdout.strip() == "idle"

    # -- using it --------------------------------------------------------------------

    def client(
        self, argv: Sequence[str], *, check: bool = True, timeout: float = 120, **kwargs
    ) -> subprocess.CompletedProcess:
        """A Slurm client command, in the node netns where slurmctld listens."""
        netns = self.world.netns_path(self.world.node)
        out = subprocess.run(
            ["nsenter", f"--net={netns}", "--", *argv],
            capture_output=True,
            text=True,
            env={**self.env, **kwargs.pop("env", {})},
            timeout=timeout,
            check=False,
            **kwargs,
        )
        if check and out.returncode != 0:
            raise AssertionError(
                f"{' '.join(argv)} exited {out.returncode}: {out.stderr}\n{out.stdout}"
            )
        return out

    def popen_client(self, argv: Sequence[str], **kwargs) -> subprocess.Popen:
        netns = self.world.netns_path(self.world.node)
        return subprocess.Popen(
            ["nsenter", f"--net={netns}", "--", *argv],
            env={**self.env, **kwargs.pop("env", {})},
            **kwargs,
        )

    def set_epilog(self, text: str) -> None:
        """The node's Epilog script (slurmd runs it after each job, as root)."""
        path = os.path.join(self.directory, "epilog")
        with open(path + ".new", "w") as f:
            f.write(text)
        os.chmod(path + ".new", 0o755)
        os.rename(path + ".new", path)

    def show_job(self, job_id: str | int) -> dict[str, str]:
        """``scontrol show job -o``: Slurm's own view, as Key=Value pairs."""
        out = self.client(["scontrol", "show", "job", "-o", str(job_id)]).stdout
        return dict(re.findall(r"(\S+?)=(\S*)", out))

    def show_node(self) -> dict[str, str]:
        out = self.client(["scontrol", "show", "node", "-o", self.node]).stdout
        return dict(re.findall(r"(\S+?)=(\S*)", out))

    def log(self, name: str) -> str:
        text = ""
        for suffix in (".log", ".out"):
            with (
                contextlib.suppress(FileNotFoundError),
                open(os.path.join(self.directory, name + suffix)) as f,
            ):
                text += f.read()
        return text

    # -- stopping --------------------------------------------------------------------

    def stop(self) -> None:
        """SIGTERM each daemon by pid, slurmd first; then remove the test's cgroups."""
        for name in ("slurmd", "slurmctld", "munged"):
            proc = self.processes.pop(name, None)
            if proc is not None:
                end_process(proc, START_SECONDS)
        # slurmctld's slurmscriptd ends with it, a moment later.
        wait_until(lambda: not self.leftover_pids(), "Slurm's processes to end", START_SECONDS)
        for c in probe().v1_mounts:
            rmdir_tree(self.cgroup_dir(c))

    def leftover_pids(self) -> set[int]:
        """Processes still in the daemons' cgroup tree (the daemons' own included)."""
        pids: set[int] = set()
        top = self.cgroup_dir("freezer")
        for dirpath, _dirs, _files in os.walk(top):
            with (
                contextlib.suppress(FileNotFoundError),
                open(os.path.join(dirpath, "cgroup.procs")) as f,
            ):
                pids.update(int(p) for p in f.read().split())
        return pids


@contextlib.contextmanager
def running_slurm(world: NetWorld, **kwargs) -> Iterator[Slurm]:
    """A started :class:`Slurm`, stopped and its directory removed afterwards."""
    directory = tempfile.mkdtemp(prefix="jobcage-test-slurm-")
    os.chmod(directory, 0o755)
    slurm = Slurm(world, directory, **kwargs)
    try:
        yield slurm.start()
    finally:
        try:
            slurm.stop()
        finally:
            shutil.rmtree(directory, ignore_errors=True)

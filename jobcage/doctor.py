"""``jobcage doctor``: is this node ready to cage jobs, and if not, what to do.

Each check returns a :class:`Check` with a status and one line that says what was
found and, when it is not OK, what to change. Checks only read the node: the veth
probe runs in a throwaway network namespace (``unshare --net``), never in the node's
own, and the firewall is only read (``iptables-*-save``). The network checks ask the
library's own code (rtnetlink, the firewall selection) rather than /proc, so that
doctor cannot pass a node the library will fail on.
"""

from __future__ import annotations

import contextlib
import enum
import os
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass

from .cgroups import CgroupBackend, Hierarchies, open_backend, probe
from .config import Config
from .errors import JobCageError
from .records import StateStore

COMMAND_TIMEOUT_SECONDS = 10.0


class Status(enum.Enum):
    OK = "ok"
    WARN = "warn"
    FAIL = "FAIL"


@dataclass(frozen=True)
class Check:
    name: str
    status: Status
    message: str

    def to_dict(self) -> dict[str, str]:
        return {"name": self.name, "status": self.status.value, "message": self.message}


def ready(checks: list[Check]) -> bool:
    """The node can run cages: no check failed (warnings cost features, not jobs)."""
    return all(c.status is not Status.FAIL for c in checks)


def run_checks(config: Config, *, network: bool = True) -> list[Check]:
    """Every check, in the order an administrator fixes things.

    ``network=False`` skips the network checks, for sites that never run ``--network``.
    """
    from .batchcheck import batch_checks

    checks = [check_root(), *check_cgroups(config), check_state_dir(config)]
    checks += [Check(name, Status(status), text) for name, status, text in batch_checks(config)]
    if network:
        checks += [
            check_netns(),
            check_veth(),
            *check_iptables(config),
            _guard("forwarding", check_forwarding),
            _guard("uplink", lambda: check_uplink(config)),
            *_guard_all("address pool", lambda: check_addresses(config)),
            _guard("ipv6", lambda: check_ipv6(config)),
        ]
    return checks


def check_ipv6(config: Config) -> Check:
    """Dual-stack cages: their mode on this node, and what IPv6 or IPv4 will lack."""
    from .network.ipv6 import report

    status, message = report(config)
    return Check("ipv6", Status(status), message)


def _guard(name: str, fn: Callable[[], Check]) -> Check:
    try:
        return fn()
    except (OSError, JobCageError, ValueError) as e:
        return Check(name, Status.FAIL, f"the check itself failed: {e}")


def _guard_all(name: str, fn: Callable[[], list[Check]]) -> list[Check]:
    try:
        return fn()
    except (OSError, JobCageError, ValueError) as e:
        return [Check(name, Status.FAIL, f"the check itself failed: {e}")]


# -- privileges and cgroups ------------------------------------------------------------


def check_root() -> Check:
    if os.geteuid() == 0:
        return Check("root", Status.OK, "running as root")
    return Check(
        "root",
        Status.FAIL,
        "not root: JobCage creates cgroups and namespaces; run it as root "
        "(the batch system's starter or slurmstepd runs as root)",
    )


def check_cgroups(config: Config, hierarchies: Hierarchies | None = None) -> list[Check]:
    h = hierarchies or probe()
    try:
        backend = open_backend(config, h)
    except JobCageError as e:
        return [Check("cgroup version", Status.FAIL, str(e))]
    checks = []
    where = "v2 (unified)" if backend.version == 2 else "v1 (a hierarchy per controller)"
    checks.append(
        Check(
            "cgroup version",
            Status.OK,
            f"cages use cgroup {where}; config cgroup_version = {config.cgroup_version}",
        )
    )
    for controller in ("freezer", "memory", "cpuacct", "blkio", "pids"):
        checks.append(_controller_check(controller, backend.version, h))
    checks.append(_kill_check(backend.version, h))
    checks.append(_swap_check(backend.version, h))
    checks.append(_parent_check(config, backend))
    return checks


_V2_NAMES = {"memory": "memory", "cpuacct": "cpu", "blkio": "io", "pids": "pids"}
_FEATURE_LOST = {
    "memory": "no memory limit, peak or OOM count",
    "cpuacct": "no CPU time",
    "blkio": "no block I/O bytes",
    "pids": "no pids limit",
}


def _controller_check(controller: str, version: int, h: Hierarchies) -> Check:
    name = f"cgroup {controller}"
    if version == 1:
        if controller in h.v1_mounts:
            return Check(name, Status.OK, f"v1, mounted at {h.v1_mounts[controller]}")
        if controller == "freezer":
            return Check(
                name,
                Status.FAIL,
                "v1 freezer is not mounted, so cages cannot be frozen and killed safely: "
                "mount -t cgroup -o freezer cgroup /sys/fs/cgroup/freezer",
            )
        return Check(
            name,
            Status.WARN,
            f"v1 {controller} is not mounted ({_FEATURE_LOST[controller]}): "
            f"mount -t cgroup -o {controller} cgroup /sys/fs/cgroup/{controller}",
        )
    if controller == "freezer":
        return Check(name, Status.OK, "v2: cgroup.freeze in every cgroup")
    v2_name = _V2_NAMES[controller]
    if v2_name in h.v2_controllers or controller == "cpuacct":
        # cpu.stat's user/system times are core files, present without the controller.
        return Check(name, Status.OK, f"v2 controller {v2_name} available")
    return Check(
        name,
        Status.WARN,
        f"v2 controller {v2_name} is not offered at the root ({_FEATURE_LOST[controller]}): "
        f"it is bound to a v1 hierarchy; unmount that or boot with "
        "systemd.unified_cgroup_hierarchy=1",
    )


def _kill_check(version: int, h: Hierarchies) -> Check:
    name = "cgroup kill"
    if version == 1:
        return Check(name, Status.OK, "v1: freeze, SIGKILL every task, thaw")
    own = os.path.join(h.v2_mount or "", (h.v2_own or "/").lstrip("/"))
    probe_dir = own if own.rstrip("/") != (h.v2_mount or "").rstrip("/") else None
    if probe_dir is None:
        # The root cgroup has neither cgroup.kill nor cgroup.freeze; look at a child.
        with contextlib.suppress(OSError):
            probe_dir = next(
                (e.path for e in os.scandir(h.v2_mount or "/") if e.is_dir(follow_symlinks=False)),
                None,
            )
    if probe_dir and os.path.exists(os.path.join(probe_dir, "cgroup.kill")):
        return Check(name, Status.OK, "v2: cgroup.kill kills a cage in one write")
    return Check(
        name,
        Status.WARN,
        "v2 without cgroup.kill (Linux < 5.14): cages are killed by freeze, SIGKILL each "
        "task, thaw, which is slower on large jobs; a newer kernel fixes it",
    )


def _swap_check(version: int, h: Hierarchies) -> Check:
    name = "swap accounting"
    if version == 1:
        mount = h.v1_mounts.get("memory")
        if mount is None:
            return Check(name, Status.WARN, "no memory controller, so no swap accounting")
        if os.path.exists(os.path.join(mount, "memory.memsw.limit_in_bytes")):
            return Check(name, Status.OK, "memory.memsw.* present: limits cover RAM + swap")
        missing = "memory.memsw.*"
    else:
        if "memory" not in h.v2_controllers:
            return Check(name, Status.WARN, "no v2 memory controller, so no swap accounting")
        own = os.path.join(h.v2_mount or "", (h.v2_own or "/").lstrip("/"))
        if os.path.exists(os.path.join(own, "memory.swap.max")) or not os.path.exists(
            os.path.join(own, "memory.max")
        ):
            return Check(name, Status.OK, "memory.swap.max available: cages get swap.max = 0")
        missing = "memory.swap.max"
    return Check(
        name,
        Status.WARN,
        f"{missing} missing: a job can swap past its memory limit; boot with "
        "swapaccount=1 (kernel CONFIG_MEMCG_SWAP)",
    )


def _parent_check(config: Config, backend: CgroupBackend) -> Check:
    name = "cgroup parent"
    parents = list(backend.parents().values())
    missing = [p for p in parents if not os.path.isdir(os.path.dirname(p))]
    if missing:
        return Check(
            name,
            Status.FAIL,
            f"the directory above the cgroup parent does not exist ({missing[0]}): "
            "create it or set cgroup_parent in the config",
        )
    if config.cgroup_parent is None:
        return Check(
            name,
            Status.WARN,
            "cgroup_parent is not set, so each caller's own cgroup + jobcage/ is used and "
            '`jobcage reap` run from cron looks elsewhere: set cgroup_parent = "/jobcage"',
        )
    if not os.path.basename(config.cgroup_parent.rstrip("/")).startswith("jobcage"):
        return Check(
            name,
            Status.WARN,
            f"cgroup_parent {config.cgroup_parent} does not start with 'jobcage', so "
            "`jobcage reap` will not remove cgroups left without a record there",
        )
    return Check(name, Status.OK, f"cages go under {config.cgroup_parent}")


def check_state_dir(config: Config) -> Check:
    name = "state dir"
    path = config.state_dir
    probe_path = path
    while not os.path.exists(probe_path):
        probe_path = os.path.dirname(probe_path) or "/"
    if not os.path.isdir(probe_path):
        return Check(name, Status.FAIL, f"{probe_path} is not a directory: fix state_dir")
    if not os.access(probe_path, os.W_OK | os.X_OK):
        return Check(
            name,
            Status.FAIL,
            f"{probe_path} is not writable: run as root or set state_dir to a writable "
            "local directory",
        )
    unsafe = StateStore(path).unsafe_reason()
    if unsafe:
        return Check(
            name,
            Status.FAIL,
            f"{unsafe}: another user could make `jobcage reap` kill and remove what its "
            f"records name; chown root and chmod 755 it",
        )
    if probe_path != path:
        return Check(name, Status.OK, f"{path} will be created (under {probe_path})")
    return Check(name, Status.OK, f"{path} is writable")


# -- network ---------------------------------------------------------------------------


def check_netns() -> Check:
    name = "network namespaces"
    if not os.path.exists("/proc/self/ns/net"):
        return Check(name, Status.FAIL, "no network namespaces (CONFIG_NET_NS): --network fails")
    return _run_probe(
        name,
        ["unshare", "--net", "true"],
        "can create a network namespace",
        "cannot create a network namespace (CONFIG_NET_NS, or a seccomp/container policy)",
    )


def check_veth() -> Check:
    # Inside a throwaway namespace, which takes the pair with it when `unshare` exits.
    return _run_probe(
        "veth",
        ["unshare", "--net", "ip", "link", "add", "jcd0", "type", "veth", "peer", "jcd1"],
        "can create a veth pair",
        "cannot create a veth pair: load the veth module (modprobe veth; CONFIG_VETH)",
    )


def _run_probe(name: str, argv: list[str], ok: str, fail: str) -> Check:
    if shutil.which(argv[0]) is None or (argv[2] == "ip" and shutil.which("ip") is None):
        return Check(name, Status.WARN, f"cannot check: {argv[0]} or ip is not installed")
    try:
        done = subprocess.run(
            argv, capture_output=True, timeout=COMMAND_TIMEOUT_SECONDS, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        return Check(name, Status.FAIL, f"{fail} ({e})")
    if done.returncode == 0:
        return Check(name, Status.OK, ok)
    err = done.stderr.decode(errors="replace").strip().splitlines()
    return Check(name, Status.FAIL, f"{fail}: {err[-1] if err else done.returncode}")


def check_iptables(config: Config | None = None) -> list[Check]:
    """The node's iptables flavour, and a warning when rules live in both backends.

    Detection is the firewall package's (:mod:`jobcage.network.firewall.report`): it
    knows which backend JobCage's own rules use, and asks that backend whether it can
    work here.
    """
    from .network.firewall.report import firewall_report

    name = "iptables"
    try:
        report = firewall_report(config.firewall if config is not None else "auto")
    except JobCageError as e:
        return [Check(name, Status.FAIL, str(e))]
    if report.problem is not None:
        return [Check(name, Status.FAIL, f"{report.jobcage_backend}: {report.problem}")]
    if report.node_iptables == "missing":
        return [Check(name, Status.FAIL, "iptables is not installed: apt-get install iptables")]
    counts = ", ".join(
        f"{n} {c} rule(s)"
        for n, c in (("legacy", report.legacy_rules), ("nf_tables", report.nft_rules))
        if c is not None
    )
    checks = [
        Check(
            name,
            Status.OK,
            f"the node's iptables is {report.node_iptables}, JobCage writes "
            f"{report.jobcage_backend} rules"
            + (f" (`{report.shown_by}`)" if report.shown_by else "")
            + (f"; the node has {counts}" if counts else ""),
        )
    ]
    checks += [Check("iptables backends", Status.WARN, w) for w in report.warnings]
    return checks


def check_forwarding() -> Check:
    from .network import netns

    name = "forwarding"
    if netns.forwarding_enabled():
        return Check(name, Status.OK, "net.ipv4.ip_forward = 1")
    return Check(
        name,
        Status.OK,
        "net.ipv4.ip_forward = 0 now: the first networked cage turns it on (and it stays "
        "on); to have it on from boot, put net.ipv4.ip_forward = 1 in /etc/sysctl.d/",
    )


def check_uplink(config: Config) -> Check:
    """The interface the cages are NATed out of, found as the first cage will find it."""
    from .network import netns

    name = "uplink"
    try:
        uplink = config.uplink or netns.default_route_interface()
    except JobCageError:
        return Check(
            name,
            Status.FAIL,
            "no uplink: the node has no IPv4 default route and uplink is not set in the "
            'config; set uplink = "eth0" (the interface cages are NATed to)',
        )
    where = "configured" if config.uplink else "from the default route"
    state = netns.link_operstate(uplink)
    if state is None:
        return Check(name, Status.FAIL, f"uplink {uplink} ({where}) does not exist: fix uplink")
    if state not in {"up", "unknown"}:
        return Check(name, Status.WARN, f"uplink {uplink} ({where}) is {state}")
    return Check(name, Status.OK, f"uplink {uplink} ({where}), {state}")


def check_addresses(config: Config) -> list[Check]:
    checks = []
    pool, campus = config.address_pool, config.campus_networks  # parsed by the config
    if not campus:
        checks.append(
            Check(
                "campus networks",
                Status.WARN,
                "campus_networks is empty: all of a job's traffic is counted as off-campus "
                '(WAN); set e.g. campus_networks = ["129.93.0.0/16"]',
            )
        )
    else:
        checks.append(
            Check(
                "campus networks",
                Status.OK,
                f"traffic to {', '.join(map(str, campus))} counts as LAN, the rest as WAN",
            )
        )
    from .network import netns

    # The config already refused a campus network inside the pool; these are the
    # routes the first cage checks the pool against (the main table's).
    clash = netns.routes_overlapping(str(pool))
    if clash:
        checks.append(
            Check(
                "address pool",
                Status.FAIL,
                f"address_pool {pool} overlaps {', '.join(clash)}: choose a range the node "
                "and campus do not use",
            )
        )
    else:
        checks.append(
            Check(
                "address pool",
                Status.OK,
                f"{pool}: {pool.num_addresses // 4} cages of a /30 each, clear of the node's "
                "networks",
            )
        )
    return checks

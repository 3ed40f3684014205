"""The simulated world the network tests, tools/demo.py and tools/benchmarks run in:
the machine's own network is never touched, as the project's testing rules require on
a shared machine.

Four network namespaces, every name carrying a per-run suffix::

    node eth0 198.51.100.2/24 -- rn 198.51.100.1  router
                                  router  rc 192.0.2.1   -- campus   eth0 192.0.2.10/24
                                  router  ri 203.0.113.1 -- internet eth0 203.0.113.10/24

``NetWorld(ipv6=True)`` adds IPv6 (documentation prefix 2001:db8::/32): the node's
uplink 2001:db8:1::2/64 (router ::1), campus 2001:db8:c::10/64, internet
2001:db8:e::10/64 (router ::1 on each); ``ipv4=False`` with it is an IPv6-only world
(no IPv4 address or route outside the cages). Without ``ipv6`` every namespace has
IPv6 disabled, as a node without IPv6.

JobCage runs inside *node*: the test thread setns()es into it (:meth:`NetWorld.node_thread`)
so that pyroute2 and python-iptables calls act on the node's links and rules. The router
also routes the cages' pool to the node, so tests of inbound blocking prove the cage's
rules drop the packets, not merely that nobody knows the way.

Every namespace is made with ``ip netns add`` and changed only with ``ip -n NAME``, so
no command here runs in the machine's namespace; code that changes a namespace from
this process first calls :func:`guard`.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

from jobcage.netlink import nfchannel

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.setns.argtypes = (ctypes.c_int, ctypes.c_int)

# The netns this process started in, recorded at import: the machine's, as far as the
# test suite can tell (/proc/1/ns/net is unreadable here even to root).
INITIAL_NETNS_INO = os.stat("/proc/thread-self/ns/net").st_ino

HERE = os.path.dirname(os.path.abspath(__file__))
SERVER = os.path.join(HERE, "netserver.py")
CLIENT = os.path.join(HERE, "netclient.py")
SERVER_PORT = 8080
NODE_SERVER_PORT = 8081
IPERF_PORT = 5201

NODE_UPLINK = "198.51.100.2"
ROUTER_NODE_SIDE = "198.51.100.1"
CAMPUS_HOST = "192.0.2.10"
INTERNET_HOST = "203.0.113.10"
CAMPUS_NETWORK = "192.0.2.0/24"
POOL = "100.64.0.0/16"
NODE_UPLINK6 = "2001:db8:1::2"
ROUTER_NODE_SIDE6 = "2001:db8:1::1"
CAMPUS_HOST6 = "2001:db8:c::10"
INTERNET_HOST6 = "2001:db8:e::10"
CAMPUS_NETWORK6 = "2001:db8:c::/64"
POOL6 = "fd6a:6f62:6361::/48"

WAIT_SECONDS = 10.0
POLL_SECONDS = 0.005


class UnsafeNamespaceError(RuntimeError):
    pass


def current_netns_ino() -> int:
    return os.stat("/proc/thread-self/ns/net").st_ino


def in_initial_netns() -> bool:
    ino = current_netns_ino()
    if ino == INITIAL_NETNS_INO:
        return True
    try:
        return ino == os.stat("/proc/1/ns/net").st_ino
    except OSError:
        return False


def guard() -> None:
    """Refuse network changes in the namespace the test process started in."""
    if in_initial_netns():
        raise UnsafeNamespaceError(
            "refusing to change the network of the machine's own namespace: a network test "
            "must run inside the simulated node (use the `node` fixture)"
        )


def unique_suffix() -> str:
    return uuid.uuid4().hex[:6]


def ip(*args: str) -> str:
    return subprocess.run(["ip", *args], check=True, capture_output=True, text=True).stdout


def end_process(proc: subprocess.Popen, timeout: float) -> None:
    """SIGTERM a daemon we started, by pid; SIGKILL it if it outlives ``timeout``."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()


def wait_until(predicate, what: str, timeout: float = WAIT_SECONDS) -> None:
    """Poll the kernel for a state, bounded; never a bare sleep."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(POLL_SECONDS)


def tcp_listening(pid: int, port: int) -> bool:
    """Whether the netns of ``pid`` has a TCP socket listening on ``port``
    (/proc/PID/net/tcp{,6} show that process's namespace; state 0A is LISTEN)."""
    lines: list[str] = []
    for name in ("tcp", "tcp6"):
        try:
            with open(f"/proc/{pid}/net/{name}") as f:
                lines += f.read().splitlines()[1:]
        except OSError:
            pass
    for line in lines:
        fields = line.split()
        if fields[1].endswith(f":{port:04X}") and fields[3] == "0A":
            return True
    return False


@dataclass
class NetWorld:
    suffix: str = field(default_factory=unique_suffix)
    ipv4: bool = True
    ipv6: bool = False
    processes: list[subprocess.Popen] = field(default_factory=list)
    # Started by one test (a job's listener...), ended when that test ends.
    test_processes: list[subprocess.Popen] = field(default_factory=list)
    built: list[str] = field(default_factory=list)

    @property
    def node(self) -> str:
        return f"jct-node-{self.suffix}"

    @property
    def router(self) -> str:
        return f"jct-rtr-{self.suffix}"

    @property
    def campus(self) -> str:
        return f"jct-campus-{self.suffix}"

    @property
    def internet(self) -> str:
        return f"jct-inet-{self.suffix}"

    def netns_path(self, name: str) -> str:
        return f"/run/netns/{name}"

    # -- building --------------------------------------------------------------------

    def build(self) -> NetWorld:
        try:
            for ns in (self.node, self.router, self.campus, self.internet):
                ip("netns", "add", ns)
                self.built.append(ns)
                ip("-n", ns, "link", "set", "lo", "up")
            for ns in (self.node, self.router, self.campus, self.internet):
                # No IPv6 chatter (router solicitations, DAD): none at all without
                # IPv6, and none that waits or learns a route with it.
                if self.ipv6:
                    for knob in ("accept_ra=0", "accept_dad=0", "autoconf=0"):
                        for conf in ("all", "default"):
                            self.exec_in(ns, ["sysctl", "-qw", f"net.ipv6.conf.{conf}.{knob}"])
                else:
                    self.exec_in(ns, ["sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1"])
            links = [
                (self.node, NODE_UPLINK, "rn", ROUTER_NODE_SIDE, 24, NODE_UPLINK6, "1"),
                (self.campus, CAMPUS_HOST, "rc", "192.0.2.1", 24, CAMPUS_HOST6, "c"),
                (self.internet, INTERNET_HOST, "ri", "203.0.113.1", 24, INTERNET_HOST6, "e"),
            ]
            for ns, host, peer, gateway, bits, host6, net6 in links:
                self._wire(ns, peer)
                gateway6 = f"2001:db8:{net6}::1"
                if self.ipv4:
                    ip("-n", ns, "addr", "add", f"{host}/{bits}", "dev", "eth0")
                    ip("-n", self.router, "addr", "add", f"{gateway}/{bits}", "dev", peer)
                    ip("-n", ns, "route", "add", "default", "via", gateway)
                if self.ipv6:
                    ip("-n", ns, "addr", "add", f"{host6}/64", "dev", "eth0", "nodad")
                    ip("-n", self.router, "addr", "add", f"{gateway6}/64", "dev", peer, "nodad")
                    ip("-n", ns, "-6", "route", "add", "default", "via", gateway6)
            if self.ipv4:
                ip("-n", self.router, "route", "add", POOL, "via", NODE_UPLINK)
                self.exec_in(self.router, ["sysctl", "-qw", "net.ipv4.ip_forward=1"])
            if self.ipv6:
                # As for IPv4: the router knows the way to the cages, so only their
                # rules can stop what comes in.
                ip("-n", self.router, "-6", "route", "add", POOL6, "via", NODE_UPLINK6)
                self.exec_in(self.router, ["sysctl", "-qw", "net.ipv6.conf.all.forwarding=1"])
                # A stock node's uplink takes router advertisements (none come here):
                # the first IPv6 cage must keep it so when it turns forwarding on.
                self.exec_in(self.node, ["sysctl", "-qw", "net.ipv6.conf.eth0.accept_ra=1"])
            # The kernel instantiates a netns's legacy tables on first use and keeps them
            # (empty, policy ACCEPT) for the life of the netns: touch them now so that
            # "as before" means as before JobCage, not before any iptables use at all.
            for table in ("filter", "nat"):
                self.exec_in(self.node, ["iptables-legacy", "-w", "-t", table, "-S"])
            for host in (self.campus, self.internet):
                self.start_server(host, [sys.executable, SERVER, str(SERVER_PORT)])
                self.start_iperf(host)
            self.start_server(self.node, [sys.executable, SERVER, str(NODE_SERVER_PORT)])
        except BaseException:
            self.destroy()
            raise
        return self

    def _wire(self, host: str, router_if: str) -> None:
        # Created in the host with the peer born in the router: never a link in the
        # machine's netns.
        ip(
            "-n", host, "link", "add", "eth0", "type", "veth",
            "peer", "name", router_if, "netns", self.router,
        )  # fmt: skip
        ip("-n", host, "link", "set", "eth0", "up")
        ip("-n", self.router, "link", "set", router_if, "up")

    def exec_in(self, ns: str, argv: list[str], **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["nsenter", f"--net={self.netns_path(ns)}", "--", *argv],
            check=kwargs.pop("check", True),
            capture_output=True,
            text=True,
            **kwargs,
        )

    def popen_in(
        self, ns_path: str, argv: list[str], *, for_test: bool = False
    ) -> subprocess.Popen:
        proc = subprocess.Popen(
            ["nsenter", f"--net={ns_path}", "--", *argv],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        (self.test_processes if for_test else self.processes).append(proc)
        return proc

    def start_server(self, ns: str, argv: list[str]) -> subprocess.Popen:
        proc = self.popen_in(self.netns_path(ns), argv)
        line = proc.stdout.readline()  # blocks until the server has bound its sockets
        if line.strip() != "ready":
            raise RuntimeError(f"server {argv} in {ns} did not start: {proc.stderr.read()}")
        return proc

    def start_iperf(self, ns: str) -> subprocess.Popen:
        proc = self.popen_in(self.netns_path(ns), ["iperf3", "-s", "-p", str(IPERF_PORT)])
        wait_until(lambda: tcp_listening(proc.pid, IPERF_PORT), f"iperf3 in {ns}")
        return proc

    # -- using it --------------------------------------------------------------------

    @contextlib.contextmanager
    def node_thread(self) -> Iterator[None]:
        """Run the calling thread inside the node netns, and come back after."""
        back = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        node = os.open(self.netns_path(self.node), os.O_RDONLY | os.O_CLOEXEC)
        try:
            if _libc.setns(node, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns into the node")
            guard()
            try:
                yield
            finally:
                if _libc.setns(back, CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), "setns back out of the node")
        finally:
            os.close(node)
            os.close(back)

    def node_state(self) -> dict[str, object]:
        """What must be the same before the first cage and after the last."""
        saved = self.exec_in(self.node, ["iptables-legacy-save"]).stdout
        rules = [
            re.sub(r"\[\d+:\d+\]", "", line)
            for line in saved.splitlines()
            if line and not line.startswith("#")
        ]
        links = sorted(
            line.split(":")[1].strip().split("@")[0]
            for line in ip("-n", self.node, "-o", "link").splitlines()
        )
        nft = self.exec_in(self.node, ["iptables-nft-save"], check=False).stdout
        nft_rules = [line for line in nft.splitlines() if line.startswith("-")]
        # Every nftables table, JobCage's own included, without counter values.
        ruleset = self.exec_in(self.node, ["nft", "-s", "list", "ruleset"]).stdout
        state: dict[str, object] = {
            "legacy": rules, "links": links, "nft": nft_rules, "nftables": ruleset
        }  # fmt: skip
        if self.ipv6:
            state["legacy6"] = [
                re.sub(r"\[\d+:\d+\]", "", line)
                for line in self.exec_in(self.node, ["ip6tables-legacy-save"]).stdout.splitlines()
                if line and not line.startswith("#")
            ]
            state["routes6"] = ip("-n", self.node, "-6", "route", "show", "table", "all")
            state["proxies6"] = ip("-n", self.node, "-6", "neigh", "show", "proxy")
            conf = "/proc/sys/net/ipv6/conf"
            state["sysctls6"] = self.exec_in(
                self.node,
                ["sh", "-c", f"grep -s . {conf}/all/* {conf}/default/* {conf}/eth0/*"],
                check=False,
            ).stdout
        return state

    # -- teardown --------------------------------------------------------------------

    @staticmethod
    def _stop(processes: list[subprocess.Popen]) -> None:
        """End by pid what we started, and reap it."""
        for proc in processes:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            for stream in (proc.stdout, proc.stderr):
                if stream:
                    stream.close()
        processes.clear()

    def stop_processes(self) -> None:
        self._stop(self.test_processes)
        self._stop(self.processes)

    def stop_processes_started_in_test(self) -> None:
        self._stop(self.test_processes)

    @staticmethod
    def wait_until_empty(items, what: str) -> None:
        wait_until(lambda: not items(), what)

    def destroy(self) -> None:
        """Tolerant of what is already gone; deleting a netns takes its links along."""
        self.stop_processes()
        # JobCage keeps an nfnetlink socket open in the last netns it changed (the
        # node's): close it, or it would keep the node alive after its name is gone.
        nfchannel.close()
        for ns in reversed(self.built):
            result = subprocess.run(["ip", "netns", "del", ns], capture_output=True, text=True)
            if result.returncode != 0 and "No such file" not in result.stderr:
                raise RuntimeError(f"ip netns del {ns}: {result.stderr.strip()}")
        self.built.clear()

    def leftovers(self) -> list[str]:
        """Namespaces this run made that are still on the machine."""
        if not os.path.isdir("/run/netns"):
            return []
        return [n for n in os.listdir("/run/netns") if self.suffix in n]

"""The namespace side of a cage, over pyroute2: the netns, the veth pair, addresses,
the default route, forwarding and the cage's resolv.conf.

Costs that shape it (BASELINE.md, kernel 6.18):

* Moving a veth end into a netns (``link set netns``) waits for an RCU grace period,
  ~32 ms; creating the pair with its peer already in the other namespace does not,
  ~1.3 ms. So a helper *thread* unshare()s into the new netns (network namespaces are
  per thread, and a new thread starts in its creator's) and creates ``eth0`` there
  with the node-side peer placed in the node's namespace in the same RTM_NEWLINK.
* ``IPRoute(netns=...)`` forks a helper process (~3.4 ms); a plain ``IPRoute()``
  opened in that thread binds its socket to the thread's namespace instead.
* Deleting a veth synchronously costs ~30 ms (RCU again); unmounting the netns returns
  at once and the kernel's cleanup_net work deletes both ends afterwards. Teardown
  does only that: traffic of a veth whose cage is gone is dropped by the fail-closed
  rule at the end of the shared chains until the kernel removes it.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import ipaddress
import os
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from ..errors import CageExistsError, KernelFeatureError, NetworkError
from ..ids import NAME_PREFIX, VETH_PREFIX
from ..syscalls import (
    CLONE_NEWNET,
    MNT_DETACH,
    MS_BIND,
    MS_REC,
    MS_SHARED,
)
from ..syscalls import check as _check
from ..syscalls import libc as _libc
from . import hooks

NETNS_RUN_DIR = "/run/netns"
NETNS_ETC_DIR = "/etc/netns"
RESOLV_CONF = "/etc/resolv.conf"
RESOLVED_RESOLV_CONF = "/run/systemd/resolve/resolv.conf"
IP_FORWARD = "/proc/sys/net/ipv4/ip_forward"
JOB_IFNAME = "eth0"
LOOPBACK_IFINDEX = 1
JOB_IFINDEX = 2

# How long create() waits for the kernel to finish deleting a previous cage's veth of
# the same name (netns cleanup runs asynchronously in the cleanup_net workqueue).
LINK_GONE_TIMEOUT_SECONDS = 2.0
LINK_GONE_POLL_SECONDS = 0.002


@dataclass(frozen=True)
class NetnsPlan:
    netns_name: str
    host_veth: str
    host_address: ipaddress.IPv4Interface
    job_address: ipaddress.IPv4Interface

    @property
    def netns_path(self) -> str:
        return os.path.join(NETNS_RUN_DIR, self.netns_name)


def _prepare_run_dir() -> None:
    """Make /run/netns a shared mount, as iproute2's netns_add does, so that the netns
    bind mounts made here appear in every mount namespace (and `ip netns` sees them)."""
    os.makedirs(NETNS_RUN_DIR, mode=0o755, exist_ok=True)
    if _libc.mount(b"none", NETNS_RUN_DIR.encode(), b"none", MS_SHARED | MS_REC, None) == 0:
        return
    if ctypes.get_errno() != errno.EINVAL:
        _check(-1, f"making {NETNS_RUN_DIR} a shared mount")
    # EINVAL: not a mount point yet; bind it onto itself first.
    path = NETNS_RUN_DIR.encode()
    _check(_libc.mount(path, path, b"none", MS_BIND | MS_REC, None), f"binding {NETNS_RUN_DIR}")
    _check(
        _libc.mount(b"none", path, b"none", MS_SHARED | MS_REC, None),
        f"making {NETNS_RUN_DIR} a shared mount",
    )


def _write_sysctl(path: str, value: str) -> bool:
    """Write a /proc/sys/net file of the calling *thread's* netns (the kernel resolves
    /proc/sys/net through current->nsproxy). False if the kernel has no such knob."""
    try:
        with open(path, "w") as f:
            f.write(value)
    except FileNotFoundError:
        return False
    return True


def _netlink_error(e: BaseException, what: str) -> Exception:
    code = getattr(e, "code", None)
    if code in (errno.EOPNOTSUPP, errno.ENOTSUP):
        return KernelFeatureError(
            f"{what}: the kernel does not support veth pairs; enable CONFIG_VETH "
            "(or load the veth module)"
        )
    if code == errno.EPERM:
        return NetworkError(f"{what}: operation not permitted; JobCage needs CAP_NET_ADMIN")
    return NetworkError(f"{what}: {e}")


def _link_index(ipr, ifname: str) -> int | None:
    """RTM_GETLINK by name: one answer, where link_lookup() would dump every link of
    the node (hundreds with hundreds of cages)."""
    from pyroute2.netlink.exceptions import NetlinkError

    try:
        return ipr.link("get", ifname=ifname)[0]["index"]
    except NetlinkError as e:
        if e.code == errno.ENODEV:
            return None
        raise


def _wait_link_gone(ipr, ifname: str, timeout: float = LINK_GONE_TIMEOUT_SECONDS) -> bool:
    deadline = time.monotonic() + timeout
    while _link_index(ipr, ifname) is not None:
        if time.monotonic() > deadline:
            return False
        time.sleep(LINK_GONE_POLL_SECONDS)
    return True


def create(plan: NetnsPlan) -> None:
    """Build the netns with ``eth0`` up, addressed and routed, and its node-side peer
    up and addressed. Leaves nothing behind on failure."""
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError

    hooks.check()
    path = plan.netns_path
    try:
        _prepare_run_dir()
        # O_EXCL on the mount point is what makes a netns name ours (ip netns add does
        # the same); a second cage of the same job fails here before touching anything.
        os.close(os.open(path, os.O_RDONLY | os.O_CREAT | os.O_EXCL, 0))
    except FileExistsError:
        raise CageExistsError(
            f"network namespace {plan.netns_name} already exists: a cage of this job is "
            f"running, or a leftover; run `jobcage reap` (or `ip netns del {plan.netns_name}` "
            "if no such job runs)"
        ) from None
    except OSError as e:
        raise NetworkError(f"cannot create {path}: {e.strerror}") from e

    failure: list[BaseException] = []

    def inside() -> None:
        try:
            node_fd = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
            try:
                _check(_libc.unshare(CLONE_NEWNET), "unshare(CLONE_NEWNET)")
                _check(
                    _libc.mount(
                        b"/proc/thread-self/ns/net", path.encode(), b"none", MS_BIND, None
                    ),
                    f"bind-mounting the netns on {path}",
                )
                # No IPv6 in the cage: the rules are IPv4 only, and a link-local address
                # would reach the node around them. Set before eth0 exists so it is
                # born without one.
                for knob in ("all", "default"):
                    _write_sysctl(f"/proc/sys/net/ipv6/conf/{knob}/disable_ipv6", "1")
                with IPRoute() as ipr:
                    peer = {"ifname": plan.host_veth, "net_ns_fd": node_fd}
                    # Each pyroute2 request costs ~1 ms, so none is spent on lookups: a
                    # new netns numbers its devices itself (lo is LOOPBACK_IFINDEX, 1),
                    # so eth0 asks for index 2 and is brought up in the same
                    # RTM_NEWLINK (rtnl_configure_link applies ifi_flags).
                    new_link = {
                        "ifname": JOB_IFNAME,
                        "kind": "veth",
                        "index": JOB_IFINDEX,
                        "state": "up",
                        "peer": peer,
                    }
                    try:
                        ipr.link("add", **new_link)
                    except NetlinkError as e:
                        if e.code != errno.EEXIST:
                            raise _netlink_error(e, "creating the veth pair") from e
                        # The node-side name exists: maybe the previous cage of this job,
                        # whose netns the kernel is still cleaning up. Wait for it.
                        with _in_netns(node_fd), IPRoute() as node:
                            gone = _wait_link_gone(node, plan.host_veth)
                        if not gone:
                            raise CageExistsError(
                                f"a link named {plan.host_veth} already exists on the node: "
                                "a cage of this job is running, or a leftover; run "
                                f"`jobcage reap` (or `ip link del {plan.host_veth}`)"
                            ) from e
                        ipr.link("add", **new_link)
                    ipr.link("set", index=LOOPBACK_IFINDEX, state="up")
                    ipr.addr(
                        "add",
                        index=JOB_IFINDEX,
                        address=str(plan.job_address.ip),
                        prefixlen=plan.job_address.network.prefixlen,
                    )
                    ipr.route("add", gateway=str(plan.host_address.ip))
            finally:
                os.close(node_fd)
        except BaseException as e:
            failure.append(e)

    try:
        thread = threading.Thread(target=inside, name=f"jobcage-netns-{plan.netns_name}")
        thread.start()
        with IPRoute() as node:
            thread.join()
            if failure:
                raise failure[0]
            index = _link_index(node, plan.host_veth)
            if index is None:
                raise NetworkError(f"{plan.host_veth} vanished right after it was created")
            _write_sysctl(f"/proc/sys/net/ipv6/conf/{plan.host_veth}/disable_ipv6", "1")
            node.addr(
                "add",
                index=index,
                address=str(plan.host_address.ip),
                prefixlen=plan.host_address.network.prefixlen,
            )
            node.link("set", index=index, state="up")
    except BaseException as e:
        with contextlib.suppress(OSError):
            remove(plan.netns_name)
        if isinstance(e, NetlinkError):
            raise _netlink_error(e, f"setting up the network of {plan.netns_name}") from e
        if isinstance(e, OSError):
            raise NetworkError(f"setting up {plan.netns_name}: {e}") from e
        raise


@contextlib.contextmanager
def _in_netns(fd: int) -> Iterator[None]:
    """Run the calling thread in the netns ``fd`` and come back to where it was."""
    back = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        _check(_libc.setns(fd, CLONE_NEWNET), "setns")
        try:
            yield
        finally:
            _check(_libc.setns(back, CLONE_NEWNET), "setns back")
    finally:
        os.close(back)


def remove(netns_name: str) -> None:
    """Unmount and unlink the netns; the kernel then deletes it and so both veth ends
    once no process is left in it. Idempotent."""
    hooks.check()
    path = os.path.join(NETNS_RUN_DIR, netns_name)
    if _libc.umount2(path.encode(), MNT_DETACH) != 0:
        err = ctypes.get_errno()
        # EINVAL: not a mount point (half-made); ENOENT: already gone.
        if err not in (errno.EINVAL, errno.ENOENT):
            raise NetworkError(f"cannot unmount {path}: {os.strerror(err)}")
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as e:
        raise NetworkError(f"cannot remove {path}: {e.strerror}") from e


def delete_link(ifname: str) -> None:
    """Delete a leftover node-side veth (and so its peer). Synchronous, ~30 ms (RCU):
    only for `jobcage reap`, never on the teardown path. Idempotent."""
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError

    hooks.check()
    with IPRoute() as ipr:
        index = _link_index(ipr, ifname)
        if index is None:
            return
        try:
            ipr.link("del", index=index)
        except NetlinkError as e:
            if e.code != errno.ENODEV:
                raise _netlink_error(e, f"deleting {ifname}") from e


# -- node-wide settings ---------------------------------------------------------------


def forwarding_enabled() -> bool:
    """Whether the calling thread's netns forwards IPv4 (cages need it)."""
    with open(IP_FORWARD) as f:
        return f.read().strip() == "1"


def ensure_forwarding() -> bool:
    """Turn IPv4 forwarding on if it is off, as Docker and Podman do; True if changed.

    Left on at teardown: other software may have come to rely on it meanwhile, and the
    cages' rules are what confine the forwarded traffic.
    """
    if forwarding_enabled():
        return False
    hooks.check()
    try:
        _write_sysctl(IP_FORWARD, "1")
    except OSError as e:
        raise NetworkError(
            f"cannot enable IPv4 forwarding ({e.strerror}): set net.ipv4.ip_forward = 1 in "
            "/etc/sysctl.d/ on the node"
        ) from e
    return True


def default_route_interface() -> str:
    """The interface of the IPv4 default route: the uplink the cages are NATed out of."""
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        for route in ipr.route("dump", family=2, table=254):
            if route["dst_len"] != 0:
                continue
            oif = route.get("RTA_OIF")
            if oif is None:
                hops = route.get("RTA_MULTIPATH") or []
                oif = hops[0]["oif"] if hops else None
            if oif is not None:
                links = ipr.link("get", index=oif)
                return links[0].get("IFLA_IFNAME")
    raise NetworkError(
        "the node has no IPv4 default route, so JobCage cannot tell which interface to NAT "
        "the cages out of: set `uplink` in the config"
    )


def link_exists(ifname: str) -> bool:
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        return _link_index(ipr, ifname) is not None


def routes_overlapping(pool: str) -> list[str]:
    """Routes of the node (main table) that overlap the pool, other than the cages':
    a pool that overlaps a real network would shadow it, or be shadowed."""
    from pyroute2 import IPRoute

    network = ipaddress.IPv4Network(pool)
    found = []
    with IPRoute() as ipr:
        names = {link["index"]: link.get("IFLA_IFNAME") for link in ipr.get_links()}
        for route in ipr.route("dump", family=2, table=254):
            if route["dst_len"] == 0:
                continue
            dst = ipaddress.IPv4Network(f"{route.get('RTA_DST')}/{route['dst_len']}", strict=False)
            dev = names.get(route.get("RTA_OIF"), "") or ""
            if dst.overlaps(network) and not is_cage_veth(dev):
                found.append(f"{dst} dev {dev}")
    return found


def is_cage_veth(ifname: str) -> bool:
    """Node-side cage veths are "jc" + 12 hex digits + "h" (see jobcage.ids)."""
    body = ifname[len(VETH_PREFIX) : -1]
    return (
        len(ifname) == len(VETH_PREFIX) + 13
        and ifname.startswith(VETH_PREFIX)
        and ifname.endswith("h")
        and all(c in "0123456789abcdef" for c in body)
    )


def cage_netns_names() -> list[str]:
    try:
        return sorted(n for n in os.listdir(NETNS_RUN_DIR) if n.startswith(NAME_PREFIX + "-"))
    except FileNotFoundError:
        return []


def cage_veths() -> list[str]:
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        return sorted(
            n for n in (link.get("IFLA_IFNAME") for link in ipr.get_links()) if is_cage_veth(n)
        )


# -- DNS ------------------------------------------------------------------------------


def _nameservers(text: str) -> list[str]:
    servers = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) >= 2 and fields[0] == "nameserver":
            servers.append(fields[1])
    return servers


def _is_loopback(server: str) -> bool:
    try:
        return ipaddress.ip_address(server.split("%")[0]).is_loopback
    except ValueError:
        return False


def _is_ipv4(server: str) -> bool:
    try:
        return ipaddress.ip_address(server).version == 4
    except ValueError:
        return False


def plan_resolv_conf(
    node_text: str, resolved_text: str | None, fallback_servers: Sequence[str] = ()
) -> str | None:
    """The resolv.conf a cage needs, or None when the node's own works from inside.

    A loopback resolver (systemd-resolved's 127.0.0.53, a local dnsmasq) is the job's
    own ``lo`` inside the netns. Then, like `ip netns exec` with /etc/netns/NAME, the
    job gets: systemd-resolved's list of upstream servers if it has one, else the
    node's file without its loopback servers plus ``fallback_servers``. IPv6 servers
    are dropped (a cage has no IPv6).
    """
    servers = _nameservers(node_text)
    if not any(_is_loopback(s) for s in servers):
        return None
    if resolved_text is not None:
        upstream = [s for s in _nameservers(resolved_text) if _is_ipv4(s) and not _is_loopback(s)]
        if upstream:
            return _only_servers(resolved_text, upstream)
    kept = [s for s in servers if _is_ipv4(s) and not _is_loopback(s)]
    kept += [s for s in fallback_servers if s not in kept]
    text = _only_servers(node_text, kept)
    if not kept:
        text = (
            "# JobCage: the node's resolver listens on loopback only and no other server "
            "is known; set dns_servers in the JobCage config\n" + text
        )
    return text


def _only_servers(text: str, servers: Sequence[str]) -> str:
    lines = [line for line in text.splitlines() if line.split()[:1] != ["nameserver"]]
    header = "# Written by JobCage for a network cage (the node's resolver is on loopback)"
    return "\n".join([header, *lines, *(f"nameserver {s}" for s in servers)]) + "\n"


def read_text(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:
        return None


def write_resolv_conf(netns_name: str, text: str) -> str:
    """Write /etc/netns/NAME/resolv.conf, where `ip netns exec` looks too."""
    directory = os.path.join(NETNS_ETC_DIR, netns_name)
    # A concurrent teardown may rmdir an empty /etc/netns between makedirs' steps.
    for _ in range(3):
        try:
            os.makedirs(directory, mode=0o755, exist_ok=True)
            break
        except FileNotFoundError:
            continue
    path = os.path.join(directory, "resolv.conf")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
    return path


def remove_resolv_conf(netns_name: str) -> None:
    directory = os.path.join(NETNS_ETC_DIR, netns_name)
    for name in ("resolv.conf", "resolv.conf.tmp"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(directory, name))
    with contextlib.suppress(FileNotFoundError):
        os.rmdir(directory)
    # /etc/netns is made on demand; leave the node as it was when it is empty.
    with contextlib.suppress(FileNotFoundError, OSError):
        os.rmdir(NETNS_ETC_DIR)

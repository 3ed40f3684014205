"""The namespace side of a cage, over raw rtnetlink (:mod:`jobcage.netlink.rtnl`): the
netns, the veth pair, addresses, the default route, forwarding, and the node's links
and routes as the cage and `jobcage doctor` need them (its resolv.conf is
:mod:`.resolv`'s).

Costs that shape it (measured on the development machine, kernel 6.18):

* Moving a veth end into a netns (``link set netns``) waits for an RCU grace period,
  ~32 ms; creating the pair with its peer already in the other namespace does not,
  ~1.3 ms. So a helper *thread* unshare()s into the new netns (network namespaces are
  per thread, and a new thread starts in its creator's) and creates ``eth0`` there
  with the node-side peer placed in the node's namespace in the same RTM_NEWLINK.
* A netlink socket belongs to the netns of the thread that opened it: the helper thread
  opens one after unshare() for the cage's side, the caller one for the node's side.
* The cage's side is one write of five messages (veth, lo up, address, default route,
  and a RTM_GETLINK of ``eth0`` whose IFLA_LINK is the peer's index on the node), the
  node's side one write of address + up: two round trips, where pyroute2 took seven
  requests and two socket opens (figures: docs/performance.md, "netns, veth, addresses
  and route over raw rtnetlink"; why :mod:`~jobcage.netlink.rtnl` encodes with
  ``struct`` is in its docstring).
* Deleting a veth synchronously costs ~30 ms (RCU again); unmounting the netns returns
  at once and the kernel's cleanup_net work deletes both ends afterwards. Teardown
  does only that: traffic of a veth whose cage is gone is dropped by the fail-closed
  rule at the end of the shared chains until the kernel removes it.
"""

from __future__ import annotations

import ctypes
import errno
import ipaddress
import os
import socket
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from ..errors import CageExistsError, JobCageError, KernelFeatureError, NetworkError
from ..ids import NAME_PREFIX, VETH_PREFIX
from ..netlink import core, rtnl
from ..syscalls import (
    CLONE_NEWNET,
    MNT_DETACH,
    MS_BIND,
    MS_REC,
    MS_SHARED,
)
from ..syscalls import check as _check
from ..syscalls import libc as _libc
from . import addressing, hooks

NETNS_RUN_DIR = "/run/netns"
IP_FORWARD = "/proc/sys/net/ipv4/ip_forward"
JOB_IFNAME = "eth0"
LOOPBACK_IFINDEX = 1
JOB_IFINDEX = addressing.JOB_IFINDEX
IFNAMSIZ = 16  # with the terminating NUL

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
    # A dual-stack cage's IPv6 prefix (<prefix>::1 on the node side, ::2 on eth0);
    # None: IPv4 only, and the node side's IPv6 is disabled.
    host_address6: ipaddress.IPv6Interface | None = None
    job_address6: ipaddress.IPv6Interface | None = None

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


def _netlink_error(e: OSError, what: str | None) -> Exception:
    """A JobCage error for a refused request; ``what`` goes before the request's own
    words (a :class:`core.NetlinkError` says which request failed, and why)."""
    code = getattr(e, "errno", None)
    request = getattr(e, "request", None)
    creates_link = request is None or rtnl.creates_link(request)
    if code in (errno.EOPNOTSUPP, errno.ENOTSUP) and creates_link:
        text = f"{what}: {e}" if what else str(e)
        return KernelFeatureError(
            f"{text}: the kernel does not support veth pairs; enable CONFIG_VETH "
            "(or load the veth module)"
        )
    return core.network_error(e, what)


def _link(nl: rtnl.Socket, ifname: str) -> bytes | None:
    """RTM_GETLINK by name: one answer (the link's RTM_NEWLINK, None: no such link),
    where a dump would list every link of the node (hundreds with hundreds of cages)."""
    request = rtnl.get_link(name=ifname)
    (answer,) = nl.talk([request])
    if answer.error == errno.ENODEV:
        return None
    rtnl.raise_first_error([request], [answer])
    return answer.replies[0]


def _link_index(nl: rtnl.Socket, ifname: str) -> int | None:
    link = _link(nl, ifname)
    return None if link is None else rtnl.ifinfo_index(link)


def _link_names(nl: rtnl.Socket, indexes: Iterable[int]) -> dict[int, str]:
    """The names of these links, in one write; links gone meanwhile are left out."""
    requests = [rtnl.get_link(index=index) for index in sorted(set(indexes))]
    if not requests:
        return {}
    names = {}
    for request, answer in zip(requests, nl.talk(requests), strict=True):
        if answer.error == errno.ENODEV:
            continue
        rtnl.raise_first_error([request], [answer])
        reply = answer.replies[0]
        name = rtnl.ifinfo_attrs(reply).get(rtnl.IFLA_IFNAME)
        names[rtnl.ifinfo_index(reply)] = core.text(name) if name else ""
    return names


def _wait_link_gone(nl: rtnl.Socket, ifname: str, timeout: float | None = None) -> bool:
    deadline = time.monotonic() + (LINK_GONE_TIMEOUT_SECONDS if timeout is None else timeout)
    while _link_index(nl, ifname) is not None:
        if time.monotonic() > deadline:
            return False
        time.sleep(LINK_GONE_POLL_SECONDS)
    return True


_IPV6_OFF = 1  # the place of no_ipv6_link_local in _cage_requests


def _cage_requests(plan: NetnsPlan, node_fd: int) -> list[rtnl.Request]:
    """The cage's side in one write. A new netns numbers its devices itself (lo is
    LOOPBACK_IFINDEX, 1), so eth0 asks for index 2 and every later message can name it;
    it is brought up in the same RTM_NEWLINK (rtnl_configure_link applies ifi_flags)."""
    gateway = plan.host_address.ip
    return [
        rtnl.new_veth(
            JOB_IFNAME,
            JOB_IFINDEX,
            plan.host_veth,
            node_fd,
            up=True,
            what=f"creating the veth pair {JOB_IFNAME}/{plan.host_veth}",
        ),
        # Before its peer is up (no carrier yet), so eth0 never gets the IPv6 link-local
        # address it would make then. The node side drops all IPv6 of the cage anyway
        # (disable_ipv6 on the peer); this keeps eth0 quiet (no DAD, no solicitations).
        rtnl.no_ipv6_link_local(
            JOB_IFINDEX, f"turning IPv6 address generation off on {JOB_IFNAME}"
        ),
        rtnl.set_up(LOOPBACK_IFINDEX, "bringing lo up in the cage"),
        rtnl.new_address(JOB_IFINDEX, plan.job_address, f"adding {plan.job_address} to eth0"),
        rtnl.new_default_route(gateway, f"adding the cage's default route via {gateway}"),
        *addressing.cage_ipv6(plan),
        # Its IFLA_LINK is the peer's index on the node: no RTM_GETLINK there.
        rtnl.get_link(index=JOB_IFINDEX, what=f"reading {JOB_IFNAME}"),
    ]


def _peer_index(answer: rtnl.Answer) -> int | None:
    """The node-side index from eth0's RTM_GETLINK reply; None if it does not say
    (kernels leave IFLA_LINK out when it equals the link's own index)."""
    if not answer.replies:
        return None
    link = rtnl.ifinfo_attrs(answer.replies[0]).get(rtnl.IFLA_LINK)
    return (core.u32(link) or None) if link else None


def create(plan: NetnsPlan) -> None:
    """Build the netns with ``eth0`` up, addressed and routed, and its node-side peer
    up and addressed. Leaves nothing behind on failure."""
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
    peer: list[int | None] = []

    def inside(node: rtnl.Socket) -> None:
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
                requests = _cage_requests(plan, node_fd)
                with rtnl.Socket() as cage:
                    answers = cage.talk(requests)
                    if answers[0].error == errno.EEXIST:
                        # The node-side name exists: maybe the previous cage of this job,
                        # whose netns the kernel is still cleaning up. Wait for it. The
                        # rest of the batch failed for want of eth0 (lo up is harmless
                        # twice): send it all again.
                        if not _wait_link_gone(node, plan.host_veth):
                            raise CageExistsError(
                                f"a link named {plan.host_veth} already exists on the node: "
                                "a cage of this job is running (perhaps from another "
                                "state dir), or a leftover; run `jobcage reap` (or, if no "
                                f"such job runs on the node, `ip link del {plan.host_veth}`)"
                            )
                        answers = cage.talk(requests)
                    if answers[_IPV6_OFF].error == errno.EAFNOSUPPORT:
                        # A kernel without IPv6: nothing to turn off.
                        answers[_IPV6_OFF] = rtnl.Answer()
                    rtnl.raise_first_error(requests, answers)
                peer.append(_peer_index(answers[-1]))
            finally:
                os.close(node_fd)
        except BaseException as e:
            failure.append(e)

    try:
        # The node's socket, opened by this thread (in the node's netns).
        with rtnl.Socket() as node:
            thread = threading.Thread(
                target=inside, args=(node,), name=f"jobcage-netns-{plan.netns_name}"
            )
            thread.start()
            thread.join()
            if failure:
                raise failure[0]
            index = peer[0] or _link_index(node, plan.host_veth)
            if index is None:
                raise NetworkError(f"{plan.host_veth} vanished right after it was created")
            if plan.host_address6 is None:
                # No IPv6 from an IPv4-only cage: it has no IPv6 rules, and IPv6 would
                # reach the node (and beyond, if it forwards IPv6) around them.
                # rtnetlink cannot set this one; it is the cage's only /proc/sys/net
                # lookup (O(N): see rtnl).
                _write_sysctl(f"/proc/sys/net/ipv6/conf/{plan.host_veth}/disable_ipv6", "1")
            node.check(addressing.node_side(plan, index))
    except BaseException as e:
        try:
            remove(plan.netns_name)
        except (OSError, JobCageError) as cleanup:
            e.add_note(f"and removing the half-made {plan.netns_name} failed too: {cleanup}")
        if isinstance(e, JobCageError):
            raise  # CageExistsError is an OSError too: not to be wrapped below
        if isinstance(e, core.NetlinkError):
            raise _netlink_error(e, f"setting up the network of {plan.netns_name}") from e
        if isinstance(e, OSError):
            raise NetworkError(f"setting up {plan.netns_name}: {e}") from e
        raise


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


def set_link_down(ifname: str) -> None:
    """Cut a node-side veth off (fail closed: a cage whose rules could not be put back
    gets no traffic at all). Idempotent; a veth already gone is fine."""
    _change_link(rtnl.set_down_by_name(ifname, f"setting {ifname} down"))


def delete_link(ifname: str) -> None:
    """Delete a leftover node-side veth (and so its peer). Synchronous, ~30 ms (RCU):
    only for `jobcage reap`, never on the teardown path. Idempotent."""
    _change_link(rtnl.delete_link(ifname, f"deleting {ifname}"))


def _change_link(request: rtnl.Request) -> None:
    """One change to a node-side link; a link already gone (ENODEV) is fine."""
    hooks.check()
    try:
        with rtnl.Socket() as nl:
            (answer,) = nl.talk([request])
            if answer.error != errno.ENODEV:
                rtnl.raise_first_error([request], [answer])
    except core.NetlinkError as e:
        raise _netlink_error(e, None) from e


# -- node-wide settings ---------------------------------------------------------------


def forwarding_enabled() -> bool:
    """Whether the calling thread's netns forwards IPv4 (cages need it). Asked over
    rtnetlink: a /proc/sys/net lookup walks every netns's ``net`` entry."""
    try:
        with rtnl.Socket() as nl:
            (answer,) = nl.check([rtnl.get_forwarding()])
        forwarding = rtnl.netconf_forwarding(answer.replies[0]) if answer.replies else None
    except (core.NetlinkError, OSError):
        forwarding = None
    if forwarding is not None:
        return forwarding
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


def _main_routes(
    nl: rtnl.Socket, family: int = socket.AF_INET
) -> Iterator[tuple[int, dict[int, bytes], bytes]]:
    """(dst_len, attributes, message) of each IPv4 (or IPv6) route of the main table."""
    for message in nl.dump(rtnl.dump_routes(family=family)):
        dst_len, table, attrs = rtnl.route_fields(message)
        # rtm_table is 8 bits; RTA_TABLE has the whole id when present.
        if rtnl.RTA_TABLE in attrs:
            table = core.u32(attrs[rtnl.RTA_TABLE])
        if table == rtnl.RT_TABLE_MAIN:
            yield dst_len, attrs, message


def default_route_interface(family: int = socket.AF_INET) -> str:
    """The interface of the IPv4 (IPv6) default route: the uplink the cages are NATed
    out of."""
    try:
        with rtnl.Socket() as nl:
            for dst_len, attrs, _ in _main_routes(nl, family):
                if dst_len != 0:
                    continue
                oif = core.u32(attrs[rtnl.RTA_OIF]) if rtnl.RTA_OIF in attrs else None
                hops = attrs.get(rtnl.RTA_MULTIPATH, b"")
                if oif is None and len(hops) >= 8:
                    # struct rtnexthop: len (u16), flags, hops (u8), ifindex (int)
                    oif = core.u32(hops[4:8])
                if oif:
                    name = _link_names(nl, [oif]).get(oif)
                    if name:
                        return name
    except core.NetlinkError as e:
        raise _netlink_error(e, "finding the node's uplink") from e
    version = "IPv4" if family == socket.AF_INET else "IPv6"
    raise NetworkError(
        f"the node has no {version} default route, so JobCage cannot tell which interface "
        "to NAT the cages out of: set `uplink` in the config"
    )


def link_exists(ifname: str) -> bool:
    return link_operstate(ifname) is not None


def link_operstate(ifname: str) -> str | None:
    """The link's operational state as `ip link` names it ("up", "down", "unknown"...),
    None if there is no such link in the calling thread's netns (asked over rtnetlink:
    /sys/class/net shows the netns sysfs was mounted in, not the caller's)."""
    if not 0 < len(ifname.encode()) < IFNAMSIZ:
        return None  # no link can have that name (the kernel would say EINVAL)
    try:
        with rtnl.Socket() as nl:
            link = _link(nl, ifname)
    except core.NetlinkError as e:
        raise _netlink_error(e, f"looking up {ifname!r} on the node") from e
    if link is None:
        return None
    code = rtnl.ifinfo_attrs(link).get(rtnl.IFLA_OPERSTATE, b"\0")[0]
    return rtnl.OPERSTATES[code] if code < len(rtnl.OPERSTATES) else "unknown"


def routes_overlapping(pool: str) -> list[str]:
    """Routes of the node (main table) that overlap the pool, other than the cages':
    a pool that overlaps a real network would shadow it, or be shadowed.

    One route dump; links are looked up (in one write) only for the routes that
    overlap, not dumped, as there is one per cage."""
    network = ipaddress.IPv4Network(pool)
    overlapping: list[tuple[ipaddress.IPv4Network, int | None]] = []
    try:
        with rtnl.Socket() as nl:
            for dst_len, attrs, _ in _main_routes(nl):
                if dst_len == 0:
                    continue
                address = ipaddress.IPv4Address(attrs.get(rtnl.RTA_DST, bytes(4))[:4])
                dst = ipaddress.IPv4Network((address, dst_len), strict=False)
                if dst.overlaps(network):
                    oif = core.u32(attrs[rtnl.RTA_OIF]) if rtnl.RTA_OIF in attrs else None
                    overlapping.append((dst, oif))
            names = _link_names(nl, [oif for _, oif in overlapping if oif])
    except core.NetlinkError as e:
        raise _netlink_error(e, "checking the node's routes against the address pool") from e
    found = []
    for dst, oif in overlapping:
        if oif and oif not in names:
            # Its device is gone: a cage's veth the kernel is still cleaning up
            # after its netns went (the route outlives the lookup by a moment).
            continue
        dev = names.get(oif, "") if oif else ""
        if not is_cage_veth(dev):
            found.append(f"{dst}" + (f" dev {dev}" if dev else ""))
    return found


def address_held(job_address: ipaddress.IPv4Interface) -> bool:
    """Whether a route of the node still covers the subnet of ``job_address`` alone
    (or a part of it). A veth whose netns outlived its cage (a process stuck in D
    state, or one that left the cage's cgroup, keeps the netns) keeps its address and
    connected route: a new cage given that subnet would get none of its traffic, so
    the subnet is not free. One RTM_GETROUTE, answered with the route that matched."""
    request = rtnl.get_route_match(
        job_address.ip, f"looking up the route to {job_address.ip} on the node"
    )
    try:
        with rtnl.Socket() as nl:
            (answer,) = nl.talk([request])
    except OSError as e:
        raise _netlink_error(e, None) from e
    if answer.error in (errno.ENETUNREACH, errno.EHOSTUNREACH, errno.ENOENT):
        return False  # no route at all: nothing holds it
    try:
        rtnl.raise_first_error([request], [answer])
    except core.NetlinkError as e:
        raise _netlink_error(e, None) from e
    return any(
        rtnl.route_fields(reply)[0] >= job_address.network.prefixlen for reply in answer.replies
    )


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
    try:
        with rtnl.Socket() as nl:
            links = nl.dump(rtnl.dump_links())
    except core.NetlinkError as e:
        raise _netlink_error(e, "listing the node's links") from e
    names = (core.text(rtnl.ifinfo_attrs(link).get(rtnl.IFLA_IFNAME, b"")) for link in links)
    return sorted(n for n in names if is_cage_veth(n))

"""The namespace side of a cage, over raw rtnetlink (:mod:`jobcage.netlink.rtnl`): the
netns, the veth pair, addresses, the default route (its resolv.conf is
:mod:`.resolv`'s; the node's links, routes and forwarding, as the cage and `jobcage
doctor` ask them, are :mod:`.nodelinks`'s, and named here too for the callers).

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
import threading
import time
from dataclasses import dataclass

from ..errors import CageExistsError, JobCageError, NetworkError
from ..ids import NAME_PREFIX
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
from .nodelinks import (
    IFNAMSIZ,
    IP_FORWARD,
    address_held,
    cage_veths,
    default_route_interface,
    delete_link,
    ensure_forwarding,
    forwarding_enabled,
    is_cage_veth,
    link_exists,
    link_index,
    link_operstate,
    netlink_error,
    routes_overlapping,
    set_link_down,
    write_sysctl,
)

NETNS_RUN_DIR = "/run/netns"
JOB_IFNAME = "eth0"
LOOPBACK_IFINDEX = 1
JOB_IFINDEX = addressing.JOB_IFINDEX

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


def _wait_link_gone(nl: rtnl.Socket, ifname: str, timeout: float | None = None) -> bool:
    deadline = time.monotonic() + (LINK_GONE_TIMEOUT_SECONDS if timeout is None else timeout)
    while link_index(nl, ifname) is not None:
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
        *addressing.cage_ipv6(plan.job_address6, plan.host_address6),
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
            index = peer[0] or link_index(node, plan.host_veth)
            if index is None:
                raise NetworkError(f"{plan.host_veth} vanished right after it was created")
            if plan.host_address6 is None:
                # No IPv6 from an IPv4-only cage: it has no IPv6 rules, and IPv6 would
                # reach the node (and beyond, if it forwards IPv6) around them.
                # rtnetlink cannot set this one; it is the cage's only /proc/sys/net
                # lookup (O(N): see rtnl).
                write_sysctl(f"/proc/sys/net/ipv6/conf/{plan.host_veth}/disable_ipv6", "1")
            node.check(
                addressing.node_side(index, plan.host_veth, plan.host_address, plan.host_address6)
            )
    except BaseException as e:
        try:
            remove(plan.netns_name)
        except (OSError, JobCageError) as cleanup:
            e.add_note(f"and removing the half-made {plan.netns_name} failed too: {cleanup}")
        if isinstance(e, JobCageError):
            raise  # CageExistsError is an OSError too: not to be wrapped below
        if isinstance(e, core.NetlinkError):
            raise netlink_error(e, f"setting up the network of {plan.netns_name}") from e
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


def cage_netns_names() -> list[str]:
    try:
        return sorted(n for n in os.listdir(NETNS_RUN_DIR) if n.startswith(NAME_PREFIX + "-"))
    except FileNotFoundError:
        return []


# What callers have always asked of this module; the node's links and routes are
# :mod:`.nodelinks`'s.
__all__ = [
    "IFNAMSIZ",
    "IP_FORWARD",
    "NETNS_RUN_DIR",
    "NetnsPlan",
    "address_held",
    "cage_netns_names",
    "cage_veths",
    "create",
    "default_route_interface",
    "delete_link",
    "ensure_forwarding",
    "forwarding_enabled",
    "is_cage_veth",
    "link_exists",
    "link_operstate",
    "remove",
    "routes_overlapping",
    "set_link_down",
]

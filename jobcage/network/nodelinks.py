"""The node's links and routes as the cage, `jobcage reap` and `jobcage doctor` ask
them, over raw rtnetlink in the calling thread's netns: forwarding, the uplink, routes
that overlap a pool or still hold a cage's address, the cages' veths (and setting one
down or deleting it). Read-mostly; building a cage is :mod:`.netns`'s."""

from __future__ import annotations

import errno
import ipaddress
import socket
from collections.abc import Iterable, Iterator

from ..errors import KernelFeatureError, NetworkError
from ..ids import VETH_PREFIX
from ..netlink import core, rtnl
from . import hooks

IP_FORWARD = "/proc/sys/net/ipv4/ip_forward"
IFNAMSIZ = 16  # with the terminating NUL


def write_sysctl(path: str, value: str) -> bool:
    """Write a /proc/sys/net file of the calling *thread's* netns (the kernel resolves
    /proc/sys/net through current->nsproxy). False if the kernel has no such knob."""
    try:
        with open(path, "w") as f:
            f.write(value)
    except FileNotFoundError:
        return False
    return True


def netlink_error(e: OSError, what: str | None) -> Exception:
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


def link_index(nl: rtnl.Socket, ifname: str) -> int | None:
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
        raise netlink_error(e, None) from e


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
        write_sysctl(IP_FORWARD, "1")
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
        raise netlink_error(e, "finding the node's uplink") from e
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
        raise netlink_error(e, f"looking up {ifname!r} on the node") from e
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
        raise netlink_error(e, "checking the node's routes against the address pool") from e
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
        raise netlink_error(e, None) from e
    if answer.error in (errno.ENETUNREACH, errno.EHOSTUNREACH, errno.ENOENT):
        return False  # no route at all: nothing holds it
    try:
        rtnl.raise_first_error([request], [answer])
    except core.NetlinkError as e:
        raise netlink_error(e, None) from e
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


def cage_veths() -> list[str]:
    try:
        with rtnl.Socket() as nl:
            links = nl.dump(rtnl.dump_links())
    except core.NetlinkError as e:
        raise netlink_error(e, "listing the node's links") from e
    names = (core.text(rtnl.ifinfo_attrs(link).get(rtnl.IFLA_IFNAME, b"")) for link in links)
    return sorted(n for n in names if is_cage_veth(n))

"""Raw rtnetlink: the few requests a cage's network needs, encoded with ``struct`` and
sent several to a write over a plain ``NETLINK_ROUTE`` socket.

A batch is one ``send()`` of several messages, each with ``NLM_F_ACK``; the kernel
handles them in order (one that fails does not stop the next) and answers each with
its replies, if any, then one ack or error (``NLMSG_ERROR``; ``NLMSG_DONE`` ends a
dump). :meth:`Socket.talk` reads until every message has its answer.

Why not pyroute2's message classes (measured on the dev machine, pyroute2 0.9.7,
Python 3.11; see netns.py for what it costs the cage):

* importing any of them (``pyroute2.netlink.rtnl.ifinfmsg``) imports the whole
  package, ~150 ms once per process, which every ``jobcage`` command making a cage
  would pay;
* ``ifinfmsg``/``ifaddrmsg``/``rtmsg`` ``.encode()`` cost ~120 µs a message, ~0.5 ms
  for a cage's batch, against ~18 µs for the five messages here, when the kernel
  handles the whole batch in ~0.5 ms;
* ``IPBatch`` is an ``IPRoute``: ~1 ms to open (its asyncio loop) and ~2.2 ms to
  compile the same four requests.

The messages are few and fixed (uapi/linux/rtnetlink.h, if_link.h, veth.h), so a
small encoder and a parser of the answers is all that is needed. The cage's four
requests are byte for byte what pyroute2's ``IPRoute`` sent for them before
(tests/test_network_unit.py holds its encoding).
"""

from __future__ import annotations

import errno
import ipaddress
import socket
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field

from .core import (
    HEADER,
    NETLINK_ROUTE,
    NLM_F_ACK,
    NLM_F_CREATE,
    NLM_F_DUMP,
    NLM_F_DUMP_INTR,
    NLM_F_EXCL,
    NLMSG_DONE,
    NLMSG_ERROR,
    RECV_BUFFER,
    NetlinkError,
    Request,
    attr,
    attr_str,
    attr_u32,
    attrs,
    error_of,
    messages,
    open_socket,
)
from .core import (
    message as framed,
)

# rtnetlink.h
RTM_NEWLINK = 16
RTM_DELLINK = 17
RTM_GETLINK = 18
RTM_NEWADDR = 20
RTM_NEWROUTE = 24
RTM_GETROUTE = 26
RT_TABLE_MAIN = 254
RTM_F_FIB_MATCH = 0x2000  # RTM_GETROUTE: answer with the route that matched (4.13+)
RTPROT_STATIC = 4  # what pyroute2's route("add") set, and `ip route` shows as "proto static"
RT_SCOPE_UNIVERSE = 0
RTN_UNICAST = 1
RTA_DST = 1
RTA_OIF = 4
RTA_GATEWAY = 5
RTA_MULTIPATH = 9
RTA_TABLE = 15

# if_link.h, if_addr.h, veth.h
IFF_UP = 0x1
# enum if_oper_state (RFC 2863 operational states), as `ip link` prints them.
OPERSTATES = ("unknown", "notpresent", "down", "lowerlayerdown", "testing", "dormant", "up")
IFLA_IFNAME = 3
IFLA_LINK = 5
IFLA_OPERSTATE = 16
IFLA_LINKINFO = 18
IFLA_NET_NS_FD = 28
IFLA_INFO_KIND = 1
IFLA_INFO_DATA = 2
VETH_INFO_PEER = 1
IFA_ADDRESS = 1
IFA_LOCAL = 2
IFA_F_NODAD = 0x02
IFLA_AF_SPEC = 26
IFLA_INET6_ADDR_GEN_MODE = 8
IN6_ADDR_GEN_MODE_NONE = 1
RTM_GETNETCONF = 82
NETCONFA_IFINDEX = 1
NETCONFA_FORWARDING = 2
NETCONFA_IFINDEX_ALL = -1

_IFINFOMSG = struct.Struct("=BxHiII")  # family, type, index, flags, change
_IFADDRMSG = struct.Struct("=BBBBI")  # family, prefixlen, flags, scope, index
_RTMSG = struct.Struct("=BBBBBBBBI")  # family, dst_len, src_len, tos, table, protocol,
# scope, type, flags


def creates_link(request: Request) -> bool:
    return request.kind == RTM_NEWLINK and bool(request.flags & NLM_F_CREATE)


@dataclass
class Answer:
    """What the kernel said to one request: 0 or an errno, and its replies (whole
    messages, header included)."""

    error: int = 0
    kernel_message: str = ""
    replies: list[bytes] = field(default_factory=list)
    interrupted: bool = False  # a dump changed under it (NLM_F_DUMP_INTR)


# -- encoding -------------------------------------------------------------------------


def ifinfomsg(index: int = 0, flags: int = 0, change: int = 0) -> bytes:
    return _IFINFOMSG.pack(socket.AF_UNSPEC, 0, index, flags, change)


def encode(requests: Sequence[Request], first_seq: int) -> bytes:
    """The batch as sent, numbered from ``first_seq``. Each message but a dump asks for
    an ack (a dump ends with NLMSG_DONE instead; the kernel never acks one)."""
    return b"".join(
        framed(
            request.kind, request.flags | (0 if request.is_dump else NLM_F_ACK), seq, request.body
        )
        for seq, request in enumerate(requests, first_seq)
    )


def new_veth(
    ifname: str, index: int, peer_name: str, peer_netns_fd: int, *, up: bool, what: str
) -> Request:
    """``ifname`` (numbered ``index``) here, its peer born in the netns ``peer_netns_fd``.
    The peer cannot be brought up in the same request: veth_newlink configures it before
    the two ends are linked, and opening it then fails with ENOTCONN."""
    peer = ifinfomsg() + attr_str(IFLA_IFNAME, peer_name) + attr_u32(IFLA_NET_NS_FD, peer_netns_fd)
    info = attr_str(IFLA_INFO_KIND, "veth") + attr(IFLA_INFO_DATA, attr(VETH_INFO_PEER, peer))
    flags = IFF_UP if up else 0
    body = (
        ifinfomsg(index, flags, IFF_UP) + attr_str(IFLA_IFNAME, ifname) + attr(IFLA_LINKINFO, info)
    )
    return Request(RTM_NEWLINK, NLM_F_CREATE | NLM_F_EXCL, body, what)


def set_up(index: int, what: str) -> Request:
    return Request(RTM_NEWLINK, 0, ifinfomsg(index, IFF_UP, IFF_UP), what)


def set_down_by_name(name: str, what: str) -> Request:
    return Request(RTM_NEWLINK, 0, ifinfomsg(0, 0, IFF_UP) + attr_str(IFLA_IFNAME, name), what)


def new_address(
    index: int, address: ipaddress.IPv4Interface | ipaddress.IPv6Interface, what: str
) -> Request:
    """As `ip addr add A/N dev X` does it: IFA_LOCAL and IFA_ADDRESS, no broadcast.

    An IPv6 address is added ``nodad`` (IFA_F_NODAD): a veth's two ends are the only
    hosts on its link and their addresses come from a lease, so duplicate address
    detection could find nothing, and would keep the address unusable ("tentative")
    for a second after the job starts."""
    packed = address.ip.packed
    if address.version == 4:
        body = _IFADDRMSG.pack(socket.AF_INET, address.network.prefixlen, 0, 0, index)
        body += attr(IFA_ADDRESS, packed) + attr(IFA_LOCAL, packed)
    else:
        body = _IFADDRMSG.pack(socket.AF_INET6, address.network.prefixlen, IFA_F_NODAD, 0, index)
        body += attr(IFA_ADDRESS, packed)
    return Request(RTM_NEWADDR, NLM_F_CREATE | NLM_F_EXCL, body, what)


def new_default_route(
    gateway: ipaddress.IPv4Address | ipaddress.IPv6Address, what: str
) -> Request:
    family = socket.AF_INET if gateway.version == 4 else socket.AF_INET6
    body = _RTMSG.pack(
        family, 0, 0, 0, RT_TABLE_MAIN, RTPROT_STATIC, RT_SCOPE_UNIVERSE, RTN_UNICAST, 0
    )
    body += attr(RTA_GATEWAY, gateway.packed)
    return Request(RTM_NEWROUTE, NLM_F_CREATE | NLM_F_EXCL, body, what)


RTM_NEWNEIGH, RTM_DELNEIGH = 28, 29
NDA_DST = 1
NTF_PROXY = 0x08
NUD_PERMANENT = 0x80
_NDMSG = struct.Struct("=BxxxiHBB")  # family, ifindex, state, flags, type


def proxy_neighbour(
    index: int, address: ipaddress.IPv6Address, *, add: bool, what: str
) -> Request:
    """`ip -6 neigh add|del proxy ADDRESS dev INDEX`: the node answers neighbour
    solicitations for ``address`` on that link (with its proxy_ndp on)."""
    body = _NDMSG.pack(socket.AF_INET6, index, NUD_PERMANENT, NTF_PROXY, 0)
    body += attr(NDA_DST, address.packed)
    if add:
        return Request(RTM_NEWNEIGH, NLM_F_CREATE | NLM_F_EXCL, body, what)
    return Request(RTM_DELNEIGH, 0, body, what)


RTM_GETNEIGH = 30


def dump_proxy_neighbours(what: str = "listing the IPv6 proxy neighbour entries") -> Request:
    """Every IPv6 proxy neighbour entry (the kernel dumps its proxy table when the
    request's ndm_flags has NTF_PROXY)."""
    return Request(
        RTM_GETNEIGH, NLM_F_DUMP, _NDMSG.pack(socket.AF_INET6, 0, 0, NTF_PROXY, 0), what
    )


def proxy_neighbour_fields(message: bytes) -> tuple[int, bytes]:
    """(ifindex, NDA_DST) of an RTM_NEWNEIGH reply."""
    _, index, _, _, _ = _NDMSG.unpack_from(message, 16)
    return index, attrs(message, 16 + _NDMSG.size).get(NDA_DST, b"")


def no_ipv6_link_local(index: int, what: str) -> Request:
    """The link makes no IPv6 link-local address (``addrgenmode none``): the one
    IPv6 setting rtnetlink takes, where a /proc/sys/net write costs a path walk over
    every netns's ``net`` entry (O(N) with N cages)."""
    inet6 = attr(IFLA_INET6_ADDR_GEN_MODE, bytes([IN6_ADDR_GEN_MODE_NONE]))
    body = ifinfomsg(index) + attr(IFLA_AF_SPEC, attr(socket.AF_INET6, inet6))
    return Request(RTM_NEWLINK, 0, body, what)


def get_forwarding(
    what: str = "reading net.ipv4.ip_forward", family: int = socket.AF_INET
) -> Request:
    """RTM_GETNETCONF of IPv4 (or IPv6) for every interface: its NETCONFA_FORWARDING
    is net.ipv4.ip_forward (net.ipv6.conf.all.forwarding), read so, not from
    /proc/sys/net: see no_ipv6_link_local."""
    body = struct.pack("=Bxxx", family)  # netconfmsg, padded to 4
    body += attr(NETCONFA_IFINDEX, struct.pack("=i", NETCONFA_IFINDEX_ALL))
    return Request(RTM_GETNETCONF, 0, body, what)


def get_link(*, index: int = 0, name: str | None = None, what: str = "") -> Request:
    """RTM_GETLINK of one link, by index or by name: one answer, where a dump would
    list every link of the netns (hundreds with hundreds of cages)."""
    body = ifinfomsg(index)
    if name is not None:
        body += attr_str(IFLA_IFNAME, name)
    return Request(RTM_GETLINK, 0, body, what or f"reading link {name or index}")


def delete_link(name: str, what: str) -> Request:
    return Request(RTM_DELLINK, 0, ifinfomsg() + attr_str(IFLA_IFNAME, name), what)


def dump_links(what: str = "listing the links") -> Request:
    return Request(RTM_GETLINK, NLM_F_DUMP, ifinfomsg(), what)


def get_route_match(dst: ipaddress.IPv4Address, what: str) -> Request:
    """RTM_GETROUTE of one destination, answered with the FIB entry that matched
    (RTM_F_FIB_MATCH) rather than a computed route: its prefix says which route."""
    body = _RTMSG.pack(socket.AF_INET, 32, 0, 0, 0, 0, 0, 0, RTM_F_FIB_MATCH)
    return Request(RTM_GETROUTE, 0, body + attr(RTA_DST, dst.packed), what)


def dump_routes(what: str = "listing the IPv4 routes", family: int = socket.AF_INET) -> Request:
    body = _RTMSG.pack(family, 0, 0, 0, 0, 0, 0, 0, 0)
    return Request(RTM_GETROUTE, NLM_F_DUMP, body, what)


# -- decoding -------------------------------------------------------------------------


def collect(data: bytes, answers: dict[int, Answer], done: set[int]) -> None:
    """Sort the messages of one read into the answers of their requests (by seq);
    a request is in ``done`` once its ack, error or end of dump came."""
    for kind, flags, seq, message in messages(data):
        answer = answers.get(seq)
        if answer is None or seq in done:
            continue  # not ours (no multicast groups are joined), or late
        if kind == NLMSG_ERROR:
            answer.error, answer.kernel_message = error_of(message, flags)
            done.add(seq)
        elif kind == NLMSG_DONE:
            if len(message) >= HEADER.size + 4:  # the dump's own error, or 0
                answer.error = -struct.unpack_from("=i", message, HEADER.size)[0]
            answer.interrupted |= bool(flags & NLM_F_DUMP_INTR)
            done.add(seq)
        else:
            answer.replies.append(message)
            answer.interrupted |= bool(flags & NLM_F_DUMP_INTR)


def netconf_forwarding(message: bytes) -> bool | None:
    """NETCONFA_FORWARDING of an RTM_NEWNETCONF reply; None if it does not say."""
    value = attrs(message, HEADER.size + 4).get(NETCONFA_FORWARDING)
    return struct.unpack("=i", value[:4])[0] != 0 if value else None


def ifinfo_index(message: bytes) -> int:
    return _IFINFOMSG.unpack_from(message, HEADER.size)[2]


def ifinfo_attrs(message: bytes) -> dict[int, bytes]:
    return attrs(message, HEADER.size + _IFINFOMSG.size)


def route_fields(message: bytes) -> tuple[int, int, dict[int, bytes]]:
    """(dst_len, table, attributes) of an RTM_NEWROUTE."""
    _, dst_len, _, _, table, _, _, _, _ = _RTMSG.unpack_from(message, HEADER.size)
    return dst_len, table, attrs(message, HEADER.size + _RTMSG.size)


# -- the socket -----------------------------------------------------------------------


class Socket:
    """A NETLINK_ROUTE socket of the calling thread's netns; it stays in that netns
    whatever the thread does afterwards."""

    def __init__(self) -> None:
        self._sock = open_socket(NETLINK_ROUTE)
        self._seq = 0

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> Socket:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def talk(self, requests: Sequence[Request]) -> list[Answer]:
        """Send the requests in one write and return their answers, in order, errors
        included. Only one dump may run at a time on a socket (a second gets EBUSY)."""
        first = self._seq + 1
        self._seq += len(requests)
        self._sock.send(encode(requests, first))
        answers = {seq: Answer() for seq in range(first, first + len(requests))}
        done: set[int] = set()
        while len(done) < len(requests):
            data, _, flags, _ = self._sock.recvmsg(RECV_BUFFER)
            if flags & socket.MSG_TRUNC:
                raise NetlinkError(errno.EMSGSIZE, "reading a netlink answer", "truncated")
            collect(data, answers, done)
        return [answers[seq] for seq in range(first, first + len(requests))]

    def check(self, requests: Sequence[Request]) -> list[Answer]:
        """:meth:`talk`, raising the first error (the others follow from it)."""
        answers = self.talk(requests)
        raise_first_error(requests, answers)
        return answers

    def dump(self, request: Request, attempts: int = 3) -> list[bytes]:
        """The replies of a dump; redone when the table changed under it."""
        for _ in range(attempts - 1):
            (answer,) = self.check([request])
            if not answer.interrupted:
                return answer.replies
        return self.check([request])[0].replies


def raise_first_error(requests: Sequence[Request], answers: Sequence[Answer]) -> None:
    for request, answer in zip(requests, answers, strict=True):
        if answer.error:
            raise NetlinkError(answer.error, request.what, answer.kernel_message, request)

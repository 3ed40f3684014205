"""What every netlink family here shares: message framing, the attribute codec, the
kernel's error answers (extended ack) and the socket.

Constants carry the names of ``linux/netlink.h``, so they can be checked against it
with grep. The families on top (:mod:`.rtnl`, :mod:`.nfnl`) add their own message
types and attributes, nothing of the wire format.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass

from ..errors import NetworkError

# linux/netlink.h
NETLINK_ROUTE = 0
NETLINK_NETFILTER = 12
SOL_NETLINK = 270
NETLINK_CAP_ACK = 10
NETLINK_EXT_ACK = 11
NLMSG_ERROR = 2
NLMSG_DONE = 3
NLMSG_MIN_TYPE = 0x10  # below it: control messages (NLMSG_ERROR, NLMSG_DONE...)
NLM_F_REQUEST = 0x1
NLM_F_MULTI = 0x2
NLM_F_ACK = 0x4
NLM_F_DUMP_INTR = 0x10
# Modifiers of GET requests
NLM_F_DUMP = 0x300
# Modifiers of NEW requests
NLM_F_EXCL = 0x200
NLM_F_CREATE = 0x400
NLM_F_APPEND = 0x800
# Modifiers of DELETE requests
NLM_F_NONREC = 0x100  # fail with EBUSY rather than remove what the object holds
# Flags of an NLMSG_ERROR (ACK) message
NLM_F_CAPPED = 0x100  # the request is not echoed, only its header
NLM_F_ACK_TLVS = 0x200  # extended ack attributes follow
NLMSGERR_ATTR_MSG = 1
NLA_F_NESTED = 0x8000
NLA_TYPE_MASK = ~(NLA_F_NESTED | 0x4000) & 0xFFFF  # without NLA_F_NET_BYTEORDER too

HEADER = struct.Struct("=IHHII")  # struct nlmsghdr: len, type, flags, seq, pid
ATTR = struct.Struct("=HH")  # struct nlattr: len, type
RECV_BUFFER = 1 << 16  # the kernel never builds a dump skb larger than 32 KiB
# <asm-generic/socket.h>; not in Python's socket module.
SO_SNDBUFFORCE, SO_RCVBUFFORCE = 32, 33

NEEDS_CAP_NET_ADMIN = "JobCage needs root (CAP_NET_ADMIN)"


class NetlinkError(OSError):
    """A request the kernel refused: ``errno`` is the error, ``what`` the request in
    words, ``kernel_message`` the kernel's extended ack text, if it gave one, and
    ``request`` the request itself, when known."""

    def __init__(
        self, code: int, what: str, kernel_message: str = "", request: Request | None = None
    ) -> None:
        text = os.strerror(code)
        if kernel_message:
            text += f" ({kernel_message})"
        super().__init__(code, text)
        self.code = code
        self.what = what
        self.kernel_message = kernel_message
        self.request = request

    def __str__(self) -> str:
        return f"{self.what}: {self.strerror}"


def network_error(e: OSError, what: str | None = None) -> NetworkError:
    """A refused netlink request (or a failed socket) as JobCage's error, ``what``
    before the request's own words; a permission error says what is missing (the one
    place that does, for every family)."""
    text = f"{what}: {e}" if what else str(e)
    if e.errno in (errno.EPERM, errno.EACCES):
        return NetworkError(f"{text}; {NEEDS_CAP_NET_ADMIN}")
    return NetworkError(text)


@dataclass(frozen=True)
class Request:
    """One message to send: its type, its flags beyond NLM_F_REQUEST (and NLM_F_ACK,
    which the sender adds), its body after the header, and ``what`` it is in words,
    for errors."""

    kind: int
    flags: int
    body: bytes
    what: str

    @property
    def is_dump(self) -> bool:
        return self.flags & NLM_F_DUMP == NLM_F_DUMP


# -- encoding -------------------------------------------------------------------------


def message(kind: int, flags: int, seq: int, body: bytes) -> bytes:
    """One request on the wire (NLM_F_REQUEST added), padded to 4 bytes."""
    out = HEADER.pack(HEADER.size + len(body), kind, NLM_F_REQUEST | flags, seq, 0) + body
    return out + b"\0" * (-len(out) % 4)


def attr(kind: int, data: bytes) -> bytes:
    body = ATTR.pack(4 + len(data), kind) + data
    return body + b"\0" * (-len(body) % 4)


def attr_str(kind: int, text: str) -> bytes:
    return attr(kind, text.encode() + b"\0")


def attr_u32(kind: int, value: int) -> bytes:
    """In host byte order (rtnetlink's); nf_tables' are big-endian: :func:`attr_be32`."""
    return attr(kind, struct.pack("=I", value))


def attr_be32(kind: int, value: int) -> bytes:
    return attr(kind, struct.pack(">I", value & 0xFFFFFFFF))


def nest(kind: int, *children: bytes) -> bytes:
    return attr(kind | NLA_F_NESTED, b"".join(children))


# -- decoding -------------------------------------------------------------------------


def messages(data: bytes) -> Iterator[tuple[int, int, int, bytes]]:
    """(type, flags, seq, whole message) of each netlink message in ``data``."""
    at = 0
    while at + HEADER.size <= len(data):
        length, kind, flags, seq, _ = HEADER.unpack_from(data, at)
        if length < HEADER.size or at + length > len(data):
            raise ValueError(f"malformed netlink message at byte {at} (length {length})")
        yield kind, flags, seq, data[at : at + length]
        at += (length + 3) & ~3


def attrs(data: bytes, at: int = 0) -> dict[int, bytes]:
    """The attributes in ``data`` from ``at`` on, by type (the nested flag dropped);
    the first of each type wins."""
    found: dict[int, bytes] = {}
    while at + ATTR.size <= len(data):
        length, kind = ATTR.unpack_from(data, at)
        if length < ATTR.size:
            break
        found.setdefault(kind & NLA_TYPE_MASK, data[at + ATTR.size : at + length])
        at += (length + 3) & ~3
    return found


def each(data: bytes) -> Iterator[bytes]:
    """The payload of every attribute in a nested list (all of one type)."""
    at = 0
    while at + ATTR.size <= len(data):
        length = ATTR.unpack_from(data, at)[0]
        if length < ATTR.size:
            break
        yield data[at + ATTR.size : at + length]
        at += (length + 3) & ~3


def u32(data: bytes) -> int:
    return struct.unpack_from("=I", data)[0]


def text(data: bytes | None) -> str:
    return (data or b"").split(b"\0", 1)[0].decode(errors="replace")


def error_of(message: bytes, flags: int) -> tuple[int, str]:
    """The errno (positive, 0 for an ack) and the kernel's text of an NLMSG_ERROR."""
    (error,) = struct.unpack_from("=i", message, HEADER.size)
    found = ""
    if error and flags & NLM_F_ACK_TLVS:
        if flags & NLM_F_CAPPED:
            echoed = HEADER.size
        else:
            (echoed,) = struct.unpack_from("=I", message, HEADER.size + 4)
        tlvs = attrs(message, HEADER.size + 4 + ((echoed + 3) & ~3))
        found = text(tlvs.get(NLMSGERR_ATTR_MSG))
    return -error, found


# -- the socket -----------------------------------------------------------------------


def open_socket(protocol: int, buffer: int | None = None) -> socket.socket:
    """A netlink socket of ``protocol`` in the calling thread's netns (it stays there,
    whatever the thread does afterwards), bound, whose errors carry the kernel's
    explanation and not a copy of the request; with ``buffer``, send and receive
    buffers of that size (forced past the sysctl limits where allowed)."""
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, protocol)
    try:
        for option in (NETLINK_EXT_ACK, NETLINK_CAP_ACK):
            with contextlib.suppress(OSError):  # older kernels: plain errors
                sock.setsockopt(SOL_NETLINK, option, 1)
        if buffer is not None:
            sizes = ((SO_SNDBUFFORCE, socket.SO_SNDBUF), (SO_RCVBUFFORCE, socket.SO_RCVBUF))
            for force, plain in sizes:
                try:
                    sock.setsockopt(socket.SOL_SOCKET, force, buffer)
                except PermissionError:
                    sock.setsockopt(socket.SOL_SOCKET, plain, buffer)
        sock.bind((0, 0))
    except BaseException:
        sock.close()
        raise
    return sock

"""Talking nf_tables to the kernel: transactions sent and every acknowledgement read,
objects read back one at a time or dumped, over one socket kept open per network
namespace. Errors come back as :class:`~.core.NetlinkError` saying which message of
the batch failed.

Facts of nfnetlink that shape it:

* A batch (BATCH_BEGIN ... BATCH_END) is one transaction: all or nothing, processed
  in the sender's sendmsg() call, so every reply is queued when sendmsg returns.
* Missing expression modules are loaded by the kernel, which then replays the batch
  itself.
* ``NLM_F_NONREC`` on a delete makes it fail with EBUSY instead of recursing: that is
  how "remove the shared table only if no cage uses it" is one atomic transaction.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import struct
import threading
from collections.abc import Iterator, Sequence

from .core import (
    ATTR,
    HEADER,
    NETLINK_NETFILTER,
    NLM_F_DUMP,
    NLMSG_DONE,
    NLMSG_ERROR,
    NetlinkError,
    Request,
    attr_be32,
    attr_str,
    attrs,
    each,
    error_of,
    messages,
    open_socket,
    text,
)
from .core import message as framed
from .nfexpr import NFTA_EXPR_DATA, NFTA_EXPR_NAME, NFTA_LOOKUP_SET
from .nfnl import (
    NFNL_SUBSYS_NFTABLES,
    NFT_MSG_GETCHAIN,
    NFT_MSG_GETGEN,
    NFT_MSG_GETOBJ,
    NFT_MSG_GETRULE,
    NFT_MSG_GETSET,
    NFT_MSG_GETSETELEM,
    NFT_MSG_GETTABLE,
    NFT_OBJECT_COUNTER,
    NFTA_CHAIN_NAME,
    NFTA_CHAIN_TABLE,
    NFTA_COUNTER_BYTES,
    NFTA_COUNTER_PACKETS,
    NFTA_DATA_VALUE,
    NFTA_OBJ_DATA,
    NFTA_OBJ_NAME,
    NFTA_OBJ_TABLE,
    NFTA_OBJ_TYPE,
    NFTA_OBJ_USE,
    NFTA_RULE_CHAIN,
    NFTA_RULE_EXPRESSIONS,
    NFTA_RULE_HANDLE,
    NFTA_RULE_TABLE,
    NFTA_SET_ELEM_KEY,
    NFTA_SET_ELEM_LIST_ELEMENTS,
    NFTA_SET_ELEM_LIST_SET,
    NFTA_SET_ELEM_LIST_TABLE,
    NFTA_SET_NAME,
    NFTA_SET_TABLE,
    NFTA_TABLE_NAME,
    NFTA_TABLE_USE,
    NFTA_TABLE_USERDATA,
    NFTNL_UDATA_TABLE_COMMENT,
    batch_bytes,
    nfgen,
    obj_key,
)

# A cage's batch grows with its campus list (two rules per network) and the kernel
# acks every message inside sendmsg: with the default buffers a list of ~120 networks
# overflows them (EMSGSIZE on send, or acks dropped with ENOBUFS after the commit). nft
# sizes its socket to the batch the same way. A limit, not an allocation: room for a
# 300-network campus list.
SOCKET_BUFFER = 8 << 20


class _Channel:
    """One nfnetlink socket kept open, for the network namespace it was made in.

    Kept because closing a socket that changed nf_tables waits (measured here: close()
    9.4 ms after a delete, so a remove cost 11 ms instead of 0.1); by our reading, the
    kernel's NETLINK_URELEASE handler (nft_rcv_nl_event) flushes the pending
    transaction cleanup, holding the ruleset's commit mutex. libnftables
    keeps its socket for the same reason. One slot: a thread in another netns replaces
    it (paying that wait once), so no socket pins a netns that was meant to go.
    """

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.sock: socket.socket | None = None
        self.netns: tuple[int, int] | None = None
        self.seq = 0
        os.register_at_fork(after_in_child=self._forget)

    def _forget(self) -> None:
        # The child's copy would share the parent's port: replies could go to either.
        self.lock = threading.RLock()
        if self.sock is not None:
            self.sock.detach()
        self.sock, self.netns = None, None

    @contextlib.contextmanager
    def use(self) -> Iterator[socket.socket]:
        st = os.stat("/proc/thread-self/ns/net")
        here = (st.st_dev, st.st_ino)
        with self.lock:
            if self.sock is None or self.netns != here:
                self.close()
                self.sock, self.netns = open_socket(NETLINK_NETFILTER, SOCKET_BUFFER), here
            sock = self.sock
            try:
                while True:  # answers left by an interrupted call
                    sock.recv(1 << 16, socket.MSG_DONTWAIT)
            except BlockingIOError:
                pass
            try:
                yield sock
            except OSError as e:
                if not isinstance(e, NetlinkError):
                    self.close()  # in an unknown state: start afresh next time
                raise

    def next_seq(self, n: int = 1) -> int:
        """The first of ``n`` consecutive sequence numbers (call holding the lock)."""
        first = self.seq + 1
        self.seq = (self.seq + n) % 0x7FFFFFFF
        return first

    def close(self) -> None:
        with self.lock:
            if self.sock is not None:
                self.sock.close()
            self.sock, self.netns = None, None


_channel = _Channel()


def close() -> None:
    """Close the kept socket (tests and benchmarks do, before a netns of theirs goes)."""
    _channel.close()


def _messages(data: bytes) -> Iterator[tuple[int, int, int, bytes, bytes]]:
    """(type, flags, seq, payload, whole message) of each message in one datagram."""
    for kind, flags, seq, message in messages(data):
        yield kind, flags, seq, message[16:], message


def transact(messages: Sequence[Request]) -> None:
    """Send ``messages`` as one nf_tables transaction; raise NetlinkError for the first
    message the kernel refused (then nothing of the batch was applied)."""
    if not messages:
        return
    try:
        _transact(messages)
    except NetlinkError:
        raise
    except OSError as e:
        # The socket failed under the batch (ENOBUFS: answers dropped): whether the
        # kernel committed it is unknown, and the caller must look.
        code = e.errno or errno.EIO
        raise NetlinkError(code, "the nf_tables transaction", f"outcome unknown: {e}") from e


def _transact(messages: Sequence[Request]) -> None:
    with _channel.use() as sock:
        first = _channel.next_seq(len(messages) + 2)
        by_seq = {first + i: msg for i, msg in enumerate(messages, 1)}
        sock.sendall(batch_bytes(messages, first))
        pending = set(by_seq)
        failure: NetlinkError | None = None
        batch_failure: NetlinkError | None = None
        # The kernel answers every message (ack or error) inside sendmsg, so what is
        # not queued now will not come; all of it is read, the batch's own error too.
        while True:
            try:
                data = sock.recv(1 << 16, socket.MSG_DONTWAIT)
            except BlockingIOError:
                break
            for kind, flags, seq, _payload, message in _messages(data):
                if kind != NLMSG_ERROR:
                    continue
                if seq == first:
                    # On the batch's begin: the batch as a whole was refused (EPERM) or
                    # its commit failed (ENOMEM) after every message was acked with 0.
                    code, detail = error_of(message, flags)
                    if code:
                        batch_failure = NetlinkError(code, "the nf_tables transaction", detail)
                    continue
                if seq not in pending:
                    continue
                pending.discard(seq)
                code, detail = error_of(message, flags)
                if code and failure is None:
                    failure = NetlinkError(code, by_seq[seq].what, detail)
    if failure is not None:
        raise failure
    if batch_failure is not None:
        raise batch_failure
    if pending:
        raise NetlinkError(errno.EIO, "the nf_tables transaction", "not every message answered")


def _request(sock: socket.socket, kind: int, flags: int, body: bytes) -> int:
    seq = _channel.next_seq()
    sock.sendall(framed((NFNL_SUBSYS_NFTABLES << 8) | kind, flags, seq, nfgen() + body))
    return seq


def get_counters(table: str, names: Sequence[str]) -> list[tuple[int, int] | None]:
    """(packets, bytes) of each named counter, None where it does not exist: one
    NFT_MSG_GETOBJ each, all sent before any answer is read (a hash lookup each in the
    kernel, whatever else the table holds)."""
    out: list[tuple[int, int] | None] = [None] * len(names)
    with _channel.use() as sock:
        index = {}
        for i, name in enumerate(names):
            index[_request(sock, NFT_MSG_GETOBJ, 0, obj_key(table, name))] = i
        while index:
            data = sock.recv(1 << 16)
            for kind, flags, seq, payload, message in _messages(data):
                i = index.pop(seq, None)
                if i is None:
                    continue
                if kind == NLMSG_ERROR:
                    code, detail = error_of(message, flags)
                    if code in (errno.ENOENT, 0):
                        continue
                    raise NetlinkError(code, f"reading counter {names[i]}", detail)
                out[i] = _counter_of(attrs(payload, 4))
    return out


def object_use(table: str, name: str) -> int | None:
    """How many rules and set elements refer to the counter object ``name`` (None: no
    such object or table): one NFT_MSG_GETOBJ."""
    found = _get(NFT_MSG_GETOBJ, obj_key(table, name), f"counter {name}")
    return None if found is None else struct.unpack(">I", found[NFTA_OBJ_USE])[0]


def _get(kind: int, body: bytes, what: str) -> dict[int, bytes] | None:
    """The attributes of the one object a GET names (None: no such object)."""
    with _channel.use() as sock:
        mkind, flags, payload, message = _reply(sock, _request(sock, kind, 0, body))
    if mkind == NLMSG_ERROR:
        code, detail = error_of(message, flags)
        if code == errno.ENOENT:
            return None
        raise NetlinkError(code or errno.EIO, what, detail)
    return attrs(payload, 4)


def _counter_of(obj: dict[int, bytes]) -> tuple[int, int]:
    """(packets, bytes) of a counter object's attributes."""
    data = attrs(obj.get(NFTA_OBJ_DATA, b""))
    packets = (
        struct.unpack(">Q", data[NFTA_COUNTER_PACKETS])[0] if NFTA_COUNTER_PACKETS in data else 0
    )
    nbytes = struct.unpack(">Q", data[NFTA_COUNTER_BYTES])[0] if NFTA_COUNTER_BYTES in data else 0
    return packets, nbytes


def _dump_spans(kind: int, body: bytes) -> Iterator[tuple[bytes, int, int]]:
    """(datagram, start, end) of the attributes of every object a dump returns, not
    parsed (a caller that wants a few attributes of thousands of objects reads them
    in place); nothing if the table is missing."""
    with _channel.use() as sock:
        seq = _request(sock, kind, NLM_F_DUMP, body)
        while True:
            data = sock.recv(1 << 20)
            at = 0
            while at + HEADER.size <= len(data):
                length, mkind, flags, mseq, _pid = HEADER.unpack_from(data, at)
                if length < HEADER.size or at + length > len(data):
                    raise NetlinkError(errno.EIO, "listing nf_tables objects", "bad message")
                if mseq == seq:
                    if mkind == NLMSG_DONE:
                        return
                    if mkind == NLMSG_ERROR:
                        code, detail = error_of(data[at : at + length], flags)
                        if code in (0, errno.ENOENT):
                            return
                        raise NetlinkError(code, "listing nf_tables objects", detail)
                    yield data, at + 20, at + length  # after nlmsghdr and nfgenmsg
                at += (length + 3) & ~3


def _dump(kind: int, body: bytes) -> Iterator[dict[int, bytes]]:
    """Attributes of every object a dump returns; nothing if the table is missing."""
    for data, start, end in _dump_spans(kind, body):
        yield attrs(data[start:end])


_U64 = struct.Struct(">Q")


def dump_counters(table: str) -> dict[str, tuple[int, int]]:
    """name -> (packets, bytes) of every counter object in ``table``: one dump, read
    in place (parsing each object's attributes into dicts cost 8 µs per counter,
    measured: 24 ms for 3000; this reads the three it needs)."""
    body = attr_str(NFTA_OBJ_TABLE, table) + attr_be32(NFTA_OBJ_TYPE, NFT_OBJECT_COUNTER)
    wanted = table.encode()
    out = {}
    unpack, u64 = ATTR.unpack_from, _U64.unpack_from
    for data, at, end in _dump_spans(NFT_MSG_GETOBJ, body):
        name = owner = None
        packets = nbytes = 0
        while at + 4 <= end:
            length, kind = unpack(data, at)
            if length < 4:
                break
            kind &= 0x3FFF
            if kind == NFTA_OBJ_NAME:
                name = data[at + 4 : at + length].rstrip(b"\0")
            elif kind == NFTA_OBJ_TABLE:
                owner = data[at + 4 : at + length].rstrip(b"\0")
            elif kind == NFTA_OBJ_DATA:
                inner, inner_end = at + 4, at + length
                while inner + 4 <= inner_end:
                    ilen, ikind = unpack(data, inner)
                    if ilen < 4:
                        break
                    if ikind == NFTA_COUNTER_BYTES:
                        nbytes = u64(data, inner + 4)[0]
                    elif ikind == NFTA_COUNTER_PACKETS:
                        packets = u64(data, inner + 4)[0]
                    inner += (ilen + 3) & ~3
            at += (length + 3) & ~3
        if owner == wanted and name is not None:
            out[name.decode(errors="replace")] = (packets, nbytes)
    return out


def dump_rules(table: str, chain: str) -> list[tuple[int, list[str]]]:
    """(handle, names of the sets it looks up) of every rule of ``chain``."""
    out = []
    body = attr_str(NFTA_RULE_TABLE, table) + attr_str(NFTA_RULE_CHAIN, chain)
    for a in _dump(NFT_MSG_GETRULE, body):
        if text(a.get(NFTA_RULE_TABLE)) != table or text(a.get(NFTA_RULE_CHAIN)) != chain:
            continue
        sets = []
        for raw in each(a.get(NFTA_RULE_EXPRESSIONS, b"")):
            e = attrs(raw)
            if text(e.get(NFTA_EXPR_NAME)) == "lookup":
                sets.append(text(attrs(e.get(NFTA_EXPR_DATA, b"")).get(NFTA_LOOKUP_SET)))
        out.append((struct.unpack(">Q", a[NFTA_RULE_HANDLE])[0], sets))
    return out


def dump_sets(table: str) -> list[str]:
    """Names of every named set and map in ``table``."""
    return [
        text(a.get(NFTA_SET_NAME))
        for a in _dump(NFT_MSG_GETSET, attr_str(NFTA_SET_TABLE, table))
        if text(a.get(NFTA_SET_TABLE)) == table and not a.get(NFTA_SET_NAME, b"").startswith(b"__")
    ]


def dump_keys(table: str, set_name: str) -> list[bytes]:
    """The key of every element of one set."""
    body = attr_str(NFTA_SET_ELEM_LIST_TABLE, table) + attr_str(NFTA_SET_ELEM_LIST_SET, set_name)
    keys = []
    for a in _dump(NFT_MSG_GETSETELEM, body):
        for raw in each(a.get(NFTA_SET_ELEM_LIST_ELEMENTS, b"")):
            key = attrs(attrs(raw).get(NFTA_SET_ELEM_KEY, b"")).get(NFTA_DATA_VALUE)
            if key is not None:
                keys.append(key)
    return keys


def set_exists(table: str, name: str) -> bool:
    """One NFT_MSG_GETSET (a hash lookup in the kernel)."""
    body = attr_str(NFTA_SET_TABLE, table) + attr_str(NFTA_SET_NAME, name)
    return _get(NFT_MSG_GETSET, body, f"set {name}") is not None


def dump_chains(table: str) -> list[str]:
    """Names of every chain in ``table`` (empty if it does not exist)."""
    return [
        text(a.get(NFTA_CHAIN_NAME))
        for a in _dump(NFT_MSG_GETCHAIN, attr_str(NFTA_CHAIN_TABLE, table))
        if text(a.get(NFTA_CHAIN_TABLE)) == table
    ]


def table_use(table: str) -> int | None:
    """How many chains, sets and objects ``table`` holds (None: no such table). One
    NFT_MSG_GETTABLE: a way to learn "is this the first cage?" without a transaction
    that might abort (measured here: an aborted transaction costs 8-15 ms, by its
    duration an RCU grace period; a committed one 0.2 ms)."""
    found = _get(NFT_MSG_GETTABLE, attr_str(NFTA_TABLE_NAME, table), f"table ip {table}")
    return None if found is None else struct.unpack(">I", found[NFTA_TABLE_USE])[0]


def table_comment(table: str) -> str | None:
    """The comment of ``table`` ("" if it has none; None: no such table)."""
    found = _get(NFT_MSG_GETTABLE, attr_str(NFTA_TABLE_NAME, table), f"table ip {table}")
    if found is None:
        return None
    data = found.get(NFTA_TABLE_USERDATA, b"")
    at = 0
    while at + 2 <= len(data):
        kind, length = data[at], data[at + 1]
        if kind == NFTNL_UDATA_TABLE_COMMENT:
            return data[at + 2 : at + 2 + length].split(b"\0", 1)[0].decode(errors="replace")
        at += 2 + length
    return ""


def available() -> bool:
    """Whether this kernel speaks nf_tables. nfnetlink loads the module on the first
    request and answers EAGAIN to it, so a second try tells."""
    try:
        with _channel.use() as sock:
            for _attempt in range(2):
                kind, flags, _payload, message = _reply(
                    sock, _request(sock, NFT_MSG_GETGEN, 0, b"")
                )
                code = error_of(message, flags)[0] if kind == NLMSG_ERROR else 0
                if code != errno.EAGAIN:
                    return code == 0
    except OSError:
        pass
    return False


def _reply(sock: socket.socket, seq: int) -> tuple[int, int, bytes, bytes]:
    """(type, flags, payload, whole message) of the one answer to request ``seq``."""
    while True:
        for kind, flags, mseq, payload, message in _messages(sock.recv(1 << 16)):
            if mseq == seq:
                return kind, flags, payload, message

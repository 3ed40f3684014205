"""nf_tables over netlink: the few messages JobCage's nftables layout needs, and the
wire form of a transaction. Expressions are :mod:`.nfexpr`'s; sending, reading back
and the kept socket :mod:`.nfchannel`'s; framing and attributes :mod:`.core`'s.

Why not libnftables (the `nft` library) or pyroute2's NFTSocket:

* libnftables (1.0.x) reads the whole ruleset into its cache before every command,
  so one cage's change or counter read costs in proportion to the cages already on
  the node (measured here, N other cages: add+remove 0.6 ms at N = 0, 15 ms at 500,
  31 ms at 1000; reading one counter 0.3 → 51 → 96 ms). The kernel side is O(1).
* pyroute2's NFTSocket sends a batch but never reads the kernel's acknowledgements, so
  a failed transaction would pass unnoticed; and its expression builders cost more
  than the few bytes each expression is.

So the messages are built here, and :mod:`.nfchannel` reads every acknowledgement. The
layout (which chains, rules, maps) is :mod:`jobcage.network.firewall.nftables_layout`'s;
this module knows the wire only. Constants carry the names of
``linux/netfilter/nf_tables.h`` and ``linux/netfilter/nfnetlink.h``.
"""

from __future__ import annotations

import contextlib
import contextvars
import socket
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from .core import (
    NLM_F_ACK,
    NLM_F_APPEND,
    NLM_F_CREATE,
    NLM_F_EXCL,
    NLM_F_NONREC,
    NLMSG_MIN_TYPE,
    Request,
    attr,
    attr_be32,
    attr_str,
    nest,
)
from .core import (
    message as framed,
)

# linux/netfilter/nfnetlink.h
NFNL_MSG_BATCH_BEGIN = NLMSG_MIN_TYPE
NFNL_MSG_BATCH_END = NLMSG_MIN_TYPE + 1
NFNL_SUBSYS_NFTABLES = 10
NFPROTO_IPV4 = 2
NFPROTO_IPV6 = 10
NF_INET_LOCAL_IN, NF_INET_FORWARD, NF_INET_LOCAL_OUT, NF_INET_POST_ROUTING = 1, 2, 3, 4
# Verdicts (linux/netfilter.h, enum nft_verdicts).
NF_DROP, NF_ACCEPT, NFT_JUMP = 0, 1, -3

# enum nf_tables_msg_types
NFT_MSG_NEWTABLE, NFT_MSG_GETTABLE, NFT_MSG_DELTABLE = 0, 1, 2
NFT_MSG_NEWCHAIN, NFT_MSG_GETCHAIN, NFT_MSG_DELCHAIN = 3, 4, 5
NFT_MSG_NEWRULE, NFT_MSG_GETRULE, NFT_MSG_DELRULE = 6, 7, 8
NFT_MSG_NEWSET, NFT_MSG_GETSET, NFT_MSG_DELSET = 9, 10, 11
NFT_MSG_NEWSETELEM, NFT_MSG_GETSETELEM, NFT_MSG_DELSETELEM = 12, 13, 14
NFT_MSG_GETGEN = 16
NFT_MSG_NEWOBJ, NFT_MSG_GETOBJ, NFT_MSG_DELOBJ = 18, 19, 20

# Attributes (linux/netfilter/nf_tables.h)
NFTA_TABLE_NAME, NFTA_TABLE_FLAGS, NFTA_TABLE_USE, NFTA_TABLE_USERDATA = 1, 2, 3, 6
NFTNL_UDATA_TABLE_COMMENT = 0  # libnftnl's: `nft list` shows it
NFTA_CHAIN_TABLE, NFTA_CHAIN_NAME, NFTA_CHAIN_HOOK, NFTA_CHAIN_POLICY, NFTA_CHAIN_TYPE = (
    1,
    3,
    4,
    5,
    7,
)
NFTA_HOOK_HOOKNUM, NFTA_HOOK_PRIORITY = 1, 2
NFTA_RULE_TABLE, NFTA_RULE_CHAIN, NFTA_RULE_HANDLE, NFTA_RULE_EXPRESSIONS = 1, 2, 3, 4
NFTA_SET_TABLE, NFTA_SET_NAME, NFTA_SET_FLAGS, NFTA_SET_KEY_TYPE, NFTA_SET_KEY_LEN = 1, 2, 3, 4, 5
NFTA_SET_DESC, NFTA_SET_ID, NFTA_SET_USERDATA, NFTA_SET_OBJ_TYPE = 9, 10, 13, 15
NFTA_SET_DESC_CONCAT, NFTA_SET_FIELD_LEN = 2, 1
NFTNL_UDATA_SET_KEYBYTEORDER, NFT_BYTEORDER_HOST = 0, 1
NFTA_SET_ELEM_KEY, NFTA_SET_ELEM_FLAGS, NFTA_SET_ELEM_OBJREF = 1, 3, 9
NFT_SET_ELEM_INTERVAL_END = 0x1
NFTA_SET_ELEM_LIST_TABLE, NFTA_SET_ELEM_LIST_SET, NFTA_SET_ELEM_LIST_ELEMENTS = 1, 2, 3
NFTA_OBJ_TABLE, NFTA_OBJ_NAME, NFTA_OBJ_TYPE, NFTA_OBJ_DATA, NFTA_OBJ_USE = 1, 2, 3, 4, 5
NFTA_COUNTER_BYTES, NFTA_COUNTER_PACKETS = 1, 2
NFTA_LIST_ELEM = 1
NFTA_DATA_VALUE, NFTA_DATA_VERDICT = 1, 2
NFTA_VERDICT_CODE, NFTA_VERDICT_CHAIN = 1, 2

NFT_OBJECT_COUNTER = 1
NFT_SET_INTERVAL, NFT_SET_OBJECT, NFT_SET_CONCAT = 0x4, 0x40, 0x80
# nft's datatype ids, so that `nft list` prints keys and data as what they are; a
# concatenation's id is its parts' ids, 6 bits each (nft's TYPE_BITS).
TYPE_IPADDR, TYPE_IP6ADDR, TYPE_IFNAME = 7, 8, 41
IFNAMSIZ = 16

# -- attributes --------------------------------------------------------------------


def value(kind: int, data: bytes) -> bytes:
    return nest(kind, attr(NFTA_DATA_VALUE, data))


def verdict(kind: int, code: int, chain: str | None = None) -> bytes:
    inner = attr_be32(NFTA_VERDICT_CODE, code)
    if chain is not None:
        inner += attr_str(NFTA_VERDICT_CHAIN, chain)
    return nest(kind, nest(NFTA_DATA_VERDICT, inner))


def ifname(name: str) -> bytes:
    raw = name.encode()
    if len(raw) >= IFNAMSIZ:
        raise ValueError(f"interface name {name!r} is longer than {IFNAMSIZ - 1} bytes")
    return raw.ljust(IFNAMSIZ, b"\0")


# -- messages ----------------------------------------------------------------------


# The address family of the tables every message and query of the calling thread
# (context) is about: ``ip jobcage`` and ``ip6 jobcage`` are the same layout, told
# apart by this alone, so the builders here do not each take it.
_FAMILY: contextvars.ContextVar[int] = contextvars.ContextVar("nfproto", default=NFPROTO_IPV4)


@contextlib.contextmanager
def family(nfproto: int) -> Iterator[None]:
    """Address every message and query in the block to tables of ``nfproto``."""
    token = _FAMILY.set(nfproto)
    try:
        yield
    finally:
        _FAMILY.reset(token)


def nfgen(family: int | None = None, res_id: int = 0) -> bytes:
    nfproto = _FAMILY.get() if family is None else family
    return struct.pack("=BBH", nfproto, 0, socket.htons(res_id))


def new_table(table: str, *, exclusive: bool, comment: str = "") -> Request:
    body = attr_str(NFTA_TABLE_NAME, table) + attr_be32(NFTA_TABLE_FLAGS, 0)
    if comment:
        text = comment.encode()[:254] + b"\0"
        body += attr(NFTA_TABLE_USERDATA, bytes([NFTNL_UDATA_TABLE_COMMENT, len(text)]) + text)
    return Request(
        NFT_MSG_NEWTABLE,
        NLM_F_CREATE | (NLM_F_EXCL if exclusive else 0),
        body,
        f"table ip {table}",
    )


def del_table(table: str, *, only_if_empty: bool) -> Request:
    return Request(
        NFT_MSG_DELTABLE,
        NLM_F_NONREC if only_if_empty else 0,
        attr_str(NFTA_TABLE_NAME, table),
        f"table ip {table}",
    )


def new_chain(
    table: str,
    name: str,
    *,
    hook: int | None = None,
    priority: int = 0,
    chain_type: str = "filter",
    exclusive: bool = True,
) -> Request:
    body = attr_str(NFTA_CHAIN_TABLE, table) + attr_str(NFTA_CHAIN_NAME, name)
    if hook is not None:
        body += nest(
            NFTA_CHAIN_HOOK,
            attr_be32(NFTA_HOOK_HOOKNUM, hook),
            attr_be32(NFTA_HOOK_PRIORITY, priority),
        )
        body += attr_be32(NFTA_CHAIN_POLICY, NF_ACCEPT) + attr_str(NFTA_CHAIN_TYPE, chain_type)
    return Request(
        NFT_MSG_NEWCHAIN, NLM_F_CREATE | (NLM_F_EXCL if exclusive else 0), body, f"chain {name}"
    )


def del_chain(table: str, name: str) -> Request:
    """Removes the chain's rules with it (the kernel does, in the same transaction)."""
    return Request(
        NFT_MSG_DELCHAIN,
        0,
        attr_str(NFTA_CHAIN_TABLE, table) + attr_str(NFTA_CHAIN_NAME, name),
        f"chain {name}",
    )


def new_rule(table: str, chain: str, expressions: Sequence[bytes]) -> Request:
    body = (
        attr_str(NFTA_RULE_TABLE, table)
        + attr_str(NFTA_RULE_CHAIN, chain)
        + nest(NFTA_RULE_EXPRESSIONS, *expressions)
    )
    return Request(NFT_MSG_NEWRULE, NLM_F_CREATE | NLM_F_APPEND, body, f"a rule of chain {chain}")


def del_rule(table: str, chain: str, handle: int) -> Request:
    body = attr_str(NFTA_RULE_TABLE, table) + attr_str(NFTA_RULE_CHAIN, chain)
    body += attr(NFTA_RULE_HANDLE, struct.pack(">Q", handle))
    return Request(NFT_MSG_DELRULE, 0, body, f"rule {handle} of chain {chain}")


def _concat_type(types: Sequence[int]) -> int:
    out = 0
    for t in types:
        out = (out << 6) | t
    return out


def _register_len(length: int) -> int:
    return (length + 3) & ~3


def new_set(
    table: str,
    name: str,
    set_id: int,
    key: Sequence[tuple[int, int]],
    *,
    interval: bool = False,
    counters: bool = False,
) -> Request:
    """A set keyed by the concatenation of ``key``'s (nft type, length) fields; with
    ``counters``, a map from the key to a counter object's name."""
    kind = "map" if counters else "set"
    flags = (NFT_SET_INTERVAL if interval else 0) | (NFT_SET_OBJECT if counters else 0)
    body = attr_str(NFTA_SET_TABLE, table) + attr_str(NFTA_SET_NAME, name)
    body += attr_be32(NFTA_SET_KEY_TYPE, _concat_type([t for t, _ in key]))
    body += attr_be32(NFTA_SET_KEY_LEN, sum(_register_len(n) for _, n in key))
    body += attr_be32(NFTA_SET_ID, set_id)
    if len(key) > 1:
        flags |= NFT_SET_CONCAT
        fields = [nest(NFTA_LIST_ELEM, attr_be32(NFTA_SET_FIELD_LEN, n)) for _, n in key]
        body += nest(NFTA_SET_DESC, nest(NFTA_SET_DESC_CONCAT, *fields))
    elif key[0][0] == TYPE_IFNAME:
        # nft's user data: a string key is in host byte order (without it `nft list`
        # prints every ifname key as "").
        body += attr(
            NFTA_SET_USERDATA,
            bytes([NFTNL_UDATA_SET_KEYBYTEORDER, 4]) + struct.pack("=I", NFT_BYTEORDER_HOST),
        )
    if counters:
        body += attr_be32(NFTA_SET_OBJ_TYPE, NFT_OBJECT_COUNTER)
    body += attr_be32(NFTA_SET_FLAGS, flags)
    return Request(NFT_MSG_NEWSET, NLM_F_CREATE | NLM_F_EXCL, body, f"{kind} {name}")


def del_set(table: str, name: str, *, only_if_empty: bool) -> Request:
    return Request(
        NFT_MSG_DELSET,
        NLM_F_NONREC if only_if_empty else 0,
        attr_str(NFTA_SET_TABLE, table) + attr_str(NFTA_SET_NAME, name),
        f"set {name}",
    )


@dataclass(frozen=True)
class Element:
    """One element of a set: its key (in an interval set, where a range starts, or
    where it ends: ``interval_end``), and for a map its value or the name of the
    counter object it maps to."""

    key: bytes
    interval_end: bool = False
    counter: str | None = None

    def encode(self, with_value: bool) -> bytes:
        out = value(NFTA_SET_ELEM_KEY, self.key)
        if self.interval_end:
            out += attr_be32(NFTA_SET_ELEM_FLAGS, NFT_SET_ELEM_INTERVAL_END)
        if with_value and self.counter is not None:
            out += attr_str(NFTA_SET_ELEM_OBJREF, self.counter)
        return nest(NFTA_LIST_ELEM, out)


def _elements(table: str, set_name: str, elements: Sequence[Element], with_value: bool) -> bytes:
    return (
        attr_str(NFTA_SET_ELEM_LIST_TABLE, table)
        + attr_str(NFTA_SET_ELEM_LIST_SET, set_name)
        + nest(NFTA_SET_ELEM_LIST_ELEMENTS, *(e.encode(with_value) for e in elements))
    )


def new_elements(
    table: str,
    set_name: str,
    elements: Sequence[Element],
    *,
    exclusive: bool = True,
    what: str = "",
) -> Request:
    """Adds ``elements``; with ``exclusive`` an element already there fails the
    transaction (EEXIST), without it an identical one is left as it is."""
    return Request(
        NFT_MSG_NEWSETELEM,
        NLM_F_CREATE | (NLM_F_EXCL if exclusive else 0),
        _elements(table, set_name, elements, True),
        what or f"an element of set {set_name}",
    )


def del_elements(
    table: str, set_name: str, elements: Sequence[Element], what: str = ""
) -> Request:
    return Request(
        NFT_MSG_DELSETELEM,
        0,
        _elements(table, set_name, elements, False),
        what or f"an element of set {set_name}",
    )


def obj_key(table: str, name: str) -> bytes:
    return (
        attr_str(NFTA_OBJ_TABLE, table)
        + attr_str(NFTA_OBJ_NAME, name)
        + attr_be32(NFTA_OBJ_TYPE, NFT_OBJECT_COUNTER)
    )


def new_counter(table: str, name: str) -> Request:
    body = obj_key(table, name) + nest(NFTA_OBJ_DATA)
    return Request(NFT_MSG_NEWOBJ, NLM_F_CREATE | NLM_F_EXCL, body, f"counter {name}")


def del_counter(table: str, name: str) -> Request:
    return Request(NFT_MSG_DELOBJ, 0, obj_key(table, name), f"counter {name}")


def batch_bytes(messages: Sequence[Request], first: int = 1) -> bytes:
    """The wire form of one transaction: BATCH_BEGIN (sequence ``first``), each message
    (``first + 1`` ...) asking for an acknowledgement, BATCH_END."""
    batch = nfgen(0, NFNL_SUBSYS_NFTABLES)
    parts = [framed(NFNL_MSG_BATCH_BEGIN, 0, first, batch)]
    parts += [
        framed(
            (NFNL_SUBSYS_NFTABLES << 8) | msg.kind,
            NLM_F_ACK | msg.flags,
            first + i,
            nfgen() + msg.body,
        )
        for i, msg in enumerate(messages, 1)
    ]
    parts.append(framed(NFNL_MSG_BATCH_END, 0, first + len(messages) + 1, batch))
    return b"".join(parts)

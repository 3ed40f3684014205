"""Reading per-rule counters straight from the kernel's x_tables blob.

Why not libiptc (python-iptables) for reads: ``iptc_init`` copies the whole table from
the kernel (IPT_SO_GET_ENTRIES; there is no per-rule or per-chain read in x_tables) and
then parses every entry of every chain into its own cache, in C but entry by entry, so
reading one cage's counters costs in proportion to every cage's rules. Here the copy is
the only O(table) step: a user-defined chain starts with an ``ERROR`` entry whose data
is the chain's name, and jumps in the kernel's blob are offsets, not names, so
``bytes.find`` (memchr speed) locates a chain's head; its rules follow, up to the
chain's implicit RETURN entry before the next head. Nothing else is decoded.

Struct offsets are the kernel ABI of ``linux/netfilter_ipv4/ip_tables.h`` and
``linux/netfilter/x_tables.h``, stable since 2.4 (iptables-legacy relies on the same).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import socket
import struct
from collections.abc import Iterable, Sequence

SOL_IP = 0
IPT_SO_GET_INFO = 64
IPT_SO_GET_ENTRIES = 65
XT_TABLE_MAXNAMELEN = 32
XT_FUNCTION_MAXNAMELEN = 30

# struct ipt_getinfo: name[32], valid_hooks, hook_entry[5], underflow[5], num_entries,
# size -- all unsigned int.
_GETINFO = struct.Struct(f"={XT_TABLE_MAXNAMELEN}sI5I5III")
# struct ipt_get_entries: name[32], size; entrytable[] starts 8-aligned (ipt_entry
# holds u64 counters).
_GET_ENTRIES_HEADER = 40
# struct ipt_entry: ipt_ip (84 bytes), nfcache u32, target_offset u16, next_offset u16,
# comefrom u32, then struct xt_counters {u64 pcnt, bcnt} at 96.
_OFFSETS = struct.Struct("=HH")
_OFFSETS_AT = 88
_COUNTERS = struct.Struct("=QQ")
_COUNTERS_AT = 96
# struct xt_entry_target: u16 target_size, char name[29], u8 revision, then data.
_TARGET_NAME_AT = 2
_TARGET_DATA_AT = 32
_ERROR_TARGET = b"ERROR".ljust(29, b"\0")

# IPT_SO_GET_ENTRIES fails with EAGAIN when the table changed between GET_INFO and it.
_RETRIES = 10

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.getsockopt.argtypes = (
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_void_p,
    ctypes.POINTER(ctypes.c_uint),
)


def read_table(name: str = "filter") -> bytes:
    """The entries of table ``name`` of the calling thread's netns, with counters, as
    the kernel lays them out. One GET_INFO and one GET_ENTRIES; raises OSError."""
    encoded = name.encode().ljust(XT_TABLE_MAXNAMELEN, b"\0")
    # A raw socket belongs to the netns of the thread that made it: the node's.
    with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW) as sock:
        fd = sock.fileno()
        for _ in range(_RETRIES):
            info = ctypes.create_string_buffer(encoded, _GETINFO.size)
            length = ctypes.c_uint(_GETINFO.size)
            if _libc.getsockopt(fd, SOL_IP, IPT_SO_GET_INFO, info, ctypes.byref(length)):
                err = ctypes.get_errno()
                raise OSError(err, f"IPT_SO_GET_INFO {name}: {os.strerror(err)}")
            size = _GETINFO.unpack(info.raw)[-1]
            buf = ctypes.create_string_buffer(_GET_ENTRIES_HEADER + size)
            struct.pack_into(f"={XT_TABLE_MAXNAMELEN}sI", buf, 0, encoded, size)
            length = ctypes.c_uint(_GET_ENTRIES_HEADER + size)
            if _libc.getsockopt(fd, SOL_IP, IPT_SO_GET_ENTRIES, buf, ctypes.byref(length)):
                err = ctypes.get_errno()
                if err == errno.EAGAIN:
                    continue
                raise OSError(err, f"IPT_SO_GET_ENTRIES {name}: {os.strerror(err)}")
            return buf.raw[_GET_ENTRIES_HEADER:]
    raise OSError(errno.EAGAIN, f"the {name} table kept changing while being read")


def _head_offset(blob: bytes, chain: str) -> int | None:
    """Offset of the ERROR entry that starts user chain ``chain``, or None."""
    needle = chain.encode() + b"\0"
    start = 0
    while True:
        at = blob.find(needle, start)
        if at < 0:
            return None
        # A match counts only as the data of an ERROR target: check the target name
        # right before it, so an interface or comment that happens to hold the same
        # text is never taken for the head.
        target = at - _TARGET_DATA_AT
        if target >= 0 and blob[target + _TARGET_NAME_AT : at - 1] == _ERROR_TARGET:
            entry = _entry_of_target(blob, target)
            if entry is not None:
                return entry
        start = at + 1


def _entry_of_target(blob: bytes, target: int) -> int | None:
    """The entry whose target starts at ``target``: ERROR entries have no matches, so
    the entry starts 112 bytes (sizeof ipt_entry) before it; checked by its offsets."""
    entry = target - 112
    if entry < 0:
        return None
    target_offset, _ = _OFFSETS.unpack_from(blob, entry + _OFFSETS_AT)
    return entry if target_offset == 112 else None


def chain_heads(blob: bytes) -> dict[str, int]:
    """Chain name -> offset of its head, for every user chain: one scan of the blob for
    ERROR targets (memchr speed) plus a few Python steps per chain."""
    heads: dict[str, int] = {}
    start = 0
    while True:
        at = blob.find(_ERROR_TARGET, start)
        if at < 0:
            return heads
        start = at + 1
        target = at - _TARGET_NAME_AT
        entry = _entry_of_target(blob, target) if target >= 0 else None
        if entry is None:
            continue
        data = blob[target + _TARGET_DATA_AT : target + _TARGET_DATA_AT + XT_FUNCTION_MAXNAMELEN]
        heads[data.split(b"\0", 1)[0].decode(errors="replace")] = entry


def chain_counters(
    blob: bytes, chain: str, heads: dict[str, int] | None = None
) -> list[tuple[int, int]] | None:
    """(packets, bytes) of each rule of user chain ``chain`` in order, or None if the
    chain is not in the table. ``heads`` (from :func:`chain_heads`) saves the search
    when many chains are read from one blob."""
    head = heads.get(chain) if heads is not None else _head_offset(blob, chain)
    if head is None:
        return None
    _, next_offset = _OFFSETS.unpack_from(blob, head + _OFFSETS_AT)
    at = head + next_offset
    found: list[tuple[int, int]] = []
    while at < len(blob):
        target_offset, next_offset = _OFFSETS.unpack_from(blob, at + _OFFSETS_AT)
        name = blob[at + target_offset + _TARGET_NAME_AT : at + target_offset + 31]
        if name == _ERROR_TARGET:
            break  # the next chain's head (or the table's final ERROR entry)
        found.append(_COUNTERS.unpack_from(blob, at + _COUNTERS_AT))
        at += next_offset
    # The last entry before the next head is the chain's implicit RETURN (its policy
    # counter in iptables -L terms), not a rule of ours.
    return found[:-1]


def counters_of_chains(
    chains: Iterable[Sequence[str]], table: str = "filter"
) -> list[list[list[tuple[int, int]] | None]]:
    """For each group of chain names, the counters of each chain, from ONE read of the
    table: what a monitoring pass over every cage needs."""
    blob = read_table(table)
    heads = chain_heads(blob)
    return [[chain_counters(blob, name, heads) for name in group] for group in chains]


# struct xt_entry_match: u16 match_size, char name[29], u8 revision, then data; the
# comment match's data is char comment[256].
_MATCHES_AT = 112  # sizeof(struct ipt_entry)
_COMMENT_MATCH = b"comment".ljust(29, b"\0")


def first_rule_comment(blob: bytes, chain: str) -> str | None:
    """The `-m comment` text of the first rule of user chain ``chain`` ("" if it has
    none; None if the chain is not there or empty)."""
    head = _head_offset(blob, chain)
    if head is None:
        return None
    _, next_offset = _OFFSETS.unpack_from(blob, head + _OFFSETS_AT)
    rule = head + next_offset
    target_offset, _ = _OFFSETS.unpack_from(blob, rule + _OFFSETS_AT)
    if blob[rule + target_offset + _TARGET_NAME_AT : rule + target_offset + 31] == _ERROR_TARGET:
        return None
    at = rule + _MATCHES_AT
    while at < rule + target_offset:
        (size,) = struct.unpack_from("=H", blob, at)
        if size < _TARGET_DATA_AT:
            break
        if blob[at + _TARGET_NAME_AT : at + _TARGET_NAME_AT + 29] == _COMMENT_MATCH:
            data = blob[at + _TARGET_DATA_AT : at + _TARGET_DATA_AT + 256]
            return data.split(b"\0", 1)[0].decode(errors="replace")
        at += size
    return ""


# struct xt_standard_target: a target of size 40 with an empty name and revision 0,
# then int verdict; a jump's verdict is the offset of the first rule of its chain (just
# past the chain's ERROR head: libiptc's IPTCB_chain_start_size).
_STANDARD_TARGET = struct.pack("=H", 40) + b"\0" * 30


def jumps_present(blob: bytes, chains: Sequence[str], heads: dict[str, int] | None = None) -> bool:
    """Whether some rule of the table jumps to each of ``chains`` (user chains): a
    flushed FORWARD or shared chain leaves our chains there, but unreached. A bytes
    search per chain for the standard target that carries its offset."""
    for name in chains:
        head = heads.get(name) if heads is not None else _head_offset(blob, name)
        if head is None:
            return False
        _, next_offset = _OFFSETS.unpack_from(blob, head + _OFFSETS_AT)
        if blob.find(_STANDARD_TARGET + struct.pack("=i", head + next_offset)) < 0:
            return False
    return True

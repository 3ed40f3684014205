"""Raw x_tables entries for rules, compiled once per shape and patched per cage.

Why: python-iptables builds every rule from Python objects, and ``create_target`` /
``create_match`` look up and initialise the xtables extension each time: ~0.3 ms a
rule, ~6 ms of the ~7 ms a cage's 17 rules cost (docs/performance.md). Yet the bytes
of an ``ipt_entry`` depend on the rule's *values* only at fixed places -- the source
and destination addresses and the interface names in ``struct ipt_ip``, and for a
jump the chain name in the target. So the first rule of each shape is rendered by
python-iptables (which keeps validating options and loading extensions) and kept as
bytes with its delete mask; later rules of that shape copy the bytes and write their
own values in. The masks, prefix lengths, flags, matches and target data of two rules
of one shape are identical by construction of the shape key.

Offsets: ``struct ipt_ip`` in linux/netfilter_ipv4/ip_tables.h (src 0, dst 4,
iniface 16, outiface 32, each interface IFNAMSIZ = 16 bytes) and
``struct xt_entry_target`` (name at +2, 29 bytes), kernel ABI since 2.4.
"""

from __future__ import annotations

import ctypes
import ipaddress
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .policy import CAGE_CHAIN_PREFIX, SHARED_PREFIX, RuleSpec

IFNAMSIZ = 16
_SRC_AT, _DST_AT, _IN_AT, _OUT_AT = 0, 4, 16, 32
_TARGET_OFFSET_AT = 88
_TARGET_NAME_AT = 2
XT_EXTENSION_MAXNAMELEN = 29


@dataclass(frozen=True)
class Entry:
    """One rule as libiptc takes it: the entry and the mask iptc_delete_entry uses."""

    entry: bytes
    mask: bytes

    def entry_buffer(self) -> Any:
        return (ctypes.c_ubyte * len(self.entry)).from_buffer_copy(self.entry)

    def mask_buffer(self) -> Any:
        return (ctypes.c_ubyte * len(self.mask)).from_buffer_copy(self.mask)


def is_chain_target(target: str) -> bool:
    """Our jumps target our chains; every other target is an xtables extension or a
    builtin verdict whose name is part of the shape."""
    return target.startswith((SHARED_PREFIX, CAGE_CHAIN_PREFIX))


def _prefix(cidr: str | None) -> int | None:
    return None if cidr is None else ipaddress.IPv4Network(cidr).prefixlen


def _interface_shape(name: str | None) -> object:
    # A wildcard ("jc+") masks fewer bytes than an exact name: keep it whole in the
    # key. Exact names differ only in the bytes written, if their lengths are equal.
    if name is None or name.endswith("+"):
        return name
    return len(name)


def shape(spec: RuleSpec) -> tuple[object, ...]:
    """What two rules must share for one's bytes to be the other's with values
    rewritten: everything but the addresses, exact interface names and jump chain."""
    return (
        "<chain>" if is_chain_target(spec.target) else spec.target,
        _prefix(spec.source),
        spec.source_inverted,
        _prefix(spec.destination),
        _interface_shape(spec.in_interface),
        _interface_shape(spec.out_interface),
        spec.ctstate,
        spec.reject_with,
        spec.comment,
    )


def _address(cidr: str) -> bytes:
    return ipaddress.IPv4Network(cidr).network_address.packed


def _patch(template: bytes, spec: RuleSpec) -> bytes:
    out = bytearray(template)
    if spec.source:
        out[_SRC_AT : _SRC_AT + 4] = _address(spec.source)
    if spec.destination:
        out[_DST_AT : _DST_AT + 4] = _address(spec.destination)
    if spec.in_interface and not spec.in_interface.endswith("+"):
        out[_IN_AT : _IN_AT + IFNAMSIZ] = spec.in_interface.encode().ljust(IFNAMSIZ, b"\0")
    if spec.out_interface and not spec.out_interface.endswith("+"):
        out[_OUT_AT : _OUT_AT + IFNAMSIZ] = spec.out_interface.encode().ljust(IFNAMSIZ, b"\0")
    if is_chain_target(spec.target):
        at = int.from_bytes(out[_TARGET_OFFSET_AT : _TARGET_OFFSET_AT + 2], "little")
        at += _TARGET_NAME_AT
        out[at : at + XT_EXTENSION_MAXNAMELEN] = spec.target.encode().ljust(
            XT_EXTENSION_MAXNAMELEN, b"\0"
        )
    return bytes(out)


class EntryCache:
    """Shape -> template, filled by ``render`` (a python-iptables rule for the spec,
    on the caller's table handle: a jump's chain must exist in it) the first time a
    shape is seen. Thread-safe; one per process, so the extension work is paid once
    per shape per process."""

    def __init__(self) -> None:
        self._templates: dict[tuple[object, ...], Entry] = {}
        self._lock = threading.Lock()

    def get(self, spec: RuleSpec, render: Callable[[RuleSpec], Any]) -> Entry:
        key = shape(spec)
        with self._lock:
            template = self._templates.get(key)
        if template is None:
            rule = render(spec)
            rule.final_check()
            template = Entry(bytes(rule.rule), bytes(rule.mask))
            with self._lock:
                self._templates.setdefault(key, template)
            return template
        return Entry(_patch(template.entry, spec), template.mask)

    def clear(self) -> None:
        with self._lock:
            self._templates.clear()

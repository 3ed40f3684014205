"""python-iptables as the x_tables backend uses it: a private libiptc handle per
operation, libiptc's errors in JobCage's words, and rules added or deleted as the raw
entries :mod:`.xtables_compiled` makes (why: the docstring of :mod:`.xtables`)."""

from __future__ import annotations

import ctypes.util
import functools
import os
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from typing import Any

from ...errors import KernelFeatureError, NetworkError
from ...netlink.core import NEEDS_CAP_NET_ADMIN
from .policy import RuleSpec
from .xtables_compiled import Entry, EntryCache


@functools.cache
def _iptc() -> Any:
    """python-iptables, imported late (it runs modprobe and loads libiptc) and fast.

    At import it looks its libraries up with ctypes.util.find_library, which runs
    ``ldconfig -p`` for every name it tries, then gcc and ld for each it does not find
    (its own libxtwrapper is found on sys.path only after those fail); and it imports
    distutils.sysconfig, which under setuptools' distutils shim imports all of
    setuptools. Together ~0.14 s per `jobcage run` on an x_tables node
    (docs/performance.md). Both are answered here as python-iptables would answer
    them itself: names from one ``ldconfig -p`` listing, and its own fallback for a
    Python without distutils (3.12+)."""
    saved = ctypes.util.find_library
    blocked = "distutils.sysconfig" not in sys.modules
    ctypes.util.find_library = _library_finder()
    if blocked:
        sys.modules["distutils.sysconfig"] = None  # type: ignore[assignment]
    try:
        import iptc
    except (ImportError, OSError) as e:
        raise KernelFeatureError(
            f"python-iptables cannot load libiptc ({e}): install the `iptables` package "
            "(Debian/Ubuntu: apt-get install iptables)"
        ) from e
    finally:
        ctypes.util.find_library = saved
        if blocked:
            del sys.modules["distutils.sysconfig"]
    return iptc


def _library_finder() -> Callable[[str], str | None]:
    """find_library over one listing of the dynamic linker's cache: the soname of
    ``lib<name>.so*`` for this machine's ABI, as ctypes.util finds it, or None."""
    try:
        listing = subprocess.run(
            ["ldconfig", "-p"],
            capture_output=True,
            text=True,
            env={"LC_ALL": "C", "LANG": "C", "PATH": "/sbin:/usr/sbin:/usr/bin:/bin"},
            check=False,
        ).stdout
    except OSError:
        listing = ""
    bits = "64" if sys.maxsize > 2**32 else "32"
    abi = _ABI.get(f"{os.uname().machine}-{bits}", "libc6")

    def find(name: str) -> str | None:
        match = re.search(rf"\s(lib{re.escape(name)}\.\S+)\s+\({re.escape(abi)}[,)]", listing)
        return match.group(1) if match else None

    return find


# The ABI tag ldconfig -p prints per machine, as ctypes.util maps it ("libc6" otherwise).
_ABI = {
    "x86_64-64": "libc6,x86-64",
    "ppc64-64": "libc6,64bit",
    "sparc64-64": "libc6,64bit",
    "s390x-64": "libc6,64bit",
    "ia64-64": "libc6,IA-64",
}


def _table(name: str) -> Any:
    """A private libiptc handle on ``name`` in the calling thread's netns, bypassing
    python-iptables' process-wide per-name cache (see the module docstring)."""
    iptc = _iptc()
    table = object.__new__(iptc.Table)
    try:
        table._init(name, False)
    except iptc.IPTCError as e:
        raise _translate(e, f"opening the {name} table") from e
    return table


_MISSING_EXTENSION = (
    "the kernel lacks an iptables extension JobCage uses: enable CONFIG_IP_NF_IPTABLES_LEGACY, "
    "CONFIG_NETFILTER_XT_MATCH_CONNTRACK, CONFIG_IP_NF_TARGET_REJECT, CONFIG_IP_NF_NAT and "
    "CONFIG_IP_NF_TARGET_MASQUERADE, or load the modules ip_tables, iptable_filter, "
    "iptable_nat, xt_conntrack, ipt_REJECT and xt_MASQUERADE"
)


def _translate(e: BaseException, what: str) -> Exception:
    text = str(e)
    if "Table does not exist" in text or "No chain/target/match" in text:
        return KernelFeatureError(f"{what}: {text}; {_MISSING_EXTENSION}")
    if "Permission denied" in text or "Operation not permitted" in text:
        return NetworkError(f"{what}: {text}; {NEEDS_CAP_NET_ADMIN}")
    return NetworkError(f"{what}: {text}")


@functools.cache
def _rule_class() -> type:
    iptc = _iptc()

    class Rule(iptc.Rule):
        """A rule that resolves jump targets against *our* handle.

        python-iptables decides whether a target names a chain by asking
        ``Rule.tables``, which opens (and caches process-wide) a handle on every
        table, in whatever netns the first caller was in, and never refreshes them.
        """

        def __init__(self, table: Any) -> None:
            super().__init__()
            self._own_tables = [table]

        @property
        def tables(self) -> list[Any]:
            return self._own_tables

    return Rule


def _render(spec: RuleSpec, table: Any) -> Any:
    rule = _rule_class()(table)
    if spec.in_interface:
        rule.in_interface = spec.in_interface
    if spec.out_interface:
        rule.out_interface = spec.out_interface
    if spec.source:
        rule.src = ("!" if spec.source_inverted else "") + spec.source
    if spec.destination:
        rule.dst = spec.destination
    if spec.ctstate:
        match = rule.create_match("conntrack")
        match.ctstate = spec.ctstate
    if spec.comment:
        rule.create_match("comment").comment = spec.comment
    target = rule.create_target(spec.target)
    if spec.reject_with:
        target.reject_with = spec.reject_with
    return rule


_compiled = EntryCache()


def _entry(spec: RuleSpec, table: Any) -> Entry:
    return _compiled.get(spec, lambda s: _render(s, table))


def _append(table: Any, chain: str, spec: RuleSpec) -> None:
    table.append_entry(chain, _entry(spec, table).entry_buffer())


def _insert(table: Any, chain: str, spec: RuleSpec) -> None:
    table.insert_entry(chain, _entry(spec, table).entry_buffer(), 0)


def _delete(table: Any, chain: str, spec: RuleSpec) -> None:
    """iptc_delete_entry: libiptc finds the identical entry (under the rule's mask) in
    C, without Python decoding every rule of the chain."""
    entry = _entry(spec, table)
    table.delete_entry(chain, entry.entry_buffer(), entry.mask_buffer())


def _entries(table: Any, chain: str) -> Iterator[Any]:
    """Raw ipt_entry structs of ``chain``, without decoding matches or targets."""
    entry = table.first_rule(chain)
    while entry:
        yield entry
        entry = table.next_rule(entry)


def _target_name(table: Any, entry: Any) -> str:
    target = table.get_target(entry)
    return target.decode() if target else ""


def _has_jump(table: Any, chain: str, target: str) -> bool:
    return any(_target_name(table, e) == target for e in _entries(table, chain))


def _delete_jumps_to(table: Any, chain: str, target: str) -> None:
    """Delete every rule of ``chain`` that jumps to ``target``, whatever its matches,
    by position (iptc_delete_num_entry), highest first so positions stay valid.

    Walks the chain, so it is used on builtin chains (a handful of rules) and as the
    fallback; the per-cage path deletes by building the identical rule instead.
    """
    found = [i for i, e in enumerate(_entries(table, chain)) if _target_name(table, e) == target]
    for position in reversed(found):
        if table._iptc.iptc_delete_num_entry(chain.encode(), position, table._handle) != 1:
            raise _iptc().IPTCError(f"can't delete rule {position} of {chain}: {table.strerror()}")

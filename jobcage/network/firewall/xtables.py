"""The legacy x_tables backend: :mod:`.policy`'s layout (per-cage chains) over
python-iptables, which drives x_tables through libiptc.

Facts about libiptc that shape this module:

* A change is a whole-table replace (IPT_SO_SET_REPLACE): the table is read, edited in
  user space and written back, so every operation here is one read and at most one
  commit per table, and it must hold ``/run/xtables.lock`` as `iptables -w` does, or a
  concurrent `iptables` command on the node would fail with EAGAIN or, worse, be
  overwritten by our stale copy. python-iptables does not take that lock itself.
* Counters survive a replace: libiptc maps each unchanged rule to its old counters and
  adds what the kernel counted meanwhile (IPT_SO_SET_ADD_COUNTERS).
* There is no per-rule read: IPT_SO_GET_ENTRIES copies the whole table. Counters are
  read from that copy directly (:mod:`.xtables_read`), without libiptc parsing every
  chain and never decoding a rule (decoding one into a python-iptables ``Rule`` costs
  ~43 µs); reading every cage at once is one copy (:meth:`Firewall.counters_many`).
* Building a python-iptables ``Rule`` costs ~0.3 ms (extension lookup and set-up),
  so rules are compiled to raw entries once per shape and patched per cage
  (:mod:`.xtables_compiled`).
* The libiptc handle holds a socket made in the network namespace of the thread that
  opened it, and python-iptables caches one ``Table`` per name for the whole process;
  so every operation opens a private handle, in the calling thread's namespace, under
  a process-wide lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
import time
from collections.abc import Callable, Container, Iterator, Sequence
from typing import Any

from ...errors import CageExistsError, KernelFeatureError, NetworkError, RulesGoneError
from .. import hooks
from . import xtables_read
from .base import SHARED, Firewall, FirewallObject, unclaimed
from .policy import (
    CAGE_CHAIN_PREFIX,
    NAT_CHAIN,
    SHARED_PREFIX,
    CagePlan,
    NetCounters,
    RuleSpec,
    SharedPlan,
    classify,
    installation_conflict,
)
from .xtables_iptc import (
    _append,
    _delete,
    _delete_jumps_to,
    _entries,
    _has_jump,
    _insert,
    _iptc,
    _table,
    _translate,
)

# The lock every `iptables -w` of the node takes (iptables' XT_LOCK_NAME, overridable
# with XTABLES_LOCKFILE as in iptables itself). It is a file, not per network namespace.
XTABLES_LOCK = os.environ.get("XTABLES_LOCKFILE", "/run/xtables.lock")
XTABLES_LOCK_TIMEOUT_SECONDS = 10.0
XTABLES_LOCK_POLL_SECONDS = 0.005

_process_lock = threading.Lock()


@contextlib.contextmanager
def xtables_lock(
    path: str = XTABLES_LOCK,
    timeout: float = XTABLES_LOCK_TIMEOUT_SECONDS,
    *,
    shared: bool = False,
) -> Iterator[None]:
    """Hold the node's xtables lock, waiting at most ``timeout`` seconds, polling the
    way `iptables -w` does (flock has no timed wait). ``shared``: for a read, which
    excludes every writer (they take it exclusive) but not other readers."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as e:
        raise NetworkError(f"cannot open the xtables lock {path}: {e.strerror}") from e
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise NetworkError(
                        f"another process has held {path} for {timeout:.0f} s; find it "
                        f"with `fuser -v {path}` (a hung iptables command?)"
                    ) from None
                time.sleep(XTABLES_LOCK_POLL_SECONDS)
        yield
    finally:
        os.close(fd)


class IptablesLegacyFirewall(Firewall):
    """The layout of :mod:`.policy` over libiptc (legacy x_tables)."""

    name = "iptables-legacy"
    tables = ("filter", "nat")
    ipv4_only = "the x_tables backend is IPv4 only (IPv6 cages are nftables-only)"
    ipv6_refusal = (
        'needs firewall = "nftables": IPv6 cages are nftables-only (docs/network.md); set '
        'firewall = "nftables" (or "auto" on a kernel with nf_tables)'
    )

    def _change(self) -> contextlib.AbstractContextManager[None]:
        hooks.check()
        return xtables_lock()

    def install(self, cage: CagePlan, pool: str, uplink: Callable[[], str]) -> None:
        iptc = _iptc()
        with _process_lock, self._change():
            filt = _table("filter")
            try:
                for name in cage.chain_names:
                    if filt.is_chain(name):
                        raise CageExistsError(
                            f"iptables chain {name} already exists: a cage with this job "
                            "id, or its leftover, is on the node; run `jobcage reap`"
                        )
                self._check_owner(cage)
                self._ensure_shared_filter(filt, SharedPlan(pool, "unused"))
                for spec in cage.chains:
                    filt.create_chain(spec.name)
                    for rule in spec.rules:
                        _append(filt, spec.name, rule)
                for jump in cage.jumps:
                    # Insert at the top: the shared chain ends in a fail-closed DROP.
                    _insert(filt, jump.chain, jump.rule)
                filt.commit()
            except (iptc.IPTCError, iptc.XTablesError) as e:
                raise _translate(e, f"installing the rules of cage {cage.host_veth}") from e
            finally:
                filt.close()
            try:
                self._ensure_nat(pool, uplink, cage.owner)
            except BaseException:
                self._remove_locked(cage)
                raise

    def _ensure_shared_filter(self, filt: Any, shared: SharedPlan) -> None:
        for name in shared.filter_chains:
            if not filt.is_chain(name):
                filt.create_chain(name)
                # Fail closed: a packet from or to a jc* interface whose cage has no
                # chain (its cage was torn down while a process still held the netns)
                # goes nowhere.
                _append(filt, name, RuleSpec("DROP"))
        # Inserted at the top of each builtin chain, last first, so that they end up in
        # plan order: in FORWARD the from-a-job jump must come first, or a packet
        # between two cages meets the receiving cage's DROP before the sender's REJECT.
        for jump in reversed(shared.filter_jumps):
            # Checked on every install, not only the first, so that a cage repairs the
            # layout after an administrator's `iptables -F FORWARD`.
            if not _has_jump(filt, jump.chain, jump.rule.target):
                _insert(filt, jump.chain, jump.rule)

    @staticmethod
    def _check_owner(cage: CagePlan) -> None:
        """Refuse a cage of another installation than the one the NAT serves (its
        MASQUERADE rule's comment): the shared rules cover one pool and state dir.
        Asked under the xtables lock, before anything is changed."""
        if not cage.owner:
            return
        try:
            theirs = xtables_read.first_rule_comment(xtables_read.read_table("nat"), NAT_CHAIN)
        except OSError as e:
            raise NetworkError(f"reading the node's nat table: {e}") from e
        if theirs is not None and theirs != cage.owner:
            raise installation_conflict(cage.owner, theirs or "an older JobCage (no owner)")

    def _ensure_nat(self, pool: str, uplink: Callable[[], str], owner: str = "") -> None:
        iptc = _iptc()
        nat = _table("nat")
        try:
            changed = False
            if not nat.is_chain(NAT_CHAIN):
                shared = SharedPlan(pool, uplink(), owner)
                nat.create_chain(NAT_CHAIN)
                for rule in shared.nat_chain.rules:
                    _append(nat, NAT_CHAIN, rule)
                changed = True
            if not _has_jump(nat, "POSTROUTING", NAT_CHAIN):
                jump = SharedPlan(pool, "unused").nat_jump
                _insert(nat, jump.chain, jump.rule)
                changed = True
            if changed:
                nat.commit()
        except (iptc.IPTCError, iptc.XTablesError) as e:
            raise _translate(e, "installing the NAT of the cages") from e
        finally:
            nat.close()

    def remove(self, cage: CagePlan) -> bool:
        with _process_lock, self._change():
            return self._remove_locked(cage)

    def _remove_locked(self, cage: CagePlan) -> bool:
        iptc = _iptc()

        def edit(filt: Any) -> None:
            for jump, name in zip(cage.jumps, cage.chain_names, strict=True):
                if not filt.is_chain(name):
                    continue
                try:
                    _delete(filt, jump.chain, jump.rule)
                except iptc.IPTCError:
                    # Not where we put it (edited by hand?): look it up the slow way.
                    if filt.is_chain(jump.chain):
                        _delete_jumps_to(filt, jump.chain, name)
                filt.flush_entries(name)
                filt.delete_chain(name)

        return self._remove_from_filter(edit, f"removing the rules of cage {cage.host_veth}")

    def _remove_from_filter(self, edit: Callable[[Any], None], what: str) -> bool:
        """Apply ``edit`` to the filter table, remove the shared chains (and the NAT)
        if no cage is left, commit; True if the shared part went."""
        iptc = _iptc()
        filt = _table("filter")
        try:
            edit(filt)
            last = self._remove_shared_filter_if_unused(filt)
            filt.commit()
        except (iptc.IPTCError, iptc.XTablesError) as e:
            raise _translate(e, what) from e
        finally:
            filt.close()
        if last:
            self._remove_nat()
        return last

    def _remove_shared_filter_if_unused(self, filt: Any) -> bool:
        shared = SharedPlan("0.0.0.0/0", "unused")
        for name in shared.filter_chains:
            if not filt.is_chain(name):
                continue
            rules = _entries(filt, name)
            first = next(rules, None)
            # In use while anything but the final fail-closed DROP is left.
            if first is not None and next(rules, None) is not None:
                return False
        for jump in shared.filter_jumps:
            if filt.is_chain(jump.rule.target):
                _delete_jumps_to(filt, jump.chain, jump.rule.target)
        for name in shared.filter_chains:
            if filt.is_chain(name):
                filt.flush_entries(name)
                filt.delete_chain(name)
        return True

    def _remove_nat(self) -> None:
        iptc = _iptc()
        nat = _table("nat")
        try:
            if nat.is_chain(NAT_CHAIN):
                _delete_jumps_to(nat, "POSTROUTING", NAT_CHAIN)
                nat.flush_entries(NAT_CHAIN)
                nat.delete_chain(NAT_CHAIN)
                nat.commit()
        except (iptc.IPTCError, iptc.XTablesError) as e:
            raise _translate(e, "removing the NAT of the cages") from e
        finally:
            nat.close()

    def describe(self, cage: CagePlan) -> dict[str, list[str]]:
        return {"filter": list(cage.chain_names)}

    def orphans(self, claimed: Container[str]) -> list[FirewallObject]:
        return unclaimed(self._our_chains(), claimed)

    def remove_orphan(self, orphan: FirewallObject) -> bool:
        """A cage's chain (each of its chains is listed, and removed, on its own), or
        what cages share."""
        return self._remove_orphan_chain("" if orphan.kind == SHARED else orphan.name)

    def problem(self) -> str | None:
        try:
            _iptc()
        except KernelFeatureError as e:
            return str(e)
        return None

    def _remove_orphan_chain(self, name: str) -> bool:
        """Remove a JobCage chain that no record names (or none: only check what cages
        share), its jumps, and the shared part if nothing uses it any more (then
        returns True)."""
        if name and not name.startswith(CAGE_CHAIN_PREFIX):
            raise NetworkError(f"{name} is not a per-cage JobCage chain; not removing it")

        def edit(filt: Any) -> None:
            if name and filt.is_chain(name):
                for shared in SharedPlan("0.0.0.0/0", "unused").filter_chains:
                    if filt.is_chain(shared):
                        _delete_jumps_to(filt, shared, name)
                filt.flush_entries(name)
                filt.delete_chain(name)

        with _process_lock, self._change():
            return self._remove_from_filter(edit, f"removing the orphaned chain {name}")

    def counters(self, cage: CagePlan) -> NetCounters:
        found = self._read([cage])[0]
        if found is None:
            raise RulesGoneError(
                f"the accounting chains of cage {cage.host_veth}, or the jumps to them, are "
                "gone or flushed (a firewall reload, `iptables -F`/`-X`?): its counters "
                "are lost"
            )
        return found

    def counters_many(self, cages: Sequence[CagePlan]) -> dict[str, NetCounters | None]:
        return {c.host_veth: found for c, found in zip(cages, self._read(cages), strict=True)}

    def _read(self, cages: Sequence[CagePlan]) -> list[NetCounters | None]:
        """Each cage's counters, None where its rules are not whole: a chain gone or
        flushed, or a jump to it (or to the shared chains) gone.

        Under the xtables lock, shared: every legacy writer (JobCage's own changes and
        `iptables`) replaces the table and then adds the old counters back in a
        second call, holding the lock across both; a copy taken between the two holds
        the new table with every counter 0, and a bill read then was 0 (issue 17)."""
        try:
            with xtables_lock(shared=True):
                blob = xtables_read.read_table("filter")
        except OSError as e:
            raise _translate(e, "reading the cages' counters") from e
        heads = xtables_read.chain_heads(blob)
        shared = SharedPlan("0.0.0.0/0", "unused").filter_chains
        reached = xtables_read.jumps_present(blob, shared, heads)
        out: list[NetCounters | None] = []
        for cage in cages:
            found = [xtables_read.chain_counters(blob, n, heads) for n in cage.chain_names]
            whole = (
                reached
                and all(
                    f is not None and len(f) == len(spec.rules)
                    for f, spec in zip(found, cage.chains, strict=True)
                )
                and xtables_read.jumps_present(blob, cage.chain_names, heads)
            )
            out.append(classify(cage, found) if whole else None)  # type: ignore[arg-type]
        return out

    def _our_chains(self) -> dict[str, list[str]]:
        """table -> names of every JobCage chain in it."""
        found: dict[str, list[str]] = {}
        # Opening a legacy table the kernel has not instantiated in this netns creates
        # it (tables are made per netns on first use); a table that is not listed holds
        # no JobCage chain, so only look at those that exist.
        existing = _legacy_tables()
        with _process_lock:
            for name in ("filter", "nat"):
                if name not in existing:
                    found[name] = []
                    continue
                table = _table(name)
                try:
                    found[name] = [
                        c.name
                        for c in table.chains
                        if c.name.startswith((SHARED_PREFIX, CAGE_CHAIN_PREFIX))
                    ]
                finally:
                    table.close()
        return found


def _legacy_tables() -> set[str]:
    """The x_tables tables instantiated in the calling thread's netns."""
    try:
        with open("/proc/thread-self/net/ip_tables_names") as f:
            return set(f.read().split())
    except FileNotFoundError:  # ip_tables not loaded: no legacy table at all
        return set()

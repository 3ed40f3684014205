"""The nftables backend: :mod:`.nftables_layout`'s messages sent over
:mod:`jobcage.netlink`, with what the kernel's answers mean for a cage (the shared
part made or removed by a racing process, a missing kernel module, a table edited by
hand) and what reap finds in the table.
"""

from __future__ import annotations

import errno
import functools
from collections.abc import Callable, Container, Sequence
from typing import TypeVar

from ...errors import (
    CageExistsError,
    ConfigError,
    KernelFeatureError,
    NetworkError,
    RulesGoneError,
)
from ...ids import VETH_PREFIX
from ...netlink import core, nfchannel, nfnl
from ...netlink.core import Request
from .. import hooks
from .base import SHARED, Firewall, FirewallObject, unclaimed
from .nftables_layout import (
    CAGES,
    CAGES_SUFFIX,
    CAMPUS_PREFIX,
    CAMPUS_RX_CHAIN,
    CAMPUS_TX_CHAIN,
    LABELS,
    NFPROTOS,
    OWNER_PREFIX,
    TABLE,
    TABLE_LABEL,
    all_counter_names,
    cage_messages,
    cage_removal,
    campus_sets,
    counter_names,
    owner_set,
    shared_messages,
    shared_removal,
)
from .policy import (
    CAGE_CHAIN_PREFIX,
    CagePlan,
    NetCounters,
    cage_hash_of,
    counters_by_class,
    installation_conflict,
)

INSTALL_ATTEMPTS = 5

_MISSING_FEATURE = (
    "the kernel lacks an nftables feature JobCage uses: enable CONFIG_NF_TABLES, "
    "CONFIG_NF_TABLES_IPV4, CONFIG_NFT_CT, CONFIG_NFT_REJECT, CONFIG_NFT_MASQ, "
    "CONFIG_NFT_OBJREF, CONFIG_NFT_COUNTER and CONFIG_NF_TABLES_SET (modules nf_tables, "
    "nft_ct, nft_reject_ipv4, nft_masq, nft_objref, nf_tables_set), or set "
    'firewall = "iptables-legacy"'
)


def _translate(e: core.NetlinkError, what: str) -> Exception:
    if e.errno in (errno.EPERM, errno.EACCES):
        return NetworkError(f"{what}: {e}; JobCage needs root (CAP_NET_ADMIN)")
    if e.errno in (errno.EOPNOTSUPP, errno.EAFNOSUPPORT, errno.EPROTONOSUPPORT):
        return KernelFeatureError(f"{what}: {e}; {_MISSING_FEATURE}")
    if e.errno == errno.ENOENT and e.what.startswith(("table", "set", "map", "chain")):
        return NetworkError(f"{what}: {e}; JobCage's table `ip {TABLE}` was changed by hand")
    return core.network_error(e, what)


def _raced(e: core.NetlinkError, first: bool) -> bool:
    """Whether a refused install met another process's change to what cages share:
    the table or a campus list made (EEXIST) or removed (ENOENT) since we looked."""
    if e.errno == errno.EEXIST:
        return e.what.startswith(("table", f"set {CAMPUS_PREFIX}", f"counter {CAMPUS_PREFIX}"))
    return e.errno == errno.ENOENT and not first


def _owners(sets: Sequence[str]) -> list[str]:
    return [n for n in sets if n.startswith(OWNER_PREFIX)]


def _other_owner(cage: CagePlan, e: core.NetlinkError) -> ConfigError | None:
    """The error for a cage refused because the table serves another installation
    (the kernel found no owner set of its name), or None if that is not why."""
    if not cage.owner or e.errno != errno.ENOENT or owner_set(cage.owner) not in e.what:
        return None
    theirs = nfchannel.table_comment(TABLE)
    if theirs is None or theirs == cage.owner:
        return None  # the table went, or came back ours, meanwhile: a race
    return installation_conflict(cage.owner, theirs or "an older JobCage (no owner)")


_T = TypeVar("_T")


def _in_family(method: Callable[..., _T]) -> Callable[..., _T]:
    """Run ``method`` against this firewall's table (``ip`` or ``ip6 jobcage``)."""

    @functools.wraps(method)
    def run(self: NftablesFirewall, *args: object, **kwargs: object) -> _T:
        with nfnl.family(NFPROTOS[self.version]):
            return method(self, *args, **kwargs)

    return run


class NftablesFirewall(Firewall):
    """The layout of :mod:`.nftables_layout`, over :mod:`jobcage.netlink`: ``ip
    jobcage``, or with ``family=6`` the same layout over IPv6 in ``ip6 jobcage`` (a
    dual-stack cage has a plan of each family, see docs/network.md)."""

    name = "nftables"
    tables: tuple[str, ...] = (TABLE_LABEL,)

    def __init__(self, family: int = 4) -> None:
        self.version = family
        self.label = LABELS[family]
        self.tables = (self.label,)
        self.shown_by = f"nft list table {self.label}"

    def ipv6(self) -> NftablesFirewall:
        return self if self.version == 6 else NftablesFirewall(family=6)

    @_in_family
    def in_use(self) -> bool:
        # The last cage's teardown deletes the table.
        return nfchannel.table_use(TABLE) is not None

    @_in_family
    def install(self, cage: CagePlan, pool: str, uplink: Callable[[], str]) -> None:
        hooks.check()
        what = f"installing the rules of cage {cage.host_veth}"
        campus = campus_sets(cage.campus_networks)[0] if cage.campus_networks else None
        for _attempt in range(INSTALL_ATTEMPTS):
            # Asked rather than tried: a transaction the kernel aborts costs an RCU
            # grace period (see nfchannel.table_use).
            try:
                # A campus list's set there means the table is too: one question.
                new_list = campus is not None and not nfchannel.set_exists(TABLE, campus)
                first = (campus is None or new_list) and nfchannel.table_use(TABLE) is None
            except core.NetlinkError as e:
                raise _translate(e, what) from e
            msgs = cage_messages(cage, with_campus_list=new_list)
            try:
                # The node's first cage makes the shared part in the same transaction.
                shared = shared_messages(pool, uplink(), cage.owner) if first else []
                nfchannel.transact(shared + msgs)
                return
            except core.NetlinkError as e:
                conflict = _other_owner(cage, e)
                if conflict is not None:
                    raise conflict from None
                if self._rule_refused(e, first):
                    raise KernelFeatureError(f"{what}: {e}; {_MISSING_FEATURE}") from e
                if not _raced(e, first):
                    if e.errno == errno.EEXIST:
                        raise self._exists(cage, e) from None
                    raise _translate(e, what) from e
                # Another process made or removed a shared part between our question
                # and our transaction: ask again.
        raise NetworkError(
            f"{what}: the shared table `ip {TABLE}` or a campus list's sets kept appearing "
            f"and vanishing over {INSTALL_ATTEMPTS} attempts; is another program deleting "
            "them?"
        )

    @staticmethod
    def _rule_refused(e: core.NetlinkError, first: bool) -> bool:
        """A rule refused with ENOENT although its chain and sets are there (made in
        the same transaction, or found): the kernel has no module for one of its
        expressions (it answers ENOENT, as for a missing chain)."""
        prefix = "a rule of chain "
        if e.errno != errno.ENOENT or not e.what.startswith(prefix):
            return False
        if first:
            return True
        try:
            return e.what[len(prefix) :] in nfchannel.dump_chains(TABLE)
        except core.NetlinkError:
            return False

    @staticmethod
    def _exists(cage: CagePlan, e: core.NetlinkError) -> CageExistsError:
        return CageExistsError(
            f"nftables {e.what} already exists in table ip {TABLE}: a cage with this job "
            "id, or its leftover, is on the node; run `jobcage reap`"
        )

    @_in_family
    def remove(self, cage: CagePlan) -> bool:
        hooks.check()
        what = f"removing the rules of cage {cage.host_veth}"
        self._remove_cage(cage, what)
        if self._remove_shared_if_unused():
            return True
        if cage.campus_networks:
            # The last cage of its campus list takes the list with it.
            nets = campus_sets(cage.campus_networks)[0]
            try:
                if nfchannel.object_use(TABLE, nets) == 0:
                    self._remove_unused_list(nets)
            except core.NetlinkError as e:
                raise _translate(e, what) from e
        return False

    def _remove_cage(self, cage: CagePlan, what: str) -> None:
        try:
            nfchannel.transact(cage_removal(cage))
        except core.NetlinkError as e:
            if e.errno != errno.ENOENT:
                raise _translate(e, what) from e
            try:
                if nfchannel.table_use(TABLE) is None:
                    return  # the whole table is gone (`nft flush ruleset`): nothing left
            except core.NetlinkError as e2:
                raise _translate(e2, what) from e2
            # Partly gone already (an earlier teardown, or by hand): remove what is left,
            # one object at a time (each missing one costs an aborted transaction).
            self._remove_each(cage_removal(cage), what)

    @staticmethod
    def _remove_each(messages: Sequence[Request], what: str) -> None:
        for msg in messages:
            try:
                nfchannel.transact([msg])
            except core.NetlinkError as e:
                if e.errno != errno.ENOENT:
                    raise _translate(e, what) from e

    def _remove_shared_if_unused(self) -> bool:
        what = "removing the shared nftables table of the cages"
        try:
            cages = nfchannel.object_use(TABLE, CAGES)
            if cages is None and nfchannel.table_use(TABLE) is None:
                return True
            if cages:
                return False  # other cages are there
            if cages == 0:
                # Atomic against a cage arriving meanwhile: then EBUSY, nothing changed.
                sets = nfchannel.dump_sets(TABLE)
                nfchannel.transact(shared_removal(self._campus_lists(sets), owners=_owners(sets)))
                return True
        except core.NetlinkError as e:
            if e.errno == errno.EBUSY:
                return False
            if e.errno != errno.ENOENT:
                raise _translate(e, what) from e
        # Something shared is missing: the table is gone, or was edited by hand. Remove
        # what is left only if no cage's counter is there, in one transaction that a
        # cage arriving meanwhile makes the kernel refuse (its elements are in sets
        # deleted only if empty), then the table if nothing else is in it.
        try:
            counters = nfchannel.dump_counters(TABLE)
            if any(n.startswith(CAGE_CHAIN_PREFIX) for n in counters):
                return False
            chains = nfchannel.dump_chains(TABLE)
            if not chains:
                # No chain when we looked: the table was gone (another last cage removed
                # it) or empty. A table there now may be a new first cage's (it makes
                # the table and its chains in one transaction): nothing more is ours.
                return True
            sets = nfchannel.dump_sets(TABLE)
        except core.NetlinkError as e:
            raise _translate(e, what) from e
        present = {("chain", n) for n in chains} | {("set", n) for n in sets}
        present |= {("counter", n) for n in counters}
        ours = shared_removal(self._campus_lists(sets), present, _owners(sets))
        try:
            nfchannel.transact(ours)
        except core.NetlinkError as e:
            if e.errno == errno.EBUSY:
                return False  # a cage arrived
            if e.errno != errno.ENOENT:
                raise _translate(e, what) from e
            self._remove_each(ours, what)  # changed meanwhile (another remover?)
        try:
            nfchannel.transact([nfnl.del_table(TABLE, only_if_empty=True)])
        except core.NetlinkError as e:
            if e.errno == errno.EBUSY:
                return False
            if e.errno != errno.ENOENT:
                raise _translate(e, what) from e
        return True

    @staticmethod
    def _campus_lists(sets: Sequence[str] | None = None) -> list[str]:
        """The network set of every campus list in the table (``sets``: a dump's)."""
        return [
            n
            for n in (nfchannel.dump_sets(TABLE) if sets is None else sets)
            if n.startswith(CAMPUS_PREFIX) and not n.endswith(CAGES_SUFFIX)
        ]

    @_in_family
    def counters(self, cage: CagePlan) -> NetCounters:
        names = counter_names(cage)
        try:
            found = nfchannel.get_counters(TABLE, list(names.values()))
        except core.NetlinkError as e:
            raise _translate(e, f"reading the counters of cage {cage.host_veth}") from e
        values = dict(zip(names, found, strict=True))
        missing = [names[c] for c, v in values.items() if v is None]
        if missing:
            raise RulesGoneError(
                f"the accounting counters {', '.join(missing)} of cage {cage.host_veth} are "
                f"gone (table ip {TABLE} deleted by hand, or `nft flush ruleset`?): its "
                "counters are lost"
            )
        return counters_by_class(values)  # type: ignore[arg-type]

    def restore(self, cage: CagePlan, pool: str, uplink: Callable[[], str]) -> None:
        """After `nft flush ruleset` nothing of the cage is left: installed afresh (and
        the table with it). Only what a hand edit left makes it remove first (one
        aborted transaction per missing object: the slow way, and rare)."""
        try:
            self.install(cage, pool, uplink)
        except CageExistsError:
            super().restore(cage, pool, uplink)

    @_in_family
    def counters_many(self, cages: Sequence[CagePlan]) -> dict[str, NetCounters | None]:
        try:
            everything = nfchannel.dump_counters(TABLE)
        except core.NetlinkError as e:
            raise _translate(e, "reading the cages' counters") from e
        out: dict[str, NetCounters | None] = {}
        for cage in cages:
            values = {c: everything.get(n) for c, n in counter_names(cage).items()}
            whole = all(v is not None for v in values.values())
            out[cage.host_veth] = counters_by_class(values) if whole else None  # type: ignore[arg-type]
        return out

    def describe(self, cage: CagePlan) -> dict[str, list[str]]:
        """Its counters in the shared table (this layout has no per-cage rule)."""
        return {self.label: list(all_counter_names(cage).values())}

    @_in_family
    def orphans(self, claimed: Container[str]) -> list[FirewallObject]:
        return unclaimed(self._listing(), claimed, CAMPUS_PREFIX)

    @_in_family
    def remove_orphan(self, orphan: FirewallObject) -> bool:
        return self._remove_orphan_named("" if orphan.kind == SHARED else orphan.name)

    def problem(self) -> str | None:
        return None if nfchannel.available() else f"nf_tables is not available: {_MISSING_FEATURE}"

    def _remove_orphan_named(self, name: str) -> bool:
        """``name``: one of a cage's counters (all of the cage goes), or a campus list
        no cage uses any more, or none (only the shared part)."""
        hooks.check()
        what = f"removing the orphaned {name}"
        try:
            if name.startswith(CAMPUS_PREFIX):
                self._remove_unused_list(name)
            elif name.startswith(CAGE_CHAIN_PREFIX):
                self._remove_orphan_cage(cage_hash_of(name), what)
            elif name:
                raise NetworkError(f"{name} is not a per-cage JobCage object; not removing it")
            return self._remove_shared_if_unused()
        except core.NetlinkError as e:
            raise _translate(e, what) from e

    def _remove_orphan_cage(self, cage_hash: str, what: str) -> None:
        """A cage without a record: what it has is learnt from the table (a dump of
        each set: reap's cost, not a cage's)."""
        veth = nfnl.ifname(f"{VETH_PREFIX}{cage_hash}h")
        sets = nfchannel.dump_sets(TABLE)
        msgs = []
        for set_name in sets:
            if set_name.startswith(CAMPUS_PREFIX) and not set_name.endswith(CAGES_SUFFIX):
                continue
            mine = [k for k in nfchannel.dump_keys(TABLE, set_name) if k.startswith(veth)]
            if mine:
                elements = [nfnl.Element(k) for k in mine]
                msgs.append(nfnl.del_elements(TABLE, set_name, elements))
        prefix = f"{CAGE_CHAIN_PREFIX}{cage_hash}-"
        msgs += [
            nfnl.del_counter(TABLE, n)
            for n in nfchannel.dump_counters(TABLE)
            if n.startswith(prefix)
        ]
        try:
            nfchannel.transact(msgs)
        except core.NetlinkError as e:
            if e.errno != errno.ENOENT:
                raise
            self._remove_each(msgs, what)  # changed meanwhile (another reap?)

    def _remove_unused_list(self, nets: str) -> None:
        """Removes a campus list's rules, sets and counter, in one transaction that the
        kernel refuses (EBUSY) if a cage joined the list meanwhile."""
        cages = nets + CAGES_SUFFIX
        msgs = [
            nfnl.del_rule(TABLE, chain, handle)
            for chain in (CAMPUS_TX_CHAIN, CAMPUS_RX_CHAIN)
            for handle, sets in nfchannel.dump_rules(TABLE, chain)
            if cages in sets
        ]
        msgs += [
            nfnl.del_set(TABLE, cages, only_if_empty=True),
            nfnl.del_set(TABLE, nets, only_if_empty=False),
            nfnl.del_counter(TABLE, nets),
        ]
        try:
            nfchannel.transact(msgs)
        except core.NetlinkError as e:
            if e.errno not in (errno.EBUSY, errno.ENOENT):
                raise

    def _listing(self) -> dict[str, list[str]]:
        """Its shared chains, every cage's counters and every campus list no cage uses
        (reap removes what no record claims)."""
        try:
            names = nfchannel.dump_chains(TABLE)
            seen = set()
            for n in nfchannel.dump_counters(TABLE):
                # One name per cage: its first counter found removes all of it.
                cage_hash = cage_hash_of(n)
                if n.startswith(CAGE_CHAIN_PREFIX) and cage_hash not in seen:
                    seen.add(cage_hash)
                    names.append(n)
            # Left by a cage whose removal did not finish (its owner killed).
            names += [n for n in self._campus_lists() if not nfchannel.object_use(TABLE, n)]
        except core.NetlinkError as e:
            raise _translate(e, f"listing table ip {TABLE}") from e
        return {self.label: names}

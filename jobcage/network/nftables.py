"""The cages' rules in an nftables table of their own, behind :class:`Firewall`.

Same policy and classes as the x_tables layout (:mod:`.rules`: the per-cage chains and
their rules are the same :class:`~.rules.CagePlan`), laid out so that nothing a cage
does costs in proportion to the other cages on the node::

    table ip jobcage                     (JobCage's own: the node's tables untouched)
      map JOBCAGE-FWD-TX  { ifname : verdict }   host veth -> jump JC-<h>-FTX
      map JOBCAGE-FWD-RX, JOBCAGE-NODE-TX, JOBCAGE-NODE-RX  likewise
      chain JOBCAGE-FORWARD  hook forward priority 0, policy accept
          iifname vmap @JOBCAGE-FWD-TX;  oifname vmap @JOBCAGE-FWD-RX
          iifname "jc*" drop;  oifname "jc*" drop           (fail closed)
      chain JOBCAGE-INPUT   hook input:  iifname vmap @JOBCAGE-NODE-TX; "jc*" drop
      chain JOBCAGE-OUTPUT  hook output: oifname vmap @JOBCAGE-NODE-RX; "jc*" drop
      chain JOBCAGE-POSTROUTING  nat hook postrouting priority 100
          ip saddr POOL oifname UPLINK masquerade
      counter JC-<h>-LAN-TX, -LAN-RX, -WAN-TX, -WAN-RX   (one per class)
      chain JC-<h>-FTX, -FRX, -NTX, -NRX   (the plan's rules; ACCEPTs name a counter)

* Adding a cage is one transaction (its counters, chains, rules and four map
  elements); removing it another. The kernel applies each in O(1) of the table's size,
  where x_tables rewrites the whole table.
* A packet finds its cage with one hash lookup per hook, not a walk over every cage's
  jump.
* A cage's usage is four NFT_MSG_GETOBJ (hash lookups); every cage's is one dump.
* The shared part is made with the first cage (NEWTABLE with NLM_F_EXCL: of two
  racing first cages, one wins and the other retries as a second cage) and removed
  with the last, atomically: a transaction deleting the shared chains and maps and
  then the table with NLM_F_NONREC fails with EBUSY, changing nothing, while any
  cage's chain or counter remains.

An accept here does not bypass the node's own tables: a packet must also pass the
node's iptables (either flavour) and other nftables tables; `jobcage doctor` warns
when the node's forward policy would drop the cages' traffic.
"""

from __future__ import annotations

import errno
import ipaddress
import struct
from collections.abc import Callable, Sequence

from ..errors import CageExistsError, KernelFeatureError, NetworkError
from ..ids import VETH_PREFIX
from . import hooks, nfnl
from .firewall import Firewall
from .nfnl import Message
from .rules import (
    CAGE_CHAIN_PREFIX,
    FWD_RX_CHAIN,
    FWD_TX_CHAIN,
    LAN_RX,
    LAN_TX,
    NAT_CHAIN,
    NODE_RX_CHAIN,
    NODE_TX_CHAIN,
    VETH_WILDCARD,
    WAN_RX,
    WAN_TX,
    CagePlan,
    NetCounters,
    RuleSpec,
    counters_by_class,
)

TABLE = "jobcage"
TABLE_LABEL = f"ip {TABLE}"  # how `nft list` and records name it
FORWARD_CHAIN = "JOBCAGE-FORWARD"
INPUT_CHAIN = "JOBCAGE-INPUT"
OUTPUT_CHAIN = "JOBCAGE-OUTPUT"
MAPS = (FWD_TX_CHAIN, FWD_RX_CHAIN, NODE_TX_CHAIN, NODE_RX_CHAIN)
BASE_CHAINS = (FORWARD_CHAIN, INPUT_CHAIN, OUTPUT_CHAIN, NAT_CHAIN)
COUNTER_SUFFIXES = {LAN_TX: "LAN-TX", LAN_RX: "LAN-RX", WAN_TX: "WAN-TX", WAN_RX: "WAN-RX"}
FILTER_PRIORITY = 0
SRCNAT_PRIORITY = 100
INSTALL_ATTEMPTS = 5
# What the table holds with no cage: its maps and hooked chains.
SHARED_OBJECTS = len(MAPS) + len(BASE_CHAINS)

_MISSING_FEATURE = (
    "the kernel lacks an nftables feature JobCage uses: enable CONFIG_NF_TABLES, "
    "CONFIG_NF_TABLES_IPV4, CONFIG_NFT_CT, CONFIG_NFT_REJECT, CONFIG_NFT_MASQ, "
    "CONFIG_NFT_OBJREF and CONFIG_NFT_COUNTER (modules nf_tables, nft_ct, "
    'nft_reject_ipv4, nft_masq, nft_objref), or set firewall = "iptables-legacy"'
)


def counter_names(cage: CagePlan) -> dict[str, str]:
    return {cls: cage.chain_name(suffix) for cls, suffix in COUNTER_SUFFIXES.items()}


def _ct_bits(states: str) -> int:
    bits = {"ESTABLISHED": nfnl.CT_STATE_ESTABLISHED, "RELATED": nfnl.CT_STATE_RELATED}
    return sum(bits[s] for s in states.split(","))


def _interface(key: int, name: str) -> list[bytes]:
    if name.endswith("+"):  # iptables' wildcard: compare the prefix only, as nft does
        return [nfnl.meta_load(key), nfnl.cmp(nfnl.CMP_EQ, name[:-1].encode())]
    return [nfnl.meta_load(key), nfnl.cmp(nfnl.CMP_EQ, nfnl.ifname(name))]


def _address(offset: int, cidr: str, inverted: bool) -> list[bytes]:
    net = ipaddress.IPv4Network(cidr)
    op = nfnl.CMP_NEQ if inverted else nfnl.CMP_EQ
    length = net.prefixlen
    if length == 0:
        if inverted:
            raise ValueError(f"'! {cidr}' matches no packet")
        return []  # every address: nothing to compare
    if length % 8 == 0:
        # Byte-aligned prefix: load only its bytes (nft itself does the same).
        return [
            nfnl.payload_load(offset, length // 8),
            nfnl.cmp(op, net.network_address.packed[: length // 8]),
        ]
    return [
        nfnl.payload_load(offset, 4),
        nfnl.bitwise_mask(4, net.netmask.packed),
        nfnl.cmp(op, net.network_address.packed),
    ]


def rule_expressions(spec: RuleSpec, counters: dict[str, str]) -> list[bytes]:
    """The nf_tables expressions of one plan rule; ``counters`` maps a class to the
    cage's counter object, which the rule's ACCEPT adds to."""
    out: list[bytes] = []
    if spec.in_interface:
        out += _interface(nfnl.META_IIFNAME, spec.in_interface)
    if spec.out_interface:
        out += _interface(nfnl.META_OIFNAME, spec.out_interface)
    if spec.source:
        out += _address(12, spec.source, spec.source_inverted)
    if spec.destination:
        out += _address(16, spec.destination, False)
    if spec.ctstate:
        out += [
            nfnl.ct_state_load(),
            nfnl.bitwise_mask(4, struct.pack("=I", _ct_bits(spec.ctstate))),
            nfnl.cmp(nfnl.CMP_NEQ, b"\0\0\0\0"),
        ]
    if spec.counts is not None:
        out.append(nfnl.objref_counter(counters[spec.counts]))
    elif spec.target in ("DROP", "REJECT"):
        # Not billed, but an administrator asking "what did the cage refuse?" (and
        # the tests) read it with `nft list chain ip jobcage JC-<h>-FTX`.
        out.append(nfnl.counter())
    if spec.target == "ACCEPT":
        out.append(nfnl.immediate_verdict(nfnl.NF_ACCEPT))
    elif spec.target == "DROP":
        out.append(nfnl.immediate_verdict(nfnl.NF_DROP))
    elif spec.target == "REJECT":
        if spec.reject_with != "icmp-admin-prohibited":
            raise ValueError(f"unsupported reject {spec.reject_with!r}")
        out.append(nfnl.reject_admin_prohibited())
    else:
        out.append(nfnl.immediate_verdict(nfnl.NFT_JUMP, spec.target))
    return out


def shared_messages(pool: str, uplink: str) -> list[Message]:
    """The table, its maps and hooked chains: what every cage on the node shares."""
    msgs = [nfnl.new_table(TABLE, exclusive=True)]
    msgs += [nfnl.new_verdict_map(TABLE, name, i) for i, name in enumerate(MAPS, 1)]
    msgs += [
        nfnl.new_chain(TABLE, FORWARD_CHAIN, hook=nfnl.NF_INET_FORWARD, priority=FILTER_PRIORITY),
        nfnl.new_chain(TABLE, INPUT_CHAIN, hook=nfnl.NF_INET_LOCAL_IN, priority=FILTER_PRIORITY),
        nfnl.new_chain(TABLE, OUTPUT_CHAIN, hook=nfnl.NF_INET_LOCAL_OUT, priority=FILTER_PRIORITY),
        nfnl.new_chain(
            TABLE,
            NAT_CHAIN,
            hook=nfnl.NF_INET_POST_ROUTING,
            priority=SRCNAT_PRIORITY,
            chain_type="nat",
        ),
    ]
    iif, oif = nfnl.META_IIFNAME, nfnl.META_OIFNAME
    # From-a-job first in FORWARD, as in the x_tables layout: a packet between two
    # cages meets the sender's REJECT before the receiver's DROP.
    dispatch = [
        (FORWARD_CHAIN, iif, FWD_TX_CHAIN),
        (FORWARD_CHAIN, oif, FWD_RX_CHAIN),
        (INPUT_CHAIN, iif, NODE_TX_CHAIN),
        (OUTPUT_CHAIN, oif, NODE_RX_CHAIN),
    ]
    for chain, key, vmap in dispatch:
        msgs.append(nfnl.new_rule(TABLE, chain, [nfnl.meta_load(key), nfnl.lookup_verdict(vmap)]))
    # Fail closed: a packet of a jc* interface whose cage has no element goes nowhere.
    for chain, key, _vmap in dispatch:
        drop = [*_interface(key, VETH_WILDCARD), nfnl.immediate_verdict(nfnl.NF_DROP)]
        msgs.append(nfnl.new_rule(TABLE, chain, drop))
    masq = [
        *_address(12, pool, False),
        *_interface(nfnl.META_OIFNAME, uplink),
        nfnl.masquerade(),
    ]
    msgs.append(nfnl.new_rule(TABLE, NAT_CHAIN, masq))
    return msgs


def cage_messages(cage: CagePlan) -> list[Message]:
    counters = counter_names(cage)
    msgs = [nfnl.new_counter(TABLE, name) for name in counters.values()]
    msgs += [nfnl.new_chain(TABLE, chain.name, exclusive=True) for chain in cage.chains]
    for chain in cage.chains:
        msgs += [
            nfnl.new_rule(TABLE, chain.name, rule_expressions(rule, counters))
            for rule in chain.rules
        ]
    for jump in cage.jumps:
        key = jump.rule.in_interface or jump.rule.out_interface
        assert key is not None
        msgs.append(nfnl.new_jump_element(TABLE, jump.chain, key, jump.rule.target))
    return msgs


def cage_removal(cage: CagePlan) -> list[Message]:
    msgs = []
    for jump in cage.jumps:
        key = jump.rule.in_interface or jump.rule.out_interface
        assert key is not None
        msgs.append(nfnl.del_element(TABLE, jump.chain, key))
    msgs += [nfnl.del_chain(TABLE, name) for name in cage.chain_names]
    msgs += [nfnl.del_counter(TABLE, name) for name in counter_names(cage).values()]
    return msgs


def shared_removal() -> list[Message]:
    """Deletes the shared part, and fails with EBUSY (changing nothing) while a cage's
    chain or counter is in the table."""
    msgs = [nfnl.del_chain(TABLE, name) for name in BASE_CHAINS]
    msgs += [nfnl.del_set(TABLE, name, only_if_empty=True) for name in MAPS]
    msgs.append(nfnl.del_table(TABLE, only_if_empty=True))
    return msgs


def _translate(e: nfnl.NfnlError, what: str) -> Exception:
    if e.errno in (errno.EPERM, errno.EACCES):
        return NetworkError(f"{what}: {e}; JobCage needs root (CAP_NET_ADMIN)")
    if e.errno in (errno.EOPNOTSUPP, errno.EAFNOSUPPORT, errno.EPROTONOSUPPORT):
        return KernelFeatureError(f"{what}: {e}; {_MISSING_FEATURE}")
    if e.errno == errno.ENOENT and e.what.startswith(("table", "map")):
        return NetworkError(f"{what}: {e}; JobCage's table `ip {TABLE}` was changed by hand")
    return NetworkError(f"{what}: {e}")


class NftablesFirewall(Firewall):
    """The layout of this module's docstring, over :mod:`.nfnl`."""

    name = "nftables"

    def install(self, cage: CagePlan, pool: str, uplink: Callable[[], str]) -> None:
        hooks.check()
        what = f"installing the rules of cage {cage.host_veth}"
        own = cage_messages(cage)
        for _attempt in range(INSTALL_ATTEMPTS):
            # Asked rather than tried: a transaction the kernel aborts costs an RCU
            # grace period (see nfnl.table_use).
            try:
                first = nfnl.table_use(TABLE) is None
            except nfnl.NfnlError as e:
                raise _translate(e, what) from e
            try:
                # The node's first cage makes the shared part in the same transaction.
                nfnl.transact(shared_messages(pool, uplink()) + own if first else own)
                return
            except nfnl.NfnlError as e:
                if e.errno == errno.EEXIST and not e.what.startswith("table"):
                    raise self._exists(cage, e) from None
                raced = (e.errno == errno.EEXIST) or (e.errno == errno.ENOENT and not first)
                if not raced:
                    raise _translate(e, what) from e
                # Another process made the shared part, or removed it with its last
                # cage, between our question and our transaction: ask again.
        raise NetworkError(
            f"{what}: the shared table `ip {TABLE}` kept appearing and vanishing over "
            f"{INSTALL_ATTEMPTS} attempts; is another program deleting it?"
        )

    @staticmethod
    def _exists(cage: CagePlan, e: nfnl.NfnlError) -> CageExistsError:
        return CageExistsError(
            f"nftables {e.what} already exists in table ip {TABLE}: a cage with this job "
            "id, or its leftover, is on the node; run `jobcage reap`"
        )

    def remove(self, cage: CagePlan) -> bool:
        hooks.check()
        self._remove_cage(cage, f"removing the rules of cage {cage.host_veth}")
        return self._remove_shared_if_unused()

    def _remove_cage(self, cage: CagePlan, what: str) -> None:
        try:
            nfnl.transact(cage_removal(cage))
        except nfnl.NfnlError as e:
            if e.errno != errno.ENOENT:
                raise _translate(e, what) from e
            # Partly gone already (an earlier teardown, or by hand): remove what is left,
            # one object at a time (each missing one costs an aborted transaction).
            self._remove_each(cage_removal(cage), what)

    @staticmethod
    def _remove_each(messages: Sequence[Message], what: str) -> None:
        for msg in messages:
            try:
                nfnl.transact([msg])
            except nfnl.NfnlError as e:
                if e.errno != errno.ENOENT:
                    raise _translate(e, what) from e

    def _remove_shared_if_unused(self) -> bool:
        what = "removing the shared nftables table of the cages"
        try:
            use = nfnl.table_use(TABLE)
            if use is None:
                return True
            if use > SHARED_OBJECTS:
                return False  # other cages' chains and counters are there
            # Atomic against a cage arriving meanwhile: then EBUSY, nothing changed.
            nfnl.transact(shared_removal())
            return True
        except nfnl.NfnlError as e:
            if e.errno == errno.EBUSY:
                return False
            if e.errno != errno.ENOENT:
                raise _translate(e, what) from e
        # Something shared is missing: the table is gone, or was edited by hand. Remove
        # what is left only if no cage's chain is there.
        chains = nfnl.dump_chains(TABLE)
        if any(c.startswith(CAGE_CHAIN_PREFIX) for c in chains):
            return False
        if not chains:
            # No chain when we looked: the table was gone (another last cage removed
            # it) or empty. A table there now may be a new first cage's (it makes the
            # table and its chains in one transaction): nothing more is ours to delete.
            return True
        self._remove_each(shared_removal()[:-1], what)
        try:
            nfnl.transact([nfnl.del_table(TABLE, only_if_empty=True)])
        except nfnl.NfnlError as e:
            if e.errno == errno.EBUSY:
                return False
            if e.errno != errno.ENOENT:
                raise _translate(e, what) from e
        return True

    def counters(self, cage: CagePlan) -> NetCounters:
        names = counter_names(cage)
        try:
            found = nfnl.get_counters(TABLE, list(names.values()))
        except nfnl.NfnlError as e:
            raise _translate(e, f"reading the counters of cage {cage.host_veth}") from e
        values = dict(zip(names, found, strict=True))
        missing = [names[c] for c, v in values.items() if v is None]
        if missing:
            raise NetworkError(
                f"the accounting counters {', '.join(missing)} of cage {cage.host_veth} are "
                f"gone (table ip {TABLE} deleted by hand, or `nft flush ruleset`?): its "
                "counters are lost"
            )
        return counters_by_class(values)  # type: ignore[arg-type]

    def counters_many(self, cages: Sequence[CagePlan]) -> dict[str, NetCounters | None]:
        try:
            everything = nfnl.dump_counters(TABLE)
        except nfnl.NfnlError as e:
            raise _translate(e, "reading the cages' counters") from e
        out: dict[str, NetCounters | None] = {}
        for cage in cages:
            values = {c: everything.get(n) for c, n in counter_names(cage).items()}
            whole = all(v is not None for v in values.values())
            out[cage.host_veth] = counters_by_class(values) if whole else None  # type: ignore[arg-type]
        return out

    def remove_orphan_chain(self, name: str) -> bool:
        if name and not name.startswith(CAGE_CHAIN_PREFIX):
            raise NetworkError(f"{name} is not a per-cage JobCage chain; not removing it")
        hooks.check()
        # Reap names each of a cage's four chains; the first call removes the cage
        # whole (its chains share the counters), the others find their chain gone.
        if name and name in nfnl.dump_chains(TABLE):
            cage_hash = name[len(CAGE_CHAIN_PREFIX) :].split("-", 1)[0]
            plan = CagePlan(
                cage_hash=cage_hash,
                host_veth=f"{VETH_PREFIX}{cage_hash}h",
                address="0.0.0.0",
                pool="0.0.0.0/32",
                campus_networks=(),
                allow_node_access=False,
            )
            self._remove_cage(plan, f"removing the orphaned chain {name}")
        return self._remove_shared_if_unused()

    def our_chains(self) -> dict[str, list[str]]:
        try:
            return {TABLE_LABEL: nfnl.dump_chains(TABLE)}
        except nfnl.NfnlError as e:
            raise _translate(e, f"listing table ip {TABLE}") from e


__all__ = [
    "TABLE",
    "TABLE_LABEL",
    "NftablesFirewall",
    "cage_messages",
    "rule_expressions",
    "shared_messages",
]

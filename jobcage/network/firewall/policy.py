"""The rule layout of the network cages, as plain data: what to install, and which
counters mean what. No kernel calls here, so it is unit-tested without root.

This is the x_tables layout, and the policy: the nftables backend (:mod:`.nftables_layout`)
lays the same policy and classes out as shared rules over per-cage set elements.

Layout (filter table; ``jc+`` matches every cage's node-side veth)::

    FORWARD      -i jc+ -j JOBCAGE-FWD-TX     (job -> anywhere but the node)
    FORWARD      -o jc+ -j JOBCAGE-FWD-RX     (anywhere -> job)
    INPUT        -i jc+ -j JOBCAGE-NODE-TX    (job -> the node itself)
    OUTPUT       -o jc+ -j JOBCAGE-NODE-RX    (the node itself -> job)

    JOBCAGE-FWD-TX    -i jc<h>h -j JC-<h>-FTX      one jump per cage in each of
    JOBCAGE-FWD-RX    -o jc<h>h -j JC-<h>-FRX      the four shared chains: the only
    JOBCAGE-NODE-TX   -i jc<h>h -j JC-<h>-NTX      part a packet walks that grows
    JOBCAGE-NODE-RX   -o jc<h>h -j JC-<h>-NRX      with the number of cages

    nat POSTROUTING   -s POOL -j JOBCAGE-POSTROUTING
    JOBCAGE-POSTROUTING  -o UPLINK -j MASQUERADE

Each per-cage chain ends in a verdict (ACCEPT, DROP or REJECT), so a packet that
entered it never comes back to walk the other cages' jumps; the packet and byte
counters of its ACCEPT rules are the job's accounting. Traffic of the node that is
not a cage's (``-i``/``-o`` not ``jc+``) skips all of it after one rule per builtin
chain.

Counters count IP packets as the kernel sees them in the filter hooks: the IP header
and everything above it, no Ethernet header; GRO/GSO super-packets count once.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from ...errors import ConfigError
from ...ids import VETH_PREFIX

# Shared chains, made with the first cage on a node and removed with the last.
FWD_TX_CHAIN = "JOBCAGE-FWD-TX"
FWD_RX_CHAIN = "JOBCAGE-FWD-RX"
NODE_TX_CHAIN = "JOBCAGE-NODE-TX"
NODE_RX_CHAIN = "JOBCAGE-NODE-RX"
NAT_CHAIN = "JOBCAGE-POSTROUTING"
SHARED_PREFIX = "JOBCAGE-"
# Per-cage chains: "JC-" + 12 hex digits of the job id's hash + a suffix; iptables
# chain names may be up to 28 bytes (XT_EXTENSION_MAXNAMELEN - 1 in the kernel's
# x_tables.h), these take 19.
CAGE_CHAIN_PREFIX = "JC-"
VETH_WILDCARD = VETH_PREFIX + "+"


def cage_hash_of(name: str) -> str:
    """The cage hash in a per-cage name (``JC-<hash>-...``: a chain, a counter)."""
    return name[len(CAGE_CHAIN_PREFIX) :].split("-", 1)[0]


# Which class a counting rule adds to.
LAN_TX, LAN_RX, WAN_TX, WAN_RX = "lan_tx", "lan_rx", "wan_tx", "wan_rx"

ESTABLISHED = "RELATED,ESTABLISHED"


@dataclass(frozen=True)
class NetCounters:
    """Bytes and packets of one job, split LAN/WAN; rx is into the job, tx out of it."""

    # None: lost (the rules were gone when the counts were to be read).
    net_lan_rx_bytes: int | None = 0
    net_lan_tx_bytes: int | None = 0
    net_wan_rx_bytes: int | None = 0
    net_wan_tx_bytes: int | None = 0
    net_lan_rx_packets: int | None = 0
    net_lan_tx_packets: int | None = 0
    net_wan_rx_packets: int | None = 0
    net_wan_tx_packets: int | None = 0
    # The IPv6 share of each figure above (which are the sums of both families); None
    # for a cage without IPv6, so a bill never shows a made-up 0.
    net_ipv6_lan_rx_bytes: int | None = dataclasses.field(default=None)
    net_ipv6_lan_tx_bytes: int | None = dataclasses.field(default=None)
    net_ipv6_wan_rx_bytes: int | None = dataclasses.field(default=None)
    net_ipv6_wan_tx_bytes: int | None = dataclasses.field(default=None)
    net_ipv6_lan_rx_packets: int | None = dataclasses.field(default=None)
    net_ipv6_lan_tx_packets: int | None = dataclasses.field(default=None)
    net_ipv6_wan_rx_packets: int | None = dataclasses.field(default=None)
    net_ipv6_wan_tx_packets: int | None = dataclasses.field(default=None)
    # How often the cage's rules were found gone (`nft flush ruleset`, a firewall
    # reload) and put back: the counts miss what passed meanwhile. 0: they are whole.
    net_counts_gaps: int = 0
    # When the counts start (Unix time): the last time the rules were put back, or
    # found gone; None while they were never lost.
    net_counted_since_unix: float | None = None

    def __add__(self, other: NetCounters) -> NetCounters:
        def add(a: int | None, b: int | None) -> int | None:
            # A billed figure lost on either side is lost.
            return None if a is None or b is None else a + b

        def plus(a: int | None, b: int | None) -> int | None:
            # An IPv6 share: None only when neither side had IPv6.
            return None if a is None and b is None else (a or 0) + (b or 0)

        since = [t for t in (self.net_counted_since_unix, other.net_counted_since_unix) if t]
        return NetCounters(
            **{name: add(getattr(self, name), getattr(other, name)) for name in BILLED_FIELDS},
            **{name: plus(getattr(self, name), getattr(other, name)) for name in IPV6_FIELDS},
            net_counts_gaps=self.net_counts_gaps + other.net_counts_gaps,
            net_counted_since_unix=max(since) if since else None,
        )

    def with_ipv6(self, ipv6: NetCounters) -> NetCounters:
        """These (IPv4) counters plus ``ipv6``'s: the sums, and the IPv6 share."""
        total = {name: getattr(self, name) + getattr(ipv6, name) for name in BILLED_FIELDS}
        share = {f"net_ipv6_{name[4:]}": getattr(ipv6, name) for name in BILLED_FIELDS}
        return NetCounters(**total, **share)

    def with_gaps(self, gaps: int, since: float | None) -> NetCounters:
        return dataclasses.replace(self, net_counts_gaps=gaps, net_counted_since_unix=since)

    @classmethod
    def lost(cls, gaps: int, since: float) -> NetCounters:
        """Counts that could not be read: every traffic figure None, never a made-up 0."""
        return cls(
            **dict.fromkeys(BILLED_FIELDS), net_counts_gaps=gaps, net_counted_since_unix=since
        )


BILLED_FIELDS = tuple(
    f"net_{cls}_{unit}"
    for unit in ("bytes", "packets")
    for cls in ("lan_rx", "lan_tx", "wan_rx", "wan_tx")
)
IPV6_FIELDS = tuple(f"net_ipv6_{name[4:]}" for name in BILLED_FIELDS)


@dataclass(frozen=True)
class RuleSpec:
    """One iptables rule, backend-neutral. ``None`` fields do not match on anything."""

    target: str
    in_interface: str | None = None
    out_interface: str | None = None
    source: str | None = None
    source_inverted: bool = False
    destination: str | None = None
    ctstate: str | None = None
    reject_with: str | None = None
    # The class this rule's counters add to; None for rules that do not count.
    counts: str | None = None
    comment: str | None = None  # `-m comment`: the installation owning the NAT

    def to_iptables(self) -> str:
        """The rule as `iptables -A` arguments: for docs, error texts and tests."""
        parts: list[str] = []
        if self.in_interface:
            parts += ["-i", self.in_interface]
        if self.out_interface:
            parts += ["-o", self.out_interface]
        if self.source:
            parts += (["!"] if self.source_inverted else []) + ["-s", self.source]
        if self.destination:
            parts += ["-d", self.destination]
        if self.ctstate:
            parts += ["-m", "conntrack", "--ctstate", self.ctstate]
        if self.comment:
            parts += ["-m", "comment", "--comment", repr(self.comment)]
        parts += ["-j", self.target]
        if self.reject_with:
            parts += ["--reject-with", self.reject_with]
        return " ".join(parts)


@dataclass(frozen=True)
class ChainSpec:
    name: str
    rules: tuple[RuleSpec, ...]


@dataclass(frozen=True)
class Jump:
    """A rule in ``chain`` (builtin or shared) whose target is one of our chains."""

    chain: str
    rule: RuleSpec


@dataclass(frozen=True)
class SharedPlan:
    """What every cage on the node shares: four filter chains, the NAT, the jumps."""

    pool: str
    uplink: str
    owner: str = ""  # see installation_owner

    @property
    def filter_chains(self) -> tuple[str, ...]:
        return (FWD_TX_CHAIN, FWD_RX_CHAIN, NODE_TX_CHAIN, NODE_RX_CHAIN)

    @property
    def filter_jumps(self) -> tuple[Jump, ...]:
        return (
            Jump("FORWARD", RuleSpec(FWD_TX_CHAIN, in_interface=VETH_WILDCARD)),
            Jump("FORWARD", RuleSpec(FWD_RX_CHAIN, out_interface=VETH_WILDCARD)),
            Jump("INPUT", RuleSpec(NODE_TX_CHAIN, in_interface=VETH_WILDCARD)),
            Jump("OUTPUT", RuleSpec(NODE_RX_CHAIN, out_interface=VETH_WILDCARD)),
        )

    @property
    def nat_chain(self) -> ChainSpec:
        masquerade = RuleSpec("MASQUERADE", out_interface=self.uplink, comment=self.owner or None)
        return ChainSpec(NAT_CHAIN, (masquerade,))

    @property
    def nat_jump(self) -> Jump:
        return Jump("POSTROUTING", RuleSpec(NAT_CHAIN, source=self.pool))


@dataclass(frozen=True)
class CagePlan:
    """Every chain and jump of one cage, and so which counter is which class."""

    cage_hash: str
    host_veth: str
    address: str  # the job's address, without prefix length
    pool: str
    # Parsed once, by the config (or a record's reader): one family, per plan.
    campus_networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]
    allow_node_access: bool
    # The installation whose shared rules this cage needs (installation_owner).
    owner: str = ""

    def chain_name(self, suffix: str) -> str:
        return f"{CAGE_CHAIN_PREFIX}{self.cage_hash}-{suffix}"

    @property
    def chains(self) -> tuple[ChainSpec, ...]:
        own = f"{self.address}/32"
        # The campus list is checked first; overlapping campus networks still count a
        # packet once because the first ACCEPT ends the chain.
        fwd_tx = [
            # Anti-spoof: only the cage's own address may leave its veth.
            RuleSpec("DROP", source=own, source_inverted=True),
            # Cage to cage: a job never reaches another job (the other cage's FRX chain
            # would drop it too). REJECT so the job fails at once, not at its timeout.
            RuleSpec("REJECT", destination=self.pool, reject_with="icmp-admin-prohibited"),
            *(
                RuleSpec("ACCEPT", destination=str(net), counts=LAN_TX)
                for net in self.campus_networks
            ),
            RuleSpec("ACCEPT", counts=WAN_TX),
        ]
        # Inbound: only replies to what the job opened. In FORWARD the reply has been
        # de-NATed already (conntrack, PREROUTING), so its source is the far host.
        fwd_rx = [
            *(
                RuleSpec("ACCEPT", source=str(net), ctstate=ESTABLISHED, counts=LAN_RX)
                for net in self.campus_networks
            ),
            RuleSpec("ACCEPT", ctstate=ESTABLISHED, counts=WAN_RX),
            RuleSpec("DROP"),
        ]
        # Job <-> node traffic never passes FORWARD; it is LAN by definition.
        node_tx = [
            RuleSpec("DROP", source=own, source_inverted=True),
            RuleSpec("ACCEPT", ctstate=ESTABLISHED, counts=LAN_TX),
            RuleSpec("ACCEPT", counts=LAN_TX)
            if self.allow_node_access
            # REJECT rather than DROP: a job that tries the node fails at once instead
            # of hanging in connect() until its timeout.
            else RuleSpec("REJECT", reject_with="icmp-admin-prohibited"),
        ]
        node_rx = [
            RuleSpec("ACCEPT", ctstate=ESTABLISHED, counts=LAN_RX),
            RuleSpec("DROP"),
        ]
        return (
            ChainSpec(self.chain_name("FTX"), tuple(fwd_tx)),
            ChainSpec(self.chain_name("FRX"), tuple(fwd_rx)),
            ChainSpec(self.chain_name("NTX"), tuple(node_tx)),
            ChainSpec(self.chain_name("NRX"), tuple(node_rx)),
        )

    @property
    def chain_names(self) -> tuple[str, ...]:
        return tuple(self.chain_name(s) for s in ("FTX", "FRX", "NTX", "NRX"))

    @property
    def jumps(self) -> tuple[Jump, ...]:
        ftx, frx, ntx, nrx = self.chain_names
        return (
            Jump(FWD_TX_CHAIN, RuleSpec(ftx, in_interface=self.host_veth)),
            Jump(FWD_RX_CHAIN, RuleSpec(frx, out_interface=self.host_veth)),
            Jump(NODE_TX_CHAIN, RuleSpec(ntx, in_interface=self.host_veth)),
            Jump(NODE_RX_CHAIN, RuleSpec(nrx, out_interface=self.host_veth)),
        )


def cage_plan(
    *,
    cage_hash: str,
    host_veth: str,
    address: ipaddress.IPv4Address | str,
    pool: str,
    campus_networks: Iterable[ipaddress.IPv4Network | ipaddress.IPv6Network],
    allow_node_access: bool,
    state_dir: str | None = None,
) -> CagePlan:
    # Either family: a dual-stack cage has a plan of each (the IPv6 one for nftables).
    pool = str(ipaddress.ip_network(pool))
    return CagePlan(
        cage_hash=cage_hash,
        host_veth=host_veth,
        address=str(address),
        pool=pool,
        campus_networks=tuple(campus_networks),
        allow_node_access=allow_node_access,
        owner=installation_owner(pool, state_dir) if state_dir else "",
    )


# What the owner text may hold: an x_tables comment and nft's table comment both end
# at 256 bytes with their NUL.
OWNER_MAX_BYTES = 240


def installation_owner(pool: str, state_dir: str) -> str:
    """The installation whose cages share the node's rules, as the rules carry it (a
    comment): one pool and one state dir a node. The shared rules cover one pool (NAT,
    cage to cage), and two state dirs lease the same addresses apart, so a second
    installation is refused rather than half served (see docs/network.md)."""
    text = f"address_pool {pool} state_dir {os.path.realpath(state_dir)}"
    return text.encode()[:OWNER_MAX_BYTES].decode(errors="ignore")


def installation_conflict(ours: str, theirs: str) -> ConfigError:
    """A cage refused because the node's shared rules serve another installation."""
    return ConfigError(
        f"this cage's {ours} cannot share the node with the running cages of {theirs}: "
        "a node's cages share one NAT and one cage-to-cage rule, for one pool and one state "
        "dir. Set address_pool and state_dir back to theirs, or change them only once "
        "those cages are gone (`jobcage list` with that state dir shows them)"
    )


def classify(plan: CagePlan, chain_counters: Sequence[Sequence[tuple[int, int]]]) -> NetCounters:
    """Sum (packets, bytes) per rule, given in the order of ``plan.chains``, by class.

    A chain whose counters are shorter than the plan (the rules were half removed) is
    summed as far as it goes: a bill must not invent bytes.
    """
    totals = {c: [0, 0] for c in (LAN_TX, LAN_RX, WAN_TX, WAN_RX)}
    for chain, counters in zip(plan.chains, chain_counters, strict=True):
        for rule, (packets, nbytes) in zip(chain.rules, counters, strict=False):
            if rule.counts is not None:
                totals[rule.counts][0] += packets
                totals[rule.counts][1] += nbytes
    return counters_by_class(totals)


def counters_by_class(totals: Mapping[str, Sequence[int]]) -> NetCounters:
    """NetCounters from class -> (packets, bytes), the classes being LAN_TX ... WAN_RX."""
    return NetCounters(
        net_lan_rx_bytes=totals[LAN_RX][1],
        net_lan_tx_bytes=totals[LAN_TX][1],
        net_wan_rx_bytes=totals[WAN_RX][1],
        net_wan_tx_bytes=totals[WAN_TX][1],
        net_lan_rx_packets=totals[LAN_RX][0],
        net_lan_tx_packets=totals[LAN_TX][0],
        net_wan_rx_packets=totals[WAN_RX][0],
        net_wan_tx_packets=totals[WAN_TX][0],
    )

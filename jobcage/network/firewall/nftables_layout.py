"""The cages' rules in an nftables table of their own, as nf_tables messages (no
kernel calls here: :mod:`.nftables` sends them).

Same policy and classes as the x_tables layout (:class:`~.policy.CagePlan`), laid out
so that nothing a cage does costs in proportion to the other cages on the node: the
rules are shared, and a cage is only elements of sets and maps, and its counters::

    table ip jobcage                     (JobCage's own: the node's tables untouched)
      counter JC-<h>-LAN-TX, -LAN-RX, -WAN-TX, -WAN-RX    (billed, one per class)
      counter JC-<h>-REFUSED-TX, -REFUSED-RX             (what its rules refused)
      map JOBCAGE-LAN-TX ... JOBCAGE-REFUSED-RX { ifname : counter }  veth -> its counter
      set JOBCAGE-ADDRESS { ifname . ipv4_addr }         veth . the job's address
      set JOBCAGE-NODE-ACCESS { ifname }                 cages with allow_node_access
      map JOBCAGE-CAGES { ifname : counter }             every veth -> JOBCAGE-CAGES,
                                                         whose use count is the cages'
      set JOBCAGE-CAMPUS-<id> { ipv4_addr; interval }    per campus list in use: its
      map JOBCAGE-CAMPUS-<id>-CAGES { ifname : counter } networks, its cages (each ->
      counter JOBCAGE-CAMPUS-<id>                        the list's counter: its use
                                                         count is the list's cages)
      chain JOBCAGE-FORWARD  hook forward:  iifname "jc*" jump JOBCAGE-FWD-TX
                                            oifname "jc*" jump JOBCAGE-FWD-RX
      chain JOBCAGE-INPUT / -OUTPUT  hook input / output: jump JOBCAGE-NODE-TX / -RX
      chain JOBCAGE-POSTROUTING  nat: ip saddr POOL oifname UPLINK masquerade
      chain JOBCAGE-FWD-TX   iifname . ip saddr != @JOBCAGE-ADDRESS  count REFUSED-TX, drop
                             ip daddr POOL  count REFUSED-TX, reject
                             jump JOBCAGE-FWD-TX-CAMPUS   (per list: iifname @<id>-CAGES
                                                 ip daddr @<id>  count LAN-TX, accept)
                             count WAN-TX, accept;  drop
      chain JOBCAGE-FWD-RX, -NODE-TX, -NODE-RX     likewise (see policy_rules)

"count X" is `counter name iifname map @JOBCAGE-X`: the veth's own counter. A veth
with no cage has no element, so no counting rule matches it and every chain's last
rule, DROP, takes it: fail closed.

* Adding a cage is one transaction of six counters and ten-odd elements; removing it
  another. The kernel does each in O(1) of the table's size: hash inserts, and no
  rule or jump changes, which would make the kernel validate the whole table (the
  per-cage-chain layout this replaced, cut to one chain a cage, cost 0.4 ms of kernel
  time per cage at 500 cages, and grew: tools/benchmarks/nft_layouts.py).
* A campus list is data shared by its cages: its first cage adds its two sets, its
  counter and two rules (found missing by one NFT_MSG_GETSET), the others one
  element; its last cage removes it (the counter's use count, one NFT_MSG_GETOBJ).
* A packet finds its cage by hash lookups, whatever the number of cages.
* A cage's usage is four NFT_MSG_GETOBJ (hash lookups); every cage's is one dump.
* The shared part is made with the first cage (NEWTABLE with NLM_F_EXCL: of two
  racing first cages, one wins and the other retries as a second cage) and removed
  with the last, atomically: a transaction deleting the shared chains and sets and
  then the table with NLM_F_NONREC fails with EBUSY, changing nothing, while any
  cage's counter or element remains. "Is it the last?" is one GETOBJ of
  JOBCAGE-CAGES (its use count), so no transaction is tried in vain.

An accept here does not bypass the node's own tables: a packet must also pass the
node's iptables (either flavour) and other nftables tables; `jobcage doctor` warns
when the node's forward policy would drop the cages' traffic.
"""

from __future__ import annotations

import functools
import hashlib
import ipaddress
import struct
from collections.abc import Container, Sequence

from ...netlink import nfexpr, nfnl
from ...netlink.core import Request
from .policy import (
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
)

_Network = ipaddress.IPv4Network | ipaddress.IPv6Network

TABLE = "jobcage"
TABLE_LABEL = f"ip {TABLE}"  # how `nft list` and records name it
FORWARD_CHAIN = "JOBCAGE-FORWARD"
INPUT_CHAIN = "JOBCAGE-INPUT"
OUTPUT_CHAIN = "JOBCAGE-OUTPUT"
BASE_CHAINS = (FORWARD_CHAIN, INPUT_CHAIN, OUTPUT_CHAIN, NAT_CHAIN)
POLICY_CHAINS = (FWD_TX_CHAIN, FWD_RX_CHAIN, NODE_TX_CHAIN, NODE_RX_CHAIN)
CAMPUS_TX_CHAIN, CAMPUS_RX_CHAIN = "JOBCAGE-FWD-TX-CAMPUS", "JOBCAGE-FWD-RX-CAMPUS"
# Sets: the per-cage facts the policy chains look up, keyed by the node-side veth.
ADDRESS_SET = "JOBCAGE-ADDRESS"  # veth . the job's address (anti-spoof)
# veth : the counter object of the same name, whose use count is so the number of cages.
CAGES = "JOBCAGE-CAGES"
NODE_ACCESS_SET = "JOBCAGE-NODE-ACCESS"  # veths of cages with allow_node_access
# Per campus list in use: its networks, and the veths of the cages using it.
CAMPUS_PREFIX, CAGES_SUFFIX = "JOBCAGE-CAMPUS-", "-CAGES"
# The installation (pool and state dir) the shared part serves: a set named after it,
# in which each cage's veth is an element. A cage of another installation names a set
# that is not there, and the kernel refuses its whole transaction.
OWNER_PREFIX = "JOBCAGE-OWNER-"
# Counter maps: veth -> the cage's counter of a class (and of what it refused).
REFUSED_TX, REFUSED_RX = "refused_tx", "refused_rx"
COUNTER_SUFFIXES = {
    LAN_TX: "LAN-TX",
    LAN_RX: "LAN-RX",
    WAN_TX: "WAN-TX",
    WAN_RX: "WAN-RX",
    REFUSED_TX: "REFUSED-TX",
    REFUSED_RX: "REFUSED-RX",
}
COUNTER_MAPS = {cls: f"JOBCAGE-{suffix}" for cls, suffix in COUNTER_SUFFIXES.items()}
CAGE_SETS = (CAGES, ADDRESS_SET, NODE_ACCESS_SET, *COUNTER_MAPS.values())
POLICY_AND_CAMPUS_CHAINS = (*POLICY_CHAINS, CAMPUS_TX_CHAIN, CAMPUS_RX_CHAIN)
FILTER_PRIORITY = 0
SRCNAT_PRIORITY = 100


# Registers: the interface name in the first 16 bytes, an address after it (so the
# two make the key of a concatenated set).
R_IFNAME = nfexpr.NFT_REG32_00
R_AFTER_IFNAME = nfexpr.NFT_REG32_00 + 4
SADDR, DADDR = 12, 16  # offsets in the IPv4 header
IFNAME_FIELD = (nfnl.TYPE_IFNAME, nfnl.IFNAMSIZ)
IPV4_FIELD = (nfnl.TYPE_IPADDR, 4)
# By IP version (ip6 jobcage is this layout over IPv6; the plan's addresses say which):
# (saddr, daddr) offsets in the header, the address field of a set key, the table.
OFFSETS = {4: (SADDR, DADDR), 6: (8, 24)}
ADDRESS_FIELDS = {4: IPV4_FIELD, 6: (nfnl.TYPE_IP6ADDR, 16)}
LABELS = {4: TABLE_LABEL, 6: f"ip6 {TABLE}"}
NFPROTOS = {4: nfnl.NFPROTO_IPV4, 6: nfnl.NFPROTO_IPV6}
ICMPV6 = 58
# Neighbour solicitation and advertisement; router solicitation to redirect.
ND_TYPES, ROUTER_TYPES = (135, 136), (133, 137)
HOP_LIMIT_OFFSET = 7  # in the IPv6 header


def owner_set(owner: str) -> str:
    return OWNER_PREFIX + hashlib.sha256(owner.encode()).hexdigest()[:16]


def counter_names(cage: CagePlan) -> dict[str, str]:
    """class -> the cage's counter object, of the four billed classes."""
    return {
        cls: cage.chain_name(COUNTER_SUFFIXES[cls]) for cls in (LAN_TX, LAN_RX, WAN_TX, WAN_RX)
    }


def all_counter_names(cage: CagePlan) -> dict[str, str]:
    """Its billed counters and the two of what it refused (for an administrator)."""
    return {cls: cage.chain_name(suffix) for cls, suffix in COUNTER_SUFFIXES.items()}


def campus_sets(networks: Sequence[_Network]) -> tuple[str, str]:
    """(networks, cages) set names of a campus list: the same list, in any order and
    with overlaps merged, has the same names, so cages with the same list share them."""
    return _campus_sets(tuple(networks))


@functools.lru_cache(maxsize=64)
def _campus_sets(networks: tuple[_Network, ...]) -> tuple[str, str]:
    # Asked at each install and removal: the merge and the hash are done once a list.
    canonical = ",".join(str(n) for n in _collapsed(networks))
    name = CAMPUS_PREFIX + hashlib.sha256(canonical.encode()).hexdigest()[:16]
    return name, name + CAGES_SUFFIX


def version_of(text: str) -> int:
    """4 or 6, of an address or a network: the family a plan's rules are for (the
    table's family itself is the firewall's, see nfnl.family)."""
    return ipaddress.ip_network(text, strict=False).version


def _collapsed(networks: Sequence[_Network]) -> list[_Network]:
    # A range set takes no overlapping elements; merged, the list matches the same.
    # A list is of one family (a cage's campus networks are split by family), parsed
    # once by the config.
    return list(ipaddress.collapse_addresses(networks))  # type: ignore[arg-type]


@functools.lru_cache(maxsize=16)
def campus_list_messages(networks: tuple[_Network, ...]) -> tuple[Request, ...]:
    """A campus list's two sets, its counter and the two rules that count its cages'
    LAN traffic. Made by the list's first cage, removed by its last (a rule change
    makes the kernel check the table: cheap once per list, not per cage)."""
    nets, cages = campus_sets(networks)
    version = version_of(networks[0])
    field, size = ADDRESS_FIELDS[version]
    saddr, daddr = OFFSETS[version]
    elements = []
    for net in _collapsed(networks):
        # A range is its first address and the first one after it, flagged its end
        # (an interval set's wire form; none after the last address there is).
        elements.append(nfnl.Element(net.network_address.packed))
        end = int(net.broadcast_address) + 1
        if end < 1 << (8 * size):
            elements.append(nfnl.Element(end.to_bytes(size, "big"), interval_end=True))
    msgs = [
        # A counter of the list's own name that each of its cages' elements refers
        # to: its use count tells the last cage of the list, in one GETOBJ.
        nfnl.new_counter(TABLE, nets),
        nfnl.new_set(TABLE, nets, 0, [(field, size)], interval=True),
        nfnl.new_set(TABLE, cages, 0, [IFNAME_FIELD], counters=True),
    ]
    if elements:
        msgs.append(nfnl.new_elements(TABLE, nets, elements, what=f"the networks of set {nets}"))
    iif, oif = nfexpr.NFT_META_IIFNAME, nfexpr.NFT_META_OIFNAME
    for chain, key, offset, cls in (
        (CAMPUS_TX_CHAIN, iif, daddr, LAN_TX),
        (CAMPUS_RX_CHAIN, oif, saddr, LAN_RX),
    ):
        rule = [
            nfexpr.meta_load(key, R_IFNAME),
            nfexpr.lookup(cages, R_IFNAME),
            nfexpr.payload_load(offset, size),
            nfexpr.lookup(nets, nfexpr.NFT_REG_1),
            *_count(key, cls),
            ACCEPT,
        ]
        msgs.append(nfnl.new_rule(TABLE, chain, rule))
    return tuple(msgs)


def _ct_established(established: bool = True) -> list[bytes]:
    """ct state established,related (or, with False, neither)."""
    bits = nfexpr.NF_CT_STATE_ESTABLISHED_BIT | nfexpr.NF_CT_STATE_RELATED_BIT
    return [
        nfexpr.ct_state_load(),
        nfexpr.bitwise_mask(4, struct.pack("=I", bits)),
        nfexpr.cmp(nfexpr.NFT_CMP_NEQ if established else nfexpr.NFT_CMP_EQ, b"\0\0\0\0"),
    ]


def _interface(key: int, name: str) -> list[bytes]:
    if name.endswith("+"):  # iptables' wildcard: compare the prefix only, as nft does
        return [nfexpr.meta_load(key), nfexpr.cmp(nfexpr.NFT_CMP_EQ, name[:-1].encode())]
    return [nfexpr.meta_load(key), nfexpr.cmp(nfexpr.NFT_CMP_EQ, nfnl.ifname(name))]


def _network(which: int, cidr: str) -> list[bytes]:
    """``which``: 0 the source, 1 the destination address is in ``cidr``."""
    net = ipaddress.ip_network(cidr)
    offset, size = OFFSETS[net.version][which], ADDRESS_FIELDS[net.version][1]
    if net.prefixlen == 0:
        return []  # every address: nothing to compare
    if net.prefixlen % 8 == 0:
        # Byte-aligned prefix: load only its bytes (nft itself does the same).
        size = net.prefixlen // 8
        return [
            nfexpr.payload_load(offset, size),
            nfexpr.cmp(nfexpr.NFT_CMP_EQ, net.network_address.packed[:size]),
        ]
    return [
        nfexpr.payload_load(offset, size),
        nfexpr.bitwise_mask(size, net.netmask.packed),
        nfexpr.cmp(nfexpr.NFT_CMP_EQ, net.network_address.packed),
    ]


def _count(key: int, cls: str) -> list[bytes]:
    """Load the veth's name and add to its cage's counter of ``cls``; a veth without a
    cage has no counter, and the rule does not match (so it falls to the chain's end)."""
    return [nfexpr.meta_load(key, R_IFNAME), nfexpr.objref_map(COUNTER_MAPS[cls], R_IFNAME)]


def _spoofed(key: int, version: int = 4) -> list[bytes]:
    return [
        nfexpr.meta_load(key, R_IFNAME),
        nfexpr.payload_load(OFFSETS[version][0], ADDRESS_FIELDS[version][1], R_AFTER_IFNAME),
        nfexpr.lookup(ADDRESS_SET, R_IFNAME, inverted=True),
    ]


ACCEPT = nfexpr.immediate_verdict(nfnl.NF_ACCEPT)
DROP = nfexpr.immediate_verdict(nfnl.NF_DROP)
REJECT = nfexpr.reject_admin_prohibited()
REJECTS = {4: REJECT, 6: nfexpr.reject_admin_prohibited(nfexpr.ICMPV6_ADM_PROHIBITED)}


def _icmpv6(types: tuple[int, int], *, link_only: bool = False) -> list[bytes]:
    """ICMPv6 of a type in ``types`` (first, last); ``link_only``: with hop limit 255,
    which only a packet from the link itself has (RFC 4861: neighbour discovery)."""
    first, last = types
    out = [
        nfexpr.meta_load(nfexpr.NFT_META_L4PROTO),
        nfexpr.cmp(nfexpr.NFT_CMP_EQ, bytes([ICMPV6])),
        nfexpr.payload_load(0, 1, base=nfexpr.NFT_PAYLOAD_TRANSPORT_HEADER),
        nfexpr.cmp(nfexpr.NFT_CMP_GTE, bytes([first])),
        nfexpr.cmp(nfexpr.NFT_CMP_LTE, bytes([last])),
    ]
    if link_only:
        out += [nfexpr.payload_load(HOP_LIMIT_OFFSET, 1), nfexpr.cmp(nfexpr.NFT_CMP_EQ, b"\xff")]
    return out


def policy_rules(pool: str) -> dict[str, list[list[bytes]]]:
    """The four policy chains: the same policy and classes as the x_tables layout's
    per-cage chains (:class:`~.policy.CagePlan`), for every cage at once. Each chain
    ends in DROP: a jc* veth without a cage's elements matches nothing before it."""
    iif, oif = nfexpr.NFT_META_IIFNAME, nfexpr.NFT_META_OIFNAME
    version = version_of(pool)
    reject = REJECTS[version]
    # IPv6 (ip6 jobcage): neighbour discovery between a cage and the node passes,
    # uncounted like ARP; a cage's router solicitations, advertisements and redirects
    # do not, even with node access (docs/network.md).
    nd_tx: list[list[bytes]] = []
    nd_rx: list[list[bytes]] = []
    if version == 6:
        nd_tx = [
            [*_icmpv6(ND_TYPES, link_only=True), ACCEPT],
            [*_icmpv6(ROUTER_TYPES), *_count(iif, REFUSED_TX), DROP],
        ]
        nd_rx = [[*_icmpv6(ND_TYPES, link_only=True), ACCEPT]]
    return {
        FWD_TX_CHAIN: [
            [*_spoofed(iif, version), *_count(iif, REFUSED_TX), DROP],
            # Cage to cage: REJECT, so the job fails at once, not at its timeout.
            [*_network(1, pool), *_count(iif, REFUSED_TX), reject],
            # The campus lists' rules: LAN_TX, ACCEPT if the cage's list has it.
            [nfexpr.immediate_verdict(nfnl.NFT_JUMP, CAMPUS_TX_CHAIN)],
            [*_count(iif, WAN_TX), ACCEPT],
            [DROP],
        ],
        # Inbound: only replies to what the job opened (already de-NATed here). The
        # rest is refused first, so a reply (most packets) tests its state once.
        FWD_RX_CHAIN: [
            [*_ct_established(False), *_count(oif, REFUSED_RX), DROP],
            [nfexpr.immediate_verdict(nfnl.NFT_JUMP, CAMPUS_RX_CHAIN)],
            [*_count(oif, WAN_RX), ACCEPT],
            [DROP],
        ],
        # Job <-> node never passes FORWARD; it is LAN by definition.
        NODE_TX_CHAIN: [
            [*_spoofed(iif, version), *_count(iif, REFUSED_TX), DROP],
            *nd_tx,
            [*_ct_established(), *_count(iif, LAN_TX), ACCEPT],
            [
                nfexpr.meta_load(iif, R_IFNAME),
                nfexpr.lookup(NODE_ACCESS_SET, R_IFNAME),
                *_count(iif, LAN_TX),
                ACCEPT,
            ],
            [*_count(iif, REFUSED_TX), reject],
            [DROP],
        ],
        NODE_RX_CHAIN: [
            *nd_rx,
            [*_ct_established(), *_count(oif, LAN_RX), ACCEPT],
            [*_count(oif, REFUSED_RX), DROP],
            [DROP],
        ],
    }


def shared_messages(pool: str, uplink: str, owner: str = "") -> list[Request]:
    """The table, its sets and chains: what every cage on the node shares; ``owner``
    (:func:`~.policy.installation_owner`) is the table's comment and names its owner set."""
    msgs = [
        nfnl.new_table(TABLE, exclusive=True, comment=owner),
        nfnl.new_counter(TABLE, CAGES),
    ]
    sets = [
        (CAGES, [IFNAME_FIELD], {"counters": True}),
        (ADDRESS_SET, [IFNAME_FIELD, ADDRESS_FIELDS[version_of(pool)]], {}),
        (NODE_ACCESS_SET, [IFNAME_FIELD], {}),
        *((name, [IFNAME_FIELD], {"counters": True}) for name in COUNTER_MAPS.values()),
    ]
    if owner:
        sets.append((owner_set(owner), [IFNAME_FIELD], {}))
    msgs += [nfnl.new_set(TABLE, name, i, key, **kw) for i, (name, key, kw) in enumerate(sets, 1)]
    hooked = [
        (FORWARD_CHAIN, nfnl.NF_INET_FORWARD),
        (INPUT_CHAIN, nfnl.NF_INET_LOCAL_IN),
        (OUTPUT_CHAIN, nfnl.NF_INET_LOCAL_OUT),
    ]
    msgs += [
        nfnl.new_chain(TABLE, name, hook=hook, priority=FILTER_PRIORITY) for name, hook in hooked
    ]
    msgs.append(
        nfnl.new_chain(
            TABLE,
            NAT_CHAIN,
            hook=nfnl.NF_INET_POST_ROUTING,
            priority=SRCNAT_PRIORITY,
            chain_type="nat",
        )
    )
    msgs += [nfnl.new_chain(TABLE, name) for name in POLICY_AND_CAMPUS_CHAINS]
    for chain, rules in policy_rules(pool).items():
        msgs += [nfnl.new_rule(TABLE, chain, rule) for rule in rules]
    iif, oif = nfexpr.NFT_META_IIFNAME, nfexpr.NFT_META_OIFNAME
    # From-a-job first in FORWARD, as in the x_tables layout: a packet between two
    # cages meets the sender's REJECT before the receiver's DROP.
    dispatch = [
        (FORWARD_CHAIN, iif, FWD_TX_CHAIN),
        (FORWARD_CHAIN, oif, FWD_RX_CHAIN),
        (INPUT_CHAIN, iif, NODE_TX_CHAIN),
        (OUTPUT_CHAIN, oif, NODE_RX_CHAIN),
    ]
    for chain, key, target in dispatch:
        jump = nfexpr.immediate_verdict(nfnl.NFT_JUMP, target)
        msgs.append(nfnl.new_rule(TABLE, chain, [*_interface(key, VETH_WILDCARD), jump]))
    if uplink:  # "": no NAT (IPv6 in routed mode: the cages' addresses are global)
        masq = [*_network(0, pool), *_interface(oif, uplink), nfexpr.masquerade()]
        msgs.append(nfnl.new_rule(TABLE, NAT_CHAIN, masq))
    return msgs


def _cage_elements(cage: CagePlan) -> list[tuple[str, list[nfnl.Element]]]:
    """set -> the cage's elements in it."""
    veth = nfnl.ifname(cage.host_veth)
    own = ipaddress.ip_address(cage.address).packed
    out = [(CAGES, [nfnl.Element(veth, counter=CAGES)]), (ADDRESS_SET, [nfnl.Element(veth + own)])]
    if cage.campus_networks:
        nets, cages = campus_sets(cage.campus_networks)
        out.append((cages, [nfnl.Element(veth, counter=nets)]))
    if cage.allow_node_access:
        out.append((NODE_ACCESS_SET, [nfnl.Element(veth)]))
    if cage.owner:
        out.append((owner_set(cage.owner), [nfnl.Element(veth)]))
    names = all_counter_names(cage)
    out += [(COUNTER_MAPS[cls], [nfnl.Element(veth, counter=name)]) for cls, name in names.items()]
    return out


def cage_messages(cage: CagePlan, *, with_campus_list: bool = False) -> list[Request]:
    """One cage: its six counters and its elements, O(1) in the kernel however many
    cages the table holds (no rule, no chain: nothing the kernel re-validates), and
    its campus list's sets and rules if it is the list's first cage."""
    what = f"cage {cage.host_veth}"
    msgs = [nfnl.new_counter(TABLE, name) for name in all_counter_names(cage).values()]
    if with_campus_list and cage.campus_networks:
        msgs += campus_list_messages(cage.campus_networks)
    msgs += [
        nfnl.new_elements(TABLE, name, elements, what=f"the element of {what} in set {name}")
        for name, elements in _cage_elements(cage)
    ]
    return msgs


def cage_removal(cage: CagePlan) -> list[Request]:
    what = f"cage {cage.host_veth}"
    msgs = [
        nfnl.del_elements(TABLE, name, elements, what=f"the element of {what} in set {name}")
        for name, elements in _cage_elements(cage)
    ]
    msgs += [nfnl.del_counter(TABLE, name) for name in all_counter_names(cage).values()]
    return msgs


def shared_removal(
    campus_lists: Sequence[str] = (),
    present: Container[tuple[str, str]] | None = None,
    owners: Sequence[str] = (),
) -> list[Request]:
    """Deletes the shared part, and fails with EBUSY (changing nothing) while a cage's
    counter or element is in the table. ``campus_lists`` (network set names) go with
    it: their networks are the lists' data, not a cage's; their cage sets must be empty.

    ``present``: ("chain" | "set" | "counter", name) of what a dump found, for a table
    edited by hand: only those are deleted, and the table is left to the caller."""

    def there(kind: str, name: str) -> bool:
        return present is None or (kind, name) in present

    msgs = [
        nfnl.del_chain(TABLE, name)
        for name in BASE_CHAINS + POLICY_AND_CAMPUS_CHAINS
        if there("chain", name)
    ]
    msgs += [
        nfnl.del_set(TABLE, name, only_if_empty=True)
        for name in (*CAGE_SETS, *owners)
        if there("set", name)
    ]
    for nets in campus_lists:
        if there("set", nets + CAGES_SUFFIX):
            msgs.append(nfnl.del_set(TABLE, nets + CAGES_SUFFIX, only_if_empty=True))
        if there("set", nets):
            msgs.append(nfnl.del_set(TABLE, nets, only_if_empty=False))
        if there("counter", nets):
            msgs.append(nfnl.del_counter(TABLE, nets))
    if there("counter", CAGES):
        msgs.append(nfnl.del_counter(TABLE, CAGES))
    if present is None:
        msgs.append(nfnl.del_table(TABLE, only_if_empty=True))
    return msgs

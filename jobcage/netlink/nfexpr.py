"""nf_tables expressions: the few a JobCage rule is made of, each the bytes of one
``NFTA_LIST_ELEM`` of a rule's ``NFTA_RULE_EXPRESSIONS``.

Attribute numbers are those of ``linux/netfilter/nf_tables.h`` (``enum nft_meta_attributes``
and the like), named as there. What a rule means is the layout's
(:mod:`jobcage.network.firewall.nftables_layout`); this module knows the wire only.
"""

from __future__ import annotations

from .core import attr, attr_be32, attr_str, nest
from .nfnl import NFTA_LIST_ELEM, value, verdict

# Registers (enum nft_registers).
NFT_REG_VERDICT, NFT_REG_1 = 0, 1
NFT_REG32_00 = 8  # the 4-byte registers: NFT_REG32_00 + n is bytes 4n.. of NFT_REG_1 on
# Expressions and their attributes.
NFTA_EXPR_NAME, NFTA_EXPR_DATA = 1, 2
NFTA_META_DREG, NFTA_META_KEY = 1, 2
NFT_META_IIFNAME, NFT_META_OIFNAME, NFT_META_L4PROTO = 6, 7, 16
NFTA_PAYLOAD_DREG, NFTA_PAYLOAD_BASE, NFTA_PAYLOAD_OFFSET, NFTA_PAYLOAD_LEN = 1, 2, 3, 4
NFT_PAYLOAD_NETWORK_HEADER, NFT_PAYLOAD_TRANSPORT_HEADER = 1, 2
NFTA_CMP_SREG, NFTA_CMP_OP, NFTA_CMP_DATA = 1, 2, 3
NFT_CMP_EQ, NFT_CMP_NEQ, NFT_CMP_LTE, NFT_CMP_GTE = 0, 1, 3, 5
NFTA_BITWISE_SREG, NFTA_BITWISE_DREG, NFTA_BITWISE_LEN = 1, 2, 3
NFTA_BITWISE_MASK, NFTA_BITWISE_XOR = 4, 5
NFTA_CT_DREG, NFTA_CT_KEY = 1, 2
NFT_CT_STATE = 0
# Conntrack state bits as the ct expression loads them (host byte order):
# NF_CT_STATE_BIT(IP_CT_ESTABLISHED) and NF_CT_STATE_BIT(IP_CT_RELATED).
NF_CT_STATE_ESTABLISHED_BIT, NF_CT_STATE_RELATED_BIT = 1 << 1, 1 << 2
NFTA_LOOKUP_SET, NFTA_LOOKUP_SREG, NFTA_LOOKUP_DREG, NFTA_LOOKUP_FLAGS = 1, 2, 3, 5
NFT_LOOKUP_F_INV = 1
NFTA_OBJREF_SET_SREG, NFTA_OBJREF_SET_NAME = 3, 4
NFTA_IMMEDIATE_DREG, NFTA_IMMEDIATE_DATA = 1, 2
NFTA_REJECT_TYPE, NFTA_REJECT_ICMP_CODE = 1, 2
NFT_REJECT_ICMP_UNREACH = 0
ICMP_PKT_FILTERED = 13  # linux/icmp.h: "administratively prohibited"
ICMPV6_ADM_PROHIBITED = 1  # linux/icmpv6.h


def expr(name: str, *data: bytes) -> bytes:
    return nest(NFTA_LIST_ELEM, attr_str(NFTA_EXPR_NAME, name), nest(NFTA_EXPR_DATA, *data))


def meta_load(key: int, dreg: int = NFT_REG_1) -> bytes:
    return expr("meta", attr_be32(NFTA_META_KEY, key), attr_be32(NFTA_META_DREG, dreg))


def payload_load(
    offset: int, length: int, dreg: int = NFT_REG_1, base: int = NFT_PAYLOAD_NETWORK_HEADER
) -> bytes:
    fields = (
        (NFTA_PAYLOAD_DREG, dreg),
        (NFTA_PAYLOAD_BASE, base),
        (NFTA_PAYLOAD_OFFSET, offset),
        (NFTA_PAYLOAD_LEN, length),
    )
    return expr("payload", *(attr_be32(kind, v) for kind, v in fields))


def cmp(op: int, data: bytes) -> bytes:
    compare = attr_be32(NFTA_CMP_SREG, NFT_REG_1) + attr_be32(NFTA_CMP_OP, op)
    return expr("cmp", compare, value(NFTA_CMP_DATA, data))


def bitwise_mask(length: int, mask: bytes) -> bytes:
    return expr(
        "bitwise",
        attr_be32(NFTA_BITWISE_SREG, NFT_REG_1),
        attr_be32(NFTA_BITWISE_DREG, NFT_REG_1),
        attr_be32(NFTA_BITWISE_LEN, length),
        value(NFTA_BITWISE_MASK, mask),
        value(NFTA_BITWISE_XOR, b"\0" * length),
    )


def ct_state_load() -> bytes:
    return expr("ct", attr_be32(NFTA_CT_DREG, NFT_REG_1), attr_be32(NFTA_CT_KEY, NFT_CT_STATE))


def lookup(set_name: str, sreg: int, *, dreg: int | None = None, inverted: bool = False) -> bytes:
    """Matches if the key in ``sreg`` on is in the set (not in it, ``inverted``); for a
    map, also loads the element's data into ``dreg``."""
    body = attr_str(NFTA_LOOKUP_SET, set_name) + attr_be32(NFTA_LOOKUP_SREG, sreg)
    if dreg is not None:
        body += attr_be32(NFTA_LOOKUP_DREG, dreg)
    if inverted:
        body += attr_be32(NFTA_LOOKUP_FLAGS, NFT_LOOKUP_F_INV)
    return expr("lookup", body)


def objref_map(set_name: str, sreg: int) -> bytes:
    """Adds to the counter that the map names for the key in ``sreg``; breaks the rule
    (no match) where the map has no such key."""
    return expr(
        "objref", attr_be32(NFTA_OBJREF_SET_SREG, sreg), attr_str(NFTA_OBJREF_SET_NAME, set_name)
    )


def immediate_verdict(code: int, chain: str | None = None) -> bytes:
    return expr(
        "immediate",
        attr_be32(NFTA_IMMEDIATE_DREG, NFT_REG_VERDICT),
        verdict(NFTA_IMMEDIATE_DATA, code, chain),
    )


def reject_admin_prohibited(code: int = ICMP_PKT_FILTERED) -> bytes:
    """ICMP unreachable (in an ip6 table ICMPv6, ``code`` ICMPV6_ADM_PROHIBITED)."""
    return expr(
        "reject",
        attr_be32(NFTA_REJECT_TYPE, NFT_REJECT_ICMP_UNREACH),
        attr(NFTA_REJECT_ICMP_CODE, bytes([code])),
    )


def masquerade() -> bytes:
    return expr("masq")

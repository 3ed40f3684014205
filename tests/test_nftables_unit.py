"""The nftables layout and its netlink encoding, without a kernel: what the policy
chains are made of, a cage's and a campus list's messages, and the order of a
transaction's messages. The kernel's reading of the same bytes is tested in
tests/test_nftables.py (`nft list` of a real table)."""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import struct

import pytest

from jobcage.config import load_config
from jobcage.errors import ConfigError, KernelFeatureError
from jobcage.netlink import core, nfchannel, nfexpr, nfnl
from jobcage.network.firewall.nftables import NftablesFirewall
from jobcage.network.firewall.nftables_layout import (
    CAGES,
    CAGES_SUFFIX,
    CAMPUS_PREFIX,
    COUNTER_MAPS,
    FWD_TX_CHAIN,
    all_counter_names,
    cage_messages,
    cage_removal,
    campus_list_messages,
    campus_sets,
    counter_names,
    policy_rules,
    shared_messages,
    shared_removal,
)
from jobcage.network.firewall.policy import LAN_TX, cage_plan


def parsed(*cidrs: str) -> tuple:
    """Campus networks as the config hands them on: parsed."""
    return tuple(ipaddress.ip_network(c) for c in cidrs)


def plan(campus=("192.0.2.0/24", "10.16.0.0/12"), allow_node_access=False):
    return cage_plan(
        cage_hash="0123456789ab",
        host_veth="jc0123456789abh",
        address="100.64.0.6",
        pool="100.64.0.0/16",
        campus_networks=parsed(*campus),
        allow_node_access=allow_node_access,
    )


def expressions(encoded: list[bytes]) -> list[tuple[str, dict[int, bytes]]]:
    """(name, attributes) of each encoded expression."""
    out = []
    for item in encoded:
        attrs = core.attrs(core.attrs(item)[nfnl.NFTA_LIST_ELEM])
        name = attrs[nfexpr.NFTA_EXPR_NAME].rstrip(b"\0").decode()
        out.append((name, core.attrs(attrs.get(nfexpr.NFTA_EXPR_DATA, b""))))
    return out


def names(encoded: list[bytes]) -> list[str]:
    return [name for name, _ in expressions(encoded)]


def data_value(attr: bytes) -> bytes:
    return core.attrs(attr)[nfnl.NFTA_DATA_VALUE]


def be32(raw: bytes) -> int:
    return struct.unpack(">I", raw)[0]


def message_attrs(msg: core.Request) -> dict[int, bytes]:
    return core.attrs(msg.body)


def test_attributes_are_padded_and_nested_attributes_flagged():
    assert core.attr(1, b"abc") == struct.pack("=HH", 7, 1) + b"abc\0"
    nested = core.nest(2, core.attr_be32(1, 5))
    length, kind = struct.unpack_from("=HH", nested)
    assert kind == 2 | core.NLA_F_NESTED and length == 12
    assert core.attrs(nested)[2] == core.attr_be32(1, 5)


def test_interface_names_fill_ifnamsiz_and_longer_ones_are_refused():
    assert nfnl.ifname("jc0123456789abh") == b"jc0123456789abh\0"
    with pytest.raises(ValueError, match="15 bytes"):
        nfnl.ifname("x" * 16)


def test_the_pool_is_compared_by_its_bytes_or_masked():
    aligned = expressions(policy_rules("100.64.0.0/16")[FWD_TX_CHAIN][1])
    (load, la), (cmp, ca) = aligned[:2]
    assert (load, be32(la[3]), be32(la[4])) == ("payload", 16, 2)  # daddr, 2 bytes
    assert (cmp, be32(ca[2]), data_value(ca[3])) == ("cmp", nfexpr.NFT_CMP_EQ, bytes([100, 64]))
    masked = expressions(policy_rules("100.64.0.0/10")[FWD_TX_CHAIN][1])
    assert [n for n, _ in masked[:3]] == ["payload", "bitwise", "cmp"]
    assert data_value(masked[1][1][4]) == bytes([255, 192, 0, 0])


def verdict(rule: list[bytes]) -> int | None:
    """The verdict code a rule ends with, if it ends with an immediate verdict."""
    name, attrs = expressions(rule)[-1]
    if name != "immediate":
        return None
    data = core.attrs(core.attrs(attrs[2])[nfnl.NFTA_DATA_VERDICT])
    return struct.unpack(">i", data[nfnl.NFTA_VERDICT_CODE])[0]


def test_every_policy_chain_ends_in_drop_and_counts_what_it_accepts():
    """Fail closed: a jc* veth without its cage's elements matches no counting rule
    (the counter map's lookup fails, so the rule does not match) and reaches the
    final DROP."""
    for chain, rules in policy_rules("100.64.0.0/16").items():
        assert names(rules[-1]) == ["immediate"] and verdict(rules[-1]) == nfnl.NF_DROP, chain
        for rule in rules[:-1]:
            if verdict(rule) in (nfnl.NF_ACCEPT, nfnl.NF_DROP):
                assert names(rule)[-3:-1] == ["meta", "objref"], (chain, names(rule))


def test_the_anti_spoof_lookup_is_inverted_over_veth_then_source():
    spoof = expressions(policy_rules("100.64.0.0/16")[FWD_TX_CHAIN][0])
    assert [n for n, _ in spoof] == ["meta", "payload", "lookup", "meta", "objref", "immediate"]
    meta, payload, lookup = spoof[0][1], spoof[1][1], spoof[2][1]
    assert be32(meta[1]) == nfexpr.NFT_REG32_00 and be32(payload[1]) == nfexpr.NFT_REG32_00 + 4
    assert be32(lookup[2]) == nfexpr.NFT_REG32_00 and be32(lookup[5]) == nfexpr.NFT_LOOKUP_F_INV


def test_dispatch_compares_the_jc_prefix_only():
    made = shared_messages("100.64.0.0/16", "eth0")
    dispatch = [
        m
        for m in made
        if m.kind == nfnl.NFT_MSG_NEWRULE
        and message_attrs(m)[nfnl.NFTA_RULE_CHAIN] == b"JOBCAGE-FORWARD\0"
    ]
    assert len(dispatch) == 2
    for rule in dispatch:
        exprs = [
            core.attrs(raw) for raw in core.each(message_attrs(rule)[nfnl.NFTA_RULE_EXPRESSIONS])
        ]
        cmp = core.attrs(exprs[1][nfexpr.NFTA_EXPR_DATA])
        assert data_value(cmp[3]) == b"jc"


def test_a_campus_list_is_named_by_its_networks_whatever_their_order_or_overlap():
    one = campus_sets(parsed("10.16.0.0/12", "192.0.2.0/24"))
    assert one == campus_sets(parsed("192.0.2.0/24", "10.16.0.0/12", "10.17.0.0/16"))
    assert one != campus_sets(parsed("192.0.2.0/24"))
    nets, cages = one
    assert nets.startswith(CAMPUS_PREFIX) and cages == nets + CAGES_SUFFIX


def test_campus_ranges_are_a_start_and_an_end_flagged_as_such():
    msgs = campus_list_messages(parsed("10.16.0.0/12", "0.0.0.0/0"))
    [elements] = [m for m in msgs if m.kind == nfnl.NFT_MSG_NEWSETELEM]
    # 0.0.0.0/0 swallows the rest: one range from 0.0.0.0 to the end, no end element.
    assert range_elements(elements) == [(bytes(4), False)]
    msgs = campus_list_messages(parsed("192.0.2.0/24"))
    kinds = [m.kind for m in msgs]
    assert kinds == [
        nfnl.NFT_MSG_NEWOBJ,  # the list's counter: its use count is the list's number of cages
        nfnl.NFT_MSG_NEWSET,
        nfnl.NFT_MSG_NEWSET,
        nfnl.NFT_MSG_NEWSETELEM,
        nfnl.NFT_MSG_NEWRULE,
        nfnl.NFT_MSG_NEWRULE,
    ]
    [elements] = [m for m in msgs if m.kind == nfnl.NFT_MSG_NEWSETELEM]
    assert bytes([192, 0, 2, 0]) in elements.body and bytes([192, 0, 3, 0]) in elements.body
    start, after = bytes([192, 0, 2, 0]), bytes([192, 0, 3, 0])
    assert range_elements(elements) == [(start, False), (after, True)]


def range_elements(msg: core.Request) -> list[tuple[bytes, bool]]:
    """(key, flagged as a range's end) of each element of a NEWSETELEM message."""
    listed = message_attrs(msg)[nfnl.NFTA_SET_ELEM_LIST_ELEMENTS]
    out = []
    for raw in core.each(listed):
        element = core.attrs(raw)
        key = data_value(element[nfnl.NFTA_SET_ELEM_KEY])
        flags = (
            be32(element[nfnl.NFTA_SET_ELEM_FLAGS]) if nfnl.NFTA_SET_ELEM_FLAGS in element else 0
        )
        out.append((key, bool(flags & nfnl.NFT_SET_ELEM_INTERVAL_END)))
    return out


def test_a_cage_is_counters_then_elements_every_one_exclusive():
    msgs = cage_messages(plan())
    kinds = [m.kind for m in msgs]
    assert kinds[:6] == [nfnl.NFT_MSG_NEWOBJ] * 6
    assert set(kinds[6:]) == {nfnl.NFT_MSG_NEWSETELEM}
    assert all(m.flags & core.NLM_F_EXCL for m in msgs)
    sets = [message_attrs(m)[nfnl.NFTA_SET_ELEM_LIST_SET].rstrip(b"\0").decode() for m in msgs[6:]]
    assert sets[0] == CAGES  # the count of cages that the last one's removal asks
    assert campus_sets(plan().campus_networks)[1] in sets
    assert set(COUNTER_MAPS.values()) <= set(sets)
    assert set(counter_names(plan()).values()) == {
        f"JC-0123456789ab-{c}" for c in ("LAN-TX", "LAN-RX", "WAN-TX", "WAN-RX")
    }
    assert counter_names(plan())[LAN_TX] == "JC-0123456789ab-LAN-TX"
    assert len(all_counter_names(plan())) == 6


def test_the_first_cage_of_a_campus_list_makes_its_sets_and_rules_before_joining():
    msgs = cage_messages(plan(), with_campus_list=True)
    kinds = [m.kind for m in msgs]
    first_rule = kinds.index(nfnl.NFT_MSG_NEWRULE)
    cages_set = campus_sets(plan().campus_networks)[1].encode()
    joins = [
        i for i, m in enumerate(msgs) if m.kind == nfnl.NFT_MSG_NEWSETELEM and cages_set in m.body
    ]
    assert kinds.count(nfnl.NFT_MSG_NEWSET) == 2 and first_rule < joins[0]
    assert cage_messages(plan(campus=()), with_campus_list=True) == cage_messages(plan(campus=()))


def test_removal_drops_the_elements_before_the_counters_they_name():
    kinds = [m.kind for m in cage_removal(plan(allow_node_access=True))]
    assert kinds == [nfnl.NFT_MSG_DELSETELEM] * 10 + [nfnl.NFT_MSG_DELOBJ] * 6


def test_the_shared_part_is_made_exclusively_and_removed_only_if_empty():
    made = shared_messages("100.64.0.0/16", "eth0")
    assert made[0].kind == nfnl.NFT_MSG_NEWTABLE and made[0].flags & core.NLM_F_EXCL
    nets = campus_sets(parsed("192.0.2.0/24"))[0]
    removal = shared_removal([nets])
    assert removal[-1].kind == nfnl.NFT_MSG_DELTABLE and removal[-1].flags & core.NLM_F_NONREC
    only_if_empty = {
        message_attrs(m)[nfnl.NFTA_SET_NAME].rstrip(b"\0").decode()
        for m in removal
        if m.kind == nfnl.NFT_MSG_DELSET and m.flags & core.NLM_F_NONREC
    }
    # Every set a cage has an element in; a list's networks are not a cage's.
    assert CAGES in only_if_empty and nets + CAGES_SUFFIX in only_if_empty
    assert nets not in only_if_empty


def test_kernel_errors_name_the_message_and_carry_extended_ack_text():
    text = core.attr(1, b"Chain not found\0")
    flags = 0x100 | 0x200  # NLM_F_CAPPED | NLM_F_ACK_TLVS: the request echoed is its header
    body = struct.pack("=i", -2) + b"\0" * 16 + text
    message = struct.pack("=IHHII", 16 + len(body), core.NLMSG_ERROR, flags, 7, 0) + body
    [(kind, got_flags, seq, _, whole)] = nfchannel._messages(message)
    assert (kind, seq) == (core.NLMSG_ERROR, 7)
    assert core.error_of(whole, got_flags) == (2, "Chain not found")
    error = core.NetlinkError(2, "chain JC-x-FTX", "Chain not found")
    assert "chain JC-x-FTX" in str(error) and error.errno == 2


def test_firewall_setting_is_checked():
    assert load_config(environ={}).firewall == "auto"
    assert load_config(environ={"JOBCAGE_FIREWALL": "iptables-legacy"}).firewall == (
        "iptables-legacy"
    )
    with pytest.raises(ConfigError, match="nftables"):
        load_config(environ={"JOBCAGE_FIREWALL": "pf"})


class _FakeKernel:
    """Answers a batch the way nfnetlink does when its commit fails: every message
    acked with 0, then an error on the batch's begin."""

    def __init__(self, commit_errno: int) -> None:
        self.commit_errno = commit_errno
        self.answers: list[bytes] = []

    def sendall(self, batch: bytes) -> None:
        seqs = [seq for _, _, seq, _, _ in nfchannel._messages(batch)]
        begin, messages = seqs[0], seqs[1:-1]
        for seq, code in [*((s, 0) for s in messages), (begin, -self.commit_errno)]:
            body = struct.pack("=i", code) + b"\0" * 16
            self.answers.append(
                struct.pack("=IHHII", 16 + len(body), core.NLMSG_ERROR, 0x100, seq, 0) + body
            )

    def recv(self, size: int, flags: int = 0) -> bytes:
        if not self.answers:
            raise BlockingIOError
        return self.answers.pop(0)


def test_a_commit_that_fails_after_every_message_was_acked_is_a_failure(monkeypatch):
    kernel = _FakeKernel(errno.ENOMEM)

    @contextlib.contextmanager
    def use():
        yield kernel

    monkeypatch.setattr(nfchannel._channel, "use", use)
    with pytest.raises(core.NetlinkError, match="transaction") as failed:
        nfchannel.transact([nfnl.new_counter("jobcage", "JC-x-LAN-TX")])
    assert failed.value.errno == errno.ENOMEM


def test_a_rule_refused_for_a_missing_expression_module_names_the_kernel_feature(monkeypatch):
    """The kernel answers ENOENT both for a missing chain (a race with the last cage)
    and for an expression it has no module for: the chain being there tells them apart."""
    chains = ["JOBCAGE-FWD-TX-CAMPUS"]
    monkeypatch.setattr(nfchannel, "table_use", lambda table: 30)
    monkeypatch.setattr(nfchannel, "set_exists", lambda table, name: False)
    monkeypatch.setattr(nfchannel, "dump_chains", lambda table: chains)

    def refuse(messages):
        raise core.NetlinkError(errno.ENOENT, "a rule of chain JOBCAGE-FWD-TX-CAMPUS")

    monkeypatch.setattr(nfchannel, "transact", refuse)
    monkeypatch.setattr("jobcage.network.hooks.check", lambda: None)
    with pytest.raises(KernelFeatureError, match="CONFIG_NFT_OBJREF"):
        NftablesFirewall().install(plan(), "100.64.0.0/16", lambda: "eth0")
    chains.clear()  # the chain is gone: another process removed the table meanwhile
    with pytest.raises(Exception, match="kept appearing and vanishing"):
        NftablesFirewall().install(plan(), "100.64.0.0/16", lambda: "eth0")

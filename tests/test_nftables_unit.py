"""The nftables layout and its netlink encoding, without a kernel: what each plan rule
becomes, and the order of a transaction's messages. The kernel's reading of the same
bytes is tested in tests/test_nftables.py (`nft list` of a real table)."""

from __future__ import annotations

import contextlib
import errno
import struct

import pytest

from jobcage.config import load_config
from jobcage.errors import ConfigError
from jobcage.network import nfnl
from jobcage.network.nftables import (
    BASE_CHAINS,
    MAPS,
    SHARED_OBJECTS,
    cage_messages,
    cage_removal,
    counter_names,
    rule_expressions,
    shared_messages,
    shared_removal,
)
from jobcage.network.rules import LAN_TX, WAN_RX, RuleSpec, cage_plan


def plan(campus=("192.0.2.0/24", "10.16.0.0/12")):
    return cage_plan(
        cage_hash="0123456789ab",
        host_veth="jc0123456789abh",
        address="100.64.0.6",
        pool="100.64.0.0/16",
        campus_networks=campus,
        allow_node_access=False,
    )


def expressions(encoded: list[bytes]) -> list[tuple[str, dict[int, bytes]]]:
    """(name, attributes) of each encoded expression."""
    out = []
    for item in encoded:
        attrs = nfnl.parse_attrs(nfnl.parse_attrs(item)[nfnl.LIST_ELEM])
        name = attrs[nfnl.EXPR_NAME].rstrip(b"\0").decode()
        out.append((name, nfnl.parse_attrs(attrs.get(nfnl.EXPR_DATA, b""))))
    return out


def data_value(attr: bytes) -> bytes:
    return nfnl.parse_attrs(attr)[nfnl.DATA_VALUE]


def be32(raw: bytes) -> int:
    return struct.unpack(">I", raw)[0]


def test_attributes_are_padded_and_nested_attributes_flagged():
    assert nfnl.attr(1, b"abc") == struct.pack("=HH", 7, 1) + b"abc\0"
    nested = nfnl.nest(2, nfnl.be32(1, 5))
    length, kind = struct.unpack_from("=HH", nested)
    assert kind == 2 | nfnl.NLA_F_NESTED and length == 12
    assert nfnl.parse_attrs(nested)[2] == nfnl.be32(1, 5)


def test_interface_names_fill_ifnamsiz_and_longer_ones_are_refused():
    assert nfnl.ifname("jc0123456789abh") == b"jc0123456789abh\0"
    with pytest.raises(ValueError, match="15 bytes"):
        nfnl.ifname("x" * 16)


def test_a_byte_aligned_prefix_loads_only_its_bytes():
    [(load, la), (cmp, ca), *_] = expressions(
        rule_expressions(RuleSpec("ACCEPT", destination="192.0.2.0/24"), {})
    )
    assert (load, be32(la[3]), be32(la[4])) == ("payload", 16, 3)  # daddr, 3 bytes
    assert (cmp, be32(ca[2]), data_value(ca[3])) == ("cmp", nfnl.CMP_EQ, bytes([192, 0, 2]))


def test_other_prefixes_are_masked():
    found = expressions(rule_expressions(RuleSpec("DROP", source="10.16.0.0/12"), {}))
    assert [name for name, _ in found] == ["payload", "bitwise", "cmp", "counter", "immediate"]
    assert data_value(found[1][1][4]) == bytes([255, 240, 0, 0])
    assert data_value(found[2][1][3]) == bytes([10, 16, 0, 0])


def test_inverted_source_compares_not_equal_and_inverted_everything_is_refused():
    [_, (_, ca), *_] = expressions(
        rule_expressions(RuleSpec("DROP", source="100.64.0.6/32", source_inverted=True), {})
    )
    assert be32(ca[2]) == nfnl.CMP_NEQ and data_value(ca[3]) == bytes([100, 64, 0, 6])
    with pytest.raises(ValueError, match="matches no packet"):
        rule_expressions(RuleSpec("DROP", source="0.0.0.0/0", source_inverted=True), {})


def test_an_iptables_wildcard_compares_the_prefix_only():
    [_, (_, ca), *_] = expressions(rule_expressions(RuleSpec("DROP", in_interface="jc+"), {}))
    assert data_value(ca[3]) == b"jc"


def test_counting_accepts_name_the_cage_counter_and_established_is_a_mask():
    counters = {WAN_RX: "JC-x-WAN-RX"}
    spec = RuleSpec("ACCEPT", ctstate="RELATED,ESTABLISHED", counts=WAN_RX)
    found = expressions(rule_expressions(spec, counters))
    assert [name for name, _ in found] == ["ct", "bitwise", "cmp", "objref", "immediate"]
    assert data_value(found[1][1][4]) == struct.pack("=I", 0b110)
    assert found[3][1][2] == b"JC-x-WAN-RX\0"


def test_reject_is_icmp_admin_prohibited_and_other_rejects_are_refused():
    found = expressions(
        rule_expressions(RuleSpec("REJECT", reject_with="icmp-admin-prohibited"), {})
    )
    assert found[-1][0] == "reject" and found[-1][1][2][:1] == bytes([13])
    with pytest.raises(ValueError):
        rule_expressions(RuleSpec("REJECT", reject_with="tcp-reset"), {})


def test_cage_transaction_makes_counters_before_the_rules_that_name_them():
    msgs = cage_messages(plan())
    kinds = [m.kind for m in msgs]
    assert kinds[:4] == [nfnl.NEWOBJ] * 4
    assert kinds[4:8] == [nfnl.NEWCHAIN] * 4
    assert kinds[-4:] == [nfnl.NEWSETELEM] * 4
    # Every chain is exclusive: a second cage of the same job fails whole.
    assert all(m.flags & nfnl.NLM_F_EXCL for m in msgs if m.kind == nfnl.NEWCHAIN)
    assert set(counter_names(plan()).values()) == {
        f"JC-0123456789ab-{c}" for c in ("LAN-TX", "LAN-RX", "WAN-TX", "WAN-RX")
    }
    assert counter_names(plan())[LAN_TX] == "JC-0123456789ab-LAN-TX"


def test_removal_drops_the_map_elements_before_the_chains_they_jump_to():
    kinds = [m.kind for m in cage_removal(plan())]
    assert kinds == [nfnl.DELSETELEM] * 4 + [nfnl.DELCHAIN] * 4 + [nfnl.DELOBJ] * 4


def test_the_shared_part_is_made_exclusively_and_removed_only_if_empty():
    made = shared_messages("100.64.0.0/16", "eth0")
    assert made[0].kind == nfnl.NEWTABLE and made[0].flags & nfnl.NLM_F_EXCL
    assert SHARED_OBJECTS == len(MAPS) + len(BASE_CHAINS) == 8
    removal = shared_removal()
    assert removal[-1].kind == nfnl.DELTABLE and removal[-1].flags & nfnl.NLM_F_NONREC
    assert all(m.flags & nfnl.NLM_F_NONREC for m in removal if m.kind == nfnl.DELSET)


def test_kernel_errors_name_the_message_and_carry_extended_ack_text():
    text = nfnl.attr(1, b"Chain not found\0")
    flags = 0x100 | 0x200  # NLM_F_CAPPED | NLM_F_ACK_TLVS: the request echoed is its header
    body = struct.pack("=i", -2) + b"\0" * 16 + text
    message = struct.pack("=IHHII", 16 + len(body), nfnl.NLMSG_ERROR, flags, 7, 0) + body
    [(kind, got_flags, seq, _, whole)] = nfnl._messages(message)
    assert (kind, seq) == (nfnl.NLMSG_ERROR, 7)
    assert nfnl.error_of(whole, got_flags) == (2, "Chain not found")
    error = nfnl.NfnlError(2, "chain JC-x-FTX", "Chain not found")
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
        seqs = [seq for _, _, seq, _, _ in nfnl._messages(batch)]
        begin, messages = seqs[0], seqs[1:-1]
        for seq, code in [*((s, 0) for s in messages), (begin, -self.commit_errno)]:
            body = struct.pack("=i", code) + b"\0" * 16
            self.answers.append(
                struct.pack("=IHHII", 16 + len(body), nfnl.NLMSG_ERROR, 0x100, seq, 0) + body
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

    monkeypatch.setattr(nfnl._channel, "use", use)
    with pytest.raises(nfnl.NfnlError, match="transaction") as failed:
        nfnl.transact([nfnl.new_counter("jobcage", "JC-x-LAN-TX")])
    assert failed.value.errno == errno.ENOMEM

"""The floor of a networked cage: the same kernel objects JobCage makes, made and
removed with the fewest calls from Python, sharing no code with jobcage.network.

* netns: a thread unshare()s and bind-mounts /proc/thread-self/ns/net (what
  `ip netns add` does, without exec);
* links: one raw rtnetlink write from inside the netns (veth with the node-side peer
  born in the node, eth0 up, lo up, address, default route: 4 messages), then on the
  node side one RTM_GETLINK (the peer's index) and one write of RTM_NEWADDR + up;
* rules, x_tables: the cage's 17 rules (plus the shared chains and NAT, as JobCage
  installs them with the first cage) in one `iptables-legacy-restore --noflush`,
  removed by another;
* rules, nftables: the same table JobCage makes, shared part included, as one
  transaction in and two out (the cage, then the shared part), its bytes built
  before the clock starts (with JobCage's own encoder: the encoding is not what is
  measured) and sent over a socket kept open;
* teardown: unmount the netns (the kernel deletes both veth ends).
"""

from __future__ import annotations

import ctypes
import ipaddress
import os
import socket
import struct
import subprocess
import threading

from jobcage.network.firewall.policy import NAT_CHAIN, CagePlan, SharedPlan

CLONE_NEWNET = 0x40000000
MS_BIND = 4096
MNT_DETACH = 2
_libc = ctypes.CDLL(None, use_errno=True)

RTM_NEWLINK, RTM_GETLINK, RTM_NEWADDR, RTM_NEWROUTE = 16, 18, 20, 24
NLM_F_REQUEST, NLM_F_ACK, NLM_F_EXCL, NLM_F_CREATE = 1, 4, 0x200, 0x400
NLMSG_ERROR = 2
IFF_UP = 1
IFLA_IFNAME, IFLA_LINKINFO, IFLA_NET_NS_FD = 3, 18, 28
IFLA_INFO_KIND, IFLA_INFO_DATA, VETH_INFO_PEER = 1, 2, 1
IFA_ADDRESS, IFA_LOCAL = 1, 2
RTA_GATEWAY = 5


def _attr(kind: int, data: bytes) -> bytes:
    body = struct.pack("=HH", 4 + len(data), kind) + data
    return body + b"\0" * (-len(body) % 4)


def _ifinfo(index: int = 0, up: bool = False) -> bytes:
    return struct.pack("=BxHiII", 0, 0, index, IFF_UP if up else 0, IFF_UP if up else 0)


def _msg(kind: int, flags: int, seq: int, body: bytes) -> bytes:
    return struct.pack("=IHHII", 16 + len(body), kind, flags | NLM_F_REQUEST, seq, 0) + body


def _addr(index: int, iface: ipaddress.IPv4Interface) -> bytes:
    packed = iface.ip.packed
    body = struct.pack("=BBBBI", socket.AF_INET, iface.network.prefixlen, 0, 0, index)
    return body + _attr(IFA_LOCAL, packed) + _attr(IFA_ADDRESS, packed)


def _talk(messages: list[bytes]) -> list[bytes]:
    """Send every message in one write; wait for each one's answer (ack or reply)."""
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE) as s:
        s.sendall(b"".join(messages))
        answers: list[bytes] = []
        while len(answers) < len(messages):
            data = s.recv(65536)
            at = 0
            while at < len(data):
                length, kind = struct.unpack_from("=IH", data, at)
                if kind == NLMSG_ERROR:
                    (error,) = struct.unpack_from("=i", data, at + 16)
                    if error:
                        raise OSError(-error, os.strerror(-error))
                answers.append(data[at : at + length])
                at += (length + 3) & ~3
        return answers


def build_links(netns_path: str, host_veth: str, host, job) -> None:
    """Everything of the netns side in two netlink writes."""
    failure: list[BaseException] = []
    node_fd = os.open("/proc/thread-self/ns/net", os.O_RDONLY)

    def inside() -> None:
        try:
            if _libc.unshare(CLONE_NEWNET):
                raise OSError(ctypes.get_errno(), "unshare")
            os.close(os.open(netns_path, os.O_RDONLY | os.O_CREAT | os.O_EXCL, 0))
            mounted = _libc.mount(
                b"/proc/thread-self/ns/net", netns_path.encode(), b"none", MS_BIND, None
            )
            if mounted:
                raise OSError(ctypes.get_errno(), "bind mount")
            # The peer cannot be brought up in this request: veth_newlink configures
            # it before the two ends are linked, so veth_open fails with ENOTCONN.
            peer = (
                _ifinfo()
                + _attr(IFLA_IFNAME, host_veth.encode() + b"\0")
                + _attr(IFLA_NET_NS_FD, struct.pack("=I", node_fd))
            )
            info = _attr(IFLA_INFO_KIND, b"veth") + _attr(
                IFLA_INFO_DATA, _attr(VETH_INFO_PEER, peer)
            )
            create = NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL
            route = struct.pack("=BBBBBBBBI", socket.AF_INET, 0, 0, 0, 254, 3, 0, 1, 0)
            _talk(
                [
                    _msg(
                        RTM_NEWLINK,
                        create,
                        1,
                        _ifinfo(2, up=True)
                        + _attr(IFLA_IFNAME, b"eth0\0")
                        + _attr(IFLA_LINKINFO, info),
                    ),
                    _msg(RTM_NEWLINK, NLM_F_ACK, 2, _ifinfo(1, up=True)),
                    _msg(RTM_NEWADDR, create, 3, _addr(2, job)),
                    _msg(RTM_NEWROUTE, create, 4, route + _attr(RTA_GATEWAY, host.ip.packed)),
                ]
            )
        except BaseException as e:
            failure.append(e)

    try:
        thread = threading.Thread(target=inside)
        thread.start()
        thread.join()
        if failure:
            raise failure[0]
        (reply,) = _talk(
            [_msg(RTM_GETLINK, 0, 1, _ifinfo() + _attr(IFLA_IFNAME, host_veth.encode() + b"\0"))]
        )
        (index,) = struct.unpack_from("=i", reply, 16 + 4)
        _talk(
            [
                _msg(RTM_NEWADDR, NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL, 2, _addr(index, host)),
                _msg(RTM_NEWLINK, NLM_F_ACK, 3, _ifinfo(index, up=True)),
            ]
        )
    finally:
        os.close(node_fd)


def remove_netns(netns_path: str) -> None:
    _libc.umount2(netns_path.encode(), MNT_DETACH)
    os.unlink(netns_path)


def restore_input(plan: CagePlan, shared: SharedPlan, add: bool) -> str:
    """iptables-restore text that installs (or removes) the cage with the shared part,
    as JobCage does for the first (last) cage on a node."""
    if add:
        filt = [f":{c} - [0:0]" for c in shared.filter_chains + plan.chain_names]
        filt += [f"-A {c} -j DROP" for c in shared.filter_chains]
        filt += [f"-I {j.chain} -{'i' if j.rule.in_interface else 'o'} jc+ -j {j.rule.target}"
                 for j in reversed(shared.filter_jumps)]  # fmt: skip
        for chain in plan.chains:
            filt += [f"-A {chain.name} {r.to_iptables()}" for r in chain.rules]
        filt += [f"-I {j.chain} {j.rule.to_iptables()}" for j in plan.jumps]
        masquerade = shared.nat_chain.rules[0].to_iptables()
        nat = [f":{NAT_CHAIN} - [0:0]", f"-A {NAT_CHAIN} {masquerade}",
               f"-I POSTROUTING {shared.nat_jump.rule.to_iptables()}"]  # fmt: skip
    else:
        filt = [f"-D {j.chain} {j.rule.to_iptables()}" for j in plan.jumps]
        filt += [f"-D {j.chain} {j.rule.to_iptables()}" for j in shared.filter_jumps]
        filt += [f"-F {c}" for c in plan.chain_names + shared.filter_chains]
        filt += [f"-X {c}" for c in plan.chain_names + shared.filter_chains]
        nat = [f"-D POSTROUTING {shared.nat_jump.rule.to_iptables()}", f"-F {NAT_CHAIN}",
               f"-X {NAT_CHAIN}"]  # fmt: skip
    return "\n".join(["*filter", *filt, "COMMIT", "*nat", *nat, "COMMIT", ""])


def restore(text: str) -> None:
    subprocess.run(["iptables-legacy-restore", "--noflush", "-w"], input=text.encode(), check=True)


class NftFloor:
    """One nftables transaction in, one out, over a socket kept open (as libnftables
    keeps its own: closing one after a delete waits for the kernel's cleanup)."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 12)  # NETFILTER
        self.sock.bind((0, 0))

    @staticmethod
    def batches(plan: CagePlan, shared: SharedPlan) -> tuple[list, list]:
        """(install, remove) for the node's only cage, each a list of (bytes, number
        of messages). Removal is two transactions: a set's element count drops only at
        commit, so the maps' "only if empty" delete must come after the elements'."""
        from jobcage.netlink import nfnl
        from jobcage.network.firewall import nftables_layout as layout

        add = layout.shared_messages(shared.pool, shared.uplink)
        add += layout.cage_messages(plan, with_campus_list=True)
        lists = [layout.campus_sets(plan.campus_networks)[0]] if plan.campus_networks else []
        removals = [layout.cage_removal(plan), layout.shared_removal(lists)]
        return (
            [(nfnl.batch_bytes(add), len(add))],
            [(nfnl.batch_bytes(m), len(m)) for m in removals],
        )

    def send(self, batches: list) -> None:
        for batch, answers in batches:
            self.sock.sendall(batch)
            for _ in range(answers):
                data = self.sock.recv(65536)
                (error,) = struct.unpack_from("=i", data, 16)
                if error:
                    raise OSError(-error, os.strerror(-error))

    def close(self) -> None:
        self.sock.close()


def setns(fd: int) -> None:
    """setns(2) into a network namespace (os.setns is Python 3.12+)."""
    if _libc.setns(fd, CLONE_NEWNET):
        raise OSError(ctypes.get_errno(), "setns")

"""The addresses and routes of a cage's veth ends beyond what every cage gets: a
dual-stack cage's IPv6 in the cage, and the node side's addresses (both families),
as rtnetlink requests that netns sends in its batches."""

from __future__ import annotations

import ipaddress

from ..netlink import rtnl

JOB_IFINDEX = 2  # eth0, as netns numbers it


def cage_ipv6(
    job_address6: ipaddress.IPv6Interface | None, host_address6: ipaddress.IPv6Interface | None
) -> list[rtnl.Request]:
    """A dual-stack cage's IPv6: its address and a default route via the node side's
    address (no link-local address on either end, no router advertisement: the
    route is written, not learnt, and nothing on the veth needs fe80::/10)."""
    if job_address6 is None or host_address6 is None:
        return []
    gateway = host_address6.ip
    return [
        rtnl.new_address(JOB_IFINDEX, job_address6, f"adding {job_address6} to eth0"),
        rtnl.new_default_route(gateway, f"adding the cage's IPv6 default route via {gateway}"),
    ]


def node_side(
    index: int,
    host_veth: str,
    host_address: ipaddress.IPv4Interface,
    host_address6: ipaddress.IPv6Interface | None,
) -> list[rtnl.Request]:
    """The node side: its addresses, then up. A dual-stack cage's peer makes no
    link-local address either (set before it is up, as for eth0)."""
    requests = []
    if host_address6 is not None:
        requests += [
            rtnl.no_ipv6_link_local(index, f"turning IPv6 address generation off on {host_veth}"),
            rtnl.new_address(index, host_address6, f"adding {host_address6} to {host_veth}"),
        ]
    return [
        *requests,
        rtnl.new_address(index, host_address, f"adding {host_address} to {host_veth}"),
        rtnl.set_up(index, f"bringing {host_veth} up"),
    ]

"""IPv6 of the network cages, pure logic (no root): the prefix arithmetic, the config
checks, the record's IPv6 share, resolv.conf and the rtnetlink requests."""

from __future__ import annotations

import ipaddress
import socket
import struct

import pytest

from jobcage.config import Config
from jobcage.errors import AddressPoolExhaustedError, ConfigError
from jobcage.netlink import core, rtnl
from jobcage.network import ipv6, resolv
from jobcage.network.addresses import AddressPool, Ipv6Pool
from jobcage.network.firewall import open_firewall
from jobcage.network.firewall.policy import NetCounters
from jobcage.usage import Usage


def test_ipv6_prefix_is_numbered_like_the_ipv4_lease():
    v4 = AddressPool("100.64.0.0/16")
    v6 = Ipv6Pool("fd6a:6f62:6361::/48")
    assert v6.size == 65536 >= v4.size
    lease = v6.lease(3)
    assert lease.subnet == ipaddress.IPv6Network("fd6a:6f62:6361:3::/64")
    assert lease.host == ipaddress.IPv6Interface("fd6a:6f62:6361:3::1/64")
    assert lease.job == ipaddress.IPv6Interface("fd6a:6f62:6361:3::2/64")
    assert v6.lease(65535).subnet == ipaddress.IPv6Network("fd6a:6f62:6361:ffff::/64")


def test_a_lease_past_a_small_ipv6_pool_names_the_key():
    pool = Ipv6Pool("2001:db8:7:ff00::/56")
    pool.lease(255)
    with pytest.raises(AddressPoolExhaustedError, match="ipv6_pool 2001:db8:7:ff00::/56"):
        pool.lease(256)


@pytest.mark.parametrize(
    ("changes", "campus", "key"),
    [
        ({"ipv6_pool": "fd00:1::/72"}, (), "ipv6_pool = 'fd00:1::/72' is not valid"),
        ({"ipv6_pool": "10.0.0.0/8"}, (), "ipv6_pool = '10.0.0.0/8' is not valid"),
        ({"ipv6": "routed"}, (), 'ipv6 = "routed" needs ipv6_pool'),
        (
            {"ipv6_pool": "2001:db8:c::/48"},
            ("2001:db8:c:5::/64",),
            "ipv6_pool 2001:db8:c::/48 overlaps campus_networks 2001:db8:c:5::/64",
        ),
    ],
)
def test_bad_ipv6_config_is_one_error_naming_the_key(changes, campus, key):
    # Refused when the config is made, before any cage is.
    with pytest.raises(ConfigError) as info:
        Config(**changes, campus_networks=campus)
    assert key in str(info.value)


def test_ipv6_off_and_auto_without_nftables_give_ipv4_only():
    assert ipv6.settings(Config(ipv6="off"), open_firewall("nftables")) is None
    assert ipv6.settings(Config(), open_firewall("iptables-legacy")) is None
    with pytest.raises(ConfigError, match='needs firewall = "nftables"'):
        ipv6.settings(Config(ipv6="nat"), open_firewall("iptables-legacy"))


def test_config_refuses_an_unknown_ipv6_mode():
    from jobcage.config import load_config

    with pytest.raises(ConfigError, match="ipv6 = 'on' is not valid"):
        load_config(environ={"JOBCAGE_IPV6": "on"}, path="/dev/null")


def test_record_keeps_the_sums_and_adds_the_ipv6_share():
    v4 = NetCounters(net_lan_rx_bytes=100, net_wan_tx_bytes=7, net_wan_tx_packets=1)
    v6 = NetCounters(net_lan_rx_bytes=20, net_wan_tx_bytes=3, net_wan_tx_packets=2)
    both = v4.with_ipv6(v6)
    assert both.net_lan_rx_bytes == 120 and both.net_wan_tx_bytes == 10
    assert both.net_wan_tx_packets == 3
    assert both.net_ipv6_lan_rx_bytes == 20 and both.net_ipv6_wan_tx_packets == 2
    assert both.net_ipv6_lan_tx_bytes == 0
    # IPv4 only: the IPv6 share is null, never a made-up 0.
    assert v4.net_ipv6_lan_rx_bytes is None
    assert (v4 + v4).net_ipv6_lan_rx_bytes is None
    assert (both + both).net_ipv6_lan_rx_bytes == 40
    usage = Usage.from_dict({**Usage().to_dict(), **both.__dict__})
    assert usage.net_ipv6_wan_tx_bytes == 3 and usage.net_wan_tx_bytes == 10


def test_ipv6_part_round_trips_through_the_record():
    settings = ipv6.Ipv6Settings("nat", Ipv6Pool("fd6a:6f62:6361::/48"))
    part = ipv6.part(settings, 5, (ipaddress.IPv6Network("2001:db8:c::/64"),), Config())
    assert ipv6.Ipv6Part.from_record(part.to_record()) == part
    with pytest.raises(ValueError):
        ipv6.Ipv6Part.from_record({**part.to_record(), "pool": "100.64.0.0/16"})


NODE = "nameserver 127.0.0.53\n"
RESOLVED = "nameserver 192.0.2.53\nnameserver 2001:db8::53\nnameserver fe80::1%eth0\n"


def test_dual_stack_cage_keeps_global_ipv6_nameservers():
    text = resolv.plan_resolv_conf(NODE, RESOLVED, ipv6=True)
    assert "nameserver 192.0.2.53" in text and "nameserver 2001:db8::53" in text
    assert "fe80" not in text
    v4_only = resolv.plan_resolv_conf(NODE, RESOLVED)
    assert "2001:db8::53" not in v4_only and "192.0.2.53" in v4_only
    only6 = resolv.plan_resolv_conf(NODE, "nameserver 2001:db8::53\n", ipv6=True)
    assert "nameserver 2001:db8::53" in only6


def test_ipv6_address_request_is_nodad_with_the_address():
    address = ipaddress.IPv6Interface("fd6a:6f62:6361:3::2/64")
    request = rtnl.new_address(2, address, "x")
    family, prefixlen, flags, _scope, index = struct.unpack_from("=BBBBI", request.body)
    assert (family, prefixlen, flags, index) == (socket.AF_INET6, 64, rtnl.IFA_F_NODAD, 2)
    attrs = core.attrs(request.body, 8)
    assert attrs[rtnl.IFA_ADDRESS] == address.ip.packed
    route = rtnl.new_default_route(ipaddress.IPv6Address("fd6a:6f62:6361:3::1"), "x")
    assert route.body[0] == socket.AF_INET6
    assert core.attrs(route.body, 12)[rtnl.RTA_GATEWAY] == address.ip.packed[:15] + b"\x01"

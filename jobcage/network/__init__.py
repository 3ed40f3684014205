"""The network cage: a netns per job behind a veth pair, NATed out of the node's
uplink, with packet-filter rules that count the job's LAN and WAN traffic.

Modules: ``addresses`` (the address pool and its leases), ``netns`` (namespace, veth,
addresses, routes, forwarding, over :mod:`jobcage.netlink.rtnl`), ``resolv`` (a
cage's resolv.conf), ``firewall/``
(the :class:`~.firewall.Firewall` interface and its selection, the policy as data,
the nftables backend over :mod:`jobcage.netlink` and the legacy x_tables one over
python-iptables, doctor's report), ``cage`` (:class:`NetworkCage`, tying them
together, and what reap finds without a record), ``hooks`` (the tests' guard). See
docs/network.md.
"""

from .cage import NetworkCage, Orphan, find_orphans, read_counters, remove_orphan
from .firewall.policy import NetCounters
from .firewall.report import FirewallReport, firewall_report, node_iptables_backend
from .netns import forwarding_enabled

__all__ = [
    "FirewallReport",
    "NetCounters",
    "NetworkCage",
    "Orphan",
    "find_orphans",
    "firewall_report",
    "forwarding_enabled",
    "node_iptables_backend",
    "read_counters",
    "remove_orphan",
]

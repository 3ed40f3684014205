"""The network cage: a netns per job behind a veth pair, NATed out of the node's
uplink, with iptables rules that count the job's LAN and WAN traffic.

Modules: ``addresses`` (the address pool and its leases), ``netns`` (namespace, veth,
addresses, routes, forwarding, DNS) over ``rtnl`` (batched raw rtnetlink), ``rules``
(the rule layout as data), ``firewall`` (the layout over python-iptables, behind a
small interface), ``cage`` (:class:`NetworkCage`, tying them together). See
docs/network.md.
"""

from .cage import NetworkCage, Orphan, find_orphans, read_counters, remove_orphan
from .firewall import FirewallReport, firewall_report, node_iptables_backend
from .netns import forwarding_enabled
from .rules import NetCounters

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

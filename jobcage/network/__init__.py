"""The network cage: a netns per job behind a veth pair, NATed out of the node's
uplink, with packet-filter rules that count the job's LAN and WAN traffic.

Modules: ``addresses`` (the address pool and its leases), ``netns`` (namespace, veth,
addresses, routes, over :mod:`jobcage.netlink.rtnl`; ``addressing`` the requests of
a cage's addresses), ``nodelinks`` (the node's links, routes and forwarding),
``resolv`` (a cage's resolv.conf), ``ipv6`` and ``routed6`` (dual-stack cages),
``firewall/`` (the :class:`~.firewall.Firewall` interface and its selection, the
policy as data, the nftables backend over :mod:`jobcage.netlink` and the legacy
x_tables one over python-iptables, doctor's report), ``cage`` (:class:`NetworkCage`,
tying them together), ``gaps`` (one cage's rules found gone, put back, and the gap in
its counts), ``restore`` (every cage's, for reap), ``orphans`` (what reap finds
without a record), ``hooks`` (the tests' guard). See docs/network.md.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .cage import NetworkCage, read_counters
    from .firewall.policy import NetCounters
    from .firewall.report import FirewallReport, firewall_report, node_iptables_backend
    from .netns import forwarding_enabled
    from .orphans import Orphan, find_orphans, remove_orphan

# Each name from the module that has it, imported on first use (PEP 562): a
# `jobcage run --network` needs the cage, not doctor's report or reap's orphan scan,
# and every module it imports is a per-job cost (docs/performance.md).
_HOMES = {
    "NetworkCage": ".cage",
    "read_counters": ".cage",
    "NetCounters": ".firewall.policy",
    "FirewallReport": ".firewall.report",
    "firewall_report": ".firewall.report",
    "node_iptables_backend": ".firewall.report",
    "forwarding_enabled": ".netns",
    "Orphan": ".orphans",
    "find_orphans": ".orphans",
    "remove_orphan": ".orphans",
}
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


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(home, __name__), name)
    globals()[name] = value
    return value

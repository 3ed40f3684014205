"""The cages' packet filter: which backend, behind one interface.

``base``               :class:`Firewall`, the interface the cage and reap use, and
                       :class:`FirewallObject`, what reap finds in a backend
``policy``             the policy and the x_tables rule layout, as data (no kernel calls)
``nftables``           the default backend: a table of JobCage's own, over
                       :mod:`jobcage.netlink` (its layout in ``nftables_layout``)
``xtables``            the legacy x_tables backend over python-iptables (libiptc), with
                       ``xtables_iptc`` (libiptc handles, errors, entry edits),
                       ``xtables_compiled`` (rules compiled once per shape) and
                       ``xtables_read`` (counters read straight from the kernel's blob)
``report``             `jobcage doctor`'s view of the node's packet filters

:func:`open_firewall` picks a backend by a config's ``firewall`` (``auto``: nftables
where the kernel has nf_tables); a cage's record names the backend that holds its
rules, so a changed config never looks for them in the wrong place.
"""

from __future__ import annotations

import functools

from ...errors import ConfigError, NetworkError
from .base import CAGE, CAMPUS, SHARED, Firewall, FirewallObject

NFTABLES, IPTABLES_LEGACY = "nftables", "iptables-legacy"
BACKENDS = (NFTABLES, IPTABLES_LEGACY)


def open_firewall(name: str = "auto") -> Firewall:
    """The backend ``name`` (a config ``firewall`` value, or a record's)."""
    if resolve_firewall(name) == NFTABLES:
        from .nftables import NftablesFirewall

        return NftablesFirewall()
    from .xtables import IptablesLegacyFirewall

    return IptablesLegacyFirewall()


def resolve_firewall(name: str) -> str:
    """The backend a config's ``firewall`` means on this kernel ("auto": nftables
    where the kernel has nf_tables, else iptables-legacy)."""
    if name == "auto":
        return NFTABLES if nf_tables_available() else IPTABLES_LEGACY
    if name not in BACKENDS:
        raise ConfigError(f"firewall = {name!r}: expected auto, nftables or iptables-legacy")
    return name


@functools.cache
def nf_tables_available() -> bool:
    from ...netlink import nfchannel

    return nfchannel.available()


def all_firewalls() -> list[Firewall]:
    """Every backend, for reap and doctor: a node may hold cages of both (a config
    changed while jobs ran)."""
    legacy = open_firewall(IPTABLES_LEGACY)
    if not nf_tables_available():
        return [legacy]
    from .nftables import NftablesFirewall

    # The IPv6 part of dual-stack cages is a table of its own, ip6 jobcage.
    return [open_firewall(NFTABLES), NftablesFirewall(family=6), legacy]


def firewall_for_table(table: str | None) -> Firewall:
    """The backend whose tables hold ``table`` (as a FirewallObject names it)."""
    from .nftables import NftablesFirewall

    for firewall in (*map(open_firewall, BACKENDS), NftablesFirewall(family=6)):
        if table in firewall.tables:
            return firewall
    raise NetworkError(f"no firewall backend of JobCage has a table {table!r}; not touching it")


__all__ = [
    "CAGE",
    "CAMPUS",
    "SHARED",
    "Firewall",
    "FirewallObject",
    "all_firewalls",
    "firewall_for_table",
    "nf_tables_available",
    "open_firewall",
    "resolve_firewall",
]

"""What the cage and `jobcage reap` need from a packet filter, in words that fit both
backends: the x_tables one has per-cage chains, the nftables one per-cage counters and
set elements under shared rules, and neither shows through this interface."""

from __future__ import annotations

import abc
from collections.abc import Callable, Container, Sequence
from dataclasses import dataclass

from ...errors import ConfigError
from .policy import CAGE_CHAIN_PREFIX, SHARED_PREFIX, CagePlan, NetCounters, cage_hash_of

# Kinds of a FirewallObject.
CAGE, CAMPUS, SHARED = "cage", "campus", "shared"


@dataclass(frozen=True)
class FirewallObject:
    """Something of JobCage's in a backend's tables, as reap sees it: one cage's
    rules or counters (``kind`` "cage", ``cage`` its hash), a campus list no cage uses
    any more ("campus"), or what every cage shares ("shared"). ``name`` is what the
    backend calls it (a chain, a counter), ``table`` where it is
    (:attr:`Firewall.tables`)."""

    kind: str
    name: str
    table: str
    cage: str = ""


class Firewall(abc.ABC):
    """Rules and counters of the cages. Implementations return JobCage types only, and
    raise JobCage errors only."""

    name: str
    # Where its objects live, as records and FirewallObject name them.
    tables: tuple[str, ...]
    # The command that shows JobCage's rules and nothing else, for doctor to name
    # (None where they sit among the node's own, as x_tables' chains do).
    shown_by: str | None = None

    @abc.abstractmethod
    def install(self, cage: CagePlan, pool: str, uplink: Callable[[], str]) -> None:
        """Install the cage's rules, and what cages share if missing (the uplink is
        asked for only then). All or nothing."""

    @abc.abstractmethod
    def remove(self, cage: CagePlan) -> bool:
        """Remove the cage's rules, and what cages share if it was the last (then
        returns True). Idempotent."""

    def restore(self, cage: CagePlan, pool: str, uplink: Callable[[], str]) -> None:
        """Put back a cage whose rules were found gone (a flush, a firewall reload):
        what is left of it is removed, then it is installed afresh."""
        self.remove(cage)
        self.install(cage, pool, uplink)

    @abc.abstractmethod
    def counters(self, cage: CagePlan) -> NetCounters:
        """The cage's counters now. Raises RulesGoneError if its rules are gone."""

    @abc.abstractmethod
    def counters_many(self, cages: Sequence[CagePlan]) -> dict[str, NetCounters | None]:
        """host veth -> counters of every cage given, read in one pass (None for a
        cage whose rules are gone): for `jobcage list` and monitoring."""

    @abc.abstractmethod
    def describe(self, cage: CagePlan) -> dict[str, list[str]]:
        """table -> names of the cage's own objects there: where an administrator finds
        its rules or counters (kept in the cage's record)."""

    @abc.abstractmethod
    def orphans(self, claimed: Container[str]) -> list[FirewallObject]:
        """JobCage's objects in this backend that no cage in ``claimed`` (cage hashes)
        owns: each unclaimed cage's, campus lists no cage uses, and what cages share
        when no cage at all is left. Read-only."""

    @abc.abstractmethod
    def remove_orphan(self, orphan: FirewallObject) -> bool:
        """Remove one object :meth:`orphans` listed, and what cages share if nothing
        uses it any more (then returns True). The caller makes sure no live cage
        claims it. Idempotent."""

    # The IP version of its rules' addresses.
    version = 4
    # An IPv4-only backend says so: what doctor reports, and what a config that asks it
    # for IPv6 cages is told to set instead (see :meth:`ipv6`).
    ipv4_only = ""
    ipv6_refusal = "holds no IPv6 rules"

    def ipv6(self) -> Firewall | None:
        """The same backend over IPv6, where dual-stack cages' IPv6 rules live; None
        if it is IPv4 only (:attr:`ipv4_only` says so)."""
        return None

    def ipv6_or_refuse(self, asked: str) -> Firewall:
        """:meth:`ipv6`, or the ConfigError that tells a config asking for IPv6 cages
        (``asked``, its ``ipv6`` value) what to set instead."""
        found = self.ipv6()
        if found is None:
            raise ConfigError(f'ipv6 = "{asked}" {self.ipv6_refusal}, or ipv6 = "off"')
        return found

    def in_use(self) -> bool:
        """Whether anything of JobCage's is left in its tables (a cage's rules, or
        what cages share): the last cage's teardown takes everything along."""
        return bool(self.orphans(()))

    @abc.abstractmethod
    def problem(self) -> str | None:
        """Why this backend cannot work on this node (what to install or enable), or
        None: what `jobcage doctor` reports, asked of the code that will run."""


def unclaimed(
    listing: dict[str, list[str]], claimed: Container[str], campus_prefix: str = ""
) -> list[FirewallObject]:
    """:meth:`Firewall.orphans` from a backend's listing (table -> names of its JobCage
    objects, a cage's named ``JC-<hash>-...``, shared ones ``JOBCAGE-...``, unused
    campus lists ``campus_prefix...``)."""
    cages = [
        (table, name, cage_hash_of(name))
        for table, names in listing.items()
        for name in names
        if name.startswith(CAGE_CHAIN_PREFIX)
    ]
    found = [FirewallObject(CAGE, n, t, h) for t, n, h in cages if h not in claimed]
    for table, names in listing.items():
        for name in names:
            if campus_prefix and name.startswith(campus_prefix):
                found.append(FirewallObject(CAMPUS, name, table))
            elif not cages and name.startswith(SHARED_PREFIX):
                found.append(FirewallObject(SHARED, name, table))
    return found

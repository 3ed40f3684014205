"""One job's network cage: address lease, netns + veth, rules, resolv.conf.

``create`` builds in the order lease -> netns -> forwarding -> rules -> resolv.conf and
undoes what it built if any step fails. ``destroy`` reads the final counters first
(removing the rules loses them), then removes everything, each step tolerant of
"already gone", errors collected and raised together.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..config import Config
from ..errors import (
    CageExistsError,
    CageStateError,
    JobCageError,
    NetworkError,
    RulesGoneError,
    TeardownError,
)
from ..ids import netns_name as make_netns_name
from ..ids import validate_job_id, veth_names
from . import ipv6 as ipv6_mod
from . import netns, resolv
from .addresses import AddressPool, LeaseStore
from .firewall import (
    Firewall,
    open_firewall,
    resolve_firewall,
)
from .firewall.policy import CagePlan, NetCounters, cage_plan
from .gaps import GapStore, restore_cage_rules


def cage_hash(host_veth: str) -> str:
    return host_veth[2:-1]


@dataclass
class NetworkCage:
    """What was built for one job; see the module docstring for the order of things."""

    job_id: str
    netns_name: str
    host_veth: str
    address: ipaddress.IPv4Interface
    host_address: ipaddress.IPv4Interface
    lease_index: int
    pool: str
    campus_networks: tuple[ipaddress.IPv4Network, ...]
    allow_node_access: bool
    state_dir: str
    resolv_conf_path: str | None = None
    # Which backend holds the rules: fixed at create, kept in the record, so that a
    # changed config never makes JobCage look for a cage's rules in the wrong place.
    firewall_backend: str = "iptables-legacy"
    # The config's uplink (None: the default route's), for putting the NAT back.
    uplink: str | None = None
    # A dual-stack cage's IPv6 (its prefix, campus networks): None for IPv4 only.
    ipv6: ipv6_mod.Ipv6Part | None = None
    _final: NetCounters | None = field(default=None, repr=False)
    _destroyed: bool = field(default=False, repr=False)

    @property
    def netns_path(self) -> str:
        """The file spawn opens and passes to setns(CLONE_NEWNET) before exec."""
        return os.path.join(netns.NETNS_RUN_DIR, self.netns_name)

    @property
    def plan(self) -> CagePlan:
        return cage_plan(
            cage_hash=cage_hash(self.host_veth),
            host_veth=self.host_veth,
            address=self.address.ip,
            pool=self.pool,
            campus_networks=self.campus_networks,
            allow_node_access=self.allow_node_access,
            state_dir=self.state_dir,
        )

    @property
    def plan6(self) -> CagePlan | None:
        """The same policy over the cage's IPv6 prefix (ip6 jobcage's)."""
        return None if self.ipv6 is None else self.ipv6.plan(self.plan)

    def _firewall(self) -> Firewall:
        return open_firewall(self.firewall_backend)

    def _leases(self) -> LeaseStore:
        return LeaseStore(self.state_dir, AddressPool(self.pool))

    # -- building --------------------------------------------------------------------

    @classmethod
    def create(
        cls,
        job_id: str,
        config: Config,
        campus_networks: Sequence[str | ipaddress.IPv4Network | ipaddress.IPv6Network]
        | None = None,
    ) -> NetworkCage:
        """Build the cage in the calling thread's network namespace (the node's).

        Raises ConfigError, AddressPoolExhaustedError, CageExistsError,
        KernelFeatureError or NetworkError; nothing is left behind then.
        """
        validate_job_id(job_id)
        if campus_networks is not None:
            # Checked like the config key (and against the pools) before anything.
            config = config.replace(campus_networks=campus_networks)
        # Each family's rules count against their own networks.
        campus = tuple(n for n in config.campus_networks if n.version == 4)
        campus6 = tuple(n for n in config.campus_networks if n.version == 6)
        pool = AddressPool(config.address_pool)
        host_veth, _ = veth_names(job_id)
        firewall_backend = resolve_firewall(config.firewall)  # may refuse: before the lease
        v6 = ipv6_mod.settings(config, open_firewall(firewall_backend))  # likewise
        lease, first = LeaseStore(config.state_dir, pool).acquire(
            job_id, lambda lease: netns.address_held(lease.job)
        )
        cage = cls(
            job_id=job_id,
            netns_name=make_netns_name(job_id),
            host_veth=host_veth,
            address=lease.job,
            host_address=lease.host,
            lease_index=lease.index,
            pool=str(pool.network),
            campus_networks=campus,
            allow_node_access=config.allow_node_access,
            state_dir=config.state_dir,
            firewall_backend=firewall_backend,
            uplink=config.uplink,
            ipv6=ipv6_mod.part(v6, lease.index, campus6, config) if v6 is not None else None,
        )
        # Rollback removes only what this call built: with a duplicate job id, the
        # names (netns, chains, resolv.conf) are the running cage's.
        built = {"netns": False, "rules": False, "rules6": False, "resolv": False}
        try:
            if first:
                # Checked with the first cage only: a dump of every route costs in
                # proportion to the cages already there.
                shadowed = netns.routes_overlapping(cage.pool)
                if shadowed:
                    raise NetworkError(
                        f"address_pool {cage.pool} overlaps routes of the node "
                        f"({'; '.join(shadowed)}), e.g. a VPN on 100.64.0.0/10; set "
                        "address_pool to a range the node does not use"
                    )
            netns.create(
                netns.NetnsPlan(
                    netns_name=cage.netns_name,
                    host_veth=host_veth,
                    host_address=lease.host,
                    job_address=lease.job,
                    host_address6=cage.ipv6.host_address if cage.ipv6 else None,
                    job_address6=cage.ipv6.address if cage.ipv6 else None,
                )
            )
            built["netns"] = True
            netns.ensure_forwarding()
            cage._firewall().install(cage.plan, cage.pool, lambda: _uplink(config.uplink))
            built["rules"] = True
            if cage.ipv6 is not None and cage.plan6 is not None:
                ipv6_mod.install(cage.plan6, cage.ipv6, config, cage._firewall())
                built["rules6"] = True
            text = resolv.plan_resolv_conf(
                resolv.read_text(resolv.RESOLV_CONF) or "",
                resolv.read_text(resolv.RESOLVED_RESOLV_CONF),
                # Proposed config field (see docs/network.md); absent until added.
                tuple(str(s) for s in config.dns_servers),
                ipv6=cage.ipv6 is not None,
            )
            if text is not None:
                built["resolv"] = True
                cage.resolv_conf_path = resolv.write_resolv_conf(cage.netns_name, text)
        except BaseException as e:
            errors = cage._teardown(
                read_counters=False,
                remove_rules=built["rules"],
                remove_rules6=built["rules6"],
                remove_netns=built["netns"],
                remove_resolv=built["resolv"],
                # A netns that netns.create failed in and could not take back down: its
                # lease is how `jobcage reap` knows it is this node's (CageExistsError:
                # the netns is another cage's, not ours).
                keep_lease=not built["netns"]
                and not isinstance(e, CageExistsError)
                and os.path.exists(cage.netns_path),
            )
            for error in errors:
                e.add_note(f"and rolling back failed too: {error}")
            raise
        return cage

    # -- accounting ------------------------------------------------------------------

    def counters(self) -> NetCounters:
        """Live counters of this cage's rules only. Rules found gone (`nft flush
        ruleset`, a firewall reload) are put back, and the counts say they have a gap."""
        if self._destroyed:
            if self._final is None:
                raise CageStateError(f"the network cage of {self.job_id} is destroyed")
            return self._final
        try:
            found = self._counters()
        except RulesGoneError:
            if not os.path.exists(self.netns_path):
                raise  # torn down meanwhile: nothing to put back
            self.restore_rules()
            found = self._counters()
        return found.with_gaps(*GapStore(self.state_dir).read(self.job_id))

    def _counters(self) -> NetCounters:
        firewall = self._firewall()
        counters = firewall.counters(self.plan)
        plan6 = self.plan6
        return (
            counters if plan6 is None else counters.with_ipv6(ipv6_mod.counters(plan6, firewall))
        )

    def restore_rules(self) -> bool:
        """Put the cage's rules back if they are gone, and count a gap; True if this
        call did (see :mod:`.restore`)."""
        return restore_cage_rules(self, lambda: _uplink(self.uplink))

    # -- teardown --------------------------------------------------------------------

    def destroy(self, *, read_counters: bool = True) -> NetCounters | None:
        """Read the final counters, then remove everything; idempotent.

        Returns the final counters (None if they could not be read). On errors raises
        TeardownError after every step ran; its ``final_counters`` carries them too.
        ``read_counters=False`` is for reap, when the owner died removing the cage and
        its rules may be gone already: then their absence is no error.
        """
        if self._destroyed:
            return self._final
        errors = self._teardown(read_counters=read_counters and self._final is None)
        if errors:
            error = TeardownError(f"tearing down the network cage of {self.job_id} failed", errors)
            error.final_counters = self._final  # type: ignore[attr-defined]
            raise error
        self._destroyed = True
        return self._final

    def _teardown(
        self,
        *,
        read_counters: bool,
        remove_rules: bool = True,
        remove_rules6: bool = True,
        remove_netns: bool = True,
        remove_resolv: bool = True,
        keep_lease: bool = False,
    ) -> list[BaseException]:
        errors: list[BaseException] = []
        firewall = self._firewall()
        if read_counters:
            try:
                self._final = self._counters().with_gaps(
                    *GapStore(self.state_dir).read(self.job_id)
                )
            except RulesGoneError:
                if os.path.exists(self.netns_path):
                    # Gone since the last read (a flush): what passed is lost, and the
                    # bill says so (None, never a made-up 0), one gap more.
                    gaps = GapStore(self.state_dir).read(self.job_id)[0]
                    self._final = NetCounters.lost(gaps + 1, time.time())
            except JobCageError as e:
                # Chains and netns both gone: an earlier teardown (or reap) finished the
                # job; nothing to count and nothing lost. Chains gone alone is a loss.
                if os.path.exists(self.netns_path):
                    errors.append(e)
        left: list[bool] = []

        def keeping_lease(step: Callable[[], object]) -> Callable[[], None]:
            """``step``, noting in ``left`` that it failed (its object may be there)."""

            def run() -> None:
                try:
                    step()
                except BaseException:
                    left.append(True)
                    raise

            return run

        steps = [
            keeping_lease(lambda: firewall.remove(self.plan) if remove_rules else None),
            keeping_lease(
                lambda: (
                    ipv6_mod.remove(self.plan6, self.ipv6, self.state_dir, self._firewall())
                    if remove_rules6 and self.plan6 is not None
                    else None
                )
            ),
            keeping_lease(lambda: netns.remove(self.netns_name) if remove_netns else None),
            # Kept while the netns or the rules linger: the netns' eth0 still holds the
            # address, and the lease is what lets `jobcage reap` find them as this state
            # dir's orphans.
            lambda: (
                None
                if left or keep_lease
                else self._leases().release(self.lease_index, self.job_id)
            ),
            lambda: resolv.remove_resolv_conf(self.netns_name) if remove_resolv else None,
            lambda: GapStore(self.state_dir).remove(self.job_id),
        ]
        with contextlib.ExitStack() as held:
            try:
                # A restore (another process noticing a flush) must not put back the
                # rules of a cage being torn down: it checks the netns under this lock.
                held.enter_context(GapStore(self.state_dir).locked())
            except JobCageError as e:
                errors.append(e)
            for step in steps:
                try:
                    step()
                except (JobCageError, OSError) as e:
                    errors.append(e)
        return errors

    # -- the record ------------------------------------------------------------------

    def to_record(self) -> dict[str, Any]:
        """JSON-able: everything `jobcage reap` needs to remove this cage later."""
        plan = self.plan
        return {
            "job_id": self.job_id,
            "netns_name": self.netns_name,
            "netns_path": self.netns_path,
            "host_veth": self.host_veth,
            "address": str(self.address),
            "host_address": str(self.host_address),
            "lease_index": self.lease_index,
            "pool": self.pool,
            "campus_networks": [str(n) for n in self.campus_networks],
            "allow_node_access": self.allow_node_access,
            "state_dir": self.state_dir,
            "resolv_conf_path": self.resolv_conf_path,
            "firewall": self.firewall_backend,
            "uplink": self.uplink,
            # Where an administrator finds the cage's rules (x_tables: its own chains;
            # nftables: its counters in the shared table).
            "chains": self._firewall().describe(plan),
            # Absent (an older record) or None: the cage had no IPv6.
            "ipv6": self.ipv6.to_record() if self.ipv6 is not None else None,
        }

    @classmethod
    def from_record(cls, record: dict[str, Any], config: Config | None = None) -> NetworkCage:
        """Rebuild the handle of a cage from its record, touching nothing."""
        try:
            # The record's format is the store's (jobcage.records); a network part
            # of format 1 carried its own, always 1.
            if record.get("format", 1) != 1:
                raise ValueError(f"unknown format {record.get('format')!r}")
            return cls(
                job_id=record["job_id"],
                netns_name=record["netns_name"],
                host_veth=record["host_veth"],
                address=ipaddress.IPv4Interface(record["address"]),
                host_address=ipaddress.IPv4Interface(record["host_address"]),
                lease_index=int(record["lease_index"]),
                pool=record["pool"],
                # A record is input: parsed here, where it is read.
                campus_networks=tuple(map(ipaddress.IPv4Network, record["campus_networks"])),
                allow_node_access=bool(record["allow_node_access"]),
                state_dir=record.get("state_dir")
                or (config.state_dir if config is not None else ""),
                resolv_conf_path=record.get("resolv_conf_path"),
                firewall_backend=record.get("firewall", "iptables-legacy"),
                uplink=record.get("uplink"),
                ipv6=ipv6_mod.Ipv6Part.from_record(record["ipv6"])
                if record.get("ipv6") is not None
                else None,
            )
        except (KeyError, TypeError, ValueError) as e:
            raise NetworkError(
                f"the network part of a cage record is unreadable ({e!r}); remove the cage "
                "by hand: `ip netns del jobcage-<id>` and its JC-<hash>-* rules (the counters "
                "of `nft list table ip jobcage`, or the chains of `iptables-legacy-save`)"
            ) from None


def read_counters(cages: Sequence[NetworkCage]) -> dict[str, NetCounters | None]:
    """job id -> live counters of every cage given, from one read of the rules.

    What `jobcage list` and a monitoring pass need: calling ``counters()`` per cage
    would copy the whole table once per cage (N copies of an O(N) table). A cage whose
    chains are gone maps to None; a destroyed cage to its final counters.
    """
    live = [c for c in cages if not c._destroyed]
    found: dict[str, NetCounters | None] = {}
    for backend in sorted({c.firewall_backend for c in live}):
        mine = [c for c in live if c.firewall_backend == backend]
        firewall = open_firewall(backend)
        found.update(firewall.counters_many([c.plan for c in mine]))
        # A dual-stack cage's IPv6 counters are in ip6 jobcage: one more dump.
        found = ipv6_mod.with_ipv6(found, [c.plan6 for c in mine if c.plan6 is not None], firewall)
    return {c.job_id: c._final if c._destroyed else found.get(c.host_veth) for c in cages}


def _uplink(uplink: str | None) -> str:
    if uplink is None:
        return ipv6_mod.default_uplink()
    if not netns.link_exists(uplink):
        raise NetworkError(
            f"the uplink {uplink!r} set in the config does not exist on the node; "
            "set `uplink` to the interface of the node's way out (see `ip route`)"
        )
    return uplink


__all__ = [
    "NetCounters",
    "NetworkCage",
    "read_counters",
]

"""IPv6 for the network cages: which mode a cage gets, and the node-wide settings
IPv6 forwarding needs, put back as they were after the node's last IPv6 cage.

* The mode (``ipv6`` in the config) is decided before anything is built: a bad
  ``ipv6_pool`` or a routed mode without one is a ConfigError naming the key.
  ``auto`` (the default) is NAT66 on a node whose IPv6 is enabled and IPv4 only where
  it is disabled (``net.ipv6.conf.default.disable_ipv6``: new links, so the cage's
  veth, would have none); asking that is one /proc/sys/net read, in place of the
  disable_ipv6 write an IPv4-only cage makes.
* Forwarding: ``net.ipv6.conf.all.forwarding`` is turned on with the first IPv6 cage
  if it is off. With forwarding on, the kernel ignores router advertisements on
  links whose ``accept_ra`` is 1, and a node that learns its IPv6 default route from
  them would lose it: so the uplink's ``accept_ra`` 1 becomes 2 first. What was
  changed is written to ``<state_dir>/network/ipv6-sysctls`` *before* the change, so
  a killed owner leaves a record, and is put back by the node's last IPv6 cage (or
  by `jobcage reap`). IPv4's ``ip_forward`` stays on (docs/network.md); IPv6
  forwarding changes how the node itself takes router advertisements, so it does not.
* Cages install and remove their IPv6 part under ``<state_dir>/network/ipv6.lock``:
  "the last IPv6 cage puts the settings back" must not race a first one turning them
  on.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import ipaddress
import json
import os
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ..config import Config
from ..config_values import DEFAULT_IPV6_POOL
from ..errors import ConfigError, NetworkError
from ..ids import veth_names
from ..netlink import core, rtnl
from . import hooks, netns, resolv, routed6
from .addresses import Ipv6Pool, locked_file
from .firewall import BACKENDS, Firewall, open_firewall
from .firewall.policy import CagePlan, NetCounters

DISABLE_IPV6_DEFAULT = "/proc/sys/net/ipv6/conf/default/disable_ipv6"
FORWARDING_ALL = "/proc/sys/net/ipv6/conf/all/forwarding"
SAVED_NAME = "ipv6-sysctls"
LOCK_NAME = "ipv6.lock"


@dataclass(frozen=True)
class Ipv6Settings:
    mode: str  # "nat" or "routed"
    pool: Ipv6Pool


@dataclass(frozen=True)
class Ipv6Part:
    """A dual-stack cage's IPv6, as its record keeps it."""

    address: ipaddress.IPv6Interface  # eth0's
    host_address: ipaddress.IPv6Interface  # the node side's, the job's gateway
    pool: str
    campus_networks: tuple[ipaddress.IPv6Network, ...]
    mode: str = "nat"
    # Routed mode: the uplink its proxy neighbour entry is on (removed from there).
    uplink: str = ""

    def plan(self, plan4: CagePlan) -> CagePlan:
        """The cage's IPv4 plan over its IPv6 prefix: the same policy, in ip6 jobcage."""
        return dataclasses.replace(
            plan4,
            address=str(self.address.ip),
            pool=self.pool,
            campus_networks=self.campus_networks,
        )

    def to_record(self) -> dict[str, Any]:
        return {
            "address": str(self.address),
            "host_address": str(self.host_address),
            "pool": self.pool,
            "campus_networks": [str(n) for n in self.campus_networks],
            "mode": self.mode,
            "uplink": self.uplink,
        }

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> Ipv6Part:
        """Raises KeyError, TypeError or ValueError (the cage's record reader says what
        to do)."""
        return cls(
            address=ipaddress.IPv6Interface(record["address"]),
            host_address=ipaddress.IPv6Interface(record["host_address"]),
            pool=str(ipaddress.IPv6Network(record["pool"])),
            campus_networks=tuple(ipaddress.IPv6Network(n) for n in record["campus_networks"]),
            mode=str(record.get("mode", "nat")),
            uplink=str(record.get("uplink", "")),
        )


def part(
    settings: Ipv6Settings, index: int, campus: Sequence[ipaddress.IPv6Network], config: Config
) -> Ipv6Part:
    """The IPv6 of the cage whose IPv4 lease is ``index``."""
    lease = settings.pool.lease(index)
    return Ipv6Part(
        address=lease.job,
        host_address=lease.host,
        pool=str(settings.pool.network),
        campus_networks=tuple(campus),
        mode=settings.mode,
        uplink=uplink6(config) if settings.mode == "routed" else "",
    )


def firewall(backend: Firewall) -> Firewall:
    """Where the IPv6 rules of ``backend``'s dual-stack cages live (nftables: the table
    ``ip6 jobcage``); an IPv4-only backend refuses, saying what to set instead."""
    return backend.ipv6_or_refuse("on")


def counters(plan: CagePlan, backend: Firewall) -> NetCounters:
    return firewall(backend).counters(plan)


def with_ipv6(
    found: dict[str, NetCounters | None], plans: Sequence[CagePlan], backend: Firewall
) -> dict[str, NetCounters | None]:
    """``found`` (veth -> IPv4 counters) with the IPv6 share of the cages of ``plans``
    added, from one dump of ip6 jobcage; None where either family's are gone."""
    if not plans:
        return found
    found6 = firewall(backend).counters_many(plans)
    out = dict(found)
    for plan in plans:
        v4, v6 = found.get(plan.host_veth), found6.get(plan.host_veth)
        out[plan.host_veth] = v4.with_ipv6(v6) if v4 is not None and v6 is not None else None
    return out


def install(plan: CagePlan, cage: Ipv6Part, config: Config, backend: Firewall) -> None:
    """The cage's IPv6 rules, and forwarding if it is the node's first IPv6 cage."""
    uplink = functools.cache(lambda: cage.uplink or uplink6(config))
    routed = cage.mode == "routed"
    with locked(config.state_dir):
        ensure_forwarding(config.state_dir, uplink, proxy_ndp=routed)
        # Routed: no NAT66 (an uplink of "" makes none).
        firewall(backend).install(plan, cage.pool, (lambda: "") if routed else uplink)
        if routed:
            try:
                routed6.add_proxy(cage.uplink, cage.address.ip)
            except NetworkError:
                firewall(backend).remove(plan)
                raise


def remove(plan: CagePlan, cage: Ipv6Part, state_dir: str, backend: Firewall) -> None:
    """Remove the cage's IPv6 rules (and proxy entry); the last IPv6 cage puts the
    sysctls back."""
    with locked(state_dir):
        if cage.mode == "routed" and cage.uplink:
            routed6.remove_proxy(cage.uplink, cage.address.ip)
        if firewall(backend).remove(plan):
            restore(state_dir)


def check_config(config: Config) -> Ipv6Pool | None:
    """The IPv6 pool the config asks for (None: ``ipv6 = "off"``). Touches nothing; the
    config checked ipv6_pool against routed mode and the campus networks already."""
    if config.ipv6 == "off":
        return None
    if config.ipv6 == "routed" and not config.ipv6_pool:
        raise ConfigError(
            'ipv6 = "routed" needs ipv6_pool: the global prefix the site routes to this '
            'node (a /64 of it per cage); set ipv6_pool, or ipv6 = "nat"'
        )
    pool = Ipv6Pool(config.ipv6_pool or DEFAULT_IPV6_POOL)
    return pool


def settings(config: Config, backend: Firewall) -> Ipv6Settings | None:
    """What a new cage gets: None for IPv4 only. Raises ConfigError for a bad config,
    NetworkError for a mode the node cannot give (IPv6 disabled on it)."""
    pool = check_config(config)
    if pool is None:
        return None
    if backend.ipv6() is None:
        if config.ipv6 == "auto":
            return None
        backend.ipv6_or_refuse(config.ipv6)
    if not node_has_ipv6():
        if config.ipv6 == "auto":
            return None
        raise NetworkError(
            f'ipv6 = "{config.ipv6}" but IPv6 is disabled on the node '
            f"({DISABLE_IPV6_DEFAULT} is not 0, or the kernel has no IPv6): set "
            'net.ipv6.conf.default.disable_ipv6 = 0, or ipv6 = "off" in the config'
        )
    return Ipv6Settings("routed" if config.ipv6 == "routed" else "nat", pool)


def node_has_ipv6() -> bool:
    """Whether a link made now gets IPv6 (the default of new links)."""
    try:
        with open(DISABLE_IPV6_DEFAULT) as f:
            return f.read().strip() == "0"
    except FileNotFoundError:
        return False


def default_uplink() -> str:
    """The interface of the IPv4 default route, else (an IPv6-only node) of the IPv6
    one: IPv4's NAT then names it, and the cages' IPv4 finds no way out there (said by
    doctor and docs/network.md; NAT64 is out of scope)."""
    try:
        return netns.default_route_interface()
    except NetworkError:
        try:
            return netns.default_route_interface(socket.AF_INET6)
        except NetworkError:
            pass
        raise


def uplink6(config: Config) -> str:
    """The interface NAT66 goes out of: ``uplink``, else the IPv6 default route's."""
    if config.uplink is not None:
        return config.uplink
    return netns.default_route_interface(socket.AF_INET6)


# -- forwarding, and putting it back ------------------------------------------------


def _dir(state_dir: str) -> str:
    return os.path.join(state_dir, "network")


def locked(state_dir: str) -> contextlib.AbstractContextManager[None]:
    """Hold this node's IPv6 lock (see the module docstring)."""
    return locked_file(_dir(state_dir), os.path.join(_dir(state_dir), LOCK_NAME))


def forwarding_enabled() -> bool:
    try:
        with rtnl.Socket() as nl:
            (answer,) = nl.check(
                [rtnl.get_forwarding("reading net.ipv6.conf.all.forwarding", socket.AF_INET6)]
            )
        if answer.replies:
            value = rtnl.netconf_forwarding(answer.replies[0])
            if value is not None:
                return value
    except (core.NetlinkError, OSError):
        pass
    return _read(FORWARDING_ALL) == "1"


def _read(path: str) -> str | None:
    text = resolv.read_text(path)
    return None if text is None else text.strip()


def _write(path: str, value: str) -> None:
    try:
        with open(path, "w") as f:
            f.write(value)
    except OSError as e:
        raise NetworkError(
            f"cannot set {path} to {value} ({e.strerror}): set it in /etc/sysctl.d/ on the node"
        ) from e


def ensure_forwarding(
    state_dir: str, uplink: Callable[[], str], *, proxy_ndp: bool = False
) -> None:
    """Turn IPv6 forwarding on if it is off (under :func:`locked`), keeping the uplink's
    router advertisements, and (routed mode) the uplink's proxy_ndp; the old values
    are saved first."""
    changes = {}
    if not forwarding_enabled():
        accept_ra = f"/proc/sys/net/ipv6/conf/{uplink()}/accept_ra"
        if _read(accept_ra) == "1":
            changes[accept_ra] = "2"  # before forwarding: no RA missed
        changes[FORWARDING_ALL] = "1"
    if proxy_ndp:
        proxy = f"/proc/sys/net/ipv6/conf/{uplink()}/proxy_ndp"
        if _read(proxy) != "1":
            changes[proxy] = "1"
    if not changes:
        return
    hooks.check()
    saved_path = os.path.join(_dir(state_dir), SAVED_NAME)
    saved = _saved(saved_path)
    for path in changes:
        old = _read(path)
        if old is not None:
            saved.setdefault(path, old)
    tmp = saved_path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(saved, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, saved_path)
    for path, value in changes.items():
        _write(path, value)


def _saved(path: str) -> dict[str, str]:
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        raise NetworkError(
            f"{path} is unreadable ({e}); it holds the IPv6 sysctls JobCage changed: set "
            "them back by hand (net.ipv6.conf.all.forwarding, the uplink's accept_ra), "
            "then remove it"
        ) from None
    if not isinstance(data, dict):
        return {}
    # Only the knobs this module changes: the file is never a way to write elsewhere.
    return {
        k: str(v)
        for k, v in data.items()
        if isinstance(k, str)
        and k.startswith("/proc/sys/net/ipv6/conf/")
        and k.rsplit("/", 1)[-1] in ("forwarding", "accept_ra", "proxy_ndp")
        and "/.." not in k
        and str(v) in ("0", "1", "2")
    }


def restore(state_dir: str) -> bool:
    """Put back what :func:`ensure_forwarding` changed (the node's last IPv6 cage is
    gone); True if something was. Forwarding goes off before accept_ra comes back."""
    saved_path = os.path.join(_dir(state_dir), SAVED_NAME)
    saved = _saved(saved_path)
    if not saved:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(saved_path)
        return False
    hooks.check()
    for path in sorted(saved, key=lambda p: p != FORWARDING_ALL):
        if os.path.exists(path):  # an uplink may be gone since
            _write(path, saved[path])
    os.unlink(saved_path)
    return True


def _no_ipv6_cages() -> bool:
    """Whether no backend holds IPv6 rules any more (the last cage took them along)."""
    ipv6_firewalls = (open_firewall(name).ipv6() for name in BACKENDS)
    return not any(f.in_use() for f in ipv6_firewalls if f is not None)


def proxy_orphans(
    config: Config, held: dict[int, str], known_jobs: set[str], orphan: Callable[..., Any]
) -> list[Any]:
    """Routed mode: the proxy neighbour entry of each cage whose lease this state dir
    holds and whose record is lost (``orphan(kind, name, table, cage=)``: the uplink is
    the table). Read-only; before the leases, which make them this state dir's."""
    if config.ipv6 != "routed" or not config.ipv6_pool:
        return []
    pool = Ipv6Pool(config.ipv6_pool)
    uplink = config.uplink or uplink6(config)
    there = routed6.proxies(uplink)
    out = []
    for index, job in sorted(held.items()):
        if job in known_jobs or index >= pool.size:
            continue
        address = pool.lease(index).job.ip
        if address in there:
            out.append(orphan("proxy", str(address), uplink, cage=veth_names(job)[0][2:-1]))
    return out


def remove_proxy_orphan(uplink: str, address: str) -> None:
    routed6.remove_proxy(uplink, ipaddress.IPv6Address(address))


def settings_left(state_dir: str) -> bool:
    """Saved IPv6 sysctls with no IPv6 cage left to put them back (for reap). Read-only."""
    if not saved_settings(state_dir):
        return False
    try:
        return _no_ipv6_cages()
    except (core.NetlinkError, OSError):
        return False


def restore_if_unused(state_dir: str) -> bool:
    """:func:`restore`, if no IPv6 cage came meanwhile (asked under the lock)."""
    with locked(state_dir):
        return _no_ipv6_cages() and restore(state_dir)


def saved_settings(state_dir: str) -> dict[str, str]:
    """What a restore would write (for reap and doctor)."""
    return _saved(os.path.join(_dir(state_dir), SAVED_NAME))


def report(config: Config) -> tuple[str, str]:
    """(``ok`` | ``warn`` | ``FAIL``, what `jobcage doctor` says about IPv6 cages)."""
    try:
        backend = open_firewall(config.firewall)
        found = settings(config, backend)
    except (ConfigError, NetworkError) as e:
        return "FAIL", str(e)
    if found is None:
        why = {
            "off": 'ipv6 = "off"',
            "auto": "IPv6 is disabled on the node"
            if backend.ipv6() is not None
            else backend.ipv4_only,
        }
        return "ok", f"cages are IPv4 only: {why.get(config.ipv6, config.ipv6)}"
    notes = []
    try:
        uplink = uplink6(config)
    except NetworkError as e:
        return "warn", f'{e}; until then the cages\' IPv6 has no way out (or set ipv6 = "off")'
    status = "ok"
    try:
        netns.default_route_interface()
    except NetworkError:
        status = "warn"
        notes.append(
            "the node has no IPv4 default route: the cages' IPv4 has no way out (JobCage "
            "does no NAT64); jobs must use IPv6"
        )
    if not forwarding_enabled():
        notes.append(
            "IPv6 forwarding is off: the first IPv6 cage turns it on (the uplink's "
            "accept_ra 1 becomes 2) and the last puts both back"
        )
    text = (
        f"NAT66 of {found.pool.network} (a /64 a cage) out of {uplink}"
        if found.mode == "nat"
        else f"routed: {found.pool.network} (a /64 a cage, no NAT), proxy NDP on {uplink}"
    )
    return status, "; ".join([text, *notes])

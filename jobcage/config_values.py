"""The values of the config: their bounds and the parser of each key.

Every key has one parser here, and every way a Config is built goes through
:func:`check_value`, so a bad value is one ConfigError naming the key and where it
came from (see jobcage/config.py, which loads and holds them).
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
from collections.abc import Callable

from .errors import ConfigError

DEFAULT_STATE_DIR = "/run/jobcage"
DEFAULT_CGROUP_PARENT_NAME = "jobcage"
# RFC 6598 shared address space: made for carrier-grade NAT, so it is neither a
# campus's RFC 1918 range nor a public one. Each cage takes a /30 of it.
DEFAULT_ADDRESS_POOL = ipaddress.IPv4Network("100.64.0.0/16")
FIREWALLS = ("auto", "nftables", "iptables-legacy")
# A unique local prefix (RFC 4193): never routed beyond the node, NATed out like the
# IPv4 pool. A /64 per cage (65,536 of them).
DEFAULT_IPV6_POOL = "fd6a:6f62:6361::/48"
IPV6_MODES = ("auto", "nat", "routed", "off")
CGROUP_VERSIONS = ("auto", "1", "2")
# The prefix length of one cage's subnet (network/addresses.py hands out /30s, and
# /64s of ipv6_pool).
CAGE_PREFIXLEN = 30
CAGE_PREFIXLEN6 = 64
# The cgroup v1 controllers the kernel can have (/proc/cgroups). A cage joins those
# listed that the node mounts; freezer is required, since teardown freezes the cage
# so that no process can fork while every one is being killed.
V1_CONTROLLERS = frozenset(
    {
        "blkio",
        "cpu",
        "cpuacct",
        "cpuset",
        "devices",
        "freezer",
        "hugetlb",
        "memory",
        "misc",
        "net_cls",
        "net_prio",
        "perf_event",
        "pids",
        "rdma",
    }
)

# Bounds, chosen so that a typo is refused instead of reaching the kernel or a timer:
# * memory: at least 1 MiB (below that not even a shell execs; a bare "2" almost
#   always meant 2G) and at most 1 EiB: far above any node's memory, and below the
#   kernel's page-counter maximum (LONG_MAX bytes rounded to pages), past which
#   memory.max / memory.limit_in_bytes silently clamp or misread the number.
MEMORY_MIN_BYTES = 1 << 20
MEMORY_MAX_BYTES = 1 << 60
# * pids: the kernel's PID_MAX_LIMIT on 64-bit (4 * 1024 * 1024); pids.max refuses
#   anything larger with EINVAL, and no node can have more processes anyway.
PIDS_MAX = 4 * 1024 * 1024
# * grace: one day. Batch systems give far less (Slurm's KillWait is at most 65535 s,
#   HTCondor's MachineMaxVacateTime is minutes), and poll(2)'s timeout, an int of
#   milliseconds, overflows after 24.8 days.
GRACE_MAX_SECONDS = 86400.0
# * cpus: from 0.01, the kernel's smallest CFS quota (1 ms) in the 100 ms period the
#   limit is written with (cgroups/base.py), which a smaller value would silently
#   become, to 8192, the largest CONFIG_NR_CPUS: more CPUs than any kernel can run.
CPUS_MIN = 0.01
CPUS_MAX = 8192.0
# Linux IFNAMSIZ minus the NUL; dev_valid_name() also refuses "/", ":", whitespace.
IFNAME_MAX_BYTES = 15
PATH_MAX_BYTES = 4095

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class _Invalid(ValueError):
    """What a value should have been; check_value() adds the key and the source."""


# -- one parser per key -------------------------------------------------------------


def _choice(choices: tuple[str, ...]) -> Callable[[object], str]:
    def parse(value: object) -> str:
        # TOML's `cgroup_version = 2` is an integer: the same choice as "2".
        if isinstance(value, int) and not isinstance(value, bool):
            value = str(value)
        if not isinstance(value, str) or value.strip() not in choices:
            raise _Invalid(" or ".join(choices))
        return value.strip()

    return parse


def _bool(value: object) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        lowered = value.strip().lower()
        if lowered in {"1", "true", "yes"}:
            return True
        if lowered in {"0", "false", "no"}:
            return False
    raise _Invalid("true or false")


def _text_list(value: object, what: str) -> tuple[str, ...]:
    """A list from TOML, a tuple from Python, or "a, b" from the environment."""
    if isinstance(value, str):
        value = value.split(",")
    if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
        raise _Invalid(f"a list of {what}")
    return tuple(dict.fromkeys(v.strip() for v in value if v.strip()))


def _items(value: object, what: str, kinds: tuple[type, ...]) -> tuple[object, ...]:
    """Like _text_list, but items already parsed (of ``kinds``, from a Config) pass."""
    if isinstance(value, list | tuple) and any(isinstance(v, kinds) for v in value):
        if not all(isinstance(v, (str, *kinds)) for v in value):
            raise _Invalid(f"a list of {what}")
        return tuple(dict.fromkeys(v.strip() if isinstance(v, str) else v for v in value))
    return _text_list(value, what)


def _path(value: object, key_hint: str) -> str:
    if not isinstance(value, str) or not value.startswith("/"):
        raise _Invalid(f"an absolute path such as {key_hint}")
    if any(ord(c) < 32 or ord(c) == 127 for c in value) or len(value.encode()) > PATH_MAX_BYTES:
        raise _Invalid(f"an absolute path such as {key_hint}, without control characters")
    if ".." in value.split("/"):
        raise _Invalid(f"an absolute path without '..', such as {key_hint}")
    return os.path.normpath(value)


def _state_dir(value: object) -> str:
    # Absolute: `jobcage reap` from cron must find the records the owner wrote.
    return _path(value, "/run/jobcage")


def _cgroup_parent(value: object) -> str | None:
    if value is None:
        return None
    return _path(value, "/jobcage (inside the cgroup hierarchy)")


def _controllers(value: object) -> tuple[str, ...]:
    names = _text_list(value, "cgroup v1 controller names")
    unknown = [n for n in names if n not in V1_CONTROLLERS]
    if unknown:
        raise _Invalid(f"cgroup v1 controllers among {', '.join(sorted(V1_CONTROLLERS))}")
    if "freezer" not in names:
        raise _Invalid(
            'a list that includes "freezer": teardown freezes the cage to kill every '
            "process, and without it a job's processes survive destroy and reap"
        )
    return names


def _network(value: object, version: int, prefixlen: int, example: str) -> IPNetwork:
    """A pool: a network of one family, holding at least one cage's prefix."""
    kind = {4: ipaddress.IPv4Network, 6: ipaddress.IPv6Network}[version]
    if isinstance(value, kind):
        network = value
    else:
        if not isinstance(value, str):
            raise _Invalid(f"an IPv{version} network such as {example}")
        try:
            network = kind(value.strip())
        except ValueError as e:
            raise _Invalid(f"an IPv{version} network such as {example} ({e})") from None
    if network.prefixlen > prefixlen:
        raise _Invalid(f"a network of at least one cage's /{prefixlen}, e.g. {example}")
    return network


def _pool(value: object) -> ipaddress.IPv4Network:
    return _network(value, 4, CAGE_PREFIXLEN, "100.64.0.0/16")  # type: ignore[return-value]


def _pool6(value: object) -> ipaddress.IPv6Network | None:
    if value is None:
        return None
    return _network(value, 6, CAGE_PREFIXLEN6, DEFAULT_IPV6_POOL)  # type: ignore[return-value]


def _uplink(value: object) -> str | None:
    if value is None:
        return None
    if (
        not isinstance(value, str)
        or not 0 < len(value.encode()) <= IFNAME_MAX_BYTES
        or value in {".", ".."}
        or any(c in "/:" or c.isspace() or not c.isprintable() for c in value)
    ):
        raise _Invalid(
            f"an interface name of 1 to {IFNAME_MAX_BYTES} bytes without '/', ':' or "
            "spaces, such as eth0"
        )
    return value


def _addresses(value: object, what: str, kinds: tuple[type, ...], parse: Callable) -> tuple:
    """A list of ``kinds`` (networks or addresses) parsed by ``parse``; parsed ones, from a
    Config, pass as they are."""
    found = []
    for item in _items(value, what, kinds):
        if isinstance(item, kinds):
            found.append(item)
            continue
        try:
            found.append(parse(item))
        except (ValueError, TypeError) as e:
            raise _Invalid(f"{what} ({e})") from None
    return tuple(found)


def _campus(value: object) -> tuple[IPNetwork, ...]:
    kinds = (ipaddress.IPv4Network, ipaddress.IPv6Network)
    return _addresses(value, "CIDRs such as 129.93.0.0/16", kinds, ipaddress.ip_network)


def _dns(value: object) -> tuple[IPAddress, ...]:
    kinds = (ipaddress.IPv4Address, ipaddress.IPv6Address)
    return _addresses(value, "IP addresses such as 192.0.2.53", kinds, ipaddress.ip_address)


def _whole_number(value: object, what: str) -> int:
    """An int from an int, an integral finite float, or decimal digits."""
    if isinstance(value, bool):
        raise _Invalid(what)
    if isinstance(value, float):
        if not math.isfinite(value) or not value.is_integer():
            raise _Invalid(what)
        return int(value)
    if isinstance(value, str):
        text = value.strip()
        if not text.isascii() or not text.isdigit() or len(text) > 30:
            raise _Invalid(what)
        return int(text)
    if isinstance(value, int):
        return value
    raise _Invalid(what)


def _pids(value: object) -> int | None:
    if value is None:
        return None
    what = (
        f"a whole number of processes from 1 to {PIDS_MAX} (the kernel's PID_MAX_LIMIT, "
        "the largest pids.max it accepts)"
    )
    number = _whole_number(value, what)
    if not 1 <= number <= PIDS_MAX:
        raise _Invalid(what)
    return number


_SIZE = re.compile(r"(\d{1,20})(?:\.(\d{1,9}))?\s*([KMGTPE]?)(?:I?B)?", re.IGNORECASE)
_SIZE_UNITS = {"": 0, "K": 10, "M": 20, "G": 30, "T": 40, "P": 50, "E": 60}
_SIZE_EXPECTED = (
    "a size such as 2G, 512M or a number of bytes (binary units), "
    f"from 1M to {MEMORY_MAX_BYTES >> 60}E"
)


def _size(value: object) -> int | None:
    if value is None:
        return None
    return _bytes(value, _SIZE_EXPECTED, MEMORY_MIN_BYTES, MEMORY_MAX_BYTES)


def _bytes(value: object, what: str, low: int, high: int) -> int:
    """A size given as text (``512M``, ``1.5G``: binary units) or a whole number."""
    if isinstance(value, str):
        match = _SIZE.fullmatch(value.strip())
        if match is None:
            raise _Invalid(what)
        whole, fraction, unit = match.groups()
        shift = _SIZE_UNITS[unit.upper()]
        size = int(whole) << shift
        if fraction:
            size += (int(fraction) << shift) // 10 ** len(fraction)
    else:
        size = _whole_number(value, what)
    if not low <= size <= high:
        raise _Invalid(what)
    return size


def _cpus(value: object) -> float | None:
    if value is None:
        return None
    what = f"a number of CPUs such as 2 or 0.5, from {CPUS_MIN} to {CPUS_MAX:.0f}"
    return _number(value, what, lambda n: CPUS_MIN <= n <= CPUS_MAX)


def _grace(value: object) -> float:
    what = f"a number of seconds from 0 to {GRACE_MAX_SECONDS:.0f}"
    return _number(value, what, lambda n: 0 <= n <= GRACE_MAX_SECONDS)


def _number(value: object, what: str, within: Callable[[float], bool]) -> float:
    """A finite float ``within`` its bounds, from a number or its text (not a bool:
    ``true`` is no number of anything)."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise _Invalid(what)
    try:
        number = float(value)
    except (ValueError, OverflowError):
        raise _Invalid(what) from None
    if not (math.isfinite(number) and within(number)):
        raise _Invalid(what)
    return number


WATCH_ACTIONS = ("log", "kill", "ignore")
# The watcher's socket buffer: 4K (less loses events at once) to 2G (SO_RCVBUFFORCE's
# int); 32M holds about 40,000 events.
WATCH_BUFFER_MIN, WATCH_BUFFER_MAX = 4 << 10, 2 << 30


def _positive(limit: float) -> Callable[[object], float]:
    def parse(value: object) -> float:
        return _number(value, f"a positive number up to {limit:g}", lambda n: 0 < n <= limit)

    return parse


def _buffer(value: object) -> int:
    what = "a size from 4K to 2G, such as 32M"
    return _bytes(value, what, WATCH_BUFFER_MIN, WATCH_BUFFER_MAX)


def _optional_text(value: object) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value or any(ord(c) < 32 for c in value):
        raise _Invalid("a path without control characters")
    return value


def _address(value: object) -> str | None:
    """host:port ([v6]:port), kept as text: the metrics server binds it."""
    if value is None:
        return None
    what = "an address and port such as 127.0.0.1:9101"
    if not isinstance(value, str):
        raise _Invalid(what)
    host, sep, port = value.rpartition(":")
    try:
        ipaddress.ip_address(host.strip("[]"))
        if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise ValueError
    except ValueError:
        raise _Invalid(what) from None
    return value


PARSERS: dict[str, Callable[[object], object]] = {
    "cgroup_version": _choice(CGROUP_VERSIONS),
    "cgroup_parent": _cgroup_parent,
    "cgroup_controllers": _controllers,
    "state_dir": _state_dir,
    "address_pool": _pool,
    "uplink": _uplink,
    "campus_networks": _campus,
    "memory_limit": _size,
    "pids_limit": _pids,
    "cpu_limit": _cpus,
    "allow_node_access": _bool,
    "dns_servers": _dns,
    "firewall": _choice(FIREWALLS),
    "grace_seconds": _grace,
    "ipv6": _choice(IPV6_MODES),
    "ipv6_pool": _pool6,
    "watch_escape_action": _choice(WATCH_ACTIONS),
    "watch_privilege_action": _choice(WATCH_ACTIONS),
    "watch_daemonize_action": _choice(WATCH_ACTIONS),
    "watch_fork_rate_action": _choice(WATCH_ACTIONS),
    "watch_police_action": _choice(WATCH_ACTIONS),
    "watch_fork_rate": _positive(1e9),
    "watch_buffer_size": _buffer,
    "watch_sweep_seconds": _positive(3600),
    "watch_log": _optional_text,
    "watch_metrics_address": _address,
    "watch_police_daemons": lambda v: _text_list(v, "executable names"),
}


def _show(value: object) -> str:
    """The value as the error shows it: one line, bounded (a 400-digit number too)."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 128:
        return f"<a number of {value.bit_length()} bits>"
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def check_value(name: str, value: object, where: str) -> object:
    """``value`` for key ``name`` in its typed form, or a ConfigError naming both the
    key and ``where`` it came from (a file, $JOBCAGE_KEY, a flag, an argument)."""
    parser = PARSERS.get(name)
    if parser is None:
        raise ConfigError(f"{where}: unknown key {name!r}; known keys: {', '.join(PARSERS)}")
    try:
        return parser(value)
    except _Invalid as e:
        raise ConfigError(f"{where}: {name} = {_show(value)} is not valid; expected {e}") from None

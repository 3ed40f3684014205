"""Node-wide settings, shared by the library and the CLI.

The same object is built from defaults, a TOML file (``/etc/jobcage/jobcage.toml`` or
``$JOBCAGE_CONFIG``), the environment and the command line, in rising precedence.

Every value is parsed once, here, into its typed form (a size into bytes, a CIDR into
an ``ipaddress`` network, a list into a tuple): whatever builds a :class:`Config` —
the loader, ``Config(...)`` itself, ``replace()`` or a ``JobCage`` argument — goes
through the same checks, so a bad value is one :class:`~jobcage.errors.ConfigError`
naming the key and where it came from, raised before anything is built. Code after
this module takes the typed value and never parses it again.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

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

_IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
_IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True)
class Config:
    """Typed settings. Fields may be given as text (``address_pool="10.9.0.0/16"``,
    ``memory_limit="2G"``); they are stored parsed and checked (see the module doc)."""

    # "auto" picks v2 when the unified hierarchy holds the memory controller, else v1.
    cgroup_version: str = "auto"
    # Parent cgroup, the same absolute path in every hierarchy (stored normalised).
    # None: the calling process's own cgroup in each hierarchy plus "jobcage".
    cgroup_parent: str | None = None
    # v1 controllers a cage joins; memory and pids are added when a limit needs them.
    cgroup_controllers: tuple[str, ...] = ("freezer", "memory", "cpuacct", "blkio")
    state_dir: str = DEFAULT_STATE_DIR
    address_pool: ipaddress.IPv4Network = DEFAULT_ADDRESS_POOL
    # Interface NATed for the cages; None: the interface of the default route.
    uplink: str | None = None
    campus_networks: tuple[_IPNetwork, ...] = ()
    # Bytes.
    memory_limit: int | None = None
    pids_limit: int | None = None
    # CPUs a job may use (1.5: one and a half CPUs' time per period): cpu.max on v2,
    # the cpu controller's CFS quota on v1.
    cpu_limit: float | None = None
    # Whether a caged job may open connections to services on the node itself.
    allow_node_access: bool = False
    # DNS servers for networked cages when the node's resolver is on loopback and
    # systemd-resolved's upstream list is not available.
    dns_servers: tuple[_IPAddress, ...] = ()
    # Where the cages' rules live: "nftables" (a table `ip jobcage` of JobCage's own;
    # costs the same with 1 or 1000 cages), "iptables-legacy" (chains in the x_tables
    # filter and nat tables, for kernels without nf_tables), or "auto": nftables when
    # the kernel has it.
    firewall: str = "auto"
    # Seconds between forwarding SIGTERM to a job and tearing its cage down: with the
    # teardown, well inside Slurm's default KillWait (30 s) and the 30 s a systemd unit
    # gets by default.
    grace_seconds: float = 20.0
    # IPv6 for networked cages (docs/network.md): "nat" (NAT66 out of the uplink),
    # "routed" (ipv6_pool is a global prefix the site routes to the node), "off", or
    # "auto": "nat" when the node has IPv6 enabled, else "off".
    ipv6: str = "auto"
    # The cages' IPv6 prefixes, a /64 each; None: DEFAULT_IPV6_POOL (not in routed mode).
    ipv6_pool: ipaddress.IPv6Network | None = None
    # The proc-connector watcher (docs/watch.md). What each detection does: log, kill
    # or ignore. Police: a non-root process leaving a batch daemon's tree (no cgroups).
    watch_escape_action: str = "kill"
    watch_privilege_action: str = "log"
    watch_daemonize_action: str = "log"
    watch_fork_rate_action: str = "log"
    watch_police_action: str = "kill"
    # Forks a second of one cage above which fork_rate is reported.
    watch_fork_rate: float = 5000.0
    # The event socket's receive buffer (SO_RCVBUFFORCE), bytes; a fork storm needs
    # megabytes (given as a size: "32M").
    watch_buffer_size: int = 32 << 20
    # Seconds between checks of every cage against its cgroups (how late a quiet
    # escape is seen; an exec is checked at once).
    watch_sweep_seconds: float = 0.1
    # `jobcage watch`: JSON lines to this file (None: stdout); Prometheus metrics on
    # this host:port (None: off); executable names of per-job daemons to police.
    watch_log: str | None = None
    watch_metrics_address: str | None = None
    watch_police_daemons: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            object.__setattr__(self, f.name, check_value(f.name, value, "Config"))
        _check_together(self)

    def replace(self, **changes: object) -> Config:
        return dataclasses.replace(self, **changes)


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


def _network(value: object, version: int, prefixlen: int, example: str) -> _IPNetwork:
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


def _campus(value: object) -> tuple[_IPNetwork, ...]:
    networks = []
    kinds = (ipaddress.IPv4Network, ipaddress.IPv6Network)
    for item in _items(value, "CIDRs such as 129.93.0.0/16", kinds):
        if isinstance(item, kinds):
            networks.append(item)
            continue
        try:
            networks.append(ipaddress.ip_network(item))  # type: ignore[arg-type]
        except (ValueError, TypeError) as e:
            raise _Invalid(f"CIDRs such as 129.93.0.0/16 ({e})") from None
    return tuple(networks)


def _dns(value: object) -> tuple[_IPAddress, ...]:
    servers = []
    kinds = (ipaddress.IPv4Address, ipaddress.IPv6Address)
    for item in _items(value, "IP addresses such as 192.0.2.53", kinds):
        if isinstance(item, kinds):
            servers.append(item)
            continue
        try:
            servers.append(ipaddress.ip_address(item))  # type: ignore[arg-type]
        except (ValueError, TypeError) as e:
            raise _Invalid(f"IP addresses such as 192.0.2.53 ({e})") from None
    return tuple(servers)


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
    if isinstance(value, str):
        match = _SIZE.fullmatch(value.strip())
        if match is None:
            raise _Invalid(_SIZE_EXPECTED)
        whole, fraction, unit = match.groups()
        shift = _SIZE_UNITS[unit.upper()]
        size = int(whole) << shift
        if fraction:
            size += (int(fraction) << shift) // 10 ** len(fraction)
    else:
        size = _whole_number(value, _SIZE_EXPECTED)
    if not MEMORY_MIN_BYTES <= size <= MEMORY_MAX_BYTES:
        raise _Invalid(_SIZE_EXPECTED)
    return size


def _cpus(value: object) -> float | None:
    if value is None:
        return None
    what = f"a number of CPUs such as 2 or 0.5, from {CPUS_MIN} to {CPUS_MAX:.0f}"
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise _Invalid(what)
    try:
        cpus = float(value)
    except (ValueError, OverflowError):
        raise _Invalid(what) from None
    if not (math.isfinite(cpus) and CPUS_MIN <= cpus <= CPUS_MAX):
        raise _Invalid(what)
    return cpus


def _grace(value: object) -> float:
    what = f"a number of seconds from 0 to {GRACE_MAX_SECONDS:.0f}"
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise _Invalid(what)
    try:
        seconds = float(value)
    except (ValueError, OverflowError):
        raise _Invalid(what) from None
    if not (math.isfinite(seconds) and 0 <= seconds <= GRACE_MAX_SECONDS):
        raise _Invalid(what)
    return seconds


WATCH_ACTIONS = ("log", "kill", "ignore")
# The watcher's socket buffer: 4K (less loses events at once) to 2G (SO_RCVBUFFORCE's
# int); 32M holds about 40,000 events.
WATCH_BUFFER_MIN, WATCH_BUFFER_MAX = 4 << 10, 2 << 30


def _positive(limit: float) -> Callable[[object], float]:
    def parse(value: object) -> float:
        what = f"a positive number up to {limit:g}"
        if isinstance(value, bool) or not isinstance(value, int | float | str):
            raise _Invalid(what)
        try:
            number = float(value)
        except (ValueError, OverflowError):
            raise _Invalid(what) from None
        if not (math.isfinite(number) and 0 < number <= limit):
            raise _Invalid(what)
        return number

    return parse


def _buffer(value: object) -> int:
    what = "a size from 4K to 2G, such as 32M"
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
    if not WATCH_BUFFER_MIN <= size <= WATCH_BUFFER_MAX:
        raise _Invalid(what)
    return size


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


_PARSERS: dict[str, Callable[[object], object]] = {
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
    parser = _PARSERS.get(name)
    if parser is None:
        raise ConfigError(f"{where}: unknown key {name!r}; known keys: {', '.join(_PARSERS)}")
    try:
        return parser(value)
    except _Invalid as e:
        raise ConfigError(f"{where}: {name} = {_show(value)} is not valid; expected {e}") from None


def _check_together(config: Config) -> None:
    """Checks across keys. A pool's prefixes are routed to the cages: a campus network
    inside it would have its replies sent to a job instead of back to campus."""
    pool6 = config.ipv6_pool or ipaddress.IPv6Network(DEFAULT_IPV6_POOL)
    for key, pool in (("address_pool", config.address_pool), ("ipv6_pool", pool6)):
        clash = [
            str(n)
            for n in config.campus_networks
            if n.version == pool.version and n.overlaps(pool)  # type: ignore[arg-type]
        ]
        if clash:
            raise ConfigError(
                f"{key} {pool} overlaps campus_networks {', '.join(clash)}: replies to the "
                f"jobs would be routed wrong; set {key} to a range used nowhere on campus"
            )
    if config.ipv6 == "routed" and config.ipv6_pool is None:
        raise ConfigError(
            'ipv6 = "routed" needs ipv6_pool: the global prefix the site routes to this '
            'node (a /64 of it per cage); set ipv6_pool, or ipv6 = "nat"'
        )


def parse_size(value: str | int | None) -> int | None:
    """Bytes from ``2G``, ``512M``, ``1048576`` (binary units, as cgroupfs takes)."""
    return check_value("memory_limit", value, "size")  # type: ignore[return-value]


def parse_cpus(value: float | int | str | None) -> float | None:
    """A CPU limit as a number of CPUs (``2``, ``0.5``); None for no limit."""
    return check_value("cpu_limit", value, "cpu limit")  # type: ignore[return-value]


DEFAULT_CONFIG_FILE = "/etc/jobcage/jobcage.toml"
ENV_PREFIX = "JOBCAGE_"


def _read_file(path: str) -> dict[str, object]:
    import tomllib

    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(
            f"{path}: not a TOML text file (not UTF-8 at byte {e.start}); give the "
            "path of the TOML config"
        ) from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None


def load_config(
    path: str | None = None,
    environ: Mapping[str, str] | None = None,
    *,
    origins: Mapping[str, str] | None = None,
    **overrides: object,
) -> Config:
    """Defaults < file < environment (JOBCAGE_<KEY>) < ``overrides`` (the command line).

    The file is ``path``, else ``$JOBCAGE_CONFIG``, else /etc/jobcage/jobcage.toml if it
    exists. Unknown keys and bad values are errors naming the key and the file (for an
    override: ``origins[key]``, e.g. the flag that set it). An empty environment
    variable counts as unset.
    """
    env = os.environ if environ is None else environ
    values: dict[str, object] = {}
    where: dict[str, str] = {}
    path = path or env.get("JOBCAGE_CONFIG")
    if path is None and os.path.exists(DEFAULT_CONFIG_FILE):
        path = DEFAULT_CONFIG_FILE
    if path is not None:
        for key, value in _read_file(path).items():
            if key not in _PARSERS:
                raise ConfigError(
                    f"{path}: unknown key {key!r}; known keys: {', '.join(sorted(_PARSERS))}"
                )
            values[key], where[key] = check_value(key, value, path), path
    for key in _PARSERS:
        raw = env.get(ENV_PREFIX + key.upper())
        if raw:
            source = f"${ENV_PREFIX}{key.upper()}"
            values[key], where[key] = check_value(key, raw, source), source
    for key, value in overrides.items():
        source = (origins or {}).get(key, "command line")
        if value is not None:
            values[key], where[key] = check_value(key, value, source), source
    try:
        return Config(**values)  # type: ignore[arg-type]
    except ConfigError as e:
        sources = ", ".join(dict.fromkeys(where.values())) or "defaults"
        raise ConfigError(f"{sources}: {e}") from None

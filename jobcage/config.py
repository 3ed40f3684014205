"""Node-wide settings, shared by the library and the CLI.

The same object is built from defaults, a TOML file (``/etc/jobcage/jobcage.toml`` or
``$JOBCAGE_CONFIG``), the environment and the command line, in rising precedence.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

DEFAULT_STATE_DIR = "/run/jobcage"
DEFAULT_CGROUP_PARENT_NAME = "jobcage"
# RFC 6598 shared address space: made for carrier-grade NAT, so it is neither a
# campus's RFC 1918 range nor a public one. Each cage takes a /30 of it.
DEFAULT_ADDRESS_POOL = "100.64.0.0/16"
FIREWALLS = ("auto", "nftables", "iptables-legacy")
# A unique local prefix (RFC 4193): never routed beyond the node, NATed out like the
# IPv4 pool. A /64 per cage (65,536 of them).
DEFAULT_IPV6_POOL = "fd6a:6f62:6361::/48"
IPV6_MODES = ("auto", "nat", "routed", "off")


@dataclass(frozen=True)
class Config:
    # "auto" picks v2 when the unified hierarchy holds the memory controller, else v1.
    cgroup_version: str = "auto"
    # Parent cgroup, the same relative path in every hierarchy. None: the calling
    # process's own cgroup in each hierarchy plus "jobcage".
    cgroup_parent: str | None = None
    # v1 controllers a cage joins; pids is added when a pids limit is set.
    cgroup_controllers: tuple[str, ...] = ("freezer", "memory", "cpuacct", "blkio")
    state_dir: str = DEFAULT_STATE_DIR
    address_pool: str = DEFAULT_ADDRESS_POOL
    # Interface NATed for the cages; None: the interface of the default route.
    uplink: str | None = None
    campus_networks: tuple[str, ...] = ()
    memory_limit: str | int | None = None
    pids_limit: int | None = None
    # CPUs a job may use (1.5: one and a half CPUs' time per period): cpu.max on v2,
    # the cpu controller's CFS quota on v1.
    cpu_limit: float | None = None
    # Whether a caged job may open connections to services on the node itself.
    allow_node_access: bool = False
    # DNS servers for networked cages when the node's resolver is on loopback and
    # systemd-resolved's upstream list is not available.
    dns_servers: tuple[str, ...] = ()
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
    ipv6_pool: str | None = None
    # The proc-connector watcher (docs/watch.md). What each detection does: log, kill
    # or ignore. Police: a non-root process leaving a batch daemon's tree (no cgroups).
    watch_escape_action: str = "kill"
    watch_privilege_action: str = "log"
    watch_daemonize_action: str = "log"
    watch_fork_rate_action: str = "log"
    watch_police_action: str = "kill"
    # Forks a second of one cage above which fork_rate is reported.
    watch_fork_rate: float = 5000.0
    # The event socket's receive buffer (SO_RCVBUFFORCE); a fork storm needs megabytes.
    watch_buffer_size: str | int = "32M"
    # Seconds between checks of every cage against its cgroups (how late a quiet
    # escape is seen; an exec is checked at once).
    watch_sweep_seconds: float = 0.1
    # `jobcage watch`: JSON lines to this file (None: stdout); Prometheus metrics on
    # this host:port (None: off); executable names of per-job daemons to police.
    watch_log: str | None = None
    watch_metrics_address: str | None = None
    watch_police_daemons: tuple[str, ...] = ()

    def replace(self, **changes: object) -> Config:
        return dataclasses.replace(self, **changes)


_SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(value: str | int | None) -> int | None:
    """Bytes from ``2G``, ``512M``, ``1048576`` (binary units, as cgroupfs takes)."""
    from .errors import ConfigError

    if value is None or (isinstance(value, int) and not isinstance(value, bool)):
        if isinstance(value, int) and value <= 0:
            raise ConfigError(f"memory limit must be positive, not {value}")
        return value
    text = str(value).strip().upper().removesuffix("B").removesuffix("I")
    unit = text[-1:] if text[-1:] in _SIZE_UNITS else ""
    number = text[: len(text) - len(unit)]
    try:
        size = int(float(number) * _SIZE_UNITS[unit])
    except ValueError:
        raise ConfigError(
            f"cannot read {value!r} as a size; write e.g. 2G, 512M or a number of bytes"
        ) from None
    if size <= 0:
        raise ConfigError(f"size {value!r} must be positive")
    return size


def parse_cpus(value: float | int | str | None) -> float | None:
    """A CPU limit as a positive number of CPUs (``2``, ``0.5``); None for no limit."""
    from .errors import ConfigError

    if value is None:
        return None
    try:
        if isinstance(value, bool):
            raise ValueError
        cpus = float(value)
    except (TypeError, ValueError):
        raise ConfigError(
            f"cpu limit {value!r} is not a number of CPUs; write e.g. 2 or 0.5"
        ) from None
    if not cpus > 0 or cpus == float("inf"):
        raise ConfigError(f"cpu limit {value!r} must be a positive number of CPUs, e.g. 2 or 0.5")
    return cpus


DEFAULT_CONFIG_FILE = "/etc/jobcage/jobcage.toml"
ENV_PREFIX = "JOBCAGE_"


def _coerce(name: str, value: object, where: str) -> object:
    """Check a value against the field's type; the error names the key and its source."""
    from .errors import ConfigError

    f = {f.name: f for f in dataclasses.fields(Config)}[name]
    kind = str(f.type)
    try:
        if kind.startswith("tuple"):
            if isinstance(value, str):
                value = [v for v in (s.strip() for s in value.split(",")) if v]
            if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
                raise TypeError("a list of strings")
            return tuple(value)
        if kind == "bool":
            if isinstance(value, str):
                lowered = value.strip().lower()
                if lowered not in {"1", "0", "true", "false", "yes", "no"}:
                    raise TypeError("true or false")
                return lowered in {"1", "true", "yes"}
            if not isinstance(value, bool):
                raise TypeError("true or false")
            return value
        if kind == "float":
            if isinstance(value, bool):
                raise TypeError("a number")
            return float(value)  # type: ignore[arg-type]
        if kind == "float | None":
            return parse_cpus(value)  # type: ignore[arg-type]
        if kind == "int | None":
            if isinstance(value, bool) or int(value) <= 0:  # type: ignore[call-overload]
                raise TypeError("a positive integer")
            return int(value)  # type: ignore[call-overload]
        if name in ("memory_limit", "watch_buffer_size"):
            parse_size(value)  # type: ignore[arg-type]
            return value
        if name.startswith("watch_") and name.endswith("_action"):
            if value not in ("log", "kill", "ignore"):
                raise TypeError("log, kill or ignore")
            return value
        if name == "firewall":
            if str(value) not in FIREWALLS:
                raise TypeError(", ".join(FIREWALLS))
            return str(value)
        if name == "ipv6":
            if str(value) not in IPV6_MODES:
                raise TypeError(", ".join(IPV6_MODES))
            return str(value)
        if name == "cgroup_version":
            if str(value) not in {"auto", "1", "2"}:
                raise TypeError("auto, 1 or 2")
            return str(value)
        if not isinstance(value, str):
            raise TypeError("a string")
        return value
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}: {name} = {value!r} is not valid; expected {e}") from None


def load_config(
    path: str | None = None,
    environ: dict[str, str] | None = None,
    **overrides: object,
) -> Config:
    """Defaults < file < environment (JOBCAGE_<KEY>) < ``overrides`` (the command line).

    The file is ``path``, else ``$JOBCAGE_CONFIG``, else /etc/jobcage/jobcage.toml if it
    exists. Unknown keys and bad values are errors naming the key and the file.
    """
    import tomllib

    from .errors import ConfigError

    env = os.environ if environ is None else environ
    names = {f.name for f in dataclasses.fields(Config)}
    values: dict[str, object] = {}
    path = path or env.get("JOBCAGE_CONFIG")
    if path is None and os.path.exists(DEFAULT_CONFIG_FILE):
        path = DEFAULT_CONFIG_FILE
    if path is not None:
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: not valid TOML: {e}") from None
        for key, value in data.items():
            if key not in names:
                raise ConfigError(
                    f"{path}: unknown key {key!r}; known keys: {', '.join(sorted(names))}"
                )
            values[key] = _coerce(key, value, path)
    for key in names:
        raw = env.get(ENV_PREFIX + key.upper())
        if raw is not None:
            values[key] = _coerce(key, raw, f"${ENV_PREFIX}{key.upper()}")
    for key, value in overrides.items():
        if key not in names:
            raise ConfigError(f"unknown setting {key!r}")
        if value is not None:
            values[key] = _coerce(key, value, "command line")
    return Config(**values)  # type: ignore[arg-type]

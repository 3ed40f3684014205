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
import os
from collections.abc import Mapping
from dataclasses import dataclass

from .config_values import (
    DEFAULT_ADDRESS_POOL,
    DEFAULT_IPV6_POOL,
    DEFAULT_STATE_DIR,
    PARSERS,
    IPAddress,
    IPNetwork,
    check_value,
)
from .errors import ConfigError


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
    campus_networks: tuple[IPNetwork, ...] = ()
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
    dns_servers: tuple[IPAddress, ...] = ()
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
            if key not in PARSERS:
                raise ConfigError(
                    f"{path}: unknown key {key!r}; known keys: {', '.join(sorted(PARSERS))}"
                )
            values[key], where[key] = check_value(key, value, path), path
    for key in PARSERS:
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

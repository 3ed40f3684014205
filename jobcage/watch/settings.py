"""The watcher's settings, parsed once from the node's Config into typed values."""

from __future__ import annotations

import ipaddress
import math
from dataclasses import dataclass

from ..config import Config
from ..errors import ConfigError
from .detect import Policy


def _positive(name: str, value: object, example: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ConfigError(f"{name} = {value!r} is not valid; give a number such as {example}")
    if value <= 0:
        raise ConfigError(f"{name} = {value!r} must be positive, e.g. {example}")
    return float(value)


def parse_address(value: str) -> tuple[str, int]:
    """``host:port`` (``[v6]:port`` for IPv6) to what an HTTP server binds."""
    host, sep, port = value.rpartition(":")
    host = host.strip("[]")
    try:
        if not sep or not host:
            raise ValueError
        ipaddress.ip_address(host)
        number = int(port)
        if not 0 <= number <= 65535:
            raise ValueError
    except ValueError:
        raise ConfigError(
            f"watch_metrics_address = {value!r} is not valid; give an address and port "
            "such as 127.0.0.1:9101 (bind to a management address, not 0.0.0.0, unless "
            "a firewall guards the port)"
        ) from None
    return host, number


@dataclass(frozen=True)
class WatchSettings:
    policy: Policy
    buffer_bytes: int
    sweep_seconds: float
    log_path: str | None
    metrics_address: tuple[str, int] | None
    police_names: tuple[str, ...]

    @classmethod
    def from_config(cls, config: Config) -> WatchSettings:
        """Every watch_* key checked; a bad one is one ConfigError naming it and its value."""
        policy = Policy(
            escape=config.watch_escape_action,
            privilege=config.watch_privilege_action,
            daemonize=config.watch_daemonize_action,
            fork_rate=config.watch_fork_rate_action,
            police=config.watch_police_action,
            fork_rate_per_second=_positive("watch_fork_rate", config.watch_fork_rate, "5000"),
        )
        buffer_bytes = config.watch_buffer_size  # bytes, 4K to 2G: parsed by the config
        address = config.watch_metrics_address
        return cls(
            policy=policy,
            buffer_bytes=buffer_bytes,
            sweep_seconds=_positive("watch_sweep_seconds", config.watch_sweep_seconds, "0.1"),
            log_path=config.watch_log,
            metrics_address=parse_address(address) if address else None,
            police_names=tuple(config.watch_police_daemons),
        )

    def watcher(self, **kwargs):
        from .watcher import Watcher

        return Watcher(
            self.policy,
            buffer_bytes=self.buffer_bytes,
            sweep_seconds=self.sweep_seconds,
            police_names=self.police_names,
            **kwargs,
        )

"""Cgroup backends: which one this node needs (:mod:`.hierarchies` probes what is
mounted), chosen here and re-exported; the backends' interface is :mod:`.base`'s, so
that v1, v2 and caller never import this package's ``__init__`` (no import circle).
"""

from __future__ import annotations

from ..config import Config
from ..errors import ConfigError, KernelFeatureError
from .base import CageCgroup, CgroupBackend, CgroupStats, KillResult, parent_path
from .hierarchies import (
    V1_CONTROLLERS,
    Hierarchies,
    parse_mountinfo,
    parse_proc_cgroup,
    probe,
    probe_from,
)

__all__ = [
    "V1_CONTROLLERS",
    "CageCgroup",
    "CgroupBackend",
    "CgroupStats",
    "Hierarchies",
    "KillResult",
    "open_backend",
    "parent_path",
    "parse_mountinfo",
    "parse_proc_cgroup",
    "probe",
    "probe_from",
]


def open_backend(config: Config, hierarchies: Hierarchies | None = None) -> CgroupBackend:
    h = hierarchies or probe()
    version = {"auto": h.default_version, "1": 1, "2": 2}.get(str(config.cgroup_version))
    if version is None:
        raise ConfigError(f"cgroup_version must be auto, 1 or 2, not {config.cgroup_version!r}")
    if version in (1, 2) and config.cgroup_parent is not None:
        from .caller import caller_limit

        if caller_limit(h, version) is not None:
            # Never weaken the batch system's limits: nest under the caller.
            config = config.replace(cgroup_parent=None)
    if version == 1:
        from .v1 import CgroupV1Backend

        return CgroupV1Backend(h, config)
    if version == 2:
        from .v2 import CgroupV2Backend

        return CgroupV2Backend(h, config)
    raise KernelFeatureError(
        "no cgroup hierarchy is mounted: mount cgroup2 on /sys/fs/cgroup "
        "(systemd does this at boot) or the v1 freezer and memory controllers"
    )

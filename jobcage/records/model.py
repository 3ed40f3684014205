"""The cage record as a type: what a cage writes to disk, and what is believed on read.

A record is input. It may be damaged (a full disk, an editor, a restore from backup)
or hostile (anyone who could write the state dir), so :func:`parse_record` believes
only what it can check: the shape and types, the job id (valid, and the name of the
file), and that every kernel name in it is the one JobCage derives from that job id
itself. A record that fails is a :class:`RecordError`; the store sets it aside.

Formats: 1 (to 0.x) nested a ``format`` key in the network part; 2 has one format for
the whole record. Both are read; 2 is written.
"""

from __future__ import annotations

import dataclasses
import enum
import ipaddress
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..errors import InvalidJobIdError, NewerRecordError, RecordError
from ..ids import netns_name, validate_job_id, veth_names
from ..usage import Usage

RECORD_FORMAT = 2
READABLE_FORMATS = frozenset({1, 2})

# Where the kernel names a network cage's objects: fixed by iproute2's conventions.
NETNS_RUN_DIR = "/run/netns"
NETNS_ETC_DIR = "/etc/netns"
# The firewall backends a record may name (a config's "auto" is resolved before).
FIREWALLS = frozenset({"nftables", "iptables-legacy"})


class RecordState(enum.Enum):
    """A cage's state, in the library and on disk (the values are what is written)."""

    BUILDING = "building"  # claimed; kernel objects are being made
    BUILT = "built"  # every part made; the job may run
    TEARING_DOWN = "tearing-down"  # the owner's destroy() started removing things
    TEARDOWN_FAILED = "teardown-failed"  # destroy() gave up; reap finishes it
    REAPING = "reaping"  # a reaper took it over (or holds the id of an orphan)


@dataclass(frozen=True)
class CgroupPart:
    version: int
    # controller (or "unified") -> directory; the basename is always the job id.
    paths: Mapping[str, str]

    def to_dict(self) -> dict[str, Any]:
        return {"version": self.version, "paths": dict(self.paths)}


@dataclass(frozen=True)
class NetworkPart:
    """Everything reap needs to remove a network cage; names checked against the id."""

    netns_name: str
    host_veth: str
    address: str
    host_address: str
    # The lease reap releases (checked against the job id by the lease store) and its pool.
    lease_index: int
    pool: str
    firewall: str
    campus_networks: tuple[str, ...]
    allow_node_access: bool
    resolv_conf_path: str | None = None
    # Informational (where an administrator finds the rules); never acted on.
    chains: Mapping[str, Any] = field(default_factory=dict)
    # A dual-stack cage's IPv6 addresses (checked; no names in it): None for IPv4 only.
    ipv6: Mapping[str, Any] | None = None
    # The config's uplink when the cage was built (None: the default route's).
    uplink: str | None = None
    # Keys a newer writer added: kept, never acted on here.
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def netns_path(self) -> str:
        return os.path.join(NETNS_RUN_DIR, self.netns_name)

    def to_dict(self, job_id: str, state_dir: str) -> dict[str, Any]:
        """The dict :meth:`NetworkCage.from_record` takes (and format 1 wrote)."""
        return {
            **self.extra,
            "job_id": job_id,
            "netns_name": self.netns_name,
            "netns_path": self.netns_path,
            "host_veth": self.host_veth,
            "address": self.address,
            "host_address": self.host_address,
            "lease_index": self.lease_index,
            "pool": self.pool,
            "campus_networks": list(self.campus_networks),
            "allow_node_access": self.allow_node_access,
            "state_dir": state_dir,
            "resolv_conf_path": self.resolv_conf_path,
            "firewall": self.firewall,
            "chains": dict(self.chains),
            "ipv6": dict(self.ipv6) if self.ipv6 is not None else None,
            "uplink": self.uplink,
        }


@dataclass(frozen=True)
class Owner:
    """A process, by pid and start time: a recycled pid is never taken for it."""

    pid: int | None
    start_ticks: int | None


@dataclass(frozen=True)
class CageRecord:
    job_id: str
    state: RecordState
    owner: Owner
    created_unix: float | None = None
    cgroup: CgroupPart | None = None
    network: NetworkPart | None = None
    memory_limit_bytes: int | None = None
    pids_limit: int | None = None
    cpu_limit: float | None = None
    cgroup_parent: str | None = None
    final_usage: Usage | None = None
    # The owner a reaper took the record over from.
    reaped_from: Owner | None = None
    reaped_from_state: RecordState | None = None
    # Why a reaper holds a record of a job that had none ("no-record").
    reaping: str | None = None
    # The usage file this cage was billed in, once it was (one job, one bill).
    billed: str | None = None
    # Keys this version does not know (written by a newer one): kept as they are.
    extra: Mapping[str, Any] = field(default_factory=dict)

    def replace(self, **changes: Any) -> CageRecord:
        return dataclasses.replace(self, **changes)

    def to_dict(self, state_dir: str) -> dict[str, Any]:
        out: dict[str, Any] = {
            **self.extra,
            "format": RECORD_FORMAT,
            "job_id": self.job_id,
            "owner_pid": self.owner.pid,
            "owner_start_ticks": self.owner.start_ticks,
            "created_unix": self.created_unix,
            "state": self.state.value,
            "cgroup": self.cgroup.to_dict() if self.cgroup else None,
            "network": self.network.to_dict(self.job_id, state_dir) if self.network else None,
            "limits": {
                "memory_bytes": self.memory_limit_bytes,
                "pids": self.pids_limit,
                "cpus": self.cpu_limit,
            },
            "config": {"cgroup_parent": self.cgroup_parent},
        }
        optional = {
            "final_usage": self.final_usage.to_dict() if self.final_usage else None,
            "reaped_from": None
            if self.reaped_from is None
            else {
                "owner_pid": self.reaped_from.pid,
                "owner_start_ticks": self.reaped_from.start_ticks,
                "state": self.reaped_from_state.value if self.reaped_from_state else None,
            },
            "reaping": self.reaping,
            "billed": self.billed,
        }
        out.update({k: v for k, v in optional.items() if v is not None})
        return out


# -- reading -----------------------------------------------------------------------------

_KNOWN = {
    "format",
    "job_id",
    "owner_pid",
    "owner_start_ticks",
    "created_unix",
    "state",
    "cgroup",
    "network",
    "limits",
    "config",
    "final_usage",
    "reaped_from",
    "reaping",
    "billed",
}


def parse_record(data: object, file_job_id: str) -> CageRecord:
    """Believe a decoded record only as far as it can be checked; RecordError if not."""
    if not isinstance(data, dict):
        raise RecordError(f"is a JSON {_json_type(data)}, not an object")
    fmt = data.get("format", 1)  # a claim of 0.x wrote no format before it was built
    if isinstance(fmt, int) and not isinstance(fmt, bool) and fmt > RECORD_FORMAT:
        # A newer JobCage's cage (an upgrade under way): never set aside, since its
        # objects would then be reaped as unrecorded while its owner runs.
        raise NewerRecordError(
            f"has format {fmt}, newer than this JobCage reads ({RECORD_FORMAT}); it is "
            "left alone: run the newer `jobcage` on this node"
        )
    if fmt not in READABLE_FORMATS or isinstance(fmt, bool):
        raise RecordError(f"has format {fmt!r}; this JobCage reads {sorted(READABLE_FORMATS)}")
    job_id = data.get("job_id")
    try:
        validate_job_id(job_id)
    except InvalidJobIdError as e:
        raise RecordError(f"has a bad job id: {e}") from None
    if job_id != file_job_id:
        raise RecordError(f"names job {job_id!r}, not the {file_job_id!r} of its file name")
    state = _state(data.get("state"), "state")
    limits = _dict(data.get("limits"), "limits")
    config = _dict(data.get("config"), "config")
    reaped_from = data.get("reaped_from")
    previous = _dict(reaped_from, "reaped_from")
    usage = data.get("final_usage")
    return CageRecord(
        job_id=job_id,
        state=state,
        owner=_owner(data, "owner_pid", "owner_start_ticks"),
        created_unix=_number(data.get("created_unix"), "created_unix"),
        cgroup=_cgroup(data.get("cgroup"), job_id),
        network=network_part(data.get("network"), job_id),
        memory_limit_bytes=_int(limits.get("memory_bytes"), "limits.memory_bytes"),
        pids_limit=_int(limits.get("pids"), "limits.pids"),
        cpu_limit=_number(limits.get("cpus"), "limits.cpus"),
        cgroup_parent=_str(config.get("cgroup_parent"), "config.cgroup_parent"),
        final_usage=None if usage is None else _usage(usage),
        reaped_from=None
        if reaped_from is None
        else _owner(previous, "owner_pid", "owner_start_ticks"),
        reaped_from_state=None
        if previous.get("state") is None
        else _state(previous.get("state"), "reaped_from.state"),
        reaping=_str(data.get("reaping"), "reaping"),
        billed=_str(data.get("billed"), "billed"),
        extra={k: v for k, v in data.items() if k not in _KNOWN},
    )


def _json_type(data: object) -> str:
    names = {list: "array", str: "string", bool: "boolean", type(None): "null"}
    return names.get(
        type(data), "number" if isinstance(data, int | float) else type(data).__name__
    )


def _state(value: object, name: str) -> RecordState:
    try:
        return RecordState(value)
    except ValueError:
        raise RecordError(
            f"has {name} {value!r}, not one of {[s.value for s in RecordState]}"
        ) from None


def _dict(value: object, name: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise RecordError(f"has {name} of type {_json_type(value)}, not an object")
    return value


def _int(value: object, name: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise RecordError(f"has {name} {value!r}, not an integer")
    return value


def _number(value: object, name: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise RecordError(f"has {name} {value!r}, not a finite number")
    return float(value)


def _str(value: object, name: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise RecordError(f"has {name} {value!r}, not a string")
    return value


def _owner(data: Mapping[str, Any], pid: str, ticks: str) -> Owner:
    owner_pid = _int(data.get(pid), pid)
    if owner_pid is not None and owner_pid <= 0:
        raise RecordError(f"has {pid} {owner_pid}, not a process id")
    return Owner(owner_pid, _int(data.get(ticks), ticks))


def salvage_owner(data: object) -> Owner | None:
    """The owner of a record that fails validation elsewhere, if its owner fields are
    sound: reap must not take a live owner's cage for a damaged field."""
    if not isinstance(data, Mapping):
        return None
    try:
        owner = _owner(data, "owner_pid", "owner_start_ticks")
    except RecordError:
        return None
    return owner if owner.pid is not None and owner.start_ticks is not None else None


def _usage(value: object) -> Usage:
    data = _dict(value, "final_usage")
    for name, figure in data.items():
        if figure is None:
            continue
        if isinstance(figure, bool) or not isinstance(figure, int | float):
            raise RecordError(f"has final_usage.{name} {figure!r}, not a number")
    return Usage.from_dict(data)


def _cgroup(value: object, job_id: str) -> CgroupPart | None:
    if value is None:
        return None
    data = _dict(value, "cgroup")
    paths = _dict(data.get("paths"), "cgroup.paths")
    version = data.get("version")
    if version is None:  # format 1 claims of 0.x: guessed from the layout
        version = 2 if "unified" in paths else 1
    if version not in (1, 2) or isinstance(version, bool):
        raise RecordError(f"has cgroup.version {version!r}, not 1 or 2")
    for controller, path in paths.items():
        if not isinstance(path, str) or not os.path.isabs(path):
            raise RecordError(f"has cgroup path {path!r} for {controller}, not an absolute path")
        if os.path.normpath(path) != path or os.path.basename(path) != job_id:
            # Every cage directory JobCage makes is <parent>/<job id>.
            raise RecordError(
                f"has cgroup path {path!r} for {controller}, which is not <parent>/{job_id}"
            )
    return CgroupPart(version=version, paths=dict(paths))


def network_part(value: object, job_id: str) -> NetworkPart | None:
    """The checked network part of a record (what ``NetworkCage.to_record`` gives)."""
    if value is None:
        return None
    data = _dict(value, "network")
    if data.get("format", 1) != 1:
        raise RecordError(f"has network.format {data.get('format')!r}, not 1")
    if data.get("job_id", job_id) != job_id:
        raise RecordError(f"has network.job_id {data.get('job_id')!r}, not {job_id!r}")
    derived = {
        "netns_name": netns_name(job_id),
        "host_veth": veth_names(job_id)[0],
        "netns_path": os.path.join(NETNS_RUN_DIR, netns_name(job_id)),
    }
    for key, expected in derived.items():
        if data.get(key, expected) != expected:
            # reap would remove what the record names: only JobCage's own names pass.
            raise RecordError(
                f"has network.{key} {data.get(key)!r}, not {expected!r} (derived from the job id)"
            )
    resolv = _str(data.get("resolv_conf_path"), "network.resolv_conf_path")
    expected_resolv = os.path.join(NETNS_ETC_DIR, derived["netns_name"], "resolv.conf")
    if resolv is not None and resolv != expected_resolv:
        raise RecordError(f"has network.resolv_conf_path {resolv!r}, not {expected_resolv!r}")
    try:
        address = str(ipaddress.IPv4Interface(_str(data.get("address"), "network.address")))
        host = str(ipaddress.IPv4Interface(_str(data.get("host_address"), "network.host_address")))
        pool = str(ipaddress.IPv4Network(_str(data.get("pool"), "network.pool")))
        campus = data.get("campus_networks")
        if not isinstance(campus, list):
            raise RecordError(f"has network.campus_networks {campus!r}, not a list")
        campus_networks = tuple(str(ipaddress.IPv4Network(c)) for c in campus)
    except (ipaddress.AddressValueError, ipaddress.NetmaskValueError, ValueError, TypeError) as e:
        raise RecordError(f"has a bad network address: {e}") from None
    lease_index = _int(data.get("lease_index"), "network.lease_index")
    if lease_index is None or lease_index < 0:
        raise RecordError(f"has network.lease_index {lease_index!r}, not an index")
    allow = data.get("allow_node_access")
    if not isinstance(allow, bool):
        raise RecordError(f"has network.allow_node_access {allow!r}, not a boolean")
    firewall = _str(data.get("firewall"), "network.firewall") or "iptables-legacy"
    if firewall not in FIREWALLS:
        raise RecordError(f"has network.firewall {firewall!r}, not one of {sorted(FIREWALLS)}")
    checked: dict[str, Any] = {
        "address": address,
        "host_address": host,
        "lease_index": lease_index,
        "pool": pool,
        "campus_networks": campus_networks,
        "allow_node_access": allow,
        "firewall": firewall,
        "resolv_conf_path": resolv,
        "chains": _dict(data.get("chains"), "network.chains"),
        "ipv6": _ipv6(data.get("ipv6")),
        "uplink": _interface(data.get("uplink"), "network.uplink"),
        "extra": {k: v for k, v in data.items() if k not in _NETWORK_KNOWN},
    }
    return NetworkPart(netns_name=derived["netns_name"], host_veth=derived["host_veth"], **checked)


_NETWORK_KNOWN = {
    *(f.name for f in dataclasses.fields(NetworkPart)),
    "job_id",
    "netns_path",
    "state_dir",
    "format",
}


def _interface(value: object, name: str) -> str | None:
    """An interface name as the kernel allows one (IFNAMSIZ - 1 bytes, no '/')."""
    text = _str(value, name)
    if text is not None and (
        not 0 < len(text.encode()) <= 15
        or "/" in text
        or text in (".", "..")
        or not text.isprintable()
        or " " in text
    ):
        raise RecordError(f"has {name} {text!r}, not an interface name")
    return text


def _ipv6(value: object) -> dict[str, Any] | None:
    if value is None:
        return None
    data = _dict(value, "network.ipv6")
    try:
        ipaddress.IPv6Interface(_str(data.get("address"), "network.ipv6.address"))
        ipaddress.IPv6Interface(_str(data.get("host_address"), "network.ipv6.host_address"))
        ipaddress.IPv6Network(_str(data.get("pool"), "network.ipv6.pool"))
        campus = data.get("campus_networks")
        if not isinstance(campus, list):
            raise RecordError(f"has network.ipv6.campus_networks {campus!r}, not a list")
        for network in campus:
            ipaddress.IPv6Network(network)
    except (ValueError, TypeError) as e:
        raise RecordError(f"has a bad network.ipv6 address: {e}") from None
    _str(data.get("mode"), "network.ipv6.mode")
    return dict(data)

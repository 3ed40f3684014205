"""Rules found gone across the state dir, put back: what `jobcage reap` runs from a
site's firewall-reload hook. Putting one cage's rules back, and counting the gap in its
counts, is :mod:`.gaps`'s (read there why and how)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

from ..config import Config
from ..errors import JobCageError
from ..ids import netns_name, validate_job_id, veth_names
from ..records import StateStore
from . import ipv6
from .cage import NetworkCage, _uplink
from .firewall import open_firewall
from .gaps import restore_cage_rules


def restore_lost(config: Config) -> tuple[list[str], list[str]]:
    """Put back the rules of every cage of the state dir whose rules are gone: the
    command for a site's firewall-reload hook (`jobcage reap` runs it). Returns (job
    ids restored, errors). A record is input: only a cage whose names are the ones
    JobCage derives from its job id, and whose netns is there, is touched."""
    cages = []
    for record in _network_records(config.state_dir):
        try:
            cage = NetworkCage.from_record(record, config)
            validate_job_id(cage.job_id)
        except JobCageError:
            continue
        names = (veth_names(cage.job_id)[0], netns_name(cage.job_id))
        if (cage.host_veth, cage.netns_name) == names and os.path.exists(cage.netns_path):
            cages.append(cage)
    restored, errors = [], []
    for backend in sorted({c.firewall_backend for c in cages}):
        mine = [c for c in cages if c.firewall_backend == backend]
        try:
            firewall = open_firewall(backend)
            found = firewall.counters_many([c.plan for c in mine])
            # Dual-stack cages: None where either family's rules are gone.
            found = ipv6.with_ipv6(found, [c.plan6 for c in mine if c.plan6 is not None], firewall)
        except JobCageError as e:
            errors.append(f"reading the {backend} counters: {e}")
            continue
        for cage in mine:
            if found.get(cage.host_veth) is not None:
                continue
            try:
                if restore_cage_rules(cage, lambda c=cage: _uplink(c.uplink)):
                    restored.append(cage.job_id)
            except JobCageError as e:
                errors.append(f"{cage.job_id}: {e}")
    return restored, errors


def _network_records(state_dir: str) -> Iterator[dict[str, Any]]:
    """The network parts of the records the store believes (its names checked)."""
    for record in StateStore(state_dir).records():
        if record.network is not None:
            yield record.network.to_dict(record.job_id, state_dir)

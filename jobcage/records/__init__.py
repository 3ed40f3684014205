"""Cage records: the typed record (:mod:`.model`), its owner process (:mod:`.owner`),
and :class:`StateStore` (:mod:`.store`), the only code that reads or writes one."""

from .model import (
    RECORD_FORMAT,
    CageRecord,
    CgroupPart,
    NetworkPart,
    Owner,
    RecordState,
    parse_record,
)
from .owner import owner_alive, process_start_ticks
from .store import BadRecord, StateStore

__all__ = [
    "RECORD_FORMAT",
    "BadRecord",
    "CageRecord",
    "CgroupPart",
    "NetworkPart",
    "Owner",
    "RecordState",
    "StateStore",
    "owner_alive",
    "parse_record",
    "process_start_ticks",
]

"""JobCage: contain a batch job on a Linux worker node and account for what it used."""

from .cage import JobCage
from .config import Config
from .errors import (
    AddressPoolExhaustedError,
    CageExistsError,
    CageNotFoundError,
    CageStateError,
    ConfigError,
    InvalidJobIdError,
    JobCageError,
    KernelFeatureError,
    NetworkError,
    NotRootError,
    SpawnError,
    TeardownError,
)
from .usage import Usage

__all__ = [
    "AddressPoolExhaustedError",
    "CageExistsError",
    "CageNotFoundError",
    "CageStateError",
    "Config",
    "ConfigError",
    "InvalidJobIdError",
    "JobCage",
    "JobCageError",
    "KernelFeatureError",
    "NetworkError",
    "NotRootError",
    "SpawnError",
    "TeardownError",
    "Usage",
]

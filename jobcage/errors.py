"""The one exception tree of JobCage.

Every error the library raises on purpose derives from :class:`JobCageError`, and its
text says what an administrator should do about it. Kernel, pyroute2 and iptc errors
are translated at the backend edge with ``raise ... from`` so the cause stays visible::

    JobCageError
    ├── InvalidJobIdError      bad job id; nothing was created
    ├── ConfigError            bad config file, key or value
    ├── NotRootError           needs root (or CAP_SYS_ADMIN + CAP_NET_ADMIN)
    ├── KernelFeatureError     a kernel feature is missing; names the feature and config
    ├── CageExistsError        a cage with this job id is already on the node
    ├── CageNotFoundError      no cage with this job id on the node
    ├── CageStateError         an operation in the wrong lifecycle state
    ├── AddressPoolExhaustedError  every address of the pool is taken
    ├── SpawnError             the job could not be started (bad user, missing binary)
    ├── NetworkError           building or removing the network side failed
    ├── StateDirError          the state dir cannot be written, or others could write it
    ├── RecordError            a cage record that cannot be believed; it is set aside
    │   └── RulesGoneError     a cage's rules are gone (nft flush ruleset, a reload)
    ├── TeardownError          teardown finished with errors; lists each
    ├── MissingExtraError      an optional dependency (a pip extra) is not installed
    ├── ClassAdError           a ClassAd that does not parse or evaluate
    ├── TransferError          the transfer plugin refused or failed one file; nothing made
    └── FetchError             every route of `jobcage fetch` failed; nothing left at DEST
"""

from __future__ import annotations


class JobCageError(Exception):
    """Root of every error JobCage raises on purpose."""


class InvalidJobIdError(JobCageError, ValueError):
    pass


class ConfigError(JobCageError, ValueError):
    pass


class NotRootError(JobCageError, PermissionError):
    pass


class KernelFeatureError(JobCageError):
    pass


class CageExistsError(JobCageError, FileExistsError):
    pass


class CageNotFoundError(JobCageError, LookupError):
    pass


class CageStateError(JobCageError, RuntimeError):
    pass


class AddressPoolExhaustedError(JobCageError):
    pass


class SpawnError(JobCageError, OSError):
    pass


class NetworkError(JobCageError):
    pass


class StateDirError(JobCageError):
    pass


class RecordError(JobCageError):
    """A record that fails validation; the text says why (its path is added by the store)."""


class NewerRecordError(RecordError):
    """A record of a format newer than this JobCage reads: left alone, not set aside."""


class RulesGoneError(NetworkError):
    """A cage's rules or counters are gone from the node's firewall (`nft flush
    ruleset`, a firewall reload): what passed since is uncounted, and unfiltered."""


class TeardownError(JobCageError):
    """Teardown went through every step but some failed; ``errors`` holds each."""

    def __init__(self, message: str, errors: list[BaseException]) -> None:
        details = "; ".join(f"{type(e).__name__}: {e}" for e in errors)
        super().__init__(f"{message}: {details}" if details else message)
        self.errors = errors


class MissingExtraError(JobCageError, ImportError):
    """An optional dependency is missing; the text names the pip extra to install."""


class ClassAdError(JobCageError, ValueError):
    pass


class TransferError(JobCageError):
    """``kind`` is the error type HTCondor's plugin protocol knows (TransferErrorData):
    "Parameter" (the request cannot be done: bad path, outside the scratch directory),
    "Specification" (the named base image is missing or unusable), "Transfer" (the
    instance could not be written: ``no_space`` when the scratch directory is full)."""

    def __init__(self, message: str, kind: str = "Parameter", no_space: bool = False) -> None:
        super().__init__(message)
        self.kind = kind
        self.no_space = no_space


class FetchError(JobCageError):
    """``failures``: one line per failed try, in order (the message keeps the last of
    each route)."""

    def __init__(self, message: str, failures: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.failures = failures

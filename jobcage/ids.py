"""Job ids, and every kernel name derived from one.

A job id becomes a cgroup directory, a state file name and a netns name, so it is
checked before anything is created. Interface names are limited to 15 bytes
(IFNAMSIZ - 1), so links get a short stable hash of the id instead of the id itself.
"""

from __future__ import annotations

from .errors import InvalidJobIdError

MAX_JOB_ID_BYTES = 128

# Prefix of every kernel object name JobCage makes, so that `jobcage reap` can find
# half-built objects that have no record, and nothing else carries it by accident.
NAME_PREFIX = "jobcage"
# Host-side veth names: "jc" + 12 hex digits + "h" = 15 bytes.
VETH_PREFIX = "jc"


def validate_job_id(job_id: object) -> str:
    """Return ``job_id`` if it is safe as a path component and kernel name."""
    if not isinstance(job_id, str):
        raise InvalidJobIdError(f"job id must be a string, not {type(job_id).__name__}")
    if not job_id:
        raise InvalidJobIdError("job id is empty; give the batch system's id, e.g. 1234.0")
    encoded = job_id.encode("utf-8", "surrogateescape")
    if len(encoded) > MAX_JOB_ID_BYTES:
        raise InvalidJobIdError(
            f"job id is {len(encoded)} bytes long; at most {MAX_JOB_ID_BYTES} are allowed"
        )
    for ch in job_id:
        if ord(ch) < 0x21 or ord(ch) > 0x7E:
            raise InvalidJobIdError(
                f"job id {job_id!r} contains {ch!r}: only printable ASCII without "
                "whitespace or control characters is allowed"
            )
    if "/" in job_id:
        raise InvalidJobIdError(f"job id {job_id!r} contains '/'; it must be one path component")
    if ".." in job_id or job_id == ".":
        raise InvalidJobIdError(f"job id {job_id!r} contains '..' or is '.'")
    if job_id.startswith(("-", ".")):
        raise InvalidJobIdError(f"job id {job_id!r} must not start with '-' or '.'")
    return job_id


def is_job_id(value: object) -> bool:
    """Whether ``value`` is a valid job id: for names read back from disk, where a bad
    one is damage to skip rather than an error to raise."""
    try:
        validate_job_id(value)
    except InvalidJobIdError:
        return False
    return True


def short_hash(job_id: str, length: int = 12) -> str:
    import hashlib  # only networked cages need it: not at `jobcage run`'s import

    return hashlib.sha256(job_id.encode()).hexdigest()[:length]


def netns_name(job_id: str) -> str:
    return f"{NAME_PREFIX}-{job_id}"


def veth_names(job_id: str) -> tuple[str, str]:
    """(node side, job side before it is renamed eth0); each at most 15 bytes."""
    h = short_hash(job_id)
    return f"{VETH_PREFIX}{h}h", f"{VETH_PREFIX}{h}j"

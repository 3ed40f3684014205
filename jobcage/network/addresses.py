"""The address pool: one small subnet per cage, leased so that cages created at the
same moment by different processes never share one.

A lease is a file ``<state_dir>/network/leases/<index>`` holding the job id, created
with O_EXCL while holding an flock on ``<state_dir>/network/leases.lock``. Files
rather than one JSON map because a process killed half-way can only leave a whole
lease behind, never a torn map, and an administrator can read who holds which
address with ``ls``/``cat``. Leases of dead owners are released by `jobcage reap`
from the cage record.

Each cage takes a /30 (RFC 3021 /31s would double the pool, but some tools still
treat the two addresses of a /31 as network and broadcast): the node side gets the
first host address, the job the second.

A dual-stack cage also gets a /64 of the IPv6 pool (:class:`Ipv6Pool`): the one whose
number is its IPv4 lease's index. So the IPv6 prefix is leased by the same file, under
the same lock, as crash-safe and O(1) as the /30, with nothing more to write or reap.
A /64 because it is what an IPv6 link is everywhere (RFC 7421), and a /48 holds 65,536
of them, four times the default IPv4 pool.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import ipaddress
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from ..errors import AddressPoolExhaustedError, ConfigError, NetworkError

CAGE_PREFIXLEN = 30
CAGE_PREFIXLEN6 = 64


@dataclass(frozen=True)
class Lease:
    index: int
    subnet: ipaddress.IPv4Network
    host: ipaddress.IPv4Interface  # the node side of the veth
    job: ipaddress.IPv4Interface  # eth0 inside the cage


def _pool_network(key: str, pool: object, version: int, prefixlen: int, example: str) -> Any:
    """The pool of config key ``key`` as a network of IP ``version``, holding at least
    one cage's /``prefixlen``; else the ConfigError naming the key."""
    kind = ipaddress.IPv4Network if version == 4 else ipaddress.IPv6Network
    try:
        network = kind(pool)  # type: ignore[arg-type]
    except ValueError as e:
        raise ConfigError(
            f"{key} = {str(pool)!r} is not an IPv{version} network ({e}); give a CIDR such "
            f"as {example}"
        ) from None
    if network.prefixlen > prefixlen:
        raise ConfigError(
            f"{key} {network} is smaller than one cage's /{prefixlen}; give a larger pool, "
            f"e.g. {example}"
        )
    return network


class AddressPool:
    """Pure arithmetic over the pool: which subnet an index is, which index is free."""

    def __init__(self, pool: str, prefixlen: int = CAGE_PREFIXLEN) -> None:
        self.network = _pool_network("address_pool", pool, 4, prefixlen, "100.64.0.0/16")
        self.prefixlen = prefixlen
        self.size = 1 << (prefixlen - self.network.prefixlen)

    def lease(self, index: int) -> Lease:
        if not 0 <= index < self.size:
            raise ValueError(f"index {index} is outside the pool of {self.size}")
        base = int(self.network.network_address) + (index << (32 - self.prefixlen))
        subnet = ipaddress.IPv4Network((base, self.prefixlen))
        return Lease(
            index=index,
            subnet=subnet,
            host=ipaddress.IPv4Interface((base + 1, self.prefixlen)),
            job=ipaddress.IPv4Interface((base + 2, self.prefixlen)),
        )

    def first_free(self, taken: Iterable[int]) -> int:
        """Lowest index not in ``taken``; low indexes first keeps addresses readable."""
        used = set(taken)
        for index in range(self.size):
            if index not in used:
                return index
        raise AddressPoolExhaustedError(
            f"all {self.size} addresses of the pool {self.network} are leased (one /"
            f"{self.prefixlen} per networked cage, or still routed to a veth that outlived "
            "its cage); wait for jobs to end, run `jobcage reap` to release the leases of "
            "dead cages, or set a larger address_pool"
        )

    def overlapping(self, networks: Iterable[str]) -> list[str]:
        """The networks among ``networks`` that overlap the pool."""
        return [
            n for n in networks if ipaddress.IPv4Network(n, strict=False).overlaps(self.network)
        ]


@dataclass(frozen=True)
class Lease6:
    subnet: ipaddress.IPv6Network
    host: ipaddress.IPv6Interface  # the node side of the veth: <prefix>::1
    job: ipaddress.IPv6Interface  # eth0 inside the cage: <prefix>::2


class Ipv6Pool:
    """The IPv6 prefixes of the cages: index i (the cage's IPv4 lease) is the i-th /64."""

    def __init__(
        self, pool: str | ipaddress.IPv6Network, prefixlen: int = CAGE_PREFIXLEN6
    ) -> None:
        self.network = _pool_network("ipv6_pool", pool, 6, prefixlen, "fd6a:6f62:6361::/48")
        self.prefixlen = prefixlen
        self.size = 1 << (prefixlen - self.network.prefixlen)

    def lease(self, index: int) -> Lease6:
        """The prefix of lease ``index``; AddressPoolExhaustedError past the pool's end
        (a pool of fewer /64s than address_pool has /30s)."""
        if not 0 <= index < self.size:
            raise AddressPoolExhaustedError(
                f"the cage's IPv4 lease is number {index}, but ipv6_pool {self.network} "
                f"has only {self.size} /{self.prefixlen}s (one per cage, numbered like the "
                "IPv4 /30s); set a larger ipv6_pool, or a smaller address_pool"
            )
        base = int(self.network.network_address) + (index << (128 - self.prefixlen))
        return Lease6(
            subnet=ipaddress.IPv6Network((base, self.prefixlen)),
            host=ipaddress.IPv6Interface((base + 1, self.prefixlen)),
            job=ipaddress.IPv6Interface((base + 2, self.prefixlen)),
        )


@contextlib.contextmanager
def locked_file(directory: str, lock: str) -> Iterator[None]:
    """Hold an flock on the file ``lock``, making ``directory`` (where what it guards
    lives) first; the error says what to set."""
    try:
        os.makedirs(directory, mode=0o755, exist_ok=True)
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise NetworkError(
            f"cannot use {directory}: {e.strerror}; set state_dir in the config to a "
            "writable local directory"
        ) from e
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


class LeaseStore:
    """The leases of one node, under ``<state_dir>/network``."""

    def __init__(self, state_dir: str, pool: AddressPool) -> None:
        self.pool = pool
        self.dir = os.path.join(state_dir, "network")
        self.leases_dir = os.path.join(self.dir, "leases")

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        with locked_file(self.leases_dir, os.path.join(self.dir, "leases.lock")):
            yield

    def _taken(self) -> dict[int, str]:
        return {i: _read(os.path.join(self.leases_dir, str(i))) for i in self._indexes()}

    def _indexes(self) -> set[int]:
        """The leased indexes, from the directory listing alone: acquire needs no
        more, and reading every lease cost 9 ms of a cage's 16 with 400 others."""
        return {int(name) for name in os.listdir(self.leases_dir) if name.isdigit()}

    def held(self) -> dict[int, str]:
        """index -> job id of every lease now."""
        with self._locked():
            return self._taken()

    def acquire(
        self, job_id: str, held: Callable[[Lease], bool] = lambda lease: False
    ) -> tuple[Lease, bool]:
        """Lease the lowest free subnet to ``job_id``; also say whether it is the only
        lease (the first cage on the node, which sets up what cages share).

        A subnet is free only when nothing holds it: no lease, and not ``held`` (the
        node still routes it to a veth whose netns outlived its cage, see
        ``netns.address_held``); such a subnet is skipped, not leased."""
        with self._locked():
            taken = self._indexes()
            skipped: set[int] = set()
            while True:
                index = self.pool.first_free(taken | skipped)
                if not held(self.pool.lease(index)):
                    break
                skipped.add(index)
            path = os.path.join(self.leases_dir, str(index))
            # O_EXCL as well as the lock: a lease written by a process that does not
            # take the lock (an older JobCage) is still never overwritten.
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                os.write(fd, job_id.encode())
            finally:
                os.close(fd)
            return self.pool.lease(index), not taken

    def release(self, index: int, job_id: str) -> None:
        """Give the lease back; a lease since given to another job is left alone."""
        with self._locked():
            path = os.path.join(self.leases_dir, str(index))
            try:
                if _read(path) != job_id:
                    return
                os.unlink(path)
            except FileNotFoundError:
                return


def _read(path: str) -> str:
    try:
        with open(path, encoding="utf-8", errors="surrogateescape") as f:
            return f.read()
    except OSError as e:
        if e.errno == errno.ENOENT:
            return ""
        raise

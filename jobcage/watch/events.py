"""The proc connector's event stream: one socket, every event the kernel sends, no silent loss.

The message layouts and constants are pyroute2's (``pyroute2.netlink.connector.cn_proc``,
named as in linux/cn_proc.h). What pyroute2 0.9 does not give, and this module adds on
top of its tables:

* ``SO_RCVBUFFORCE``: pyroute2 sets ``SO_RCVBUF``, which ``net.core.rmem_max`` caps
  (208 KiB by default, about 270 events); a fork storm needs megabytes.
* ENOBUFS as a *loss* in the stream instead of an exception that ends the read, so the
  caller can count it and resynchronise.
* Exact loss counts: the kernel numbers events per CPU (``cn_msg.seq`` from the per-CPU
  ``proc_event_counts``, sent under a local lock, so in order on each CPU); a jump in a
  CPU's sequence is that many events dropped (kernel/connector/cn_proc.c, ``send_msg``).
* Decoding with precompiled ``struct`` formats built from pyroute2's field lists: its
  ``nlmsg.decode`` costs about 13 µs an event here, too slow for a fork storm.
"""

from __future__ import annotations

import contextlib
import errno
import operator
import os
import socket
import struct
import time
from typing import NamedTuple

from pyroute2.netlink import NETLINK_CONNECTOR, NLMSG_DONE
from pyroute2.netlink.connector import cn_proc

from ..errors import JobCageError, KernelFeatureError, NotRootError

SO_RCVBUFFORCE = 33  # asm-generic/socket.h; Python's socket module lacks the name
DEFAULT_BUFFER_BYTES = 32 << 20
RECV_BYTES = 256  # one event is one datagram of 76 bytes; an ack 40
_READ_BATCH = 512

# nlmsghdr (16) + cn_msg (20) + proc_event's what, cpu, timestamp_ns (16)
_HEADER = struct.Struct("=IHHII" + "IIIIHH" + "IIQ")
_BODY_OFFSET = _HEADER.size

KINDS = {
    cn_proc.PROC_EVENT_FORK: "fork",
    cn_proc.PROC_EVENT_EXEC: "exec",
    cn_proc.PROC_EVENT_UID: "uid",
    cn_proc.PROC_EVENT_GID: "gid",
    cn_proc.PROC_EVENT_SID: "sid",
    cn_proc.PROC_EVENT_PTRACE: "ptrace",
    cn_proc.PROC_EVENT_COMM: "comm",
    cn_proc.PROC_EVENT_COREDUMP: "coredump",
    cn_proc.PROC_EVENT_EXIT: "exit",
}
_CLASSES = {
    cn_proc.PROC_EVENT_FORK: cn_proc.proc_event_fork,
    cn_proc.PROC_EVENT_EXEC: cn_proc.proc_event_exec,
    cn_proc.PROC_EVENT_UID: cn_proc.proc_event_uid,
    cn_proc.PROC_EVENT_GID: cn_proc.proc_event_gid,
    cn_proc.PROC_EVENT_SID: cn_proc.proc_event_sid,
    cn_proc.PROC_EVENT_PTRACE: cn_proc.proc_event_ptrace,
    cn_proc.PROC_EVENT_COMM: cn_proc.proc_event_comm,
    cn_proc.PROC_EVENT_COREDUMP: cn_proc.proc_event_coredump,
    cn_proc.PROC_EVENT_EXIT: cn_proc.proc_event_exit,
}


class ProcEvent(NamedTuple):
    """One kernel event. ``pid``/``tgid`` are the subject (for fork: the child).

    Fields a kind does not carry are None: ``parent_tgid`` (fork, exit, coredump),
    ``ruid``/``euid`` (uid), ``rgid``/``egid`` (gid), ``tracer_tgid`` (ptrace),
    ``comm`` (comm), ``exit_code``/``exit_signal`` (exit).
    """

    kind: str
    cpu: int
    timestamp_ns: int
    pid: int
    tgid: int
    parent_tgid: int | None = None
    ruid: int | None = None
    euid: int | None = None
    rgid: int | None = None
    egid: int | None = None
    tracer_tgid: int | None = None
    comm: str | None = None
    exit_code: int | None = None
    exit_signal: int | None = None


class Loss(NamedTuple):
    """The kernel dropped events for this socket (ENOBUFS) at ``monotonic`` time."""

    monotonic: float


# Where a ProcEvent field comes from in a kind's pyroute2 field list (first found).
_SOURCES = {"pid": ("child_pid", "process_pid"), "tgid": ("child_tgid", "process_tgid")}
_WHAT = struct.Struct("=I")
_WHAT_OFFSET = 36
_SEQ, _CPU, _TS = 7, 12, 13
_new = tuple.__new__


def _compile(what: int, cls) -> tuple[struct.Struct, operator.itemgetter, str]:
    """One unpack of header and body, then one itemgetter into ProcEvent's order."""
    own = cls.fields[len(cn_proc.proc_event_base.fields) :]
    layout = struct.Struct(_HEADER.format + "".join(f for _, f in own))
    names = [n for n, _ in own]
    first = len(_HEADER.unpack(bytes(_HEADER.size)))
    none_at, kind_at = first + len(own), first + len(own) + 1
    picks = []
    for field in ProcEvent._fields:
        if field == "kind":
            picks.append(kind_at)
        elif field == "cpu":
            picks.append(_CPU)
        elif field == "timestamp_ns":
            picks.append(_TS)
        else:
            sources = [s for s in _SOURCES.get(field, (field,)) if s in names]
            picks.append(first + names.index(sources[0]) if sources else none_at)
    return layout, operator.itemgetter(*picks), KINDS[what]


_DECODERS = {what: _compile(what, cls) for what, cls in _CLASSES.items()}


def decode_with_seq(data: bytes | memoryview) -> tuple[int, ProcEvent] | None:
    """One datagram to its per-CPU sequence number and event; None for acks and kinds
    this kernel adds later. About 1 µs an event, the hot path of a fork storm."""
    if len(data) < _BODY_OFFSET:
        return None
    decoder = _DECODERS.get(_WHAT.unpack_from(data, _WHAT_OFFSET)[0])
    if decoder is None:
        return None
    layout, pick, kind = decoder
    values = layout.unpack_from(data)
    event = _new(ProcEvent, pick((*values, None, kind)))
    if kind == "comm":
        event = event._replace(comm=event.comm.rstrip(b"\0").decode("utf-8", "replace"))
    return values[_SEQ], event


def decode(data: bytes | memoryview) -> ProcEvent | None:
    found = decode_with_seq(data)
    return found[1] if found is not None else None


def _control(action: int) -> bytes:
    msg = cn_proc.proc_event_control()
    msg["action"] = action
    msg["idx"] = cn_proc.CN_IDX_PROC
    msg["val"] = cn_proc.CN_VAL_PROC
    msg["len"] = 4  # the 4-byte op alone: every event type (no kernel-side filter)
    msg["header"]["type"] = NLMSG_DONE
    msg["header"]["flags"] = 0
    msg.encode()
    return bytes(msg.data)


class EventSource:
    """A subscribed proc connector socket. Needs root (CAP_NET_ADMIN).

    :meth:`read` drains what is queued without blocking; the socket's fd can be polled.
    ``overflows`` counts ENOBUFS, ``events_lost`` the events the per-CPU sequence numbers
    prove missing (known once that CPU sends again), ``events`` what was delivered.
    """

    def __init__(self, buffer_bytes: int = DEFAULT_BUFFER_BYTES) -> None:
        if os.geteuid() != 0:
            raise NotRootError(
                "the proc connector watcher needs root (CAP_NET_ADMIN to subscribe to "
                "process events); run `jobcage watch` or the cage's owner as root"
            )
        self.buffer_bytes = buffer_bytes
        self.events = 0
        self.overflows = 0
        self.events_lost = 0
        self.last_loss: float | None = None
        self._seq: dict[int, int] = {}
        try:
            self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_CONNECTOR)
        except OSError as e:
            raise KernelFeatureError(
                f"cannot open a NETLINK_CONNECTOR socket ({e.strerror}): this kernel lacks "
                "the connector (CONFIG_CONNECTOR and CONFIG_PROC_EVENTS); the watcher "
                "cannot run on it"
            ) from e
        try:
            self._sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, buffer_bytes)
            self._sock.bind((0, cn_proc.CN_IDX_PROC))
            self._sock.send(_control(cn_proc.PROC_CN_MCAST_LISTEN))
        except OSError as e:
            self._sock.close()
            if e.errno == errno.EPERM:
                raise NotRootError(
                    "subscribing to the proc connector was refused (EPERM): the watcher "
                    "needs CAP_NET_ADMIN in the initial user namespace"
                ) from e
            raise JobCageError(f"cannot subscribe to process events: {e}") from e
        self._sock.setblocking(False)
        self._buf = bytearray(RECV_BYTES)

    def fileno(self) -> int:
        return self._sock.fileno()

    @property
    def closed(self) -> bool:
        return self._sock.fileno() == -1

    def read(self, limit: int = _READ_BATCH) -> list[ProcEvent | Loss]:
        """Up to ``limit`` queued events, in order, with a :class:`Loss` where ENOBUFS hit."""
        out: list[ProcEvent | Loss] = []
        recv_into = self._sock.recv_into
        buf = self._buf
        seqs = self._seq
        for _ in range(limit):
            try:
                n = recv_into(buf)
            except BlockingIOError:
                break
            except OSError as e:
                if e.errno != errno.ENOBUFS:
                    raise
                self.overflows += 1
                self.last_loss = time.monotonic()
                out.append(Loss(self.last_loss))
                continue
            found = decode_with_seq(memoryview(buf)[:n])
            if found is None:
                continue
            seq, event = found
            self.events += 1
            last = seqs.get(event.cpu)
            if last is not None and seq != (last + 1) & 0xFFFFFFFF:
                gap = (seq - last - 1) & 0xFFFFFFFF
                if gap < 0x80000000:  # a reordered duplicate is not a loss
                    self.events_lost += gap
                    # Dropped without ENOBUFS (the kernel could not allocate the
                    # message: GFP_NOWAIT under memory pressure): a loss all the same.
                    self.last_loss = time.monotonic()
                    out.append(Loss(self.last_loss))
            seqs[event.cpu] = seq
            out.append(event)
        return out

    def close(self) -> None:
        if self.closed:
            return
        # Best effort: the kernel's listener count only decides whether it builds events.
        with contextlib.suppress(OSError):
            self._sock.send(_control(cn_proc.PROC_CN_MCAST_IGNORE))
        self._sock.close()

    def __enter__(self) -> EventSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

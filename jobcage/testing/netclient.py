"""What a job does in the network tests; run inside a cage. Prints one result line.

get HOST PORT N            HTTP GET of N bytes; prints the body size received
put HOST PORT N            HTTP PUT of N bytes; prints what the server counted
udp-send HOST PORT COUNT SIZE [SRC]   COUNT datagrams of SIZE bytes (from SRC)
udp-get HOST PORT COUNT SIZE          ask for COUNT datagrams; prints how many came
ping HOST COUNT SIZE [SRC]            ICMP echo with SIZE payload bytes; prints replies
connect HOST PORT          prints "connected" or the errno name
listen PORT                prints "ready", then "accepted" per connection
ifaces                     the interface names this process sees
"""

from __future__ import annotations

import errno
import os
import select
import socket
import struct
import sys
import time

TIMEOUT = 10.0


def http(method: str, host: str, port: int, path: str, body_size: int = 0) -> bytes:
    with socket.create_connection((host, port), timeout=TIMEOUT) as s:
        # The server closes first; our close then blocks until the server has ACKed our
        # FIN (linger), so that ACK is counted before we report, not in the caller's
        # next measurement.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, int(TIMEOUT)))
        head = f"{method} {path} HTTP/1.0\r\nHost: {host}\r\n"
        if method == "PUT":
            head += f"Content-Length: {body_size}\r\n"
        s.sendall((head + "\r\n").encode())
        block = b"z" * 65536
        left = body_size
        while left > 0:
            n = min(left, len(block))
            s.sendall(block[:n])
            left -= n
        data = bytearray()
        while chunk := s.recv(1 << 16):
            data += chunk
        global RETRANSMITTED
        RETRANSMITTED = bytes_retransmitted(s)
    return bytes(data.split(b"\r\n\r\n", 1)[1])


RETRANSMITTED = 0
TCPI_BYTES_RETRANS = 208  # offset of tcpi_bytes_retrans in struct tcp_info (Linux 4.19)


def bytes_retransmitted(s: socket.socket) -> int:
    """What this side sent twice: the counters see it twice, the payload once."""
    info = s.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)
    if len(info) < TCPI_BYTES_RETRANS + 8:
        return 0
    return struct.unpack_from("=Q", info, TCPI_BYTES_RETRANS)[0]


def checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    total = (total >> 16) + (total & 0xFFFF)
    total += total >> 16
    return ~total & 0xFFFF


def family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def ping(host: str, count: int, size: int, source: str | None) -> int:
    v6 = family(host) == socket.AF_INET6
    # For ICMPv6 the kernel fills in the checksum (it covers a pseudo-header).
    s = socket.socket(
        family(host), socket.SOCK_RAW, socket.IPPROTO_ICMPV6 if v6 else socket.IPPROTO_ICMP
    )
    if source:
        s.bind((source, 0))
    ident = os.getpid() & 0xFFFF
    replies = 0
    request, reply = (128, 129) if v6 else (8, 0)
    for seq in range(count):
        payload = b"p" * size
        header = struct.pack("!BBHHH", request, 0, 0, ident, seq)
        sum_ = 0 if v6 else checksum(header + payload)
        packet = struct.pack("!BBHHH", request, 0, sum_, ident, seq) + payload
        s.sendto(packet, (host, 0))
        deadline = time.monotonic() + (TIMEOUT if not source else 0.5)
        while (left := deadline - time.monotonic()) > 0:
            ready, _, _ = select.select([s], [], [], left)
            if not ready:
                break
            data = s.recv(65535)
            # A raw IPv4 socket reads the IP header too; an IPv6 one does not.
            icmp = data if v6 else data[(data[0] & 0x0F) * 4 :]
            kind, _, _, rid, rseq = struct.unpack("!BBHHH", icmp[:8])
            if kind == reply and rid == ident and rseq == seq:
                replies += 1
                break
    return replies


def main(argv: list[str]) -> str:
    cmd, args = argv[0], argv[1:]
    if cmd == "get":
        return str(len(http("GET", args[0], int(args[1]), f"/bytes/{int(args[2])}")))
    if cmd == "put":
        stored = http("PUT", args[0], int(args[1]), "/sink", int(args[2])).decode()
        print(f"retransmitted {RETRANSMITTED}")
        return stored
    if cmd == "udp-send":
        s = socket.socket(family(args[0]), socket.SOCK_DGRAM)
        if len(args) > 4:
            # getaddrinfo: a link-local source's %zone becomes its scope id.
            s.bind(socket.getaddrinfo(args[4], 0, s.family, socket.SOCK_DGRAM)[0][4])
        for _ in range(int(args[2])):
            s.sendto(b"u" * int(args[3]), (args[0], int(args[1])))
        return "sent"
    if cmd == "udp-get":
        s = socket.socket(family(args[0]), socket.SOCK_DGRAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
        count, size = int(args[2]), int(args[3])
        s.sendto(f"send {count} {size}".encode(), (args[0], int(args[1])))
        got = 0
        s.settimeout(TIMEOUT)
        while got < count:
            try:
                s.recv(65535)
            except TimeoutError:
                break
            got += 1
        return str(got)
    if cmd == "ping":
        return str(ping(args[0], int(args[1]), int(args[2]), args[3] if len(args) > 3 else None))
    if cmd == "connect":
        try:
            socket.create_connection((args[0], int(args[1])), timeout=TIMEOUT).close()
        except OSError as e:
            return errno.errorcode.get(e.errno or 0, "timeout")
        return "connected"
    if cmd == "listen":
        srv = socket.socket(socket.AF_INET6)  # both families (IPV6_V6ONLY off)
        srv.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        srv.bind(("::", int(args[0])))
        srv.listen()
        print("ready", flush=True)
        while True:
            conn, _ = srv.accept()
            print("accepted", flush=True)
            conn.close()
    if cmd == "ifaces":
        return " ".join(sorted(name for _, name in socket.if_nameindex()))
    raise SystemExit(f"unknown command {cmd}")


if __name__ == "__main__":
    print(main(sys.argv[1:]), flush=True)

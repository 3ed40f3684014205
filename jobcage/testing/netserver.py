"""A small server for the simulated campus and internet hosts (and the node).

Run as ``python netserver.py PORT``; prints ``ready`` once both sockets are bound, so
the test waits on a pipe, not a clock. On PORT:

* TCP, HTTP/1.0: ``GET /bytes/N`` answers N bytes; ``PUT``/``POST`` reads the body
  and answers how many bytes it got. Broken answers for the fetcher's tests:
  ``GET /truncated/N`` promises N bytes and closes after N/2; ``GET /nolength/N``
  sends N bytes with no Content-Length (only the closed connection ends them).
* UDP: a datagram ``send COUNT SIZE`` is answered with COUNT datagrams of SIZE bytes
  to its sender; any other datagram is swallowed.
"""

from __future__ import annotations

import http.server
import socket
import socketserver
import sys
import threading

CHUNK = 1 << 16


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        parts = self.path.strip("/").split("/")
        kinds = ("bytes", "truncated", "nolength")
        if len(parts) != 2 or parts[0] not in kinds or not parts[1].isdigit():
            self.send_error(404)
            return
        size = int(parts[1])
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        if parts[0] != "nolength":
            self.send_header("Content-Length", str(size))
        self.end_headers()
        if parts[0] == "truncated":
            size //= 2
        block = b"x" * CHUNK
        while size > 0:
            n = min(size, CHUNK)
            self.wfile.write(block[:n])
            size -= n

    def do_PUT(self) -> None:
        remaining = int(self.headers.get("Content-Length", "0"))
        got = 0
        while remaining > 0:
            data = self.rfile.read(min(remaining, CHUNK))
            if not data:
                break
            got += len(data)
            remaining -= len(data)
        body = str(got).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_POST = do_PUT


class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    allow_reuse_address = True


class Server6(Server):
    address_family = socket.AF_INET6

    def server_bind(self) -> None:
        self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()


def serve_udp(sock: socket.socket) -> None:
    while True:
        data, peer = sock.recvfrom(65535)
        fields = data.split()
        if len(fields) == 3 and fields[0] == b"send":
            count, size = int(fields[1]), int(fields[2])
            for _ in range(count):
                sock.sendto(b"y" * size, peer)


def main() -> None:
    port = int(sys.argv[1])
    # Both families on one socket each (IPV6_V6ONLY off): an IPv4 peer is ::ffff:a.b.c.d.
    try:
        server: Server = Server6(("::", port), Handler)
        udp = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        udp.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        udp.bind(("::", port))
    except OSError:  # a kernel without IPv6
        server = Server(("0.0.0.0", port), Handler)
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        udp.bind(("0.0.0.0", port))
    threading.Thread(target=serve_udp, args=(udp,), daemon=True).start()
    print("ready", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()

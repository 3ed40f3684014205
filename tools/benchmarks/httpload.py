"""A keep-alive HTTP/1.1 load pair for the datapath benchmark: the tests' server is
HTTP/1.0 (a connection per request), and curl in a loop measures fork+exec.

    python -m tools.benchmarks.httpload serve PORT        prints "ready", serves
        GET /N (N bytes of body) on kept-alive connections, one thread a connection
    python -m tools.benchmarks.httpload get HOST PORT COUNT SIZE
        COUNT sequential GETs of SIZE bytes on one connection; prints JSON with the
        request rate and the body bytes received
"""

from __future__ import annotations

import json
import socket
import sys
import threading
import time


def _serve_connection(conn: socket.socket) -> None:
    with conn, conn.makefile("rb") as reader:
        while True:
            line = reader.readline()
            if not line:
                return
            size = int(line.split()[1].strip(b"/") or 0)
            while reader.readline() not in (b"\r\n", b""):
                pass
            head = f"HTTP/1.1 200 OK\r\nContent-Length: {size}\r\n\r\n".encode()
            conn.sendall(head + b"x" * size)


def serve(port: int) -> None:
    listener = socket.create_server(("0.0.0.0", port), backlog=64)
    print("ready", flush=True)
    while True:
        conn, _ = listener.accept()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        threading.Thread(target=_serve_connection, args=(conn,), daemon=True).start()


def get(host: str, port: int, count: int, size: int) -> dict:
    request = f"GET /{size} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()
    body = 0
    with socket.create_connection((host, port), timeout=30) as conn:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        reader = conn.makefile("rb")
        start = time.perf_counter()
        for _ in range(count):
            conn.sendall(request)
            length = 0
            while True:
                line = reader.readline()
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
                if line in (b"\r\n", b""):
                    break
            body += len(reader.read(length))
        elapsed = time.perf_counter() - start
    return {"requests": count, "seconds": elapsed, "rps": count / elapsed, "body_bytes": body}


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve(int(sys.argv[2]))
    else:
        host, port, count, size = sys.argv[2], *map(int, sys.argv[3:6])
        print(json.dumps(get(host, port, count, size)))

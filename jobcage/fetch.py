"""``jobcage fetch URL DEST``: a job's input, through the site's cache first.

Routes, in order: the site's squid (``$OSG_SQUID_LOCATION``, as OSG publishes it, else
``$http_proxy``), then the origin directly. Each route gets ``attempts`` tries with
exponential backoff for what may pass (no connection, a 5xx, a body cut short); an
answer that would come back the same (a 4xx, a checksum mismatch) moves on to the
next route at once. What counts as a good answer: status 200, a body exactly as long as
its Content-Length, and the SHA-256 given with ``--sha256`` when there is one. A body
without Content-Length is refused unless a checksum vouches for it: even a chunked one,
since squid re-chunks an origin's close-delimited body and ends the chunks cleanly when
the origin's connection drops, so a cut-short file would arrive looking whole.

Nothing partial reaches DEST: the body goes to a temporary file in DEST's directory,
is fsynced, and renamed over DEST only once it passed every check.

``requests`` is imported on first use, not with the CLI: ``jobcage run`` stays light.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import re
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import IO, Any
from urllib.parse import urlsplit

from .errors import ConfigError, FetchError

CHUNK_BYTES = 1 << 16
DEFAULT_ATTEMPTS = 3  # per route
DEFAULT_BACKOFF_SECONDS = 1.0  # then 2, 4, ...
DEFAULT_TIMEOUT_SECONDS = 30.0  # connect, and between two reads
PROGRESS_MIN_BYTES = 8 << 20  # smaller files fetch too fast for a bar to mean anything
TEMP_PREFIX = ".jobcage-fetch-"
UNSET_SQUID = {"", "none", "unavailable"}  # what OSG sites write when there is no squid


@dataclass(frozen=True)
class Route:
    name: str  # "cache" or "direct"
    proxy: str | None


@dataclass(frozen=True)
class Fetched:
    path: str
    size_bytes: int
    route: Route
    x_cache: str | None  # the cache's own word on it (squid: "HIT from ..." / "MISS ...")
    failures: tuple[str, ...]  # one line per failed try before this one


class _Retry(Exception):
    """This try failed; another try on the same route may pass."""


class _NextRoute(Exception):
    """This route failed in a way a retry would repeat."""


def routes(environ: dict[str, str] | None = None) -> list[Route]:
    env = os.environ if environ is None else environ
    proxy = env.get("OSG_SQUID_LOCATION", "").strip()
    if proxy.lower() in UNSET_SQUID:
        proxy = env.get("http_proxy", "").strip() or env.get("HTTP_PROXY", "").strip()
    found = []
    if proxy:
        found.append(Route("cache", proxy if "://" in proxy else f"http://{proxy}"))
    return [*found, Route("direct", None)]


def check_arguments(url: str, sha256: str | None, attempts: int, timeout_seconds: float) -> None:
    parts = urlsplit(url)
    if parts.scheme not in {"http", "https"} or not parts.netloc:
        raise ConfigError(f"URL {url!r} is not an http:// or https:// URL")
    if sha256 is not None and not re.fullmatch(r"[0-9a-fA-F]{64}", sha256):
        raise ConfigError(f"--sha256 {sha256!r} is not 64 hexadecimal digits")
    if not 1 <= attempts <= 10:
        raise ConfigError(f"--attempts {attempts} is out of range: give 1 to 10")
    if not 0 < timeout_seconds <= 3600:
        raise ConfigError(f"--timeout {timeout_seconds} is out of range: give 0 < SECONDS <= 3600")


def fetch(
    url: str,
    dest: str,
    *,
    sha256: str | None = None,
    attempts: int = DEFAULT_ATTEMPTS,
    backoff_seconds: float = DEFAULT_BACKOFF_SECONDS,
    timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS,
    progress: IO[str] | None = None,
    environ: dict[str, str] | None = None,
) -> Fetched:
    """``url`` into ``dest`` by the first route that gives the whole, right file.

    ``progress``: a stream to draw a progress bar on (the CLI passes stderr when it is
    a terminal). Raises :class:`FetchError` naming every route's last failure.
    """
    check_arguments(url, sha256, attempts, timeout_seconds)
    if os.path.isdir(dest):
        dest = os.path.join(dest, os.path.basename(urlsplit(url).path) or "index.html")
    directory = os.path.dirname(os.path.abspath(dest))
    if not os.path.isdir(directory):
        raise ConfigError(f"destination directory {directory} does not exist: create it first")
    import requests

    failures: list[str] = []
    for route in routes(environ):
        with requests.Session() as session:
            session.trust_env = False  # the routes are ours: no proxy from the environment
            if route.proxy:
                session.proxies = {"http": route.proxy, "https": route.proxy}
            for attempt in range(attempts):
                if attempt:
                    time.sleep(backoff_seconds * 2 ** (attempt - 1))
                try:
                    size, x_cache = _try(session, url, dest, sha256, timeout_seconds, progress)
                except _Retry as e:
                    failures.append(f"{_label(route)}: {e}")
                    continue
                except _NextRoute as e:
                    failures.append(f"{_label(route)}: {e}")
                    break
                return Fetched(os.path.abspath(dest), size, route, x_cache, tuple(failures))
    last = "; ".join(_last_per_route(failures))
    raise FetchError(f"{url}: every route failed: {last}", tuple(failures))


def _try(session, url, dest, sha256, timeout, progress) -> tuple[int, str | None]:
    import requests
    import urllib3

    headers = {"Accept-Encoding": "identity"}  # byte counts are Content-Length's
    try:
        with session.get(url, stream=True, timeout=timeout, headers=headers) as answer:
            if answer.status_code >= 500:
                raise _Retry(f"HTTP {answer.status_code} {answer.reason}")
            if answer.status_code != 200:
                raise _NextRoute(f"HTTP {answer.status_code} {answer.reason}")
            return _save(answer, dest, sha256, progress), answer.headers.get("X-Cache")
    except (requests.RequestException, urllib3.exceptions.HTTPError) as e:
        # urllib3's own errors surface while streaming the body (a cut-short body is
        # its IncompleteRead, a stalled one its ReadTimeoutError)
        raise _Retry(_reason(e)) from None
    except OSError as e:  # writing DEST's directory: every route would fail the same
        raise FetchError(f"cannot write into the directory of {dest}: {e.strerror}") from None


def _save(answer, dest: str, sha256: str | None, progress: IO[str] | None) -> int:
    length_header = answer.headers.get("Content-Length")
    expected = int(length_header) if length_header and length_header.isdigit() else None
    if expected is None and sha256 is None:
        raise _NextRoute(
            "no Content-Length: a cut-short body would pass unseen (give --sha256 to accept it)"
        )
    directory = os.path.dirname(os.path.abspath(dest))
    fd, temp = tempfile.mkstemp(prefix=TEMP_PREFIX, dir=directory)
    try:
        digest = hashlib.sha256()
        got = 0
        bar = _Bar(progress, expected)
        with os.fdopen(fd, "wb") as out:
            for block in answer.raw.stream(CHUNK_BYTES, decode_content=False):
                out.write(block)
                digest.update(block)
                got += len(block)
                bar.update(got)
            bar.done()
            if expected is not None and got != expected:
                raise _Retry(f"body cut short: {got} of {expected} bytes")
            if sha256 is not None and digest.hexdigest() != sha256.lower():
                raise _NextRoute(f"SHA-256 {digest.hexdigest()} is not the expected {sha256}")
            out.flush()
            os.fsync(out.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temp, 0o666 & ~umask)  # what a plain open() would have made
        os.replace(temp, dest)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
        raise
    return got


class _Bar:
    """A one-line progress bar, drawn only for big files on a terminal."""

    def __init__(self, stream: IO[str] | None, total: int | None) -> None:
        self.stream = stream if total is not None and total >= PROGRESS_MIN_BYTES else None
        self.total = total or 1
        self.shown = -1

    def update(self, got: int) -> None:
        percent = got * 100 // self.total
        if self.stream is None or percent == self.shown:
            return
        self.shown = percent
        filled = percent * 30 // 100
        self.stream.write(f"\r[{'#' * filled}{'.' * (30 - filled)}] {percent:3d}% {got >> 20} MiB")
        self.stream.flush()

    def done(self) -> None:
        if self.stream is not None and self.shown >= 0:
            self.stream.write("\n")
            self.stream.flush()


def _label(route: Route) -> str:
    return f"cache {route.proxy}" if route.proxy else "direct"


def _reason(error: Exception) -> str:
    text = " ".join(str(error).split())
    cut = re.search(r"IncompleteRead\((\d+) bytes read, (\d+) more expected\)", text)
    if cut:
        got, more = int(cut.group(1)), int(cut.group(2))
        return f"body cut short: {got} of {got + more} bytes"
    for marker in ("Connection refused", "timed out", "Name or service not known"):
        if marker in text:
            return marker.lower()
    return text if len(text) <= 160 else text[:157] + "..."


def _last_per_route(failures: list[str]) -> list[str]:
    last: dict[str, str] = {}
    for line in failures:
        last[line.split(": ", 1)[0]] = line
    return list(last.values())


# -- the CLI's part: jobcage/cli/parser.py registers these ----------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("url", metavar="URL", help="http:// or https:// URL")
    parser.add_argument("dest", metavar="DEST", help="file to write (or a directory)")
    parser.add_argument("--sha256", metavar="HEX", help="refuse the file unless it has this hash")
    parser.add_argument(
        "--attempts",
        metavar="N",
        type=int,
        default=DEFAULT_ATTEMPTS,
        help=f"tries per route, with backoff (default {DEFAULT_ATTEMPTS})",
    )
    parser.add_argument(
        "--timeout",
        metavar="SECONDS",
        type=float,
        default=DEFAULT_TIMEOUT_SECONDS,
        help=f"connect and read timeout (default {DEFAULT_TIMEOUT_SECONDS:.0f})",
    )


def command(args: Any) -> int:
    progress = sys.stderr if sys.stderr.isatty() else None
    done = fetch(
        args.url,
        args.dest,
        sha256=args.sha256,
        attempts=args.attempts,
        timeout_seconds=args.timeout,
        progress=progress,
    )
    if done.failures:  # it worked, but the administrator wants to know the cache did not
        text = "; ".join(_last_per_route(list(done.failures)))
        print(f"jobcage: warning: fetched {_label(done.route)} after: {text}", file=sys.stderr)
    return 0

"""`jobcage fetch` against a real squid on the simulated node and the world's internet
host: cache HIT on the second fetch, direct fallback when squid is down, broken answers
refused with nothing left at DEST, and one fetch from inside a network cage."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from jobcage import fetch as fetch_mod
from jobcage.cli import main
from jobcage.config import Config
from jobcage.errors import ConfigError, FetchError
from jobcage.testing.networld import (
    CAMPUS_NETWORK,
    INTERNET_HOST,
    NODE_UPLINK,
    POOL,
    SERVER_PORT,
)
from jobcage.testing.squid import PORT, running_squid

MiB = 1 << 20
ORIGIN = f"http://{INTERNET_HOST}:{SERVER_PORT}"
FAST = {"backoff_seconds": 0.01, "timeout_seconds": 10.0}


def sha(size: int) -> str:
    return hashlib.sha256(b"x" * size).hexdigest()  # what netserver's /bytes/N sends


def no_temp_files(directory: Path) -> bool:
    return not [p for p in directory.iterdir() if p.name.startswith(fetch_mod.TEMP_PREFIX)]


# -- pure logic ------------------------------------------------------------------------


def test_routes_cache_first_from_the_osg_variable_else_http_proxy():
    assert fetch_mod.routes({"OSG_SQUID_LOCATION": "squid.example:3128", "http_proxy": "p:1"}) == [
        fetch_mod.Route("cache", "http://squid.example:3128"),
        fetch_mod.Route("direct", None),
    ]
    for unset in ("UNAVAILABLE", "None", ""):
        routes = fetch_mod.routes({"OSG_SQUID_LOCATION": unset, "http_proxy": "http://p:1"})
        assert routes[0] == fetch_mod.Route("cache", "http://p:1")
    assert fetch_mod.routes({}) == [fetch_mod.Route("direct", None)]


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["ftp://x/y", "d"], "not an http"),
        ([f"{ORIGIN}/bytes/1", "d", "--sha256", "abc"], "64 hexadecimal"),
        ([f"{ORIGIN}/bytes/1", "d", "--attempts", "0"], "1 to 10"),
        ([f"{ORIGIN}/bytes/1", "d", "--timeout", "-1"], "out of range"),
        ([f"{ORIGIN}/bytes/1", "no/such/dir/d"], "does not exist"),
    ],
)
def test_bad_arguments_are_one_clear_error_and_touch_nothing(argv, match, tmp_path, capsys):
    with pytest.raises(ConfigError, match=match):
        fetch_mod.fetch(*argv[:2], **_options(argv[2:]))
    os.chdir(tmp_path)
    assert main(["fetch", *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and match in err
    assert list(tmp_path.iterdir()) == []


def _options(flags: list[str]) -> dict:
    pairs = dict(zip(flags[0::2], flags[1::2], strict=True))
    out: dict = {}
    if "--sha256" in pairs:
        out["sha256"] = pairs["--sha256"]
    if "--attempts" in pairs:
        out["attempts"] = int(pairs["--attempts"])
    if "--timeout" in pairs:
        out["timeout_seconds"] = float(pairs["--timeout"])
    return out


# -- a real squid on the node ----------------------------------------------------------


@pytest.fixture
def squid(node):
    with running_squid(node, node.node, NODE_UPLINK, (f"{NODE_UPLINK}/32", POOL)) as s:
        yield s
    ours = subprocess.run(["pgrep", "-a", "-x", "squid"], capture_output=True, text=True).stdout
    assert s.directory not in ours, f"squid outlived its test: {ours}"


def squid_env(squid) -> dict[str, str]:
    return {"OSG_SQUID_LOCATION": f"{NODE_UPLINK}:{PORT}"}


def fetch_via(squid, path: str, dest: Path, **options) -> fetch_mod.Fetched:
    """``path`` of the internet host, squid first, as a job on the node would."""
    return fetch_mod.fetch(
        f"{ORIGIN}/{path}", str(dest), environ=squid_env(squid), **FAST, **options
    )


@pytest.mark.root
@pytest.mark.network
def test_second_fetch_is_a_cache_hit(squid, tmp_path):
    size = 3 * MiB
    url = f"{ORIGIN}/bytes/{size}"
    first = fetch_mod.fetch(url, str(tmp_path / "a"), environ=squid_env(squid), **FAST)
    second = fetch_mod.fetch(url, str(tmp_path / "b"), environ=squid_env(squid), **FAST)
    assert first.route.name == second.route.name == "cache"
    assert first.x_cache.startswith("MISS") and second.x_cache.startswith("HIT"), (
        first.x_cache,
        second.x_cache,
    )
    for name in ("a", "b"):
        assert hashlib.sha256((tmp_path / name).read_bytes()).hexdigest() == sha(size)
    squid.stop()  # the access log is complete once squid is gone
    codes = [line.split()[3] for line in squid.access_log()]
    assert [c.split("/")[0] for c in codes][-2:] == ["TCP_MISS", "TCP_MEM_HIT"], codes


@pytest.mark.root
@pytest.mark.network
def test_stopped_squid_falls_back_to_direct(squid, tmp_path):
    squid.stop()
    size = MiB
    got = fetch_via(squid, f"bytes/{size}", tmp_path / "f", sha256=sha(size))
    assert got.route.name == "direct" and got.size_bytes == size
    assert len(got.failures) == fetch_mod.DEFAULT_ATTEMPTS
    assert all("connection refused" in f for f in got.failures), got.failures


@pytest.mark.root
@pytest.mark.network
@pytest.mark.parametrize(
    ("path", "sha256", "match"),
    [
        ("truncated/1048576", None, "cut short"),  # squid and origin both cut it
        ("bytes/1048576", "0" * 64, "SHA-256"),
        ("nolength/1048576", None, "no Content-Length"),
        ("nothing-here", None, "HTTP 404"),
    ],
)
def test_broken_answers_are_refused_and_leave_nothing(squid, tmp_path, path, sha256, match):
    dest = tmp_path / "input.dat"
    dest.write_bytes(b"the previous input")
    with pytest.raises(FetchError) as info:
        fetch_via(squid, path, dest, sha256=sha256)
    text = str(info.value)
    assert f"cache {squid.url}" in text and "direct" in text and match in text, text
    assert dest.read_bytes() == b"the previous input"
    assert no_temp_files(tmp_path)


@pytest.mark.root
@pytest.mark.network
def test_retries_are_bounded_per_route(squid, tmp_path):
    # nothing listens on port 9 of the internet host: squid answers 503, direct is refused
    with pytest.raises(FetchError) as info:
        fetch_mod.fetch(
            f"http://{INTERNET_HOST}:9/x", str(tmp_path / "x"), environ=squid_env(squid), **FAST
        )
    tries = info.value.failures
    attempts = fetch_mod.DEFAULT_ATTEMPTS
    assert len(tries) == 2 * attempts, tries
    assert all(f"cache {squid.url}: HTTP 503" in t for t in tries[:attempts]), tries
    assert all(t == "direct: connection refused" for t in tries[attempts:]), tries
    assert list(tmp_path.iterdir()) == []


@pytest.mark.root
@pytest.mark.network
def test_a_body_without_length_passes_with_its_checksum(squid, tmp_path):
    size = MiB
    got = fetch_via(squid, f"nolength/{size}", tmp_path / "f", sha256=sha(size))
    assert got.size_bytes == size and got.route.name == "cache"


@pytest.mark.root
@pytest.mark.network
def test_progress_bar_only_for_big_files(squid, tmp_path):
    bar = io.StringIO()
    fetch_mod.fetch(f"{ORIGIN}/bytes/{MiB}", str(tmp_path / "s"), progress=bar, environ={}, **FAST)
    assert bar.getvalue() == ""
    size = fetch_mod.PROGRESS_MIN_BYTES
    fetch_mod.fetch(f"{ORIGIN}/bytes/{size}", str(tmp_path), progress=bar, environ={}, **FAST)
    assert bar.getvalue().rstrip().endswith(f"100% {size >> 20} MiB")
    assert (tmp_path / str(size)).stat().st_size == size  # DEST a directory: URL's name


def run_cli_in_node(node, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    argv = [sys.executable, "-m", "jobcage.cli", "fetch", *args]
    return node.exec_in(node.node, argv, check=False, env={**os.environ, **env}, timeout=120)


@pytest.mark.root
@pytest.mark.network
def test_cli_quiet_on_success_one_line_when_every_route_failed(squid, tmp_path):
    env = {**squid_env(squid), "PYTHONPATH": str(Path(__file__).parent.parent)}
    done = run_cli_in_node(squid.world, f"{ORIGIN}/bytes/1000", str(tmp_path / "ok"), env=env)
    assert (done.returncode, done.stdout, done.stderr) == (0, "", "")
    dest = tmp_path / "bad"
    done = run_cli_in_node(
        squid.world, f"{ORIGIN}/bytes/1000", str(dest), "--sha256", "1" * 64, env=env
    )
    assert done.returncode == 1
    assert done.stderr.count("\n") == 1 and "every route failed" in done.stderr, done.stderr
    assert not dest.exists() and no_temp_files(tmp_path)


def jobcage_run_fetch(squid, cages: Config, url: str, dest: Path, env: dict[str, str]) -> dict:
    """``jobcage run --network -- jobcage fetch URL DEST`` on the node, as a job wrapper
    would run it; the usage of the record it writes."""
    record = dest.with_suffix(".usage.json")
    settings = {
        "allow_node_access": "true",
        "address_pool": POOL,
        "campus_networks": CAMPUS_NETWORK,
    }
    argv = [sys.executable, "-m", "jobcage.cli", "run", "--network", "--usage-file", str(record)]
    argv += ["--state-dir", cages.state_dir, "--cgroup-parent", cages.cgroup_parent]
    argv += [arg for key, value in settings.items() for arg in ("--set", f"{key}={value}")]
    argv += ["--", sys.executable, "-m", "jobcage.cli", "fetch", url, str(dest)]
    world = squid.world
    done = world.exec_in(world.node, argv, check=False, env={**os.environ, **env}, timeout=120)
    assert done.returncode == 0, done.stderr
    (line,) = record.read_text().splitlines()
    written = json.loads(line)
    assert written["exit_status"] == 0
    return written["usage"]


@pytest.mark.root
@pytest.mark.network
def test_fetch_in_a_cage_through_the_node_squid_costs_no_wan(squid, cage_config, tmp_path):
    """Job -> node squid is LAN traffic (allow_node_access): the usage record of a job
    whose input was a cache HIT shows no WAN bytes; fetched directly, its size in WAN.
    (One firewall backend: the accounting of both is proven in test_network.)"""
    size = 4 * MiB
    url = f"{ORIGIN}/bytes/{size}"
    fetch_mod.fetch(url, str(tmp_path / "warm"), environ=squid_env(squid), **FAST)  # a MISS
    env = {"PYTHONPATH": str(Path(__file__).parent.parent)}
    via_squid = {**env, **squid_env(squid)}
    cached = jobcage_run_fetch(squid, cage_config, url, tmp_path / "cached", via_squid)
    direct = jobcage_run_fetch(squid, cage_config, url, tmp_path / "direct", env)
    assert cached["net_lan_rx_bytes"] >= size
    assert cached["net_wan_rx_bytes"] + cached["net_wan_tx_bytes"] < 16 * 1024
    assert direct["net_wan_rx_bytes"] >= size and direct["net_lan_rx_bytes"] < 16 * 1024
    assert (tmp_path / "cached").read_bytes() == (tmp_path / "direct").read_bytes()
    squid.stop()
    assert squid.access_log()[-1].split()[3].startswith("TCP_MEM_HIT/200")

"""Generated bad values for every config key (in the file and in the environment), every
`jobcage run` flag and every JobCage argument: each is one line that names the key, and
nothing is built (no cgroup, no record, no state dir; the job never runs).

The strategies build values that are bad by construction (a relative path, a prefix
past /32, a number past its bound…), not by asking the code under test. `run` is
driven without --network: a value that slipped through would otherwise build a veth
in this machine's own namespace, which the suite never does; the netns check below
is there for the day a key builds one.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import string
import tempfile
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jobcage import Config, JobCage, JobCageError
from jobcage.config_values import (
    CPUS_MAX,
    CPUS_MIN,
    GRACE_MAX_SECONDS,
    MEMORY_MAX_BYTES,
    MEMORY_MIN_BYTES,
    PIDS_MAX,
    V1_CONTROLLERS,
)

from .cli_support import run_main
from .conftest import parent_dirs, unique

EXAMPLES = settings(
    max_examples=25,
    deadline=None,
    database=None,  # no .hypothesis directory left behind
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

# Letters and a little punctuation, never digits, "/", "." or ",": never a number, a
# size, an address, a path or a list.
word = st.text(string.ascii_letters + "_-!?", min_size=1, max_size=12)
finite_huge = st.floats(min_value=1e19, max_value=1e300)
non_finite = st.sampled_from([math.nan, math.inf, -math.inf])


def outside(low: int, high: int) -> st.SearchStrategy[int]:
    return st.one_of(st.integers(max_value=low - 1), st.integers(min_value=high + 1))


def _size_text() -> st.SearchStrategy[str]:
    units = st.sampled_from(["", "K", "M", "G", "T", "P", "E"])
    too_big = st.integers(min_value=MEMORY_MAX_BYTES + 1, max_value=10**30).map(str)
    too_small = st.integers(min_value=0, max_value=1023).map(lambda n: f"{n}K")
    return st.one_of(
        word,
        too_big,
        too_small,
        st.integers(min_value=2, max_value=9999).map(lambda n: f"{n}E"),
        st.builds(lambda n, u: f"-{n}{u}", st.integers(1, 999), units),
        st.sampled_from(["1e99", "inf", "nan", "9" * 400, "2 GB per job", "0x10M"]),
    )


def _cidr_text() -> st.SearchStrategy[str]:
    octet = st.integers(0, 255)
    return st.one_of(
        word,
        st.builds(lambda a, p: f"{a}.0.0.0/{p}", octet, st.integers(33, 99)),
        st.builds(lambda a: f"{a}.1.0.0/8", st.integers(1, 223)),  # host bits set
        st.builds(lambda a: f"{a}.0.0.0/8", st.integers(256, 999)),
        st.integers(129, 999).map(lambda p: f"2001:db8::/{p}"),
        st.just("2001:db8::1/32"),  # host bits set
    )


def _path_text() -> st.SearchStrategy[str]:
    return st.one_of(
        word,  # relative
        word.map(lambda w: f"/{w}/../{w}"),
        word.map(lambda w: f"/{w}\x01"),
    )


not_a_list = st.one_of(st.integers(), st.booleans(), st.floats(allow_nan=True))
not_text = st.one_of(
    st.integers(), st.booleans(), st.floats(), st.lists(st.integers(), min_size=1, max_size=3)
)

# key -> (bad text: for the file, the environment and --set; bad non-text: the file)
BAD: dict[str, tuple[st.SearchStrategy[str], st.SearchStrategy[object]]] = {
    "cgroup_version": (
        word.filter(lambda w: w != "auto"),
        st.one_of(st.integers().filter(lambda n: n not in (1, 2)), st.booleans(), st.floats()),
    ),
    "cgroup_parent": (_path_text(), not_text),
    "cgroup_controllers": (
        st.one_of(
            # Without freezer: the job could never be killed.
            st.lists(
                st.sampled_from(sorted(V1_CONTROLLERS - {"freezer"})), min_size=1, max_size=4
            ).map(",".join),
            word.filter(lambda w: w not in V1_CONTROLLERS).map(lambda w: f"freezer,{w}"),
        ),
        st.one_of(not_a_list, st.just([]), st.lists(st.integers(), min_size=1, max_size=3)),
    ),
    "state_dir": (_path_text(), not_text),
    "address_pool": (
        st.one_of(
            word,
            st.builds(lambda a, p: f"{a}.0.0.0/{p}", st.integers(1, 223), st.integers(31, 32)),
            st.just("2001:db8::/64"),
        ),
        not_text,
    ),
    "uplink": (
        st.one_of(
            st.text(string.ascii_letters, min_size=16, max_size=40),
            st.builds(lambda a, c, b: a + c + b, word, st.sampled_from("/: \t"), word),
        ),
        not_text,
    ),
    "campus_networks": (
        st.one_of(
            _cidr_text(),
            st.integers(0, 255).map(lambda n: f"100.64.{n}.0/24"),  # inside the pool
            st.integers(0, 65535).map(lambda n: f"fd6a:6f62:6361:{n:x}::/64"),  # ipv6_pool
            _cidr_text().map(lambda c: f"192.0.2.0/24,{c}"),
        ),
        st.one_of(not_a_list, st.lists(st.integers(), min_size=1, max_size=3)),
    ),
    "memory_limit": (
        _size_text(),
        st.one_of(
            outside(MEMORY_MIN_BYTES, MEMORY_MAX_BYTES),
            finite_huge,
            non_finite,
            st.booleans(),
            st.lists(st.integers(), min_size=1, max_size=2),
        ),
    ),
    "pids_limit": (
        st.one_of(
            word,
            outside(1, PIDS_MAX).map(str),
            st.floats(0.01, 1e6).filter(lambda f: not f.is_integer()).map(str),
        ),
        st.one_of(
            outside(1, PIDS_MAX),
            st.floats(0.01, 1e6).filter(lambda f: not f.is_integer()),
            non_finite,
            finite_huge,
            st.booleans(),
        ),
    ),
    "cpu_limit": (
        st.one_of(
            word,
            st.floats(min_value=CPUS_MAX * 1.001, max_value=1e308).map(repr),
            st.floats(max_value=CPUS_MIN * 0.99, min_value=-1e308).map(repr),
            non_finite.map(repr),
        ),
        st.one_of(
            st.floats(min_value=CPUS_MAX * 1.001),
            st.floats(max_value=CPUS_MIN * 0.99),
            non_finite,
            st.booleans(),
            st.lists(st.floats(1, 2), min_size=1, max_size=2),
        ),
    ),
    "allow_node_access": (
        word.filter(lambda w: w.lower() not in {"true", "false", "yes", "no"}),
        st.one_of(st.integers(), st.floats(), st.lists(st.booleans(), min_size=1, max_size=2)),
    ),
    "dns_servers": (
        st.one_of(word, st.integers(256, 999).map(lambda n: f"{n}.0.0.1")),
        st.one_of(not_a_list, st.lists(st.integers(), min_size=1, max_size=3)),
    ),
    "firewall": (
        word.filter(lambda w: w not in {"auto", "nftables", "iptables-legacy"}),
        not_text,
    ),
    "grace_seconds": (
        st.one_of(
            word,
            st.floats(min_value=GRACE_MAX_SECONDS + 1, max_value=1e308).map(repr),
            st.floats(max_value=-0.001, min_value=-1e308).map(repr),
            non_finite.map(repr),
        ),
        st.one_of(
            st.floats(min_value=GRACE_MAX_SECONDS + 1),
            st.floats(max_value=-0.001),
            non_finite,
            st.booleans(),
            st.lists(st.floats(0, 10), min_size=1, max_size=2),
        ),
    ),
    "ipv6": (
        word.filter(lambda w: w not in {"auto", "nat", "routed", "off"}),
        not_text,
    ),
    "ipv6_pool": (
        st.one_of(
            word,
            st.integers(65, 128).map(lambda p: f"fd00::/{p}"),  # smaller than a cage's /64
            st.just("100.64.0.0/16"),  # the wrong family
        ),
        not_text,
    ),
}
for _action in ("escape", "privilege", "daemonize", "fork_rate", "police"):
    BAD[f"watch_{_action}_action"] = (
        word.filter(lambda w: w not in {"log", "kill", "ignore"}),
        not_text,
    )
BAD["watch_fork_rate"] = (
    st.one_of(word, st.floats(max_value=0, min_value=-1e9).map(repr), non_finite.map(repr)),
    st.one_of(st.floats(max_value=0), non_finite, st.booleans()),
)
BAD["watch_sweep_seconds"] = (
    st.one_of(word, st.floats(min_value=3601, max_value=1e300).map(repr), st.just("0")),
    st.one_of(st.floats(max_value=0), st.floats(min_value=3601), non_finite, st.booleans()),
)
BAD["watch_buffer_size"] = (
    st.one_of(word, st.integers(1, 3).map(lambda n: f"{n}K"), st.just("3G"), st.just("1e9")),
    st.one_of(outside(4 << 10, 2 << 30), non_finite, st.booleans()),
)
BAD["watch_log"] = (
    word.map(lambda w: f"/tmp/{w}\x01"),
    st.one_of(st.integers(), st.booleans(), st.lists(st.integers(), min_size=1, max_size=2)),
)
BAD["watch_metrics_address"] = (
    st.one_of(word, st.integers(65536, 99999).map(lambda p: f"127.0.0.1:{p}"), st.just(":80")),
    not_text,
)
BAD["watch_police_daemons"] = (
    st.just("never-bad-as-text"),  # any text is a list of names
    st.one_of(st.integers(), st.booleans(), st.lists(st.integers(), min_size=1, max_size=2)),
)
TEXT_ALWAYS_VALID = {"watch_police_daemons"}


def test_every_config_key_has_bad_values():
    assert sorted(BAD) == sorted(f.name for f in Config.__dataclass_fields__.values())


def _toml(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and math.isnan(value):
        return "nan"
    if isinstance(value, float) and math.isinf(value):
        return "inf" if value > 0 else "-inf"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")
    return "[" + ", ".join(_toml(v) for v in value) + "]"  # type: ignore[attr-defined]


@contextlib.contextmanager
def _world() -> Iterator[tuple[str, list[str], str]]:
    """A scratch dir, the `run` arguments that confine a cage to a test-only parent and
    state dir there, and the marker file the job would create if it ran."""
    with tempfile.TemporaryDirectory(prefix="jobcage-bad-") as scratch:
        parent = f"/jobcage-test-{unique('bad')}"
        state = os.path.join(scratch, "state")
        marker = os.path.join(scratch, "ran")
        yield scratch, ["--state-dir", state, "--cgroup-parent", parent], marker
        assert not os.path.exists(marker), "the job ran"
        assert not os.path.exists(state), f"something was built: {os.listdir(state)}"
        assert not [d for d in parent_dirs(parent) if os.path.exists(d)], "a cgroup was built"
        assert not _our_netns(), "a netns was built"


def _our_netns() -> list[str]:
    """Netns of jobs this process ran: `run` names them after run-<host>-<pid>-<time>
    (other suites on this shared machine make their own meanwhile)."""
    names = os.listdir("/run/netns") if os.path.isdir("/run/netns") else []
    return [n for n in names if f"-{os.getpid()}-" in n]


@contextlib.contextmanager
def _environment(**values: str) -> Iterator[None]:
    saved = {k: v for k, v in os.environ.items() if k.startswith("JOBCAGE_")}
    for k in saved:
        del os.environ[k]
    os.environ.update(values)
    try:
        yield
    finally:
        for k in values:
            os.environ.pop(k, None)
        os.environ.update(saved)


def _assert_one_line(status: int, err: str, *words: str) -> None:
    assert status == 125, err
    assert err.count("\n") == 1 and err.startswith("jobcage: error: "), err
    assert "Traceback" not in err
    for w in words:
        assert w in err, f"{w!r} not named in: {err}"


@pytest.mark.parametrize("key", sorted(BAD))
@EXAMPLES
@given(data=st.data())
def test_bad_value_in_the_config_file(key, data):
    text, other = BAD[key]
    value = data.draw(other if key in TEXT_ALWAYS_VALID else st.one_of(text, other), label=key)
    with _world() as (scratch, args, marker), _environment():
        path = os.path.join(scratch, "jobcage.toml")
        with open(path, "w", encoding="utf-8") as f:
            f.write(f"{key} = {_toml(value)}\n")
        status, _, err = run_main(["run", "--config", path, *args, "--", "touch", marker])
        _assert_one_line(status, err, key, path)


@pytest.mark.parametrize("key", sorted(BAD))
@EXAMPLES
@given(data=st.data())
def test_bad_value_in_the_environment(key, data):
    if key in TEXT_ALWAYS_VALID:
        return
    value = data.draw(BAD[key][0], label=key)
    variable = f"JOBCAGE_{key.upper()}"
    with _world() as (_, args, marker), _environment(**{variable: value}):
        status, _, err = run_main(["run", *args, "--", "touch", marker])
        _assert_one_line(status, err, key, f"${variable}")


def _flag_values(scratch: str) -> dict[str, tuple[st.SearchStrategy[str], str]]:
    """flag -> (bad values, the word its error must name)."""
    return {
        "--memory": (BAD["memory_limit"][0], "--memory"),
        "--pids": (BAD["pids_limit"][0], "--pids"),
        "--cpus": (BAD["cpu_limit"][0], "--cpus"),
        "--grace": (BAD["grace_seconds"][0], "--grace"),
        "--campus": (BAD["campus_networks"][0], "--campus"),
        "--state-dir": (BAD["state_dir"][0], "--state-dir"),
        "--cgroup-parent": (BAD["cgroup_parent"][0], "--cgroup-parent"),
        "--job-id": (
            st.one_of(
                st.builds(
                    lambda a, c, b: a + c + b, word, st.sampled_from(["/", " ", ".."]), word
                ),
                st.text(string.ascii_letters, min_size=129, max_size=200),
                word.map(lambda w: "-" + w),
            ),
            "job id",
        ),
        "--user": (word.map(lambda w: f"no-such-user-{w}"), "user"),
        "--cwd": (word.map(lambda w: os.path.join(scratch, "missing", w)), "cwd"),
        "--usage-file": (word.map(lambda w: os.path.join(scratch, "missing", w)), "--usage-file"),
        "--batch": (word.filter(lambda w: w not in {"condor", "slurm"}), "--batch"),
        "--config": (word.map(lambda w: os.path.join(scratch, "missing", w)), "config"),
    }


FLAGS = sorted(_flag_values("/").keys())


@pytest.mark.parametrize("flag", FLAGS)
@EXAMPLES
@given(data=st.data())
def test_bad_run_flag(flag, data):
    with _world() as (scratch, args, marker), _environment():
        values, word_named = _flag_values(scratch)[flag]
        value = data.draw(values, label=flag)
        if flag in args:  # the bad one replaces the good one
            i = args.index(flag)
            args = args[:i] + args[i + 2 :]
        status, _, err = run_main(["run", f"{flag}={value}", *args, "--", "touch", marker])
        _assert_one_line(status, err, word_named)


@pytest.mark.parametrize("key", sorted(BAD))
@EXAMPLES
@given(data=st.data())
def test_bad_value_through_set(key, data):
    if key in TEXT_ALWAYS_VALID:
        return
    value = data.draw(BAD[key][0].filter(lambda v: v.strip() != ""), label=key)
    with _world() as (_, args, marker), _environment():
        status, _, err = run_main(["run", f"--set={key}={value}", *args, "--", "touch", marker])
        _assert_one_line(status, err, key, f"--set {key}")


# JobCage(...) arguments: the job id and the four keys it takes, plus network= and
# config=, which are not config keys.
ARGUMENTS = {
    "job_id": (_flag_values("/")["--job-id"][0], "job id"),
    "memory_limit": (st.one_of(*BAD["memory_limit"]), "memory_limit"),
    "pids_limit": (st.one_of(*BAD["pids_limit"]), "pids_limit"),
    "cpu_limit": (st.one_of(*BAD["cpu_limit"]), "cpu_limit"),
    "campus_networks": (st.one_of(*BAD["campus_networks"]), "campus_networks"),
    "network": (st.one_of(st.integers(), st.text(max_size=5), st.floats()), "network"),
    "config": (st.one_of(st.dictionaries(word, st.integers(), max_size=2), word), "config"),
}


@pytest.mark.parametrize("argument", sorted(ARGUMENTS))
@EXAMPLES
@given(data=st.data())
def test_bad_jobcage_argument(argument, data):
    values, word_named = ARGUMENTS[argument]
    value = data.draw(values, label=argument)
    with _world() as (scratch, _, _marker):
        parent = f"/jobcage-test-{unique('arg')}"
        config = Config(state_dir=os.path.join(scratch, "state"), cgroup_parent=parent)
        kwargs: dict[str, object] = {"config": config, argument: value}
        job_id = kwargs.pop("job_id", "bad.1")
        with pytest.raises(JobCageError) as err:
            JobCage(job_id, **kwargs).create()  # type: ignore[arg-type]
        text = str(err.value)
        assert word_named in text and "\n" not in text, text
        assert not [d for d in parent_dirs(parent) if os.path.exists(d)]

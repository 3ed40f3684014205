"""The config file, the environment and the command line, in that rising precedence,
as the CLI sees them. Unknown keys and bad values name the key and where it came from."""

from __future__ import annotations

import ipaddress

import pytest

from jobcage import ConfigError
from jobcage.config import load_config
from jobcage.records import StateStore

from .cli_support import run_main

TOML = """\
cgroup_parent = "/jobcage"
cgroup_controllers = ["freezer", "memory"]
state_dir = "{state}"
address_pool = "100.65.0.0/16"
uplink = "eth1"
campus_networks = ["129.93.0.0/16", "10.0.0.0/8"]
memory_limit = "2G"
pids_limit = 4096
allow_node_access = true
grace_seconds = 45
"""


@pytest.fixture
def config_file(tmp_path):
    path = tmp_path / "jobcage.toml"
    path.write_text(TOML.format(state=tmp_path / "state"))
    return path


def test_every_key_from_the_file(config_file, tmp_path):
    config = load_config(str(config_file), environ={})
    assert config.cgroup_parent == "/jobcage"
    assert config.cgroup_controllers == ("freezer", "memory")
    assert config.state_dir == str(tmp_path / "state")
    # Each value in its typed form, parsed once here.
    assert config.address_pool == ipaddress.IPv4Network("100.65.0.0/16")
    assert config.uplink == "eth1"
    assert config.campus_networks == tuple(
        map(ipaddress.IPv4Network, ("129.93.0.0/16", "10.0.0.0/8"))
    )
    assert config.memory_limit == 2 << 30 and config.pids_limit == 4096
    assert config.allow_node_access is True and config.grace_seconds == 45.0


def test_environment_beats_file_and_command_line_beats_both(config_file):
    env = {
        "JOBCAGE_CONFIG": str(config_file),
        "JOBCAGE_GRACE_SECONDS": "10",
        "JOBCAGE_CAMPUS_NETWORKS": "192.0.2.0/24",
    }
    config = load_config(None, environ=env)
    assert config.grace_seconds == 10.0
    assert config.campus_networks == (ipaddress.IPv4Network("192.0.2.0/24"),)
    assert config.uplink == "eth1"  # from the file named by $JOBCAGE_CONFIG
    config = load_config(None, environ=env, grace_seconds="5")
    assert config.grace_seconds == 5.0


def test_unknown_key_names_key_and_file(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("grace_period = 3\n")
    with pytest.raises(ConfigError, match=rf"{path}.*grace_period"):
        load_config(str(path), environ={})


def test_bad_value_names_key_and_source(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("pids_limit = -1\n")
    with pytest.raises(ConfigError, match=rf"{path}: pids_limit"):
        load_config(str(path), environ={})
    with pytest.raises(ConfigError, match=r"\$JOBCAGE_ALLOW_NODE_ACCESS"):
        load_config(None, environ={"JOBCAGE_ALLOW_NODE_ACCESS": "maybe"})


def test_cli_config_file_and_set_reach_the_commands(config_file, tmp_path, monkeypatch):
    monkeypatch.delenv("JOBCAGE_STATE_DIR", raising=False)
    # A record in the file's state_dir shows up: the file reached the command.
    store = StateStore(str(tmp_path / "state"))
    store.claim(store.new_record("fromfile.1"))
    status, out, err = run_main(["--config", str(config_file), "list"])
    assert status == 0, err
    assert "fromfile.1" in out and "building" in out
    status, _, err = run_main(["list", "--config", str(config_file), "--set", "pids_limit=0"])
    assert status == 2 and "pids_limit" in err
    status, _, err = run_main(["--set", "nonsense", "list", "--state-dir", str(tmp_path)])
    assert status == 2 and "KEY=VALUE" in err
    status, _, err = run_main(["--config", str(tmp_path / "missing.toml"), "list"])
    assert status == 2 and "does not exist" in err


def test_invalid_toml_is_a_config_error(tmp_path):
    path = tmp_path / "broken.toml"
    path.write_text("grace_seconds = \n")
    status, _, err = run_main(["--config", str(path), "list"])
    assert status == 2 and "not valid TOML" in err and str(path) in err


# -- every value checked when the config loads (issue 17, items 4, 8 and 12) ---------


@pytest.mark.parametrize(
    ("body", "key"),
    [
        # Without freezer a cage's processes survived destroy and reap.
        ('cgroup_controllers = ["memory", "cpuacct"]', "cgroup_controllers"),
        ('cgroup_controllers = ["bogus"]', "cgroup_controllers"),
        ("cgroup_controllers = []", "cgroup_controllers"),
        # Non-finite and absurd numbers reached the kernel or a timer.
        ("grace_seconds = nan", "grace_seconds"),
        ("grace_seconds = inf", "grace_seconds"),
        ("grace_seconds = 1e308", "grace_seconds"),
        ("memory_limit = 1e99", "memory_limit"),
        (f"memory_limit = {2**70}", "memory_limit"),
        ("memory_limit = inf", "memory_limit"),
        (f'memory_limit = "{"9" * 400}"', "memory_limit"),
        ("pids_limit = true", "pids_limit"),
        (f"pids_limit = {10**7}", "pids_limit"),
        (f"pids_limit = {2**63 - 1}", "pids_limit"),
        ("pids_limit = 1.5", "pids_limit"),
        ("cpu_limit = nan", "cpu_limit"),
        ("cpu_limit = 0.001", "cpu_limit"),
        ("cpu_limit = 1e9", "cpu_limit"),
        # Checked only when a network cage was built, naming neither key nor file.
        ('campus_networks = ["129.93.0.0/33"]', "campus_networks"),
        ('campus_networks = ["129.93.1.0/16"]', "campus_networks"),
        ('campus_networks = "not a network"', "campus_networks"),
        ('campus_networks = ["100.64.7.0/24"]', "campus_networks"),  # inside the pool
        ('address_pool = "100.64.0.0/31"', "address_pool"),
        ('address_pool = "pool"', "address_pool"),
        ('uplink = "an interface name too long"', "uplink"),
        ('uplink = "eth0/1"', "uplink"),
        ('cgroup_parent = "jobcage"', "cgroup_parent"),
        ('cgroup_parent = "/jobcage/../../system.slice"', "cgroup_parent"),
        ('state_dir = "relative/state"', "state_dir"),
        ('dns_servers = ["resolver"]', "dns_servers"),
        ('ipv6 = "yes"', "ipv6"),
        ('ipv6_pool = "fd00::/65"', "ipv6_pool"),
        ('ipv6_pool = "10.0.0.0/8"', "ipv6_pool"),
    ],
)
def test_bad_value_in_the_file_is_one_error_naming_key_and_file(tmp_path, body, key):
    path = tmp_path / "jobcage.toml"
    path.write_text(body + "\n")
    with pytest.raises(ConfigError) as err:
        load_config(str(path), environ={})
    text = str(err.value)
    assert key in text and str(path) in text and "\n" not in text and len(text) < 400


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("GRACE_SECONDS", "nan"),
        ("GRACE_SECONDS", "inf"),
        ("MEMORY_LIMIT", "1e99"),
        ("MEMORY_LIMIT", "9" * 400),
        ("PIDS_LIMIT", "1.5"),
        ("PIDS_LIMIT", str(2**63)),
        ("CGROUP_CONTROLLERS", "memory,cpuacct"),
        ("CAMPUS_NETWORKS", "129.93.0.0/16,bogus"),
        ("UPLINK", "eth 0"),
    ],
)
def test_bad_value_in_the_environment_names_the_variable(key, value):
    with pytest.raises(ConfigError, match=rf"\$JOBCAGE_{key}: {key.lower()} = "):
        load_config(None, environ={f"JOBCAGE_{key}": value})


def test_campus_networks_of_both_families_are_typed_and_checked_against_their_pool():
    config = load_config(None, environ={"JOBCAGE_CAMPUS_NETWORKS": "2001:db8::/32,192.0.2.0/24"})
    assert config.campus_networks == (
        ipaddress.IPv6Network("2001:db8::/32"),
        ipaddress.IPv4Network("192.0.2.0/24"),
    )
    with pytest.raises(ConfigError, match=r"\$JOBCAGE_IPV6_POOL.*ipv6_pool .* overlaps"):
        load_config(
            None,
            environ={
                "JOBCAGE_CAMPUS_NETWORKS": "2001:db8::/32",
                "JOBCAGE_IPV6_POOL": "2001:db8:1::/48",
            },
        )
    with pytest.raises(ConfigError, match=r"ipv6 = \"routed\" needs ipv6_pool"):
        load_config(None, environ={"JOBCAGE_IPV6": "routed"})


def test_a_binary_config_file_is_one_clear_error(tmp_path):
    path = tmp_path / "jobcage.toml"
    path.write_bytes(b"\x7fELF\x02\x01\x01\x00\xff\xfe binary")
    status, _, err = run_main(["--config", str(path), "list"])
    assert status == 2 and err.count("\n") == 1
    assert str(path) in err and "UTF-8" in err and "Traceback" not in err
    status, _, err = run_main(["--config", str(tmp_path), "list"])  # a directory
    assert status == 2 and err.count("\n") == 1 and str(tmp_path) in err


def test_maxima_are_accepted_and_one_past_them_refused():
    from jobcage.config_values import GRACE_MAX_SECONDS, MEMORY_MAX_BYTES, PIDS_MAX

    edge = load_config(
        None, {}, memory_limit=MEMORY_MAX_BYTES, pids_limit=PIDS_MAX, grace_seconds=0
    )
    assert (edge.memory_limit, edge.pids_limit, edge.grace_seconds) == (
        MEMORY_MAX_BYTES,
        PIDS_MAX,
        0.0,
    )
    for key, value in (
        ("memory_limit", MEMORY_MAX_BYTES + 1),
        ("pids_limit", PIDS_MAX + 1),
        ("grace_seconds", GRACE_MAX_SECONDS + 0.001),
    ):
        with pytest.raises(ConfigError, match=rf"--flag: {key} = "):
            load_config(None, {}, origins={key: "--flag"}, **{key: value})


def test_values_are_parsed_once_into_their_typed_form():
    config = load_config(
        None,
        {
            "JOBCAGE_CAMPUS_NETWORKS": " 129.93.0.0/16, 10.0.0.0/8,,129.93.0.0/16",
            "JOBCAGE_MEMORY_LIMIT": "1.5G",
            "JOBCAGE_CGROUP_PARENT": "/batch//jobcage/",
            "JOBCAGE_DNS_SERVERS": "192.0.2.53",
            "JOBCAGE_UPLINK": "",  # empty: unset
        },
    )
    assert config.campus_networks == (
        ipaddress.IPv4Network("129.93.0.0/16"),
        ipaddress.IPv4Network("10.0.0.0/8"),
    )
    assert config.memory_limit == 3 << 29 and config.cgroup_parent == "/batch/jobcage"
    assert config.dns_servers == (ipaddress.IPv4Address("192.0.2.53"),)
    assert config.uplink is None
    # replace() and Config(...) go through the same checks, and keep the typed form.
    assert config.replace(pids_limit="64").pids_limit == 64
    with pytest.raises(ConfigError, match="pids_limit"):
        config.replace(pids_limit=0)

"""The config file, the environment and the command line, in that rising precedence,
as the CLI sees them. Unknown keys and bad values name the key and where it came from."""

from __future__ import annotations

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
    assert config.address_pool == "100.65.0.0/16"
    assert config.uplink == "eth1"
    assert config.campus_networks == ("129.93.0.0/16", "10.0.0.0/8")
    assert config.memory_limit == "2G" and config.pids_limit == 4096
    assert config.allow_node_access is True and config.grace_seconds == 45.0


def test_environment_beats_file_and_command_line_beats_both(config_file):
    env = {
        "JOBCAGE_CONFIG": str(config_file),
        "JOBCAGE_GRACE_SECONDS": "10",
        "JOBCAGE_CAMPUS_NETWORKS": "192.0.2.0/24",
    }
    config = load_config(None, environ=env)
    assert config.grace_seconds == 10.0 and config.campus_networks == ("192.0.2.0/24",)
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

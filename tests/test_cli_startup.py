"""What a `jobcage run` process loads (a batch system pays it per job), and the
command line's parts that make that so: the command found before argparse runs, one
subcommand's parser built, python-iptables imported without its slow lookups."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from jobcage import recovery
from jobcage.cli import main
from jobcage.cli.parser import SUBCOMMANDS, build_parser, command_of
from jobcage.recovery.report import ReapReport

from .cli_support import config_env

# Modules `jobcage run` (no --network) must not load: other commands', doctor's and
# reap's, and stdlib modules that cost milliseconds for nothing the cycle uses
# (docs/performance.md, "Whole process").
NOT_FOR_RUN = (
    "jobcage.fetch",
    "jobcage.doctor",
    "jobcage.admin",
    "jobcage.recovery",
    "jobcage.network",
    "jobcage.cli.cages",
    "hashlib",
    "shutil",
    "logging",
    "ctypes.util",
    "urllib.parse",
)


@pytest.mark.parametrize(
    ("argv", "command"),
    [
        (["run", "--", "true"], "run"),
        (["--config", "run", "list"], "list"),
        (["--state-dir", "/x", "--set", "k=v", "reap", "--dry-run"], "reap"),
        (["--config=/etc/j.toml", "doctor"], "doctor"),
        (["-h"], None),
        (["frobnicate"], None),
        (["--", "run"], None),
        ([], None),
    ],
)
def test_the_command_is_found_before_argparse(argv, command):
    assert command_of(argv) == command


def test_only_the_named_command_gets_a_parser():
    sub = next(a for a in build_parser("run")._actions if a.dest == "command")
    assert list(sub.choices) == ["run"]
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert list(sub.choices) == list(SUBCOMMANDS)


def test_an_abbreviated_option_whose_value_is_a_command_still_parses(monkeypatch, capsys):
    """`--conf run list`: command_of guesses `run`, argparse reads `run` as --config's
    value; the whole parser then gives argparse's own answer, here `list`."""
    seen = {}

    def fake_list(args):
        seen.update(command=args.command, config=args.config)
        return 0

    monkeypatch.setattr("jobcage.cli.cages.cmd_list", fake_list)
    assert main(["--conf", "run", "list"]) == 0
    assert seen == {"command": "list", "config": "run"}


def test_reap_says_which_cages_had_their_rules_restored(monkeypatch, capsys):
    """Before the CLI's split the line was printed only inside the loop over records
    set aside: with none set aside, a restore went unsaid."""
    report = ReapReport(dry_run=False, restored=["job-a"])
    monkeypatch.setattr(recovery, "reap", lambda config, dry_run: report)
    assert main(["--set", "state_dir=/nonexistent-jobcage", "reap"]) == 0
    out = capsys.readouterr().out
    assert out.count("restored the rules of job-a") == 1


@pytest.mark.root
def test_jobcage_run_loads_only_what_its_cycle_uses(cage_config):
    probe = (
        "import json, sys\n"
        "from jobcage.cli import main\n"
        "status = main(['run', '--job-id', 'startup-probe', '--', 'true'])\n"
        "print(json.dumps([status, sorted(sys.modules)]))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe],
        env=config_env(cage_config),
        capture_output=True,
        text=True,
        check=True,
    )
    status, modules = json.loads(done.stdout.splitlines()[-1])
    assert status == 0
    loaded = [m for m in NOT_FOR_RUN if m in modules]
    assert loaded == [], f"`jobcage run` imported {loaded}"


def test_python_iptables_lookups_come_from_one_listing():
    from jobcage.network.firewall.xtables_iptc import _library_finder

    find = _library_finder()
    assert find("c") is not None and find("c").startswith("libc.so")
    assert find("jobcage-no-such-library") is None


@pytest.mark.root
def test_python_iptables_imports_without_setuptools_and_leaves_no_block():
    probe = (
        "import sys, json\n"
        "from jobcage.network.firewall.xtables_iptc import _iptc\n"
        "iptc = _iptc()\n"
        "print(json.dumps(['setuptools' in sys.modules,"
        " sys.modules.get('distutils.sysconfig', 'absent') is None, iptc.__name__]))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    )
    assert json.loads(done.stdout) == [False, False, "iptc"]

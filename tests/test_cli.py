"""`jobcage` commands for real: run (exit statuses, signals, usage record), list, stats,
kill, doctor; in-process through main([...]) and as a process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest

from jobcage.cli import main
from jobcage.records import StateStore
from jobcage.runner import exit_status, generate_job_id

from .cli_support import (
    JOBCAGE,
    alive,
    config_args,
    config_env,
    list_json,
    ready,
    run_main,
    start_run,
    wait_exit,
)

root = pytest.mark.root


# -- no root needed ------------------------------------------------------------------


def test_help_lists_every_command_and_the_exit_codes(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for command in ("run", "list", "stats", "kill", "reap", "doctor"):
        assert command in out
    assert "exit codes" in out and "125" in out
    assert main(["run", "--help"]) == 0
    assert "--grace" in capsys.readouterr().out


def test_bad_arguments_exit_2_without_traceback():
    done = subprocess.run([JOBCAGE, "frobnicate"], capture_output=True, text=True)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr and "invalid choice" in done.stderr


def test_exit_status_is_what_a_shell_reports():
    assert exit_status(0) == 0
    assert exit_status(3) == 3
    assert exit_status(-9) == 137
    assert exit_status(-15) == 143


def test_generated_job_id_is_valid_and_unique_per_process():
    a = generate_job_id(now=1700000000)
    assert a.startswith("run-") and a.endswith(f"-{os.getpid()}-1700000000")


def test_bad_config_value_is_one_line_naming_key_and_file(tmp_path):
    path = tmp_path / "jobcage.toml"
    path.write_text('grace_seconds = "soon"\n')
    done = subprocess.run([JOBCAGE, "--config", str(path), "list"], capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1, done.stderr
    assert "grace_seconds" in done.stderr and str(path) in done.stderr
    assert "Traceback" not in done.stderr


def test_stats_of_unknown_cage_exits_3(tmp_path):
    status, _out, err = run_main(["stats", "nope.0", "--state-dir", str(tmp_path)])
    assert status == 3
    assert "jobcage list" in err and err.count("\n") == 1


def test_bad_job_id_exits_125_for_run_and_2_elsewhere(tmp_path):
    status, _, err = run_main(["run", "--job-id", "a/b", "--state-dir", str(tmp_path), "true"])
    assert status == 125 and "'/'" in err
    status, _, err = run_main(["stats", "../x", "--state-dir", str(tmp_path)])
    assert status == 2


def test_run_without_a_command_says_what_to_do(tmp_path):
    status, _, err = run_main(["run", "--state-dir", str(tmp_path)])
    assert status == 125 and "after --" in err


@pytest.mark.parametrize(
    ("args", "code"),
    [
        (["run", "--pids"], 125),  # run's own codes leave the rest to the job's
        (["run", "--batch", "pbs", "--", "true"], 125),
        (["list", "--frobnicate"], 2),
        (["stats"], 2),
        (["frobnicate"], 2),
    ],
)
def test_argument_errors_are_one_line(args, code):
    status, out, err = run_main(args)
    assert status == code and out == ""
    assert err.count("\n") == 1 and err.startswith("jobcage: error: ") and "--help" in err


@pytest.mark.parametrize(
    ("flag", "value"),
    [
        ("--grace", "nan"),
        ("--grace", "inf"),
        ("--grace", "1e308"),
        ("--pids", "1.5"),
        ("--pids", str(10**7)),
        ("--memory", "1e99"),
        ("--campus", "2001:db8::/129"),
    ],
)
def test_bad_run_flag_is_one_line_naming_it_before_anything_runs(tmp_path, flag, value):
    marker = tmp_path / "ran"
    status, _, err = run_main(
        ["run", flag, value, "--state-dir", str(tmp_path / "state"), "--", "touch", str(marker)]
    )
    assert status == 125 and err.count("\n") == 1 and flag in err, err
    assert not marker.exists() and not (tmp_path / "state").exists()


# -- run: exit statuses --------------------------------------------------------------


@root
@pytest.mark.parametrize(
    ("script", "expected"),
    [("exit 0", 0), ("exit 3", 3), ("kill -9 $$", 137), ("kill -TERM $$", 143)],
)
def test_run_exit_status_is_exact_in_process(cage_config, script, expected):
    status, _, err = run_main(["run", *config_args(cage_config), "--", "sh", "-c", script])
    assert status == expected, err


@root
def test_run_as_a_process_writes_one_usage_line_and_exits_with_the_job(cage_config, tmp_path):
    record = tmp_path / "usage.jsonl"
    done = subprocess.run(
        [
            JOBCAGE,
            "run",
            "--job-id",
            "cli.1",
            "--memory",
            "64M",
            "--usage-file",
            str(record),
            "--summary",
            "--",
            "sh",
            "-c",
            'test "$JOBCAGE_JOB_ID" = cli.1 || exit 9; exit 42',
        ],
        env=config_env(cage_config),
        capture_output=True,
        text=True,
    )
    assert done.returncode == 42, done.stderr
    lines = record.read_text().splitlines()
    assert len(lines) == 1
    data = json.loads(lines[0])
    assert data["job_id"] == "cli.1" and data["exit_status"] == 42
    assert data["usage"]["memory_limit_bytes"] == 64 << 20
    assert data["usage"]["processes_surviving"] == 0
    assert "job cli.1 exited with status 42" in done.stderr
    assert "memory_peak_bytes" in done.stderr


@root
def test_run_usage_to_stdout(cage_config):
    done = subprocess.run(
        [JOBCAGE, "run", "--usage-file", "-", "--", "true"],
        env=config_env(cage_config),
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    assert data["job_id"].startswith("run-") and data["exit_status"] == 0


@root
def test_run_missing_command_exits_127_and_leaves_nothing(cage_config):
    status, _, err = run_main(["run", *config_args(cage_config), "--", "/no/such/binary"])
    assert status == 127 and "no such file" in err and "Errno" not in err
    assert list_json(cage_config) == {}


@root
def test_run_missing_cwd_exits_125_blaming_the_directory(cage_config, tmp_path):
    missing = str(tmp_path / "no-such-dir")
    status, _, err = run_main(["run", "--cwd", missing, *config_args(cage_config), "--", "true"])
    assert status == 125 and "cwd" in err and missing in err and err.count("\n") == 1
    assert list_json(cage_config) == {}


@root
def test_run_refuses_a_usage_file_it_could_not_write_before_running(cage_config, tmp_path):
    marker = tmp_path / "ran"
    for destination in (tmp_path / "no-such-dir" / "usage.jsonl", tmp_path):
        status, _, err = run_main(
            [
                "run",
                "--usage-file",
                str(destination),
                *config_args(cage_config),
                "--",
                "touch",
                str(marker),
            ]
        )
        assert status == 125 and "--usage-file" in err and err.count("\n") == 1, err
        assert not marker.exists()
    assert list_json(cage_config) == {}


@root
def test_run_existing_job_id_exits_125(cage_config):
    first = start_run(cage_config, ["--job-id", "dup.1"], "echo ready; read x; exit 0")
    try:
        assert ready(first) == "ready"
        status, _, err = run_main(
            ["run", "--job-id", "dup.1", *config_args(cage_config), "--", "true"]
        )
        assert status == 125 and "already exists" in err
    finally:
        first.stdin.close()
        assert first.wait(timeout=30) == 0


# -- run: signals ------------------------------------------------------------------------


@root
def test_sigterm_reaches_the_job_which_traps_it_and_exits_0(cage_config, tmp_path):
    record = tmp_path / "u.json"
    proc = start_run(
        cage_config,
        ["--grace", "30", "--usage-file", str(record)],
        'trap "exit 0" TERM; echo ready; sleep 1000 & wait',
    )
    assert ready(proc) == "ready"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0
    data = json.loads(record.read_text())
    assert data["signals_received"] == ["SIGTERM"] and not data["grace_expired"]


@root
def test_job_ignoring_sigterm_is_killed_after_the_grace_period(cage_config, tmp_path):
    record = tmp_path / "u.json"
    proc = start_run(
        cage_config,
        ["--grace", "0.5", "--usage-file", str(record)],
        'trap "" TERM; echo ready; sleep 1000',
    )
    assert ready(proc) == "ready"
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 137
    assert time.monotonic() - sent >= 0.5
    data = json.loads(record.read_text())
    assert data["grace_expired"] and data["term_signal"] == signal.SIGKILL
    assert data["usage"]["processes_killed"] >= 2  # the shell and its sleep


@root
@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGUSR2, signal.SIGHUP, signal.SIGINT])
def test_other_signals_are_forwarded(cage_config, sig):
    name = signal.Signals(sig).name[3:]
    proc = start_run(
        cage_config,
        ["--grace", "30"],
        f'trap "echo got-{name}; exit 0" {name}; echo ready; sleep 1000 & wait',
    )
    assert ready(proc) == "ready"
    proc.send_signal(sig)
    assert proc.stdout.readline().decode().strip() == f"got-{name}"
    assert proc.wait(timeout=30) == 0


@root
def test_job_killed_by_forwarded_sigterm_reports_143(cage_config):
    proc = start_run(cage_config, ["--grace", "30"], "echo ready; sleep 1000 & wait")
    assert ready(proc) == "ready"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 143


# -- list, stats, kill -----------------------------------------------------------------


@root
def test_list_stats_and_kill_a_cage_owned_by_another_process(cage_config):
    proc = start_run(
        cage_config,
        ["--job-id", "obs.1", "--memory", "128M"],
        "sleep 1000 & echo ready; wait",
    )
    try:
        assert ready(proc) == "ready"
        cages = list_json(cage_config)
        cage = cages["obs.1"]
        assert cage["owner_pid"] == proc.pid and cage["owner_alive"]
        assert cage["status"] == "running" and cage["processes"] == 2
        assert cage["age_seconds"] >= 0 and cage["address"] is None

        status, out, _ = run_main(["list", *config_args(cage_config)])
        assert status == 0 and "obs.1" in out and "running" in out

        status, out, err = run_main(["stats", "obs.1", "--json", *config_args(cage_config)])
        assert status == 0, err
        usage = json.loads(out)
        assert usage["memory_limit_bytes"] == 128 << 20
        assert usage["memory_peak_bytes"] > 0 and usage["wall_seconds"] >= 0

        done = subprocess.run(
            [JOBCAGE, "kill", "obs.1"], env=config_env(cage_config), capture_output=True
        )
        assert done.returncode == 0, done.stderr
        assert b"killed 2 process(es)" in done.stdout
        # The owner's wait returns; it finishes the teardown itself.
        assert proc.wait(timeout=30) == 137
        assert list_json(cage_config) == {}
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@root
def test_kill_of_unknown_cage_exits_3(cage_config):
    status, _, err = run_main(["kill", "ghost.1", *config_args(cage_config)])
    assert status == 3 and "no cage for job ghost.1" in err


# -- doctor ----------------------------------------------------------------------------


@root
def test_doctor_reports_every_check_and_is_ready_here(cage_config):
    status, out, err = run_main(["doctor", "--json", *config_args(cage_config)])
    checks = [json.loads(line) for line in out.splitlines()]
    names = {c["name"] for c in checks}
    for expected in (
        "root",
        "cgroup version",
        "cgroup freezer",
        "cgroup memory",
        "cgroup kill",
        "swap accounting",
        "state dir",
        "network namespaces",
        "veth",
        "iptables",
        "forwarding",
        "uplink",
        "address pool",
    ):
        assert expected in names, f"missing check {expected}: {sorted(names)}"
    failed = [c for c in checks if c["status"] == "FAIL"]
    assert status == (1 if failed else 0), err
    assert all(c["message"] for c in checks)


def test_doctor_fails_when_not_root_and_says_so(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    status, out, _ = run_main(["doctor", "--no-network", "--state-dir", str(tmp_path)])
    assert status == 1
    assert "FAIL  root: not root" in out and "NOT ready" in out


@root
def test_doctor_fails_on_an_unwritable_state_dir(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    status, out, _ = run_main(["doctor", "--no-network", "--state-dir", str(blocker / "x")])
    assert status == 1 and "state dir" in out and "not a directory" in out


# -- leftovers -------------------------------------------------------------------------


@root
def test_no_process_of_a_finished_run_survives(cage_config):
    proc = start_run(cage_config, ["--job-id", "bg.1"], "sleep 1000 & echo $!")
    child = int(ready(proc))
    assert proc.wait(timeout=30) == 0
    assert wait_exit(child, 10) and not alive(child)
    assert StateStore(cage_config.state_dir).records() == []

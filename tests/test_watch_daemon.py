"""`jobcage watch` as administrators run it: a foreground process, its JSON lines, its
signals, and its Prometheus metrics scraped over HTTP on 127.0.0.1 (an ephemeral port).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from jobcage import JobCage

from .conftest import unique

pytestmark = pytest.mark.root


class Daemon:
    """`jobcage watch` in a child process; lines are read as it writes them."""

    def __init__(self, config, tmp_path, *extra: str) -> None:
        self.config_file = tmp_path / "jobcage.toml"
        self.config_file.write_text('watch_metrics_address = "127.0.0.1:0"\n')
        argv = [
            sys.executable,
            "-m",
            "jobcage.cli",
            "watch",
            "--config",
            str(self.config_file),
            "--state-dir",
            config.state_dir,
            "--cgroup-parent",
            config.cgroup_parent,
            *extra,
        ]
        self.proc = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )

    def until(self, predicate, limit: int = 10000) -> dict:
        """The first line ``predicate`` accepts (each line is read as the daemon writes it)."""
        for _ in range(limit):
            line = self.proc.stdout.readline()
            if not line:
                raise AssertionError(f"daemon ended: {self.proc.stderr.read()}")
            rec = json.loads(line)
            if predicate(rec):
                return rec
        raise AssertionError("no such line")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=30)


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_daemon_lines_signals_and_metrics_match_usage(cage_config, tmp_path):
    daemon = Daemon(cage_config, tmp_path)
    try:
        start = daemon.until(lambda r: r["type"] == "start")
        host, port = start["metrics"].rsplit(":", 1)
        assert host == "127.0.0.1" and int(port) > 0
        job_id = unique("d")
        with JobCage(job_id, config=cage_config) as cage:
            daemon.until(lambda r: r["type"] == "watch" and r["job_id"] == job_id)
            # Started after the daemon found the cage: its first exec is seen as well.
            proc = cage.spawn(
                ["/bin/sh", "-c", "read x; /bin/sleep 600 & read x"],
                stdin=subprocess.PIPE,
            )
            proc.stdin.write(b"go\n")
            proc.stdin.flush()
            # The shell's own exec is seen too where a sweep found the job between its
            # joining the cage and its exec (the v2 VM run, under emulation): the
            # shell's child's exec is the one asked for.
            ran = daemon.until(
                lambda r: (
                    r["type"] == "event"
                    and r["kind"] == "exec"
                    and r["job_id"] == job_id
                    and r.get("ppid") == proc.pid
                )
            )
            # exe is read from /proc after the event: a program alive long enough has it
            assert ran["exe"] == "/usr/bin/sleep"
            assert {"pid", "uid", "comm", "time"} <= ran.keys()

            metrics = scrape(int(port))
            usage = cage.usage()
            job = (("job_id", job_id),)
            assert metrics[("jobcage_cage_processes", job)] == len(cage.pids()) == 2
            assert metrics[("jobcage_cage_memory_peak_bytes", job)] == usage.memory_peak_bytes
            for mode in ("user", "system"):
                got = metrics[("jobcage_cage_cpu_seconds_total", (*job, ("mode", mode)))]
                want = getattr(usage, f"cpu_{mode}_seconds")
                assert got == pytest.approx(want, abs=0.02)  # idle processes: no CPU since
            assert metrics[("jobcage_cage_memory_bytes", job)] > 0
            assert not [k for k in metrics if k[0].startswith("jobcage_cage_network")]
            assert metrics[("jobcage_watch_events_total", ())] > 0
            assert ("jobcage_watch_detections_total", (("kind", "escape"),)) in metrics
            assert metrics[("jobcage_watch_events_lost_total", ())] >= 0

            daemon.config_file.write_text('watch_escape_action = "maybe"\n')
            daemon.proc.send_signal(signal.SIGHUP)
            refused = daemon.until(lambda r: r["type"] == "error")
            assert "watch_escape_action = 'maybe'" in refused["error"]
            daemon.config_file.write_text('watch_escape_action = "log"\n')
            daemon.proc.send_signal(signal.SIGHUP)
            daemon.until(lambda r: r["type"] == "reload")
            proc.stdin.close()
            proc.wait()
        summary = daemon.until(lambda r: r["type"] == "summary" and r["job_id"] == job_id)
        # exact, unless the loaded machine dropped an event, which the summary then says
        assert summary["events_lost"] > 0 or (
            summary["processes_started"] == 2 and summary["execs"] == 2
        )
    finally:
        code = daemon.stop()
    assert code == 0
    assert daemon.until(lambda r: r["type"] == "stop")


def test_daemon_refuses_a_bad_value_with_one_line(cage_config, tmp_path):
    daemon = Daemon(cage_config, tmp_path, "--set", "watch_sweep_seconds=-1")
    assert daemon.proc.wait(timeout=30) == 2
    err = daemon.proc.stderr.read().strip().splitlines()
    assert len(err) == 1 and "watch_sweep_seconds" in err[0], err
    assert daemon.proc.stdout.read() == ""


def test_run_watch_puts_the_watcher_fields_in_the_record(cage_config):
    from .cli_support import JOBCAGE, config_env

    done = subprocess.run(
        [JOBCAGE, "run", "--watch", "--usage-file", "-", "--", "/bin/sh", "-c", "true & wait"],
        env=config_env(cage_config),
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    usage = json.loads(done.stdout)["usage"]
    assert usage["events_lost"] > 0 or usage["processes_started"] == 2  # sh, its subshell
    assert usage["execs"] >= 1 and usage["detections"] == []


def test_cli_registers_watch():
    from jobcage.cli import build_parser

    args = build_parser().parse_args(["watch", "--police-pid", str(os.getpid())])
    assert args.police_pid == [os.getpid()]

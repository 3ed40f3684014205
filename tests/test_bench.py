"""tools/bench --quick runs and writes well-formed output (figures are not asserted)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.root
def test_bench_quick_writes_json_and_markdown(tmp_path):
    out_json, out_md = tmp_path / "bench.json", tmp_path / "bench.md"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "tools.benchmarks",
            "--quick",
            "--only",
            "lifecycle",
            "--only",
            "kill",
            "--json",
            str(out_json),
            "--markdown",
            str(out_md),
        ],
        cwd=ROOT,
        check=True,
        stdout=subprocess.DEVNULL,
    )
    result = json.loads(out_json.read_text())
    assert result["quick"] is True and result["machine"]["cores"] >= 1
    life = result["lifecycle"]["cgroup_only"]
    for name in ("jobcage", "floor", "recipe"):
        assert life[name]["median_ms"] > 0 and life[name]["p95_ms"] >= life[name]["median_ms"]
    assert life["jobcage_vs_floor"] > 0
    storm = result["kill"]["100"]
    assert storm["jobcage"]["median_ms"] > 0 and storm["naive_passes"][0] >= 1
    text = out_md.read_text()
    assert "| JobCage |" in text and "fork storm" in text

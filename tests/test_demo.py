"""The README's promise: tools/demo runs a real networked job and prints its record."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.root
@pytest.mark.network
def test_demo_prints_the_lan_wan_table_and_the_json_record():
    out = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tools", "demo.py")],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    assert "LAN in 1.0 MiB" in out and "WAN in 2.0 MiB" in out
    record = json.loads(out.strip().splitlines()[-1])
    assert record["net_lan_rx_bytes"] >= 1 << 20 and record["net_wan_rx_bytes"] >= 2 << 20
    assert record["processes_surviving"] == 0

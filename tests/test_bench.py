"""``trackstream bench`` end to end on a small run: it starts its own Redis, prints
the three loops' rates with their ratios, and the runtime beats the minimal raw loop
(the target is 0.8 x; it measures about 4x on the development machine)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

TRACKSTREAM = str(Path(sys.executable).parent / "trackstream")


def test_bench_prints_rates_and_meets_its_target(tmp_path):
    done = subprocess.run(
        [TRACKSTREAM, "bench", "--messages", "2000", "--rounds", "1"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env={"COLUMNS": "120", "PATH": "/usr/local/bin:/usr/bin:/bin"},
    )
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    rates = {
        m.group(1): float(m.group(2).replace(",", ""))
        for m in re.finditer(r"│ (raw|raw-pipelined|runtime)\s+│\s+[\d.]+ │\s+([\d,]+) │", out)
    }
    assert set(rates) == {"raw", "raw-pipelined", "runtime"}, out
    assert rates["runtime"] >= 0.8 * rates["raw"], out
    assert re.search(r"runtime / raw = [\d.]+ \(target >= 0\.80\): OK", out), out

"""``trackstream bench`` end to end on small runs.

The pass-through bench starts its own Redis and prints the three loops' rates with
their ratios against the batched raw loop. ``--pipeline`` runs the real stage workers
as processes on the test servers: the JSON has every phase, and the counts add up
(no timing assertions: the machine is shared)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

TRACKSTREAM = str(Path(sys.executable).parent / "trackstream")
ENV = {"COLUMNS": "160", "PATH": "/usr/local/bin:/usr/bin:/bin"}


def test_bench_prints_rates_against_the_batched_raw_loop(tmp_path):
    done = subprocess.run(
        [
            *(TRACKSTREAM, "bench", "--messages", "3000", "--rounds", "1"),
            *("--min-ratio", "0.05", "--json", "b.json"),
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env=ENV,
    )
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    rates = {
        m.group(1): float(m.group(2).replace(",", ""))
        for m in re.finditer(r"│ (raw-batched|raw|runtime)\s+│\s+[\d.]+ │\s+([\d,]+) │", out)
    }
    assert set(rates) == {"raw-batched", "raw", "runtime"}, out
    # a short run is mostly start-up: only a loose floor, against the minimal loop
    assert rates["runtime"] >= 0.5 * rates["raw"], out
    assert re.search(r"runtime / raw-batched = [\d.]+ \(floor 0\.05\): OK", out), out
    data = json.loads((tmp_path / "b.json").read_text())
    assert set(data["loops"]) == {"raw-batched", "raw", "runtime"}
    ratio = (
        data["loops"]["runtime"]["messages_per_s"] / data["loops"]["raw-batched"]["messages_per_s"]
    )
    assert abs(data["runtime_vs_raw_batched"] - ratio) < 1e-9


@pytest.mark.timeout(240)
def test_pipeline_bench_runs_every_phase_and_its_counts_add_up(tmp_path, redis_server, pg_url):
    trackers = 130  # three fetch requests: 64 + 64 + 2
    done = subprocess.run(
        [
            TRACKSTREAM, "--redis-url", redis_server.url, "--database-url", pg_url,
            "bench", "--pipeline", "--trackers", str(trackers), "--history", "1",
            "--workers", "1", "--messages", "500", "--max-phase-s", "90", "--json", "p.json",
        ],
        cwd=tmp_path, capture_output=True, text=True, timeout=230, env=ENV,
    )  # fmt: skip
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    assert "end to end" in out and "reports/s" in out, out
    assert "\u2026" not in done.stdout, done.stdout  # piped: no cell cut to 80 columns
    for header in ("workers", "phase", "view-refresh", "postgres", "worker RSS MB"):
        assert header in done.stdout, done.stdout
    data = json.loads((tmp_path / "p.json").read_text())
    assert data["config"]["workers_per_stage"] == [1]
    assert data["runtime"]["messages"] == 500 and data["runtime"]["runtime_per_s"] > 0
    [run] = data["runs"]
    alone, e2e = run["alone"], run["end_to_end"]
    assert list(alone) == ["fetch", "geocode", "geofence"]
    # every tracker's latest report at least (more if a report came due meanwhile)
    n = alone["fetch"]["reports"]
    assert n >= trackers
    for stage, phase in alone.items():
        assert phase["complete"], (stage, phase)
        assert phase["reports"] == n, (stage, phase)  # each stage handled them all
        assert 0 < phase["measured_reports"] <= n  # after the first ones through
        assert phase["reports_per_s"] > 0 and phase["seconds"] > 0
        assert set(phase["cpu_ms_per_report"]) == {stage, "redis", "postgres", "total"}
        assert phase["cpu_ms_per_report"]["postgres"] is not None  # the local postmaster
        assert 0 < phase["rss_mb_peak"][stage] < 2000
    assert alone["fetch"]["counts"] == {"trackers": trackers, "fetch_requests": 3}
    # stored, geocoded and checked: each new report once
    assert alone["geofence"]["counts"] == dict.fromkeys(
        ("fetched", "geocoded", "geofence_checked"), n
    )
    m = e2e["reports"]
    assert e2e["complete"] and m >= trackers
    assert e2e["counts"] == {
        "trackers": trackers,
        "fetch_requests": 3,
        "fetched": m,
        "geocoded": m,
        "geofence_checked": m,
    }
    per = e2e["cpu_ms_per_report"]
    stages = ("fetch", "geocode", "geofence", "view-refresh")
    assert set(per) == {*stages, "redis", "postgres", "total"}
    # a stage done before the measured window began has no figure (None)
    total = sum(per[k] or 0 for k in (*stages, "redis", "postgres"))
    assert abs(per["total"] - total) < 1e-3
    assert set(e2e["rss_mb_peak"]) == set(stages)

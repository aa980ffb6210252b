"""The pipeline commands: db upgrade, seed (and its errors), fetch-now's priority lane,
a worker process stopped with SIGTERM, configuration errors, and the demo."""

from __future__ import annotations

import copy
import json
import os
import re
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from sqlalchemy import func, select
from typer.testing import CliRunner

from ops.cli import app
from processors.topology import FETCH, GEOCODE
from schemas.tables import Geofence, Tracker
from tests import readme_samples
from tests.pipeline_support import Harness
from tests.servers import free_port
from tests.support import FAST, wait_for

ROOT = Path(__file__).resolve().parent.parent
TRACKSTREAM = str(Path(sys.executable).parent / "trackstream")
runner = CliRunner()

BOW_TIE = {
    "type": "FeatureCollection",
    "features": [
        {
            "type": "Feature",
            "properties": {"name": "fine", "radius_m": 300},
            "geometry": {"type": "Point", "coordinates": [4.40, 51.90]},
        },
        {
            "type": "Feature",
            "properties": {"name": "bow tie"},
            "geometry": {
                "type": "Polygon",
                "coordinates": [[[0, 0], [1, 1], [1, 0], [0, 1], [0, 0]]],
            },
        },
    ],
}


def cli(*args: str, db: str | None = None, env: dict[str, str] | None = None):
    base = ["--database-url", db] if db else []
    return runner.invoke(app, [*base, *args], env=env, catch_exceptions=False)


def count(db_url: str, model) -> int:
    from processors.database import Database

    db = Database(db_url)
    try:
        return db.run_sync(lambda s: s.scalar(select(func.count()).select_from(model)))
    finally:
        db.dispose()


def test_db_upgrade_and_seed_with_clear_errors(db_url, tmp_path):
    assert cli("db", "upgrade", db=db_url).exit_code == 0
    assert cli("db", "upgrade", db=db_url).exit_code == 0  # again: nothing to do

    good = tmp_path / "trackers.csv"
    good.write_text(
        "external_id,name,run_starts_at,run_ends_at,active\n"
        "A1,first,2026-01-01T00:00:00Z,,true\nA2,second,,,false\n"
    )
    result = cli("seed", "--trackers", str(good), db=db_url)
    assert result.exit_code == 0, result.output
    assert count(db_url, Tracker) == 2

    for text, expected in [
        ("external_id\nC1\nC2\nC1\n", "external_id 'C1' is already on line 2"),
        (
            "external_id,run_starts_at,run_ends_at\nC3,2026-02-01T00:00:00Z,2026-01-01T00:00:00Z\n",
            "would never be fetched",
        ),
    ]:
        wrong = tmp_path / "wrong.csv"
        wrong.write_text(text)
        result = cli("seed", "--trackers", str(wrong), db=db_url)
        assert result.exit_code == 2 and expected in " ".join(result.output.split())
        assert count(db_url, Tracker) == 2

    bad = tmp_path / "bad.csv"
    bad.write_text("external_id,run_starts_at\nB1,yesterday\n")
    result = cli("seed", "--trackers", str(bad), db=db_url)
    assert result.exit_code == 2
    assert "bad.csv:2" in result.output and "ISO-8601" in result.output
    assert count(db_url, Tracker) == 2

    fences = tmp_path / "fences.geojson"
    collection = copy.deepcopy(BOW_TIE)  # parametrized: each database gets its own copy
    fences.write_text(json.dumps(collection))
    result = cli("seed", "--geofences", str(fences), db=db_url)
    assert result.exit_code == 2
    assert "bow tie" in result.output and "Self-intersection" in result.output
    assert count(db_url, Geofence) == 0, "nothing from a file with a bad feature is written"

    collection["features"].pop()
    fences.write_text(json.dumps(collection))
    assert cli("seed", "--geofences", str(fences), db=db_url).exit_code == 0
    assert count(db_url, Geofence) == 1


def test_polygons_across_the_antimeridian_must_be_split(tmp_path):
    db_url = f"sqlite:///{tmp_path}/am.db"
    assert cli("db", "upgrade", db=db_url).exit_code == 0
    unsplit = [[179.5, -17], [-179.5, -17], [-179.5, -16], [179.5, -16], [179.5, -17]]
    feature = {
        "type": "Feature",
        "properties": {"name": "Fiji"},
        "geometry": {"type": "Polygon", "coordinates": [unsplit]},
    }
    fences = tmp_path / "fiji.geojson"
    fences.write_text(json.dumps({"type": "FeatureCollection", "features": [feature]}))
    result = cli("seed", "--geofences", str(fences), db=db_url)
    assert result.exit_code == 2
    assert "crosses the antimeridian" in result.output and "MultiPolygon" in result.output
    result = cli("geofence", "add", "Fiji", "--geojson", json.dumps(feature["geometry"]), db=db_url)
    assert result.exit_code == 2 and "crosses the antimeridian" in result.output
    assert count(db_url, Geofence) == 0

    east = [[179.5, -17], [180, -17], [180, -16], [179.5, -16], [179.5, -17]]
    west = [[-180, -17], [-179.5, -17], [-179.5, -16], [-180, -16], [-180, -17]]
    split = {"type": "MultiPolygon", "coordinates": [[east], [west]]}
    result = cli("geofence", "add", "Fiji", "--geojson", json.dumps(split), db=db_url)
    assert result.exit_code == 0, result.output
    result = cli("geofence", "add", "Suva", "--circle", "-18.14,178.44,900", db=db_url)
    assert result.exit_code == 0, result.output
    assert "LAT,LON,RADIUS_M" in cli("geofence", "add", "x", "--circle", "1,2", db=db_url).output
    assert count(db_url, Geofence) == 2


def test_database_errors_are_one_line_with_a_documented_exit_code(pg_server):
    dead = f"postgresql+psycopg://postgres:secret@127.0.0.1:{free_port()}/x"
    result = cli("db", "upgrade", db=dead)
    assert result.exit_code == 3, result.output
    text = " ".join(result.output.split())
    assert "is unavailable" in text and "Connection refused" in text
    assert "Traceback" not in text and text.count("error:") == 1
    assert "secret" not in text and "postgres:***@127.0.0.1" in text

    missing = pg_server.url_for("no_such_database")
    result = cli("db", "upgrade", db=missing)
    assert result.exit_code == 2, result.output
    assert "database_url" in result.output and "does not exist" in " ".join(result.output.split())

    result = cli("db", "upgrade", db="mysql://u@h/d")
    assert result.exit_code == 2, result.output
    assert "setting database_url (TRACKSTREAM_DATABASE_URL)" in result.output


def test_db_upgrade_says_what_it_did_and_version_is_shown(tmp_path):
    url = f"sqlite:///{tmp_path}/fresh.db"
    first = cli("db", "upgrade", db=url)
    assert first.exit_code == 0, first.output
    assert "upgraded from an empty database to" in " ".join(first.output.split())
    again = cli("db", "upgrade", db=url)
    assert "already at" in " ".join(again.output.split())
    version = cli("--version")
    assert version.exit_code == 0 and re.fullmatch(
        r"trackstream \d+\.\d+\.\d+\S*\n", version.output
    )


async def test_fetch_now_jumps_the_queue(standalone_target, unique_prefix, tmp_path):
    db_url = f"sqlite:///{tmp_path}/now.db"
    # one at a time: the lane is read first; with several in flight, which one reaches
    # the source first depends on the fetch-time re-validation's database round trip
    h = Harness(standalone_target, unique_prefix, db_url, trackers=256, batch_size=1, concurrency=1)
    try:
        batches = await h.scheduler.tick()
        assert len(batches) == 4
        urgent = batches[-1].tracker_ids[-1]
        result = await _invoke_async(
            "--redis-url",
            h.streams.redis_url,
            "--prefix",
            h.streams.prefix,
            "--database-url",
            db_url,
            "fetch-now",
            urgent,
        )
        assert result.exit_code == 0, result.output
        assert "1 priority batch" in result.output
        unknown = await _invoke_async(
            "--redis-url",
            h.streams.redis_url,
            "--prefix",
            h.streams.prefix,
            "--database-url",
            db_url,
            "fetch-now",
            "NOPE-1",
        )
        assert unknown.exit_code == 2 and "unknown tracker(s): NOPE-1" in unknown.output

        h.clock.advance(minutes=10)
        await h.drain([FETCH])
        first = h.recording.returned[0]
        assert first.tracker_id == urgent, "the priority lane is served first"
        assert {f.tracker_id for f in h.recording.returned} >= {urgent}
    finally:
        await h.aclose()


async def _invoke_async(*args: str):
    import asyncio

    return await asyncio.to_thread(runner.invoke, app, list(args), catch_exceptions=False)


def _env(redis_url: str, prefix: str, db_url: str, **more: object) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRACKSTREAM_")}
    values = {**FAST, "redis_url": redis_url, "prefix": prefix, "database_url": db_url, **more}
    env.update({f"TRACKSTREAM_{k.upper()}": str(v) for k, v in values.items()})
    return env


async def test_worker_process_handles_then_stops_cleanly_on_sigterm(
    standalone_target, unique_prefix, tmp_path
):
    db_url = f"sqlite:///{tmp_path}/w.db"
    h = Harness(standalone_target, unique_prefix, db_url, trackers=4)
    try:
        await h.scheduler.tick()
        await h.drain([FETCH])
        keys = h.keys(GEOCODE)
        total = await h.client.xlen(keys.stream)
        assert total > 0
        log = tmp_path / "worker.log"
        metrics_port = free_port()
        env = _env(h.streams.redis_url, h.streams.prefix, db_url, metrics_port=metrics_port)
        with log.open("w") as stderr:
            proc = subprocess.Popen(
                [TRACKSTREAM, "worker", GEOCODE, "--consumer", "cli-1"],
                env=env,
                cwd=tmp_path,
                stderr=stderr,
            )
        try:

            async def geocoded() -> bool:
                assert proc.poll() is None, log.read_text()
                return all(r.geocoded_at for r in h.reports())

            await wait_for(geocoded, 60, "the worker process to geocode every report")

            def processed() -> float:
                url = f"http://127.0.0.1:{metrics_port}/metrics"
                with urllib.request.urlopen(url, timeout=5) as reply:
                    text = reply.read().decode()
                line = 'trackstream_messages_processed_total{stage="geocode"} '
                return sum(float(x.split()[-1]) for x in text.splitlines() if x.startswith(line))

            await wait_for(lambda: processed() == total, 20, "its metrics to count every entry")
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(20) == 0
            started = f"geocode: consumer cli-1 started (pid {proc.pid}), reading"
            assert started in log.read_text(), "a worker says that it started"
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
        assert (await h.client.xpending(keys.stream, keys.group))["pending"] == 0
        assert await h.client.xinfo_consumers(keys.stream, keys.group) == []
        # it published downstream before acking
        assert await h.client.xlen(h.keys("geofence").stream) == total
    finally:
        await h.aclose()


def test_bad_settings_and_arguments_are_named(tmp_path):
    result = runner.invoke(app, ["scheduler", "--once"], env={"TRACKSTREAM_BLOCK_MS": "0"})
    assert result.exit_code == 2
    assert "block_ms (TRACKSTREAM_BLOCK_MS)" in result.output

    result = runner.invoke(app, ["worker", "nosuchstage"])
    assert result.exit_code == 2
    assert "unknown stage 'nosuchstage'" in result.output
    assert "Usage:" in result.output

    result = runner.invoke(app, ["worker", "fetch", "--concurrency", "0"])
    assert result.exit_code == 2 and "--concurrency" in result.output


@pytest.mark.slow
def test_demo_runs_the_whole_pipeline_and_stops_what_it_started(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRACKSTREAM_")}
    env["COLUMNS"] = "120"
    done = subprocess.run(
        [TRACKSTREAM, "demo", "--trackers", "60", "--duration", "8"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-3000:]
    started = re.search(r"started (\w+-server) on 127\.0\.0\.1:\d+ \(pid (\d+)\)", out)
    name, pid = started.group(1), int(started.group(2))  # valkey-server without redis-server
    assert f"stopped {name}" in out
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert "drained" in out
    fetched = int(re.search(r"reports fetched\s+│?\s*([\d,]+)", out).group(1).replace(",", ""))
    assert fetched >= 60
    assert (tmp_path / ".trackstream" / "demo.db").exists()
    # the README's sample is what demo prints (on a machine with a redis-server)
    readme_samples.check("demo", done.stdout.replace("valkey-server", "redis-server"))

"""``trackstream trackers`` and ``trackstream trace`` against a real database and Redis."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta

from typer.testing import CliRunner

from ops.cli import app
from ops.commands.trackers import local_time
from processors.database import Database
from processors.topology import FETCH, GEOCODE, GEOFENCE, VIEW_REFRESH
from schemas import tracker_store
from schemas.db import upgrade
from schemas.tables import LocationReport
from tests import readme_samples
from tests.pipeline_support import Harness

runner = CliRunner()


def cli(*args: str):
    return runner.invoke(app, list(args), catch_exceptions=False)


async def acli(*args: str):
    return await asyncio.to_thread(cli, *args)


def _fleet(db_url: str, now: datetime) -> None:
    """Six trackers whose states are known by construction."""
    upgrade(db_url)
    day = timedelta(days=1)
    rows = [
        {"external_id": "A-FRESH", "run_starts_at": now - day},
        {"external_id": "B-LATE", "run_starts_at": now - day},
        {"external_id": "C-OLD", "run_starts_at": now - day},
        {"external_id": "D-OFF", "active": False},
        {"external_id": "E-ENDED", "run_starts_at": now - 3 * day, "run_ends_at": now - day},
        {"external_id": "F-NEVER"},
    ]
    fetched = {  # tracker -> (fetched this long ago, position)
        "A-FRESH": (timedelta(minutes=2), (51.5, 4.25)),
        "B-LATE": (timedelta(minutes=30), (51.6, 4.35)),
        "C-OLD": (timedelta(hours=13), (51.7, 4.45)),
        "D-OFF": (timedelta(hours=2), (51.8, 4.55)),
        "E-ENDED": (timedelta(days=2), (51.9, 4.65)),
    }
    db = Database(db_url)

    def write(session):
        tracker_store.upsert_trackers(session, rows)
        for tid, (ago, (lat, lon)) in fetched.items():
            at = now - ago
            session.add(
                LocationReport(
                    tracker_id=tid,
                    observed_at=at - timedelta(seconds=20),
                    lat=lat,
                    lon=lon,
                    source="test",
                    fetched_at=at,
                    time_zone="Europe/Amsterdam",
                )
            )
            # an older report too: the latest must win
            session.add(
                LocationReport(
                    tracker_id=tid,
                    observed_at=at - timedelta(days=5),
                    lat=0.0,
                    lon=0.0,
                    source="test",
                    fetched_at=at - timedelta(days=5),
                )
            )

    try:
        db.run_sync(write)
    finally:
        db.dispose()


def test_trackers_lists_states_and_the_freshness_distribution(tmp_path):
    db_url = f"sqlite:///{tmp_path}/fleet.db"
    now = datetime.now(UTC)
    _fleet(db_url, now)

    result = cli("--database-url", db_url, "trackers", "--json")
    assert result.exit_code == 0, result.output
    body = json.loads(result.output)
    states = {t["tracker_id"]: t["state"] for t in body["trackers"]}
    assert states == {
        "A-FRESH": "fresh",
        "B-LATE": "late",
        "C-OLD": "overdue",
        "D-OFF": "inactive",
        "E-ENDED": "out of run",
        "F-NEVER": "fresh",  # created just now: counts from creation
    }
    a = next(t for t in body["trackers"] if t["tracker_id"] == "A-FRESH")
    assert (a["lat"], a["lon"]) == (51.5, 4.25), "the latest report, not the older one"
    assert 100 < a["age_s"] < 200
    assert a["last_fix_at"].endswith("Z")
    assert a["time_zone"] == "Europe/Amsterdam"
    summary = body["summary"]
    assert summary["in_run"] == 4 and summary["within_guarantee"] == 3
    assert {b["label"]: b["count"] for b in summary["buckets"]} == {
        "< 1 h": 3,
        "1-3 h": 0,
        "3-6 h": 0,
        "6-12 h": 0,
        "> 12 h": 1,
    }

    table = cli("--database-url", db_url, "trackers")
    assert table.exit_code == 0, table.output
    readme_samples.check("trackers", table.output)
    assert "6 trackers (2 fresh, 1 late, 1 overdue, 1 out of run, 1 inactive)" in table.output
    assert "3 of 4 in run fetched within 12 h" in table.output
    assert "F-NEVER" in table.output and "51.500,4.250" in table.output
    local = local_time(a["last_fix_at"], "Europe/Amsterdam")  # beside UTC
    assert local[-4:] in (" CET", "CEST") and local in table.output
    assert max(len(ln) for ln in table.output.splitlines()[2:]) <= 80
    lines = table.output.splitlines()
    order = [ln.split()[0] for ln in lines if ln[:1] in "ABCDEF" and "-" in ln.split()[0]]
    assert order[0] == "E-ENDED" and order[1] == "C-OLD", "stalest first"
    only = cli("--database-url", db_url, "trackers", "--state", "late")
    assert [ln.split()[0] for ln in only.output.splitlines() if ln.startswith("B-")] == ["B-LATE"]
    assert "A-FRESH" not in only.output
    bad = cli("--database-url", db_url, "trackers", "--state", "stale")
    assert bad.exit_code == 2
    missing = cli("--database-url", f"sqlite:///{tmp_path}/none.db", "trackers")
    assert missing.exit_code == 2 and "no database at" in missing.output
    assert not (tmp_path / "none.db").exists()


def test_the_guarantee_is_max_tracker_age_s(tmp_path):
    """A guarantee of 20 minutes: the tracker fetched 30 minutes ago is overdue too."""
    db_url = f"sqlite:///{tmp_path}/fleet.db"
    _fleet(db_url, datetime.now(UTC))
    args = ["--database-url", db_url, "trackers"]
    env = {"TRACKSTREAM_MAX_TRACKER_AGE_S": "1200"}
    result = runner.invoke(app, [*args, "--json"], env=env, catch_exceptions=False)
    body = json.loads(result.output)
    overdue = {t["tracker_id"] for t in body["trackers"] if t["state"] == "overdue"}
    assert overdue == {"B-LATE", "C-OLD"}
    assert body["summary"]["within_guarantee"] == 2 and body["summary"]["guarantee_s"] == 1200
    table = runner.invoke(app, [*args, "--state", "overdue"], env=env, catch_exceptions=False)
    assert "2 of 4 in run fetched within 20 min" in table.output
    assert "B-LATE" in table.output and "A-FRESH" not in table.output


async def test_trace_follows_one_report_through_db_streams_and_dead_letters(
    standalone_target, unique_prefix, tmp_path
):
    db_url = f"sqlite:///{tmp_path}/trace.db"
    h = Harness(standalone_target, unique_prefix, db_url, trackers=5)  # a fixed clock
    try:
        await h.scheduler.tick()
        await h.drain()
        tracker = "SIM-00002"
        report = next(r for r in h.reports() if r.tracker_id == tracker)
        # a poison entry naming the tracker: dead-lettered by geocode (validation)
        await h.client.xadd(
            h.keys(GEOCODE).stream,
            {
                "type": "location.reported",
                "v": "1",
                "msg_id": "poison",
                "data": json.dumps({"tracker_id": tracker}),
            },
        )
        await h.drain([GEOCODE])
        base = ["--redis-url", h.streams.redis_url, "--prefix", unique_prefix]
        base += ["--database-url", db_url]
        result = await acli(*base, "trace", tracker, "--json")
        assert result.exit_code == 0, result.output
        body = json.loads(result.output)
        r = body["report"]
        assert r["observed_at"] == report.observed_at.isoformat().replace("+00:00", "Z")
        assert r["fetched_at"] and r["geocoded_at"] and r["geofence_checked_at"]
        stages = {e["stage"] for e in body["entries"]}
        assert stages >= {FETCH, GEOCODE, GEOFENCE, VIEW_REFRESH}, body["entries"]
        assert all(e["state"] == "done" for e in body["entries"])
        fetch_entry = next(e for e in body["entries"] if e["stage"] == FETCH)
        assert fetch_entry["type"] == "fetch.requested"
        (letter,) = body["dead_letters"]
        assert letter["stage"] == GEOCODE and letter["category"] == "validation"
        other = await acli(*base, "trace", "SIM-00003", "--json")
        assert json.loads(other.output)["dead_letters"] == []

        text = await acli(*base, "trace", tracker)
        assert text.exit_code == 0, text.output
        readme_samples.check("trace", text.output)
        assert f"{tracker} report observed" in text.output
        assert "geofence-checked" in text.output and "reconciler        0 re-send(s)" in text.output
        assert "dead letters (1):" in text.output and "validation" in text.output
        before = await acli(*base, "trace", tracker, "--at", "2000-01-01T00:00:00Z")
        assert before.exit_code == 0 and "no report stored" in before.output
        unknown = await acli(*base, "trace", "NOPE-1")
        assert unknown.exit_code == 2 and "no tracker 'NOPE-1'" in unknown.output
    finally:
        await h.aclose()


async def test_scheduler_and_reconciler_leave_their_last_tick_and_round(
    standalone_target, unique_prefix, tmp_path
):
    from ops import runstate
    from streams.connection import connect
    from streams.settings import StreamSettings

    db_url = f"sqlite:///{tmp_path}/ticks.db"
    upgrade(db_url)
    db = Database(db_url)
    try:
        db.run_sync(
            lambda s: tracker_store.upsert_trackers(
                s, [{"external_id": f"T-{i}"} for i in range(3)]
            )
        )
    finally:
        db.dispose()
    base = ["--redis-url", standalone_target.url, "--prefix", unique_prefix]
    base += ["--database-url", db_url]
    sched = await acli(*base, "scheduler", "--once")
    assert sched.exit_code == 0, sched.output
    rec = await acli(*base, "reconcile", "--once")
    assert rec.exit_code == 0, rec.output
    client = connect(StreamSettings.build(redis_url=standalone_target.url, prefix=unique_prefix))
    try:
        state = await runstate.read(client, unique_prefix)
    finally:
        await client.aclose()
    tick = state["scheduler"]["last_tick"]
    assert (tick["batches"], tick["trackers"]) == (1, 3)
    assert tick["next_ms"] - tick["at_ms"] == 30_000  # schedule_interval_s
    assert state["scheduler"]["leader"] is not None  # the lease outlives --once
    assert state["reconciler"]["geocode"] == 0 and state["reconciler"]["geofence"] == 0

    # a second scheduler while the first one's lease is held: it says who leads
    follower = await acli(*base, "scheduler", "--once")
    assert follower.exit_code == 0, follower.output
    assert "published 0 batches: another scheduler leads (" in follower.output
    leader = state["scheduler"]["leader"]
    assert f"{leader['host']} pid {leader['pid']}" in follower.output


def test_trace_shows_the_local_time_beside_utc() -> None:
    from ops.commands.trackers import trace_lines

    report = {
        "observed_at": "2026-07-01T12:00:00Z", "lat": 35.0, "lon": 139.0, "report_id": 7,
        "fetched_at": "2026-07-01T12:00:05Z", "source": "test", "geocoded_at": None,
        "city": None, "address": None, "geofence_checked_at": None, "events": [],
        "republish_count": 0, "republished_at": None, "time_zone": "Asia/Tokyo",
    }  # fmt: skip
    lines = trace_lines("T-1", report, {"entries": [], "dead_letters": []})
    assert "  local time        2026-07-01 21:00:00 JST (Asia/Tokyo)" in lines

def test_age_and_last_fetch_count_from_the_last_fetch_not_the_latest_report(tmp_path):
    """A fetch that returns nothing new moves trackers.last_fetched_at, not a report:
    B-LATE's latest report is 30 min old, but it was fetched a minute ago."""
    db_url = f"sqlite:///{tmp_path}/fleet.db"
    now = datetime.now(UTC)
    _fleet(db_url, now)
    fetched = now - timedelta(minutes=1)
    db = Database(db_url)
    try:
        db.run_sync(lambda s: _set_fetched(s, "B-LATE", fetched))
    finally:
        db.dispose()
    body = json.loads(cli("--database-url", db_url, "trackers", "--json").output)
    b = next(t for t in body["trackers"] if t["tracker_id"] == "B-LATE")
    assert b["state"] == "fresh" and 30 < b["age_s"] < 120
    assert b["last_fetch_at"] == fetched.isoformat(timespec="seconds").replace("+00:00", "Z")
    table = cli("--database-url", db_url, "trackers").output
    row = next(ln for ln in table.splitlines() if ln.startswith("B-LATE"))
    assert "fresh" in row and f"{fetched:%H:%M}" in row


def _set_fetched(session, tracker_id, at):
    from sqlalchemy import update

    from schemas.tables import Tracker

    session.execute(
        update(Tracker).where(Tracker.external_id == tracker_id).values(last_fetched_at=at)
    )


async def test_trace_shows_only_the_change_notice_of_this_report(standalone_target, unique_prefix):
    """views.changed names trackers, not reports: the notices of the tracker's older
    and newer reports are not this report's."""
    from ops.tracing import find_entries
    from processors import topology
    from streams.connection import connect
    from streams.settings import StreamSettings

    settings = StreamSettings.build(redis_url=standalone_target.url, prefix=unique_prefix)
    client = connect(settings)
    routes = topology.routes(unique_prefix)
    observed = datetime(2026, 12, 7, 12, 0, tzinfo=UTC)

    async def add(stage: str, kind: str, data: dict, ms: int) -> str:
        fields = {"type": kind, "data": json.dumps(data)}
        stream = routes[stage].keys().stream
        return (await client.xadd(stream, fields, id=f"{ms}-0")).decode()

    def notice() -> dict:
        return {"views": ["v"], "changed_at": "2026-12-07T12:00:00Z", "tracker_ids": ["T-1"]}

    try:
        base = 1_796_000_000_000
        await add(VIEW_REFRESH, "views.changed", notice(), base)  # an older report's
        geocoded = {"tracker_id": "T-1", "observed_at": observed.isoformat()}
        await add(GEOFENCE, "location.geocoded", geocoded, base + 1_000)
        own = await add(VIEW_REFRESH, "views.changed", notice(), base + 1_100)
        await add(VIEW_REFRESH, "views.changed", notice(), base + 60_000)  # a newer one's
        for stage in (GEOFENCE, VIEW_REFRESH):
            await client.xgroup_create(routes[stage].keys().stream, stage, id="0")
        found = await find_entries(client, unique_prefix, "T-1", observed_at=observed)
        notices = [e["id"] for e in found["entries"] if e["type"] == "views.changed"]
        assert notices == [own]
        # without a report: every notice naming the tracker
        every = await find_entries(client, unique_prefix, "T-1")
        assert len([e for e in every["entries"] if e["type"] == "views.changed"]) == 3
    finally:
        await client.aclose()


async def test_the_console_shows_each_trackers_location_api_trouble(tmp_path, standalone_target):
    """/api/trackers carries what `trackstream trackers` shows in its source column: a
    tracker the API answers with an error, late and rejected reports, and the totals."""
    import httpx

    from ops.dashboard.app import create_app
    from processors.config import AppSettings
    from schemas import source_store
    from streams.connection import connect
    from streams.settings import StreamSettings

    db_url = f"sqlite:///{tmp_path}/fleet.db"
    now = datetime.now(UTC)
    _fleet(db_url, now)
    db = Database(db_url)

    def trouble(session):
        error = source_store.TrackerErrorRow("B-LATE", "forbidden", "not yours", 600.0)
        source_store.record_errors(session, [error], now, 300.0)
        source_store.add_counts(session, {"A-FRESH": {"late_reports": 3}}, now)

    try:
        db.run_sync(trouble)
    finally:
        db.dispose()
    settings = StreamSettings.build(redis_url=standalone_target.url, prefix="console-src")
    client = connect(settings)
    app = create_app(settings, AppSettings.build(database_url=db_url), client=client)
    transport = httpx.ASGITransport(app=app)
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://console") as c:
            body = (await c.get("/api/trackers")).json()
    finally:
        await client.aclose()
    by_id = {t["tracker_id"]: t["source"] for t in body["trackers"]}
    assert by_id["B-LATE"]["error"] == "forbidden" and by_id["B-LATE"]["error_count"] == 1
    assert by_id["A-FRESH"]["late_reports"] == 3 and by_id["A-FRESH"]["error"] is None
    assert by_id["C-OLD"] is None
    assert body["source"]["trackers_in_error"] == {"forbidden": 1}
    assert body["source"]["late_reports"] == 3 and body["source"]["lateness_s"] == 3600

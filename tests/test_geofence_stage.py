"""The set-based geofence stage on both databases: events independent of delivery order,
batching, redelivery and late reports; a bad row fails alone; two workers with
overlapping trackers neither deadlock nor disagree."""

from __future__ import annotations

import json
import math
import random
import threading
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from sqlalchemy import text

from processors.crossings import Rules, StoredFix, evaluate_history
from processors.database import Database
from processors.geofencing import GeofenceIndex
from processors.stages.geofence import GeofenceStage, check_batch
from processors.topology import routes
from schemas import geofence_defs, report_store, tracker_store
from schemas.db import upgrade
from schemas.events import LocationGeocoded, LocationReported
from streams.message import Envelope, Message
from tests import store_support

T0 = datetime(2026, 3, 2, 8, 0, tzinfo=UTC)
NOW = T0 + timedelta(days=1)
RULES = Rules()
CENTRE = (51.9225, 4.47917)  # Rotterdam


def offset(lat: float, lon: float, north_m: float, east_m: float) -> tuple[float, float]:
    return (
        lat + math.degrees(north_m / 6_371_008.8),
        lon + math.degrees(east_m / (6_371_008.8 * math.cos(math.radians(lat)))),
    )


def reports_for(tracker: str, rng: random.Random, n: int = 16) -> list[LocationReported]:
    """Back and forth through the fences 1.5 km a report, with jitter, a (0, 0) fix and
    a 50 km jump thrown in."""
    out = []
    x, direction = rng.uniform(-2500, 2500), 1
    lane = rng.uniform(-300, 300)
    for k in range(n):
        x += direction * 1500
        if abs(x) > 3000:
            direction = -direction
        lat, lon = offset(*CENTRE, lane + rng.uniform(-20, 20), x)
        if k == 5:
            lat, lon = 0.0, 0.0
        if k == 9:
            lat, lon = offset(*CENTRE, 50_000, 0)
        out.append(
            LocationReported(
                tracker_id=tracker,
                observed_at=T0 + timedelta(minutes=5 * k, seconds=rng.randint(0, 59)),
                lat=lat,
                lon=lon,
                accuracy_m=round(rng.uniform(5, 25), 1),
                source="test",
                fetched_at=T0 + timedelta(minutes=5 * k + 2),
            )
        )
    return out


def geocoded(r: LocationReported) -> LocationGeocoded:
    return LocationGeocoded(
        tracker_id=r.tracker_id, observed_at=r.observed_at, lat=r.lat, lon=r.lon
    )


@pytest.fixture
def db(db_url: str):
    upgrade(db_url)
    database = Database(db_url)
    trackers = [f"T{i}" for i in range(6)]
    database.run_sync(tracker_store.upsert_trackers, [{"external_id": t} for t in trackers])
    database.run_sync(geofence_defs.add_geofence, "port", "circle", *CENTRE, 500.0)
    ring = [offset(*CENTRE, n, e) for n, e in ((-400, 900), (-400, 1700), (400, 1700), (400, 900))]
    coords = [[lon, lat] for lat, lon in ring]
    geometry = {"type": "Polygon", "coordinates": [[*coords, coords[0]]]}
    database.run_sync(geofence_defs.add_geofence, "quay", "polygon", geometry_geojson=geometry)
    yield database
    database.dispose()


def stored_events(db: Database) -> list[tuple[str, datetime, int, str]]:
    return [(t, o, g, k) for t, o, g, k in db.run_sync(store_support.events_for)]


def expected(db: Database, index: GeofenceIndex) -> list[tuple[str, datetime, int, str]]:
    by_tracker: dict[str, list[StoredFix]] = {}
    for t in sorted(
        {
            r[0]
            for r in db.run_sync(
                lambda s: s.execute(text("SELECT tracker_id FROM location_history")).all()
            )
        }
    ):
        by_tracker[t] = [
            StoredFix(r.observed_at, r.lat, r.lon, r.accuracy_m, r.fetched_at)
            for r in db.run_sync(store_support.reports_for, t)
        ]
    return sorted(
        (t, at, g, k)
        for t, fixes in by_tracker.items()
        for at, g, k in evaluate_history(index, RULES, fixes)
    )


def reset(db: Database) -> None:
    db.run_sync(lambda s: s.execute(text("DELETE FROM geofence_events")))
    db.run_sync(lambda s: s.execute(text("DELETE FROM location_history")))


@pytest.mark.timeout(90)
def test_events_do_not_depend_on_order_batches_redelivery_or_late_reports(db: Database) -> None:
    rng = random.Random(11)
    reports = [r for i in range(6) for r in reports_for(f"T{i}", rng)]
    index = GeofenceIndex(db.run_sync(geofence_defs.active_geofences))
    results = []
    for seed in range(4):
        reset(db)
        order = random.Random(seed)
        deliveries = reports + order.sample(reports, len(reports) // 4)
        order.shuffle(deliveries)
        i = 0
        while i < len(deliveries):  # stored just before it is delivered: late reports
            batch = deliveries[i : i + order.randint(1, 25)]
            i += len(batch)
            db.run_sync(report_store.insert_reports, batch)
            done = db.run_sync(check_batch, index, RULES, [geocoded(r) for r in batch], NOW)
            assert not done.failed
        results.append(stored_events(db))
    assert results[0] == expected(db, index)
    assert all(r == results[0] for r in results[1:])
    kinds = {(g, k) for _, _, g, k in results[0]}
    assert len(kinds) == 4, "both fences entered and left"
    statuses = db.run_sync(
        lambda s: s.execute(
            text("SELECT fix_status, count(*) FROM location_history GROUP BY 1")
        ).all()
    )
    assert dict(statuses) == {"ok": 6 * 14, "zero": 6, "speed": 6}


def test_one_batch_with_several_reports_of_a_tracker_out_of_order(
    db: Database, db_url: str
) -> None:
    rng = random.Random(3)
    reports = reports_for("T1", rng) + reports_for("T2", rng)
    db.run_sync(report_store.insert_reports, reports)
    index = GeofenceIndex(db.run_sync(geofence_defs.active_geofences))
    batch = [geocoded(r) for r in reports]
    rng.shuffle(batch)
    done = db.run_sync(check_batch, index, RULES, batch, NOW)
    assert not done.failed and done.rejected == {"zero": 2, "speed": 2}
    assert stored_events(db) == expected(db, index)
    assert sorted(done.new_events) == sorted((t, g, at, k) for t, at, g, k in stored_events(db))
    again = db.run_sync(check_batch, index, RULES, batch[:7], NOW)
    assert again.new_events == [] and not again.rejected, "a redelivery changes nothing"

    from typer.testing import CliRunner

    from ops.cli import app

    shown = CliRunner().invoke(app, ["--database-url", db_url, "geofence", "quality", "--json"])
    assert shown.exit_code == 0, shown.output
    counts = json.loads(shown.output)
    assert (counts["ok"], counts["zero"], counts["speed"], counts["unchecked"]) == (28, 2, 2, 0)


class _Ctx:
    def __init__(self) -> None:
        self.published: list[Any] = []

    def publish(self, route: Any, payload: Any, **_: Any) -> None:
        self.published.append(payload)


def _message(i: int, payload: LocationGeocoded) -> Message[LocationGeocoded]:
    env = Envelope("location.geocoded", 1, f"m{i}", 0, 0, None, payload)
    return Message("s", f"{i}-0", {}, 1, env)


async def test_a_batch_with_a_bad_row_fails_only_that_row(db: Database, db_url: str) -> None:
    """A tracker id with a NUL byte: PostgreSQL refuses the batch's statement, the stage
    checks each report again on its own (fresh transactions) and only that one fails;
    a report that is not stored fails alone too."""
    rng = random.Random(4)
    reports = reports_for("T3", rng, n=6)
    db.run_sync(report_store.insert_reports, reports)
    registry = CollectorRegistry()
    stage = GeofenceStage(db, routes("t"), lambda: NOW, RULES, registry)
    good = [geocoded(r) for r in reports]
    nul = good[0].model_copy(update={"tracker_id": "T3\x00evil"})
    missing = good[1].model_copy(update={"observed_at": T0 - timedelta(days=3)})
    msgs = [_message(i, p) for i, p in enumerate([*good[:3], nul, missing, *good[3:]])]
    ctx = _Ctx()
    failures = await stage.handle_batch(msgs, ctx)  # type: ignore[arg-type]
    assert set(failures or {}) == {"3-0", "4-0"}
    assert isinstance((failures or {})["4-0"], LookupError)
    checked = db.run_sync(
        lambda s: s.execute(
            text("SELECT count(*) FROM location_history WHERE geofence_checked_at IS NOT NULL")
        ).scalar()
    )
    assert checked == 6
    notices = [p for p in ctx.published if hasattr(p, "tracker_ids")]  # not the notify events
    assert len(notices) == 1 and notices[0].tracker_ids == ["T3"]
    rejected = "trackstream_fixes_rejected_total"
    assert registry.get_sample_value(rejected, {"reason": "zero"}) == 1  # report 5
    assert registry.get_sample_value(rejected, {"reason": "speed"}) == 0
    await stage.handle_batch(msgs[:4], ctx)  # type: ignore[arg-type]
    assert registry.get_sample_value(rejected, {"reason": "zero"}) == 1, "counted once"


@pytest.mark.timeout(90)
def test_two_workers_with_overlapping_trackers_agree_and_never_deadlock(db: Database) -> None:
    rng = random.Random(8)
    reports = [r for i in range(6) for r in reports_for(f"T{i}", rng, n=24)]
    db.run_sync(report_store.insert_reports, reports)
    index = GeofenceIndex(db.run_sync(geofence_defs.active_geofences))
    errors: list[BaseException] = []

    def worker(seed: int) -> None:
        order = random.Random(seed)
        mine = [geocoded(r) for r in reports]
        order.shuffle(mine)  # every tracker in both workers' batches, in other orders
        try:
            for i in range(0, len(mine), 20):
                db.run_sync(check_batch, index, RULES, mine[i : i + 20], NOW)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(s,)) for s in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads), "deadlocked"
    assert errors == []
    assert stored_events(db) == expected(db, index)
    one_worker = stored_events(db)
    reset(db)
    db.run_sync(report_store.insert_reports, reports)
    db.run_sync(check_batch, index, RULES, [geocoded(r) for r in reports], NOW)
    assert stored_events(db) == one_worker


async def test_a_large_batch_is_checked_in_parts_with_the_same_answers(db: Database) -> None:
    """A batch of 145 reports is checked as two concurrent transactions, each tracker's
    reports in one of them: the events are those of the whole history evaluated at
    once, and a bad row still fails alone (its part is checked again one by one)."""
    from processors.stages.geofence import MIN_PART, PARTS, _partition

    rng = random.Random(9)
    reports = [r for i in range(6) for r in reports_for(f"T{i}", rng, n=24)]
    db.run_sync(report_store.insert_reports, reports)
    payloads = [geocoded(r) for r in reports]
    rng.shuffle(payloads)
    nul = payloads[0].model_copy(update={"tracker_id": "T1\x00evil"})
    payloads.insert(70, nul)
    assert len(payloads) >= MIN_PART * PARTS
    parts = _partition(payloads, PARTS)
    assert len(parts) == 2 and sorted(i for p in parts for i in p) == list(range(145))
    owner = {payloads[i].tracker_id: n for n, p in enumerate(parts) for i in p}
    assert all(owner[payloads[i].tracker_id] == n for n, p in enumerate(parts) for i in p)
    assert abs(len(parts[0]) - len(parts[1])) <= 24, "whole trackers, about equal halves"

    stage = GeofenceStage(db, routes("t"), lambda: NOW, RULES, CollectorRegistry())
    ctx = _Ctx()
    msgs = [_message(i, p) for i, p in enumerate(payloads)]
    failures = await stage.handle_batch(msgs, ctx)  # type: ignore[arg-type]
    assert set(failures or {}) == {"70-0"}
    index = GeofenceIndex(db.run_sync(geofence_defs.active_geofences))
    assert stored_events(db) == expected(db, index)
    assert {(g, k) for _, _, g, k in stored_events(db)} >= {(1, "enter"), (1, "exit")}
    [notice] = [p for p in ctx.published if hasattr(p, "tracker_ids")]
    assert notice.tracker_ids == [f"T{i}" for i in range(6)]

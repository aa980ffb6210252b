"""The pipeline end to end on real Redis (standalone and cluster) and both databases:
everything the source returned is stored, geocoded and geofence-checked; geofence
events equal an independent computation; redelivery, shuffled order, bad input, lost
Redis work and broken views are all handled."""

from __future__ import annotations

import asyncio
import random
from datetime import timedelta
from itertools import pairwise

import orjson
import pytest
from sqlalchemy import text

from processors import topology
from processors.topology import FETCH, GEOCODE, GEOFENCE, VIEW_REFRESH
from schemas import geofence_defs, reconcile_store, views
from schemas.events import LocationGeocoded
from streams.deadletter import DeadLetters
from streams.monitor import stage_status
from streams.producer import Producer
from streams.replay import replay_copy
from tests import store_support
from tests.pipeline_support import Harness
from tests.support import wait_for

CYCLE_MIN = 60  # simulated minutes between scheduling rounds (12 reports per tracker)


async def run_cycles(h: Harness, n: int) -> None:
    for _ in range(n):
        await h.cycle(minutes=CYCLE_MIN)


def snapshot(h: Harness) -> tuple[list[tuple], list[tuple]]:
    reports = [
        (r.tracker_id, r.observed_at, r.lat, r.lon, r.city, r.geocoded_at is not None)
        for r in h.reports()
    ]
    return reports, h.events()


@pytest.fixture
async def harness(redis_target, unique_prefix, db_url):
    h = Harness(redis_target, unique_prefix, db_url, trackers=10)
    yield h
    await h.aclose()


async def test_end_to_end_everything_stored_geocoded_checked_and_events_correct(harness):
    h = harness
    await run_cycles(h, 6)

    stored = {(r.tracker_id, r.observed_at) for r in h.reports()}
    returned = {(f.tracker_id, f.observed_at) for f in h.recording.returned}
    assert len(returned) >= 10 * 4 * 12  # every tracker, several full fetches
    assert stored == returned
    assert all(r.geocoded_at is not None and r.city for r in h.reports())
    assert all(r.geofence_checked_at is not None for r in h.reports())

    events = h.events()
    assert events == h.expected_events()
    kinds = {e[3] for e in events}
    assert kinds == {"enter", "exit"}, "the fleet should both enter and leave geofences"

    # views reflect the latest data
    latest = dict(
        h.db.run_sync(
            lambda s: s.execute(text("SELECT tracker_id, observed_at FROM latest_location")).all()
        )
    )
    newest: dict[str, object] = {}
    for tracker, at in stored:
        newest[tracker] = max(at, newest.get(tracker, at))
    assert {t: _utc(a) for t, a in latest.items()} == newest
    assert h.pipeline.stage(VIEW_REFRESH).refreshes.get("geofence_occupancy", 0) >= 1
    inside = _occupancy_from_events(events)
    occupancy = h.db.run_sync(
        lambda s: s.execute(
            text("SELECT geofence_id, trackers_inside FROM geofence_occupancy")
        ).all()
    )
    assert {g: n for g, n in occupancy if n} == {g: n for g, n in inside.items() if n}

    for stage in topology.STAGES:
        assert await DeadLetters(h.client, h.keys(stage)).count() == 0


async def test_every_stage_handles_each_message_twice_without_duplicates(harness):
    h = harness
    for _ in range(3):  # ends right after a drain: a repeated fetch finds nothing new
        h.clock.advance(minutes=CYCLE_MIN)
        await h.scheduler.tick()
        await h.drain()
    before = snapshot(h)
    events_before = len(before[1])
    for stage in (FETCH, GEOCODE, GEOFENCE, VIEW_REFRESH):
        copied = await replay_copy(h.client, h.keys(stage), "-")
        assert copied.count > 0, stage
        await h.drain()
    after = snapshot(h)
    assert after == before
    assert events_before == len(h.expected_events())


@pytest.mark.parametrize("seed", [1, 2])
async def test_shuffled_and_repeated_delivery_gives_the_same_events(
    standalone_target, unique_prefix, tmp_path, seed
):
    h = Harness(standalone_target, unique_prefix, f"sqlite:///{tmp_path}/o.db", trackers=8)
    try:
        await run_cycles(h, 5)
        in_order = h.events()
        assert in_order and in_order == h.expected_events()

        # forget every geofence result, then deliver the reports shuffled, some twice
        h.db.run_sync(lambda s: s.execute(text("DELETE FROM geofence_events")))
        reports = h.reports()
        deliveries = reports + random.Random(seed).sample(reports, len(reports) // 3)
        random.Random(seed).shuffle(deliveries)
        geocoded = [LocationGeocoded.model_validate(r, from_attributes=True) for r in deliveries]
        producer = Producer(h.client, h.pipeline.codec)
        for i in range(0, len(geocoded), 37):  # several batches, interleaved trackers
            await producer.publish(h.pipeline.routes[GEOFENCE], geocoded[i : i + 37])
            await h.drain([GEOFENCE])
        assert h.events() == in_order
    finally:
        await h.aclose()


async def test_source_outage_opens_the_breaker_loses_nothing_and_resumes(
    standalone_target, unique_prefix, tmp_path
):
    """The location API goes down: the breaker opens, the fetch worker holds at its
    gate and defers what hit the open circuit; however many half-open trials fail,
    nothing is dead-lettered. When the API is back every request is fetched."""
    h = Harness(
        standalone_target,
        unique_prefix,
        f"sqlite:///{tmp_path}/outage.db",
        trackers=12,
        batch_trackers=2,
        breaker_failures=2,
    )
    states: list[str] = []
    h.breaker.add_listener(lambda old, new: states.append(str(new)))
    try:
        await h.cycle(minutes=30)
        h.fleet.outage(True)
        requests = await h.scheduler.tick()
        assert len(requests) == 6
        keys = h.keys(FETCH)
        worker = h.pipeline.worker(FETCH, consumer="through-the-outage")
        task = asyncio.create_task(worker.run())
        try:
            # opened, then at least two half-open trials failed and reopened it
            await wait_for(lambda: states.count("open") >= 3, 30, "failed half-open trials")
            assert await DeadLetters(h.client, keys).count() == 0
            rows = await h.client.xpending_range(keys.stream, keys.group, "-", "+", 100)
            # spent deliveries: Redis's count minus the recorded deferrals
            free = await h.client.hmget(
                keys.deferrals,
                [keys.deferral_field(keys.stream, r["message_id"].decode()) for r in rows],
            )
            spent = [r["times_delivered"] - int(f or 0) for r, f in zip(rows, free, strict=True)]
            assert all(n <= 2 for n in spent), (rows, free)
            before = len(h.recording.returned)
            h.fleet.outage(False)

            async def fetched_all() -> bool:
                st = await stage_status(h.client, keys)
                return st.lag == 0 and st.pending == 0

            await wait_for(fetched_all, 30, "every request fetched after the outage")
        finally:
            worker.stop()
            await asyncio.wait_for(task, 15)
        assert states[-1] == "closed"
        assert len(h.recording.returned) > before
        fetched = {f.tracker_id for f in h.recording.returned[before:]}
        assert fetched == {t for r in requests for t in r.tracker_ids}
        await h.drain()
        stored = {(r.tracker_id, r.observed_at) for r in h.reports()}
        assert stored == {(f.tracker_id, f.observed_at) for f in h.recording.returned}
        assert all(r.geocoded_at and r.geofence_checked_at for r in h.reports())
        assert h.events() == h.expected_events()
        for stage in topology.STAGES:
            assert await DeadLetters(h.client, h.keys(stage)).count() == 0, stage
    finally:
        await h.aclose()


async def test_malformed_events_are_dead_lettered_with_a_reason_and_flow_continues(
    redis_target, unique_prefix, tmp_path
):
    h = Harness(redis_target, unique_prefix, f"sqlite:///{tmp_path}/bad.db", trackers=4)
    try:
        for stage in topology.STAGES:
            stream = h.keys(stage).stream
            await h.client.xadd(stream, {"garbage": "yes"})
            # a well-formed envelope whose payload does not validate
            await h.client.xadd(
                stream,
                {
                    "type": "location.reported",
                    "v": "1",
                    "msg_id": "m1",
                    "produced": "1",
                    "attempt": "0",
                    "data": orjson.dumps({"tracker_id": "SIM-00001", "lat": 500}),
                },
            )
        await run_cycles(h, 2)
        for stage in topology.STAGES:
            letters = await DeadLetters(h.client, h.keys(stage)).list()
            assert len(letters) == 2, stage
            for letter in letters:
                assert letter.category in ("decode", "validation"), letter
                assert letter.error
        assert h.reports(), "good messages kept flowing past the bad ones"
        assert h.events() == h.expected_events()
    finally:
        await h.aclose()


async def test_reconciler_republishes_work_that_redis_lost(harness):
    h = harness
    await h.scheduler.tick()
    await h.drain([FETCH])
    stored = len(h.reports())
    assert stored
    # Redis loses the geocode stream (restart without persistence, a flush, ...)
    await h.client.delete(h.keys(GEOCODE).stream)
    await h.drain()
    assert all(r.geocoded_at is None for r in h.reports())

    done = await h.pipeline.reconciler().run_once()
    assert done.geocode == 0, "within the grace period nothing is re-sent"
    h.clock.advance(seconds=h.app.reconcile_grace_s + 1)
    done = await h.pipeline.reconciler().run_once()
    assert done.geocode == stored and not done.skipped
    await h.drain()
    assert all(r.geocoded_at and r.geofence_checked_at for r in h.reports())
    assert h.events() == h.expected_events()
    not_geocoded, not_checked = h.db.run_sync(
        store_support.incomplete_reports, h.clock() + timedelta(days=1), 1000
    )
    assert not not_geocoded and not not_checked


async def test_reconciler_leaves_a_stage_that_is_behind_alone(harness):
    """Reports queued behind a backlog are not lost: while geocode's oldest unfinished
    entry is older than the grace period, nothing is re-sent to it."""
    h = harness
    await h.scheduler.tick()
    await h.drain([FETCH])
    keys = h.keys(GEOCODE)
    await h.client.delete(keys.stream)  # the messages are gone ...
    await h.client.xadd(keys.stream, {"junk": "1"}, id="1-1")  # ... and this is ancient
    await h.client.xgroup_create(keys.stream, keys.group, id="0")
    h.clock.advance(seconds=h.app.reconcile_grace_s + 1)
    done = await h.pipeline.reconciler().run_once()
    assert (done.geocode, done.skipped) == (0, (GEOCODE,))
    await h.drain()  # the junk is dead-lettered: geocode has caught up
    done = await h.pipeline.reconciler().run_once()
    assert done.geocode == len(h.reports()) and not done.skipped
    await h.drain()
    assert all(r.geocoded_at and r.geofence_checked_at for r in h.reports())


async def test_reconciler_gives_up_on_poison_after_max_republish(
    standalone_target, unique_prefix, tmp_path
):
    """A report whose geocoding always fails is dead-lettered, re-sent by the reconciler
    reconcile_max_republish (3) times a grace period apart, then left to the operator."""
    h = Harness(
        standalone_target, unique_prefix, f"sqlite:///{tmp_path}/poison.db", trackers=3,
        batch_size=1, max_deliveries=2,
    )  # fmt: skip
    try:
        await h.scheduler.tick()
        await h.drain([FETCH])
        poison = h.reports()[0]
        stage = h.pipeline.stage(GEOCODE)
        real = stage.geocoder

        class Poisoned:
            async def reverse(self, points):
                if (poison.lat, poison.lon) in points:
                    raise ValueError("this point breaks the geocoder")
                return await real.reverse(points)

        stage.geocoder = Poisoned()
        await h.drain()
        letters = DeadLetters(h.client, h.keys(GEOCODE))
        assert await letters.count() == 1
        sent = []
        for _ in range(5):
            h.clock.advance(seconds=h.app.reconcile_grace_s + 1)
            sent.append((await h.pipeline.reconciler().run_once()).geocode)
            await h.drain()
        assert sent == [1, 1, 1, 0, 0]
        assert await letters.count() == 4
        assert h.db.run_sync(reconcile_store.count_abandoned, 3) == 1
        assert sum(1 for r in h.reports() if r.geocoded_at is None) == 1
    finally:
        await h.aclose()


async def test_view_refresh_recreates_a_dropped_view(standalone_target, unique_prefix, db_url):
    h = Harness(standalone_target, unique_prefix, db_url, trackers=4)
    try:
        await run_cycles(h, 1)
        h.db.run_sync(lambda s: s.execute(text("DROP TABLE latest_location")))
        assert views.view_health(h.db.engine, "latest_location") == "missing"
        await run_cycles(h, 1)
        stage = h.pipeline.stage(VIEW_REFRESH)
        assert stage.recreated.get("latest_location") == 1
        assert views.view_health(h.db.engine, "latest_location") == "ok"
        rows = h.db.run_sync(
            lambda s: s.execute(text("SELECT count(*) FROM latest_location")).scalar()
        )
        assert rows == 4
    finally:
        await h.aclose()


async def test_view_refresh_runs_at_most_once_per_interval(
    standalone_target, unique_prefix, tmp_path
):
    """Three waves of notices, each published as soon as the previous wave is acked:
    every wave is covered by exactly one refresh per view, refreshes of a view are at
    least the interval apart, and waiting spends no delivery."""
    import time

    from schemas.events import ViewsChanged
    from schemas.views import VIEW_NAMES

    interval_s = 0.5
    h = Harness(
        standalone_target,
        unique_prefix,
        f"sqlite:///{tmp_path}/views.db",
        trackers=4,
        view_refresh_interval_s=interval_s,
    )
    try:
        stage = h.pipeline.stage(VIEW_REFRESH)
        refreshed: dict[str, list[float]] = {v: [] for v in VIEW_NAMES}
        real_refresh = stage.refresh

        async def timed_refresh(view: str) -> None:
            refreshed[view].append(time.monotonic())
            await real_refresh(view)

        stage.refresh = timed_refresh
        worker = h.workers[VIEW_REFRESH]
        task = asyncio.create_task(worker.run())
        producer = Producer(h.client, h.pipeline.codec)
        notice = ViewsChanged(views=list(VIEW_NAMES), changed_at=h.clock())
        try:
            for wave in range(1, 4):
                await producer.publish(h.pipeline.routes[VIEW_REFRESH], [notice] * 5)
                await wait_for(lambda w=wave: worker.handled == 5 * w, 20, f"wave {wave} acked")
        finally:
            worker.stop()
            await asyncio.wait_for(task, 15)
        for view, times in refreshed.items():
            assert len(times) == 3, (view, times)
            gaps = [b - a for a, b in pairwise(times)]
            assert min(gaps) >= interval_s * 0.95, (view, gaps)
        deferred = h.registry.get_sample_value(
            "trackstream_messages_deferred_total", {"stage": VIEW_REFRESH}
        )
        assert deferred and deferred >= 10, "waves 2 and 3 waited for the interval"
        assert await DeadLetters(h.client, h.keys(VIEW_REFRESH)).count() == 0
    finally:
        await h.aclose()


async def test_geofence_changes_apply_without_a_restart(
    standalone_target, unique_prefix, tmp_path
):
    """While the same geofence stage keeps running: a fence added with ``seed`` (a copy
    of a busy one) gets exactly the copied fence's new events, and a fence deactivated
    with ``geofence deactivate`` gets none from then on."""
    import json

    from typer.testing import CliRunner

    from ops.cli import app

    db_url = f"sqlite:///{tmp_path}/fences.db"
    h = Harness(standalone_target, unique_prefix, db_url, trackers=30)
    try:
        await run_cycles(h, 3)
        by_fence: dict[int, int] = {}
        for _, _, gid, _ in h.events():
            by_fence[gid] = by_fence.get(gid, 0) + 1
        busiest, second = sorted(by_fence, key=lambda g: -by_fence[g])[:2]
        fences = {g.id: g for g in h.db.run_sync(geofence_defs.active_geofences)}
        model = fences[busiest]
        if model.kind == "circle":
            props = {"name": "copy", "radius_m": model.radius_m}
            geometry = {"type": "Point", "coordinates": [model.center_lon, model.center_lat]}
        else:
            props, geometry = {"name": "copy"}, json.loads(model.geometry_geojson)
        copy = tmp_path / "copy.geojson"
        feature = {"type": "Feature", "properties": props, "geometry": geometry}
        copy.write_text(json.dumps({"type": "FeatureCollection", "features": [feature]}))
        runner = CliRunner()
        base = ["--database-url", db_url]
        added = runner.invoke(app, [*base, "seed", "--geofences", str(copy)])
        assert added.exit_code == 0, added.output
        gone = runner.invoke(app, [*base, "geofence", "deactivate", str(second)])
        assert gone.exit_code == 0 and f"deactivated geofence {second}" in gone.output
        listed = runner.invoke(app, [*base, "geofence", "list", "--json"])
        active = {g["id"]: g["name"] for g in json.loads(listed.output)}
        assert second not in active and "copy" in active.values()
        copy_id = next(i for i, n in active.items() if n == "copy")
        changed_at = max(r.observed_at for r in h.reports())

        stage = h.pipeline.stage(GEOFENCE)
        await run_cycles(h, 6)
        assert h.pipeline.stage(GEOFENCE) is stage, "the same stage, never restarted"
        after = [e for e in h.events() if e[1] > changed_at]
        of_model = {(t, at, kind) for t, at, gid, kind in after if gid == busiest}
        of_copy = {(t, at, kind) for t, at, gid, kind in after if gid == copy_id}
        assert of_model, "trackers kept entering and leaving the busiest fence"
        assert of_copy == of_model
        assert not [e for e in after if e[2] == second]
    finally:
        await h.aclose()


async def test_more_fetch_workers_never_call_the_source_more_often(
    standalone_target, unique_prefix, tmp_path
):
    """Two fetch workers in two pipelines (as on two hosts) share the source's rate
    limit through Redis: together they call the location API at most source_rate_per_s
    times a second (each on its own would allow that much again)."""
    import time

    from processors.config import load
    from processors.pipeline import Pipeline
    from tests.support import FAST

    rate = 5.0
    db_url = f"sqlite:///{tmp_path}/rate.db"
    h = Harness(standalone_target, unique_prefix, db_url, trackers=24, batch_trackers=2)
    pipelines = []
    calls: list[float] = []
    try:
        streams, app = load(
            redis_url=h.streams.redis_url,
            prefix=h.streams.prefix,
            database_url=db_url,
            source_rate_per_s=rate,
            source_burst=1,
            **{**FAST, "batch_size": 2},  # small reads: both workers get requests
        )
        for _ in range(2):
            p = Pipeline(streams, app, clock=h.clock, geocoder=h.pipeline.geocoder)
            real_fetch = p.fleet.fetch

            async def counted(ids, since=None, real_fetch=real_fetch):
                calls.append(time.monotonic())
                return await real_fetch(ids, since)

            p.fleet.fetch = counted
            pipelines.append(p)
        assert len(await h.scheduler.tick()) == 12
        workers = [p.worker(FETCH, consumer=f"host-{i}") for i, p in enumerate(pipelines)]
        tasks = [asyncio.create_task(w.run()) for w in workers]
        try:
            await wait_for(lambda: sum(w.handled for w in workers) == 12, 30, "12 fetches")
        finally:
            for w in workers:
                w.stop()
            await asyncio.gather(*tasks)
        assert all(w.handled for w in workers), "both workers fetched"
        calls.sort()
        assert len(calls) == 12
        # any 6 consecutive calls span at least 5 intervals (10 % slack for timers)
        spans = [calls[i + 5] - calls[i] for i in range(len(calls) - 5)]
        assert min(spans) >= 5 / rate * 0.9, spans
    finally:
        for p in pipelines:
            await p.aclose()
        await h.aclose()


def _utc(value):
    from datetime import UTC, datetime

    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def _occupancy_from_events(events) -> dict[int, int]:
    latest: dict[tuple[str, int], str] = {}
    for tracker, _, gid, kind in sorted(events, key=lambda e: e[1]):
        latest[(tracker, gid)] = kind
    inside: dict[int, int] = {}
    for (_, gid), kind in latest.items():
        inside[gid] = inside.get(gid, 0) + (kind == "enter")
    return inside

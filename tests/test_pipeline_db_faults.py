"""The pipeline through database faults, against a real PostgreSQL this module starts
(and stops with ``pg_ctl stop -m immediate``) and real worker processes: an outage is
waited out, a failed store loses nothing, a lost acknowledgement leaves no stale view,
concurrent writers do not deadlock, a fresh geocode worker's first batch is in time."""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from processors import topology
from processors.clock import ManualClock
from processors.reconciler import Reconciler
from processors.sources import SimulatedFleet
from processors.topology import FETCH, GEOCODE, GEOFENCE, VIEW_REFRESH
from schemas import report_store
from schemas.events import FetchRequested, LocationReported
from schemas.tables import LocationReport
from schemas.views import LATEST_LOCATION
from streams.deadletter import DeadLetters
from streams.monitor import stage_status
from tests.conftest import unavailable
from tests.pipeline_support import START, Harness
from tests.servers import PostgresServer, ServerUnavailable, temp_root
from tests.support import FAST, wait_for

ROOT = Path(__file__).resolve().parent.parent
OUTAGE_S = float(os.environ.get("TS_TEST_OUTAGE_S", "60"))  # shorter to debug
WORKER_CLOCK_START = START + timedelta(hours=1)


@pytest.fixture(scope="module")
def own_pg() -> Iterator[PostgresServer]:
    """A PostgreSQL of this module's own: the outage test stops it, the deadlock test
    reads its log."""
    root = temp_root("ts-pg-faults-")
    try:
        server = PostgresServer.start(root, durable=True)  # a commit survives the stop
    except (ServerUnavailable, OSError, FileNotFoundError) as exc:
        shutil.rmtree(root, ignore_errors=True)
        unavailable("PostgreSQL", exc)
    yield server
    server.stop()
    shutil.rmtree(root, ignore_errors=True)


def _worker_env(h: Harness, clock: str | None = None, **values: Any) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TRACKSTREAM_", "TS_TEST_"))}
    settings = {
        **FAST,
        "redis_url": h.streams.redis_url,
        "redis_cluster": h.streams.redis_cluster,
        "prefix": h.streams.prefix,
        "database_url": h.app.database_url,
        "handler_timeout_ms": 5_000,
        "claim_idle_ms": 6_000,
        **values,
    }
    env.update(
        {
            f"TRACKSTREAM_{k.upper()}": str(v).lower() if isinstance(v, bool) else str(v)
            for k, v in settings.items()
        }
    )
    if clock:
        env["TS_TEST_CLOCK"] = clock
    if level := os.environ.get("TS_TEST_LOG_LEVEL"):
        env["TS_TEST_LOG_LEVEL"] = level
    return env


class Workers:
    """Worker processes, stopped (SIGTERM, then SIGKILL) by PID at the end."""

    def __init__(self, logdir: Path) -> None:
        self.logdir = logdir
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, stage: str, name: str, env: dict[str, str], delay_s: float = 0.0) -> None:
        log = open(self.logdir / f"{name}.log", "wb")  # noqa: SIM115 (closed with the process)
        self.procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "tests.pipeline_worker", stage, name, str(delay_s)],
                cwd=ROOT,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        )
        log.close()

    def alive(self) -> bool:
        return all(p.poll() is None for p in self.procs)

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(10)


async def _dead_letters(h: Harness) -> int:
    return sum([await DeadLetters(h.client, h.keys(s)).count() for s in topology.STAGES])


async def _publish_round(h: Harness, ids: list[str], per_batch: int) -> None:
    batches = [
        FetchRequested(
            batch_id=secrets.token_hex(8),
            tracker_ids=ids[i : i + per_batch],
            requested_at=h.clock(),
        )
        for i in range(0, len(ids), per_batch)
    ]
    await h.pipeline.producer.publish(h.pipeline.routes[FETCH], batches)


def _counts(h: Harness) -> tuple[int, int, int]:
    def q(s: Any) -> tuple[int, int, int]:
        total = s.scalar(select(func.count()).select_from(LocationReport))
        geocoded = s.scalar(select(func.count()).where(LocationReport.geocoded_at.is_not(None)))
        checked = s.scalar(
            select(func.count()).where(LocationReport.geofence_checked_at.is_not(None))
        )
        return int(total or 0), int(geocoded or 0), int(checked or 0)

    return h.db.run_sync(q)


def _assert_history_complete(h: Harness) -> int:
    """Each tracker's stored reports are exactly the fleet's reports from its first to
    its last stored one (an independent fleet: nothing skipped, nothing invented), all
    geocoded and checked; the events are those computed from the history."""
    fleet = SimulatedFleet(7)
    by_tracker: dict[str, list[Any]] = defaultdict(list)
    reports = h.reports()
    for r in reports:
        assert r.geocoded_at is not None and r.geofence_checked_at is not None, r
        by_tracker[r.tracker_id].append(r)
    for tracker, rs in by_tracker.items():
        expected = fleet.reports_between(
            tracker, rs[0].observed_at - timedelta(microseconds=1), rs[-1].observed_at
        )
        assert [(r.observed_at, r.lat, r.lon) for r in rs] == [
            (f.observed_at, f.lat, f.lon) for f in expected
        ], tracker
    assert h.events() == h.expected_events()
    return len(reports)


def _latest_by_tracker(h: Harness) -> dict[str, tuple[Any, Any]]:
    latest: dict[str, tuple[Any, Any]] = {}
    for r in h.reports():  # ordered by observed_at within a tracker
        latest[r.tracker_id] = (r.observed_at, r.city)
    return latest


def _view(h: Harness) -> dict[str, tuple[Any, Any]]:
    rows = h.db.run_sync(
        lambda s: list(
            s.execute(
                select(
                    LATEST_LOCATION.c.tracker_id,
                    LATEST_LOCATION.c.observed_at,
                    LATEST_LOCATION.c.city,
                )
            )
        )
    )
    return {t: (o, c) for t, o, c in rows}


async def _all_idle(h: Harness) -> bool:
    for s in topology.STAGES:
        try:
            st = await stage_status(h.client, h.keys(s))
        except ValueError:  # monitor race: pending counted, then acked before XPENDING
            return False
        if st.lag or st.pending:
            return False
    return True


@pytest.mark.slow
@pytest.mark.timeout(240)
async def test_a_60s_postgres_outage_is_waited_out(
    own_pg, standalone_target, unique_prefix, tmp_path
):
    db_url = own_pg.create_database(f"t_{secrets.token_hex(6)}")
    h = Harness(standalone_target, unique_prefix, db_url, trackers=30)
    ids = [f"SIM-{i:05d}" for i in range(1, 31)]
    workers = Workers(tmp_path)
    # 30x time: a tracker reports every 10 s, so the outage spans ~7 reports (< 12 per call)
    env = _worker_env(
        h, f"{WORKER_CLOCK_START.isoformat()},30", batch_size=2, view_refresh_interval_s=2
    )
    stop_feeding = asyncio.Event()

    async def feed() -> None:  # a fetch round every 2 s until the outage
        while not stop_feeding.is_set():
            await _publish_round(h, ids, 3)
            await asyncio.sleep(2)

    feeder = asyncio.create_task(feed())
    try:
        for stage in topology.STAGES:
            workers.start(stage, f"w-{stage}", env, delay_s=0.1)

        async def flowing_with_work_in_flight() -> bool:
            assert workers.alive()
            if _counts(h)[2] < 30:
                return False
            for s in (FETCH, GEOCODE, GEOFENCE):
                keys = h.keys(s)
                if not int((await h.client.xpending(keys.stream, keys.group))["pending"]):
                    return False
            return True

        await wait_for(flowing_with_work_in_flight, 90, "every stage busy")
        stop_feeding.set()  # what is in flight now is what the outage must not lose
        await feeder
        own_pg.stop_immediate()
        down_at = time.monotonic()
        while time.monotonic() - down_at < OUTAGE_S:  # the outage itself
            assert workers.alive(), "a worker died during the outage"
            assert await _dead_letters(h) == 0
            await asyncio.sleep(1)
        own_pg.restart()
        up_at = time.monotonic()
        baseline: list[int] = []  # checked reports at the first reading after the restart

        async def checked_more() -> bool:
            try:
                total, _, checked = _counts(h)
            except Exception:  # the test's own pool reconnecting
                return False
            baseline[:] = baseline or [checked]
            if checked > baseline[0]:
                return True
            # or it caught up before the test's own first reading got through
            return checked == total and await _all_idle(h)

        await wait_for(checked_more, 60, "reports checked again after the restart")
        flow_again_s = time.monotonic() - up_at
        await wait_for(lambda: _all_idle(h), 120, "all stages drained")
        drained_s = time.monotonic() - up_at
        assert await _dead_letters(h) == 0
        stored = _assert_history_complete(h)
        assert stored > 30
        # views fresh within the refresh interval (2 s), with margin for a loaded machine
        await wait_for(lambda: _view(h) == _latest_by_tracker(h), 15, "fresh views")
        print(
            f"\n60 s PostgreSQL outage: flowing again {flow_again_s:.1f} s after the restart, "
            f"drained after {drained_s:.1f} s; {stored} reports, 0 dead letters"
        )
    finally:
        stop_feeding.set()
        feeder.cancel()
        workers.stop()
        if own_pg.proc_pid is None:
            own_pg.restart()
        await h.aclose()


async def test_a_failed_fetch_store_loses_nothing(standalone_target, unique_prefix, pg_url):
    """The store fails once after the source answered; with one fetch worker, the retry
    must get those reports again from the source and store them."""
    h = Harness(standalone_target, unique_prefix, pg_url, trackers=4, batch_trackers=4)
    stage = h.pipeline.stage(FETCH)
    real = stage.db

    class FailsOnce:
        failed = 0

        async def run(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
            if fn.__name__ == "_store" and len(args[0]) > 4 and not self.failed:
                self.failed += 1
                raise RuntimeError("storing failed after the source answered")
            return await real.run(fn, *args, **kwargs)

    stage.db = FailsOnce()
    try:
        await h.cycle(minutes=30)  # first fetch: the latest report of each tracker
        await h.cycle(minutes=30)  # then the 6 since: this store fails once
        assert stage.db.failed == 1
        returned = {(f.tracker_id, f.observed_at) for f in h.recording.returned}
        stored = {(r.tracker_id, r.observed_at) for r in h.reports()}
        assert len(returned) == 4 * 7
        assert stored == returned
        assert all(r.geocoded_at and r.geofence_checked_at for r in h.reports())
    finally:
        await h.aclose()


async def test_a_lost_geofence_acknowledgement_leaves_no_stale_view(
    standalone_target, unique_prefix, pg_url
):
    """The geofence commit succeeds but its caller hears an error, every time, until the
    entries are dead-lettered: no ViewsChanged notice is sent. The reconciler sees the
    views behind the stored history and sends one."""
    h = Harness(standalone_target, unique_prefix, pg_url, trackers=6, batch_trackers=3)
    stage = h.pipeline.stage(GEOFENCE)
    real = stage.db

    class AckLost:
        async def run(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
            result = await real.run(fn, *args, **kwargs)
            if fn.__name__ == "check_batch":
                raise RuntimeError("the commit's acknowledgement was lost")
            return result

    stage.db = AckLost()
    try:
        await h.scheduler.tick()
        await h.drain()
        assert await DeadLetters(h.client, h.keys(GEOFENCE)).count() > 0
        stage.db = real
        latest = _latest_by_tracker(h)
        assert len(latest) == 6 and all(r.geofence_checked_at for r in h.reports())
        assert _view(h) != latest  # stale: no notice reached view-refresh
        h.clock.advance(seconds=h.app.reconcile_grace_s + 1)
        done = await h.pipeline.reconciler().run_once()
        assert (done.geocode, done.geofence, done.views) == (0, 0, 6)
        await h.drain([VIEW_REFRESH])
        assert _view(h) == latest
        assert (await h.pipeline.reconciler().run_once()).views == 0
    finally:
        await h.aclose()


# 11 reports per tracker: 11,000 (~110 s here with the set-based geofence stage)
DEADLOCK_TRACKERS = int(os.environ.get("TS_TEST_DEADLOCK_TRACKERS", "1000"))


@pytest.mark.slow
@pytest.mark.timeout(max(240, DEADLOCK_TRACKERS))
async def test_two_workers_per_stage_and_the_reconciler_do_not_deadlock(
    own_pg, standalone_target, unique_prefix, tmp_path
):
    db_url = own_pg.create_database(f"t_{secrets.token_hex(6)}")
    log_from = own_pg.log_path.stat().st_size
    trackers = DEADLOCK_TRACKERS
    h = Harness(standalone_target, unique_prefix, db_url, trackers=trackers)
    ids = [f"SIM-{i:05d}" for i in range(1, trackers + 1)]
    fleet = SimulatedFleet(7)
    now = WORKER_CLOCK_START + timedelta(minutes=50)  # the workers' clock, stopped
    # one stored (and never geocoded) report per tracker an hour back: the fetch gets
    # the 10 since, and the reconciler has old work to re-send from the start
    seeded = [
        LocationReported(
            tracker_id=f.tracker_id,
            observed_at=f.observed_at,
            lat=f.lat,
            lon=f.lon,
            accuracy_m=f.accuracy_m,
            source=f.source,
            fetched_at=WORKER_CLOCK_START,
        )
        for t in ids
        for f in fleet.reports_between(
            t, WORKER_CLOCK_START - timedelta(minutes=5), WORKER_CLOCK_START
        )
    ]
    h.db.run_sync(report_store.insert_reports, seeded)
    workers = Workers(tmp_path)
    env = _worker_env(
        h,
        f"{now.isoformat()},0",
        batch_size=50,
        handler_timeout_ms=10_000,
        claim_idle_ms=12_000,
        view_refresh_interval_s=5,
    )
    clock = ManualClock(now + timedelta(seconds=2))
    reconciler = Reconciler(
        h.db,
        h.pipeline.producer,
        h.pipeline.routes,
        clock,
        grace_s=1,
        limit=10,
        max_republish=1,
    )

    async def never_behind(stage: str) -> bool:  # re-send even into a backlog
        return False

    reconciler._behind = never_behind  # type: ignore[method-assign]
    started = time.monotonic()
    try:
        for stage in topology.STAGES:
            for n in range(2):
                workers.start(stage, f"w-{stage}-{n}", env)
        await _publish_round(h, ids, 50)
        resent = 0
        while True:
            assert workers.alive()
            done = await reconciler.run_once()
            resent += done.geocode + done.geofence
            clock.advance(seconds=2)
            total, _, checked = _counts(h)
            if checked == total >= 11 * trackers:
                break
            assert time.monotonic() - started < max(180, trackers - 60), (total, checked)
            await asyncio.sleep(1)
        elapsed = time.monotonic() - started
        with open(own_pg.log_path, "rb") as f:
            f.seek(log_from)
            log = f.read().decode(errors="replace")
        assert "deadlock detected" not in log
        assert resent > 0, "the reconciler took part"
        assert _assert_history_complete(h) == 11 * trackers
        await wait_for(lambda: _all_idle(h), 60, "the re-sent work drained")
        assert await _dead_letters(h) == 0
        print(f"\n{11 * trackers} reports, 2 workers per stage: {elapsed:.1f} s, {resent} re-sent")
    finally:
        workers.stop()
        await h.aclose()


async def test_a_fresh_geocode_workers_first_batch_is_in_time(
    standalone_target, unique_prefix, pg_url, tmp_path
):
    """The offline geocoder's data takes over a second to load; a worker loads it
    before its first read, so a first batch with a 1 s timeout and one delivery
    allowed is neither timed out nor dead-lettered."""
    h = Harness(standalone_target, unique_prefix, pg_url, trackers=10)
    workers = Workers(tmp_path)
    try:
        await h.scheduler.tick()
        await h.drain([FETCH])
        env = _worker_env(h, handler_timeout_ms=1_000, claim_idle_ms=30_000, max_deliveries=1)
        env["TS_TEST_GEOCODER"] = "offline"
        workers.start(GEOCODE, "fresh-geocoder", env)

        def geocoded() -> bool:
            assert workers.alive()
            return _counts(h)[1] == 10

        await wait_for(geocoded, 60, "the batch geocoded")
        assert await DeadLetters(h.client, h.keys(GEOCODE)).count() == 0
        # the real geocoder answered (the stand-in says "XX")
        codes = [r.country_code for r in h.reports()]
        assert all(c and len(c) == 2 and c != "XX" for c in codes), codes
        log = (tmp_path / "fresh-geocoder.log").read_text(errors="replace")
        assert "failed" not in log, log
    finally:
        workers.stop()
        await h.aclose()


async def test_a_bad_row_is_dead_lettered_alone(standalone_target, unique_prefix, pg_url):
    """A geocoder answer that cannot be stored (a NUL byte in the city) fails its report
    alone: it is dead-lettered, the rest of its batch is geocoded."""
    h = Harness(standalone_target, unique_prefix, pg_url, trackers=6, batch_trackers=6)
    stage = h.pipeline.stage(GEOCODE)
    inner = stage.geocoder
    poisoned: list[tuple[float, float]] = []

    class OneBadAnswer:
        async def reverse(self, points: Any) -> Any:
            answers = await inner.reverse(points)
            return [
                replace(a, city="Bad\x00City") if p in poisoned else a
                for p, a in zip(points, answers, strict=True)
            ]

    stage.geocoder = OneBadAnswer()
    try:
        await h.scheduler.tick()
        await h.drain([FETCH])
        first = h.reports()[0]
        poisoned.append((first.lat, first.lon))
        await h.pump([GEOCODE])
        assert await DeadLetters(h.client, h.keys(GEOCODE)).count() == 1
        assert _counts(h)[:2] == (6, 5)  # the batch's 5 good reports are geocoded
        assert [r.geocoded_at for r in h.reports()].count(None) == 1
        assert h.reports()[0].geocoded_at is None
    finally:
        await h.aclose()

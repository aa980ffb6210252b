"""The console's events log and partition view on a real, month-partitioned PostgreSQL:
a time-bounded page reads only its months' partitions (EXPLAIN), cursor pages cross a
partition boundary without losing or repeating an event, and /api/partitions says
what retention drops next."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import httpx
import pytest
from sqlalchemy import Engine

from ops.dashboard import create_app
from ops.dashboard.events import EventQuery, statement
from processors.config import AppSettings
from schemas import geofence_defs, history, tracker_store
from schemas.db import make_engine, session_factory, upgrade
from schemas.tables import GeofenceEventRow as GeofenceEvent
from streams.settings import StreamSettings

NOW = datetime.now(UTC)
THIS_MONTH = history.month_start(NOW)
OLD_MONTH = history.month_start(
    history.month_start(THIS_MONTH - timedelta(days=1)) - timedelta(days=1)
)
PER_MONTH = 7


@pytest.fixture
def pg(pg_url: str):
    upgrade(pg_url)
    engine = make_engine(pg_url)
    with engine.begin() as conn:
        history.create_partition(conn, "geofence_events", OLD_MONTH)  # two months back
    with session_factory(engine).begin() as s:
        tracker_store.upsert_trackers(s, [{"external_id": "A"}])
        fence = geofence_defs.add_geofence(
            s, "Depot", "circle", center_lat=48.1, center_lon=11.5, radius_m=500
        )
        for month in (OLD_MONTH, THIS_MONTH):
            for i in range(PER_MONTH):
                s.add(
                    GeofenceEvent(
                        tracker_id="A",
                        geofence_id=fence.id,
                        observed_at=month + timedelta(hours=i + 1),
                        kind="enter" if i % 2 else "exit",
                    )
                )
    yield pg_url, engine
    engine.dispose()


def _plan(engine: Engine, q: EventQuery) -> str:
    compiled = statement(q).compile(dialect=engine.dialect)
    with engine.connect() as conn:
        rows = conn.exec_driver_sql("EXPLAIN " + str(compiled), compiled.params)
        return "\n".join(r[0] for r in rows)


def test_a_time_bounded_page_reads_only_its_partitions(pg) -> None:
    _, engine = pg
    old = history.partition_name("geofence_events", OLD_MONTH)
    current = history.partition_name("geofence_events", THIS_MONTH)
    recent = _plan(engine, EventQuery(since=THIS_MONTH, until=history.next_month(THIS_MONTH)))
    assert current in recent
    assert old not in recent and "geofence_events_default" not in recent
    older = _plan(engine, EventQuery(since=OLD_MONTH, until=history.next_month(OLD_MONTH)))
    assert old in older and current not in older
    # a cursor is an upper bound too: the next page of an unbounded query skips later months
    cursor = _plan(
        engine, EventQuery(since=None, until=None, before=(OLD_MONTH + timedelta(days=2), 0))
    )
    assert old in cursor and current not in cursor


async def test_pages_cross_a_partition_boundary_and_partitions_show_retention(pg) -> None:
    url, _ = pg
    settings = StreamSettings.build(redis_url="redis://127.0.0.1:9", prefix="pgpages")
    app = create_app(settings, AppSettings.build(database_url=url, history_retention_days=30))
    transport = httpx.ASGITransport(app=app)
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://console") as c:
            seen: list[int] = []
            cursor = None
            while True:
                params = {"since": "all", "limit": "4", **({"before": cursor} if cursor else {})}
                body = (await c.get("/api/events", params=params)).json()
                seen += [e["id"] for e in body["events"]]
                cursor = body["next"]
                if cursor is None:
                    break
            assert len(seen) == len(set(seen)) == 2 * PER_MONTH
            body = (await c.get("/api/events", params={"since": "all", "kind": "enter"})).json()
            assert {e["kind"] for e in body["events"]} == {"enter"}
            assert len(body["events"]) == 2 * (PER_MONTH // 2)
            bad = await c.get("/api/events", params={"before": "yesterday|x"})
            assert bad.status_code == 400 and "cursor" in bad.json()["error"]

            parts = (await c.get("/api/partitions")).json()
    finally:
        await app.state.dashboard.aclose()  # no lifespan under ASGITransport
    assert parts["dialect"] == "postgresql" and parts["retention_days"] == 30
    names = {p["partition"]: p for p in parts["partitions"]}
    old = history.partition_name("geofence_events", OLD_MONTH)
    assert names["geofence_events_default"]["default"] is True
    assert names[old]["bytes"] > 0
    # the old month ended more than 30 days ago: retention drops it at the next prune
    assert old in {p["partition"] for p in parts["next_drop"]}
    assert parts["next_drop_at"] == parts["now"]

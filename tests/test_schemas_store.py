"""The schema, migrations, store functions and views, on SQLite and on PostgreSQL
(``db_url`` from conftest runs each test on both; no mocks)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import Engine, select, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from ops.bench import fixtures
from schemas import (
    geofence_defs,
    geofence_validation,
    reconcile_store,
    report_store,
    tracker_store,
    views,
)
from schemas.db import current_revision, head_revision, make_engine, session_factory, upgrade
from schemas.events import LocationGeocoded, LocationReported
from schemas.tables import Base, Geofence, GeofenceEventRow, LocationReport, Tracker
from tests import store_support

T0 = datetime(2026, 3, 2, 8, 0, tzinfo=UTC)
Tx = Callable[..., Any]


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    upgrade(db_url)
    eng = make_engine(db_url)
    yield eng
    eng.dispose()


@pytest.fixture
def tx(engine: Engine) -> Tx:
    """``tx(fn, *args)`` runs ``fn(session, *args)`` in one committed transaction."""
    factory = session_factory(engine)

    def run(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        with factory.begin() as session:
            return fn(session, *args, **kwargs)

    return run


def tracker(ext: str, **changes: Any) -> dict[str, Any]:
    row = {
        "external_id": ext,
        "name": ext,
        "active": True,
        "run_starts_at": None,
        "run_ends_at": None,
    }
    row.update(changes)
    return row


def report(ext: str, minute: float, lat: float = 51.9, lon: float = 4.4) -> LocationReported:
    at = T0 + timedelta(minutes=minute)
    return LocationReported(
        tracker_id=ext,
        observed_at=at,
        lat=lat,
        lon=lon,
        accuracy_m=5.0,
        source="test",
        fetched_at=at + timedelta(seconds=2),
    )


def geocoded(r: LocationReported, city: str = "Rotterdam") -> LocationGeocoded:
    return LocationGeocoded(
        tracker_id=r.tracker_id,
        observed_at=r.observed_at,
        lat=r.lat,
        lon=r.lon,
        city=city,
        country_code="NL",
        country="Netherlands",
        address=f"{city} harbour",
        time_zone="Europe/Amsterdam",
    )


def square(lon: float, lat: float, d: float = 0.01) -> str:
    ring = [[lon, lat], [lon + d, lat], [lon + d, lat + d], [lon, lat + d], [lon, lat]]
    return json.dumps({"type": "Polygon", "coordinates": [ring]})


BOW_TIE = json.dumps({"type": "Polygon", "coordinates": [[[0, 0], [1, 1], [1, 0], [0, 1], [0, 0]]]})


# -- migrations


def test_upgrade_creates_schema_and_is_idempotent(db_url: str) -> None:
    assert current_revision(db_url) is None
    upgrade(db_url)
    assert current_revision(db_url) == head_revision()
    upgrade(db_url)  # a no-op
    assert current_revision(db_url) == head_revision()
    eng = make_engine(db_url)
    try:
        for name in views.VIEW_NAMES:
            assert views.view_health(eng, name) == "ok"
        with eng.connect() as conn:
            for table in ("trackers", "location_history", "geofences", "geofence_events"):
                assert conn.execute(text(f"SELECT COUNT(*) FROM {table}")).scalar() == 0
    finally:
        eng.dispose()


def test_migration_matches_the_models(engine: Engine) -> None:
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    from schemas.db import include_object

    with engine.connect() as conn:
        ctx = MigrationContext.configure(
            conn, opts={"include_object": include_object, "compare_type": True}
        )
        assert compare_metadata(ctx, Base.metadata) == []


def test_concurrent_upgrades_on_a_fresh_database(db_url: str, tmp_path: Any) -> None:
    """Several processes (say, compose services starting together) upgrade at once."""
    code = "import sys; from schemas.db import upgrade; upgrade(sys.argv[1])"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, db_url],
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for _ in range(3)
    ]
    try:
        results = [(p.wait(timeout=60), p.stderr.read().decode()) for p in procs]  # type: ignore[union-attr]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
            for stream in (p.stdout, p.stderr):
                if stream is not None:
                    stream.close()
    assert [rc for rc, _ in results] == [0, 0, 0], results
    assert current_revision(db_url) == head_revision()


def test_upgrade_from_0001_keeps_the_data(db_url: str) -> None:
    """A deployment at the first schema upgrades in place: its reports stay and get the
    reconciler's bookkeeping columns (never re-published)."""
    upgrade(db_url, "0001")
    eng = make_engine(db_url)
    try:
        with eng.begin() as conn:
            conn.execute(
                text("INSERT INTO trackers (external_id, name, active) VALUES ('A', 'a', true)")
            )
            conn.execute(
                text(
                    "INSERT INTO location_history (tracker_id, observed_at, lat, lon, source,"
                    " fetched_at) VALUES ('A', :t, 1.0, 2.0, 'test', :t)"
                ),
                {"t": T0},
            )
        upgrade(db_url)
        assert current_revision(db_url) == head_revision()
        with eng.connect() as conn:
            row = conn.execute(
                text("SELECT tracker_id, republish_count, republished_at FROM location_history")
            ).one()
        assert tuple(row) == ("A", 0, None)
    finally:
        eng.dispose()


def test_make_engine_maps_plain_postgresql_urls() -> None:
    from schemas.db import normalize_url

    assert normalize_url("postgresql://u@h/db").drivername == "postgresql+psycopg"
    assert normalize_url("postgres://u@h/db").drivername == "postgresql+psycopg"
    assert normalize_url("sqlite:///x.db").drivername == "sqlite"
    with pytest.raises(ValueError, match="unsupported database URL"):
        normalize_url("mysql://u@h/db")


def test_sqlite_engine_creates_parent_dir_and_pragmas(tmp_path: Any) -> None:
    url = f"sqlite:///{tmp_path / 'a' / 'b' / 'db.sqlite'}"
    eng = make_engine(url)
    try:
        with eng.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
            assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() >= 1000
        assert (tmp_path / "a" / "b" / "db.sqlite").exists()
    finally:
        eng.dispose()


# -- trackers and eligibility


def test_upsert_trackers_updates_on_conflict(tx: Tx) -> None:
    tx(tracker_store.upsert_trackers, [tracker("A", name="first"), tracker("B")])
    tx(
        tracker_store.upsert_trackers,
        [tracker("A", name="second", active=False), tracker("A", name="x")],
    )
    rows = tx(lambda s: {t.external_id: (t.name, t.active) for t in s.scalars(select(Tracker))})
    assert rows == {"A": ("x", True), "B": ("B", True)}


def test_stalest_age_and_counts(tx: Tx) -> None:
    assert tx(store_support.stalest_active_tracker_age_s, T0) is None
    tx(tracker_store.upsert_trackers, [tracker("A"), tracker("B"), tracker("C", active=False)])
    tx(tracker_store.mark_processed, ["A", "B", "C"], T0)
    tx(tracker_store.mark_processed, ["B"], T0 - timedelta(minutes=10))
    tx(tracker_store.mark_processed, ["C"], T0 - timedelta(hours=10))  # inactive: ignored
    assert tx(store_support.stalest_active_tracker_age_s, T0 + timedelta(seconds=30)) == 630.0
    r = report("A", 0)
    tx(report_store.insert_reports, [r, report("A", 1)])
    assert (tx(report_store.count_not_geocoded), tx(report_store.count_not_checked)) == (2, 0)
    tx(report_store.set_addresses, [geocoded(r)], T0)
    assert (tx(report_store.count_not_geocoded), tx(report_store.count_not_checked)) == (1, 1)
    tx(store_support.mark_geofence_checked, [("A", r.observed_at)], T0)
    assert (tx(report_store.count_not_geocoded), tx(report_store.count_not_checked)) == (1, 0)


# -- reports


def test_insert_reports_is_idempotent(tx: Tx) -> None:
    tx(tracker_store.upsert_trackers, [tracker("A"), tracker("B")])
    batch = [report("A", 0), report("A", 1), report("B", 0)]
    assert tx(report_store.insert_reports, batch) == batch
    assert tx(report_store.insert_reports, batch) == []
    # a batch with internal duplicates and one new report
    again = [report("A", 1), report("A", 2), report("A", 2), report("B", 0)]
    assert tx(report_store.insert_reports, again) == [report("A", 2)]
    assert [r.observed_at for r in tx(store_support.reports_for, "A")] == [
        T0,
        T0 + timedelta(minutes=1),
        T0 + timedelta(minutes=2),
    ]


def test_reports_of_unknown_trackers_are_skipped(tx: Tx, caplog: Any) -> None:
    tx(tracker_store.upsert_trackers, [tracker("A")])
    new = tx(report_store.insert_reports, [report("A", 0), report("GHOST", 0)])
    assert new == [report("A", 0)]
    assert "unknown tracker" in caplog.text and "GHOST" in caplog.text
    assert tx(store_support.reports_for, "GHOST") == []


def test_unique_constraints_hold(engine: Engine, tx: Tx) -> None:
    tx(tracker_store.upsert_trackers, [tracker("A")])
    tx(report_store.insert_reports, [report("A", 0)])
    gid = tx(lambda s: geofence_defs.add_geofence(s, "g", "circle", 51.9, 4.4, 100).id)
    factory = session_factory(engine)
    with pytest.raises(IntegrityError), factory.begin() as s:
        s.add(
            LocationReport(tracker_id="A", observed_at=T0, lat=0, lon=0, source="x", fetched_at=T0)
        )
    with pytest.raises(IntegrityError), factory.begin() as s:
        s.add(Tracker(external_id="A", name="dup"))
    tx(fixtures.replace_events_at, "A", T0, {gid: "enter"})
    with pytest.raises(IntegrityError), factory.begin() as s:
        s.add(GeofenceEventRow(tracker_id="A", geofence_id=gid, observed_at=T0, kind="exit"))
    with pytest.raises(IntegrityError), factory.begin() as s:  # check constraint
        s.add(
            GeofenceEventRow(
                tracker_id="A", geofence_id=gid, observed_at=T0 + timedelta(1), kind="inside"
            )
        )
    with pytest.raises(IntegrityError), factory.begin() as s:  # foreign key
        s.add(
            LocationReport(
                tracker_id="NOPE", observed_at=T0, lat=0, lon=0, source="x", fetched_at=T0
            )
        )


def test_set_addresses(tx: Tx) -> None:
    tx(tracker_store.upsert_trackers, [tracker("A")])
    r1, r2 = report("A", 0), report("A", 1)
    tx(report_store.insert_reports, [r1, r2])
    tx(report_store.set_addresses, [geocoded(r1)], T0 + timedelta(minutes=5))
    tx(report_store.set_addresses, [geocoded(r1)], T0 + timedelta(minutes=5))  # idempotent
    first, second = tx(store_support.reports_for, "A")
    assert (first.city, first.country_code, first.country, first.address) == (
        "Rotterdam",
        "NL",
        "Netherlands",
        "Rotterdam harbour",
    )
    assert first.geocoded_at == T0 + timedelta(minutes=5)
    assert first.time_zone == "Europe/Amsterdam"
    assert second.city is None and second.geocoded_at is None and second.time_zone is None


def test_datetimes_come_back_timezone_aware_utc(tx: Tx) -> None:
    from datetime import timezone

    cest = timezone(timedelta(hours=2))
    tx(
        tracker_store.upsert_trackers,
        [tracker("A", run_starts_at=datetime(2026, 3, 1, 10, tzinfo=cest))],
    )
    tx(report_store.insert_reports, [report("A", 0)])
    t = tx(lambda s: s.scalars(select(Tracker)).one())
    assert t.run_starts_at == datetime(2026, 3, 1, 8, tzinfo=UTC)
    assert t.run_starts_at.tzinfo is UTC and t.created_at.tzinfo is UTC
    (r,) = tx(store_support.reports_for, "A")
    for value in (r.observed_at, r.fetched_at):
        assert value.tzinfo is UTC
    assert r.observed_at == T0
    # comparisons against aware values of another zone are correct
    fetched = T0 + timedelta(seconds=2)
    assert len(tx(store_support.incomplete_reports, fetched.astimezone(cest), 10)[0]) == 1
    assert (
        tx(store_support.incomplete_reports, (fetched - timedelta(seconds=1)).astimezone(cest), 10)[
            0
        ]
        == []
    )
    # naive values are refused, never silently mis-stored
    with pytest.raises(Exception, match="naive datetime"):
        tx(tracker_store.mark_processed, ["A"], datetime(2026, 3, 2, 8))


def test_incomplete_reports(tx: Tx) -> None:
    tx(tracker_store.upsert_trackers, [tracker("A"), tracker("B")])
    rs = [report("A", m) for m in (0, 10, 20)]
    tx(report_store.insert_reports, [*rs, report("B", 5)])
    # fetched_at is observed_at + 2 s
    not_geocoded, not_checked = tx(
        store_support.incomplete_reports, T0 + timedelta(minutes=10, seconds=2), 100
    )
    assert [(r.tracker_id, r.observed_at) for r in not_geocoded] == [
        ("A", rs[0].observed_at),
        ("B", T0 + timedelta(minutes=5)),
        ("A", rs[1].observed_at),
    ]
    assert not_checked == []
    assert len(tx(store_support.incomplete_reports, T0 + timedelta(hours=1), 2)[0]) == 2
    tx(report_store.set_addresses, [geocoded(r) for r in rs], T0 + timedelta(minutes=30))
    not_geocoded, not_checked = tx(
        store_support.incomplete_reports, T0 + timedelta(minutes=29), 100
    )
    assert [r.tracker_id for r in not_geocoded] == ["B"]
    assert not_checked == []  # geocoded too recently
    not_geocoded, not_checked = tx(
        store_support.incomplete_reports, T0 + timedelta(minutes=30), 100
    )
    assert [r.observed_at for r in not_checked] == [r.observed_at for r in rs]
    tx(store_support.mark_geofence_checked, [("A", rs[0].observed_at)], T0 + timedelta(minutes=31))
    _, not_checked = tx(store_support.incomplete_reports, T0 + timedelta(hours=1), 100)
    assert [r.observed_at for r in not_checked] == [r.observed_at for r in rs[1:]]


def test_republish_bookkeeping_spaces_and_caps_the_resends(tx: Tx) -> None:
    tx(tracker_store.upsert_trackers, [tracker("A")])
    tx(report_store.insert_reports, [report("A", 0), report("A", 10)])
    at = T0 + timedelta(hours=1)

    def due(older_than: datetime) -> list[int]:
        return [r.id for r in tx(store_support.incomplete_reports, older_than, 100, 2)[0]]

    ids = due(at)
    assert len(ids) == 2
    tx(reconcile_store.mark_republished, ids[:1], at)
    assert due(at) == ids, "re-published at `at`: due again once `at` is past the grace"
    assert due(at - timedelta(seconds=1)) == ids[1:], "not before"
    tx(reconcile_store.mark_republished, ids[:1], at + timedelta(hours=1))
    assert due(at + timedelta(hours=5)) == ids[1:], "re-published twice: given up on"
    assert tx(reconcile_store.count_abandoned, 2) == 1
    assert len(tx(store_support.incomplete_reports, at, 100)[0]) == 2, (
        "no cap: everything unfinished"
    )


# -- geofences


def test_add_geofences_and_version(tx: Tx) -> None:
    v0 = tx(geofence_defs.geofences_version)
    circle = tx(
        lambda s: (
            geofence_defs.add_geofence(
                s, "factory", "circle", center_lat=51.9, center_lon=4.4, radius_m=250
            ).id
        )
    )
    v1 = tx(geofence_defs.geofences_version)
    poly = tx(
        lambda s: (
            geofence_defs.add_geofence(s, "port", "polygon", geometry_geojson=square(4.3, 51.8)).id
        )
    )
    v2 = tx(geofence_defs.geofences_version)
    tx(geofence_defs.update_geofence, circle, radius_m=300)
    v3 = tx(geofence_defs.geofences_version)
    tx(geofence_defs.update_geofence, circle, radius_m=300)  # even a no-op edit is a change
    v4 = tx(geofence_defs.geofences_version)
    assert [g.id for g in tx(geofence_defs.active_geofences)] == [circle, poly]
    tx(store_support.deactivate_geofence, poly)
    v5 = tx(geofence_defs.geofences_version)
    assert len({v0, v1, v2, v3, v4, v5}) == 6
    assert tx(geofence_defs.geofences_version) == v5  # stable without changes
    (g,) = tx(geofence_defs.active_geofences)
    assert (g.id, g.radius_m, g.updated_at.tzinfo) == (circle, 300, UTC)
    from processors.geofencing import GeofenceIndex

    index = GeofenceIndex(tx(geofence_defs.active_geofences))
    assert index.members(51.9, 4.4) == frozenset({circle})


def test_demo_geofences_are_valid(tx: Tx) -> None:
    from processors.sources import SimulatedFleet

    for fence in SimulatedFleet.geofences_for_demo():
        tx(geofence_defs.add_geofence, **fence)
    assert len(tx(geofence_defs.active_geofences)) == len(SimulatedFleet.geofences_for_demo())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"kind": "polygon", "geometry_geojson": BOW_TIE}, "Self-intersection"),
        ({"kind": "square"}, "kind must be 'circle' or 'polygon'"),
        ({"kind": "circle", "center_lat": 51.9, "center_lon": 4.4}, "needs center_lat"),
        ({"kind": "circle", "center_lat": 51.9, "center_lon": 4.4, "radius_m": 0}, "positive"),
        ({"kind": "circle", "center_lat": 51.9, "center_lon": 4.4, "radius_m": 5e7}, "larger"),
        ({"kind": "circle", "center_lat": 95, "center_lon": 4.4, "radius_m": 10}, "center_lat"),
        ({"kind": "circle", "center_lat": 9, "center_lon": 184, "radius_m": 10}, "center_lon"),
        ({"kind": "circle", "center_lat": 9, "center_lon": "x", "radius_m": 10}, "number"),
        ({"kind": "polygon", "geometry_geojson": "{nope"}, "not JSON"),
        ({"kind": "polygon"}, "needs a geometry"),
        (
            {"kind": "polygon", "geometry_geojson": '{"type": "Point", "coordinates": [1, 2]}'},
            "not 'Point'",
        ),
        (
            {"kind": "polygon", "geometry_geojson": '{"type": "Polygon", "coordinates": []}'},
            "empty",
        ),
        (
            {
                "kind": "polygon",
                "geometry_geojson": json.dumps(
                    {"type": "Polygon", "coordinates": [[[0, 0], [1, 1], [0, 0]]]}
                ),
            },
            "at least 4",
        ),
        ({"kind": "polygon", "geometry_geojson": square(190, 10)}, r"within \[-180, 180\]"),
        (  # Fiji drawn across 180 without splitting it: refused, not its complement
            {
                "kind": "polygon",
                "geometry_geojson": json.dumps(
                    {
                        "type": "Polygon",
                        "coordinates": [
                            [[179.5, -17], [-179.5, -17], [-179.5, -16], [179.5, -16], [179.5, -17]]
                        ],
                    }
                ),
            },
            "crosses the antimeridian.*split it",
        ),
    ],
)
def test_invalid_geofences_are_refused_and_nothing_is_written(
    tx: Tx, kwargs: dict[str, Any], message: str
) -> None:
    v0 = tx(geofence_defs.geofences_version)
    with pytest.raises(geofence_validation.InvalidGeofence, match=message) as err:
        tx(geofence_defs.add_geofence, "bad", **kwargs)
    assert "geometry_geojson" not in str(err.value)  # no internal column names
    assert tx(lambda s: s.scalars(select(Geofence)).all()) == []
    assert tx(geofence_defs.geofences_version) == v0


def test_update_geofence_validates(tx: Tx) -> None:
    gid = tx(
        lambda s: (
            geofence_defs.add_geofence(s, "port", "polygon", geometry_geojson=square(4, 51)).id
        )
    )
    v = tx(geofence_defs.geofences_version)
    with pytest.raises(geofence_validation.InvalidGeofence, match="Self-intersection"):
        tx(geofence_defs.update_geofence, gid, geometry_geojson=BOW_TIE)
    with pytest.raises(LookupError):
        tx(geofence_defs.update_geofence, gid + 100, name="x")
    with pytest.raises(TypeError, match="unknown geofence field"):
        tx(geofence_defs.update_geofence, gid, colour="red")
    assert tx(geofence_defs.geofences_version) == v
    g = tx(
        geofence_defs.update_geofence, gid, kind="circle", center_lat=51, center_lon=4, radius_m=50
    )
    assert (g.kind, g.geometry_geojson, g.radius_m) == ("circle", None, 50)


def test_replace_events_at(tx: Tx) -> None:
    tx(tracker_store.upsert_trackers, [tracker("A")])
    g1, g2, g3 = (
        tx(lambda s, n=n: geofence_defs.add_geofence(s, f"g{n}", "circle", 10, 10 + n, 100).id)
        for n in range(3)
    )
    t1 = T0 + timedelta(minutes=1)
    tx(fixtures.replace_events_at, "A", T0, {g1: "enter", g2: "enter"})
    tx(fixtures.replace_events_at, "A", t1, {g1: "exit"})
    tx(fixtures.replace_events_at, "A", T0, {g2: "exit", g3: "enter"})
    tx(fixtures.replace_events_at, "A", T0, {g2: "exit", g3: "enter"})  # idempotent
    assert tx(store_support.events_for, "A") == [
        ("A", T0, g2, "exit"),
        ("A", T0, g3, "enter"),
        ("A", t1, g1, "exit"),
    ]
    tx(fixtures.replace_events_at, "A", t1, {})
    assert tx(store_support.events_for) == [("A", T0, g2, "exit"), ("A", T0, g3, "enter")]
    with pytest.raises(ValueError, match="enter"):
        tx(fixtures.replace_events_at, "A", t1, {g1: "inside"})


# -- views


def _rows(engine: Engine, table: Any) -> list[dict[str, Any]]:
    with engine.connect() as conn:
        return [dict(r) for r in conn.execute(select(table)).mappings()]


def test_views_show_latest_location_and_occupancy(engine: Engine, tx: Tx) -> None:
    tx(tracker_store.upsert_trackers, [tracker("A"), tracker("B"), tracker("C")])
    inside = tx(
        lambda s: (
            geofence_defs.add_geofence(s, "port", "polygon", geometry_geojson=square(4.0, 51.0)).id
        )
    )
    empty = tx(lambda s: geofence_defs.add_geofence(s, "factory", "circle", 10, 10, 100).id)
    gone = tx(lambda s: geofence_defs.add_geofence(s, "old", "circle", 20, 20, 100).id)
    tx(store_support.deactivate_geofence, gone)
    a_last = report("A", 10, lat=52.0)
    tx(report_store.insert_reports, [report("A", 0), a_last, report("B", 3)])
    tx(report_store.set_addresses, [geocoded(a_last, city="Delft")], T0 + timedelta(minutes=11))
    # A entered then left, B entered, C entered
    tx(fixtures.replace_events_at, "A", T0, {inside: "enter"})
    tx(fixtures.replace_events_at, "A", T0 + timedelta(minutes=10), {inside: "exit"})
    tx(fixtures.replace_events_at, "B", T0 + timedelta(minutes=3), {inside: "enter"})
    tx(fixtures.replace_events_at, "C", T0 + timedelta(minutes=1), {inside: "enter"})

    views.note_changes(engine, views.VIEW_NAMES, ["A", "B", "C"])
    for name in views.VIEW_NAMES:
        views.refresh_view(engine, name)
    latest = {r["tracker_id"]: r for r in _rows(engine, views.LATEST_LOCATION)}
    assert set(latest) == {"A", "B"}
    assert latest["A"]["observed_at"] == a_last.observed_at
    assert latest["A"]["observed_at"].tzinfo is UTC
    assert (latest["A"]["lat"], latest["A"]["city"], latest["A"]["address"]) == (
        52.0,
        "Delft",
        "Delft harbour",
    )
    assert latest["B"]["city"] is None
    occupancy = {r["geofence_id"]: r for r in _rows(engine, views.GEOFENCE_OCCUPANCY)}
    assert set(occupancy) == {inside, empty}
    assert occupancy[inside]["trackers_inside"] == 2
    assert occupancy[inside]["last_event_at"] == T0 + timedelta(minutes=10)
    assert occupancy[empty]["trackers_inside"] == 0

    # a later report and exit show after the next refresh (twice: CONCURRENTLY path)
    tx(report_store.insert_reports, [report("B", 20)])
    tx(fixtures.replace_events_at, "B", T0 + timedelta(minutes=20), {inside: "exit"})
    views.note_changes(engine, views.VIEW_NAMES, ["B"])
    for _ in range(2):  # the second has nothing to do
        for name in views.VIEW_NAMES:
            views.refresh_view(engine, name)
    latest = {r["tracker_id"]: r for r in _rows(engine, views.LATEST_LOCATION)}
    assert latest["B"]["observed_at"] == T0 + timedelta(minutes=20)
    occupancy = {r["geofence_id"]: r for r in _rows(engine, views.GEOFENCE_OCCUPANCY)}
    assert occupancy[inside]["trackers_inside"] == 1


def _drop(engine: Engine, name: str) -> None:
    with engine.begin() as conn:
        views.drop_view(conn, name)


@pytest.mark.parametrize("name", views.VIEW_NAMES)
def test_view_health_missing_and_recreate(engine: Engine, tx: Tx, name: str) -> None:
    tx(tracker_store.upsert_trackers, [tracker("A")])
    tx(report_store.insert_reports, [report("A", 0)])
    assert views.view_health(engine, name) == "ok"
    _drop(engine, name)
    assert views.view_health(engine, name) == "missing"
    views.recreate_view(engine, name)
    assert views.view_health(engine, name) == "ok"
    if name == "latest_location":
        assert [r["tracker_id"] for r in _rows(engine, views.LATEST_LOCATION)] == ["A"]


@pytest.mark.parametrize(
    "wrong",
    ["table", "view", "columns", "no_index"],
)
def test_view_health_broken_and_recreate(engine: Engine, tx: Tx, wrong: str) -> None:
    name = "latest_location"
    pg = engine.dialect.name == "postgresql"
    _drop(engine, name)
    with engine.begin() as conn:
        if wrong == "table":  # on SQLite a table is right, so give it the wrong columns
            conn.execute(text(f"CREATE TABLE {name} (tracker_id TEXT, whatever TEXT)"))
        elif wrong == "view":
            conn.execute(text(f"CREATE VIEW {name} AS SELECT tracker_id FROM location_history"))
        elif wrong == "columns":
            kind = "MATERIALIZED VIEW" if pg else "TABLE"
            conn.execute(
                text(f"CREATE {kind} {name} AS SELECT tracker_id, lat FROM location_history")
            )
        else:
            views.create_view(conn, name)
            conn.execute(text("DROP INDEX uq_latest_location_tracker_id"))
    assert views.view_health(engine, name) == "broken"
    views.recreate_view(engine, name)
    assert views.view_health(engine, name) == "ok"
    views.refresh_view(engine, name)


def test_ensure_views_and_unknown_names(engine: Engine) -> None:
    _drop(engine, "geofence_occupancy")
    assert views.ensure_views(engine) == {"latest_location": "ok", "geofence_occupancy": "missing"}
    assert views.ensure_views(engine) == {"latest_location": "ok", "geofence_occupancy": "ok"}
    for fn in (views.view_health, views.refresh_view, views.recreate_view):
        with pytest.raises(ValueError, match="latest_location, geofence_occupancy"):
            fn(engine, "nope")


def test_an_old_materialized_view_is_replaced_by_a_table(pg_url: str) -> None:
    """A database from before revision 0006 had materialized views: found broken,
    recreated as the incremental table, with the right rows."""
    upgrade(pg_url)
    engine = make_engine(pg_url)
    factory = session_factory(engine)
    try:
        with factory.begin() as s:
            tracker_store.upsert_trackers(s, [tracker("A")])
            report_store.insert_reports(s, [report("A", 0), report("A", 5, lat=52.5)])
        _drop(engine, "latest_location")
        with engine.begin() as conn:
            conn.execute(
                text(
                    "CREATE MATERIALIZED VIEW latest_location AS SELECT tracker_id, "
                    "max(observed_at) AS observed_at FROM location_history GROUP BY tracker_id"
                )
            )
            conn.execute(text("CREATE UNIQUE INDEX ON latest_location (tracker_id)"))
        assert views.view_health(engine, "latest_location") == "broken"
        views.recreate_view(engine, "latest_location")
        assert views.view_health(engine, "latest_location") == "ok"
        assert [(r["tracker_id"], r["lat"]) for r in _rows(engine, views.LATEST_LOCATION)] == [
            ("A", 52.5)
        ]
    finally:
        engine.dispose()


def test_refresh_rewrites_only_the_recorded_trackers(engine: Engine, tx: Tx) -> None:
    def latest() -> dict[str, float]:
        return {r["tracker_id"]: r["lat"] for r in _rows(engine, views.LATEST_LOCATION)}

    tx(tracker_store.upsert_trackers, [tracker("A"), tracker("B")])
    tx(report_store.insert_reports, [report("A", 0, lat=50.0), report("B", 0, lat=51.0)])
    views.note_changes(engine, ["latest_location"], ["A"])
    assert views.refresh_view(engine, "latest_location") == 1
    assert latest() == {"A": 50.0}  # B changed too, but nobody said so
    assert views.refresh_view(engine, "latest_location") == 0  # nothing recorded
    # a late (older) report changes nothing; a newer one does
    tx(report_store.insert_reports, [report("A", -5, lat=49.0), report("B", 10, lat=51.5)])
    views.note_changes(engine, ["latest_location"], ["A", "B", "B"])
    assert views.refresh_view(engine, "latest_location") == 2
    assert latest() == {"A": 50.0, "B": 51.5}
    # a notice without trackers: anything may have changed, the view is rebuilt
    tx(report_store.insert_reports, [report("A", 20, lat=50.5)])
    views.note_changes(engine, ["latest_location"], None)
    assert views.refresh_view(engine, "latest_location") is None
    assert latest() == {"A": 50.5, "B": 51.5}
    # a tracker whose reports are all gone (retention) keeps its last position...
    tx(lambda s: s.execute(text("DELETE FROM location_history WHERE tracker_id = 'B'")))
    views.note_changes(engine, ["latest_location"], ["A", "B"])
    assert views.refresh_view(engine, "latest_location") == 2
    assert latest() == {"A": 50.5, "B": 51.5}
    # ... and a deleted tracker leaves the view; the others stay
    tx(lambda s: s.execute(text("DELETE FROM trackers WHERE external_id = 'B'")))
    views.note_changes(engine, ["latest_location"], ["A", "B"])
    assert views.refresh_view(engine, "latest_location") == 2
    assert latest() == {"A": 50.5}


def test_occupancy_follows_the_changes(engine: Engine, tx: Tx) -> None:
    """Enter/exit events, a late report's correction (events replaced at an instant),
    a geofence added and one deactivated: after each refresh of just the trackers
    concerned, the counts are the ones worked out by hand."""
    tx(tracker_store.upsert_trackers, [tracker(t) for t in "ABCD"])
    port = tx(lambda s: geofence_defs.add_geofence(s, "port", "circle", 51.9, 4.4, 500).id)
    plant = tx(lambda s: geofence_defs.add_geofence(s, "plant", "circle", 52.0, 4.5, 500).id)

    def at(minute: float) -> datetime:
        return T0 + timedelta(minutes=minute)

    def refresh(*trackers: str) -> dict[int, tuple[int, datetime | None]]:
        views.note_changes(engine, ["geofence_occupancy"], trackers)
        views.refresh_view(engine, "geofence_occupancy")
        return {
            r["geofence_id"]: (r["trackers_inside"], r["last_event_at"])
            for r in _rows(engine, views.GEOFENCE_OCCUPANCY)
        }

    assert refresh() == {port: (0, None), plant: (0, None)}
    tx(fixtures.replace_events_at, "A", at(0), {port: "enter"})
    tx(fixtures.replace_events_at, "B", at(1), {port: "enter", plant: "enter"})
    tx(fixtures.replace_events_at, "C", at(2), {plant: "enter"})
    assert refresh("A", "B", "C") == {port: (2, at(1)), plant: (2, at(2))}
    tx(fixtures.replace_events_at, "A", at(10), {port: "exit"})
    tx(fixtures.replace_events_at, "B", at(11), {plant: "exit"})
    assert refresh("A", "B") == {port: (1, at(10)), plant: (1, at(11))}
    # a late report for B shows it never left the plant at 11: that event goes
    tx(fixtures.replace_events_at, "B", at(11), {})
    assert refresh("B") == {port: (1, at(10)), plant: (2, at(2))}
    # D enters a new geofence; the plant is switched off
    depot = tx(lambda s: geofence_defs.add_geofence(s, "depot", "circle", 52.1, 4.6, 500).id)
    tx(store_support.deactivate_geofence, plant)
    tx(fixtures.replace_events_at, "D", at(12), {depot: "enter"})
    assert refresh("D") == {port: (1, at(10)), depot: (1, at(12))}
    # the plant back on: its count is what its trackers' latest events say
    tx(lambda s: s.execute(text(f"UPDATE geofences SET active = true WHERE id = {plant}")))
    assert refresh()[plant] == (2, at(2))
    views.recreate_view(engine, "geofence_occupancy")  # a rebuild agrees
    assert refresh() == {port: (1, at(10)), plant: (2, at(2)), depot: (1, at(12))}


def test_session_type_is_usable(engine: Engine) -> None:
    with session_factory(engine)() as s:
        assert isinstance(s, Session)


def test_claim_incomplete_counts_every_resend_it_hands_out(tx: Tx) -> None:
    tx(tracker_store.upsert_trackers, [tracker("A")])
    tx(report_store.insert_reports, [report("A", m) for m in (0, 10)])

    def claim(at: datetime, max_republish: int = 2, **kw: Any) -> Any:  # grace: 5 min
        return tx(
            reconcile_store.claim_incomplete,
            at - timedelta(minutes=5),
            100,
            max_republish,
            at,
            **kw,
        )

    late = T0 + timedelta(hours=1)
    got, _ = claim(late)
    assert [r.republish_count for r in got] == [0, 0]  # as read, before the mark
    assert claim(late + timedelta(minutes=1)) == ([], [])  # counted: not due again yet
    assert len(claim(late + timedelta(hours=1))[0]) == 2
    assert claim(late + timedelta(hours=2)) == ([], [])  # 2 re-sends: given up
    assert tx(reconcile_store.count_abandoned, 2) == 2
    assert claim(late + timedelta(hours=3), 5, geocode=False) == ([], [])

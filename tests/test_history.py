"""Time-partitioned history (PostgreSQL) and retention (both dialects), on real servers."""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import Engine, event, text

from schemas import history, reconcile_store, report_store, tracker_store, views
from schemas.db import make_engine, session_factory, upgrade
from schemas.events import LocationReported
from tests import store_support

NOW = datetime.now(UTC)
THIS_MONTH = history.month_start(NOW)


def _months_back(n: int) -> datetime:
    m = THIS_MONTH
    for _ in range(n):
        m = history.month_start(m - timedelta(days=1))
    return m


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    upgrade(db_url)
    eng = make_engine(db_url)
    yield eng
    eng.dispose()


@pytest.fixture
def pg(pg_url: str) -> Iterator[Engine]:
    upgrade(pg_url)
    eng = make_engine(pg_url)
    yield eng
    eng.dispose()


def _trackers(engine: Engine, *ids: str) -> None:
    with session_factory(engine).begin() as s:
        tracker_store.upsert_trackers(s, [{"external_id": t} for t in ids])


def _report(tracker: str, at: datetime) -> LocationReported:
    return LocationReported(
        tracker_id=tracker, observed_at=at, lat=51.9, lon=4.4, accuracy_m=5.0,
        source="test", fetched_at=at,
    )  # fmt: skip


def _insert(engine: Engine, reports: list[LocationReported]) -> int:
    with session_factory(engine).begin() as s:
        return len(report_store.insert_reports(s, reports))


def _count(engine: Engine, sql: str) -> int:
    with engine.connect() as conn:
        return int(conn.scalar(text(sql)) or 0)


def test_postgresql_tables_are_partitioned_by_month_with_a_default(pg: Engine) -> None:
    with pg.connect() as conn:
        for table in history.PARTITIONED:
            assert history.is_partitioned(conn, table)
            parts = history.partitions(conn, table)
            assert parts[0].default and parts[0].name == f"{table}_default"
            starts = [p.start for p in parts[1:]]
            assert THIS_MONTH in starts
            assert len([s for s in starts if s and s > THIS_MONTH]) == history.AHEAD_MONTHS


def test_natural_key_stays_unique_and_far_reports_land_in_the_default(pg: Engine) -> None:
    _trackers(pg, "A")
    far_past = datetime(1999, 1, 1, tzinfo=UTC)
    far_future = NOW + timedelta(days=3 * 365)
    rs = [_report("A", NOW), _report("A", far_past), _report("A", far_future)]
    assert _insert(pg, rs) == 3
    assert _insert(pg, rs) == 0  # the natural key holds across partitions
    with pg.connect() as conn:
        assert history.default_rows(conn)["location_history"] == 2
        st = history.status(pg, NOW, None)
    dflt = next(p for p in st.partitions if p.name == "location_history_default")
    assert dflt.rows == 2 and dflt.oldest == far_past
    assert _count(pg, "SELECT count(*) FROM location_history") == 3


def test_partitions_are_created_ahead_once_and_take_their_rows_from_the_default(
    pg: Engine,
) -> None:
    _trackers(pg, "A")
    later = NOW + timedelta(days=200)  # past the months created at upgrade: the default
    assert _insert(pg, [_report("A", later)]) == 1
    with pg.connect() as conn:
        assert history.default_rows(conn)["location_history"] == 1
    with pg.begin() as conn:
        created = history.ensure_partitions(conn, later)
    assert created and f"location_history_p{later:%Y%m}" in created
    with pg.begin() as conn:
        assert history.ensure_partitions(conn, later) == []  # nothing left to do
    with pg.connect() as conn:
        assert history.default_rows(conn)["location_history"] == 0
        n = conn.scalar(text(f"SELECT count(*) FROM location_history_p{later:%Y%m}"))
    assert n == 1
    assert _insert(pg, [_report("A", later)]) == 0  # still the same natural key


def test_a_second_process_finds_the_lease_taken(pg: Engine) -> None:
    with pg.begin() as holder:
        assert history.ensure_partitions(holder, NOW) == []
        with pg.begin() as other:
            assert history.ensure_partitions(other, NOW + timedelta(days=400)) is None


def test_prune_drops_old_partitions_and_keeps_the_latest_location(pg: Engine) -> None:
    old = _months_back(14)
    with pg.begin() as conn:  # a partition for an old month, as the migration makes them
        history.create_partition(conn, "location_history", old)
        history.create_partition(conn, "geofence_events", old)
    _trackers(pg, "OLD", "NEW")
    _insert(pg, [_report("OLD", old + timedelta(days=1)), _report("NEW", NOW)])
    views.note_changes(pg, ["latest_location"], ["OLD", "NEW"])
    views.refresh_view(pg, "latest_location")
    cutoff = NOW - timedelta(days=400)
    plan = history.prune(pg, cutoff, dry_run=True)
    assert {p.name for p in plan.partitions} == {
        f"location_history_p{old:%Y%m}",
        f"geofence_events_p{old:%Y%m}",
    }
    assert _count(pg, "SELECT count(*) FROM location_history") == 2  # dry run: nothing gone
    history.prune(pg, cutoff)
    with pg.connect() as conn:
        left = {p.name for p in history.partitions(conn, "location_history")}
    assert f"location_history_p{old:%Y%m}" not in left
    assert _count(pg, "SELECT count(*) FROM location_history") == 1
    # the view keeps OLD's last position, through a refresh and a rebuild
    views.note_changes(pg, ["latest_location"], ["OLD", "NEW"])
    views.refresh_view(pg, "latest_location")
    views.note_changes(pg, ["latest_location"], None)  # anything changed: a rebuild
    assert views.refresh_view(pg, "latest_location") is None
    assert _count(pg, "SELECT count(*) FROM latest_location") == 2


def test_sqlite_prune_is_a_batched_delete(tmp_path: Any) -> None:
    url = f"sqlite:///{tmp_path / 'h.db'}"
    upgrade(url)
    eng = make_engine(url)
    try:
        _trackers(eng, "A")
        base = NOW - timedelta(days=500)
        _insert(eng, [_report("A", base + timedelta(minutes=i)) for i in range(3000)])
        _insert(eng, [_report("A", NOW)])
        result = history.prune(eng, NOW - timedelta(days=400))
        assert result.rows["location_history"] == 3000
        assert result.longest_batch_s < 0.5
        assert _count(eng, "SELECT count(*) FROM location_history") == 1
        st = history.status(eng, NOW, 400)
        assert st.partitions[0].rows == 1
    finally:
        eng.dispose()


def test_prune_while_two_writers_insert(pg: Engine) -> None:
    """Dropping a month while two writers insert: no insert waits long, none fails."""
    old = _months_back(15)
    with pg.begin() as conn:
        history.create_partition(conn, "location_history", old)
    _trackers(pg, "A", "B", "OLD")
    with pg.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO location_history (tracker_id, observed_at, lat, lon, source,"
                " fetched_at) SELECT 'OLD', CAST(:t AS timestamptz) + g * interval '1 minute',"
                " 1, 2, 'seed', now() FROM generate_series(0, 20000) g"
            ),
            {"t": old},
        )
    stop = threading.Event()
    worst: dict[str, float] = {}
    errors: list[BaseException] = []

    def writer(tracker: str) -> None:
        eng = make_engine(str(pg.url.render_as_string(hide_password=False)))
        i = 0
        try:
            while not stop.is_set():
                t0 = time.perf_counter()
                _insert(eng, [_report(tracker, NOW - timedelta(seconds=i))])
                worst[tracker] = max(worst.get(tracker, 0.0), time.perf_counter() - t0)
                i += 1
        except BaseException as exc:
            errors.append(exc)
        finally:
            eng.dispose()

    threads = [threading.Thread(target=writer, args=(t,)) for t in ("A", "B")]
    for t in threads:
        t.start()
    try:
        deadline = time.monotonic() + 10
        while len(worst) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        result = history.prune(pg, NOW - timedelta(days=400))
        time.sleep(0.2)
    finally:
        stop.set()
        for t in threads:
            t.join(10)
    assert not errors, errors
    assert [p.name for p in result.partitions] == [f"location_history_p{old:%Y%m}"]
    assert _count(pg, "SELECT count(*) FROM location_history WHERE tracker_id = 'OLD'") == 0
    assert max(worst.values()) < 1.0, worst  # generous for a loaded machine
    assert result.seconds < 5


def _downgrade(url: str, revision: str) -> None:
    from alembic import command

    from schemas.db import _alembic_config

    eng = make_engine(url)
    try:
        with eng.connect() as conn:
            cfg = _alembic_config(url)
            cfg.attributes["connection"] = conn
            command.downgrade(cfg, revision)
            conn.commit()
    finally:
        eng.dispose()


def test_migration_converts_todays_tables_with_their_data(pg_url: str) -> None:
    upgrade(pg_url, "0008")
    eng = make_engine(pg_url)
    try:
        with eng.begin() as conn:
            conn.execute(text("INSERT INTO trackers (external_id, name) VALUES ('A', 'a')"))
            conn.execute(
                text(
                    "INSERT INTO geofences (name, kind, geometry_geojson)"
                    " VALUES ('g', 'polygon', '{}')"
                )
            )
            conn.execute(
                text(
                    "INSERT INTO location_history (tracker_id, observed_at, lat, lon, source,"
                    " fetched_at) SELECT 'A', CAST(:t AS timestamptz) - g * interval '1 day',"
                    " 1, 2, 's', now() FROM generate_series(0, 99) g"
                ),
                {"t": NOW},
            )
            conn.execute(
                text(
                    "INSERT INTO location_history (tracker_id, observed_at, lat, lon, source,"
                    " fetched_at) VALUES ('A', '1990-01-01 00:00+00', 1, 2, 's', now())"
                )
            )
            conn.execute(
                text(
                    "INSERT INTO geofence_events (tracker_id, geofence_id, observed_at, kind)"
                    " SELECT 'A', 1, now() - g * interval '1 day', 'enter'"
                    " FROM generate_series(0, 9) g"
                )
            )
            ids = list(conn.scalars(text("SELECT id FROM location_history ORDER BY id")))
        upgrade(pg_url)
        with eng.connect() as conn:
            assert history.is_partitioned(conn, "location_history")
            assert list(conn.scalars(text("SELECT id FROM location_history ORDER BY id"))) == ids
            assert conn.scalar(text("SELECT count(*) FROM geofence_events")) == 10
            assert history.default_rows(conn) == {"location_history": 1, "geofence_events": 0}
            months = [p.start for p in history.partitions(conn, "location_history") if p.start]
        assert history.month_start(NOW - timedelta(days=99)) in months
        # the sequence, the keys and the foreign key survived the swap
        assert _insert(eng, [_report("A", NOW - timedelta(days=3))]) == 0  # a duplicate
        assert _insert(eng, [_report("A", NOW + timedelta(seconds=1))]) == 1
        with eng.connect() as conn:
            assert conn.scalar(text("SELECT max(id) FROM location_history")) > max(ids)
        with pytest.raises(Exception, match="foreign key"), eng.begin() as conn:
            conn.execute(
                text(
                    "INSERT INTO location_history (tracker_id, observed_at, lat, lon, source,"
                    " fetched_at) VALUES ('nobody', now(), 1, 2, 's', now())"
                )
            )
        _downgrade(pg_url, "0008")  # and back: plain tables, same rows
        with eng.connect() as conn:
            assert not history.is_partitioned(conn, "location_history")
            assert conn.scalar(text("SELECT count(*) FROM location_history")) == 102
    finally:
        eng.dispose()


def test_the_exporter_reads_partition_sizes(pg_url: str, pg: Engine) -> None:
    from ops.exporter import FreshnessReader

    reader = FreshnessReader(pg_url)
    try:
        fresh = reader.read()
    finally:
        reader.close()
    names = {(t, p) for t, p, _rows, _size in fresh.partitions}
    assert ("location_history", "location_history_default") in names
    assert ("geofence_events", f"geofence_events_p{THIS_MONTH:%Y%m}") in names
    assert all(size > 0 for *_, size in fresh.partitions)


async def test_the_reconciler_keeps_partitions_ahead(pg_url: str, pg: Engine) -> None:
    from processors.database import Database
    from processors.reconciler import Reconciler

    db = Database(pg_url)
    try:
        rec = Reconciler(db, None, {}, lambda: NOW, retention_days=400)  # type: ignore[arg-type]
        later = NOW + timedelta(days=150)
        await rec.maintain(later)
        with pg.connect() as conn:
            starts = {p.start for p in history.partitions(conn, "location_history")}
        m = history.month_start(later)
        for _ in range(history.AHEAD_MONTHS + 1):
            assert m in starts
            m = history.next_month(m)
    finally:
        db.dispose()


_SCANNED = re.compile(r"Scan .*on ((?:location_history|geofence_events)_(?:p\d{6}|default))(?!\w)")


def _partitions_read(engine: Engine, work: Any) -> dict[str, set[str]]:
    """``work(session)`` with every statement on the history explained (EXPLAIN ANALYZE
    in a savepoint, rolled back): the partitions each statement read, by its first
    words."""
    read: dict[str, set[str]] = {}

    def explain(conn: Any, cursor: Any, statement: str, params: Any, ctx: Any, many: bool) -> None:
        if "EXPLAIN" in statement or "location_history" not in statement:
            return
        raw = conn.connection.driver_connection
        raw.execute("SAVEPOINT ex")
        # the plans of a large history (index paths): on these few rows the planner
        # would hash-join or scan whole partitions, cheaper here and never pruned
        for knob in ("enable_seqscan", "enable_hashjoin", "enable_mergejoin"):
            raw.execute(f"SET LOCAL {knob} = off")
        try:
            plan = raw.execute(
                "EXPLAIN (ANALYZE, COSTS OFF, TIMING OFF, SUMMARY OFF) " + statement,
                params[0] if many else params,
            ).fetchall()
        finally:
            raw.execute("ROLLBACK TO SAVEPOINT ex")
        key = " ".join(statement.split()[:8])
        read[key] = read.get(key, set()) | {
            m.group(1)
            for (line,) in plan
            if "never executed" not in line and (m := _SCANNED.search(line)) is not None
        }

    event.listen(engine, "before_cursor_execute", explain)
    try:
        with session_factory(engine).begin() as s:
            work(s)
    finally:
        event.remove(engine, "before_cursor_execute", explain)
    return read


def test_the_stages_writes_touch_only_their_partition(pg: Engine) -> None:
    from schemas import geofence_store
    from schemas.events import LocationGeocoded

    for n in range(1, 4):
        with pg.begin() as conn:
            history.create_partition(conn, "location_history", _months_back(n))
    _trackers(pg, "A")
    _insert(pg, [_report("A", _months_back(n) + timedelta(days=2)) for n in range(1, 4)])
    _insert(pg, [_report("A", NOW)])
    this = f"location_history_p{NOW:%Y%m}"
    geocoded = LocationGeocoded(
        tracker_id="A", observed_at=NOW, lat=51.9, lon=4.4, city="c", country_code="NL",
        country="n", address="a",
    )  # fmt: skip
    with pg.connect() as conn:
        rid = conn.scalar(
            text("SELECT id FROM location_history WHERE observed_at = :t"), {"t": NOW}
        )

    def stages(s: Any) -> None:
        report_store.set_addresses(s, [geocoded], NOW)
        store_support.mark_geofence_checked(s, [("A", NOW)], NOW)
        geofence_store.save(
            s, [geofence_store.StatusRow(rid, "ok", None, True, NOW)], [], [], [], NOW
        )
        reconcile_store.mark_republished(s, [rid], NOW, (NOW, NOW))

    read = _partitions_read(pg, stages)
    assert read and all(parts == {this} for parts in read.values()), read
    # a track of the last day reads this month's partition (and the default), not older ones
    from ops import fleet

    read = _partitions_read(pg, lambda s: fleet.map_data(s, NOW, 300))
    track = next(v for k, v in read.items() if "location_history.tracker_id," in k)
    assert this in track and not any(p.endswith(f"{_months_back(2):%Y%m}") for p in track)


def test_the_history_commands_on_sqlite(tmp_path: Any) -> None:
    from typer.testing import CliRunner

    from ops.cli import app

    url = f"sqlite:///{tmp_path / 'c.db'}"
    upgrade(url)
    eng = make_engine(url)
    try:
        _trackers(eng, "A")
        _insert(eng, [_report("A", NOW - timedelta(days=500)), _report("A", NOW)])
    finally:
        eng.dispose()
    env = {"TRACKSTREAM_DATABASE_URL": url, "COLUMNS": "200"}
    run = CliRunner().invoke
    bad = run(app, ["history", "prune"], env=env)
    assert bad.exit_code == 2 and "--older-than" in bad.output
    assert run(app, ["history", "prune", "--older-than", "10x"], env=env).exit_code == 2
    dry = run(app, ["history", "prune", "--older-than", "400d", "--dry-run", "--json"], env=env)
    assert dry.exit_code == 0 and '"location_history": 1' in dry.output
    done = run(app, ["history", "prune", "--older-than", "400d"], env=env)
    assert done.exit_code == 0 and "location_history: dropped 1 rows" in done.output
    st = run(
        app,
        ["history", "status", "--json"],
        env={**env, "TRACKSTREAM_HISTORY_RETENTION_DAYS": "400"},
    )
    assert st.exit_code == 0 and '"rows": 1' in st.output and '"retention_days": 400' in st.output

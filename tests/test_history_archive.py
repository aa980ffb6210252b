"""``history prune --archive`` and ``history restore``: Parquet on real PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, text

from schemas import archive, history
from schemas.db import make_engine, upgrade
from tests.test_history import _count, _months_back

pytest.importorskip("pyarrow", reason="pyarrow (the [archive] extra, in [dev]) is not installed")

NOW = datetime.now(UTC)
OLD = _months_back(14)
CUTOFF = NOW - timedelta(days=400)


@pytest.fixture
def pg(pg_url: str) -> Iterator[Engine]:
    upgrade(pg_url)
    eng = make_engine(pg_url)
    with eng.begin() as conn:
        for table in history.PARTITIONED:
            history.create_partition(conn, table, OLD)
        conn.execute(text("INSERT INTO trackers (external_id, name) VALUES ('A', 'a'), ('B', 'b')"))
        conn.execute(
            text(
                "INSERT INTO geofences (name, kind, geometry_geojson) VALUES ('g', 'polygon', '{}')"
            )
        )
        # reports of the old month with every column's kinds of value (NULLs, text, times)
        conn.execute(
            text(
                "INSERT INTO location_history (tracker_id, observed_at, lat, lon, accuracy_m,"
                " source, fetched_at, city, country_code, address, geocoded_at,"
                " geofence_checked_at, republish_count, fix_status, fence_state, time_zone)"
                " SELECT CASE WHEN g % 2 = 0 THEN 'A' ELSE 'B' END,"
                " CAST(:t AS timestamptz) + g * interval '1 minute', 51.9 + g * 1e-6, 4.4,"
                " CASE WHEN g % 3 = 0 THEN NULL ELSE g * 0.5 END, 'seed',"
                " CAST(:t AS timestamptz) + g * interval '1 minute' + interval '3 s',"
                " 'Rotterdam', 'NL', 'Coolsingel ' || g || ' \u00e9', now(), now(), g % 4,"
                " 'ok', CASE WHEN g % 5 = 0 THEN '{\"1\": true}' END, 'Europe/Amsterdam'"
                " FROM generate_series(0, 2999) g"
            ),
            {"t": OLD + timedelta(days=1)},
        )
        conn.execute(
            text(
                "INSERT INTO geofence_events (tracker_id, geofence_id, observed_at, kind,"
                " report_at)"
                " SELECT 'A', 1, CAST(:t AS timestamptz) + g * interval '1 hour',"
                " CASE WHEN g % 2 = 0 THEN 'enter' ELSE 'exit' END,"
                " CAST(:t AS timestamptz) + g * interval '1 hour' FROM generate_series(0, 99) g"
            ),
            {"t": OLD + timedelta(days=1)},
        )
        # a straggler in the default partition, older than the cut-off, and recent rows
        conn.execute(
            text(
                "INSERT INTO location_history (tracker_id, observed_at, lat, lon, source,"
                " fetched_at) VALUES ('A', '1999-01-01 00:00+00', 1, 2, 's', now()),"
                " ('A', now(), 1, 2, 's', now())"
            )
        )
    yield eng
    eng.dispose()


def _rows(eng: Engine, table: str) -> list[Any]:
    with eng.connect() as conn:
        return [
            tuple(r)
            for r in conn.execute(
                text(f"SELECT * FROM {table} WHERE observed_at < :c ORDER BY id"), {"c": CUTOFF}
            )
        ]


def test_archive_and_restore_round_trip(pg: Engine, tmp_path: Path) -> None:
    before = {t: _rows(pg, t) for t in history.PARTITIONED}
    assert len(before["location_history"]) == 3001 and len(before["geofence_events"]) == 100
    recent = _count(
        pg, "SELECT count(*) FROM location_history WHERE observed_at >= now() - interval '1 day'"
    )

    result = history.prune(pg, CUTOFF, archive=tmp_path)
    names = sorted(p.name for p in result.archives)
    assert names == sorted(
        [
            f"location_history_p{OLD:%Y%m}.parquet",
            f"geofence_events_p{OLD:%Y%m}.parquet",
            f"location_history_default-before-{CUTOFF.astimezone(UTC):%Y%m%dT%H%M%SZ}.parquet",
        ]
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == names  # no temporary file left
    for table in history.PARTITIONED:
        assert _rows(pg, table) == []
    assert _count(pg, "SELECT count(*) FROM location_history") == recent == 1

    done = archive.restore(pg, sorted(tmp_path.iterdir()))
    assert sum(r.inserted for r in done) == 3101
    for table in history.PARTITIONED:
        assert _rows(pg, table) == before[table], table  # every column of every row
    with pg.connect() as conn:  # the month is a partition again; the straggler in the default
        assert OLD in {p.start for p in history.partitions(conn, "location_history")}
        assert history.default_rows(conn)["location_history"] == 1

    again = archive.restore(pg, sorted(tmp_path.iterdir()))  # idempotent
    assert [r.inserted for r in again] == [0, 0, 0]
    assert _rows(pg, "location_history") == before["location_history"]
    with pg.begin() as conn:  # new ids stay above the restored ones
        new = conn.scalar(
            text(
                "INSERT INTO location_history (tracker_id, observed_at, lat, lon, source,"
                " fetched_at) VALUES ('B', now(), 1, 2, 's', now()) RETURNING id"
            )
        )
    assert new > max(r[0] for r in before["location_history"])


def test_a_failed_archive_write_drops_nothing(
    pg: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import pyarrow.parquet as pq

    before = {t: _rows(pg, t) for t in history.PARTITIONED}
    with pg.connect() as conn:
        parts = {t: history.partitions(conn, t) for t in history.PARTITIONED}

    def full(self: Any, *args: Any, **kwargs: Any) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pq.ParquetWriter, "write_table", full)
    with pytest.raises(archive.ArchiveError, match="No space left"):
        history.prune(pg, CUTOFF, archive=tmp_path)
    assert list(tmp_path.iterdir()) == []  # no file, whole or partial
    for table in history.PARTITIONED:
        assert _rows(pg, table) == before[table]
    with pg.connect() as conn:  # attached again, same name and bounds
        for table in history.PARTITIONED:
            assert [(p.name, p.start, p.end) for p in history.partitions(conn, table)] == [
                (p.name, p.start, p.end) for p in parts[table]
            ]
        assert history.default_rows(conn)["location_history"] == 1  # the straggler

    monkeypatch.undo()
    result = history.prune(pg, CUTOFF, archive=tmp_path)  # and it works the next time
    assert len(result.archives) == 3
    assert _rows(pg, "location_history") == []


def test_restore_refuses_a_file_that_is_not_an_archive(pg: Engine, tmp_path: Path) -> None:
    bad = tmp_path / "x.parquet"
    bad.write_bytes(b"not parquet")
    with pytest.raises(archive.ArchiveError, match="not a Parquet file"):
        archive.restore(pg, [bad])

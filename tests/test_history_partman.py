"""The history's partitions handed to pg_partman, on a real PostgreSQL that has it.

Fails under CI=true when the server has no pg_partman (ops/bootstrap.sh installs
postgresql-15-partman with the system packages); skips with the reason otherwise."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import Engine, text

from schemas import history, partman
from schemas.db import make_engine, upgrade
from tests.conftest import IN_CI
from tests.test_history import _count, _insert, _months_back, _report, _trackers

NOW = datetime.now(UTC)
THIS_MONTH = history.month_start(NOW)


@pytest.fixture
def pg(pg_url: str) -> Iterator[Engine]:
    upgrade(pg_url)
    eng = make_engine(pg_url)
    with eng.connect() as conn:
        has = partman.available(conn)
    if not has:
        eng.dispose()
        message = "the PostgreSQL server has no pg_partman (apt-get install postgresql-15-partman)"
        if IN_CI:
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    yield eng
    eng.dispose()


def _names(eng: Engine, table: str) -> list[str]:
    with eng.connect() as conn:
        return [p.name for p in history.partitions(conn, table)]


def _months(eng: Engine, table: str) -> set[datetime]:
    with eng.connect() as conn:
        return {p.start for p in history.partitions(conn, table) if p.start is not None}


def test_enable_hands_over_keeping_every_row(pg: Engine) -> None:
    old = _months_back(14)
    with pg.begin() as conn:
        history.create_partition(conn, "location_history", old)
    _trackers(pg, "A")
    far_past = datetime(1999, 1, 1, tzinfo=UTC)
    far_future = NOW + timedelta(days=3 * 365)
    rows = [_report("A", t) for t in (old + timedelta(days=2), NOW, far_past, far_future)]
    assert _insert(pg, rows) == 4
    before = _months(pg, "location_history")

    assert partman.enable(pg, retention_days=None) == list(history.PARTITIONED)
    assert partman.enable(pg) == []  # already: nothing to do

    with pg.connect() as conn:
        assert set(partman.managed(conn)) == set(history.PARTITIONED)
        assert history.default_rows(conn)["location_history"] == 2  # far past and future
    names = _names(pg, "location_history")
    assert "location_history_default" in names
    assert f"location_history_p{old:%Y_%m}" in names and f"location_history_p{NOW:%Y_%m}" in names
    assert before <= _months(pg, "location_history")  # every month kept, renamed
    assert _count(pg, "SELECT count(*) FROM location_history") == 4
    assert _insert(pg, rows) == 0  # the natural key holds across the new partitions


def test_partman_creates_ahead_and_ours_stands_aside(pg: Engine) -> None:
    partman.enable(pg, premake=3)
    months = _months(pg, "location_history")
    # our maintenance, even a year on, creates nothing for a table partman manages
    with pg.begin() as conn:
        assert history.ensure_partitions(conn, NOW + timedelta(days=365)) == []
    assert _months(pg, "location_history") == months
    with pg.begin() as conn:
        conn.execute(text("UPDATE partman.part_config SET premake = 8"))
    partman.run(pg)
    ahead = THIS_MONTH
    for _ in range(8):
        ahead = history.next_month(ahead)
    for table in history.PARTITIONED:
        got = _months(pg, table)
        assert ahead in got, f"{table}: pg_partman did not create {ahead:%Y-%m}"
        assert f"{table}_p{ahead:%Y_%m}" in _names(pg, table)
    _trackers(pg, "A")
    assert _insert(pg, [_report("A", ahead + timedelta(days=3))]) == 1
    with pg.connect() as conn:
        assert history.default_rows(conn)["location_history"] == 0  # it has its month


def test_partman_retention_drops_old_months_and_our_prune_leaves_them(pg: Engine) -> None:
    old = _months_back(15)
    with pg.begin() as conn:
        for table in history.PARTITIONED:
            history.create_partition(conn, table, old)
    _trackers(pg, "OLD", "NEW")
    _insert(pg, [_report("OLD", old + timedelta(days=1)), _report("NEW", NOW)])
    partman.enable(pg, retention_days=400)
    # our prune no longer drops partman's partitions (it only trims the rest)
    result = history.prune(pg, NOW - timedelta(days=400))
    assert result.partitions == []
    assert f"location_history_p{old:%Y_%m}" in _names(pg, "location_history")
    partman.run(pg)
    for table in history.PARTITIONED:
        assert old not in _months(pg, table)
        assert THIS_MONTH in _months(pg, table)
    assert _count(pg, "SELECT count(*) FROM location_history") == 1
    with pg.connect() as conn:
        st = history.status(pg, NOW, None)
        assert {m.retention for m in partman.managed(conn).values()} == {"400 days"}
    assert set(st.partman) == set(history.PARTITIONED)


def test_no_race_between_partman_and_our_maintenance(pg: Engine) -> None:
    """pg_partman's maintenance, ours (the reconciler's round) and prune, at once, over
    and over: none fails, none creates or drops what the other manages."""
    partman.enable(pg, retention_days=400)
    errors: list[BaseException] = []
    url = pg.url.render_as_string(hide_password=False)

    def loop(job: str) -> None:
        eng = make_engine(url)
        try:
            for i in range(15):
                if job == "partman":
                    with eng.begin() as conn:
                        conn.execute(
                            text("UPDATE partman.part_config SET premake = :p"), {"p": 3 + i}
                        )
                    partman.run(eng)
                elif job == "ours":
                    with eng.begin() as conn:
                        got = history.ensure_partitions(conn, NOW + timedelta(days=31 * i))
                        assert got in ([], None), got
                else:
                    assert history.prune(eng, NOW - timedelta(days=400)).partitions == []
        except BaseException as exc:
            errors.append(exc)
        finally:
            eng.dispose()

    threads = [threading.Thread(target=loop, args=(j,)) for j in ("partman", "ours", "prune")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    for table in history.PARTITIONED:
        names = _names(pg, table)
        assert all(n.endswith("_default") or ("_p" in n and n.count("_") >= 3) for n in names)
        assert len(_months(pg, table)) == len(names) - 1  # one default, months all distinct

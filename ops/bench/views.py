"""``trackstream bench --views``: what a view refresh costs as the history grows.

For each history size (reports per tracker) a fresh PostgreSQL database gets the same
trackers, that many reports each (and a geofence event at every tenth report); then,
``rounds`` times, ``changed`` trackers get a new report and an event, are recorded as
changed, and both views are refreshed. The median refresh time per view is reported,
next to a full rebuild (what the materialized views cost at every refresh before).
"""

from __future__ import annotations

import secrets
import statistics
import time
from collections.abc import Callable
from typing import Any

from sqlalchemy import text

Progress = Callable[[str], None]

_SEED_REPORTS = """
INSERT INTO location_history (tracker_id, observed_at, lat, lon, accuracy_m, source,
    fetched_at, city, geocoded_at, geofence_checked_at)
SELECT 'V-' || lpad(t::text, 7, '0'), ts, 51.9 + (t % 100) * 0.001, 4.4 + k * 0.0001, 8.0,
    'bench', ts, 'Rotterdam', ts, ts
FROM generate_series(0, :trackers - 1) t, generate_series(0, :history - 1) k,
    LATERAL (SELECT timestamptz '2026-01-01 00:00+00' + k * interval '5 min') s(ts)
"""
_SEED_EVENTS = """
INSERT INTO geofence_events (tracker_id, geofence_id, observed_at, kind, created_at)
SELECT h.tracker_id, :gid, h.observed_at,
    CASE WHEN (extract(epoch FROM h.observed_at)::bigint / 3000) % 2 = 0
         THEN 'enter' ELSE 'exit' END, now()
FROM location_history h
WHERE (extract(epoch FROM h.observed_at)::bigint / 300) % 10 = 0
"""


def _seed(url: str, trackers: int, history: int) -> int:
    from schemas import geofence_defs, tracker_store, views
    from schemas.db import make_engine, session_factory, upgrade

    upgrade(url)
    engine = make_engine(url)
    try:
        with session_factory(engine).begin() as s:
            tracker_store.upsert_trackers(
                s, [{"external_id": f"V-{t:07d}", "name": f"V {t}"} for t in range(trackers)]
            )
            gid = geofence_defs.add_geofence(s, "bench port", "circle", 51.9, 4.4, 500).id
        with engine.begin() as conn:
            conn.execute(text(_SEED_REPORTS), {"trackers": trackers, "history": history})
            conn.execute(text(_SEED_EVENTS), {"gid": gid})
        with engine.connect() as conn:
            conn.execution_options(isolation_level="AUTOCOMMIT").execute(text("ANALYZE"))
        for name in views.VIEW_NAMES:
            views.recreate_view(engine, name)
        return gid
    finally:
        engine.dispose()


def _round(url: str, gid: int, trackers: int, changed: int, r: int) -> dict[str, float]:
    """``changed`` trackers get a report (and an event) newer than any; both views are
    refreshed; returns seconds per view, and for a full rebuild of each."""
    from schemas import views
    from schemas.db import make_engine

    engine = make_engine(url)
    try:
        ids = [f"V-{t:07d}" for t in range((r * changed) % trackers, trackers)][:changed]
        with engine.begin() as conn:
            conn.execute(
                text(
                    "INSERT INTO location_history (tracker_id, observed_at, lat, lon, source, "
                    "fetched_at) SELECT d, timestamptz '2027-01-01 00:00+00' + :r * interval "
                    "'5 min', 51.95, 4.45, 'bench', now() FROM unnest(CAST(:ids AS varchar[])) d"
                ),
                {"ids": ids, "r": r},
            )
            conn.execute(
                text(
                    "INSERT INTO geofence_events (tracker_id, geofence_id, observed_at, kind, "
                    "created_at) SELECT d, :gid, timestamptz '2027-01-01 00:00+00' + :r * "
                    "interval '5 min', CASE WHEN :r % 2 = 0 THEN 'enter' ELSE 'exit' END, now() "
                    "FROM unnest(CAST(:ids AS varchar[])) d"
                ),
                {"ids": ids, "r": r, "gid": gid},
            )
        views.note_changes(engine, views.VIEW_NAMES, ids)
        out: dict[str, float] = {}
        for name in views.VIEW_NAMES:
            start = time.perf_counter()
            views.refresh_view(engine, name)
            out[name] = time.perf_counter() - start
        for name in views.VIEW_NAMES:
            views.note_changes(engine, [name], None)  # anything changed: a full rebuild
            start = time.perf_counter()
            views.refresh_view(engine, name)
            out[f"{name} (full rebuild)"] = time.perf_counter() - start
        return out
    finally:
        engine.dispose()


def run_view_bench(
    database_url: str | None = None,
    *,
    trackers: int = 30_000,
    histories: tuple[int, ...] = (1, 34),
    changed: int = 3_000,
    rounds: int = 3,
    progress: Progress = print,
) -> dict[str, Any]:
    """Median refresh seconds per view and history size (see the module docstring).
    Without ``database_url`` each size gets a database on a throwaway PostgreSQL; a
    given URL (an empty PostgreSQL database) takes one size."""
    import shutil

    from ops.servers import PostgresServer, temp_root

    results: dict[str, Any] = {"trackers": trackers, "changed_per_refresh": changed, "sizes": []}
    if database_url is not None and len(histories) != 1:
        raise ValueError("with a database URL, give one history size (the database fills up)")
    root = server = None
    try:
        if database_url is None:
            root = temp_root("trackstream-viewbench-pg-")
            progress("starting a throwaway PostgreSQL (initdb) ...")
            server = PostgresServer.start(root, durable=True)
        for history in histories:
            if server is not None:
                url = server.create_database(f"views_{history}_{secrets.token_hex(3)}")
            else:
                assert database_url is not None
                url = database_url
            rows = trackers * history
            progress(f"seeding {trackers:,} trackers with {rows:,} reports ...")
            gid = _seed(url, trackers, history)
            times: dict[str, list[float]] = {}
            for r in range(rounds):
                for k, v in _round(url, gid, trackers, changed, r).items():
                    times.setdefault(k, []).append(v)
            medians = {k: statistics.median(v) for k, v in times.items()}
            progress(
                f"  {rows:,} rows: "
                + ", ".join(f"{k} {v * 1000:,.0f} ms" for k, v in medians.items())
            )
            results["sizes"].append({"history_rows": rows, "refresh_s": medians})
    finally:
        if server is not None:
            server.stop()
        if root is not None:
            shutil.rmtree(root, ignore_errors=True)
    return results

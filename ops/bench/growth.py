"""``trackstream bench --pipeline --history-rows N``: the pipeline as its history grows.

At 0 stored rows and again after seeding ``N`` older rows: the end-to-end phase of
:mod:`ops.bench.pipeline` (fetch, geocode, geofence and view-refresh at once, one
worker each), the CPU per report, and the latency of one tracker's trace (its last
1,000 reports, newest first, as ``trace`` and the console's track read them). Then a
month of history is dropped (:func:`schemas.history.prune`) while two writers insert,
and the longest insert during it is reported.

The old rows are seeded by PostgreSQL itself (``INSERT ... SELECT`` over
``generate_series``): ``SEED_TRACKERS`` inactive trackers, their reports evenly spread
over the last ``SPAN_DAYS`` days, geocoded and checked as if the pipeline had handled
them, in the month partitions they belong to (created first). The traced tracker has
the same 1,000 reports at every level, five minutes apart.
"""

from __future__ import annotations

import asyncio
import re
import statistics
import threading
import time
from datetime import UTC, datetime, timedelta
from typing import Any

from processors.topology import FETCH, GEOCODE, GEOFENCE, VIEW_REFRESH

SEED_TRACKERS = 1000
SPAN_DAYS = 400
TRACE_TRACKER = "HIST-TRACE"
TRACE_RUNS = 300
CHUNK_ROWS = 500_000

_SEED_SQL = """INSERT INTO location_history (tracker_id, observed_at, lat, lon, accuracy_m,
    source, fetched_at, city, country_code, country, address, geocoded_at,
    geofence_checked_at, fix_status)
SELECT 'HIST-' || lpad(t::text, 5, '0'), o, 52.0 + (t % 100) * 0.01, 4.0 + (k % 100) * 0.01,
    10, 'seed', o + interval '2 s', 'Seeded', 'NL', 'Netherlands', 'seeded',
    o + interval '3 s', o + interval '4 s', 'ok'
FROM generate_series(CAST(:k0 AS int), CAST(:k1 AS int)) k
    CROSS JOIN generate_series(1, CAST(:trackers AS int)) t,
    LATERAL (SELECT CAST(:end AS timestamptz) - (k * CAST(:step_s AS float8)
             + t * CAST(:stagger_s AS float8) + CAST(:offset_s AS float8))
             * interval '1 s' AS o) x
ON CONFLICT DO NOTHING"""

_TRACE_SQL = (
    "SELECT * FROM location_history WHERE tracker_id = :t ORDER BY observed_at DESC LIMIT 1000"
)


def _engine(url: str) -> Any:
    from schemas.db import make_engine

    return make_engine(url)


def prepare_seed(url: str, now: datetime) -> None:
    """The seeded trackers, the traced tracker's 1,000 reports and the month partitions
    of the seeded span."""
    from sqlalchemy import text

    from schemas import history

    eng = _engine(url)
    try:
        with eng.begin() as conn:
            conn.execute(
                text(
                    "INSERT INTO trackers (external_id, name, active)"
                    " SELECT 'HIST-' || lpad(g::text, 5, '0'), 'seeded', false"
                    " FROM generate_series(1, :n) g ON CONFLICT DO NOTHING"
                ),
                {"n": SEED_TRACKERS},
            )
            conn.execute(
                text(
                    "INSERT INTO trackers (external_id, name, active) VALUES (:t, 'traced', false)"
                    " ON CONFLICT DO NOTHING"
                ),
                {"t": TRACE_TRACKER},
            )
            first = history.month_start(now - timedelta(days=SPAN_DAYS + 1))
            have = {p.start for p in history.partitions(conn, "location_history") if p.start}
            m = first
            while m <= now:
                if m not in have:
                    history.create_partition(conn, "location_history", m)
                m = history.next_month(m)
            conn.execute(
                text(
                    "INSERT INTO location_history (tracker_id, observed_at, lat, lon,"
                    " accuracy_m, source, fetched_at, geocoded_at, geofence_checked_at,"
                    " fix_status) SELECT :t, o, 52, 4, 10, 'seed', o, o, o, 'ok'"
                    " FROM (SELECT CAST(:end AS timestamptz) - g * interval '5 min' AS o"
                    " FROM generate_series(0, 999) g) x ON CONFLICT DO NOTHING"
                ),
                {"t": TRACE_TRACKER, "end": now - timedelta(hours=1)},
            )
    finally:
        eng.dispose()


def seed_rows(url: str, rows: int, now: datetime, progress: Any, level: int = 0) -> dict[str, Any]:
    """Adds about ``rows`` old reports; returns the time it took. Each ``level`` shifts
    its reports by a fraction of a second, so a later level's rows add to an earlier
    one's (same trackers, same span, denser) instead of meeting its keys."""
    from sqlalchemy import text

    per_tracker = max(1, rows // SEED_TRACKERS)
    step_s = SPAN_DAYS * 86_400 / per_tracker
    end = now - timedelta(days=1)
    eng = _engine(url)
    t0 = time.monotonic()
    done = 0
    try:
        k_chunk = max(1, CHUNK_ROWS // SEED_TRACKERS)
        for k0 in range(0, per_tracker, k_chunk):
            k1 = min(per_tracker, k0 + k_chunk) - 1
            with eng.begin() as conn:
                done += conn.execute(
                    text(_SEED_SQL),
                    {
                        "k0": k0,
                        "k1": k1,
                        "trackers": SEED_TRACKERS,
                        "end": end,
                        "step_s": step_s,
                        "stagger_s": step_s / SEED_TRACKERS,
                        "offset_s": level * 0.000_137,
                    },
                ).rowcount
            el = time.monotonic() - t0
            progress(f"  seeded {done:,}/{per_tracker * SEED_TRACKERS:,} rows, {el:.0f} s")
        seed_s = time.monotonic() - t0
        # a year-old table is vacuumed (visibility map set, hint bits written) and its
        # pages checkpointed; right after a bulk load it is neither, and autovacuum and
        # the checkpoint would be measured instead of the pipeline
        progress("  VACUUM (ANALYZE) and CHECKPOINT ...")
        with eng.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(text("VACUUM (ANALYZE) location_history"))
            conn.execute(text("CHECKPOINT"))
        with eng.connect() as conn:
            size = conn.scalar(
                text(
                    "SELECT sum(pg_total_relation_size(inhrelid)) FROM pg_inherits"
                    " WHERE inhparent = CAST('location_history' AS regclass)"
                )
            )
            db_size = conn.scalar(text("SELECT pg_database_size(current_database())"))
    finally:
        eng.dispose()
    return {
        "rows": done,
        "seconds": round(seed_s, 1),
        "vacuum_checkpoint_seconds": round(time.monotonic() - t0 - seed_s, 1),
        "history_bytes": int(size or 0),
        "database_bytes": int(db_size or 0),
    }


def trace_latency(url: str, runs: int = TRACE_RUNS) -> dict[str, Any]:
    """p50/p99 of one tracker's last 1,000 reports (a warm cache: repeated reads), and
    the partitions the plan read."""
    from sqlalchemy import text

    eng = _engine(url)
    times = []
    try:
        with eng.connect() as conn:
            for _ in range(10):
                conn.execute(text(_TRACE_SQL), {"t": TRACE_TRACKER}).fetchall()
            for _ in range(runs):
                t0 = time.perf_counter()
                got = conn.execute(text(_TRACE_SQL), {"t": TRACE_TRACKER}).fetchall()
                times.append(time.perf_counter() - t0)
            plan = [
                r[0]
                for r in conn.execute(
                    text("EXPLAIN (ANALYZE, BUFFERS, COSTS OFF, TIMING OFF) " + _TRACE_SQL),
                    {"t": TRACE_TRACKER},
                )
            ]
    finally:
        eng.dispose()
    times.sort()
    names = re.compile(r"Scan .*on (location_history_(?:p\d{4}_?\d{2}|default))(?!\w)")
    scanned = {
        m.group(1)
        for line in plan
        if "never executed" not in line and (m := names.search(line)) is not None
    }
    return {
        "rows": len(got),
        "runs": runs,
        "p50_ms": round(statistics.median(times) * 1000, 2),
        "p99_ms": round(times[int(len(times) * 0.99) - 1] * 1000, 2),
        "partition_scans": len(scanned),
        "plan": plan,
    }


def prune_under_writes(url: str, now: datetime, progress: Any) -> dict[str, Any]:
    """Drops the oldest month partition while two writers insert one report per
    transaction; the longest insert while the prune ran."""
    from schemas import history, report_store, tracker_store
    from schemas.db import session_factory
    from schemas.events import LocationReported

    eng = _engine(url)
    with eng.connect() as conn:
        months = [p for p in history.partitions(conn, "location_history") if p.end]
    oldest = months[0]
    cutoff = oldest.end
    assert cutoff is not None
    with session_factory(eng).begin() as s:
        tracker_store.upsert_trackers(s, [{"external_id": "HIST-W1"}, {"external_id": "HIST-W2"}])
    stop = threading.Event()
    during: dict[str, list[float]] = {"HIST-W1": [], "HIST-W2": []}
    pruning = threading.Event()
    counts = {"HIST-W1": 0, "HIST-W2": 0}

    def writer(tracker: str) -> None:
        factory = session_factory(_engine(url))
        i = 0
        while not stop.is_set():
            at = now - timedelta(milliseconds=i)
            r = LocationReported(
                tracker_id=tracker, observed_at=at, lat=1, lon=2, accuracy_m=5,
                source="bench", fetched_at=at,
            )  # fmt: skip
            t0 = time.perf_counter()
            with factory.begin() as s:
                report_store.insert_reports(s, [r])
            took = time.perf_counter() - t0
            if pruning.is_set():
                during[tracker].append(took)
            counts[tracker] += 1
            i += 1

    threads = [threading.Thread(target=writer, args=(t,), daemon=True) for t in during]
    for t in threads:
        t.start()
    try:
        time.sleep(1.0)  # the writers warm up
        progress(f"  dropping {oldest.name} (~{oldest.rows:,} rows) while two writers insert")
        pruning.set()
        result = history.prune(eng, cutoff)
        time.sleep(0.3)
        pruning.clear()
    finally:
        stop.set()
        for t in threads:
            t.join(10)
        eng.dispose()
    lat = sorted(x for v in during.values() for x in v)
    return {
        "dropped": [p.name for p in result.partitions],
        "dropped_rows_estimate": sum(p.rows for p in result.partitions),
        "prune_seconds": round(result.seconds, 3),
        "inserts_during": len(lat),
        "longest_insert_ms": round(lat[-1] * 1000, 1) if lat else None,
        "p50_insert_ms": round(statistics.median(lat) * 1000, 2) if lat else None,
    }


def run_growth_bench(
    redis_url: str | None,
    database_url: str | None,
    *,
    history_rows: int | list[int],
    trackers: int,
    max_phase_s: float,
    progress: Any = print,
    status: Any = None,
) -> dict[str, Any]:
    import os
    import shutil
    import tempfile
    from pathlib import Path

    from ops.bench.pipeline import PipelineBench, servers
    from streams.connection import connect
    from streams.settings import StreamSettings

    targets = sorted({history_rows} if isinstance(history_rows, int) else set(history_rows))
    targets = [n for n in targets if n > 0]
    started = time.monotonic()
    load_before = os.getloadavg()
    levels: list[dict[str, Any]] = []
    with servers(redis_url, database_url, progress) as srv:
        workdir = Path(tempfile.mkdtemp(prefix="trackstream-growth-"))
        bench = PipelineBench(
            srv, trackers=trackers, history=2, max_phase_s=max_phase_s, progress=progress,
            status=status or (lambda _: None), workdir=workdir,
        )  # fmt: skip
        url = srv.database_url
        now = datetime.now(UTC)
        try:
            bench.prepare_database()
            prepare_seed(url, now)

            async def e2e(tag: str) -> Any:
                client = connect(StreamSettings.build(redis_url=srv.redis_url))
                try:
                    ids = bench.seed_trackers(tag)
                    prefix = f"g{bench.run_id}-{tag}"
                    await bench.queue_fetches(client, prefix, ids)
                    return await bench.phase(
                        client, "end to end", prefix,
                        [FETCH, GEOCODE, GEOFENCE, VIEW_REFRESH], 1, trackers,
                    )  # fmt: skip
                finally:
                    await client.aclose()

            # one database for every level: each seeds what the last one lacks (the
            # rows of earlier levels and of the pipeline's phases stay: a history grows)
            stored = 0
            for level, rows in enumerate([0, *targets]):
                seeded = None
                if rows > stored:
                    progress(f"seeding {rows - stored:,} old rows server-side (to {rows:,}) ...")
                    seeded = seed_rows(url, rows - stored, now, progress, level)
                    stored += seeded["rows"]
                progress(f"trace latency at {rows:,} stored rows ...")
                trace = trace_latency(url)
                progress(f"end to end at {rows:,} stored rows ...")
                ph = asyncio.run(e2e(f"l{level}"))
                bench._report(ph)
                progress("  " + _level_line(rows, ph.as_json(), trace, seeded, levels))
                levels.append(
                    {
                        "history_rows": rows,
                        "seeded": seeded,
                        "trace": trace,
                        "end_to_end": ph.as_json(),
                    }
                )
            prune = prune_under_writes(url, now, progress) if targets else None
        finally:
            bench.close()
            shutil.rmtree(workdir, ignore_errors=True)
        return {
            "config": {
                "history_rows": targets,
                "trackers_per_phase": trackers,
                "seed_trackers": SEED_TRACKERS,
                "span_days": SPAN_DAYS,
                "cpus": os.cpu_count(),
                "loadavg_1m_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
                "servers": srv.description,
            },
            "levels": levels,
            "prune": prune,
            "seconds": round(time.monotonic() - started, 1),
        }


def _level_line(
    rows: int,
    e2e: dict[str, Any],
    tr: dict[str, Any],
    seeded: dict[str, Any] | None,
    before: list[dict[str, Any]],
) -> str:
    rate = e2e["reports_per_s"]
    base = before[0]["end_to_end"]["reports_per_s"] if before else rate
    cpu = e2e["cpu_ms_per_report"].get("total")
    extra = (
        f"; seeded {seeded['rows']:,} in {seeded['seconds']:.0f} s, history"
        f" {seeded['history_bytes'] / 2**30:.2f} GiB, database"
        f" {seeded['database_bytes'] / 2**30:.2f} GiB on disk"
        if seeded
        else ""
    )
    return (
        f"{rows:>13,} stored rows: end to end {rate:,.0f} reports/s"
        f" ({rate / base:.2f} x the empty history), "
        + (f"{cpu:.3f} ms CPU/report, " if cpu is not None else "")
        + f"trace of {tr['rows']} reports p50 {tr['p50_ms']} ms p99 {tr['p99_ms']} ms"
        f" ({tr['partition_scans']} partition scans){extra}"
    )


def growth_summary(results: dict[str, Any]) -> list[str]:
    lines = []
    levels = results["levels"]
    for i, lv in enumerate(levels):
        lines.append(
            _level_line(lv["history_rows"], lv["end_to_end"], lv["trace"], lv["seeded"], levels[:i])
        )
    p = results.get("prune")
    if p:
        lines.append(
            f"dropping {', '.join(p['dropped'])} (~{p['dropped_rows_estimate']:,} rows) took"
            f" {p['prune_seconds']} s; longest of {p['inserts_during']} inserts meanwhile"
            f" {p['longest_insert_ms']} ms (median {p['p50_insert_ms']} ms)"
        )
    return lines

"""The geofence stage alone, measured: reports/s and worker CPU per report.

:func:`bench_geofence` seeds a database with trackers, fences and stored reports (as
fetch and geocode would leave them), then feeds the real stage's ``handle_batch`` the
reports in batches, as one worker would, and times it: wall clock, and this process's
CPU (the worker's; the database server's CPU is not included). The pipeline benchmark
can call it; ``python -m ops.bench.geofence_stage --database-url URL`` prints the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

__all__ = ["GeofenceBench", "bench_geofence"]


@dataclass(frozen=True)
class GeofenceBench:
    reports: int
    trackers: int
    fences: int
    batch: int
    seconds: float
    cpu_s: float
    events: int
    db_cpu_s: float | None = None  # the database server's CPU, when a probe was given

    @property
    def reports_per_s(self) -> float:
        return self.reports / self.seconds if self.seconds else 0.0

    @property
    def cpu_ms_per_report(self) -> float:
        return 1000 * self.cpu_s / self.reports if self.reports else 0.0

    def as_dict(self) -> dict[str, Any]:
        db_ms = None if self.db_cpu_s is None else round(1000 * self.db_cpu_s / self.reports, 4)
        return {
            **asdict(self),
            "reports_per_s": round(self.reports_per_s, 1),
            "cpu_ms_per_report": round(self.cpu_ms_per_report, 4),
            "db_cpu_ms_per_report": db_ms,
        }


def _seed(db: Any, trackers: int, per_tracker: int, fences: int, seed: int) -> list[Any]:
    """Trackers driving around 10 cities, 30 fences (circles and polygons) among them;
    returns the stored reports as LocationGeocoded payloads, in delivery order."""
    from schemas import geofence_defs, report_store, tracker_store
    from schemas.events import LocationGeocoded, LocationReported

    rng = random.Random(seed)
    cities = [
        (51.92, 4.48), (53.55, 9.99), (51.22, 4.40), (48.86, 2.35), (52.52, 13.40),
        (40.42, -3.70), (45.46, 9.19), (50.08, 14.44), (47.50, 19.04), (52.23, 21.01),
    ]  # fmt: skip
    db.run_sync(
        tracker_store.upsert_trackers, [{"external_id": f"B-{i:06d}"} for i in range(trackers)]
    )
    for f in range(fences):
        lat, lon = cities[f % len(cities)]
        lat, lon = lat + rng.uniform(-0.03, 0.03), lon + rng.uniform(-0.05, 0.05)
        if f % 2:
            db.run_sync(geofence_defs.add_geofence, f"bench-{f}", "circle", lat, lon, 500.0)
        else:
            d = 0.006
            ring = [[lon - d, lat - d], [lon + d, lat - d], [lon + d, lat + d], [lon - d, lat + d]]
            geometry = {"type": "Polygon", "coordinates": [[*ring, ring[0]]]}
            db.run_sync(
                geofence_defs.add_geofence, f"bench-{f}", "polygon", geometry_geojson=geometry
            )
    t0 = datetime(2026, 3, 2, tzinfo=UTC)
    reported: list[LocationReported] = []
    for i in range(trackers):
        lat, lon = cities[i % len(cities)]
        lat, lon = lat + rng.uniform(-0.04, 0.04), lon + rng.uniform(-0.06, 0.06)
        heading = rng.uniform(0, 2 * math.pi)
        for k in range(per_tracker):
            step_m = rng.uniform(0, 1500)  # parked to 18 km/h over 5 minutes
            heading += rng.uniform(-0.5, 0.5)
            lat += step_m * math.cos(heading) / 111_320
            lon += step_m * math.sin(heading) / (111_320 * math.cos(math.radians(lat)))
            at = t0 + timedelta(minutes=5 * k, seconds=i % 300)
            reported.append(
                LocationReported(
                    tracker_id=f"B-{i:06d}", observed_at=at, lat=lat, lon=lon,
                    accuracy_m=round(rng.uniform(4, 40), 1), source="bench",
                    fetched_at=at + timedelta(seconds=30),
                )
            )  # fmt: skip
    for i in range(0, len(reported), 2000):
        db.run_sync(report_store.insert_reports, reported[i : i + 2000])
    # delivery order: by fetch round, trackers interleaved (as the pipeline delivers)
    reported.sort(key=lambda r: (r.observed_at.replace(second=0), r.tracker_id))
    return [
        LocationGeocoded(tracker_id=r.tracker_id, observed_at=r.observed_at, lat=r.lat, lon=r.lon)
        for r in reported
    ]


def bench_geofence(
    database_url: str,
    *,
    trackers: int = 3000,
    reports: int = 24_000,
    fences: int = 30,
    batch: int = 100,
    seed: int = 1,
    db_cpu: Callable[[], float] | None = None,
) -> GeofenceBench:
    """Seeds an EMPTY, migrated database at ``database_url`` and times the geofence
    stage over ``reports`` reports of ``trackers`` trackers, ``batch`` per call.
    ``db_cpu``: returns the database server's CPU seconds so far (read before and
    after the timed part)."""
    from processors.database import Database
    from processors.stages.geofence import GeofenceStage
    from processors.topology import routes
    from streams.message import Envelope, Message

    db = Database(database_url)
    try:
        payloads = _seed(db, trackers, max(1, reports // trackers), fences, seed)
        now = datetime(2026, 3, 3, tzinfo=UTC)
        stage = GeofenceStage(db, routes("bench"), lambda: now)

        class Ctx:
            def publish(self, route: Any, payload: Any, **options: Any) -> None:
                pass

        msgs = [
            Message("s", f"{i}-0", {}, 1, Envelope("location.geocoded", 1, str(i), 0, 0, None, p))
            for i, p in enumerate(payloads)
        ]

        async def run() -> None:
            for i in range(0, len(msgs), batch):
                failures = await stage.handle_batch(msgs[i : i + batch], Ctx())  # type: ignore[arg-type]
                if failures:
                    raise RuntimeError(f"benchmark batch failed: {failures}")

        async def main() -> tuple[float, float, float | None]:
            await stage.index()  # load the fences before the clock starts
            db0 = db_cpu() if db_cpu else None
            wall, cpu = time.perf_counter(), time.process_time()
            await run()
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            return wall, cpu, (db_cpu() - db0 if db_cpu and db0 is not None else None)

        seconds, cpu_s, db_s = asyncio.run(main())
        return GeofenceBench(
            len(msgs), trackers, fences, batch, seconds, cpu_s, stage.events_written, db_s
        )
    finally:
        db.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--database-url", required=True, help="an empty database")
    parser.add_argument("--trackers", type=int, default=3000)
    parser.add_argument("--reports", type=int, default=24_000)
    parser.add_argument("--fences", type=int, default=30)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--db-pid", type=int, help="the database server's pid (to count its CPU)")
    args = parser.parse_args()
    from schemas.db import upgrade

    upgrade(args.database_url)
    result = bench_geofence(
        args.database_url,
        trackers=args.trackers,
        reports=args.reports,
        fences=args.fences,
        batch=args.batch,
        db_cpu=(lambda: process_tree_cpu_s(args.db_pid)) if args.db_pid else None,
    )
    print(json.dumps(result.as_dict()))


def process_tree_cpu_s(pid: int) -> float:
    """CPU seconds of a process, its live children and its reaped children (Linux
    /proc): a PostgreSQL postmaster's, with every backend's."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        if int(entry) == pid:
            total += sum(int(x) for x in fields[11:15])  # utime stime cutime cstime
        elif int(fields[1]) == pid:
            total += int(fields[11]) + int(fields[12])
    return total / tick


if __name__ == "__main__":
    main()

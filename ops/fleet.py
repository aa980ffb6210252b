"""The operator's view of the fleet, read from the database: each tracker's last fix and
state, the freshness distribution against the guarantee (``max_tracker_age_s``, 12 h by
default), what the map draws, and the database side of one report's trace. Read-only;
shared by the CLI and the dashboard.

A tracker's state, in this order:

- ``inactive``: ``active`` is false;
- ``out of run``: now is outside its production run (``run_starts_at``/``run_ends_at``);
- ``overdue``: its last successful fetch (``trackers.last_fetched_at``, which a fetch
  that returns nothing new moves too; a never-fetched tracker counts from
  ``created_at``) is older than the guarantee;
- ``late``: older than twice ``min_fetch_interval_s``;
- ``fresh``: otherwise.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, func, select
from sqlalchemy.orm import Session

from schemas.tables import Geofence, GeofenceEventRow, LocationReport, Tracker

GUARANTEE_S = 12 * 3600  # the default of max_tracker_age_s
OVERDUE = "overdue"  # past the guarantee
STATES = ("fresh", "late", OVERDUE, "out of run", "inactive")
# freshness buckets of in-run trackers: (label, upper bound in seconds)
BUCKETS = (
    ("< 1 h", 3600),
    ("1-3 h", 3 * 3600),
    ("3-6 h", 6 * 3600),
    ("6-12 h", 12 * 3600),
    ("> 12 h", None),
)


def hours_text(seconds: float) -> str:
    """A guarantee as people say it: "12 h", "1.5 h", "45 min"."""
    if seconds < 3600:
        return f"{seconds / 60:g} min"
    return f"{seconds / 3600:g} h"


def iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat(timespec="seconds").replace("+00:00", "Z")


@dataclass(frozen=True)
class TrackerRow:
    tracker_id: str
    name: str
    state: str
    age_s: float | None  # since the last successful fetch (or creation, if never)
    last_fix_at: str | None  # observed_at of the latest report
    lat: float | None
    lon: float | None
    last_fetch_at: str | None  # the last successful fetch (trackers.last_fetched_at)
    scheduled_at: str | None  # trackers.last_processed_at (the scheduler's reservation)
    city: str | None
    time_zone: str | None = None  # IANA, of the latest report

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _latest_reports() -> Any:
    latest = (
        select(
            LocationReport.tracker_id.label("tid"),
            func.max(LocationReport.observed_at).label("obs"),
        )
        .group_by(LocationReport.tracker_id)
        .subquery()
    )
    return latest


def last_fetch(t: Tracker, latest: LocationReport | None) -> datetime | None:
    """The last successful fetch: ``last_fetched_at``, which an empty fetch moves too
    (the latest report's ``fetched_at`` only counts for rows from before that column)."""
    times = [x for x in (t.last_fetched_at, latest.fetched_at if latest else None) if x]
    return max(times) if times else None


def state_of(
    t: Tracker,
    fetched: datetime | None,
    now: datetime,
    min_fetch_interval_s: float,
    guarantee_s: float = GUARANTEE_S,
) -> tuple[str, float]:
    age_s = max(0.0, (now - (fetched or t.created_at)).total_seconds())
    if not t.active:
        return "inactive", age_s
    if (t.run_starts_at is not None and t.run_starts_at > now) or (
        t.run_ends_at is not None and t.run_ends_at <= now
    ):
        return "out of run", age_s
    if age_s > guarantee_s:
        return OVERDUE, age_s
    if age_s > 2 * min_fetch_interval_s:
        return "late", age_s
    return "fresh", age_s


def trackers(
    session: Session,
    now: datetime,
    min_fetch_interval_s: float,
    tracker_id: str | None = None,
    guarantee_s: float = GUARANTEE_S,
) -> list[TrackerRow]:
    """Every tracker (or one) with its latest report and state, stalest first."""
    latest = _latest_reports()
    stmt = (
        select(Tracker, LocationReport)
        .outerjoin(latest, latest.c.tid == Tracker.external_id)
        .outerjoin(
            LocationReport,
            and_(
                LocationReport.tracker_id == latest.c.tid,
                LocationReport.observed_at == latest.c.obs,
            ),
        )
    )
    if tracker_id is not None:
        stmt = stmt.where(Tracker.external_id == tracker_id)
    rows = []
    for t, r in session.execute(stmt):
        fetched = last_fetch(t, r)
        state, age_s = state_of(t, fetched, now, min_fetch_interval_s, guarantee_s)
        rows.append(
            TrackerRow(
                tracker_id=t.external_id,
                name=t.name,
                state=state,
                age_s=round(age_s, 1),
                last_fix_at=iso(r.observed_at) if r else None,
                lat=r.lat if r else None,
                lon=r.lon if r else None,
                last_fetch_at=iso(fetched),
                scheduled_at=iso(t.last_processed_at),
                city=r.city if r else None,
                time_zone=r.time_zone if r else None,
            )
        )
    rows.sort(key=lambda x: (-(x.age_s or 0), x.tracker_id))
    return rows


def distribution(rows: list[TrackerRow], guarantee_s: float = GUARANTEE_S) -> dict[str, Any]:
    """Counts by state, and the in-run trackers' ages in buckets and against the
    guarantee (``rows`` judged against the same ``guarantee_s``)."""
    states = Counter(r.state for r in rows)
    buckets = dict.fromkeys((label for label, _ in BUCKETS), 0)
    for r in rows:
        if r.state in ("inactive", "out of run") or r.age_s is None:
            continue
        for label, bound in BUCKETS:
            if bound is None or r.age_s <= bound:
                buckets[label] += 1
                break
    in_run = sum(buckets.values())
    return {
        "total": len(rows),
        "in_run": in_run,
        "states": {s: states.get(s, 0) for s in STATES},
        "buckets": [{"label": k, "count": v} for k, v in buckets.items()],
        "within_guarantee": in_run - states[OVERDUE],  # trackers' state says it
        "guarantee_s": guarantee_s,
        "guarantee": hours_text(guarantee_s),
    }


def _geofence_view(g: Geofence) -> dict[str, Any]:
    out: dict[str, Any] = {"id": g.id, "name": g.name, "kind": g.kind}
    if g.kind == "circle":
        out.update(lat=g.center_lat, lon=g.center_lon, radius_m=g.radius_m)
    else:
        out["geometry"] = json.loads(g.geometry_geojson or "null")
    return out


def map_data(
    session: Session,
    now: datetime,
    min_fetch_interval_s: float,
    *,
    track_hours: float = 24,
    track_points: int = 50,
    max_tracks: int = 200,
    events: int = 100,
    guarantee_s: float = GUARANTEE_S,
) -> dict[str, Any]:
    """Last positions, recent tracks (the last ``track_points`` reports within
    ``track_hours`` of the ``max_tracks`` most recently reporting trackers), active
    geofences and the latest geofence events."""
    rows = [
        r
        for r in trackers(session, now, min_fetch_interval_s, guarantee_s=guarantee_s)
        if r.lat is not None
    ]
    since = now - timedelta(hours=track_hours)
    tracks: dict[str, list[list[float]]] = {}
    # tracks of the most recently reporting trackers only: each is a range scan of the
    # (tracker_id, observed_at) index, never a scan of the whole history
    recent = sorted(rows, key=lambda r: r.last_fix_at or "", reverse=True)[:max_tracks]
    stmt = (
        select(LocationReport.tracker_id, LocationReport.lat, LocationReport.lon)
        .where(
            LocationReport.tracker_id.in_([r.tracker_id for r in recent]),
            LocationReport.observed_at >= since,
        )
        .order_by(LocationReport.tracker_id, LocationReport.observed_at.desc())
    )
    for tid, lat, lon in session.execute(stmt):
        points = tracks.setdefault(tid, [])
        if len(points) < track_points:
            points.append([lat, lon])
    for points in tracks.values():
        points.reverse()
    fences = session.scalars(
        select(Geofence).where(Geofence.active.is_(True)).order_by(Geofence.id)
    )
    recent = session.execute(
        select(GeofenceEventRow, Geofence.name)
        .join(Geofence, Geofence.id == GeofenceEventRow.geofence_id)
        .order_by(GeofenceEventRow.observed_at.desc(), GeofenceEventRow.id.desc())
        .limit(events)
    )
    return {
        "trackers": [r.as_dict() for r in rows],
        "tracks": {k: v for k, v in tracks.items() if len(v) > 1},
        "geofences": [_geofence_view(g) for g in fences],
        "events": [
            {
                "tracker_id": e.tracker_id,
                "geofence_id": e.geofence_id,
                "geofence": name,
                "kind": e.kind,
                "observed_at": iso(e.observed_at),
            }
            for e, name in recent
        ],
    }


def report_trace(session: Session, tracker_id: str, at: datetime | None) -> dict[str, Any] | None:
    """The database side of one report: the tracker's report at (or latest before) ``at``,
    or its latest; None when the tracker has no such report. A LookupError when the
    tracker does not exist."""
    tracker = session.scalar(select(Tracker).where(Tracker.external_id == tracker_id))
    if tracker is None:
        raise LookupError(f"no tracker {tracker_id!r}")
    stmt = select(LocationReport).where(LocationReport.tracker_id == tracker_id)
    if at is not None:
        stmt = stmt.where(LocationReport.observed_at <= at)
    report = session.scalar(stmt.order_by(LocationReport.observed_at.desc()).limit(1))
    if report is None:
        return None
    produced = session.execute(
        select(GeofenceEventRow, Geofence.name)
        .join(Geofence, Geofence.id == GeofenceEventRow.geofence_id)
        .where(
            GeofenceEventRow.tracker_id == tracker_id,
            GeofenceEventRow.observed_at == report.observed_at,
        )
        .order_by(GeofenceEventRow.geofence_id)
    )
    return {
        "tracker_id": tracker_id,
        "report_id": report.id,
        "observed_at": iso(report.observed_at),
        "lat": report.lat,
        "lon": report.lon,
        "source": report.source,
        "fetched_at": iso(report.fetched_at),
        "geocoded_at": iso(report.geocoded_at),
        "address": report.address,
        "city": report.city,
        "country_code": report.country_code,
        "time_zone": report.time_zone,
        "geofence_checked_at": iso(report.geofence_checked_at),
        "events": [
            {"geofence_id": e.geofence_id, "geofence": name, "kind": e.kind} for e, name in produced
        ],
        "republish_count": report.republish_count,
        "republished_at": iso(report.republished_at),
    }


def report_instants(report: dict[str, Any] | None) -> tuple[datetime | None, datetime | None]:
    """The observed_at and fetched_at of a :func:`report_trace` dict (None, None
    without a report)."""
    if report is None:
        return None, None

    def parse(key: str) -> datetime:
        return datetime.fromisoformat(report[key].replace("Z", "+00:00"))

    return parse("observed_at"), parse("fetched_at")


def with_source(
    session: Session, now: datetime, interval_s: float, guarantee_s: float, fleet_trackers: Any
) -> tuple[list[TrackerRow], dict[str, Any], dict[str, Any]]:
    """The trackers, each one's location-API state (errors, late, rejected) and the
    fleet's totals of it (``schemas.source_store``)."""
    from schemas import source_store

    rows = fleet_trackers(session, now, interval_s, None, guarantee_s)
    return rows, source_store.source_stats(session), source_store.totals(session)


def source_json(s: Any) -> dict[str, Any] | None:
    """One tracker's location-API state as JSON (None: no trouble ever recorded)."""
    if s is None:
        return None
    return {
        "error": s.error_code,
        "error_message": s.error_message,
        "error_since": iso(s.error_since),
        "error_count": s.error_count,
        "retry_at": iso(s.retry_at),
        "late_reports": s.late_reports,
        "beyond_bound_reports": s.beyond_bound_reports,
        "rejected_reports": s.rejected_reports,
    }

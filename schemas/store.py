"""The pipeline's reads and writes, one function per question.

Every function takes a :class:`~sqlalchemy.orm.Session` first and does not commit: the
caller's transaction does (``processors.database.Database.run`` runs one function per
transaction). Every write is idempotent on a natural key, with dialect-aware upserts
(``INSERT ... ON CONFLICT``) on PostgreSQL and SQLite alike, so redeliveries and
replays rewrite the same rows.

Tracker ids here are the trackers' external ids (``"SIM-00001"``).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timedelta
from itertools import pairwise
from typing import Any, TypeVar, cast

import shapely
from shapely.geometry import shape
from shapely.validation import explain_validity
from sqlalchemy import (
    String,
    Table,
    and_,
    any_,
    bindparam,
    delete,
    func,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from schemas.db import json_param
from schemas.events import LocationGeocoded, LocationReported
from schemas.tables import Geofence, GeofenceEvent, LocationReport, Tracker, UTCDateTime, utcnow

__all__ = [
    "GEOFENCE_KINDS",
    "MAX_RADIUS_M",
    "InvalidGeofence",
    "active_geofences",
    "add_geofence",
    "claim_incomplete",
    "count_abandoned",
    "count_not_checked",
    "count_not_geocoded",
    "deactivate_geofence",
    "events_for",
    "fetch_positions",
    "geofences_version",
    "in_list",
    "incomplete_reports",
    "insert_reports",
    "list_geofences",
    "mark_geofence_checked",
    "mark_processed",
    "mark_republished",
    "replace_events_at",
    "reports_for",
    "set_addresses",
    "set_addresses_each",
    "stale_view_trackers",
    "stalest_active_tracker_age_s",
    "update_geofence",
    "upsert_trackers",
    "validate_geofence",
]

log = logging.getLogger("trackstream.store")

GEOFENCE_KINDS = ("circle", "polygon")
EVENT_KINDS = ("enter", "exit")
MAX_RADIUS_M = 1_000_000.0  # 1,000 km: anything larger is a unit mistake, not a site
CHUNK = 500  # rows per multi-row statement (well under both dialects' parameter limits)

T = TypeVar("T")

_reports = cast(Table, LocationReport.__table__)
_trackers = cast(Table, Tracker.__table__)
_events = cast(Table, GeofenceEvent.__table__)


class InvalidGeofence(ValueError):
    """A geofence that cannot be stored; the message says what is wrong with it."""


# -- helpers


def _dialect(session: Session) -> str:
    return session.get_bind().dialect.name


def _insert(session: Session, table: Any) -> Any:
    return pg_insert(table) if _dialect(session) == "postgresql" else sqlite_insert(table)


def _chunks(items: Sequence[T], size: int = CHUNK) -> Iterable[Sequence[T]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def in_list(session: Session, column: Any, values: Sequence[str]) -> Any:
    """``column IN values`` with one statement text whatever the count: ``= ANY(array)``
    on PostgreSQL (compiled and prepared once), an expanding IN on SQLite."""
    if _dialect(session) == "postgresql":
        return column == any_(bindparam("ids", list(values), type_=ARRAY(String)))
    return column.in_(list(values))


def _in_run(now: datetime) -> Any:
    return and_(
        Tracker.active.is_(True),
        or_(Tracker.run_starts_at.is_(None), Tracker.run_starts_at <= now),
        or_(Tracker.run_ends_at.is_(None), Tracker.run_ends_at > now),
    )


# -- trackers


def upsert_trackers(session: Session, rows: Sequence[Mapping[str, Any]]) -> int:
    """Creates or updates trackers by ``external_id`` (keys: external_id, name, active,
    run_starts_at, run_ends_at; name defaults to the id, active to True, the run bounds
    to None = unbounded). Returns the number of distinct trackers written."""
    by_id: dict[str, dict[str, Any]] = {}
    for row in rows:
        ext = str(row.get("external_id") or "").strip()
        if not ext:
            raise ValueError(f"tracker without external_id: {dict(row)!r}")
        by_id[ext] = {
            "external_id": ext,
            "name": row.get("name") or ext,
            "active": bool(row.get("active", True)),
            "run_starts_at": row.get("run_starts_at"),
            "run_ends_at": row.get("run_ends_at"),
        }
    values = list(by_id.values())
    for chunk in _chunks(values):
        stmt = _insert(session, _trackers).values(list(chunk))
        stmt = stmt.on_conflict_do_update(
            index_elements=[_trackers.c.external_id],
            set_={c: stmt.excluded[c] for c in ("name", "active", "run_starts_at", "run_ends_at")},
        )
        session.execute(stmt)
    return len(values)


def mark_processed(session: Session, external_ids: Sequence[str], at: datetime) -> None:
    """Sets ``last_processed_at`` of these trackers to ``at``."""
    ids = sorted(set(external_ids))  # a stable order keeps row locks deadlock-free
    if not ids:
        return
    if _dialect(session) == "postgresql":
        session.execute(_MARK_PROCESSED_PG, {"ids": json_param(ids), "at": at})
        return
    for chunk in _chunks(ids, 5000):
        session.execute(
            update(_trackers)
            .where(_trackers.c.external_id.in_(list(chunk)))
            .values(last_processed_at=at)
        )


# ORDER BY id FOR UPDATE: rows are locked in id order (every writer of a table locks
# in id order, so writers never wait on each other in a cycle)
_MARK_PROCESSED_PG = text(
    "UPDATE trackers SET last_processed_at = :at FROM ("
    " SELECT id FROM trackers WHERE external_id IN"
    " (SELECT json_array_elements_text(CAST(:ids AS json)))"
    " ORDER BY id FOR UPDATE) AS l WHERE trackers.id = l.id"
).bindparams(bindparam("at", type_=UTCDateTime()))


def stalest_active_tracker_age_s(session: Session, now: datetime) -> float | None:
    """Seconds since the stalest active, in-run tracker was processed (a never-fetched
    one counts from its ``created_at``); None when there is no such tracker."""
    oldest = session.scalar(
        select(func.min(func.coalesce(Tracker.last_processed_at, Tracker.created_at))).where(
            _in_run(now)
        )
    )
    if oldest is None:
        return None
    return max(0.0, (now - oldest).total_seconds())


# -- location reports


def _report_row(r: LocationReported) -> dict[str, Any]:
    return {
        "tracker_id": r.tracker_id,
        "observed_at": r.observed_at,
        "lat": r.lat,
        "lon": r.lon,
        "accuracy_m": r.accuracy_m,
        "source": r.source,
        "fetched_at": r.fetched_at,
    }


def fetch_positions(
    session: Session, tracker_ids: Sequence[str], future_tolerance_s: float | None = None
) -> dict[str, datetime | None]:
    """Where fetching these trackers starts, their *cursor*: each known tracker's latest
    stored ``observed_at`` (None: nothing stored yet). Trackers not in ``trackers`` are
    left out. One statement.

    With ``future_tolerance_s``, only reports with a credible time count: observed at
    most that long after they were fetched, and not rejected as ``future`` or
    ``invalid``. A fix from a clock a day or 20 years ahead is stored (and rejected by
    the geofence stage) but never becomes the cursor, so it cannot hide the tracker's
    real reports that follow; the cursor never passes fetch time plus the tolerance.
    """
    ids = sorted(set(tracker_ids))
    if not ids:
        return {}
    latest = select(func.max(_reports.c.observed_at)).where(
        _reports.c.tracker_id == _trackers.c.external_id
    )
    if future_tolerance_s is not None:
        latest = latest.where(
            _credible(session, future_tolerance_s),
            func.coalesce(_reports.c.fix_status, "").not_in(("future", "invalid")),
        )
    stmt = select(_trackers.c.external_id, latest.scalar_subquery()).where(
        in_list(session, _trackers.c.external_id, ids)
    )
    return {t: at for t, at in session.execute(stmt)}


def _credible(session: Session, tolerance_s: float) -> Any:
    """``observed_at <= fetched_at + tolerance_s`` in the dialect's time arithmetic."""
    if _dialect(session) == "postgresql":
        return text(
            "location_history.observed_at <= location_history.fetched_at"
            " + make_interval(secs => :future_tolerance_s)"
        ).bindparams(future_tolerance_s=float(tolerance_s))
    # SQLite keeps naive UTC text; strftime gives milliseconds (enough at the boundary)
    return text(
        "location_history.observed_at <= strftime('%Y-%m-%d %H:%M:%f',"
        " location_history.fetched_at, :future_shift)"
    ).bindparams(future_shift=f"+{float(tolerance_s)} seconds")


def _known_trackers(session: Session, tracker_ids: Sequence[str]) -> set[str]:
    stmt = select(_trackers.c.external_id).where(
        in_list(session, _trackers.c.external_id, tracker_ids)
    )
    return set(session.scalars(stmt))


# One statement text for any batch (arrays, not a VALUES list per row count), so it is
# compiled once and psycopg prepares it. The join skips trackers deleted meanwhile.
_INSERT_REPORTS_PG = text(
    "INSERT INTO location_history"
    " (tracker_id, observed_at, lat, lon, accuracy_m, source, fetched_at)"
    " SELECT u.tracker_id, u.observed_at, u.lat, u.lon, u.accuracy_m, u.source, u.fetched_at"
    " FROM ROWS FROM (json_to_recordset(CAST(:rows AS json)) AS (tracker_id text,"
    " observed_at timestamptz, lat float8, lon float8, accuracy_m float8, source text,"
    " fetched_at timestamptz)) WITH ORDINALITY"
    " AS u(tracker_id, observed_at, lat, lon, accuracy_m, source, fetched_at, n)"
    " JOIN trackers ON trackers.external_id = u.tracker_id"
    " ORDER BY u.n"
    " ON CONFLICT (tracker_id, observed_at) DO NOTHING"
    " RETURNING location_history.tracker_id, location_history.observed_at"
).columns(tracker_id=String(), observed_at=UTCDateTime())


def insert_reports(
    session: Session, reports: Sequence[LocationReported], known: set[str] | None = None
) -> list[LocationReported]:
    """Stores the reports; returns those that were new, in input order.

    A report already stored (same ``tracker_id`` and ``observed_at``) is ignored, also
    when it appears twice in ``reports`` (the first one counts). A report of a tracker
    that is not in ``trackers`` is skipped with a warning (it cannot satisfy the foreign
    key, and failing the batch would only make it fail again on redelivery); ``known``
    (the trackers the caller already found stored) saves looking them up.

    Rows are written in (tracker, observed_at) order, so two writers whose batches
    overlap take the unique index's locks in the same order. On PostgreSQL this is one
    prepared statement per batch.
    """
    unique: dict[tuple[str, datetime], LocationReported] = {}
    for r in reports:
        unique.setdefault((r.tracker_id, r.observed_at), r)
    if not unique:
        return []
    tracker_ids = sorted({t for t, _ in unique})
    if known is None:
        known = _known_trackers(session, tracker_ids)
    unknown = [t for t in tracker_ids if t not in known]
    if unknown:
        log.warning(
            "skipping reports of %d unknown tracker(s): %s",
            len(unknown),
            ", ".join(unknown[:10]) + (" ..." if len(unknown) > 10 else ""),
        )
    ordered = sorted((key for key in unique if key[0] in known), key=lambda k: (k[0], k[1]))
    rows = [unique[k] for k in ordered]
    inserted: set[tuple[str, datetime]] = set()
    if rows and _dialect(session) == "postgresql":
        params = {"rows": json_param(_report_row(r) for r in rows)}
        inserted.update((t, o) for t, o in session.execute(_INSERT_REPORTS_PG, params))
    else:
        for chunk in _chunks([_report_row(r) for r in rows]):
            stmt = (
                _insert(session, _reports)
                .values(list(chunk))
                .on_conflict_do_nothing(index_elements=["tracker_id", "observed_at"])
                .returning(_reports.c.tracker_id, _reports.c.observed_at)
            )
            inserted.update((t, o) for t, o in session.execute(stmt))
    return [r for key, r in unique.items() if key in inserted]


def _address_rows(geocoded: Sequence[LocationGeocoded]) -> list[LocationGeocoded]:
    """One per report (the last one counts), in (tracker, observed_at) order."""
    by_key = {(g.tracker_id, g.observed_at): g for g in geocoded}
    return [by_key[k] for k in sorted(by_key)]


# Locks the rows in id order first (ORDER BY ... FOR UPDATE locks after sorting), then
# updates them: one statement per batch, the same lock order as every other writer.
_SET_ADDRESSES_PG = text(
    "UPDATE location_history AS h SET city = v.city, country_code = v.country_code,"
    " country = v.country, address = v.address, time_zone = v.time_zone, geocoded_at = :at"
    " FROM (SELECT l.id, l.observed_at, u.city, u.country_code, u.country, u.address,"
    " u.time_zone"
    " FROM location_history AS l"
    " JOIN json_to_recordset(CAST(:rows AS json)) AS u(tracker_id text, observed_at"
    " timestamptz, city text, country_code text, country text, address text, time_zone text)"
    " ON l.tracker_id = u.tracker_id AND l.observed_at = u.observed_at"
    " ORDER BY l.id FOR UPDATE OF l) AS v"
    " WHERE h.id = v.id AND h.observed_at = v.observed_at"  # one partition per row
).bindparams(bindparam("at", type_=UTCDateTime()))

_SET_ADDRESS = (
    update(_reports)
    .where(
        _reports.c.tracker_id == bindparam("b_tracker"),
        _reports.c.observed_at == bindparam("b_observed", type_=UTCDateTime()),
    )
    .values(
        city=bindparam("b_city"),
        country_code=bindparam("b_cc"),
        country=bindparam("b_country"),
        address=bindparam("b_address"),
        time_zone=bindparam("b_tz"),
        geocoded_at=bindparam("b_at", type_=UTCDateTime()),
    )
)


def _address_params(g: LocationGeocoded, at: datetime) -> dict[str, Any]:
    return {
        "b_tracker": g.tracker_id,
        "b_observed": g.observed_at,
        "b_city": g.city,
        "b_cc": g.country_code,
        "b_country": g.country,
        "b_address": g.address,
        "b_tz": g.time_zone,
        "b_at": at,
    }


def set_addresses(session: Session, geocoded: Sequence[LocationGeocoded], at: datetime) -> None:
    """Stores the address of each report and sets ``geocoded_at`` (rewrites on repeat).

    One statement per batch on PostgreSQL (``UPDATE ... FROM json_to_recordset``, rows locked
    in id order); on SQLite one executemany in (tracker, observed_at) order."""
    rows = _address_rows(geocoded)
    if not rows:
        return
    if _dialect(session) == "postgresql":
        params = {
            "rows": json_param(
                {
                    "tracker_id": g.tracker_id,
                    "observed_at": g.observed_at,
                    "city": g.city,
                    "country_code": g.country_code,
                    "country": g.country,
                    "address": g.address,
                    "time_zone": g.time_zone,
                }
                for g in rows
            ),
            "at": at,
        }
        session.execute(_SET_ADDRESSES_PG, params)
        return
    session.execute(_SET_ADDRESS, [_address_params(g, at) for g in rows])


def set_addresses_each(
    session: Session, geocoded: Sequence[LocationGeocoded], at: datetime
) -> dict[int, Exception]:
    """:func:`set_addresses` one report at a time, each in a savepoint: for a batch
    whose set-based write failed. Returns the failures by index into ``geocoded``."""
    failed: dict[int, Exception] = {}
    order = sorted(
        range(len(geocoded)), key=lambda i: (geocoded[i].tracker_id, geocoded[i].observed_at)
    )
    for i in order:
        try:
            with session.begin_nested():
                session.execute(_SET_ADDRESS, [_address_params(geocoded[i], at)])
        except Exception as exc:
            failed[i] = exc
    return failed


def mark_geofence_checked(
    session: Session, reports: Sequence[tuple[str, datetime]], at: datetime
) -> None:
    """Sets ``geofence_checked_at`` of the reports ``(tracker_id, observed_at)``."""
    if not reports:
        return
    stmt = (
        update(_reports)
        .where(
            _reports.c.tracker_id == bindparam("b_tracker"),
            _reports.c.observed_at == bindparam("b_observed", type_=UTCDateTime()),
        )
        .values(geofence_checked_at=bindparam("b_at", type_=UTCDateTime()))
    )
    session.execute(stmt, [{"b_tracker": t, "b_observed": o, "b_at": at} for t, o in reports])


def incomplete_reports(
    session: Session, older_than: datetime, limit: int, max_republish: int | None = None
) -> tuple[list[LocationReport], list[LocationReport]]:
    """Reports the pipeline has not finished, after a grace period:
    ``(not_geocoded, not_checked)`` - fetched at or before ``older_than`` and never
    geocoded; geocoded at or before ``older_than`` and never geofence-checked. Oldest
    first, at most ``limit`` of each.

    With ``max_republish``: only reports re-published fewer times than that, and not
    since ``older_than`` (see :func:`mark_republished`)."""
    due: list[Any] = []
    if max_republish is not None:
        due = [
            LocationReport.republish_count < max_republish,
            or_(
                LocationReport.republished_at.is_(None),
                LocationReport.republished_at <= older_than,
            ),
        ]
    not_geocoded = list(
        session.scalars(
            select(LocationReport)
            .where(
                LocationReport.geocoded_at.is_(None),
                LocationReport.fetched_at <= older_than,
                *due,
            )
            .order_by(LocationReport.fetched_at, LocationReport.id)
            .limit(limit)
        )
    )
    not_checked = list(
        session.scalars(
            select(LocationReport)
            .where(
                LocationReport.geofence_checked_at.is_(None),
                LocationReport.geocoded_at.is_not(None),
                LocationReport.geocoded_at <= older_than,
                *due,
            )
            .order_by(LocationReport.geocoded_at, LocationReport.id)
            .limit(limit)
        )
    )
    return not_geocoded, not_checked


def claim_incomplete(
    session: Session,
    older_than: datetime,
    limit: int,
    max_republish: int,
    at: datetime,
    *,
    geocode: bool = True,
    geofence: bool = True,
) -> tuple[list[LocationReport], list[LocationReport]]:
    """:func:`incomplete_reports`, marked re-published (:func:`mark_republished`) in the
    same transaction, so a report is never re-sent without being counted.

    On PostgreSQL the rows are selected ``FOR UPDATE SKIP LOCKED``: rows a stage is
    writing right now are left for the next round, and the reconciler never waits for a
    row lock (so it can take part in no deadlock); two reconcilers get disjoint sets.
    ``geocode``/``geofence`` False leaves that stage's reports alone."""
    skip_locked = _dialect(session) == "postgresql"
    due = [
        LocationReport.republish_count < max_republish,
        or_(LocationReport.republished_at.is_(None), LocationReport.republished_at <= older_than),
    ]

    def pick(*where: Any, order: Any) -> list[LocationReport]:
        stmt = select(LocationReport).where(*where, *due).order_by(order, LocationReport.id)
        stmt = stmt.limit(limit)
        if skip_locked:
            stmt = stmt.with_for_update(skip_locked=True)
        return list(session.scalars(stmt))

    not_geocoded = (
        pick(
            LocationReport.geocoded_at.is_(None),
            LocationReport.fetched_at <= older_than,
            order=LocationReport.fetched_at,
        )
        if geocode
        else []
    )
    not_checked = (
        pick(
            LocationReport.geofence_checked_at.is_(None),
            LocationReport.geocoded_at.is_not(None),
            LocationReport.geocoded_at <= older_than,
            order=LocationReport.geocoded_at,
        )
        if geofence
        else []
    )
    picked = (*not_geocoded, *not_checked)
    if picked:
        observed = [r.observed_at for r in picked]
        mark_republished(session, [r.id for r in picked], at, (min(observed), max(observed)))
    for r in (*not_geocoded, *not_checked):
        session.expunge(r)  # keep the values read (the UPDATE must not expire them)
    return not_geocoded, not_checked


STALE_VIEW_HORIZON = timedelta(days=35)


def stale_view_trackers(
    session: Session,
    changed_from: datetime,
    changed_until: datetime,
    limit: int = 10_000,
    horizon: timedelta = STALE_VIEW_HORIZON,
) -> list[str]:
    """Trackers with a report checked in ``[changed_from, changed_until]`` that
    ``latest_location`` does not show yet (no row, an older report, or the report
    without its address): their refresh notice was lost. Sorted.

    Only reports observed within ``horizon`` before ``changed_from`` are looked at, so
    the scan reads the latest partitions, not the whole history (nothing indexes
    ``geofence_checked_at``): a lost notice for a report older than that when checked
    (a backlog uploaded weeks late) is left to the next report or a rebuild."""
    from schemas.views import LATEST_LOCATION as view

    changed = (
        select(
            _reports.c.tracker_id,
            func.max(_reports.c.observed_at).label("observed_at"),
        )
        .where(
            _reports.c.geofence_checked_at >= changed_from,
            _reports.c.geofence_checked_at <= changed_until,
            _reports.c.observed_at >= changed_from - horizon,
        )
        .group_by(_reports.c.tracker_id)
        .subquery()
    )
    h = _reports.alias("h")
    stmt = (
        select(changed.c.tracker_id)
        .join(
            h,
            and_(h.c.tracker_id == changed.c.tracker_id, h.c.observed_at == changed.c.observed_at),
        )
        .outerjoin(view, view.c.tracker_id == changed.c.tracker_id)
        .where(
            or_(
                view.c.tracker_id.is_(None),
                view.c.observed_at < changed.c.observed_at,
                and_(
                    view.c.observed_at == changed.c.observed_at,
                    h.c.geocoded_at.is_not(None),
                    or_(view.c.geocoded_at.is_(None), view.c.geocoded_at < h.c.geocoded_at),
                ),
            )
        )
        .order_by(changed.c.tracker_id)
        .limit(limit)
    )
    return list(session.scalars(stmt))


def mark_republished(
    session: Session,
    report_ids: Sequence[int],
    at: datetime,
    observed: tuple[datetime, datetime] | None = None,
) -> None:
    """Records that the reconciler re-published these reports (by row id) at ``at``;
    rows in id order, like every writer of ``location_history``. ``observed``, the
    reports' first and last ``observed_at``, keeps the update to their partitions."""
    bounds = []
    if observed is not None:
        bounds = [_reports.c.observed_at >= observed[0], _reports.c.observed_at <= observed[1]]
    for chunk in _chunks(sorted(set(report_ids)), 5000):
        session.execute(
            update(_reports)
            .where(_reports.c.id.in_(list(chunk)), *bounds)
            .values(republished_at=at, republish_count=_reports.c.republish_count + 1)
        )


def count_abandoned(session: Session, max_republish: int) -> int:
    """Unfinished reports the reconciler has re-published ``max_republish`` times."""
    unfinished = or_(_reports.c.geocoded_at.is_(None), _reports.c.geofence_checked_at.is_(None))
    return int(
        session.scalar(
            select(func.count())
            .select_from(_reports)
            .where(unfinished, _reports.c.republish_count >= max_republish)
        )
        or 0
    )


def count_not_geocoded(session: Session) -> int:
    return int(
        session.scalar(
            select(func.count()).select_from(_reports).where(_reports.c.geocoded_at.is_(None))
        )
        or 0
    )


def count_not_checked(session: Session) -> int:
    return int(
        session.scalar(
            select(func.count())
            .select_from(_reports)
            .where(_reports.c.geocoded_at.is_not(None), _reports.c.geofence_checked_at.is_(None))
        )
        or 0
    )


def reports_for(session: Session, tracker_id: str) -> list[LocationReport]:
    """The tracker's reports by ``observed_at``."""
    return list(
        session.scalars(
            select(LocationReport)
            .where(LocationReport.tracker_id == tracker_id)
            .order_by(LocationReport.observed_at)
        )
    )


# -- geofence events


def replace_events_at(
    session: Session, tracker_id: str, observed_at: datetime, events: Mapping[int, str]
) -> None:
    """Makes the tracker's events at ``observed_at`` exactly ``events``
    (geofence id -> "enter" | "exit"): others at that instant are deleted, these upserted."""
    for gid, kind in events.items():
        if kind not in EVENT_KINDS:
            raise ValueError(f"event kind must be 'enter' or 'exit', not {kind!r} (geofence {gid})")
    stale = delete(_events).where(
        _events.c.tracker_id == tracker_id, _events.c.observed_at == observed_at
    )
    if events:
        stale = stale.where(_events.c.geofence_id.not_in(list(events)))
    session.execute(stale)
    if not events:
        return
    now = utcnow()
    stmt = _insert(session, _events).values(
        [
            {
                "tracker_id": tracker_id,
                "geofence_id": int(gid),
                "observed_at": observed_at,
                "kind": kind,
                "created_at": now,
            }
            for gid, kind in sorted(events.items())
        ]
    )
    stmt = stmt.on_conflict_do_update(
        index_elements=["tracker_id", "geofence_id", "observed_at"],
        set_={"kind": stmt.excluded.kind},
    )
    session.execute(stmt)


def events_for(
    session: Session, tracker_id: str | None = None
) -> list[tuple[str, datetime, int, str]]:
    """``(tracker_id, observed_at, geofence_id, kind)`` of all events (or one tracker's),
    sorted."""
    stmt = select(
        GeofenceEvent.tracker_id,
        GeofenceEvent.observed_at,
        GeofenceEvent.geofence_id,
        GeofenceEvent.kind,
    ).order_by(GeofenceEvent.tracker_id, GeofenceEvent.observed_at, GeofenceEvent.geofence_id)
    if tracker_id is not None:
        stmt = stmt.where(GeofenceEvent.tracker_id == tracker_id)
    return [(t, o, g, k) for t, o, g, k in session.execute(stmt)]


# -- geofences


def _number(name: str, value: Any) -> float:
    if isinstance(value, bool) or value is None:
        raise InvalidGeofence(f"{name} must be a number, got {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise InvalidGeofence(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(number):
        raise InvalidGeofence(f"{name} must be finite, got {value!r}")
    return number


def _check_polygon(geometry_geojson: Any) -> str:
    if geometry_geojson is None:
        raise InvalidGeofence("a polygon geofence needs a geometry (a Polygon or MultiPolygon)")
    if isinstance(geometry_geojson, Mapping):
        data: Any = dict(geometry_geojson)
        raw = json.dumps(data)
    else:
        raw = str(geometry_geojson)
        try:
            data = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise InvalidGeofence(f"the geometry is not JSON: {exc}") from None
    if isinstance(data, Mapping) and data.get("type") == "Feature":
        data = data.get("geometry")
    if not isinstance(data, Mapping) or data.get("type") not in ("Polygon", "MultiPolygon"):
        found = data.get("type") if isinstance(data, Mapping) else type(data).__name__
        raise InvalidGeofence(
            f"the geometry must be a GeoJSON Polygon or MultiPolygon, not {found!r}"
        )
    _check_rings(data)
    try:
        geom = shape(data)
    except (ValueError, TypeError, KeyError, IndexError, shapely.errors.ShapelyError) as exc:
        raise InvalidGeofence(f"the geometry is not a usable {data['type']}: {exc}") from None
    if geom.is_empty:
        raise InvalidGeofence("the geometry is empty (no coordinates)")
    minx, miny, maxx, maxy = geom.bounds
    if not (minx >= -180 and maxx <= 180 and miny >= -90 and maxy <= 90):
        raise InvalidGeofence(
            f"the geometry's coordinates must be [lon, lat] within [-180, 180] x [-90, 90]; "
            f"bounds are {geom.bounds}"
        )
    if not geom.is_valid:
        raise InvalidGeofence(f"the geometry is not a valid polygon: {explain_validity(geom)}")
    if geom.area <= 0:
        raise InvalidGeofence("the geometry has zero area")
    return json.dumps(data, separators=(",", ":"))


def _check_rings(data: Mapping[str, Any]) -> None:
    """Each ring of a (Multi)Polygon needs at least 4 positions (closed: first == last)."""
    coords = data.get("coordinates")
    polygons = coords if data["type"] == "MultiPolygon" else [coords]
    if not isinstance(polygons, list):
        return  # shape() reports it
    for polygon in polygons:
        if not isinstance(polygon, list):
            continue
        for ring in polygon:
            if isinstance(ring, list) and 0 < len(ring) < 4:
                raise InvalidGeofence(
                    f"a polygon ring has {len(ring)} positions; a closed ring needs at least 4 "
                    "(too few points)"
                )
            _check_antimeridian(ring)


def _check_antimeridian(ring: Any) -> None:
    """An edge spanning more than 180 degrees of longitude is a ring drawn across the
    antimeridian without splitting it: read literally it is the other 340-odd degrees
    of the world, so it is refused."""
    if not isinstance(ring, list):
        return
    lons = [p[0] for p in ring if isinstance(p, list | tuple) and p and _is_number(p[0])]
    for a, b in pairwise(lons):
        if abs(b - a) > 180:
            raise InvalidGeofence(
                f"a ring crosses the antimeridian (an edge from longitude {a} to {b}); "
                "split it at 180/-180 into a MultiPolygon (RFC 7946, section 3.1.9)"
            )


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def validate_geofence(
    *,
    name: Any,
    kind: Any,
    center_lat: Any = None,
    center_lon: Any = None,
    radius_m: Any = None,
    geometry_geojson: Any = None,
) -> dict[str, Any]:
    """The geofence's stored fields, or :class:`InvalidGeofence` saying what is wrong.
    Fields that do not belong to the kind are cleared."""
    if not isinstance(name, str) or not name.strip():
        raise InvalidGeofence(f"a geofence needs a non-empty name, got {name!r}")
    if kind not in GEOFENCE_KINDS:
        raise InvalidGeofence(
            f"geofence {name!r}: kind must be 'circle' or 'polygon', not {kind!r}"
        )
    fields: dict[str, Any] = {
        "name": name.strip(),
        "kind": kind,
        "center_lat": None,
        "center_lon": None,
        "radius_m": None,
        "geometry_geojson": None,
    }
    try:
        if kind == "circle":
            if center_lat is None or center_lon is None or radius_m is None:
                raise InvalidGeofence("a circle needs center_lat, center_lon and radius_m")
            lat, lon = _number("center_lat", center_lat), _number("center_lon", center_lon)
            radius = _number("radius_m", radius_m)
            if not -90 <= lat <= 90:
                raise InvalidGeofence(f"center_lat must be within [-90, 90], got {lat}")
            if not -180 <= lon <= 180:
                raise InvalidGeofence(f"center_lon must be within [-180, 180], got {lon}")
            if radius <= 0:
                raise InvalidGeofence(f"radius_m must be positive, got {radius}")
            if radius > MAX_RADIUS_M:
                raise InvalidGeofence(
                    f"radius_m {radius:g} is larger than {MAX_RADIUS_M:g} m (a unit mistake?)"
                )
            fields.update(center_lat=lat, center_lon=lon, radius_m=radius)
        else:
            fields["geometry_geojson"] = _check_polygon(geometry_geojson)
    except InvalidGeofence as exc:
        raise InvalidGeofence(f"geofence {name!r}: {exc}") from None
    return fields


def _geofence_write_lock(session: Session) -> datetime:
    """Serialises geofence writes and returns a change time strictly after every stored
    ``updated_at``, so :func:`geofences_version` changes on every write even when clocks
    of different hosts disagree."""
    if _dialect(session) == "postgresql":
        session.execute(text("SELECT pg_advisory_xact_lock(hashtext('trackstream.geofences'))"))
    latest = session.scalar(select(func.max(Geofence.updated_at)))
    now = utcnow()
    if latest is not None and now <= latest:
        now = latest + timedelta(microseconds=1)
    return now


def add_geofence(
    session: Session,
    name: str,
    kind: str,
    center_lat: float | None = None,
    center_lon: float | None = None,
    radius_m: float | None = None,
    geometry_geojson: str | Mapping[str, Any] | None = None,
    active: bool = True,
) -> Geofence:
    """Validates and adds a geofence (:class:`InvalidGeofence` if it is not usable;
    nothing is written then). Returns it with its id."""
    fields = validate_geofence(
        name=name,
        kind=kind,
        center_lat=center_lat,
        center_lon=center_lon,
        radius_m=radius_m,
        geometry_geojson=geometry_geojson,
    )
    geofence = Geofence(**fields, active=bool(active), updated_at=_geofence_write_lock(session))
    session.add(geofence)
    session.flush()
    return geofence


_GEOFENCE_FIELDS = (
    "name",
    "kind",
    "center_lat",
    "center_lon",
    "radius_m",
    "geometry_geojson",
    "active",
)


def update_geofence(session: Session, geofence_id: int, **changes: Any) -> Geofence:
    """Changes fields of a geofence (validated like :func:`add_geofence`); bumps
    ``updated_at``. LookupError if there is no such geofence."""
    unknown = sorted(set(changes) - set(_GEOFENCE_FIELDS))
    if unknown:
        raise TypeError(
            f"unknown geofence field(s) {', '.join(unknown)}; fields: {', '.join(_GEOFENCE_FIELDS)}"
        )
    now = _geofence_write_lock(session)
    geofence = session.get(Geofence, geofence_id, with_for_update=True)
    if geofence is None:
        raise LookupError(f"no geofence with id {geofence_id}")
    merged = {f: getattr(geofence, f) for f in _GEOFENCE_FIELDS}
    merged.update(changes)
    active = bool(merged.pop("active"))
    fields = validate_geofence(**merged)
    for key, value in fields.items():
        setattr(geofence, key, value)
    geofence.active = active
    geofence.updated_at = now
    session.flush()
    return geofence


def deactivate_geofence(session: Session, geofence_id: int) -> Geofence:
    """Deactivates a geofence (it stays, with its events); bumps ``updated_at``."""
    return update_geofence(session, geofence_id, active=False)


def list_geofences(session: Session, include_inactive: bool = False) -> list[Geofence]:
    """Geofences by id: the active ones, or all."""
    stmt = select(Geofence).order_by(Geofence.id)
    if not include_inactive:
        stmt = stmt.where(Geofence.active.is_(True))
    return list(session.scalars(stmt))


def active_geofences(session: Session) -> list[Geofence]:
    """The active geofences, by id."""
    return list(
        session.scalars(select(Geofence).where(Geofence.active.is_(True)).order_by(Geofence.id))
    )


def geofences_version(session: Session) -> tuple[int, datetime | None, int | None]:
    """A value that changes whenever a geofence is added, changed or deactivated:
    ``(count, max(updated_at), max(id))``. Compare it with the last one seen to know
    whether to reload :func:`active_geofences`."""
    count, latest, max_id = session.execute(
        select(func.count(Geofence.id), func.max(Geofence.updated_at), func.max(Geofence.id))
    ).one()
    return int(count), latest, max_id

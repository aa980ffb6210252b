"""The ``location_history`` table's pipeline writes and reads: the fetch stage's cursor
and inserts, the geocode stage's addresses, and the backlog counts the exporter shows.

Tracker ids here are the trackers' external ids (``"SIM-00001"``). Like every store, the
functions take a session first and do not commit (see :mod:`schemas.sql`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import datetime
from typing import Any, cast

from sqlalchemy import String, Table, bindparam, func, select, text, update
from sqlalchemy.orm import Session

from schemas.db import json_param
from schemas.events import LocationGeocoded, LocationReported
from schemas.sql import chunks, dialect, dialect_insert, in_list
from schemas.tables import LocationReport, Tracker, UTCDateTime

__all__ = [
    "count_not_checked",
    "count_not_geocoded",
    "fetch_positions",
    "insert_reports",
    "set_addresses",
    "set_addresses_each",
]

log = logging.getLogger("trackstream.store")

_reports = cast(Table, LocationReport.__table__)
_trackers = cast(Table, Tracker.__table__)


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
    if dialect(session) == "postgresql":
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
    if rows and dialect(session) == "postgresql":
        params = {"rows": json_param(_report_row(r) for r in rows)}
        inserted.update((t, o) for t, o in session.execute(_INSERT_REPORTS_PG, params))
    else:
        for chunk in chunks([_report_row(r) for r in rows]):
            stmt = (
                dialect_insert(session, _reports)
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
    if dialect(session) == "postgresql":
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

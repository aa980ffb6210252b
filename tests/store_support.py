"""Reads and a few writes the tests use to look into the database (the stages have their
own, set-based ones: :mod:`schemas.report_store`, :mod:`schemas.geofence_store`).

Like every store, the functions take a session first and do not commit.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any, cast

from sqlalchemy import Table, and_, bindparam, func, or_, select, update
from sqlalchemy.orm import Session

from schemas.geofence_defs import update_geofence
from schemas.tables import Geofence, GeofenceEventRow, LocationReport, Tracker, UTCDateTime

_reports = cast(Table, LocationReport.__table__)


def _in_run(now: datetime) -> Any:
    return and_(
        Tracker.active.is_(True),
        or_(Tracker.run_starts_at.is_(None), Tracker.run_starts_at <= now),
        or_(Tracker.run_ends_at.is_(None), Tracker.run_ends_at > now),
    )


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
    since ``older_than`` (see :func:`schemas.reconcile_store.mark_republished`)."""
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


def reports_for(session: Session, tracker_id: str) -> list[LocationReport]:
    """The tracker's reports by ``observed_at``."""
    return list(
        session.scalars(
            select(LocationReport)
            .where(LocationReport.tracker_id == tracker_id)
            .order_by(LocationReport.observed_at)
        )
    )


def events_for(
    session: Session, tracker_id: str | None = None
) -> list[tuple[str, datetime, int, str]]:
    """``(tracker_id, observed_at, geofence_id, kind)`` of all events (or one tracker's),
    sorted."""
    stmt = select(
        GeofenceEventRow.tracker_id,
        GeofenceEventRow.observed_at,
        GeofenceEventRow.geofence_id,
        GeofenceEventRow.kind,
    ).order_by(
        GeofenceEventRow.tracker_id, GeofenceEventRow.observed_at, GeofenceEventRow.geofence_id
    )
    if tracker_id is not None:
        stmt = stmt.where(GeofenceEventRow.tracker_id == tracker_id)
    return [(t, o, g, k) for t, o, g, k in session.execute(stmt)]


def deactivate_geofence(session: Session, geofence_id: int) -> Geofence:
    """Deactivates a geofence (it stays, with its events); bumps ``updated_at``."""
    return update_geofence(session, geofence_id, active=False)

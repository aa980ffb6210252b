"""The reconciler's reads and writes: unfinished reports claimed for re-publishing,
trackers whose view refresh was lost, and the reports given up on.

Like every store, the functions take a session first and do not commit (see
:mod:`schemas.sql`).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any, cast

from sqlalchemy import Table, and_, func, or_, select, update
from sqlalchemy.orm import Session

from schemas.sql import chunks, dialect
from schemas.tables import LocationReport

__all__ = [
    "STALE_VIEW_HORIZON",
    "claim_incomplete",
    "count_abandoned",
    "mark_republished",
    "stale_view_trackers",
]

_reports = cast(Table, LocationReport.__table__)


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
    """Reports the pipeline has not finished, after a grace period, marked re-published
    (:func:`mark_republished`) in the same transaction, so a report is never re-sent
    without being counted: ``(not_geocoded, not_checked)`` - fetched at or before
    ``older_than`` and never geocoded; geocoded at or before ``older_than`` and never
    geofence-checked. Only reports re-published fewer than ``max_republish`` times and
    not since ``older_than``; oldest first, at most ``limit`` of each.

    On PostgreSQL the rows are selected ``FOR UPDATE SKIP LOCKED``: rows a stage is
    writing right now are left for the next round, and the reconciler never waits for a
    row lock (so it can take part in no deadlock); two reconcilers get disjoint sets.
    ``geocode``/``geofence`` False leaves that stage's reports alone."""
    skip_locked = dialect(session) == "postgresql"
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
    for chunk in chunks(sorted(set(report_ids)), 5000):
        session.execute(
            update(_reports)
            .where(_reports.c.id.in_(list(chunk)), *bounds)
            .values(republished_at=at, republish_count=_reports.c.republish_count + 1)
        )


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

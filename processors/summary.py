"""What the database holds, for the demo's tables and its final summary."""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select

from schemas.tables import GeofenceEventRow, LocationReport, RejectedReport, Tracker


def pipeline_counts(session: Any) -> dict[str, int]:
    def count(*where: Any, model: Any = LocationReport) -> int:
        return int(session.scalar(select(func.count()).select_from(model).where(*where)) or 0)

    return {
        "trackers": count(model=Tracker),
        "trackers fetched": count(Tracker.last_fetched_at.is_not(None), model=Tracker),
        "reports fetched": count(),
        "reports geocoded": count(LocationReport.geocoded_at.is_not(None)),
        "reports geofence-checked": count(LocationReport.geofence_checked_at.is_not(None)),
        "geofence enter events": count(GeofenceEventRow.kind == "enter", model=GeofenceEventRow),
        "geofence exit events": count(GeofenceEventRow.kind == "exit", model=GeofenceEventRow),
    }


def source_trouble(session: Any, lateness_s: float) -> dict[str, int]:
    """What the source sent besides plain on-time reports, and what became of it."""
    from schemas import source_store

    totals = source_store.totals(session)
    out = {
        "late reports stored": totals["late_reports"] - totals["beyond_bound_reports"],
        f"later than the {lateness_s:g} s bound, stored": totals["beyond_bound_reports"],
    }
    verdicts = session.execute(
        select(LocationReport.fix_status, func.count())
        .where(LocationReport.fix_status.is_not(None), LocationReport.fix_status != "ok")
        .group_by(LocationReport.fix_status)
        .order_by(LocationReport.fix_status)
    ).all()
    for status, n in verdicts:
        out[f"stored, rejected by the geofence stage: {status}"] = int(n)
    reasons = session.execute(
        select(RejectedReport.reason, func.count())
        .group_by(RejectedReport.reason)
        .order_by(func.count().desc())
        .limit(5)
    ).all()
    for reason, n in reasons:
        out[f"record rejected: {reason[:60]}"] = int(n)
    for code, n in totals["trackers_in_error"].items():
        out[f"trackers in error now: {code}"] = n
    return out

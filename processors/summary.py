"""What the database holds, for the demo's tables and its final summary."""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select

from schemas.tables import GeofenceEvent, LocationReport, Tracker


def pipeline_counts(session: Any) -> dict[str, int]:
    def count(*where: Any, model: Any = LocationReport) -> int:
        return int(session.scalar(select(func.count()).select_from(model).where(*where)) or 0)

    return {
        "trackers": count(model=Tracker),
        "trackers fetched": count(Tracker.last_fetched_at.is_not(None), model=Tracker),
        "reports fetched": count(),
        "reports geocoded": count(LocationReport.geocoded_at.is_not(None)),
        "reports geofence-checked": count(LocationReport.geofence_checked_at.is_not(None)),
        "geofence enter events": count(GeofenceEvent.kind == "enter", model=GeofenceEvent),
        "geofence exit events": count(GeofenceEvent.kind == "exit", model=GeofenceEvent),
    }

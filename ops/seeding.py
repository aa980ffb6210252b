"""Loading trackers (CSV) and geofences (GeoJSON), and seeding a simulated fleet.

Each loader takes a session and raises :class:`SeedError` with the file, line or
feature at fault; nothing is written when any row is bad (one transaction).
"""

from __future__ import annotations

import csv
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import select

from schemas import geofence_defs, tracker_store
from schemas.tables import Tracker


class SeedError(ValueError):
    pass


def _time(value: str, where: str) -> datetime | None:
    if not value.strip():
        return None
    try:
        t = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    except ValueError:
        raise SeedError(f"{where}: {value!r} is not an ISO-8601 time") from None
    if t.tzinfo is None:
        raise SeedError(f"{where}: {value!r} has no timezone")
    return t


def load_trackers_csv(session: Any, path: Path) -> int:
    rows = []
    first_line: dict[str, int] = {}
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or "external_id" not in reader.fieldnames:
            raise SeedError(f"{path}: needs a header with at least external_id")
        for line, row in enumerate(reader, start=2):
            where = f"{path}:{line}"
            ext = (row.get("external_id") or "").strip()
            if not ext:
                raise SeedError(f"{where}: external_id is empty")
            active = (row.get("active") or "true").strip().lower()
            if active not in ("true", "false", "1", "0", "yes", "no"):
                raise SeedError(f"{where}: active must be true or false, not {active!r}")
            if ext in first_line:
                raise SeedError(
                    f"{where}: external_id {ext!r} is already on line {first_line[ext]}"
                )
            first_line[ext] = line
            starts = _time(row.get("run_starts_at") or "", where)
            ends = _time(row.get("run_ends_at") or "", where)
            if starts is not None and ends is not None and ends <= starts:
                raise SeedError(
                    f"{where}: run_ends_at {ends.isoformat()} is not after run_starts_at "
                    f"{starts.isoformat()} (the tracker would never be fetched)"
                )
            rows.append(
                {
                    "external_id": ext,
                    "name": (row.get("name") or ext).strip(),
                    "active": active in ("true", "1", "yes"),
                    "run_starts_at": starts,
                    "run_ends_at": ends,
                }
            )
    tracker_store.upsert_trackers(session, rows)
    return len(rows)


def load_geofences_geojson(session: Any, path: Path) -> int:
    try:
        doc = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise SeedError(f"{path}: not JSON: {exc}") from None
    features = doc.get("features") if isinstance(doc, dict) else None
    if not isinstance(features, list):
        raise SeedError(f"{path}: expected a GeoJSON FeatureCollection")
    for i, feature in enumerate(features):
        where = f"{path}: feature {i}"
        props = feature.get("properties") or {}
        geometry = feature.get("geometry") or {}
        name = props.get("name")
        if not name:
            raise SeedError(f"{where}: properties.name is required")
        try:
            if geometry.get("type") == "Point":
                lon, lat = geometry["coordinates"][:2]
                geofence_defs.add_geofence(
                    session,
                    name=name,
                    kind="circle",
                    center_lat=lat,
                    center_lon=lon,
                    radius_m=props.get("radius_m"),
                )
            elif geometry.get("type") in ("Polygon", "MultiPolygon"):
                geofence_defs.add_geofence(
                    session, name=name, kind="polygon", geometry_geojson=json.dumps(geometry)
                )
            else:
                raise SeedError(
                    f"{where}: geometry must be Point (with radius_m), Polygon or MultiPolygon"
                )
        except (ValueError, KeyError, TypeError) as exc:
            if isinstance(exc, SeedError):
                raise
            raise SeedError(f"{where} ({name}): {exc}") from None
    return len(features)


def seed_simulated(
    session: Any, count: int, seed: int, now: datetime | None = None
) -> tuple[int, int]:
    """``count`` simulated trackers in a production run around now, and the demo geofences."""
    from processors.sources import SimulatedFleet

    now = now or datetime.now(UTC)
    rows = [
        {
            "external_id": f"SIM-{i:05d}",
            "name": f"Simulated tracker {i}",
            "active": True,
            "run_starts_at": now - timedelta(days=1),
            "run_ends_at": now + timedelta(days=30),
        }
        for i in range(1, count + 1)
    ]
    tracker_store.upsert_trackers(session, rows)
    existing = {g.name for g in geofence_defs.active_geofences(session)}
    added = 0
    for g in SimulatedFleet.geofences_for_demo():
        if g["name"] not in existing:
            geofence_defs.add_geofence(session, **g)
            added += 1
    return len(rows), added


def unknown_trackers(session: Any, external_ids: list[str]) -> list[str]:
    found = set(
        session.scalars(select(Tracker.external_id).where(Tracker.external_id.in_(external_ids)))
    )
    return [e for e in external_ids if e not in found]

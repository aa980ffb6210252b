"""The ``geofences`` table: validated adds and edits (:mod:`schemas.geofence_validation`),
the lists the CLI and the geofence stage read, and the version that tells the stage
when to reload them.

Like every store, the functions take a session first and do not commit (see
:mod:`schemas.sql`).
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, select, text
from sqlalchemy.orm import Session

from schemas.geofence_validation import validate_geofence
from schemas.sql import dialect
from schemas.tables import Geofence, utcnow

__all__ = [
    "active_geofences",
    "add_geofence",
    "geofences_version",
    "list_geofences",
    "update_geofence",
]


def _geofence_write_lock(session: Session) -> datetime:
    """Serialises geofence writes and returns a change time strictly after every stored
    ``updated_at``, so :func:`geofences_version` changes on every write even when clocks
    of different hosts disagree."""
    if dialect(session) == "postgresql":
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

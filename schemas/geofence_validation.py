"""What makes a geofence storable: :func:`validate_geofence` returns the stored fields
of a circle or a polygon, or raises :class:`InvalidGeofence` saying what is wrong (an
unclosed ring, a ring across the antimeridian, a radius in the wrong unit, ...).

Pure: no session, no database.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from itertools import pairwise
from typing import Any

import shapely
from shapely.geometry import shape
from shapely.validation import explain_validity

__all__ = ["GEOFENCE_KINDS", "MAX_RADIUS_M", "InvalidGeofence", "validate_geofence"]

GEOFENCE_KINDS = ("circle", "polygon")
MAX_RADIUS_M = 1_000_000.0  # 1,000 km: anything larger is a unit mistake, not a site


class InvalidGeofence(ValueError):
    """A geofence that cannot be stored; the message says what is wrong with it."""


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

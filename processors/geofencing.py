"""Which geofences contain a point, and the enter/exit events that follow from it.

Circles are tested by great-circle distance on a sphere of radius ``EARTH_RADIUS_M``
(inclusive: a point exactly ``radius_m`` away is inside). Polygons are GeoJSON
(``[lon, lat]`` order, holes supported) tested with shapely, boundary inclusive.
Polygons that cross the antimeridian must be split into a MultiPolygon, as GeoJSON
(RFC 7946) asks. A ``shapely.STRtree`` over polygon bounds and circle bounding boxes
narrows each lookup to a few exact tests. Coordinates are used as given: only a
longitude outside [-180, 180] is wrapped (so 10.1 stays 10.1 and 180 stays 180).

:meth:`GeofenceIndex.probe` also gives each point's distance to a fence's boundary in
metres (exact on the sphere for circles; for polygons in a local equirectangular plane
around the fence, in which the halves of a fence split at the antimeridian are one
shape again): the hysteresis in :mod:`processors.crossings` needs it.

:func:`transitions` and :func:`events_from_history` are the plain point-in-fence rule
(an event at each report whose membership changed); the geofence stage applies the
rules of :mod:`processors.crossings` instead.
"""

from __future__ import annotations

import json
import math
import zlib
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any, Literal

import numpy as np
import shapely
from shapely.geometry import shape

EARTH_RADIUS_M = 6_371_008.8  # mean radius (IUGG)
_BOX_MARGIN_DEG = 1e-9  # widens circle boxes against rounding

EventKind = Literal["enter", "exit"]
Event = tuple[datetime, int, EventKind]


def haversine_m(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    """Great-circle distance in metres."""
    p1, p2 = math.radians(lat1), math.radians(lat2)
    dp, dl = p2 - p1, math.radians(lon2 - lon1)
    h = math.sin(dp / 2) ** 2 + math.cos(p1) * math.cos(p2) * math.sin(dl / 2) ** 2
    return 2 * EARTH_RADIUS_M * math.asin(min(1.0, math.sqrt(h)))


def destination_point(
    lat: float, lon: float, bearing_deg: float, distance_m: float
) -> tuple[float, float]:
    """The point ``distance_m`` from (lat, lon) along ``bearing_deg``; lon in [-180, 180)."""
    d = distance_m / EARTH_RADIUS_M
    p1, l1, b = math.radians(lat), math.radians(lon), math.radians(bearing_deg)
    sin_p2 = math.sin(p1) * math.cos(d) + math.cos(p1) * math.sin(d) * math.cos(b)
    p2 = math.asin(max(-1.0, min(1.0, sin_p2)))
    l2 = l1 + math.atan2(
        math.sin(b) * math.sin(d) * math.cos(p1), math.cos(d) - math.sin(p1) * sin_p2
    )
    return math.degrees(p2), (math.degrees(l2) + 180.0) % 360.0 - 180.0


def circle_boxes(
    lat: float, lon: float, radius_m: float
) -> list[tuple[float, float, float, float]]:
    """Degree boxes (min_lon, min_lat, max_lon, max_lat) that together cover the circle.

    One box normally, two when the circle crosses the antimeridian, a full-longitude
    band when it reaches a pole.
    """
    d = radius_m / EARTH_RADIUS_M  # angular radius
    dlat = math.degrees(d) + _BOX_MARGIN_DEG
    south, north = max(-90.0, lat - dlat), min(90.0, lat + dlat)
    if north >= 90.0 or south <= -90.0 or d >= math.pi / 2:
        return [(-180.0, south, 180.0, north)]
    # Widest longitude extent of a spherical cap: asin(sin d / cos lat).
    ratio = math.sin(d) / math.cos(math.radians(lat))
    if ratio >= 1.0:
        return [(-180.0, south, 180.0, north)]
    dlon = math.degrees(math.asin(ratio)) + _BOX_MARGIN_DEG
    lon = _wrap_lon(lon)
    west, east = lon - dlon, lon + dlon
    if west <= -180.0:
        return [(west + 360.0, south, 180.0, north), (-180.0, south, east, north)]
    if east >= 180.0:
        return [(west, south, 180.0, north), (-180.0, south, east - 360.0, north)]
    return [(west, south, east, north)]


class GeofenceIndex:
    """Geofence rows indexed for point lookups; rebuild it when the rows change.

    A row is a mapping or an object with attributes ``id``, ``kind`` ("circle" or
    "polygon"), ``center_lat``/``center_lon``/``radius_m`` for circles and
    ``geometry_geojson`` (a JSON string or dict) for polygons. A row that does not fit
    raises ValueError naming its id.
    """

    def __init__(self, rows: Iterable[Any]) -> None:
        boxes: list[shapely.Geometry] = []
        self._box_fence: list[int] = []  # tree index -> position in the arrays below
        ids: list[int] = []
        fingerprint = zlib.crc32(b"")
        circles: list[tuple[float, float, float]] = []
        polygons: list[shapely.Geometry | None] = []
        planes: list[tuple[int, float, float, float, shapely.Geometry]] = []
        for row in rows:
            gid, kind = int(_field(row, "id")), _field(row, "kind")
            pos = len(ids)
            try:
                if kind == "circle":
                    lat, lon = float(_field(row, "center_lat")), float(_field(row, "center_lon"))
                    radius_m = float(_field(row, "radius_m"))
                    _check_circle(lat, lon, radius_m)
                    circles.append((lat, lon, radius_m))
                    polygons.append(None)
                    fence_boxes = [shapely.box(*b) for b in circle_boxes(lat, lon, radius_m)]
                elif kind == "polygon":
                    geom = _polygon(_field(row, "geometry_geojson"))
                    circles.append((math.nan, math.nan, math.nan))
                    polygons.append(geom)
                    fence_boxes = [shapely.box(*b) for b in _polygon_boxes(geom)]
                    planes.append((pos, *_local_plane(geom)))
                else:
                    raise ValueError(f"unknown kind {kind!r}")
            except (TypeError, ValueError, KeyError, shapely.errors.ShapelyError) as exc:
                raise ValueError(f"geofence {gid}: {exc}") from exc
            ids.append(gid)
            shape_key = [gid, kind]
            shape_key += [_field(row, k, None) for k in ("center_lat", "center_lon", "radius_m")]
            shape_key.append(_field(row, "geometry_geojson", None) if kind == "polygon" else None)
            fingerprint = zlib.crc32(repr(shape_key).encode(), fingerprint)
            boxes.extend(fence_boxes)
            self._box_fence.extend([pos] * len(fence_boxes))
        self._ids = np.array(ids, dtype=np.int64)
        self.version = f"{fingerprint:08x}"  # changes with any fence's id or shape
        circle_arr = np.array(circles, dtype=float).reshape(-1, 3)
        self._c_lat = np.radians(circle_arr[:, 0])
        self._c_lon = np.radians(circle_arr[:, 1])
        self._c_radius_m = circle_arr[:, 2]
        self._is_circle = ~np.isnan(self._c_radius_m)
        self._polygons = np.array(polygons, dtype=object)
        self._box_fence_arr = np.array(self._box_fence, dtype=np.int64)
        self._tree = shapely.STRtree(boxes)
        n = len(ids)
        # polygons: the local plane (lon0, lat0, metres per degree of longitude) and
        # the boundary drawn in it
        self._p_lon0 = np.zeros(n)
        self._p_lat0 = np.zeros(n)
        self._p_kx = np.ones(n)
        boundaries: list[shapely.Geometry | None] = [None] * n
        for pos, lon0, lat0, kx, boundary in planes:
            self._p_lon0[pos], self._p_lat0[pos], self._p_kx[pos] = lon0, lat0, kx
            boundaries[pos] = boundary
        self._p_boundary = np.array(boundaries, dtype=object)
        # each boundary's bounding box in its plane (min x, min y, max x, max y)
        self._p_box = np.zeros((n, 4))
        for pos, *_, boundary in planes:
            self._p_box[pos] = shapely.bounds(boundary)

    @property
    def ids(self) -> np.ndarray:
        """Geofence ids by position (positions are what :meth:`candidates` returns)."""
        return self._ids

    def is_circle(self, fence: np.ndarray) -> np.ndarray:
        """Whether each fence position is a circle (else a polygon)."""
        out: np.ndarray = self._is_circle[fence]
        return out

    def candidates(self, boxes: Sequence[tuple[float, float, float, float]]) -> np.ndarray:
        """``(box index, fence position)`` pairs, shape (2, n), whose boxes intersect:
        a cheap first cut before :meth:`probe`. Boxes are (min_lon, min_lat, max_lon,
        max_lat) within [-180, 180]."""
        if len(self._ids) == 0 or len(boxes) == 0:
            return np.zeros((2, 0), dtype=np.int64)
        arr = np.asarray(boxes, dtype=float).reshape(-1, 4)
        box_idx, tree_idx = self._tree.query(
            shapely.box(arr[:, 0], arr[:, 1], arr[:, 2], arr[:, 3])
        )
        pairs = np.unique(np.stack([box_idx, self._box_fence_arr[tree_idx]]), axis=1)
        return pairs.astype(np.int64)

    def probe(
        self,
        fence: np.ndarray,
        lat: np.ndarray,
        lon: np.ndarray,
        near_m: np.ndarray | None = None,
        linked: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """For each (fence position, lat, lon): whether the fence covers the point
        (boundary inclusive) and the point's distance to the fence's boundary in metres.
        Longitudes must be within [-180, 180].

        With ``near_m`` (per point) and ``linked`` (point i follows point i - 1 on a
        path): a polygon's point farther from the boundary's bounding box than its
        ``near_m`` and than its path neighbours gets that box distance instead (a lower
        bound, computed without GEOS) and is uncovered, as are its neighbours: a caller
        comparing distances with ``near_m`` and looking at distances only where
        coverage changes between neighbours gets the same answers."""
        n = len(fence)
        covered = np.zeros(n, dtype=bool)
        dist_m = np.zeros(n, dtype=float)
        if n == 0:
            return covered, dist_m
        circ = self._is_circle[fence]
        if circ.any():
            f = fence[circ]
            d = _haversine_np(
                np.radians(lat[circ]), np.radians(lon[circ]), self._c_lat[f], self._c_lon[f]
            )
            r = self._c_radius_m[f]
            covered[circ] = d <= r
            dist_m[circ] = np.abs(r - d)
        poly = ~circ
        if poly.any():
            f = fence[poly]
            plat, plon = lat[poly], lon[poly]
            x = wrap_lon_np(plon - self._p_lon0[f], always=True) * self._p_kx[f]
            y = (plat - self._p_lat0[f]) * M_PER_DEG
            box = self._p_box[f]
            gap = np.hypot(
                np.maximum(np.maximum(box[:, 0] - x, x - box[:, 2]), 0.0),
                np.maximum(np.maximum(box[:, 1] - y, y - box[:, 3]), 0.0),
            )
            exact = np.ones(len(f), dtype=bool)
            if near_m is not None and linked is not None:
                near = near_m[poly].astype(float)
                hop = np.zeros(len(f))  # metres from the point before on its path
                hop[1:] = np.where(linked[poly][1:], np.hypot(np.diff(x), np.diff(y)), 0.0)
                near = np.maximum(near, hop)
                near[:-1] = np.maximum(near[:-1], hop[1:])
                # 1 cm more: the plane's boundary is snapped to a 1 mm grid
                exact = gap <= near + 0.01
            cov = np.zeros(len(f), dtype=bool)
            d = gap
            if exact.any():
                fe = f[exact]
                # for a point, intersecting a polygon is being covered by it (boundary
                # inclusive)
                cov[exact] = shapely.intersects_xy(self._polygons[fe], plon[exact], plat[exact])
                d[exact] = shapely.distance(
                    self._p_boundary[fe], shapely.points(x[exact], y[exact])
                )
            covered[poly], dist_m[poly] = cov, d
        return covered, dist_m

    def path_points(
        self,
        fence: np.ndarray,
        lat_a: np.ndarray,
        lon_a: np.ndarray,
        dlat: np.ndarray,
        dlon: np.ndarray,
        dm: np.ndarray,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Where, along each path ``lat_a + f * dlat``, ``lon_a + f * dlon`` (f in
        [0, 1]; ``dlon`` already the short way), its fence's boundary is crossed, and for
        a circle where the path comes deepest into it against a margin growing by ``dm``
        metres from f = 0 to 1: ``(path index, f)`` pairs, f in [0, 1].

        Circles are solved in closed form in an equirectangular plane around the centre
        (within millimetres of the sphere at fence distances; the answers are places to
        test, each then tested exactly); polygons by intersecting the path with the
        boundary in the fence's own plane (:meth:`probe`'s), in one GEOS call."""
        n = len(fence)
        out_i: list[np.ndarray] = []
        out_f: list[np.ndarray] = []
        if n == 0:
            return np.zeros(0, dtype=np.int64), np.zeros(0)
        circ = self._is_circle[fence]
        mid_lon = lon_a + dlon / 2
        if circ.any():
            idx = np.flatnonzero(circ)
            f = fence[idx]
            c_lat, c_lon = np.degrees(self._c_lat[f]), np.degrees(self._c_lon[f])
            kx = M_PER_DEG * np.cos(self._c_lat[f])
            px = (wrap_lon_np(mid_lon[idx] - c_lon, always=True) - dlon[idx] / 2) * kx
            py = (lat_a[idx] - c_lat) * M_PER_DEG
            vx, vy = dlon[idx] * kx, dlat[idx] * M_PER_DEG
            vv = vx * vx + vy * vy
            ok = vv > 0
            safe = np.where(ok, vv, 1.0)
            pv = px * vx + py * vy
            r = self._c_radius_m[f]
            disc = pv * pv - vv * (px * px + py * py - r * r)
            root = np.sqrt(np.maximum(disc, 0.0))
            hit = ok & (disc >= 0)
            for sign in (-1.0, 1.0):
                out_i.append(idx[hit])
                out_f.append(((-pv + sign * root) / safe)[hit])
            # deepest: the minimum of |p + f v| + dm f (convex), where its slope is 0
            speed = np.sqrt(safe)
            h = np.abs(px * vy - py * vx) / speed  # the line's distance from the centre
            c = -dm[idx] / speed
            inner = ok & (np.abs(c) < 1)
            t = c * h / np.sqrt(np.where(inner, 1 - c * c, 1.0))
            out_i.append(idx[inner])
            out_f.append(((t * speed - pv) / safe)[inner])
        poly = ~circ
        if poly.any():
            idx = np.flatnonzero(poly)
            f = fence[idx]
            kx = self._p_kx[f]
            ax = (wrap_lon_np(mid_lon[idx] - self._p_lon0[f], always=True) - dlon[idx] / 2) * kx
            ay = (lat_a[idx] - self._p_lat0[f]) * M_PER_DEG
            vx, vy = dlon[idx] * kx, dlat[idx] * M_PER_DEG
            vv = vx * vx + vy * vy
            moving = vv > 0
            idx, f, ax, ay, vx, vy, vv = (a[moving] for a in (idx, f, ax, ay, vx, vy, vv))
            if len(idx):
                coords = np.stack([ax, ay, ax + vx, ay + vy], axis=1).reshape(-1, 2)
                lines = shapely.linestrings(coords, indices=np.repeat(np.arange(len(idx)), 2))
                meets = shapely.intersection(lines, self._p_boundary[f])
                xy, which = shapely.get_coordinates(meets, return_index=True)
                if len(which):
                    fr = (xy[:, 0] - ax[which]) * vx[which] + (xy[:, 1] - ay[which]) * vy[which]
                    out_i.append(idx[which])
                    out_f.append(fr / vv[which])
        if not out_i:
            return np.zeros(0, dtype=np.int64), np.zeros(0)
        path = np.concatenate(out_i).astype(np.int64)
        frac = np.concatenate(out_f)
        keep = (frac > 0.0) & (frac < 1.0)
        return path[keep], frac[keep]

    def path_speed(self, fence: np.ndarray, dlat: np.ndarray, dlon: np.ndarray) -> np.ndarray:
        """Metres per unit of f along each path in its polygon fence's plane: the
        boundary distance :meth:`probe` gives changes along the path by at most this
        much per unit of f."""
        kx = self._p_kx[fence]
        out: np.ndarray = np.hypot(dlon * kx, dlat * M_PER_DEG)
        return out

    def __len__(self) -> int:
        return len(self._ids)

    def members(self, lat: float, lon: float) -> frozenset[int]:
        """Ids of the geofences containing the point."""
        return self.members_many([(lat, lon)])[0]

    def members_many(self, points: Sequence[tuple[float, float]]) -> list[frozenset[int]]:
        """Ids of the geofences containing each (lat, lon) point, in order."""
        if len(points) == 0:
            return []
        lat = np.array([p[0] for p in points], dtype=float)
        lon = wrap_lon_np(np.array([p[1] for p in points], dtype=float))
        if np.any(np.abs(lat) > 90.0) or not np.all(np.isfinite(lat) & np.isfinite(lon)):
            raise ValueError("latitudes must be within [-90, 90] and coordinates finite")
        if len(self._ids) == 0:
            return [frozenset()] * len(points)
        pts = shapely.points(lon, lat)
        point_idx, box_idx = self._tree.query(pts)
        result: list[set[int]] = [set() for _ in points]
        fence = self._box_fence_arr[box_idx]
        inside = np.zeros(len(fence), dtype=bool)
        circ = self._is_circle[fence]
        if circ.any():
            pi, fi = point_idx[circ], fence[circ]
            inside[circ] = (
                _haversine_np(
                    np.radians(lat[pi]), np.radians(lon[pi]), self._c_lat[fi], self._c_lon[fi]
                )
                <= self._c_radius_m[fi]
            )
        poly = ~circ
        if poly.any():
            inside[poly] = shapely.covers(self._polygons[fence[poly]], pts[point_idx[poly]])
        for p, f in zip(point_idx[inside], fence[inside], strict=True):
            result[p].add(int(self._ids[f]))
        return [frozenset(s) for s in result]


def transitions(
    prev_members: frozenset[int] | None, cur_members: frozenset[int]
) -> dict[int, EventKind]:
    """Enter/exit events at a report, given the geofences holding it and its predecessor.

    ``prev_members`` None means the tracker has no earlier report: every geofence it is
    in counts as entered.
    """
    before = prev_members or frozenset()
    events: dict[int, EventKind] = {}
    for gid in sorted(cur_members - before):
        events[gid] = "enter"
    for gid in sorted(before - cur_members):
        events[gid] = "exit"
    return dict(sorted(events.items()))


def events_from_history(points: Iterable[Any], index: GeofenceIndex) -> list[Event]:
    """All (observed_at, geofence_id, kind) events of one tracker, the reference way.

    ``points`` are ``(observed_at, lat, lon)`` tuples or objects with those attributes,
    sorted by observed_at. Repeats of the same report are ignored; two different
    positions at one instant, or unsorted input, raise ValueError.
    """
    history: list[tuple[datetime, float, float]] = []
    for p in points:
        if isinstance(p, Sequence):
            item = (p[0], float(p[1]), float(p[2]))
        else:
            item = (p.observed_at, float(p.lat), float(p.lon))
        if history and item[0] <= history[-1][0]:
            if item == history[-1]:
                continue
            raise ValueError(f"points not sorted by observed_at (or conflicting at {item[0]})")
        history.append(item)
    memberships = index.members_many([(lat, lon) for _, lat, lon in history])
    events: list[Event] = []
    prev: frozenset[int] | None = None
    for (observed_at, _, _), cur in zip(history, memberships, strict=True):
        events.extend((observed_at, gid, kind) for gid, kind in transitions(prev, cur).items())
        prev = cur
    return events


def _haversine_np(
    lat1: np.ndarray, lon1: np.ndarray, lat2: np.ndarray, lon2: np.ndarray
) -> np.ndarray:
    """Vectorised :func:`haversine_m` on radians (same formula, same rounding)."""
    h = np.sin((lat2 - lat1) / 2) ** 2
    h = h + np.cos(lat1) * np.cos(lat2) * np.sin((lon2 - lon1) / 2) ** 2
    distance_m: np.ndarray = 2 * EARTH_RADIUS_M * np.arcsin(np.minimum(1.0, np.sqrt(h)))
    return distance_m


_MISSING = object()


def _field(row: Any, name: str, default: Any = _MISSING) -> Any:
    if default is _MISSING:
        return row[name] if isinstance(row, Mapping) else getattr(row, name)
    return row.get(name, default) if isinstance(row, Mapping) else getattr(row, name, default)


def _check_circle(lat: float, lon: float, radius_m: float) -> None:
    if not (-90.0 <= lat <= 90.0 and math.isfinite(lon)):
        raise ValueError(f"center ({lat}, {lon}) out of range")
    if not (radius_m > 0 and math.isfinite(radius_m)):
        raise ValueError(f"radius_m must be a positive number, got {radius_m}")


def _polygon(geojson: str | Mapping[str, Any]) -> shapely.Geometry:
    data = json.loads(geojson) if isinstance(geojson, str | bytes) else geojson
    geom = shape(data)
    if geom.geom_type not in ("Polygon", "MultiPolygon"):
        raise ValueError(f"geometry must be a Polygon or MultiPolygon, not {geom.geom_type}")
    if geom.is_empty:
        raise ValueError("geometry is empty")
    if not geom.is_valid:
        geom = shapely.make_valid(geom)
    shapely.prepare(geom)
    return geom


def _wrap_lon(lon: float) -> float:
    """``lon`` in [-180, 180]; a value already in range is returned unchanged."""
    return lon if -180.0 <= lon <= 180.0 else (lon + 180.0) % 360.0 - 180.0


def wrap_lon_np(lon: np.ndarray, always: bool = False) -> np.ndarray:
    """Longitudes outside [-180, 180] wrapped into [-180, 180); the others unchanged
    (``always``: every value into [-180, 180), for differences of longitudes)."""
    wrapped: np.ndarray = (lon + 180.0) % 360.0 - 180.0
    if always:
        return wrapped
    return np.where((lon >= -180.0) & (lon <= 180.0), lon, wrapped)


M_PER_DEG = math.pi / 180.0 * EARTH_RADIUS_M  # metres per degree of latitude


def _polygon_boxes(geom: shapely.Geometry) -> list[tuple[float, float, float, float]]:
    """Boxes of the polygon's parts (a fence split at the antimeridian has one box on
    each side, not one box around the whole world)."""
    parts = list(geom.geoms) if hasattr(geom, "geoms") else [geom]
    return [tuple(p.bounds) for p in parts if not p.is_empty]


def _local_plane(geom: shapely.Geometry) -> tuple[float, float, float, shapely.Geometry]:
    """(lon0, lat0, metres per degree of longitude, boundary in metres) of a polygon
    fence, in an equirectangular plane centred on its first vertex: longitudes are
    taken relative to lon0 and wrapped, so the halves of a fence split at the
    antimeridian meet again and are merged (their seam is no boundary)."""
    coords = shapely.get_coordinates(geom)
    lon0 = float(coords[0, 0])
    lat0 = float((coords[:, 1].min() + coords[:, 1].max()) / 2)
    kx = M_PER_DEG * math.cos(math.radians(lat0))

    def to_plane(xy: np.ndarray) -> np.ndarray:
        out = np.empty_like(xy)
        out[:, 0] = wrap_lon_np(xy[:, 0] - lon0, always=True) * kx
        out[:, 1] = (xy[:, 1] - lat0) * M_PER_DEG
        return out

    # seams at +-180 land within rounding of each other: merge on a 1 mm grid
    planar = shapely.union_all(shapely.transform(_parts(geom), to_plane), grid_size=1e-3)
    boundary = planar.boundary
    shapely.prepare(boundary)
    return lon0, lat0, kx, boundary


def _parts(geom: shapely.Geometry) -> np.ndarray:
    return np.array(list(geom.geoms) if hasattr(geom, "geoms") else [geom], dtype=object)

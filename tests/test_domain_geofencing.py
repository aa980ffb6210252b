"""Geofence membership (circles on the sphere, polygons with holes) and enter/exit events."""

from __future__ import annotations

import json
import random
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from typing import Any

import pytest
import shapely
from shapely.geometry import Point, shape

from processors.geofencing import (
    GeofenceIndex,
    circle_boxes,
    destination_point,
    events_from_history,
    haversine_m,
    transitions,
)

T0 = datetime(2024, 5, 1, tzinfo=UTC)


def circle(gid: int, lat: float, lon: float, radius_m: float) -> dict[str, Any]:
    return {
        "id": gid,
        "name": f"c{gid}",
        "kind": "circle",
        "center_lat": lat,
        "center_lon": lon,
        "radius_m": radius_m,
        "geometry_geojson": None,
    }


def polygon(gid: int, geometry: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": gid,
        "name": f"p{gid}",
        "kind": "polygon",
        "center_lat": None,
        "center_lon": None,
        "radius_m": None,
        "geometry_geojson": json.dumps(geometry),
    }


def square(lon0: float, lat0: float, lon1: float, lat1: float) -> list[list[float]]:
    return [[lon0, lat0], [lon1, lat0], [lon1, lat1], [lon0, lat1], [lon0, lat0]]


def test_destination_point_and_haversine_agree() -> None:
    for lat, lon, bearing, d in [
        (51.9, 4.48, 37.0, 1234.5),
        (-33.9, 151.2, 250.0, 80_000.0),
        (0.0, 179.99, 90.0, 5_000.0),
        (89.0, 0.0, 0.0, 50_000.0),
    ]:
        lat2, lon2 = destination_point(lat, lon, bearing, d)
        assert -180.0 <= lon2 < 180.0
        assert haversine_m(lat, lon, lat2, lon2) == pytest.approx(d, rel=1e-9)


@pytest.mark.parametrize(
    ("lat", "lon"),
    [
        (51.92, 4.48),
        (70.0, 25.0),
        (-54.8, -68.3),
        (0.0, 179.9995),
        (-10.0, -179.9999),
        (89.9995, 12.0),
    ],  # Rotterdam, far north, far south, both sides of 180°, at the pole
)
def test_circle_boundary_is_exact_on_the_sphere(lat: float, lon: float) -> None:
    index = GeofenceIndex([circle(1, lat, lon, 100.0)])
    for bearing in range(0, 360, 15):
        assert index.members(*destination_point(lat, lon, bearing, 99.0)) == {1}
        assert index.members(*destination_point(lat, lon, bearing, 101.0)) == frozenset()
    assert index.members(lat, lon) == {1}


def test_circle_boxes_cover_the_whole_circle() -> None:
    rng = random.Random(3)
    for _ in range(300):
        lat, lon = rng.uniform(-89.9, 89.9), rng.uniform(-180.0, 180.0)
        radius_m = 10 ** rng.uniform(1, 6.3)  # 10 m to 2,000 km
        boxes = [shapely.box(*b) for b in circle_boxes(lat, lon, radius_m)]
        for bearing in range(0, 360, 5):
            plat, plon = destination_point(lat, lon, bearing, radius_m * (1 - 1e-12))
            assert any(b.covers(Point(plon, plat)) for b in boxes), (lat, lon, radius_m, bearing)


def test_circle_boxes_split_at_the_antimeridian_and_widen_at_the_poles() -> None:
    assert len(circle_boxes(10.0, 179.999, 1_000.0)) == 2
    assert len(circle_boxes(10.0, -179.999, 1_000.0)) == 2
    assert circle_boxes(89.995, 0.0, 1_000.0) == [
        (-180.0, pytest.approx(89.986, abs=1e-3), 180.0, 90.0)
    ]


def test_polygon_with_a_hole_and_an_inclusive_boundary() -> None:
    outer = square(4.0, 51.0, 5.0, 52.0)
    hole = square(4.4, 51.4, 4.6, 51.6)
    index = GeofenceIndex([polygon(7, {"type": "Polygon", "coordinates": [outer, hole]})])
    assert index.members(51.2, 4.2) == {7}
    assert index.members(51.5, 4.5) == frozenset()  # in the hole
    assert index.members(51.0, 4.5) == {7}  # on the outer boundary
    assert index.members(51.4, 4.5) == {7}  # on the hole's boundary
    assert index.members(52.1, 4.5) == frozenset()


def test_multipolygon_rows_as_objects_and_overlapping_fences() -> None:
    multi = {"type": "MultiPolygon", "coordinates": [[square(0, 0, 1, 1)], [square(2, 0, 3, 1)]]}
    rows = [SimpleNamespace(**polygon(1, multi)), SimpleNamespace(**circle(2, 0.5, 2.5, 20_000))]
    index = GeofenceIndex(rows)
    assert len(index) == 2
    assert index.members_many([(0.5, 0.5), (0.5, 2.5), (0.5, 1.5), (0.5, 2.05)]) == [
        {1},
        {1, 2},
        frozenset(),
        {1},
    ]


def test_polygons_given_as_dicts_and_longitudes_out_of_range() -> None:
    row = polygon(3, {})
    row["geometry_geojson"] = {"type": "Polygon", "coordinates": [square(-10, -10, 10, 10)]}
    index = GeofenceIndex([row])
    assert index.members(0.0, 360.0) == {3}  # 360° east is 0°
    with pytest.raises(ValueError):
        index.members(91.0, 0.0)


def test_an_empty_index_contains_nothing() -> None:
    index = GeofenceIndex([])
    assert index.members(0.0, 0.0) == frozenset()
    assert index.members_many([]) == []


@pytest.mark.parametrize(
    ("row", "problem"),
    [
        ({**circle(5, 0, 0, 100), "radius_m": None}, "geofence 5"),
        ({**circle(5, 0, 0, 100), "radius_m": -1}, "radius_m"),
        ({**circle(5, 95, 0, 100)}, "out of range"),
        ({**circle(5, 0, 0, 100), "kind": "hexagon"}, "unknown kind"),
        (polygon(5, {"type": "Point", "coordinates": [0, 0]}), "Polygon"),
        ({**polygon(5, {}), "geometry_geojson": "{not json"}, "geofence 5"),
    ],
)
def test_rows_that_do_not_fit_are_refused_by_id(row: dict[str, Any], problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        GeofenceIndex([row])


def test_invalid_polygons_are_repaired() -> None:
    bowtie = [[0, 0], [1, 1], [1, 0], [0, 1], [0, 0]]
    index = GeofenceIndex([polygon(1, {"type": "Polygon", "coordinates": [bowtie]})])
    assert index.members(0.5, 0.2) == {1}
    assert index.members(0.2, 0.5) == frozenset()


def test_thousands_of_fences_match_a_brute_force_check() -> None:
    rng = random.Random(42)
    rows: list[dict[str, Any]] = []
    for gid in range(2_000):
        lat, lon = rng.uniform(-70, 70), rng.uniform(-180, 180)
        if gid % 2:
            rows.append(circle(gid, lat, lon, 10 ** rng.uniform(2, 5.3)))
        else:
            ring = [
                destination_point(lat, lon, b, rng.uniform(500, 100_000))
                for b in sorted(rng.uniform(0, 360) for _ in range(5))
            ]
            coords = [[p[1], p[0]] for p in ring]
            if max(c[0] for c in coords) - min(c[0] for c in coords) > 180:
                coords = [[c[0] % 360 - 180, c[1]] for c in coords]  # keep off the antimeridian
            rows.append(polygon(gid, {"type": "Polygon", "coordinates": [[*coords, coords[0]]]}))
    index = GeofenceIndex(rows)

    points = [(rng.uniform(-80, 80), rng.uniform(-180, 180)) for _ in range(1_000)]
    for row in rng.sample([r for r in rows if r["kind"] == "circle"], 500):
        for factor in (0.999, 1.001):  # just inside, just outside
            points.append(
                destination_point(
                    row["center_lat"],
                    row["center_lon"],
                    rng.uniform(0, 360),
                    row["radius_m"] * factor,
                )
            )
    for row in rng.sample([r for r in rows if r["kind"] == "polygon"], 500):
        c = shape(json.loads(row["geometry_geojson"])).representative_point()
        points.append((c.y, c.x))

    circles = [
        (r["id"], r["center_lat"], r["center_lon"], r["radius_m"])
        for r in rows
        if r["kind"] == "circle"
    ]
    poly_ids = [r["id"] for r in rows if r["kind"] == "polygon"]
    polys = [shape(json.loads(r["geometry_geojson"])) for r in rows if r["kind"] == "polygon"]

    def brute(lat: float, lon: float) -> frozenset[int]:
        """Every fence tested, no index: haversine per circle, shapely per polygon."""
        found = {gid for gid, clat, clon, r in circles if haversine_m(lat, lon, clat, clon) <= r}
        covered = shapely.covers(polys, Point(lon, lat))
        found.update(gid for gid, hit in zip(poly_ids, covered, strict=True) if hit)
        return frozenset(found)

    fast = index.members_many(points)
    sample = rng.sample(range(len(points)), 600)  # brute force is slow; check a sample
    assert [fast[i] for i in sample] == [brute(*points[i]) for i in sample]
    assert sum(1 for m in fast if m) >= 1_000  # the check exercised real hits
    assert [index.members(*points[i]) for i in sample[:50]] == [fast[i] for i in sample[:50]]


def test_transitions() -> None:
    assert transitions(None, frozenset({3, 1})) == {1: "enter", 3: "enter"}
    assert transitions(None, frozenset()) == {}
    assert transitions(frozenset({1, 2}), frozenset({2, 3})) == {1: "exit", 3: "enter"}
    assert transitions(frozenset({1}), frozenset({1})) == {}
    assert transitions(frozenset(), frozenset({5})) == {5: "enter"}


def walk() -> tuple[GeofenceIndex, list[tuple[datetime, float, float]]]:
    """A tracker that passes through a circle, then a polygon, then both (overlapping)."""
    index = GeofenceIndex(
        [
            circle(1, 0.0, 0.0, 1_000.0),
            polygon(2, {"type": "Polygon", "coordinates": [square(0.02, -0.01, 0.06, 0.01)]}),
        ]
    )
    lons = [-0.02, 0.0, 0.005, 0.015, 0.03, 0.05, 0.07, 0.0, 0.08, -0.001]
    return index, [(T0 + timedelta(minutes=5 * i), 0.0, lon) for i, lon in enumerate(lons)]


def test_events_from_history() -> None:
    index, history = walk()
    t = [h[0] for h in history]
    assert events_from_history(history, index) == [
        (t[1], 1, "enter"),
        (t[3], 1, "exit"),
        (t[4], 2, "enter"),
        (t[6], 2, "exit"),
        (t[7], 1, "enter"),
        (t[8], 1, "exit"),
        (t[9], 1, "enter"),
    ]
    objects = [SimpleNamespace(observed_at=o, lat=la, lon=lo) for o, la, lo in history]
    assert events_from_history(objects, index) == events_from_history(history, index)
    assert events_from_history([], index) == []


def test_events_do_not_depend_on_delivery_order_or_repeats() -> None:
    index, history = walk()
    expected = events_from_history(history, index)
    rng = random.Random(9)
    for _ in range(20):
        delivered = history + rng.sample(history, 4)  # redeliveries
        rng.shuffle(delivered)
        assert events_from_history(sorted(delivered), index) == expected
        assert incremental_events(delivered, index) == expected


def incremental_events(
    delivered: list[tuple[datetime, float, float]], index: GeofenceIndex
) -> list[tuple[datetime, int, str]]:
    """What the geofence stage does per delivery: recompute at the report and its successor."""
    stored: dict[datetime, tuple[float, float]] = {}
    events_at: dict[datetime, dict[int, str]] = {}
    for observed_at, lat, lon in delivered:
        stored[observed_at] = (lat, lon)
        times = sorted(stored)
        i = times.index(observed_at)
        prev = index.members(*stored[times[i - 1]]) if i > 0 else None
        cur = index.members(lat, lon)
        events_at[observed_at] = transitions(prev, cur)
        if i + 1 < len(times):
            events_at[times[i + 1]] = transitions(cur, index.members(*stored[times[i + 1]]))
    return [(t, g, k) for t in sorted(events_at) for g, k in events_at[t].items()]


def test_unsorted_or_conflicting_history_is_refused() -> None:
    index, history = walk()
    with pytest.raises(ValueError, match="sorted"):
        events_from_history([history[1], history[0]], index)
    with pytest.raises(ValueError, match="conflicting"):
        events_from_history([history[0], (history[0][0], 1.0, 1.0)], index)

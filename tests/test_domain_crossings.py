"""Crossings, position quality and hysteresis (processors.crossings), checked against an
independent oracle: the path between two reports sampled every metre, each sample
tested with this file's own haversine and ray-casting point-in-polygon, on real
coordinates."""

from __future__ import annotations

import json
import math
import random
from datetime import UTC, datetime, timedelta
from itertools import pairwise
from typing import Any

import pytest
import shapely

from processors.crossings import Rules, StoredFix, Window, evaluate, evaluate_history
from processors.geofencing import GeofenceIndex

T0 = datetime(2026, 3, 2, 8, 0, tzinfo=UTC)
R_EARTH = 6_371_008.8
EXACT = Rules(margin_m=0.0, use_accuracy=False, max_speed_kmh=None)


# -- the oracle (no code under test)


def hav(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    p1, p2, dl = math.radians(lat1), math.radians(lat2), math.radians(lon2 - lon1)
    a = math.sin((p2 - p1) / 2) ** 2 + math.cos(p1) * math.cos(p2) * math.sin(dl / 2) ** 2
    return 2 * R_EARTH * math.asin(math.sqrt(a))


def in_ring(lon: float, lat: float, ring: list[list[float]]) -> bool:
    inside = False
    for (x1, y1), (x2, y2) in pairwise(ring):
        if (y1 > lat) != (y2 > lat) and lon < x1 + (lat - y1) * (x2 - x1) / (y2 - y1):
            inside = not inside
    return inside


def in_polygon(lon: float, lat: float, rings: list[list[list[float]]]) -> bool:
    return in_ring(lon, lat, rings[0]) and not any(in_ring(lon, lat, h) for h in rings[1:])


def oracle_crossings(
    fixes: list[tuple[datetime, float, float]], inside: Any, step_m: float = 1.0
) -> list[tuple[datetime, str]]:
    """Every change of ``inside(lat, lon)`` along the straight segments between fixes,
    dated by linear interpolation of time at the first sample on the new side."""
    out: list[tuple[datetime, str]] = []
    state = inside(fixes[0][1], fixes[0][2])
    if state:
        out.append((fixes[0][0], "enter"))
    for (ta, la, oa), (tb, lb, ob) in pairwise(fixes):
        dlon = (ob - oa + 180) % 360 - 180
        n = max(1, int(hav(la, oa, lb, ob) / step_m))
        for k in range(1, n + 1):
            f = k / n
            lon = (oa + f * dlon + 180) % 360 - 180
            now = inside(la + f * (lb - la), lon)
            if now != state:
                out.append((ta + (tb - ta) * f, "enter" if now else "exit"))
                state = now
    return out


def east(lat: float, lon: float, metres: float) -> tuple[float, float]:
    """The point ``metres`` due east along the parallel (a line of constant latitude)."""
    return lat, lon + math.degrees(metres / (R_EARTH * math.cos(math.radians(lat))))


def north(lat: float, lon: float, metres: float) -> tuple[float, float]:
    return lat + math.degrees(metres / R_EARTH), lon


# -- helpers


def circle(gid: int, lat: float, lon: float, radius_m: float) -> dict[str, Any]:
    return {"id": gid, "kind": "circle", "center_lat": lat, "center_lon": lon, "radius_m": radius_m}


def polygon(gid: int, geometry: dict[str, Any]) -> dict[str, Any]:
    return {"id": gid, "kind": "polygon", "geometry_geojson": json.dumps(geometry)}


def rect(lon0: float, lat0: float, lon1: float, lat1: float) -> list[list[float]]:
    return [[lon0, lat0], [lon1, lat0], [lon1, lat1], [lon0, lat1], [lon0, lat0]]


def fixes_at(points: list[tuple[float, float]], every_s: float = 300, **kw: Any) -> list[StoredFix]:
    return [
        StoredFix(T0 + timedelta(seconds=every_s * i), lat, lon, **kw)
        for i, (lat, lon) in enumerate(points)
    ]


def check_against_oracle(
    index: GeofenceIndex, fence_id: int, inside: Any, fixes: list[StoredFix], rules: Rules = EXACT
) -> list[tuple[datetime, str]]:
    got = [(at, kind) for at, gid, kind in evaluate_history(index, rules, fixes) if gid == fence_id]
    want = oracle_crossings([(f.observed_at, f.lat, f.lon) for f in fixes], inside)
    assert [k for _, k in got] == [k for _, k in want], (got, want)
    for (g, _), (w, _) in zip(got, want, strict=True):
        assert abs((g - w).total_seconds()) < 1.0, (g, w)  # 1 m sampling at ~7 m/s
    return got


# -- crossings


@pytest.mark.parametrize("rules", [EXACT, Rules()], ids=["exact", "default"])
@pytest.mark.parametrize("offset_m", [0.0, 300.0, -420.0])
def test_driving_through_a_500_m_circle_between_two_reports(rules: Rules, offset_m: float) -> None:
    """Rotterdam: reports 2.2 km apart, the circle entirely between them."""
    lat, lon = 51.9225, 4.47917
    index = GeofenceIndex([circle(1, lat, lon, 500.0)])
    a = east(*north(lat, lon, offset_m), -1100.0)
    b = east(*north(lat, lon, offset_m), 1100.0)
    fixes = fixes_at([a, b, east(*b, 2200.0)])
    got = check_against_oracle(
        index, 1, lambda la, lo: hav(la, lo, lat, lon) <= 500.0, fixes, rules
    )
    assert [k for _, k in got] == ["enter", "exit"]
    # symmetric about the middle of the 5-minute segment
    mid = T0 + timedelta(seconds=150)
    assert abs((mid - got[0][0]) - (got[1][0] - mid)) < timedelta(seconds=1)


def test_a_polygon_with_a_hole_and_a_multipolygon_are_crossed_part_by_part() -> None:
    """Hamburg port area with a basin cut out, and two quays of a MultiPolygon in Antwerp,
    each crossed between two reports 4 km apart."""
    outer, hole = rect(9.90, 53.52, 9.96, 53.55), rect(9.92, 53.53, 9.94, 53.54)
    quays = [[rect(4.38, 51.25, 4.39, 51.26)], [rect(4.40, 51.25, 4.41, 51.26)]]
    index = GeofenceIndex(
        [
            polygon(1, {"type": "Polygon", "coordinates": [outer, hole]}),
            polygon(2, {"type": "MultiPolygon", "coordinates": quays}),
        ]
    )
    port = fixes_at([(53.535, 9.89), (53.5352, 9.97), (53.5355, 9.99)])
    got = check_against_oracle(index, 1, lambda la, lo: in_polygon(lo, la, [outer, hole]), port)
    assert [k for _, k in got] == ["enter", "exit", "enter", "exit"]  # in, basin, in, out

    quay = fixes_at([(51.255, 4.37), (51.2551, 4.42)])

    def on_a_quay(la: float, lo: float) -> bool:
        return any(in_polygon(lo, la, q) for q in quays)

    got = check_against_oracle(index, 2, on_a_quay, quay)
    assert [k for _, k in got] == ["enter", "exit", "enter", "exit"]


def test_a_fence_split_at_the_antimeridian_is_one_fence() -> None:
    """Taveuni (Fiji) straddles 180: a boat crossing it west to east enters once and
    leaves once, not at the seam; the same boat going east to west likewise."""
    east_half, west_half = rect(179.8, -16.9, 180.0, -16.7), rect(-180.0, -16.9, -179.8, -16.7)
    index = GeofenceIndex(
        [polygon(1, {"type": "MultiPolygon", "coordinates": [[east_half], [west_half]]})]
    )

    def on_island(la: float, lo: float) -> bool:
        return in_polygon(lo, la, [east_half]) or in_polygon(lo, la, [west_half]) or lo == 180.0

    for path in ([(-16.8, 179.7), (-16.8, -179.7)], [(-16.8, -179.7), (-16.8, 179.7)]):
        got = check_against_oracle(index, 1, on_island, fixes_at(path, every_s=3600))
        assert [k for _, k in got] == ["enter", "exit"]
    parked = fixes_at([(-16.8, 179.95), (-16.8, -179.95), (-16.8, 180.0), (-16.8, -179.99)])
    for rules in (EXACT, Rules()):
        events = evaluate_history(index, rules, parked)
        assert [(at, k) for at, _, k in events] == [(T0, "enter")], rules


def test_reports_exactly_on_a_boundary_count_as_inside() -> None:
    """Values taken as given: 10.1 is not moved to 10.099999999999994, 180 not to -180."""
    index = GeofenceIndex(
        [
            polygon(1, {"type": "Polygon", "coordinates": [rect(10.1, 45.0, 10.2, 45.1)]}),
            polygon(2, {"type": "Polygon", "coordinates": [rect(179.9, 10.0, 180.0, 10.1)]}),
        ]
    )
    assert index.members(45.05, 10.1) == {1}
    assert index.members(10.05, 180.0) == {2}
    assert index.members(10.05, -180.0) == frozenset()  # -180 is not on that fence
    fixes = fixes_at([(45.05, 10.0), (45.05, 10.1), (45.05, 10.0)])
    got = evaluate_history(index, EXACT, fixes)
    assert [(at, g, k) for at, g, k in got] == [
        (fixes[1].observed_at, 1, "enter"),
        (fixes[1].observed_at + timedelta(microseconds=1), 1, "exit"),  # strictly after
    ]
    # with the default margin a report on the boundary is not "clearly" inside
    assert evaluate_history(index, Rules(), fixes) == []


# -- hysteresis and position quality


@pytest.mark.parametrize("fence", ["circle", "polygon"])
def test_a_tracker_parked_on_a_boundary_for_an_hour_makes_no_events(fence: str) -> None:
    lat, lon = 51.9225, 4.47917
    if fence == "circle":
        index = GeofenceIndex([circle(1, lat, lon, 500.0)])
        spot = north(lat, lon, 500.0)
    else:
        spot = (lat, lon)
        index = GeofenceIndex(
            [
                polygon(
                    1,
                    {
                        "type": "Polygon",
                        "coordinates": [rect(lon, lat - 0.01, lon + 0.01, lat + 0.01)],
                    },
                )
            ]
        )
    rng = random.Random(5)
    points = []
    for _ in range(60):  # a fix a minute, 10-30 m from the spot in any direction
        d, bearing = rng.uniform(10, 30), rng.uniform(0, 2 * math.pi)
        points.append(east(*north(*spot, d * math.cos(bearing)), d * math.sin(bearing)))
    fixes = fixes_at(points, every_s=60, accuracy_m=15.0)
    assert evaluate_history(index, Rules(), fixes) == []
    # the same fixes without hysteresis flap (so the check above could fail)
    flaps = evaluate_history(index, EXACT, fixes)
    assert len(flaps) >= 10


def test_null_island_and_a_50_km_jump_make_no_events() -> None:
    """A tracker parked in Utrecht sends a (0, 0) fix and one fix 50 km away in the
    Rotterdam port, five minutes apart; fences around both spots stay quiet."""
    utrecht, rotterdam = (52.0907, 5.1214), (51.9225, 4.47917)
    assert 45_000 < hav(*utrecht, *rotterdam) < 50_000
    jump = north(*rotterdam, -3_000)
    assert hav(*utrecht, *jump) > 48_000
    index = GeofenceIndex([circle(1, 0.0, 0.0, 1_000.0), circle(2, *jump, 500.0)])
    points = [utrecht, utrecht, (0.0, 0.0), north(*utrecht, 5), jump, north(*utrecht, 9), utrecht]
    fixes = fixes_at(points, accuracy_m=10.0)
    assert evaluate_history(index, Rules(), fixes) == []
    no_filters = Rules(max_speed_kmh=None, reject_zero=False)
    assert {g for _, g, _ in evaluate_history(index, no_filters, fixes)} == {1, 2}


def test_each_rejection_has_its_reason() -> None:
    from processors.crossings import Window, evaluate

    fetched = T0 + timedelta(minutes=30)
    base = (52.0907, 5.1214)
    fixes = [
        StoredFix(T0, *base, 8.0, fetched),
        StoredFix(T0 + timedelta(minutes=1), 0.0, 0.0, 8.0, fetched),
        StoredFix(T0 + timedelta(minutes=2), *base, 8.0, fetched),  # same as the last accepted
        StoredFix(T0 + timedelta(minutes=3), *north(*base, 20), 900.0, fetched),
        StoredFix(T0 + timedelta(minutes=4), *north(*base, 30_000), 8.0, fetched),
        StoredFix(T0 + timedelta(hours=2), *north(*base, 40), 8.0, fetched),  # from the future
        StoredFix(T0 + timedelta(minutes=5), 91.0, 5.0, None, fetched),
        StoredFix(T0 + timedelta(minutes=6), *north(*base, 20), 8.0, fetched),
    ]
    fixes.sort(key=lambda f: f.t_us)
    (out,) = evaluate(GeofenceIndex([]), Rules(), [Window("t", fixes)])
    assert [s for _, s, _, _ in out.results] == [
        "ok", "zero", "duplicate", "accuracy", "speed", "invalid", "ok", "future",
    ]  # fmt: skip


@pytest.mark.parametrize("rules", [EXACT, Rules()], ids=["exact", "default"])
def test_distances_skipped_far_from_a_polygon_change_no_answer(
    rules: Rules, monkeypatch: pytest.MonkeyPatch
) -> None:
    """probe() gives a polygon's far samples their bounding-box distance instead of the
    exact one; 40 random tracks past a concave polygon, a polygon with a hole and one
    split at the antimeridian get exactly the verdicts, states and events they get
    with every distance computed exactly (some distances are skipped; far fewer since
    segments are tested at their crossings rather than sampled)."""
    lat0, lon0 = 51.9, 4.4
    c = [
        east(*north(lat0, lon0, n), e)
        for n, e in (
            (0, 0),
            (0, 900),
            (700, 900),
            (700, 600),
            (250, 600),
            (250, 300),
            (700, 300),
            (700, 0),
        )
    ]
    concave = {"type": "Polygon", "coordinates": [[[lo, la] for la, lo in [*c, c[0]]]]}
    holed = {
        "type": "Polygon",
        "coordinates": [rect(4.43, 51.89, 4.45, 51.91), rect(4.436, 51.896, 4.444, 51.904)],
    }
    split = {
        "type": "MultiPolygon",
        "coordinates": [
            [rect(179.99, -17.01, 180.0, -16.99)],
            [rect(-180.0, -17.01, -179.99, -16.99)],
        ],
    }
    index = GeofenceIndex([polygon(1, concave), polygon(2, holed), polygon(3, split)])
    rng = random.Random(5)
    tracks = []
    for i in range(40):
        la, lo = (lat0 + 0.003, lon0 + 0.02) if i % 4 else (-17.0, 179.995)
        points = []
        for _ in range(12):
            la, lo = north(la, lo, rng.uniform(-900, 900))
            la, lo = east(la, lo, rng.uniform(-900, 900))
            points.append((la, (lo + 180) % 360 - 180))
        tracks.append(fixes_at(points, accuracy_m=rng.choice([None, 5.0, 60.0])))
    measured: list[int] = []
    distance = shapely.distance

    def counting(a, b):  # type: ignore[no-untyped-def]
        measured.append(len(b))
        return distance(a, b)

    monkeypatch.setattr(shapely, "distance", counting)

    def outcomes() -> list[Any]:
        done = evaluate(index, rules, [Window(str(i), t) for i, t in enumerate(tracks)])
        return [[(s, state, evs) for _, s, state, evs in o.results] for o in done]

    fast = outcomes()
    fast_points, measured[:] = sum(measured), []
    original = GeofenceIndex.probe

    def exact(self, fence, lat, lon, near_m=None, linked=None):  # type: ignore[no-untyped-def]
        return original(self, fence, lat, lon)

    monkeypatch.setattr(GeofenceIndex, "probe", exact)
    slow = outcomes()
    assert fast == slow  # each fix's verdict, state and events
    assert sum(len(evs) for track in fast for *_, evs in track) >= 40, "tracks cross fences"
    assert fast_points < sum(measured), (fast_points, sum(measured))  # some skipped

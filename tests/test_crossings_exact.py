"""Narrow fences on long segments (processors.crossings): a 20-100 m circle or rectangle
passed by a segment of 1-100 km at random places on Earth is entered exactly when the
path comes deep enough into it, checked against this file's own closest approach (the
path is linear in lat/lon, the distance haversine, found by golden-section search; the
rectangle's depth in a plane of its own)."""

from __future__ import annotations

import json
import math
import random
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from processors.crossings import Rules, StoredFix, Window, evaluate

R_EARTH = 6_371_008.8
T0 = datetime(2026, 5, 4, 6, 0, tzinfo=UTC)
SPEED_MS = 80 / 3.6  # 80 km/h between the two reports


def hav(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    p1, p2, dl = math.radians(lat1), math.radians(lat2), math.radians(lon2 - lon1)
    a = math.sin((p2 - p1) / 2) ** 2 + math.cos(p1) * math.cos(p2) * math.sin(dl / 2) ** 2
    return 2 * R_EARTH * math.asin(math.sqrt(a))


def dest(lat: float, lon: float, bearing: float, metres: float) -> tuple[float, float]:
    d, p1, b = metres / R_EARTH, math.radians(lat), math.radians(bearing)
    p2 = math.asin(math.sin(p1) * math.cos(d) + math.cos(p1) * math.sin(d) * math.cos(b))
    l2 = math.radians(lon) + math.atan2(
        math.sin(b) * math.sin(d) * math.cos(p1), math.cos(d) - math.sin(p1) * math.sin(p2)
    )
    return math.degrees(p2), (math.degrees(l2) + 540) % 360 - 180


def along(a: tuple[float, float], b: tuple[float, float], f: float) -> tuple[float, float]:
    dlon = (b[1] - a[1] + 180) % 360 - 180
    return a[0] + f * (b[0] - a[0]), (a[1] + f * dlon + 180) % 360 - 180


def golden_max(fn: Any, lo: float, hi: float, steps: int = 200) -> tuple[float, float]:
    g = (math.sqrt(5) - 1) / 2
    x1, x2 = hi - g * (hi - lo), lo + g * (hi - lo)
    f1, f2 = fn(x1), fn(x2)
    for _ in range(steps):
        if f1 < f2:
            lo, x1, f1 = x1, x2, f2
            x2 = lo + g * (hi - lo)
            f2 = fn(x2)
        else:
            hi, x2, f2 = x2, x1, f1
            x1 = hi - g * (hi - lo)
            f1 = fn(x1)
    x = (lo + hi) / 2
    return x, fn(x)


def bisect(fn: Any, lo: float, hi: float) -> float:
    """The root of fn between lo (fn < 0) and hi (fn >= 0)."""
    for _ in range(80):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if fn(mid) >= 0 else (mid, hi)
    return (lo + hi) / 2


def depth_fn(kind: str, shape: Any, a: tuple[float, float], b: tuple[float, float]) -> Any:
    """Metres inside the fence (negative outside) at fraction f of the segment; near
    the fence (where the answer is decided) for the rectangle."""
    if kind == "circle":
        (clat, clon), r = shape
        return lambda f: r - hav(*along(a, b, f), clat, clon)
    (clat, clon), corners = shape  # a convex polygon in metres around (clat, clon)
    k = R_EARTH * math.pi / 180

    def depth(f: float) -> float:
        lat, lon = along(a, b, f)
        x = ((lon - clon + 180) % 360 - 180) * k * math.cos(math.radians(clat))
        y = (lat - clat) * k
        out = math.inf
        for (x1, y1), (x2, y2) in zip(corners, corners[1:] + corners[:1], strict=True):
            ex, ey = x2 - x1, y2 - y1  # counter-clockwise: inside is on the left
            out = min(out, (ex * (y - y1) - ey * (x - x1)) / math.hypot(ex, ey))
        return out

    return depth


def case(rng: random.Random, kind: str, margin: float) -> dict[str, Any]:
    length = rng.uniform(1_000, 100_000)
    a = (rng.uniform(-65, 65), rng.uniform(-180, 180))
    b = dest(*a, rng.uniform(0, 360), length)
    f0 = rng.uniform(0.05, 0.95)
    p = along(a, b, f0)
    heading = math.degrees(
        math.atan2(((b[1] - a[1] + 180) % 360 - 180) * math.cos(math.radians(p[0])), b[0] - a[0])
    )
    size = rng.uniform(20, 100)
    centre = dest(*p, heading + 90, rng.uniform(-1.0, 1.0) * (size + margin + 20))
    if kind == "circle":
        shape: Any = (centre, size)
        row = {"kind": "circle", "center_lat": centre[0], "center_lon": centre[1],
               "radius_m": size}  # fmt: skip
    else:
        w, h, turn = size, rng.uniform(20, 100), math.radians(rng.uniform(0, 180))
        corners = []
        for cx, cy in ((-w, -h), (w, -h), (w, h), (-w, h)):
            x, y = cx / 2, cy / 2
            corners.append((x * math.cos(turn) - y * math.sin(turn),
                            x * math.sin(turn) + y * math.cos(turn)))  # fmt: skip
        shape = (centre, corners)
        k = R_EARTH * math.pi / 180
        ring = [
            [centre[1] + x / (k * math.cos(math.radians(centre[0]))), centre[0] + y / k]
            for x, y in corners
        ]
        row = {"kind": "polygon",
               "geometry_geojson": json.dumps({"type": "Polygon",
                                               "coordinates": [[*ring, ring[0]]]})}  # fmt: skip
    return {"a": a, "b": b, "f0": f0, "kind": kind, "shape": shape, "row": row,
            "length": length}  # fmt: skip


@pytest.mark.parametrize("margin", [0.0, 8.0])
@pytest.mark.parametrize("kind", ["circle", "polygon"])
def test_narrow_fences_on_long_segments_are_never_skipped(kind: str, margin: float) -> None:
    from processors.geofencing import GeofenceIndex

    rng = random.Random(f"{kind}-{margin}")
    rules = Rules(margin_m=margin, use_accuracy=False, max_speed_kmh=None)
    cases = []
    while len(cases) < 150:
        c = case(rng, kind, margin)
        depth = depth_fn(kind, c["shape"], c["a"], c["b"])
        # the deepest point: golden-section search near where the fence was put (the
        # depth is unimodal there), after a coarse look along the whole segment
        grid = max(range(401), key=lambda i: depth(i / 400)) / 400
        lo, hi = max(0.0, grid - 1 / 400), min(1.0, grid + 1 / 400)
        f_best, best = golden_max(depth, lo, hi)
        if abs(best - margin) < 0.01 or depth(0) > -margin - 1 or depth(1) > -margin - 1:
            continue  # a tie to 1 cm, or a segment not starting and ending well outside
        c["enters"] = best >= margin
        if c["enters"]:
            c["f_in"] = bisect(depth, 0.0, f_best)
            c["f_out"] = 1 - bisect(lambda f, d=depth: d(1 - f), 0.0, 1 - f_best)
        cases.append(c)
    index = GeofenceIndex([{"id": i, **c["row"]} for i, c in enumerate(cases)])
    windows = []
    for i, c in enumerate(cases):
        dt = timedelta(seconds=c["length"] / SPEED_MS)
        windows.append(Window(str(i), [StoredFix(T0, *c["a"]), StoredFix(T0 + dt, *c["b"])]))
    outcomes = evaluate(index, rules, windows)
    wrong, late = [], []
    for i, (c, out) in enumerate(zip(cases, outcomes, strict=True)):
        events = sorted((at, kind) for _, _, _, evs in out.results for gid, at, kind in evs
                        if gid == i)  # fmt: skip
        want = ["enter", "exit"] if c["enters"] else []
        if [k for _, k in events] != want:
            wrong.append((i, c["length"], [k for _, k in events], want))
            continue
        if c["enters"]:
            dt_us = c["length"] / SPEED_MS * 1e6
            t0 = T0.timestamp() * 1e6
            for (at, _), f in zip(events, (c["f_in"], c["f_out"]), strict=True):
                if abs(at - t0 - f * dt_us) >= 5_000:  # 5 ms, 11 cm at 80 km/h
                    late.append((i, at - t0, f * dt_us))
    assert not wrong, (len(wrong), wrong)
    assert not late, (len(late), late)
    entered = sum(c["enters"] for c in cases)
    assert 30 <= entered <= 120, entered  # both verdicts are tested

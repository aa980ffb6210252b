"""A tracker's geofence events from its fixes: position quality, hysteresis, crossings.

The rules, applied to a tracker's stored reports in ``observed_at`` order:

1. **Position quality** (:func:`fix_problem`): a fix is rejected as ``invalid`` (not a
   coordinate, negative accuracy), ``zero`` (exactly 0, 0), ``future`` (observed later
   than ``future_tolerance_s`` after it was fetched), ``accuracy`` (worse than
   ``max_accuracy_m``), ``duplicate`` (same position and accuracy as the last accepted
   fix) or ``speed`` (the distance from the last accepted fix, less both accuracies, is
   more than ``max_speed_kmh`` allows in the time between: a teleport). Rejected fixes
   take no part in geofencing.
2. **Path**: accepted fixes are joined by straight segments (linear in lat/lon, across
   the antimeridian the short way), and the tracker is taken to move along them at a
   steady pace. Each segment is tested exactly (haversine for circles,
   boundary-inclusive covers for polygons) at its ends, where it crosses a fence's
   boundary, between two crossings, and where it comes deepest into a circle (closed
   form, in a plane around the centre: within millimetres of the sphere there); for a
   polygon, between those, at a place beyond the margin found by halving under the
   distance's Lipschitz bound (to 1 mm; at most 64 stretches at a time, so a path
   running for kilometres within a millimetre of the margin could be missed), if there
   is one. No fence is skipped at any segment length.
3. **Hysteresis**: a tracker outside a fence enters it only at a point inside by at
   least the margin, and leaves only at a point outside by more than the margin. The
   margin is ``margin_m``, or the fix's accuracy when larger (``use_accuracy``),
   interpolated along a segment. Jitter within the margin of a boundary changes
   nothing; ``margin_m=0`` without accuracies is the exact rule (on the boundary is
   inside).
4. **Event times**: an event is dated at the tracker's last crossing of the true
   boundary before it was confirmed (interpolated between tested places, rounded up
   to the microsecond), or at the fix itself for the first fix of a tracker. Events of one
   fence are strictly increasing in time. An event belongs to the fix that confirmed
   it (``report_at``); its time may be earlier.

The state carried from one accepted fix to the next (:class:`Carry`: fences inside
since when, and unconfirmed crossings) is stored with each fix, so a late or repeated
report recomputes from the accepted fix before it, forward, until a fix's recomputed
state equals the stored one (:func:`evaluate`). :func:`evaluate_history` computes a
whole history from scratch: the two give the same answer whatever the order reports
were checked in.
"""

from __future__ import annotations

import json
import math
import zlib
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Literal, NamedTuple

import numpy as np

from processors.geofencing import EARTH_RADIUS_M, M_PER_DEG, GeofenceIndex, wrap_lon_np

__all__ = [
    "OK",
    "REASONS",
    "Carry",
    "Outcome",
    "Rules",
    "StoredFix",
    "Window",
    "evaluate",
    "evaluate_history",
    "fix_problem",
    "from_us",
    "state_prefix",
    "state_version",
    "to_us",
]

OK = "ok"
REASONS = ("invalid", "zero", "future", "accuracy", "duplicate", "speed")
MAX_HALVINGS = 48  # a stretch of 100 km halved to 1 mm takes 27
MAX_STRETCHES = 64  # per stretch between tested places, in a search beyond the margin
BOUND_TOL_M = 1e-3  # a place beyond the margin by less than this may be missed
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_US = timedelta(microseconds=1)

Kind = Literal["enter", "exit"]


def to_us(at: datetime) -> int:
    return (at - EPOCH) // _US


def from_us(us: int) -> datetime:
    return EPOCH + timedelta(microseconds=us)


@dataclass(frozen=True)
class Rules:
    """Position quality filters and hysteresis (settings ``fix_*`` / ``geofence_*``).
    None (or 0 for the speed) switches a filter off."""

    margin_m: float = 30.0
    use_accuracy: bool = True
    max_accuracy_m: float | None = 500.0
    max_speed_kmh: float | None = 300.0
    future_tolerance_s: float | None = 300.0
    reject_zero: bool = True
    reject_duplicates: bool = True

    def __post_init__(self) -> None:
        for name in ("margin_m", "max_accuracy_m", "max_speed_kmh", "future_tolerance_s"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a number >= 0, got {value!r}")

    def margin(self, accuracy_m: float | None) -> float:
        if self.use_accuracy and accuracy_m is not None and accuracy_m > self.margin_m:
            return float(accuracy_m)
        return self.margin_m


class StoredFix:
    """A stored report, with the state stored for it (None: not evaluated yet)."""

    __slots__ = (
        "accuracy_m",
        "fetched_at",
        "id",
        "lat",
        "lon",
        "observed_at",
        "state",
        "status",
        "t_us",
    )

    def __init__(
        self,
        observed_at: datetime,
        lat: float,
        lon: float,
        accuracy_m: float | None = None,
        fetched_at: datetime | None = None,
        *,
        status: str | None = None,
        state: str | None = None,
        id: int | None = None,
    ) -> None:
        self.observed_at = observed_at
        self.t_us = to_us(observed_at)
        self.lat, self.lon, self.accuracy_m = float(lat), float(lon), accuracy_m
        self.fetched_at = fetched_at
        self.status, self.state, self.id = status, state, id

    def __repr__(self) -> str:
        return f"StoredFix({self.observed_at.isoformat()}, {self.lat}, {self.lon}, {self.status})"


def fix_problem(fix: StoredFix, last: StoredFix | None, rules: Rules) -> str | None:
    """Why the fix is rejected (one of :data:`REASONS`), given the last accepted fix
    before it; None when it is accepted."""
    lat, lon, acc = fix.lat, fix.lon, fix.accuracy_m
    if not (
        math.isfinite(lat)
        and math.isfinite(lon)
        and -90.0 <= lat <= 90.0
        and -180.0 <= lon <= 180.0
        and (acc is None or (math.isfinite(acc) and acc >= 0))
    ):
        return "invalid"
    if rules.reject_zero and lat == 0.0 and lon == 0.0:
        return "zero"
    if (
        rules.future_tolerance_s is not None
        and fix.fetched_at is not None
        and (fix.observed_at - fix.fetched_at).total_seconds() > rules.future_tolerance_s
    ):
        return "future"
    if rules.max_accuracy_m is not None and acc is not None and acc > rules.max_accuracy_m:
        return "accuracy"
    if last is None:
        return None
    if rules.reject_duplicates and (lat, lon, acc) == (last.lat, last.lon, last.accuracy_m):
        return "duplicate"
    if rules.max_speed_kmh:
        moved_m = _haversine(last.lat, last.lon, lat, lon) - (acc or 0.0) - (last.accuracy_m or 0.0)
        dt_s = (fix.t_us - last.t_us) / 1e6
        if moved_m > 0 and moved_m > rules.max_speed_kmh / 3.6 * dt_s:
            return "speed"
    return None


@dataclass
class Carry:
    """What a tracker's next fix needs to know: the fences it is inside (since when,
    microseconds) and crossings to the other side not confirmed yet."""

    version: str = ""
    inside: dict[int, int] = field(default_factory=dict)
    pending: dict[int, int] = field(default_factory=dict)

    def dumps(self) -> str:
        """Canonical JSON, starting ``{"v":"<state version>"`` (see :func:`state_prefix`):
        ``{"v":"...","in":{"<id>":<us>,...},"pending":{...}}``, ids in order."""
        out = f'{{"v":"{self.version}"'
        if self.inside:
            out += ',"in":' + _int_map(self.inside)
        if self.pending:
            out += ',"pending":' + _int_map(self.pending)
        return out + "}"

    @classmethod
    def loads(cls, text: str | None) -> Carry:
        if not text:
            return cls()
        data = json.loads(text)
        return cls(
            str(data.get("v", "")),
            {int(k): int(v) for k, v in data.get("in", {}).items()},
            {int(k): int(v) for k, v in data.get("pending", {}).items()},
        )


def _int_map(d: dict[int, int]) -> str:
    return "{" + ",".join(f'"{k}":{v}' for k, v in sorted(d.items())) + "}"


def state_version(index: GeofenceIndex, rules: Rules) -> str:
    """Names the fences and rules a state was computed under (8 hex digits)."""
    return f"{zlib.crc32(repr((index.version, rules)).encode()):08x}"


def state_prefix(index: GeofenceIndex, rules: Rules) -> str:
    """How every state stored under these fences and rules begins: a window only
    starts from a fix evaluated under the fences and rules in force now (after a
    change, a tracker's history is evaluated again from its start)."""
    return f'{{"v":"{state_version(index, rules)}"'


@dataclass
class Window:
    """A tracker's fixes to (re)evaluate, sorted. With ``anchored`` the first one is the
    accepted fix the evaluation starts from (its stored state is trusted). The
    evaluation may stop at an accepted fix after ``stop_after_us`` whose recomputed
    state equals its stored one."""

    tracker_id: str
    fixes: list[StoredFix]
    anchored: bool = False
    stop_after_us: int | None = None


@dataclass
class Outcome:
    """Per fix after the anchor, up to where the evaluation stopped: ``(fix, status,
    state, events)`` with events ``(geofence id, at µs, kind)``. Events stored for
    fixes with ``report_at`` in ``(lo_us, hi_us]`` (None: unbounded) are to be
    replaced by these."""

    tracker_id: str
    results: list[tuple[StoredFix, str, str | None, list[tuple[int, int, Kind]]]]
    lo_us: int | None
    hi_us: int | None
    converged: bool


def evaluate_history(
    index: GeofenceIndex, rules: Rules, fixes: Sequence[StoredFix]
) -> list[tuple[datetime, int, Kind]]:
    """All events of one tracker's whole history, from scratch: ``(at, geofence id,
    kind)`` sorted by time."""
    fixes = sorted(fixes, key=lambda f: f.t_us)
    (outcome,) = evaluate(index, rules, [Window("", list(fixes))])
    events = [(from_us(at), gid, kind) for _, _, _, evs in outcome.results for gid, at, kind in evs]
    return sorted(events)


def evaluate(index: GeofenceIndex, rules: Rules, windows: Sequence[Window]) -> list[Outcome]:
    """Evaluates windows of fixes (see :class:`Window`), the geometry vectorised over all
    of them."""
    # 1. position quality, and the segments between accepted fixes
    statuses: list[list[str]] = []
    seg_fix: list[tuple[int, int]] = []  # (window, fix index) of each segment's end
    seg_prev: list[StoredFix | None] = []
    ends: list[int] = []  # fixes evaluated per window
    for w_i, w in enumerate(windows):
        last = w.fixes[0] if w.anchored else None
        st: list[str] = [OK] if w.anchored else []
        end = len(w.fixes)
        if w.stop_after_us is not None:
            # a report after the batch that was never evaluated will be, in its own
            # check, which carries on from here: stop before it
            stop = w.stop_after_us
            end = next(
                (j for j, f in enumerate(w.fixes) if f.t_us > stop and f.status is None), end
            )
        ends.append(end)
        for f_i in range(1 if w.anchored else 0, end):
            fix = w.fixes[f_i]
            problem = fix_problem(fix, last, rules)
            st.append(problem or OK)
            if problem is None:
                seg_fix.append((w_i, f_i))
                seg_prev.append(last)
                last = fix
        statuses.append(st)
    samples = _Samples(index, rules, windows, seg_fix, seg_prev)

    # 2. the state machine, fix by fix
    version = state_version(index, rules)
    outcomes: list[Outcome] = []
    seg_i = 0
    for w_i, w in enumerate(windows):
        carry = Carry.loads(w.fixes[0].state) if w.anchored else Carry(version)
        if carry.version != version:
            raise ValueError(
                f"tracker {w.tracker_id}: the anchor's state is from other fences or rules "
                f"({carry.version!r}, now {version!r}); start from the first fix"
            )
        results: list[tuple[StoredFix, str, str | None, list[tuple[int, int, Kind]]]] = []
        state = carry.dumps()
        converged = False
        hi_us: int | None = None
        seg_end = seg_i + statuses[w_i].count(OK) - w.anchored  # the anchor is no segment
        for f_i in range(1 if w.anchored else 0, ends[w_i]):
            fix, status = w.fixes[f_i], statuses[w_i][f_i]
            if status != OK:
                results.append((fix, status, None, []))
                continue
            events: list[tuple[int, int, Kind]] = []
            touched = samples.run(seg_i, carry, events)
            seg_i += 1
            if touched:
                state = carry.dumps()
            results.append((fix, OK, state, events))
            if (
                w.stop_after_us is not None
                and fix.t_us > w.stop_after_us
                and fix.status == OK
                and fix.state == state
            ):
                converged, hi_us = True, fix.t_us
                break
        if not converged and ends[w_i] < len(w.fixes):
            converged, hi_us = True, w.fixes[ends[w_i] - 1].t_us
        seg_i = seg_end
        lo_us = w.fixes[0].t_us if w.anchored else None
        outcomes.append(Outcome(w.tracker_id, results, lo_us, hi_us, converged))
    return outcomes


class _Segments(NamedTuple):
    """Per segment: its ends' latitudes, the start's longitude, the longitude span
    (wrapped) and the ends' margins, in metres."""

    lat_a: np.ndarray
    lat_b: np.ndarray
    lon_a: np.ndarray
    dlon: np.ndarray
    m_a: np.ndarray
    m_b: np.ndarray


class _Samples:
    """The fixes and path samples near each fence, tested in one vectorised pass."""

    def __init__(
        self,
        index: GeofenceIndex,
        rules: Rules,
        windows: Sequence[Window],
        seg_fix: Sequence[tuple[int, int]],
        seg_prev: Sequence[StoredFix | None],
    ) -> None:
        self.index = index
        self.rules = rules
        n = len(seg_fix)
        ends = [windows[w].fixes[f] for w, f in seg_fix]
        starts = [p if p is not None else e for p, e in zip(seg_prev, ends, strict=True)]
        self.point = np.array([p is None for p in seg_prev], dtype=bool)
        lat_a = np.array([f.lat for f in starts], dtype=float)
        lon_a = np.array([f.lon for f in starts], dtype=float)
        lat_b = np.array([f.lat for f in ends], dtype=float)
        lon_b = np.array([f.lon for f in ends], dtype=float)
        self.t_a = [f.t_us for f in starts]
        self.t_b = [f.t_us for f in ends]
        dt = np.array([e.t_us - s.t_us for s, e in zip(starts, ends, strict=True)], dtype=float)
        m_a = np.array([rules.margin(f.accuracy_m) for f in starts], dtype=float)
        m_b = np.array([rules.margin(f.accuracy_m) for f in ends], dtype=float)
        dlon = wrap_lon_np(lon_b - lon_a, always=True) if n else np.zeros(0)
        self.lon_b = lon_b
        self.by_seg: dict[int, list[tuple[int, int, int]]] = defaultdict(list)
        if n == 0 or len(index) == 0:
            return
        # candidate fences: the segment's box widened by its margin
        pad = np.maximum(m_a, m_b) * 1.01 / M_PER_DEG + 1e-9
        lo_lat = np.maximum(np.minimum(lat_a, lat_b) - pad, -90.0)
        hi_lat = np.minimum(np.maximum(lat_a, lat_b) + pad, 90.0)
        widest = np.maximum(np.abs(lo_lat), np.abs(hi_lat))
        cos_lat = np.cos(np.radians(np.minimum(widest, 90.0)))
        pad_lon = np.where(cos_lat > 1e-6, pad / np.maximum(cos_lat, 1e-6), 360.0)
        lo_lon = np.minimum(lon_a, lon_a + dlon) - pad_lon
        hi_lon = np.maximum(lon_a, lon_a + dlon) + pad_lon
        boxes: list[tuple[float, float, float, float]] = []
        box_seg: list[int] = []
        for i in range(n):
            for b in _split_box(lo_lon[i], lo_lat[i], hi_lon[i], hi_lat[i]):
                boxes.append(b)
                box_seg.append(i)
        pairs = index.candidates(boxes)
        if pairs.shape[1] == 0:
            return
        pair_seg = np.array(box_seg, dtype=np.int64)[pairs[0]]
        both = np.unique(np.stack([pair_seg, pairs[1]]), axis=1)
        p_seg, p_fence = both[0], both[1]
        # the places to test, per pair: the segment's ends, where it crosses the
        # boundary, and where it comes deepest (circles, in closed form) or a place
        # beyond the margin between two of those (polygons, searched below); 1 for a
        # first fix
        n_pair = len(p_seg)
        moving = ~self.point[p_seg]
        path, frac = index.path_points(
            p_fence[moving],
            lat_a[p_seg][moving],
            lon_a[p_seg][moving],
            (lat_b - lat_a)[p_seg][moving],
            dlon[p_seg][moving],
            (m_b - m_a)[p_seg][moving],
        )
        pairs_idx = np.arange(n_pair)
        owner = np.concatenate([pairs_idx, pairs_idx[moving], pairs_idx[moving][path]])
        frac = np.concatenate([np.zeros(n_pair), np.ones(int(moving.sum())), frac])
        owner, frac = _sorted_unique(owner, frac)
        # and a place between each two, so that every stretch between crossings (a hole
        # passed through, say) is seen from inside
        between = np.flatnonzero(owner[1:] == owner[:-1])
        owner = np.concatenate([owner, owner[between]])
        frac = np.concatenate([frac, (frac[between] + frac[between + 1]) / 2])
        owner, frac = _sorted_unique(owner, frac)
        segs = _Segments(lat_a, lat_b, lon_a, dlon, m_a, m_b)
        covered, dist_m = self._probe(index, p_seg, p_fence, owner, frac, segs, near=True)
        # polygons: between two such places the boundary distance is 1-Lipschitz in
        # metres along the path, so a place beyond the margin (deep inside or far
        # outside) is found, or ruled out to 1 mm, by halving the stretches whose bound
        # allows one
        more_o, more_f, more_c, more_d = self._beyond_margin(
            index, p_seg, p_fence, owner, frac, covered, dist_m, segs
        )
        if len(more_o):
            owner = np.concatenate([owner, more_o])
            frac = np.concatenate([frac, more_f])
            covered = np.concatenate([covered, more_c])
            dist_m = np.concatenate([dist_m, more_d])
            order = np.lexsort((frac, owner))
            owner, frac, covered, dist_m = owner[order], frac[order], covered[order], dist_m[order]
        counts = np.bincount(owner, minlength=n_pair)
        first = np.concatenate([[0], np.cumsum(counts)[:-1]])
        last = first + counts - 1
        s = p_seg[owner]
        margin = m_a[s] + frac * (m_b[s] - m_a[s])
        self.covered = covered.tolist()
        self.dist_m = dist_m.tolist()
        self.margin = margin.tolist()
        self.offset_us = (frac * dt[s]).tolist()
        ids = index.ids
        order = np.lexsort((ids[p_fence], p_seg))
        for j in order.tolist():
            self.by_seg[int(p_seg[j])].append((int(ids[p_fence[j]]), int(first[j]), int(last[j])))

    def _probe(
        self,
        index: GeofenceIndex,
        p_seg: np.ndarray,
        p_fence: np.ndarray,
        owner: np.ndarray,
        frac: np.ndarray,
        segs: _Segments,
        near: bool = False,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Coverage and boundary distance at fraction ``frac`` of pair ``owner``'s
        segment; the segment's ends exactly as stored."""
        lat_a, lat_b, lon_a, dlon, m_a, m_b = segs
        s = p_seg[owner]
        lat = lat_a[s] + frac * (lat_b[s] - lat_a[s])
        lon = wrap_lon_np(lon_a[s] + frac * dlon[s])
        lat = np.where(frac == 1.0, lat_b[s], np.where(frac == 0.0, lat_a[s], lat))
        lon = np.where(frac == 1.0, self.lon_b[s], np.where(frac == 0.0, lon_a[s], lon))
        if not near:
            return index.probe(p_fence[owner], lat, lon)
        margin = m_a[s] + frac * (m_b[s] - m_a[s])
        linked = np.ones(len(owner), dtype=bool)
        linked[0] = False
        linked[1:] = owner[1:] == owner[:-1]
        return index.probe(p_fence[owner], lat, lon, margin, linked)

    def _beyond_margin(
        self,
        index: GeofenceIndex,
        p_seg: np.ndarray,
        p_fence: np.ndarray,
        owner: np.ndarray,
        frac: np.ndarray,
        covered: np.ndarray,
        dist_m: np.ndarray,
        segs: _Segments,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Places beyond the margin between consecutive tested places of polygon pairs
        where neither end is: ``(owner, frac, covered, dist_m)``."""
        lat_a, lat_b, _, dlon, m_a, m_b = segs
        empty = (np.zeros(0, dtype=np.int64), np.zeros(0), np.zeros(0, dtype=bool), np.zeros(0))
        s = p_seg[owner]
        gap = dist_m - (m_a[s] + frac * (m_b[s] - m_a[s]))
        same = owner[1:] == owner[:-1]
        poly = ~index.is_circle(p_fence[owner[1:]])
        todo = np.flatnonzero(same & poly & (gap[1:] < 0) & (gap[:-1] < 0))
        if len(todo) == 0:
            return empty
        # stretches: (pair, run id, f lo, f hi, gap lo, gap hi)
        o = owner[todo + 1]
        run = np.arange(len(todo))
        lo, hi, g_lo, g_hi = frac[todo], frac[todo + 1], gap[todo], gap[todo + 1]
        seg = p_seg[o]
        slope = index.path_speed(p_fence[o], lat_b[seg] - lat_a[seg], dlon[seg])
        slope = slope + np.abs(m_b[seg] - m_a[seg])  # the gap's Lipschitz bound per unit f
        found: list[tuple[np.ndarray, ...]] = []
        done = np.zeros(len(todo), dtype=bool)
        for _ in range(MAX_HALVINGS):
            bound = (g_lo + g_hi + slope * (hi - lo)) / 2
            alive = (bound >= BOUND_TOL_M) & ~done[run]
            if not alive.any():
                break
            o, run, lo, hi, g_lo, g_hi, slope = (
                a[alive] for a in (o, run, lo, hi, g_lo, g_hi, slope)
            )
            bound = bound[alive]
            # at most MAX_STRETCHES per run, the most promising
            order = np.lexsort((-bound, run))
            o, run, lo, hi, g_lo, g_hi, slope = (
                a[order] for a in (o, run, lo, hi, g_lo, g_hi, slope)
            )
            starts = np.flatnonzero(np.r_[True, run[1:] != run[:-1]])
            rank = np.arange(len(run)) - np.repeat(starts, np.diff(np.r_[starts, len(run)]))
            keep = rank < MAX_STRETCHES
            o, run, lo, hi, g_lo, g_hi, slope = (
                a[keep] for a in (o, run, lo, hi, g_lo, g_hi, slope)
            )
            mid = (lo + hi) / 2
            cov, d = self._probe(index, p_seg, p_fence, o, mid, segs)
            sm = p_seg[o]
            g_mid = d - (m_a[sm] + mid * (m_b[sm] - m_a[sm]))
            hit = g_mid >= 0
            if hit.any():
                # one place per run is enough
                h_run, first = np.unique(run[hit], return_index=True)
                pick = np.flatnonzero(hit)[first]
                found.append((o[pick], mid[pick], cov[pick], d[pick]))
                done[h_run] = True
            o, run, slope = np.repeat(o, 2), np.repeat(run, 2), np.repeat(slope, 2)
            lo, hi = np.stack([lo, mid], 1).ravel(), np.stack([mid, hi], 1).ravel()
            g_lo = np.stack([g_lo, g_mid], 1).ravel()
            g_hi = np.stack([g_mid, g_hi], 1).ravel()
        if not found:
            return empty
        return (
            np.concatenate([f[0] for f in found]),
            np.concatenate([f[1] for f in found]),
            np.concatenate([f[2] for f in found]),
            np.concatenate([f[3] for f in found]),
        )

    def run(self, seg: int, carry: Carry, events: list[tuple[int, int, Kind]]) -> bool:
        """Advances ``carry`` over segment ``seg``; appends its events. True when the
        carry may have changed."""
        fences = self.by_seg.get(seg, [])
        far = (set(carry.inside) | set(carry.pending)) - {gid for gid, _, _ in fences}
        if far:  # not expected (a fence the tracker is at is a candidate), but safe
            for gid in sorted(far):
                carry.pending.pop(gid, None)
                since = carry.inside.pop(gid, None)
                if since is not None:
                    events.append((gid, max(self.t_b[seg], since + 1), "exit"))
        if not fences:
            return bool(far)
        t_a = self.t_a[seg]
        point = bool(self.point[seg])
        for gid, lo, hi in fences:
            inside = gid in carry.inside
            since = carry.inside.get(gid)
            pending = carry.pending.get(gid)
            last_exit: int | None = None
            prev_cov = self.covered[lo]
            prev_signed = self.dist_m[lo] if prev_cov else -self.dist_m[lo]
            start = lo if point else lo + 1
            for i in range(start, hi + 1):
                cov, d = self.covered[i], self.dist_m[i]
                signed = d if cov else -d
                t_off = self.offset_us[i]
                if point:
                    if cov != inside:
                        pending = t_a
                elif cov != prev_cov:
                    denom = prev_signed - signed
                    w = prev_signed / denom if denom else 0.5
                    w = min(1.0, max(0.0, w))
                    t_prev = self.offset_us[i - 1]
                    crossing = t_a + math.ceil(t_prev + w * (t_off - t_prev))
                    pending = crossing if cov != inside else None
                m = self.margin[i]
                if not inside and cov and d >= m:
                    at = pending if pending is not None else t_a + math.ceil(t_off)
                    if last_exit is not None:
                        at = max(at, last_exit + 1)
                    events.append((gid, at, "enter"))
                    inside, since, pending = True, at, None
                elif inside and not cov and d > m:
                    at = pending if pending is not None else t_a + math.ceil(t_off)
                    if since is not None:
                        at = max(at, since + 1)
                    events.append((gid, at, "exit"))
                    inside, since, pending, last_exit = False, None, None, at
                prev_cov, prev_signed = cov, signed
            if inside:
                carry.inside[gid] = since  # type: ignore[assignment]
            else:
                carry.inside.pop(gid, None)
            if pending is not None:
                carry.pending[gid] = pending
            else:
                carry.pending.pop(gid, None)
        return True


def _sorted_unique(owner: np.ndarray, frac: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    order = np.lexsort((frac, owner))
    owner, frac = owner[order], frac[order]
    keep = np.r_[True, (owner[1:] != owner[:-1]) | (frac[1:] != frac[:-1])]
    return owner[keep], frac[keep]


def _split_box(
    lo_lon: float, lo_lat: float, hi_lon: float, hi_lat: float
) -> list[tuple[float, float, float, float]]:
    """The box as boxes within [-180, 180] (a box over the antimeridian becomes two)."""
    if hi_lon - lo_lon >= 360.0:
        return [(-180.0, lo_lat, 180.0, hi_lat)]
    boxes = [(max(lo_lon, -180.0), lo_lat, min(hi_lon, 180.0), hi_lat)]
    if lo_lon < -180.0:
        boxes.append((lo_lon + 360.0, lo_lat, 180.0, hi_lat))
    if hi_lon > 180.0:
        boxes.append((-180.0, lo_lat, hi_lon - 360.0, hi_lat))
    return boxes


def _haversine(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    p1, p2 = math.radians(lat1), math.radians(lat2)
    h = (
        math.sin((p2 - p1) / 2) ** 2
        + math.cos(p1) * math.cos(p2) * math.sin(math.radians(lon2 - lon1) / 2) ** 2
    )
    return 2 * EARTH_RADIUS_M * math.asin(min(1.0, math.sqrt(h)))


def _haversine_np(
    lat1: np.ndarray, lon1: np.ndarray, lat2: np.ndarray, lon2: np.ndarray
) -> np.ndarray:
    p1, p2 = np.radians(lat1), np.radians(lat2)
    h = (
        np.sin((p2 - p1) / 2) ** 2
        + np.cos(p1) * np.cos(p2) * np.sin(np.radians(lon2 - lon1) / 2) ** 2
    )
    out: np.ndarray = 2 * EARTH_RADIUS_M * np.arcsin(np.minimum(1.0, np.sqrt(h)))
    return out

"""The dashboard's operator endpoints beyond the stages: trackers, map, trace, search,
workers, history and bulk dead-letter actions (routes in :mod:`ops.dashboard.app`)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from functools import partial
from typing import Any

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ops import fleet, runstate
from ops.tracing import find_entries
from streams.activity import read_history, read_infos
from streams.deadletter import CATEGORIES

MAX_SCAN = 20_000
TRACKER_PAGE = 100  # trackers a page, unless ?limit= says otherwise
TRACKER_LIMIT = 2_000  # the most a page may hold
SNAPSHOT_TTL_S = 10.0  # how old the rows the trackers pages are cut from may be


def _d(request: Request) -> Any:
    return request.app.state.dashboard


def _now() -> datetime:
    return datetime.now(UTC)


def _time(request: Request, name: str) -> datetime | None:
    value = request.query_params.get(name) or None
    if value is None:
        return None
    from ops.timeparse import parse_time

    try:
        return parse_time(value)
    except ValueError as exc:
        raise HTTPException(400, f"{name}: {exc}") from None


def _tracker_id(value: str) -> str:
    value = value.strip()
    if not value or len(value) > 128:
        raise HTTPException(400, "give a tracker id (1-128 characters)")
    return value


def _scan(request: Request) -> int:
    try:
        scan = int(request.query_params.get("scan", "2000"))
    except ValueError:
        raise HTTPException(400, "scan must be an integer") from None
    if not 1 <= scan <= MAX_SCAN:
        raise HTTPException(400, f"scan must be between 1 and {MAX_SCAN}")
    return scan


class Snapshot:
    """The fleet's tracker rows, read at most once every ``ttl_s``: the pages and
    searches of one look at the list share one read of every tracker (the summary
    needs them all), and requests that arrive together wait for the same read."""

    def __init__(self, ttl_s: float) -> None:
        self.ttl_s = ttl_s
        self._lock = asyncio.Lock()
        self._read: tuple[float, datetime, Any] | None = None

    async def get(
        self, read: Callable[[], Awaitable[Any]], fresh: bool = False
    ) -> tuple[datetime, Any]:
        async with self._lock:
            if fresh or self._read is None or time.monotonic() - self._read[0] > self.ttl_s:
                at = _now()
                self._read = (time.monotonic(), at, await read())
            return self._read[1], self._read[2]


def _int(request: Request, name: str, default: int, lo: int, hi: int) -> int:
    try:
        value = int(request.query_params.get(name, str(default)))
    except ValueError:
        raise HTTPException(400, f"{name} must be an integer") from None
    if not lo <= value <= hi:
        raise HTTPException(400, f"{name} must be between {lo} and {hi}")
    return value


def _matches(row: fleet.TrackerRow, query: str) -> bool:
    return query in row.tracker_id.casefold() or query in row.name.casefold()


async def trackers(request: Request) -> Response:
    """One page of the trackers (``?offset=&limit=``), optionally of one state and
    matching ``q`` (part of the id or the name, any case), stalest first or by id
    (``sort=id``); the summary is always the whole fleet's. Pages are cut from rows
    read at most SNAPSHOT_TTL_S ago (``as_of``), unless ``fresh=1``."""
    d = _d(request)
    state = request.query_params.get("state") or None
    if state is not None and state not in fleet.STATES:
        raise HTTPException(400, f"state must be one of: {', '.join(fleet.STATES)}")
    query = (request.query_params.get("q") or "").strip().casefold()
    if len(query) > 128:
        raise HTTPException(400, "q: at most 128 characters")
    sort = request.query_params.get("sort") or "stale"
    if sort not in ("stale", "id"):
        raise HTTPException(400, "sort must be stale or id")
    offset = _int(request, "offset", 0, 0, 10_000_000)
    limit = _int(request, "limit", TRACKER_PAGE, 1, TRACKER_LIMIT)
    app = d.app_settings
    guarantee_s = app.max_tracker_age_s
    snapshot = getattr(request.app.state, "trackers_snapshot", None)
    if snapshot is None:
        snapshot = request.app.state.trackers_snapshot = Snapshot(SNAPSHOT_TTL_S)
    as_of, (rows, stats, source) = await snapshot.get(
        lambda: d.read_db(
            fleet.with_source, _now(), app.min_fetch_interval_s, guarantee_s, fleet.trackers
        ),
        fresh=request.query_params.get("fresh") == "1",
    )
    matched = [
        r for r in rows if (state is None or r.state == state) and (not query or _matches(r, query))
    ]
    if sort == "id":
        matched.sort(key=lambda r: r.tracker_id)
    page = matched[offset : offset + limit]
    return JSONResponse(
        {
            "summary": fleet.distribution(rows, guarantee_s),
            "source": {**source, "lateness_s": app.source_lateness_s},
            "trackers": [
                {**r.as_dict(), "source": fleet.source_json(stats.get(r.tracker_id))} for r in page
            ],
            "shown": len(page),
            "matched": len(matched),
            "offset": offset,
            "limit": limit,
            "as_of": fleet.iso(as_of),
        }
    )


async def map_view(request: Request) -> Response:
    d = _d(request)
    data = await d.read_db(
        partial(fleet.map_data, guarantee_s=d.app_settings.max_tracker_age_s),
        _now(),
        d.app_settings.min_fetch_interval_s,
    )
    data["tiles"] = {
        "url": d.app_settings.map_tiles_url,
        "attribution": d.app_settings.map_tiles_attribution,
    }
    return JSONResponse(data)


async def trace(request: Request) -> Response:
    d = _d(request)
    tracker = _tracker_id(request.path_params["tracker"])
    at = _time(request, "at")
    report = await d.read_db(fleet.report_trace, tracker, at)
    observed, fetched = fleet.report_instants(report)
    found = await find_entries(
        d.client,
        d.settings.prefix,
        tracker,
        observed_at=observed,
        fetched_at=fetched,
        scan=_scan(request),
        url=d.url,
    )
    return JSONResponse({"tracker_id": tracker, "report": report, **found})


async def search(request: Request) -> Response:
    """Stream entries and dead letters naming a tracker (any report)."""
    d = _d(request)
    tracker = _tracker_id(request.query_params.get("tracker", ""))
    found = await find_entries(d.client, d.settings.prefix, tracker, scan=_scan(request), url=d.url)
    return JSONResponse({"tracker_id": tracker, **found})


async def workers(request: Request) -> Response:
    from streams.monitor import stage_statuses

    d = _d(request)
    now_ms = time.time_ns() // 1_000_000
    rows: list[dict[str, Any]] = []
    for stage, shard_keys in d.keys.items():
        statuses = await stage_statuses(d.client, shard_keys, d.url)
        names: dict[str, dict[str, Any]] = {}
        for st in statuses:
            for c in st.consumers:
                row = names.setdefault(
                    c.name,
                    {"stage": stage, "name": c.name, "pending": 0, "heartbeat_age_ms": None},
                )
                row["pending"] += c.pending
                if c.heartbeat_age_ms is not None:
                    age = row["heartbeat_age_ms"]
                    row["heartbeat_age_ms"] = (
                        c.heartbeat_age_ms if age is None else min(age, c.heartbeat_age_ms)
                    )
        infos = await read_infos(d.client, shard_keys[0], list(names))
        for name, row in names.items():
            info = infos.get(name)
            if info:
                # up to its last heartbeat: a dead worker's uptime stops growing
                last_ms = min(now_ms, info.get("updated_ms", now_ms))
                uptime_s = max(0.0, (last_ms - info["started_ms"]) / 1000)
                row.update(
                    host=info.get("host"),
                    pid=info.get("pid"),
                    version=info.get("version"),
                    uptime_s=round(uptime_s, 1),
                    processed=info.get("processed", 0),
                    failed=info.get("failed", 0),
                    dead_lettered=info.get("dead_lettered", 0),
                    in_flight=info.get("in_flight", 0),
                    updated_ms=info.get("updated_ms"),
                    rate_per_s=round(info.get("processed", 0) / uptime_s, 2) if uptime_s else None,
                )
            row["live"] = (
                row["heartbeat_age_ms"] is not None
                and row["heartbeat_age_ms"] < d.settings.consumer_dead_after_ms
            )
            rows.append(row)
    state = await runstate.read(d.client, d.settings.prefix)
    return JSONResponse({"now_ms": now_ms, "workers": rows, **state})


async def history(request: Request) -> Response:
    d = _d(request)
    now_ms = time.time_ns() // 1_000_000
    out = {}
    for stage, shard_keys in d.keys.items():
        out[stage] = await read_history(d.client, shard_keys[0], now_ms)
    return JSONResponse({"now_ms": now_ms, "minutes": 60, "stages": out})


async def bulk(request: Request) -> Response:
    """``{"action": "redrive"|"purge", "category"?, "since"?, "until"?}``: every dead
    letter of the stage that matches (failed-at time between since and until)."""
    d = _d(request)
    d.authorize(request)
    stage = request.path_params["stage"]
    shard_keys = d.stage_keys(stage)
    try:
        body = await request.json()
    except ValueError:
        body = None
    if not isinstance(body, dict) or body.get("action") not in ("redrive", "purge"):
        raise HTTPException(400, 'the body must be JSON: {"action": "redrive" | "purge", ...}')
    category = body.get("category") or None
    if category is not None and category not in CATEGORIES:
        raise HTTPException(400, f"category must be one of: {', '.join(CATEGORIES)}")
    bounds = []
    for name in ("since", "until"):
        value = body.get(name) or None
        if value is None:
            bounds.append(None)
            continue
        from ops.timeparse import parse_time

        try:
            bounds.append(int(parse_time(str(value)).timestamp() * 1000))
        except ValueError as exc:
            raise HTTPException(400, f"{name}: {exc}") from None
    since_ms, until_ms = bounds
    done: list[str] = []
    skipped = 0
    for keys in shard_keys:
        dl = d.dead_letters(keys)
        letters = await dl.list(category=category, since_ms=since_ms, limit=100_000)
        ids = [x.id for x in letters if until_ms is None or x.failed_ms <= until_ms]
        if not ids:
            continue
        if body["action"] == "redrive":
            result = await dl.redrive(ids)
            done += [i for i, new in result.items() if new is not None]
            skipped += sum(1 for new in result.values() if new is None)
        else:
            if await dl.purge(ids):
                done += ids
    verb = "redriven" if body["action"] == "redrive" else "purged"
    return JSONResponse({"stage": stage, verb: done, "count": len(done), "skipped": skipped})

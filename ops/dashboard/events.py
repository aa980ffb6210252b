"""``GET /api/events``: the geofence events log, newest first, filtered by tracker,
geofence, kind and time, one page at a time.

Every query is bounded in time (``since``, by default the last 24 hours; ``until``,
and the page cursor, which is an upper bound too): on PostgreSQL ``geofence_events``
is range-partitioned by month on ``observed_at`` (:mod:`schemas.history`), so only the
partitions of that range are read. Pages follow a keyset cursor, the last row's
``(observed_at, id)``, never an ``OFFSET`` that reads every row before the page.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, or_, select
from sqlalchemy.orm import Session
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ops.fleet import iso
from schemas.tables import Geofence, GeofenceEvent, Tracker

PAGE = 50
MAX_PAGE = 500
DEFAULT_SPAN = timedelta(hours=24)
KINDS = ("enter", "exit")
MAX_FENCES = 1_000  # geofences listed for the page's filter


@dataclass(frozen=True)
class EventQuery:
    since: datetime | None  # None: all time (every partition)
    until: datetime | None
    tracker: str | None = None
    fence: int | None = None
    kind: str | None = None
    before: tuple[datetime, int] | None = None  # the cursor: rows strictly older
    limit: int = PAGE


def statement(q: EventQuery) -> Any:
    """The page's SELECT (its time bounds are what prunes the partitions)."""
    e = GeofenceEvent
    stmt = (
        select(e, Geofence.name, Tracker.name)
        .join(Geofence, Geofence.id == e.geofence_id)
        .outerjoin(Tracker, Tracker.external_id == e.tracker_id)
    )
    if q.since is not None:
        stmt = stmt.where(e.observed_at >= q.since)
    if q.until is not None:
        stmt = stmt.where(e.observed_at < q.until)
    if q.before is not None:
        at, event_id = q.before
        stmt = stmt.where(
            e.observed_at <= at,  # a plain bound as well, so that it prunes too
            or_(e.observed_at < at, and_(e.observed_at == at, e.id < event_id)),
        )
    if q.tracker is not None:
        stmt = stmt.where(e.tracker_id == q.tracker)
    if q.fence is not None:
        stmt = stmt.where(e.geofence_id == q.fence)
    if q.kind is not None:
        stmt = stmt.where(e.kind == q.kind)
    return stmt.order_by(e.observed_at.desc(), e.id.desc()).limit(q.limit + 1)


def events_page(session: Session, q: EventQuery, fence_name: str | None) -> dict[str, Any]:
    if fence_name is not None:
        found = session.scalar(select(Geofence.id).where(Geofence.name == fence_name).limit(1))
        if found is None:
            raise LookupError(f"no geofence named {fence_name!r}")
        q = replace(q, fence=found)
    rows = session.execute(statement(q)).all()
    more = len(rows) > q.limit
    rows = rows[: q.limit]
    out = [
        {
            "id": ev.id,
            "tracker_id": ev.tracker_id,
            "tracker": tname,
            "geofence_id": ev.geofence_id,
            "geofence": gname,
            "kind": ev.kind,
            "observed_at": iso(ev.observed_at),
            "report_at": iso(ev.report_at),
        }
        for ev, gname, tname in rows
    ]
    last = rows[-1][0] if rows else None
    fences = session.execute(select(Geofence.id, Geofence.name).order_by(Geofence.name))
    return {
        "events": out,
        "next": f"{last.observed_at.isoformat()}|{last.id}" if more and last is not None else None,
        "since": iso(q.since),
        "until": iso(q.until),
        "geofences": [{"id": i, "name": n} for i, n in fences.fetchmany(MAX_FENCES)],
    }


def _cursor(value: str | None) -> tuple[datetime, int] | None:
    if not value:
        return None
    at, sep, event_id = value.rpartition("|")
    try:
        if not sep:
            raise ValueError
        moment = datetime.fromisoformat(at.replace("Z", "+00:00"))
        if moment.tzinfo is None:
            raise ValueError
        return moment, int(event_id)
    except ValueError:
        raise HTTPException(400, "before: not a page cursor (take it from 'next')") from None


def query_of(request: Request, now: datetime) -> tuple[EventQuery, str | None]:
    from ops.dashboard.console import _int, _time

    params = request.query_params
    everything = params.get("since") == "all"
    since = None if everything else _time(request, "since") or now - DEFAULT_SPAN
    until = _time(request, "until")
    kind = params.get("kind") or None
    if kind is not None and kind not in KINDS:
        raise HTTPException(400, "kind must be enter or exit")
    fence, fence_name = None, None
    given = (params.get("fence") or "").strip()
    if given.isdigit():
        fence = int(given)
    elif given:
        fence_name = given
    tracker = (params.get("tracker") or "").strip() or None
    q = EventQuery(
        since=since,
        until=until,
        tracker=tracker,
        fence=fence,
        kind=kind,
        before=_cursor(params.get("before")),
        limit=_int(request, "limit", PAGE, 1, MAX_PAGE),
    )
    return q, fence_name


async def events(request: Request) -> Response:
    from ops.dashboard.console import _d, _now

    d = _d(request)
    q, fence_name = query_of(request, _now())
    return JSONResponse(await d.read_db(events_page, q, fence_name))

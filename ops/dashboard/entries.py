"""The entry browser: a stage's stream entries, read-only, a page at a time.

==========  ======================================  ==========================================
method      path                                    what
==========  ======================================  ==========================================
GET         /api/stages/{stage}/entries             one page of a lane (``?lane=&shard=&
                                                    view=&cursor=&count=``)
GET         /api/entries/{id}                       an entry by id, in every lane of every
                                                    stage (``?stage=`` for one)
==========  ======================================  ==========================================

A lane is ``stream`` (the stage's input), ``priority`` (its urgent lane) or ``dlq``
(its dead letters). ``view=all`` pages through a lane newest first (``XREVRANGE``),
each entry with its state in the stage's consumer group: ``pending`` (delivered to a
consumer, not acknowledged: who holds it, how often it was delivered and how many
of those count toward ``max_deliveries``), ``done`` (acknowledged or dead-lettered) or
``waiting`` (not delivered yet). ``view=pending`` pages through the group's pending
entries oldest first (``XPENDING``). ``cursor`` is the last id of the page before
(from ``next``); pages are keyed by id, so entries added meanwhile never shift them.
"""

from __future__ import annotations

import json
from typing import Any

from redis import exceptions as rex
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from streams.connection import Client, translate
from streams.deadletter import _from_entry
from streams.keys import StageKeys
from streams.message import Fields
from streams.parse import entry_ms, normalize_id, parse_entries

LANES = ("stream", "priority", "dlq")
VIEWS = ("all", "pending")
PAGE = 25
MAX_PAGE = 200
MAX_VALUE = 8_192  # characters of one field shown; longer values are cut
MAX_FOUND = 20


def _s(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def _id_key(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def _fields(fields: Fields) -> dict[str, str]:
    out = {}
    for k, v in fields.items():
        text = _s(v)
        out[_s(k)] = text if len(text) <= MAX_VALUE else text[:MAX_VALUE] + "\u2026 (cut)"
    return out


def _view(entry_id: str, fields: Fields | None) -> dict[str, Any]:
    row: dict[str, Any] = {"id": entry_id, "at_ms": entry_ms(entry_id)}
    if fields is None:  # pending, but gone from the stream (trimmed or deleted)
        row.update(type=None, fields=None)
        return row
    data = fields.get(b"data")
    tracker = None
    if data is not None:
        try:
            payload = json.loads(data)
            tracker = payload.get("tracker_id") if isinstance(payload, dict) else None
        except ValueError:
            pass
    row.update(
        type=_s(fields.get(b"type", b"")),
        msg_id=_s(fields.get(b"msg_id", b"")),
        attempt=int(fields.get(b"attempt", b"0") or 0),
        tracker_id=tracker,
        fields=_fields(fields),
    )
    return row


async def _group(client: Client, stream: str, group: str) -> dict[str, Any] | None:
    """The stage's consumer group on ``stream`` (XINFO GROUPS), None without one."""
    try:
        groups = await client.xinfo_groups(stream)
    except rex.ResponseError:  # no stream (yet)
        return None
    for g in groups:
        info = {_s(k): v for k, v in dict(g).items()}
        if _s(info.get("name")) == group:
            return info
    return None


async def _last_delivered(client: Client, stream: str, group: str) -> str | None:
    info = await _group(client, stream, group)
    return None if info is None else _s(info.get("last-delivered-id"))


async def _states(client: Client, keys: StageKeys, stream: str, rows: list[dict[str, Any]]) -> None:
    """Adds each row's state in the group (rows of one lane, any order)."""
    if not rows:
        return
    ids = sorted((r["id"] for r in rows), key=_id_key)
    last = await _last_delivered(client, stream, keys.group)
    pending: dict[str, Any] = {}
    if last is not None:
        raw = await client.xpending_range(
            stream, keys.group, min=ids[0], max=ids[-1], count=min(10_000, 4 * len(ids))
        )
        pending = {_s(p["message_id"]): p for p in raw}
    fields = [StageKeys.deferral_field(stream, i) for i in pending]
    deferred = await client.hmget(keys.deferrals, fields) if fields else []
    waits = dict(zip(pending, deferred, strict=True))
    for r in rows:
        p = pending.get(r["id"])
        if p is not None:
            deliveries = int(p.get("times_delivered", 0))
            r.update(
                state="pending",
                consumer=_s(p.get("consumer", "")),
                deliveries=deliveries,
                counted=deliveries - int(waits.get(r["id"]) or 0),
                idle_ms=int(p.get("time_since_delivered", 0)),
            )
        elif last is not None and _id_key(r["id"]) <= _id_key(last):
            r["state"] = "done"
        else:
            r["state"] = "waiting"


def _letter(entry_id: str, stored: Fields) -> dict[str, Any]:
    """A dead letter: the original entry's fields, and why it died."""
    letter = _from_entry(entry_id, stored)
    row = _view(entry_id, letter.fields)
    row.update(
        state="dead",
        origin=letter.origin,
        origin_id=letter.origin_id,
        consumer=letter.consumer,
        category=letter.category,
        error=letter.error,
        deliveries=letter.attempts,
        failed_ms=letter.failed_ms,
    )
    return row


async def _page_all(
    client: Client, keys: StageKeys, lane: str, cursor: str | None, count: int
) -> tuple[list[dict[str, Any]], str | None]:
    stream = getattr(keys, lane)
    top = "(" + cursor if cursor else "+"
    raw = parse_entries(await client.xrevrange(stream, max=top, min="-", count=count + 1))
    more = len(raw) > count
    raw = raw[:count]
    if lane == "dlq":
        rows = [_letter(i, f) for i, f in raw]
    else:
        rows = [_view(i, f) for i, f in raw]
        await _states(client, keys, stream, rows)
    return rows, (raw[-1][0] if more and raw else None)


async def _page_pending(
    client: Client, keys: StageKeys, lane: str, cursor: str | None, count: int
) -> tuple[list[dict[str, Any]], str | None]:
    stream = getattr(keys, lane)
    if await _last_delivered(client, stream, keys.group) is None:
        return [], None
    low = "(" + cursor if cursor else "-"
    raw = await client.xpending_range(stream, keys.group, min=low, max="+", count=count + 1)
    ids = [_s(p["message_id"]) for p in raw]
    more = len(ids) > count
    ids = ids[:count]
    rows = []
    for i in ids:
        found = parse_entries(await client.xrange(stream, min=i, max=i, count=1))
        rows.append(_view(i, found[0][1] if found else None))
    await _states(client, keys, stream, rows)
    return rows, (ids[-1] if more and ids else None)


def _choice(request: Request, name: str, options: tuple[str, ...]) -> str:
    value = request.query_params.get(name) or options[0]
    if value not in options:
        raise HTTPException(400, f"{name} must be one of: {', '.join(options)}")
    return value


def _cursor(request: Request) -> str | None:
    value = request.query_params.get("cursor") or None
    if value is None:
        return None
    try:
        return normalize_id(value)
    except ValueError as exc:
        raise HTTPException(400, f"cursor: {exc}") from None


async def page(request: Request) -> Response:
    from ops.dashboard.console import _int

    d = request.app.state.dashboard
    stage = request.path_params["stage"]
    shards: list[StageKeys] = d.stage_keys(stage)
    lane = _choice(request, "lane", LANES)
    view = _choice(request, "view", VIEWS)
    if view == "pending" and lane == "dlq":
        raise HTTPException(400, "dead letters are never pending: view=all for lane=dlq")
    shard = _int(request, "shard", 0, 0, len(shards) - 1)
    count = _int(request, "count", PAGE, 1, MAX_PAGE)
    keys = shards[shard]
    stream = getattr(keys, lane)
    with translate(d.url, stream, keys.group):
        reader = _page_pending if view == "pending" else _page_all
        rows, nxt = await reader(d.client, keys, lane, _cursor(request), count)
        length = int(await d.client.xlen(stream))
        group = None if lane == "dlq" else await _group(d.client, stream, keys.group)
    pending = 0 if group is None else int(group.get("pending", 0))
    return JSONResponse(
        {
            "stage": stage,
            "lane": lane,
            "view": view,
            "shard": shard,
            "shards": len(shards),
            "stream": stream,
            "length": length,
            "pending": pending,
            "entries": rows,
            "next": nxt,
        }
    )


async def find(request: Request) -> Response:
    """Every lane entry with this id (``MS-SEQ``, or ``MS`` for every entry of that
    millisecond), in one stage or all."""
    d = request.app.state.dashboard
    raw = request.path_params["id"].strip()
    try:
        entry_id = normalize_id(raw)
    except ValueError as exc:
        raise HTTPException(400, str(exc)) from None
    bound = (entry_id, entry_id) if "-" in raw else (raw, raw)
    wanted = request.query_params.get("stage") or None
    stages = [wanted] if wanted else list(d.keys)
    found: list[dict[str, Any]] = []
    for stage in stages:
        for keys in d.stage_keys(stage):
            for lane in LANES:
                stream = getattr(keys, lane)
                with translate(d.url, stream, keys.group):
                    hits = parse_entries(
                        await d.client.xrange(stream, min=bound[0], max=bound[1], count=MAX_FOUND)
                    )
                    if lane == "dlq":
                        rows = [_letter(i, f) for i, f in hits]
                    else:
                        rows = [_view(i, f) for i, f in hits]
                        await _states(d.client, keys, stream, rows)
                for r in rows:
                    found.append({**r, "stage": stage, "shard": keys.shard, "lane": lane})
    shown = entry_id if "-" in raw else str(int(raw))  # a bare ms: every entry of it
    return JSONResponse({"id": shown, "found": found[:MAX_FOUND]})

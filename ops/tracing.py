"""Finding a tracker's entries in the stage streams and dead-letter streams (a bounded
scan of the newest entries: Redis has no index on payloads), with each entry's delivery
state in its consumer group. Used by ``trackstream trace`` and the dashboard."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from processors import topology
from streams.connection import Client, translate
from streams.deadletter import _from_entry
from streams.parse import parse_entries

SCAN = 2_000  # newest entries read per stream


def _payload(fields: dict[bytes, bytes]) -> dict[str, Any]:
    try:
        data = json.loads(fields.get(b"data", b"{}"))
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def _mentions(fields: dict[bytes, bytes], tracker_id: str) -> bool:
    data = fields.get(b"data", b"")
    return json.dumps(tracker_id).encode() in data


def _same_instant(
    payload: dict[str, Any], observed_at: datetime | None, lenient: bool = False
) -> bool:
    """The payload is about the report observed at ``observed_at``. One without an
    ``observed_at`` (a fetch request, a change notice) matches; a report without one
    (a broken entry) only when ``lenient`` (dead letters: shown rather than hidden)."""
    if observed_at is None:
        return True
    if "observed_at" not in payload:
        return lenient or "tracker_id" not in payload
    try:
        value = datetime.fromisoformat(str(payload["observed_at"]).replace("Z", "+00:00"))
    except ValueError:
        return False
    return value == observed_at


def _parse(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None


def ms_of(entry_id: str) -> int:
    return int(entry_id.split("-")[0])


def _after(a: str, b: str) -> bool:
    """Entry id ``a`` comes after ``b``."""
    x, y = a.split("-"), b.split("-")
    return (int(x[0]), int(x[1])) > (int(y[0]), int(y[1]))


async def _last_delivered(client: Client, stream: str, group: str) -> str | None:
    groups: list[dict[Any, Any]]
    try:
        groups = await client.xinfo_groups(stream)
    except Exception:  # no stream yet
        return None
    for g in groups:
        g = dict(g)
        name = g.get("name", g.get(b"name"))
        name = name.decode() if isinstance(name, bytes) else name
        if name == group:
            last = g.get("last-delivered-id", g.get(b"last-delivered-id"))
            return last.decode() if isinstance(last, bytes) else str(last)
    return None


def _own_change_notice(
    entries: list[dict[str, Any]], fetched_at: datetime | None
) -> list[dict[str, Any]]:
    """A change notice (``views.changed``) names trackers, not reports: keep only the one
    the geofence stage published after handling this report (the first one after the
    report's geofence entry, or after its fetch when that entry is gone), never those
    of the tracker's other reports."""
    anchors = [e["at_ms"] for e in entries if e["stage"] == topology.GEOFENCE]
    since = min(anchors) if anchors else None
    if since is None and fetched_at is not None:
        since = int(fetched_at.timestamp() * 1000)
    notices = [e for e in entries if e["type"] == "views.changed"]
    after = [e for e in notices if since is not None and e["at_ms"] >= since]
    chosen = min(after, key=lambda e: (e["at_ms"], e["id"])) if after else None
    return [e for e in entries if e["type"] != "views.changed" or e is chosen]


async def find_entries(
    client: Client,
    prefix: str,
    tracker_id: str,
    *,
    observed_at: datetime | None = None,
    fetched_at: datetime | None = None,
    stages: tuple[str, ...] = topology.STAGES,
    scan: int = SCAN,
    url: str = "",
) -> dict[str, list[dict[str, Any]]]:
    """``{"entries": [...], "dead_letters": [...]}`` naming ``tracker_id``, newest first.

    Each entry: stage, stream, id, type, attempt (the producer's re-send count), and its
    delivery state: ``pending`` (consumer, deliveries, idle ms), ``done`` (delivered
    and acknowledged, or dead-lettered) or ``waiting`` (not delivered yet). With
    ``observed_at`` only reports of that instant match (dead letters without a readable
    ``observed_at`` too); with ``fetched_at`` only the newest fetch request made by
    then (the one that fetched the report), and only the change notice this report
    caused.
    """
    entries: list[dict[str, Any]] = []
    letters: list[dict[str, Any]] = []
    routes = topology.routes(prefix)
    for stage in stages:
        for keys in routes[stage].all_keys():  # every shard
            shard = keys.shard
            with translate(url):
                for stream in keys.streams():
                    raw = await client.xrevrange(stream, max="+", min="-", count=scan)
                    found = [
                        (i, f)
                        for i, f in parse_entries(raw)
                        if _mentions(f, tracker_id) and _same_instant(_payload(f), observed_at)
                    ]
                    if not found:
                        continue
                    last = await _last_delivered(client, stream, keys.group)
                    for entry_id, fields in found:
                        pend = await client.xpending_range(
                            stream, keys.group, min=entry_id, max=entry_id, count=1
                        )
                        requested = _payload(fields).get("requested_at")
                        row: dict[str, Any] = {
                            "_requested_at": _parse(requested),
                            "stage": stage,
                            "stream": stream,
                            "id": entry_id,
                            "at_ms": ms_of(entry_id),
                            "type": fields.get(b"type", b"").decode(errors="replace"),
                            "attempt": int(fields.get(b"attempt", b"0") or 0),
                        }
                        if pend:
                            p = pend[0]
                            consumer = p.get("consumer", b"")
                            row.update(
                                state="pending",
                                consumer=consumer.decode()
                                if isinstance(consumer, bytes)
                                else consumer,
                                deliveries=int(p.get("times_delivered", 0)),
                                idle_ms=int(p.get("time_since_delivered", 0)),
                            )
                        elif last is not None and not _after(entry_id, last):
                            row["state"] = "done"
                        else:
                            row["state"] = "waiting"
                        entries.append(row)
                raw = await client.xrevrange(keys.dlq, max="+", min="-", count=scan)
            for entry_id, fields in parse_entries(raw):
                letter = _from_entry(entry_id, fields)
                if not _mentions(letter.fields, tracker_id):
                    continue
                if not _same_instant(_payload(letter.fields), observed_at, lenient=True):
                    continue
                d = letter.as_dict()
                d.pop("fields")
                letters.append({**d, "stage": stage, "shard": shard, "at_ms": letter.failed_ms})
    if fetched_at is not None:
        # the fetch request that fetched the report: the newest requested by then
        asked = [e for e in entries if e["_requested_at"] is not None]
        before = [e for e in asked if e["_requested_at"] <= fetched_at]
        chosen = max(before, key=lambda e: e["_requested_at"]) if before else None
        entries = [e for e in entries if e["_requested_at"] is None or e is chosen]
    if observed_at is not None:
        entries = _own_change_notice(entries, fetched_at)
    for e in entries:
        del e["_requested_at"]
    entries.sort(key=lambda e: e["at_ms"], reverse=True)
    letters.sort(key=lambda e: e["at_ms"], reverse=True)
    return {"entries": entries, "dead_letters": letters}

"""Replay: process a range of a stream again.

Two ways, both with a dry run that counts the entries first:

- ``copy``: re-add the entries in ``[start, end]`` to the tail of the stream (new ids,
  same fields, ``msg_id`` kept); every group on the stream sees them again, and each
  stage has its own stream and group. Entries that were dead-lettered are skipped
  (they failed for a reason; ``dlq redrive`` is the way to send them again).
- ``rewind``: move the group's last-delivered id to just before ``start``
  (``XGROUP SETID``) so everything from there on is delivered again, in order.
  Entries between ``start`` and the old position are delivered once more; entries
  still pending stay pending.

Positions are entry ids (``MS`` or ``MS-SEQ``) or datetimes (the id of a stream entry
is its arrival time in ms).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from streams.connection import Client
from streams.deadletter import DeadLetters
from streams.errors import GroupMissing
from streams.keys import StageKeys
from streams.parse import id_before, normalize_id, parse_entries

PAGE = 500
MAX_SEQ = 18446744073709551615


@dataclass(frozen=True, slots=True)
class ReplayResult:
    mode: str
    start: str
    end: str
    count: int
    dry_run: bool
    skipped: int = 0  # dead-lettered entries in the range, not copied


def to_id(position: str | datetime, *, end: bool = False) -> str:
    """An entry id from an id string or a timezone-aware datetime."""
    if isinstance(position, datetime):
        if position.tzinfo is None:
            raise ValueError(f"{position.isoformat()} has no timezone; give one (e.g. +00:00 or Z)")
        ms = int(position.timestamp() * 1000)
        return f"{ms}-{MAX_SEQ}" if end else f"{ms}-0"
    if position in ("-", "+"):
        return position
    if end and "-" not in position:  # a bare MS as an end covers the whole millisecond
        return f"{normalize_id(position).partition('-')[0]}-{MAX_SEQ}"
    return normalize_id(position)


async def dead_lettered(client: Client, keys: StageKeys, url: str = "") -> set[str]:
    """Ids of ``keys.stream`` entries that were moved to the dead-letter stream."""
    letters = await DeadLetters(client, keys, url).list(limit=10**9)
    return {d.origin_id for d in letters if d.origin == keys.stream}


async def count_range(client: Client, stream: str, start: str, end: str, url: str = "") -> int:
    n = 0
    cursor = start
    while True:
        raw = await client.xrange(stream, min=cursor, max=end, count=PAGE)
        entries = parse_entries(raw)
        n += len(entries)
        if len(entries) < PAGE:
            return n
        cursor = "(" + entries[-1][0]


async def replay_copy(
    client: Client,
    keys: StageKeys,
    start: str | datetime,
    end: str | datetime = "+",
    *,
    dry_run: bool = False,
    url: str = "",
) -> ReplayResult:
    lo, hi = to_id(start), to_id(end, end=True)
    poison = await dead_lettered(client, keys, url)
    # the tail moves as we append: stop at the last id that existed when we began
    last = await client.xrevrange(keys.stream, max=hi, min=lo, count=1)
    if not last:
        return ReplayResult("copy", lo, hi, 0, dry_run)
    stop = parse_entries(last)[0][0]
    n = skipped = 0
    cursor = lo
    while True:
        entries = parse_entries(await client.xrange(keys.stream, min=cursor, max=stop, count=PAGE))
        wanted = [(i, f) for i, f in entries if i not in poison]
        if wanted and not dry_run:
            pipe = client.pipeline(transaction=False)
            for _, fields in wanted:
                pipe.xadd(keys.stream, fields)  # type: ignore[arg-type]
            await pipe.execute()
        n += len(wanted)
        skipped += len(entries) - len(wanted)
        if len(entries) < PAGE:
            return ReplayResult("copy", lo, hi, n, dry_run, skipped)
        cursor = "(" + entries[-1][0]


async def replay_rewind(
    client: Client,
    keys: StageKeys,
    start: str | datetime,
    *,
    dry_run: bool = False,
    url: str = "",
) -> ReplayResult:
    lo = to_id(start)
    n = await count_range(client, keys.stream, lo, "+", url)
    exists = await client.exists(keys.stream)
    if not exists:  # no stream, so no group to move
        raise GroupMissing(keys.stream, keys.group)
    if not dry_run:
        await client.xgroup_setid(keys.stream, keys.group, id_before(lo))
    return ReplayResult("rewind", lo, "+", n, dry_run)

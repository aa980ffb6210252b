"""Safe retention: trim only what every consumer group has processed.

The cut-off (``MINID``) is the smallest of, over all groups on the stream: the oldest
pending id, and the last-delivered id (kept itself, so the cut is conservative).
Entries younger than ``keep_ms`` are kept too, so recent history stays replayable.
A stream without groups is left alone: nobody has processed anything.

The trim itself is one Lua script (:data:`~streams.scripts.SAFE_TRIM`): the groups'
positions are read and the stream cut in one step, so no read or claim can slip in
between. ``dry_run`` reads the same positions without the script and counts.
:mod:`streams.trimmer` runs it periodically in every worker.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from streams.connection import Client
from streams.parse import entry_ms
from streams.scripts import SAFE_TRIM, Lua


@dataclass(frozen=True, slots=True)
class TrimResult:
    stream: str
    min_id: str | None
    removed: int
    reason: str


def _s(v: object) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def _key(i: str) -> tuple[int, int]:
    ms, _, seq = i.partition("-")
    return int(ms), int(seq or 0)


async def safe_min_id(client: Client, stream: str, *, keep_ms: int = 0) -> tuple[str | None, str]:
    if not await client.exists(stream):
        return None, "no stream"
    groups = await client.xinfo_groups(stream)
    if not groups:
        return None, "no consumer groups"
    candidates: list[str] = []
    for g in groups:
        candidates.append(_s(g["last-delivered-id"]))
        if int(g["pending"]):
            summary = await client.xpending(stream, _s(g["name"]))
            candidates.append(_s(summary["min"]))
    cut = min(candidates, key=_key)
    reason = "oldest unprocessed entry"
    if keep_ms:
        horizon = time.time_ns() // 1_000_000 - keep_ms
        if horizon < entry_ms(cut):
            cut, reason = f"{max(horizon, 0)}-0", f"keep_ms={keep_ms}"
    if cut in ("0-0", "0"):
        return None, "nothing processed yet"
    return cut, reason


async def safe_trim(
    client: Client, stream: str, *, keep_ms: int = 0, dry_run: bool = False, url: str = ""
) -> TrimResult:
    if not dry_run:
        cut, removed, why = await Lua(client, SAFE_TRIM)(keys=[stream], args=[keep_ms])
        return TrimResult(stream, _s(cut) or None, int(removed), _s(why))
    min_id, reason = await safe_min_id(client, stream, keep_ms=keep_ms)
    if min_id is None:
        return TrimResult(stream, None, 0, reason)
    from streams.replay import count_range

    n = await count_range(client, stream, "-", "(" + min_id, url)
    return TrimResult(stream, min_id, n, reason + " (dry run)")

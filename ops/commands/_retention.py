"""Retention as ``status`` and the console show it: the settings and each shard's
last automatic trim (``state:trim``, written by :mod:`streams.trimmer`)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from rich.text import Text

from ops.commands._operator import age_text, shard_label
from streams.connection import Client
from streams.keys import StageKeys
from streams.settings import StreamSettings
from streams.trimmer import last_trim


async def retention(
    client: Client, settings: StreamSettings, all_keys: Sequence[StageKeys]
) -> dict[str, Any]:
    now_ms = time.time_ns() // 1_000_000
    shards = []
    for keys in all_keys:
        last = await last_trim(client, keys, settings.redis_url)
        shards.append(
            {
                "stage": shard_label(keys),
                "last_trim_age_ms": None if last is None else max(0, now_ms - last.at_ms),
                "last_trim_removed": None if last is None else last.removed,
                "trimmed_by": None if last is None else last.by,
            }
        )
    return {
        "retention_ms": settings.retention_ms,
        "trim_interval_ms": settings.trim_interval_ms,
        "automatic": settings.trim_interval_ms > 0,
        "shards": shards,
    }


def lines(info: dict[str, Any]) -> list[Text]:
    r = info.get("retention")
    if r is None:
        return []
    if not r["automatic"]:
        return [Text("retention: automatic trimming off (trim_interval_ms=0)", style="yellow")]
    trimmed = [s for s in r["shards"] if s["last_trim_age_ms"] is not None]
    head = (
        f"retention: processed entries kept {age_text(r['retention_ms'])}, "
        f"trimmed every {age_text(r['trim_interval_ms'])} by the workers"
    )
    if not trimmed:
        return [Text(head + "; no trim yet (no worker running?)", style="yellow")]
    oldest = max(trimmed, key=lambda s: s["last_trim_age_ms"])
    never = [s["stage"] for s in r["shards"] if s["last_trim_age_ms"] is None]
    last = age_text(oldest["last_trim_age_ms"])
    text = f"{head}; oldest last trim {last} ago ({oldest['stage']})"
    if never:
        text += f"; never trimmed: {', '.join(never)}"
    return [Text(text, style="green" if not never else "yellow")]

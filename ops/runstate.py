"""Small state the scheduler and reconciler commands leave for the console (JSON strings,
TTL'd so a stopped process's state ages out):

- ``{p}:{scheduler}:state:last-tick``: the leader's last tick (at, next, batches,
  trackers, who);
- ``{p}:{reconciler}:state:last-round``: the reconciler's last round (at, next, re-sent
  to geocode / geofence, stages left alone, who).
"""

from __future__ import annotations

import json
import os
import socket
import time
from typing import Any

from processors import topology
from streams.connection import Client, translate
from streams.keys import StageKeys

RECONCILER = "reconciler"


def tick_key(prefix: str) -> str:
    return StageKeys(prefix, topology.SCHEDULER).state("last-tick")


def round_key(prefix: str) -> str:
    return StageKeys(prefix, RECONCILER).state("last-round")


def leader_key(prefix: str) -> str:
    return StageKeys(prefix, topology.SCHEDULER).lock("tick")


def _who() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


async def _put(
    client: Client, key: str, value: dict[str, Any], interval_s: float, url: str
) -> None:
    now_ms = time.time_ns() // 1_000_000
    body = {"at_ms": now_ms, "next_ms": now_ms + int(interval_s * 1000), "by": _who(), **value}
    ttl_ms = max(60_000, int(interval_s * 3 * 1000))
    with translate(url):
        await client.set(key, json.dumps(body), px=ttl_ms)


async def record_tick(
    client: Client, prefix: str, interval_s: float, batches: list[Any], url: str = ""
) -> None:
    trackers = sum(len(getattr(b, "tracker_ids", ())) for b in batches)
    value = {"batches": len(batches), "trackers": trackers}
    await _put(client, tick_key(prefix), value, interval_s, url)


async def record_round(
    client: Client, prefix: str, interval_s: float, done: Any, url: str = ""
) -> None:
    value = {
        "geocode": done.geocode,
        "geofence": done.geofence,
        "skipped": list(done.skipped),
    }
    await _put(client, round_key(prefix), value, interval_s, url)


async def read(client: Client, prefix: str) -> dict[str, Any]:
    """``{"scheduler": {...leader, last tick...}, "reconciler": {...} | None}``."""
    pipe = client.pipeline(transaction=False)
    pipe.get(leader_key(prefix))
    pipe.pttl(leader_key(prefix))
    pipe.get(tick_key(prefix))
    pipe.get(round_key(prefix))
    holder, ttl, tick, rnd = await pipe.execute()

    def load(raw: Any) -> dict[str, Any] | None:
        if raw is None:
            return None
        try:
            value = json.loads(raw)
        except ValueError:
            return None
        return value if isinstance(value, dict) else None

    leader = None
    if holder is not None:
        text = holder.decode(errors="replace") if isinstance(holder, bytes) else str(holder)
        host, _, rest = text.partition(":")
        leader = {"host": host, "pid": rest.split(":")[0], "lease_ms": int(ttl)}
    return {"scheduler": {"leader": leader, "last_tick": load(tick)}, "reconciler": load(rnd)}

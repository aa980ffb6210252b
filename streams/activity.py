"""What a worker tells the operator's console, written with each heartbeat.

- ``{p}:{stage}:info:{consumer}`` (hash, kept :data:`INFO_TTL_MIN_S` or ten lease
  lives after the last heartbeat, so a dead worker's last counts stay visible for a
  while): host, pid, start time, version, entries processed / failed / dead-lettered
  since start, and the entries in flight at the last heartbeat.
- ``{p}:{stage}:history:{minute}`` (hash per UTC minute, expires after
  :data:`HISTORY_TTL_S`): ``processed``, ``failed``, ``dead_lettered`` counted by every
  worker of the stage in that minute. At most ~65 small keys per stage: bounded.

Both live under the stage's (shard 0's) hash tag, so a heartbeat stays one pipeline.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Sequence
from typing import Any

from streams.connection import Client
from streams.keys import StageKeys
from streams.message import Message
from streams.middleware import BatchCall, Middleware

HISTORY_MINUTES = 60
HISTORY_TTL_S = (HISTORY_MINUTES + 5) * 60
INFO_TTL_MIN_S = 600
COUNTERS = ("processed", "failed", "dead_lettered")


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("trackstream")
    except Exception:  # not installed as a distribution
        return "unknown"


class Activity(Middleware):
    """Counts one worker's outcomes; :meth:`write` adds them to a heartbeat pipeline."""

    def __init__(self) -> None:
        self.started_ms = time.time_ns() // 1_000_000
        self.counts = dict.fromkeys(COUNTERS, 0)
        self.in_flight = 0
        self._written = dict.fromkeys(COUNTERS, 0)
        self._sending = self._written
        self.version = _version()

    async def around_batch(
        self, stage: str, batch: Sequence[Message[Any]], call_next: BatchCall
    ) -> None:
        self.in_flight += len(batch)
        try:
            await call_next(batch)
        finally:
            self.in_flight -= len(batch)

    def on_acked(self, stage: str, count: int) -> None:
        self.counts["processed"] += count

    def on_failed(self, stage: str, msg: Message[Any], exc: BaseException, category: str) -> None:
        self.counts["failed"] += 1

    def on_dead_letter(self, stage: str, msg: Message[Any], category: str, error: str) -> None:
        self.counts["dead_lettered"] += 1

    def write(self, pipe: Any, keys: StageKeys, consumer: str, now_ms: int, ttl_ms: int) -> None:
        """Queue the info hash and this minute's history increments on ``pipe``
        (``ttl_ms``: the consumer's lease time); call :meth:`sent` once it executed."""
        info_key = keys.info(consumer)
        pipe.hset(
            info_key,
            mapping={
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "started_ms": self.started_ms,
                "version": self.version,
                "in_flight": self.in_flight,
                "updated_ms": now_ms,
                **self.counts,
            },
        )
        pipe.pexpire(info_key, max(10 * ttl_ms, INFO_TTL_MIN_S * 1000))
        deltas = {k: self.counts[k] - self._written[k] for k in COUNTERS}
        if any(deltas.values()):
            minute_key = keys.history(now_ms // 60_000)
            for name, delta in deltas.items():
                if delta:
                    pipe.hincrby(minute_key, name, delta)
            pipe.expire(minute_key, HISTORY_TTL_S)
        self._sending = dict(self.counts)

    def sent(self) -> None:
        """The pipeline of the last :meth:`write` went through: its increments count."""
        self._written = self._sending


async def read_history(
    client: Client, keys: StageKeys, now_ms: int, minutes: int = HISTORY_MINUTES
) -> list[dict[str, int]]:
    """Per-minute counts of the last ``minutes`` minutes, oldest first (zeros included)."""
    now_minute = now_ms // 60_000
    span = range(now_minute - minutes + 1, now_minute + 1)
    pipe = client.pipeline(transaction=False)
    for m in span:
        pipe.hgetall(keys.history(m))
    raw = await pipe.execute()
    out = []
    for m, fields in zip(span, raw, strict=True):
        row = {"minute_ms": m * 60_000}
        for name in COUNTERS:
            value = fields.get(name.encode(), fields.get(name, 0)) if fields else 0
            row[name] = int(value)
        out.append(row)
    return out


async def read_infos(client: Client, keys: StageKeys, consumers: Sequence[str]) -> dict[str, Any]:
    """consumer -> its info hash (decoded; missing: not in the result)."""
    if not consumers:
        return {}
    pipe = client.pipeline(transaction=False)
    for c in consumers:
        pipe.hgetall(keys.info(c))
    raw = await pipe.execute()
    out: dict[str, Any] = {}
    for c, fields in zip(consumers, raw, strict=True):
        if not fields:
            continue
        d = {
            (k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
            for k, v in fields.items()
        }
        for name in (*COUNTERS, "pid", "started_ms", "in_flight", "updated_ms"):
            if name in d:
                d[name] = int(d[name])
        out[c] = d
    return out

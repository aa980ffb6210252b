"""A typed picture of a stage shard from XINFO STREAM/GROUPS/CONSUMERS and XPENDING.

``lag`` is what Redis reports (entries not yet delivered to the group) unless the
group's position contradicts it: Redis reports it as null after deletions or trims in
some ranges, and after a failover a replica's counters can give a lag although the
group has read up to the stream's last entry. The rule (:func:`checked_lag`):

- last-delivered id >= the stream's last entry: lag is 0, whatever Redis says;
- Redis says null, or a lag above the stream's length, or 0 while entries lie
  beyond the group's position: the entries after the last-delivered id are counted
  with XRANGE (capped at ``lag_count_cap``, flagged as a lower bound when the cap is
  hit);
- otherwise Redis's figure.

``pending`` and the oldest pending entry come from one XPENDING summary, so an
entry acked between two commands cannot make them disagree.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import Any, TypeVar

from streams.connection import Client
from streams.errors import NoSuchKey
from streams.faults import classify
from streams.keys import StageKeys
from streams.parse import entry_ms, parse_entries
from streams.scripts import READ_HEARTBEATS

T = TypeVar("T")
READ_RETRY_DELAYS_S = (0.05, 0.1, 0.2)


@dataclass(frozen=True, slots=True)
class ConsumerStatus:
    name: str
    pending: int
    idle_ms: int
    heartbeat_age_ms: int | None


@dataclass(frozen=True, slots=True)
class StreamStatus:
    stream: str
    length: int
    last_id: str | None
    lag: int | None
    lag_exact: bool
    pending: int
    oldest_pending_id: str | None
    oldest_pending_age_ms: int | None
    last_delivered_id: str | None
    group_exists: bool


@dataclass(frozen=True, slots=True)
class StageStatus:
    stage: str
    shard: int
    group: str
    streams: list[StreamStatus]
    consumers: list[ConsumerStatus] = field(default_factory=list)
    dead_letters: int = 0

    @property
    def length(self) -> int:
        return sum(s.length for s in self.streams)

    @property
    def lag(self) -> int:
        return sum(s.lag or 0 for s in self.streams)

    @property
    def pending(self) -> int:
        return sum(s.pending for s in self.streams)

    @property
    def oldest_pending_age_ms(self) -> int | None:
        ages = [
            s.oldest_pending_age_ms for s in self.streams if s.oldest_pending_age_ms is not None
        ]
        return max(ages) if ages else None

    def live_consumers(self, dead_after_ms: int) -> list[ConsumerStatus]:
        return [
            c
            for c in self.consumers
            if c.heartbeat_age_ms is not None and c.heartbeat_age_ms < dead_after_ms
        ]

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(
            length=self.length,
            lag=self.lag,
            pending=self.pending,
            oldest_pending_age_ms=self.oldest_pending_age_ms,
        )
        return d


def _s(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


async def _count_after(client: Client, stream: str, after: str, cap: int) -> tuple[int, bool]:
    n, cursor = 0, "(" + after
    while n < cap:
        entries = parse_entries(await client.xrange(stream, min=cursor, max="+", count=500))
        n += len(entries)
        if len(entries) < 500:
            return n, True
        cursor = "(" + entries[-1][0]
    return n, False


async def heartbeats(client: Client, keys: StageKeys) -> tuple[int, dict[str, int]]:
    """Redis's time now and each consumer's last heartbeat (unix ms, both by the clock
    of the Redis holding the stage, so the hosts' clocks do not matter)."""
    # EVAL, not a registered script: on a cluster, loading one goes to every master
    reply = await client.eval(READ_HEARTBEATS, 1, keys.heartbeats)
    now_ms = int(reply[0])
    return now_ms, {_s(k): int(v) for k, v in zip(reply[1::2], reply[2::2], strict=True)}


def _id_key(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def checked_lag(
    reported: Any, last_delivered: str, last_entry: str | None, length: int
) -> int | None:
    """Redis's lag when the group's position agrees with it, 0 when the group has read
    everything, None when the entries after the position must be counted."""
    if last_entry is None or _id_key(last_delivered) >= _id_key(last_entry):
        return 0
    if reported is None:
        return None
    lag = int(reported)
    if lag <= 0 or lag > length:  # entries lie beyond the position / more than exist
        return None
    return lag


async def stream_status(
    client: Client, stream: str, group: str, *, now_ms: int, lag_count_cap: int = 100_000
) -> StreamStatus:
    try:
        info = await client.xinfo_stream(stream)
    except NoSuchKey:
        return StreamStatus(stream, 0, None, 0, True, 0, None, None, None, False)
    groups = {_s(g["name"]): g for g in await client.xinfo_groups(stream)}
    g = groups.get(group)
    last_id = _s(info["last-generated-id"]) if info.get("last-generated-id") else None
    if g is None:
        return StreamStatus(
            stream, int(info["length"]), last_id, None, False, 0, None, None, None, False
        )
    last_delivered = _s(g["last-delivered-id"])
    length = int(info["length"])
    last_entry = info.get("last-entry")
    last_entry_id = _s(last_entry[0]) if last_entry else None
    lag, exact = checked_lag(g.get("lag"), last_delivered, last_entry_id, length), True
    if lag is None:
        lag, exact = await _count_after(client, stream, last_delivered, lag_count_cap)
    summary = await client.xpending(stream, group)  # count and oldest in one reply
    pending = int(summary["pending"] or 0)
    oldest_id = oldest_age = None
    if pending and summary.get("min"):
        oldest_id = _s(summary["min"])
        oldest_age = max(0, now_ms - entry_ms(oldest_id))
    return StreamStatus(
        stream=stream,
        length=length,
        last_id=last_id,
        lag=int(lag),
        lag_exact=exact,
        pending=pending,
        oldest_pending_id=oldest_id,
        oldest_pending_age_ms=oldest_age,
        last_delivered_id=last_delivered,
        group_exists=True,
    )


async def stage_status(client: Client, keys: StageKeys, url: str = "") -> StageStatus:
    now_ms, beats = await heartbeats(client, keys)  # ages by Redis's clock
    streams = [await stream_status(client, s, keys.group, now_ms=now_ms) for s in keys.streams()]
    merged: dict[str, tuple[int, int]] = {}
    for st in streams:
        if not st.group_exists:
            continue
        for c in await client.xinfo_consumers(st.stream, keys.group):
            name = _s(c["name"])
            pending, idle = merged.get(name, (0, 1 << 62))
            merged[name] = (pending + int(c["pending"]), min(idle, int(c["idle"])))
    dlq = int(await client.xlen(keys.dlq))
    consumers = [
        ConsumerStatus(name, pending, idle, now_ms - beats[name] if name in beats else None)
        for name, (pending, idle) in sorted(merged.items())
    ]
    return StageStatus(keys.stage, keys.shard, keys.group, streams, consumers, dlq)


async def retrying(read: Callable[[], Awaitable[T]]) -> T:
    """``read()``, tried again 0.05, 0.1 and 0.2 s later on a transient fault: monitors
    only read, and redis-py's cluster client drops a connection now and then under
    concurrent commands ("Connection lost", "'NoneType' object has no attribute
    'writelines'"): about 1 stage read in 300 with five at once on a busy machine."""
    for delay_s in READ_RETRY_DELAYS_S:
        try:
            return await read()
        except Exception as exc:
            if not classify(exc).transient:
                raise
            await asyncio.sleep(delay_s)
    return await read()


async def stage_statuses(
    client: Client, all_keys: Sequence[StageKeys], url: str = ""
) -> list[StageStatus]:
    """:func:`stage_status` of every shard, read concurrently, each :func:`retrying`."""
    return list(
        await asyncio.gather(*(retrying(partial(stage_status, client, k, url)) for k in all_keys))
    )


async def unfinished_age_ms(client: Client, keys: StageKeys, url: str = "") -> int:
    """How far behind a stage is: the age of the oldest entry its group has not finished
    (pending, or not yet delivered) over its streams; 0 when it has caught up."""
    now_ms = time.time_ns() // 1_000_000
    oldest = now_ms
    for stream in keys.streams():
        st = await stream_status(client, stream, keys.group, now_ms=now_ms)
        if st.oldest_pending_id is not None:
            oldest = min(oldest, entry_ms(st.oldest_pending_id))
        if st.lag and st.last_delivered_id is not None:
            after = "(" + st.last_delivered_id
            first = parse_entries(await client.xrange(stream, min=after, max="+", count=1))
            if first:
                oldest = min(oldest, entry_ms(first[0][0]))
    return now_ms - oldest

"""Where a consumer's messages come from besides its read: claiming and retries.

Every source here is an async generator that *yields* batches of messages; the
consumer's loop dispatches and settles each batch before the source goes on (so a
source that checks what is left sees what the loop has done). Sources:

- :meth:`Claimer.own_pending`: entries already delivered to this consumer name
  (after a restart), with their delivery counts;
- :meth:`Claimer.lost_deliveries`: after an outage, entries Redis delivered to us on
  a reply that never arrived, delivery count unchanged;
- :meth:`Claimer.claim_tick`: ``XAUTOCLAIM`` of idle entries (following the cursor)
  and the pending entries of dead consumers, which are then deleted;
- :meth:`Claimer.due_retries`: scheduled retries, ``XCLAIM``-ed back (a delivery).

Dead consumers: a consumer whose heartbeat is older than ``consumer_dead_after_ms``
and that has not touched the stream for as long is dead; the claim tick takes its
pending entries at once (``XCLAIM``), not only after ``claim_idle_ms``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Collection, Sequence
from typing import Any

from streams.message import Message
from streams.monitor import heartbeats, stream_status
from streams.parse import Entry, parse_entries, parse_read
from streams.parts import Shared
from streams.retries import Due, Key
from streams.scripts import DELETE_IDLE_CONSUMER, Lua

log = logging.getLogger("streams.consumer")

Batch = list[Message[Any]]


class Claimer:
    def __init__(self, shared: Shared) -> None:
        self.client = shared.client
        self.settings = shared.settings
        self.keys = shared.keys
        self.name = shared.name
        self.stage = shared.stage
        self.hooks = shared.hooks
        self.retries = shared.retries
        self.stop_event = shared.stop
        self._url = shared.settings.redis_url
        self._cursors: dict[str, str] = {}
        self.delete_consumer = Lua(shared.client, DELETE_IDLE_CONSUMER)

    # ---------------------------------------------------------------- own entries
    async def own_pending(self) -> AsyncIterator[Batch]:
        """Entries already delivered to this consumer name (after a restart)."""
        for stream in self.keys.streams():
            last = "0"
            while not self.stop_event.is_set():
                raw = await self.client.xreadgroup(
                    self.keys.group, self.name, {stream: last}, count=self.settings.batch_size
                )
                entries = parse_read(raw).get(stream, [])
                if not entries:
                    break
                last = entries[-1][0]
                log.info(
                    "%s/%s: re-reading %d own pending entries", self.stage, self.name, len(entries)
                )
                yield await self.with_deliveries(stream, entries)

    async def lost_deliveries(self, in_hand: Collection[Key]) -> AsyncIterator[Batch]:
        """After an outage: entries Redis delivered to us on a reply that never arrived
        (pending for us, yet not in hand), taken back with their delivery count."""
        for stream in self.keys.streams():
            start = "-"
            while not self.stop_event.is_set():
                rows = await self.client.xpending_range(
                    stream,
                    self.keys.group,
                    min=start,
                    max="+",
                    count=self.settings.claim_count,
                    consumername=self.name,
                )
                if not rows:
                    break
                start = "(" + _s(rows[-1]["message_id"])
                by_count: dict[int, list[Any]] = {}
                for row in rows:
                    entry_id = _s(row["message_id"])
                    if (stream, entry_id) not in in_hand and (stream, entry_id) not in self.retries:
                        by_count.setdefault(int(row["times_delivered"]), []).append(entry_id)
                for count, ids in by_count.items():
                    raw = await self.client.xclaim(
                        stream, self.keys.group, self.name, 0, ids, retrycount=count
                    )
                    got = parse_entries(raw)
                    free = await self.deferrals_of(stream, [i for i, _ in got])
                    msgs = [_message(stream, i, f, count, free.get(i, 0)) for i, f in got]
                    if msgs:
                        log.warning(
                            "%s/%s: taking back %d entries delivered during the outage",
                            self.stage,
                            self.name,
                            len(msgs),
                        )
                        yield msgs
                if len(rows) < self.settings.claim_count:
                    break

    # ------------------------------------------------------------------ claiming
    async def claim_tick(self) -> AsyncIterator[Batch]:
        claimed_total = 0
        for stream in self.keys.streams():
            cursor = self._cursors.get(stream, "0-0")
            for _ in range(10):  # bounded work per tick; the cursor carries on next tick
                reply = await self.client.xautoclaim(
                    stream,
                    self.keys.group,
                    self.name,
                    self.settings.claim_idle_ms,
                    start_id=cursor,
                    count=self.settings.claim_count,
                )
                cursor = _s(reply[0])
                if len(reply) > 2 and reply[2]:  # deleted while pending: drop their counts
                    fields = [self.keys.deferral_field(stream, _s(i)) for i in reply[2]]
                    await self.client.hdel(self.keys.deferrals, *fields)
                entries = await self._keep_own_retries(stream, parse_entries(reply[1]))
                if entries:
                    claimed_total += len(entries)
                    yield await self.with_deliveries(stream, entries)
                if cursor == "0-0":
                    break
            self._cursors[stream] = cursor
        if claimed_total:
            self.hooks.claimed(claimed_total)
        async for batch in self._remove_dead_consumers():
            yield batch
        await self._report_backlog()

    async def _keep_own_retries(self, stream: str, entries: list[Entry]) -> list[Entry]:
        """Entries XAUTOCLAIM took that are ours and waiting for their retry (idle for
        long after an outage): their delivery count is put back, the retry stands."""
        mine = [d for e in entries if (d := self.retries.get((stream, e[0]))) is not None]
        for r in mine:
            await self.client.xclaim(
                stream,
                self.keys.group,
                self.name,
                0,
                [r.msg.entry_id],
                retrycount=r.msg.times_delivered,
                justid=True,
            )
            r.delay_ms = 0  # its idle time was just reset: claim it back regardless
        return [e for e in entries if (stream, e[0]) not in self.retries]

    async def _remove_dead_consumers(self) -> AsyncIterator[Batch]:
        """Take the pending entries of dead consumers at once, then delete them.

        Dead: no heartbeat for ``consumer_dead_after_ms`` (by Redis's clock) and no
        stream command for as long (XINFO idle). A live consumer in a slow handler
        keeps beating, so it is never dead.
        """
        dead_after = self.settings.consumer_dead_after_ms
        now_ms, beats = await heartbeats(self.client, self.keys)
        for stream in self.keys.streams():
            consumers = await self.client.xinfo_consumers(stream, self.keys.group)
            for c in consumers:
                name = _s(c["name"])
                if name == self.name or int(c["idle"]) < dead_after:
                    continue
                if now_ms - beats.get(name, 0) < dead_after:
                    continue
                if int(c["pending"]) > 0:
                    left = [False]
                    async for batch in self._claim_from_dead(stream, name, left):
                        yield batch
                    if not left[0]:
                        continue  # still owns entries (more than one tick's worth)
                # atomic: deleted only if it still owns nothing
                removed = await self.delete_consumer(
                    keys=[stream, self.keys.heartbeats], args=[self.keys.group, name]
                )
                if removed:
                    log.info("%s: removed dead consumer %s from %s", self.stage, name, stream)

    async def _claim_from_dead(
        self, stream: str, dead: str, none_left: list[bool]
    ) -> AsyncIterator[Batch]:
        """Claim a dead consumer's pending entries; ``none_left[0]`` is set True if it
        owns none any more."""
        # a small min idle: a peer that claimed them a moment ago made them its own
        min_idle = min(1_000, self.settings.claim_idle_ms)
        for _ in range(10):  # bounded work per tick
            rows = await self.client.xpending_range(
                stream,
                self.keys.group,
                min="-",
                max="+",
                count=self.settings.claim_count,
                consumername=dead,
            )
            if not rows:
                none_left[0] = True
                return
            ids: list[Any] = [_s(row["message_id"]) for row in rows]
            raw = await self.client.xclaim(stream, self.keys.group, self.name, min_idle, ids)
            entries = parse_entries(raw)
            if not entries:
                return  # a peer was quicker
            log.warning(
                "%s/%s: consumer %s is dead; claimed %d of its entries",
                self.stage,
                self.name,
                dead,
                len(entries),
            )
            self.hooks.claimed(len(entries))
            yield await self.with_deliveries(stream, entries)

    async def _report_backlog(self) -> None:
        if not self.hooks.wants("on_backlog"):
            return
        now_ms = time.time_ns() // 1_000_000
        st = await (  # a lower bound past 1,000: cheap every tick
            stream_status(
                self.client, self.keys.stream, self.keys.group, now_ms=now_ms, lag_count_cap=1_000
            )
        )
        self.hooks.backlog(st.pending, st.lag if st.group_exists else None)

    # ------------------------------------------------------------------- retries
    async def due_retries(self, due: Sequence[Due]) -> AsyncIterator[Batch]:
        """``XCLAIM`` the due retries back (one per stream); it adds a delivery (a
        deferred entry's last delivery is in its recorded deferral count, so this one
        is spent only if it runs and fails, or its consumer dies while running it)."""
        groups: dict[str, list[Due]] = {}
        for r in due:
            groups.setdefault(r.msg.stream, []).append(r)
        for stream, rs in groups.items():
            # min idle: nobody else must have claimed it since (that resets idle)
            min_idle = max(0, min(r.delay_ms for r in rs) // 2)
            raw = await self.client.xclaim(
                stream, self.keys.group, self.name, min_idle, [r.msg.entry_id for r in rs]
            )
            for r in rs:  # dropped only now: a claim lost to an outage is tried again
                self.retries.drop(r)
            claimed = dict(parse_entries(raw))
            fresh: Batch = [
                Message(
                    stream,
                    r.msg.entry_id,
                    claimed[r.msg.entry_id],
                    r.msg.deliveries + 1,
                    deferrals=r.msg.deferrals,
                )
                for r in rs
                if r.msg.entry_id in claimed
            ]
            if fresh:
                yield fresh

    # ------------------------------------------------------------------- helpers
    async def with_deliveries(self, stream: str, entries: Sequence[Entry]) -> Batch:
        """Messages for entries we own, with their delivery counts from XPENDING."""
        if not entries:
            return []
        ids = [e[0] for e in entries]
        counts: dict[str, int] = {}
        rows = await self.client.xpending_range(
            stream,
            self.keys.group,
            min=min(ids, key=_id_key),
            max=max(ids, key=_id_key),
            count=len(ids) * 4 + 100,
            consumername=self.name,
        )
        for row in rows:
            counts[_s(row["message_id"])] = int(row["times_delivered"])
        free = await self.deferrals_of(stream, ids)
        return [_message(stream, i, f, counts.get(i, 1), free.get(i, 0)) for i, f in entries]

    async def deferrals_of(self, stream: str, ids: Sequence[str]) -> dict[str, int]:
        """The recorded deferral counts of entries (absent: none)."""
        if not ids:
            return {}
        fields = [self.keys.deferral_field(stream, i) for i in ids]
        values = await self.client.hmget(self.keys.deferrals, fields)
        return {i: int(v) for i, v in zip(ids, values, strict=True) if v is not None}


def _message(stream: str, entry_id: str, fields: Any, times: int, deferrals: int) -> Message[Any]:
    """A message from Redis's delivery count and the recorded deferrals."""
    return Message(stream, entry_id, fields, max(1, times - deferrals), deferrals=deferrals)


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _id_key(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)

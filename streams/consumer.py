"""Consuming one stage shard through its consumer group.

One pass of the loop::

    start ─► ensure groups ─► re-read own pending (id 0) ─┐
        ┌─────────────────────────────────────────────────┘
        ▼
      gate closed? ── wait (a stage whose dependency is down reads nothing, so no
                      delivery is spent while it cannot work)
      claim tick? ── XAUTOCLAIM idle entries (following the cursor), drop dead consumers
      retries due? ── XCLAIM them back to ourselves (a delivery) and handle
      XREADGROUP priority+stream ">" COUNT n BLOCK ms ── handle the batch
        │ handle: decode ─► middleware ─► handler(s) ─► flush outbox ─► XACK (pipelined)
        │ failure: Reject/decode/validation ─► dead letter now
        │          Defer, or Redis unreachable ─► deferral recorded, retry later:
        │            the delivery is not spent
        │          other ─► retry with backoff; at max_deliveries ─► dead letter
        │ Redis unreachable while publishing, acking or dead-lettering ─► the work is
        │   kept (same outbox, same message ids) and finished first once Redis is back
        ▼
      stop requested ─► no new reads (a blocking read returns within block_ms) ─►
      in-flight handlers get shutdown_grace_ms, then are interrupted ─► finished
      work is published and acked; whatever is still pending is handed back (re-add
      + ack, atomically) ─► delete our consumer

In-flight Redis commands are never cancelled (a command cut off mid-reply can wedge
the client's connection pool); only handler code is, by its timeout or the grace.

Spent deliveries are Redis's count (XPENDING) minus the entry's deferrals, recorded
in the stage's ``deferrals`` hash as handlers defer (see :mod:`streams.keys`), so they
survive crashes, claims and hand-backs: an entry whose consumer keeps dying *while
running its handler* is dead-lettered after ``max_deliveries`` spent deliveries; one
that only waited (deferred) spends nothing, whoever holds it.

An outage never spends a delivery: a handler that succeeded while its output or its
ack could not reach Redis is not a failure, and neither is a handler that failed only
because Redis was unreachable (a :class:`~streams.errors.RedisUnavailable` or a
redis-py connection error, also as the ``__cause__`` of what it raised). Kept work
lives in this process only: if the process dies holding it, the entry is still
pending and is redelivered (a delivery counted), and its handler runs again, so
downstream effects must be idempotent (every stage's are). After an outage, entries
Redis delivered to this consumer on a reply that never arrived are taken back at once
with their delivery count unchanged.

Dead consumers: a consumer whose heartbeat is older than ``consumer_dead_after_ms``
and that has not touched the stream for as long is dead; the claim tick takes its
pending entries at once (``XCLAIM``), not only after ``claim_idle_ms``. A live
consumer in a slow handler keeps beating, so it is never mistaken for a dead one;
``claim_idle_ms`` is the fallback for entries left behind by consumers that beat.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from streams.connection import Client, ensure_group, redact, refresh_topology, translate
from streams.deadletter import DeadLetters
from streams.errors import (
    Defer,
    MessageError,
    RedisUnavailable,
    Reject,
    Retry,
)
from streams.faults import classify, describe, redis_down
from streams.keys import StageKeys
from streams.message import Codec, Message
from streams.middleware import BatchCall, MessageCall, Middleware
from streams.monitor import heartbeats, stream_status
from streams.parse import Entry, parse_entries, parse_read
from streams.producer import Outbox, Route
from streams.scripts import (
    ACK_FORGET,
    DELETE_IDLE_CONSUMER,
    HAND_BACK,
    RECORD_DEFERRALS,
    Lua,
)
from streams.settings import StreamSettings

log = logging.getLogger("streams.consumer")


@dataclass
class Context:
    """What a handler may use besides its message: where to publish downstream."""

    stage: str
    consumer: str
    outbox: Outbox

    def publish(
        self,
        route: Route,
        payload: Any,
        *,
        partition_key: str = "",
        priority: bool = False,
        trace: str | None = None,
    ) -> None:
        """Queue a downstream message; it is written before the input is acked."""
        self.outbox.add(route, payload, partition_key=partition_key, priority=priority, trace=trace)


Handler = Callable[[Message[Any], Context], Awaitable[None]]
# A batch handler returns the failures by entry id (None or {} = all succeeded).
BatchHandler = Callable[
    [Sequence[Message[Any]], Context], Awaitable[Mapping[str, BaseException] | None]
]
# Awaited before every read or claim; returns once the stage can work. It is
# cancelled when the consumer stops while waiting.
Gate = Callable[[], Awaitable[None]]


@dataclass(slots=True)
class _Due:
    """A retry scheduled by this consumer."""

    at: float  # monotonic time it is due
    msg: Message[Any]
    delay_ms: int


@dataclass
class _Outcome:
    ok: list[Message[Any]] = field(default_factory=list)
    failed: list[tuple[Message[Any], BaseException]] = field(default_factory=list)
    outbox: Outbox | None = None
    # dead letters to move: (message, category, error)
    letters: list[tuple[Message[Any], str, str]] = field(default_factory=list)
    # deferred entries whose deferral count must be in Redis before anything else
    deferred: list[Message[Any]] = field(default_factory=list)


def _is_deferral(exc: BaseException) -> bool:
    """The handler did not get to try (Defer) or could not reach Redis: the delivery
    says nothing about the entry, so it is not spent."""
    return isinstance(exc, Defer) or redis_down(exc)


_Key = tuple[str, str]  # (stream, entry id)


class _DeferralLog:
    """Writes deferral counts to Redis as handlers defer, so a consumer killed in the
    middle of a batch has recorded the deferrals before the kill: only the entries
    running, or read and not yet started, at that moment count a delivery. Group
    commit: one write in flight, the next carries whatever deferred meanwhile.
    :meth:`settle` makes sure a batch's counts are written (and raises if Redis
    cannot take them)."""

    def __init__(self, write: Callable[[list[tuple[Message[Any], int]]], Awaitable[None]]) -> None:
        self._write = write
        self._queue: dict[_Key, tuple[Message[Any], int]] = {}
        self._written: dict[_Key, int] = {}
        self._task: asyncio.Task[None] | None = None

    def note(self, msg: Message[Any], count: int) -> None:
        self._queue[(msg.stream, msg.entry_id)] = (msg, count)
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while self._queue:
            batch = list(self._queue.values())
            self._queue.clear()
            try:
                await self._write(batch)
            except Exception:  # settle() writes them again and reports the error
                return
            for msg, count in batch:
                key = (msg.stream, msg.entry_id)
                self._written[key] = max(count, self._written.get(key, 0))

    async def idle(self) -> None:
        """Wait for the write in flight (never cancelling it: a Redis command cut off
        mid-reply can wedge the connection pool)."""
        if self._task is not None and not self._task.done():
            await asyncio.wait({self._task})

    async def settle(self, msgs: Sequence[Message[Any]]) -> None:
        """Write the deferral counts of ``msgs`` not written yet."""
        await self.idle()
        missing = [
            (m, m.deferrals)
            for m in msgs
            if self._written.get((m.stream, m.entry_id), 0) < m.deferrals
        ]
        if missing:
            await self._write(missing)
        for m in msgs:
            self._written.pop((m.stream, m.entry_id), None)


def _stray_cancel(exc: BaseException) -> bool:
    """A CancelledError raised by handler code while nobody cancelled us: a failure of
    that entry, not a request to stop."""
    task = asyncio.current_task()
    return isinstance(exc, asyncio.CancelledError) and task is not None and not task.cancelling()


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _category(exc: BaseException) -> str:
    if isinstance(exc, Reject):
        return "handler"
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, MessageError):
        return exc.category
    return "handler"


class Consumer:
    """Consumes one stage shard (its priority lane first, then its stream)."""

    def __init__(
        self,
        client: Client,
        settings: StreamSettings,
        keys: StageKeys,
        codec: Codec,
        *,
        name: str,
        handler: Handler | None = None,
        batch_handler: BatchHandler | None = None,
        middleware: Sequence[Middleware] = (),
        stop: asyncio.Event | None = None,
        gate: Gate | None = None,
    ) -> None:
        if (handler is None) == (batch_handler is None):
            raise ValueError("give exactly one of handler or batch_handler")
        self.client = client
        self.settings = settings
        self.keys = keys
        self.codec = codec
        self.name = name
        self.stage = keys.stage
        self.handler = handler
        self.batch_handler = batch_handler
        self.middleware = tuple(middleware)
        self.stop_event = stop or asyncio.Event()
        self.gate = gate
        self.dead_letters = DeadLetters(client, keys, settings.redis_url)
        self._hand_back = Lua(client, HAND_BACK)
        self._record_deferrals = Lua(client, RECORD_DEFERRALS)
        self._ack_forget = Lua(client, ACK_FORGET)
        self._deferral_log = _DeferralLog(self._write_deferrals)
        self._delete_consumer = Lua(client, DELETE_IDLE_CONSUMER)
        self._url = settings.redis_url
        self._retries: dict[tuple[str, str], _Due] = {}
        self._held: list[_Outcome] = []  # finished work kept through an outage
        self._lost_check = False  # after an outage: take back deliveries whose reply was lost
        self._cursors: dict[str, str] = {}
        self._outage_since: float | None = None
        self._failures = 0  # consecutive failed steps (backoff)
        self._last_failure = 0.0
        self._deadlines: set[asyncio.Timeout] = set()  # of the handlers running now
        self._grace_over = False
        self.handled = 0  # entries acked by this consumer (for tests and progress)

    # ----------------------------------------------------------------- lifecycle
    def stop(self) -> None:
        self.stop_event.set()

    async def run(self, *, burst: bool = False) -> None:
        """Consume until stopped; with ``burst`` return once nothing is left for us."""
        while not self.stop_event.is_set() and not await self._with_recovery(self._start):
            pass  # groups must exist before reading; _with_recovery backed off
        next_claim = 0.0
        grace = asyncio.create_task(self._grace_timer())
        try:
            while await self._gate_open():
                if self._held and not await self._with_recovery(self._settle_held):
                    continue  # Redis still unreachable: nothing new until it is done
                if self._lost_check:
                    await self._with_recovery(self._recover_lost_deliveries)
                now = time.monotonic()
                if now >= next_claim:
                    await self._with_recovery(self._claim_tick)
                    next_claim = time.monotonic() + self.settings.claim_interval_ms / 1000
                if await self._with_recovery(self._run_due_retries):
                    continue
                got = await self._with_recovery(partial(self._read_and_handle, burst))
                if not got and burst and not self._retries:
                    return
        finally:
            grace.cancel()  # waits on an event or sleeps: safe to cancel
            task = asyncio.current_task()
            given_up = task is not None and task.cancelling() > 0  # Redis silent at stop
            if self.stop_event.is_set() and not given_up:
                await self._shutdown()

    async def _grace_timer(self) -> None:
        """Once stop is requested, give in-flight handlers shutdown_grace_ms, then time
        them out (their entries stay pending and are handed back)."""
        await self.stop_event.wait()
        await asyncio.sleep(self.settings.shutdown_grace_ms / 1000)
        self._grace_over = True
        now = asyncio.get_running_loop().time()
        for deadline in list(self._deadlines):
            deadline.reschedule(now)

    @contextlib.asynccontextmanager
    async def _deadline(self) -> AsyncIterator[None]:
        """The handler timeout, cut short when the shutdown grace is over."""
        async with asyncio.timeout(self.settings.handler_timeout_ms / 1000) as deadline:
            if self._grace_over:
                deadline.reschedule(asyncio.get_running_loop().time())
            self._deadlines.add(deadline)
            try:
                yield
            finally:
                self._deadlines.discard(deadline)

    async def _start(self) -> bool:
        for stream in self.keys.streams():
            await ensure_group(self.client, self._url, stream, self.keys.group)
        if await self._gate_open():
            await self._recover_own_pending()
        return True

    async def _gate_open(self) -> bool:
        """Wait for the gate; False once stop is requested."""
        if self.gate is None or self.stop_event.is_set():
            return not self.stop_event.is_set()
        opened = asyncio.ensure_future(self.gate())
        stopper = asyncio.ensure_future(self.stop_event.wait())
        try:
            await asyncio.wait({opened, stopper}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (opened, stopper):
                task.cancel()
        if opened.done() and not opened.cancelled() and opened.exception() is not None:
            log.exception("%s/%s: gate failed", self.stage, self.name, exc_info=opened.exception())
        return not self.stop_event.is_set()

    async def _with_recovery(self, step: Callable[[], Awaitable[Any]]) -> Any:
        """Run one step; whatever Redis does, the consumer goes on.

        :func:`streams.faults.classify` decides: a transient fault is waited out with
        backoff (and the cluster topology refreshed), a vanished group recreated, and
        anything else logged with its context, counted, and backed off from.
        """
        try:
            result = await step()
        except Exception as exc:
            verdict = classify(exc)
            self._notify("on_redis_error", self.stage, verdict.kind, verdict.reason)
            if verdict.kind == "group-missing":
                await self._recreate_groups(exc)
                return None
            if verdict.kind == "transient":
                if self._outage_since is None:
                    self._outage_since = time.monotonic()
                    log.error(
                        "%s/%s: Redis unavailable (%s: %s); retrying with backoff",
                        self.stage,
                        self.name,
                        verdict.reason,
                        describe(exc),
                    )
                if verdict.refresh:
                    await refresh_topology(self.client)
            else:
                log.error(
                    "%s/%s: unexpected error in %s (%s); carrying on",
                    self.stage,
                    self.name,
                    _step_name(step),
                    verdict.reason,
                    exc_info=exc,
                )
            self._failures += 1
            self._last_failure = time.monotonic()
            await self._pause(self._backoff_s())
            return None
        self._failures = 0
        now = time.monotonic()
        # "back" once steps have succeeded for a second: in a cluster, steps on healthy
        # masters succeed between those on the failed one
        if self._outage_since is not None and now - self._last_failure >= 1.0:
            log.warning(
                "%s/%s: Redis is back after %.1f s",
                self.stage,
                self.name,
                self._last_failure - self._outage_since,
            )
            self._outage_since = None
            self._lost_check = True
        return result

    async def _recreate_groups(self, exc: BaseException) -> None:
        try:
            for stream in self.keys.streams():
                if await ensure_group(self.client, self._url, stream, self.keys.group):
                    self._notify("on_group_recreated", self.stage, stream)
        except Exception as again:  # Redis went away meanwhile: the next step retries
            log.warning("%s/%s: recreating the group failed: %s", self.stage, self.name, again)
            await self._pause(self._backoff_s())
            return
        self._retries.clear()  # the pending list went with the group
        log.debug("recovered from %s", exc)

    def _backoff_s(self) -> float:
        """Exponential in the consecutive failures, 0.05 s .. 2 s, equal jitter."""
        cap: float = min(2.0, 0.05 * 2.0 ** min(self._failures, 6))
        return cap / 2 + random.random() * cap / 2

    async def _pause(self, seconds: float) -> None:
        """Sleep, but wake up at once when stop is requested."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stop_event.wait(), seconds)

    # ------------------------------------------------------------------- reading
    async def _read_and_handle(self, burst: bool) -> bool:
        block_ms: int | None = self.settings.block_ms
        if self._retries:
            due = min(r.at for r in self._retries.values())
            block_ms = max(1, min(self.settings.block_ms, int((due - time.monotonic()) * 1000)))
        if burst and not self._retries:
            block_ms = None  # do not wait for new entries
        streams: dict[Any, Any] = dict.fromkeys(self.keys.streams(), ">")
        read = self.client.xreadgroup(
            self.keys.group, self.name, streams, count=self.settings.batch_size, block=block_ms
        )
        raw = await self._translated(read)  # never cancelled: returns within block_ms
        if raw is None:
            return False
        by_stream = parse_read(raw)
        msgs: list[Message[Any]] = [
            Message(stream, entry_id, fields, 1)
            for stream in self.keys.streams()
            for entry_id, fields in by_stream.get(stream, ())
        ]
        if msgs:
            await self._handle(msgs)
        return bool(msgs)

    async def _translated(self, aw: Awaitable[Any]) -> Any:
        with translate(self._url, self.keys.stream, self.keys.group):
            return await aw

    async def _recover_own_pending(self) -> None:
        """Re-read entries already delivered to this consumer name (after a restart)."""
        for stream in self.keys.streams():
            last = "0"
            while not self.stop_event.is_set():
                raw = await self._translated(
                    self.client.xreadgroup(
                        self.keys.group, self.name, {stream: last}, count=self.settings.batch_size
                    )
                )
                entries = parse_read(raw).get(stream, [])
                if not entries:
                    break
                last = entries[-1][0]
                log.info(
                    "%s/%s: re-reading %d own pending entries", self.stage, self.name, len(entries)
                )
                await self._handle(await self._with_deliveries(stream, entries))

    async def _with_deliveries(self, stream: str, entries: Sequence[Entry]) -> list[Message[Any]]:
        """Messages for entries we own, with their delivery counts from XPENDING."""
        if not entries:
            return []
        ids = [e[0] for e in entries]
        counts: dict[str, int] = {}
        rows = await self._translated(
            self.client.xpending_range(
                stream,
                self.keys.group,
                min=min(ids, key=_id_key),
                max=max(ids, key=_id_key),
                count=len(ids) * 4 + 100,
                consumername=self.name,
            )
        )
        for row in rows:
            mid = row["message_id"]
            counts[mid.decode() if isinstance(mid, bytes) else str(mid)] = int(
                row["times_delivered"]
            )
        free = await self._deferrals_of(stream, ids)
        return [_message(stream, i, f, counts.get(i, 1), free.get(i, 0)) for i, f in entries]

    async def _deferrals_of(self, stream: str, ids: Sequence[str]) -> dict[str, int]:
        """The recorded deferral counts of entries (absent: none)."""
        if not ids:
            return {}
        fields = [self.keys.deferral_field(stream, i) for i in ids]
        values = await self._translated(self.client.hmget(self.keys.deferrals, fields))
        return {i: int(v) for i, v in zip(ids, values, strict=True) if v is not None}

    async def _write_deferrals(self, batch: list[tuple[Message[Any], int]]) -> None:
        by_stream: dict[str, list[Any]] = {}
        for msg, count in batch:
            by_stream.setdefault(msg.stream, []).extend((msg.entry_id, count))
        for stream, pairs in by_stream.items():
            await self._translated(
                self._record_deferrals(
                    keys=[stream, self.keys.deferrals], args=[self.keys.group, self.name, *pairs]
                )
            )

    async def _recover_lost_deliveries(self) -> None:
        """After an outage: take back entries Redis delivered to us on a reply that
        never arrived (pending for us, yet not in hand), delivery count unchanged."""
        self._lost_check = False
        in_hand = set(self._retries) | {
            (m.stream, m.entry_id)
            for o in self._held
            for m in (*o.ok, *(x[0] for x in o.letters), *o.deferred)
        }
        for stream in self.keys.streams():
            start = "-"
            while not self.stop_event.is_set():
                rows = await self._translated(
                    self.client.xpending_range(
                        stream,
                        self.keys.group,
                        min=start,
                        max="+",
                        count=self.settings.claim_count,
                        consumername=self.name,
                    )
                )
                if not rows:
                    break
                start = "(" + _s(rows[-1]["message_id"])
                by_count: dict[int, list[Any]] = {}
                for row in rows:
                    entry_id = _s(row["message_id"])
                    if (stream, entry_id) not in in_hand:
                        by_count.setdefault(int(row["times_delivered"]), []).append(entry_id)
                for count, ids in by_count.items():
                    raw = await self._translated(
                        self.client.xclaim(
                            stream, self.keys.group, self.name, 0, ids, retrycount=count
                        )
                    )
                    got = parse_entries(raw)
                    free = await self._deferrals_of(stream, [i for i, _ in got])
                    msgs: list[Message[Any]] = [
                        _message(stream, i, f, count, free.get(i, 0)) for i, f in got
                    ]
                    if msgs:
                        log.warning(
                            "%s/%s: taking back %d entries delivered during the outage",
                            self.stage,
                            self.name,
                            len(msgs),
                        )
                        await self._handle(msgs)
                if len(rows) < self.settings.claim_count:
                    break

    # ------------------------------------------------------------------ claiming
    async def _claim_tick(self) -> None:
        claimed_total = 0
        for stream in self.keys.streams():
            cursor = self._cursors.get(stream, "0-0")
            for _ in range(10):  # bounded work per tick; the cursor carries on next tick
                reply = await self._translated(
                    self.client.xautoclaim(
                        stream,
                        self.keys.group,
                        self.name,
                        self.settings.claim_idle_ms,
                        start_id=cursor,
                        count=self.settings.claim_count,
                    )
                )
                cursor = _s(reply[0])
                if len(reply) > 2 and reply[2]:  # deleted while pending: drop their counts
                    fields = [self.keys.deferral_field(stream, _s(i)) for i in reply[2]]
                    await self._translated(self.client.hdel(self.keys.deferrals, *fields))
                entries = await self._keep_own_retries(stream, parse_entries(reply[1]))
                if entries:
                    claimed_total += len(entries)
                    await self._handle(await self._with_deliveries(stream, entries))
                if cursor == "0-0":
                    break
            self._cursors[stream] = cursor
        if claimed_total:
            self._notify("on_claimed", self.stage, claimed_total)
        await self._remove_dead_consumers()
        await self._report_backlog()

    async def _keep_own_retries(self, stream: str, entries: list[Entry]) -> list[Entry]:
        """Entries XAUTOCLAIM took that are ours and waiting for their retry (idle for
        long after an outage): their delivery count is put back, the retry stands."""
        mine = [self._retries[(stream, e[0])] for e in entries if (stream, e[0]) in self._retries]
        for r in mine:
            await self._translated(
                self.client.xclaim(
                    stream,
                    self.keys.group,
                    self.name,
                    0,
                    [r.msg.entry_id],
                    retrycount=r.msg.times_delivered,
                    justid=True,
                )
            )
            r.delay_ms = 0  # its idle time was just reset: claim it back regardless
        return [e for e in entries if (stream, e[0]) not in self._retries]

    async def _remove_dead_consumers(self) -> None:
        """Take the pending entries of dead consumers at once, then delete them.

        Dead: no heartbeat for ``consumer_dead_after_ms`` (by Redis's clock) and no
        stream command for as long (XINFO idle). A live consumer in a slow handler
        keeps beating, so it is never dead.
        """
        dead_after = self.settings.consumer_dead_after_ms
        now_ms, beats = await self._translated(heartbeats(self.client, self.keys))
        for stream in self.keys.streams():
            consumers = await self._translated(self.client.xinfo_consumers(stream, self.keys.group))
            for c in consumers:
                name = _s(c["name"])
                if name == self.name or int(c["idle"]) < dead_after:
                    continue
                if now_ms - beats.get(name, 0) < dead_after:
                    continue
                if int(c["pending"]) > 0 and not await self._claim_from_dead(stream, name):
                    continue  # still owns entries (more than one tick's worth)
                # atomic: deleted only if it still owns nothing
                removed = await self._translated(
                    self._delete_consumer(
                        keys=[stream, self.keys.heartbeats], args=[self.keys.group, name]
                    )
                )
                if removed:
                    log.info("%s: removed dead consumer %s from %s", self.stage, name, stream)

    async def _claim_from_dead(self, stream: str, dead: str) -> bool:
        """Claim and handle a dead consumer's pending entries; True if none are left."""
        # a small min idle: a peer that claimed them a moment ago made them its own
        min_idle = min(1_000, self.settings.claim_idle_ms)
        for _ in range(10):  # bounded work per tick
            rows = await self._translated(
                self.client.xpending_range(
                    stream,
                    self.keys.group,
                    min="-",
                    max="+",
                    count=self.settings.claim_count,
                    consumername=dead,
                )
            )
            if not rows:
                return True
            ids: list[Any] = [_s(row["message_id"]) for row in rows]
            raw = await self._translated(
                self.client.xclaim(stream, self.keys.group, self.name, min_idle, ids)
            )
            entries = parse_entries(raw)
            if not entries:
                return False  # a peer was quicker
            log.warning(
                "%s/%s: consumer %s is dead; claimed %d of its entries",
                self.stage,
                self.name,
                dead,
                len(entries),
            )
            self._notify("on_claimed", self.stage, len(entries))
            await self._handle(await self._with_deliveries(stream, entries))
        return False

    async def _report_backlog(self) -> None:
        if not self.middleware:
            return
        now_ms = time.time_ns() // 1_000_000
        with translate(self._url, self.keys.stream, self.keys.group):
            st = await stream_status(  # a lower bound past 1,000: cheap every tick
                self.client, self.keys.stream, self.keys.group, now_ms=now_ms, lag_count_cap=1_000
            )
        self._notify("on_backlog", self.stage, st.pending, st.lag if st.group_exists else None)

    # ------------------------------------------------------------------- retries
    async def _run_due_retries(self) -> bool:
        now = time.monotonic()
        due = [r for r in self._retries.values() if r.at <= now]
        if not due:
            return False
        # one XCLAIM per stream; it adds a delivery (a deferred entry's last delivery
        # is in its recorded deferral count, so this one is spent only if it runs and
        # fails, or its consumer dies while running it)
        groups: dict[str, list[_Due]] = {}
        for r in due:
            groups.setdefault(r.msg.stream, []).append(r)
        for stream, rs in groups.items():
            # min idle: nobody else must have claimed it since (that resets idle)
            min_idle = max(0, min(r.delay_ms for r in rs) // 2)
            raw = await self._translated(
                self.client.xclaim(
                    stream,
                    self.keys.group,
                    self.name,
                    min_idle,
                    [r.msg.entry_id for r in rs],
                )
            )
            for r in rs:  # dropped only now: a claim lost to an outage is tried again
                del self._retries[(r.msg.stream, r.msg.entry_id)]
            claimed = dict(parse_entries(raw))
            fresh: list[Message[Any]] = [
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
                await self._handle(fresh)
        return True

    def _retry_delay_ms(self, msg: Message[Any], requested: int | None = None) -> int:
        if requested is not None:
            return requested
        base = self.settings.retry_base_ms * 2 ** max(0, msg.deliveries - 1)
        capped = min(self.settings.retry_max_ms, base)
        return int(capped / 2 + random.random() * capped / 2)  # equal jitter

    # ------------------------------------------------------------------ handling
    async def _handle(self, msgs: list[Message[Any]]) -> None:
        """Decode, run the handlers, then settle. Nothing one entry does escapes here:
        an undecodable entry is dead-lettered, a failing handler or middleware fails
        its entries (codec and middleware errors included)."""
        runnable: list[Message[Any]] = []
        outcome = _Outcome()
        for msg in msgs:
            try:
                msg.envelope = self.codec.decode(msg.fields)
            except Exception as exc:  # the codec raises MessageError; anything else too
                category = exc.category if isinstance(exc, MessageError) else "decode"
                error = str(exc) if isinstance(exc, MessageError) else _describe(exc)
                outcome.letters.append((msg, category, error))
                continue
            if msg.attempts > self.settings.max_deliveries:
                outcome.letters.append(
                    (
                        msg,
                        "max-deliveries",
                        f"delivered {msg.attempts} times (max_deliveries="
                        f"{self.settings.max_deliveries}); its consumers kept dying or timing out",
                    )
                )
                continue
            runnable.append(msg)
        if runnable:

            async def innermost(batch: Sequence[Message[Any]]) -> None:
                await self._invoke(list(batch), outcome)

            call: BatchCall = innermost
            for mw in reversed(self.middleware):
                call = partial(mw.around_batch, self.stage, call_next=call)
            try:
                await call(runnable)
            except BaseException as exc:  # a middleware failed: the rest of the batch failed
                if not isinstance(exc, Exception) and not _stray_cancel(exc):
                    raise
                handled = {id(m) for m in outcome.ok} | {id(m) for m, _ in outcome.failed}
                outcome.failed += [(m, exc) for m in runnable if id(m) not in handled]
        await self._settle(outcome)

    async def _invoke(self, msgs: list[Message[Any]], outcome: _Outcome) -> None:
        if self.batch_handler is not None:
            outcome.outbox = Outbox(self.codec)
            ctx = Context(self.stage, self.name, outcome.outbox)
            try:
                async with self._deadline():
                    failures = await self.batch_handler(msgs, ctx) or {}
            except BaseException as exc:
                if not isinstance(exc, Exception) and not _stray_cancel(exc):
                    raise
                outcome.outbox = None  # a failed batch publishes nothing
                outcome.failed += [(m, exc) for m in msgs]
                return
            for m in msgs:
                if m.entry_id in failures:
                    outcome.failed.append((m, failures[m.entry_id]))
                else:
                    outcome.ok.append(m)
            return

        handler = self.handler
        assert handler is not None
        outbox = Outbox(self.codec)
        outcome.outbox = outbox

        async def one(msg: Message[Any]) -> None:
            box = Outbox(self.codec)
            ctx = Context(self.stage, self.name, box)

            async def base(m: Message[Any]) -> None:
                async with self._deadline():
                    await handler(m, ctx)

            call: MessageCall = base
            for mw in reversed(self.middleware):
                call = partial(mw.around_message, self.stage, call_next=call)
            try:
                await call(msg)
            except BaseException as exc:
                if not isinstance(exc, Exception) and not _stray_cancel(exc):
                    raise
                if _is_deferral(exc):  # recorded now, not when the whole batch is done
                    self._deferral_log.note(msg, msg.deferrals + 1)
                outcome.failed.append((msg, exc))
                return
            outbox.extend(box)  # only successful handlers' output is published
            outcome.ok.append(msg)

        width = min(self.settings.concurrency, len(msgs))
        if width <= 1:
            for msg in msgs:
                await one(msg)
            return
        queue = iter(msgs)

        async def lane() -> None:
            for msg in queue:
                await one(msg)

        await asyncio.gather(*(lane() for _ in range(width)))

    async def _settle(self, outcome: _Outcome) -> None:
        """Publish and ack what succeeded, schedule or dead-letter what failed. What
        Redis could not take now is kept and finished first once it is back."""
        interrupted = 0
        for msg, exc in outcome.failed:
            if self._grace_over and isinstance(exc, TimeoutError):
                # cut short by shutdown: not the entry's fault, so not spent; left
                # pending and handed back
                interrupted += 1
                msg.deferred()
                outcome.deferred.append(msg)
                continue
            self._fail(msg, exc, outcome)
        if interrupted:
            log.warning(
                "%s/%s: shutdown grace over, %d handlers interrupted",
                self.stage,
                self.name,
                interrupted,
            )
        outcome.failed = []
        try:
            await self._finish(outcome)
        except Exception as exc:
            if not redis_down(exc):
                raise
            log.warning(
                "%s/%s: Redis unreachable while settling (%s); keeping %d handled and "
                "%d entries to dead-letter until it is back",
                self.stage,
                self.name,
                exc,
                len(outcome.ok),
                len(outcome.letters),
            )
            self._held.append(outcome)
            if self._outage_since is None:  # the next step that succeeds says it is back
                self._outage_since = time.monotonic()

    async def _finish(self, outcome: _Outcome) -> None:
        """Publish, ack, move dead letters; on an error the outcome holds what is left.

        A publish that fails for a reason other than Redis being unreachable fails its
        entries (they are retried as any failure); an outage propagates. Deferral
        counts go first: a deferred entry must not be retried or handed back before
        its count is in Redis."""
        if outcome.deferred:
            await self._deferral_log.settle(outcome.deferred)
            outcome.deferred = []
        if outcome.ok:
            if outcome.outbox is not None and len(outcome.outbox):
                try:
                    await outcome.outbox.flush(self.client, self._url)
                except Exception as exc:
                    if redis_down(exc):
                        raise
                    failed, outcome.ok, outcome.outbox = outcome.ok, [], None
                    for msg in failed:
                        self._fail(msg, exc, outcome)
            if outcome.ok:
                await self._ack(outcome.ok)
                outcome.ok = []
        while outcome.letters:
            msg, category, error = outcome.letters[0]
            await self._dead_letter(msg, category, error)
            outcome.letters.pop(0)

    async def _settle_held(self) -> bool:
        """Finish the work kept through an outage, oldest first; True once all is done."""
        while self._held:
            outcome = self._held[0]
            try:
                await self._finish(outcome)
            except RedisUnavailable:
                raise
            except Exception as exc:  # READONLY, OOM...: still an outage to wait out
                if redis_down(exc):
                    raise RedisUnavailable(redact(self._url), exc) from exc
                raise
            self._held.pop(0)
            log.warning("%s/%s: finished work kept through the outage", self.stage, self.name)
        return True

    async def _ack(self, msgs: Sequence[Message[Any]]) -> None:
        by_stream: dict[str, list[str]] = {}
        for m in msgs:
            by_stream.setdefault(m.stream, []).append(m.entry_id)
        deferred = {m.stream for m in msgs if m.deferrals}
        with translate(self._url, self.keys.stream, self.keys.group):
            if deferred:  # some were deferred before: ack and drop their counts at once
                for stream, ids in by_stream.items():
                    if stream in deferred:
                        await self._ack_forget(
                            keys=[stream, self.keys.deferrals], args=[self.keys.group, *ids]
                        )
                    else:
                        await self.client.xack(stream, self.keys.group, *ids)
            elif len(by_stream) == 1:
                ((stream, ids),) = by_stream.items()
                await self.client.xack(stream, self.keys.group, *ids)
            else:
                pipe = self.client.pipeline(transaction=False)
                for stream, ids in by_stream.items():
                    pipe.xack(stream, self.keys.group, *ids)
                await pipe.execute()
        self.handled += len(msgs)
        self._notify("on_acked", self.stage, len(msgs))

    def _fail(self, msg: Message[Any], exc: BaseException, outcome: _Outcome) -> None:
        """Schedule a failed entry's retry, or add the dead letter to move instead; a
        deferred entry goes to ``outcome.deferred`` (its count is written first)."""
        if _is_deferral(exc):
            # not a failure of the entry: the handler did not get to try, or could not
            # reach Redis. This delivery is recorded as a deferral: not spent.
            if isinstance(exc, Defer):
                delay_ms = self._retry_delay_ms(msg, exc.delay_ms)
            else:  # not sooner than a second: the handler's Redis may be down for long
                delay_ms = min(self.settings.retry_max_ms, max(1_000, self._retry_delay_ms(msg)))
            msg.deferred()
            outcome.deferred.append(msg)
            self._retries[(msg.stream, msg.entry_id)] = _Due(
                time.monotonic() + delay_ms / 1000, msg, delay_ms
            )
            self._notify("on_deferred", self.stage, msg, delay_ms, str(exc))
            return
        category = _category(exc)
        self._notify("on_failed", self.stage, msg, exc, category)
        error = _describe(exc)
        if isinstance(exc, Reject | MessageError):
            outcome.letters.append((msg, category, error))
            return
        if msg.attempts >= self.settings.max_deliveries:
            final = "timeout" if category == "timeout" else "max-deliveries"
            outcome.letters.append((msg, final, f"{error} (after {msg.attempts} deliveries)"))
            return
        delay_ms = self._retry_delay_ms(msg, exc.delay_ms if isinstance(exc, Retry) else None)
        due = _Due(time.monotonic() + delay_ms / 1000, msg, delay_ms)
        self._retries[(msg.stream, msg.entry_id)] = due
        self._notify("on_retry", self.stage, msg, delay_ms)

    async def _dead_letter(self, msg: Message[Any], category: str, error: str) -> None:
        moved = await self.dead_letters.move(
            stream=msg.stream,
            entry_id=msg.entry_id,
            consumer=self.name,
            category=category,
            error=error,
            attempts=msg.attempts,
            fields=msg.fields,
        )
        if moved:
            self._notify("on_dead_letter", self.stage, msg, category, error)

    # ------------------------------------------------------------------ shutdown
    async def _shutdown(self) -> None:
        """Finish kept work, hand back everything still pending for us, then delete our
        consumer."""
        try:
            await self._settle_held()
            await self._deferral_log.idle()
            handed = 0
            for stream in self.keys.streams():
                while True:
                    rows = await self._translated(
                        self.client.xpending_range(
                            stream,
                            self.keys.group,
                            min="-",
                            max="+",
                            count=500,
                            consumername=self.name,
                        )
                    )
                    if not rows:
                        break
                    for row in rows:
                        await self._translated(
                            self._hand_back(
                                keys=[stream, self.keys.deferrals],
                                args=[self.keys.group, self.name, row["message_id"]],
                            )
                        )
                        handed += 1
            self._retries.clear()
            for stream in self.keys.streams():
                await self._translated(
                    self._delete_consumer(
                        keys=[stream, self.keys.heartbeats], args=[self.keys.group, self.name]
                    )
                )
            if handed:
                log.warning(
                    "%s/%s: handed back %d unfinished entries", self.stage, self.name, handed
                )
        except Exception as exc:  # whatever Redis does, shutting down goes on
            log.error(
                "%s/%s: could not hand back pending entries (%s); another consumer will "
                "claim them after claim_idle_ms",
                self.stage,
                self.name,
                describe(exc),
            )

    def _notify(self, hook: str, *args: Any) -> None:
        for mw in self.middleware:
            try:
                getattr(mw, hook)(*args)
            except Exception:  # observers must never break consumption
                log.exception("middleware %s.%s failed", type(mw).__name__, hook)


def _step_name(step: Callable[..., Any]) -> str:
    func = step.func if isinstance(step, partial) else step
    return getattr(func, "__name__", repr(func))


def _message(stream: str, entry_id: str, fields: Any, times: int, deferrals: int) -> Message[Any]:
    """A message from Redis's delivery count and the recorded deferrals."""
    return Message(stream, entry_id, fields, max(1, times - deferrals), deferrals=deferrals)


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _id_key(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)

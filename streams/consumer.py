"""Consuming one stage shard through its consumer group.

One pass of the loop::

    start ─► ensure groups ─► re-read own pending (id 0) ─┐
        ┌─────────────────────────────────────────────────┘
        ▼
      gate closed? ── wait (a stage whose dependency is down reads nothing, so no
                      delivery is spent while it cannot work)
      claim tick? ── XAUTOCLAIM idle entries (following the cursor), drop dead consumers
      retries due? ── XCLAIM them back to ourselves (a delivery) and handle
      XREADGROUP priority+stream ">" COUNT n BLOCK ms ── handle the batch, and while
        │   it runs, read ahead: gate, then XREADGROUP without BLOCK (the next batch)
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
      work is published and acked; a read-ahead batch never handled is recorded as
      deferred (it spends nothing); whatever is still pending is handed back (re-add
      + ack, atomically) ─► delete our consumer

The parts call one way: sources return messages (the read here, the claims and
retries of :mod:`streams.claiming`), :mod:`streams.dispatch` runs the handlers and
returns an outcome (no Redis), and :mod:`streams.settle` acts on it. They share only
the retry schedule (:mod:`streams.retries`) and the hooks (:mod:`streams.hooks`).

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
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from functools import partial
from typing import Any

from streams.claiming import Batch, Claimer
from streams.connection import Client, ensure_group, refresh_topology
from streams.dispatch import BatchHandler, Context, Deadlines, Dispatcher, Handler
from streams.faults import classify, describe
from streams.hooks import Hooks
from streams.keys import StageKeys
from streams.message import Codec, Message
from streams.middleware import Middleware
from streams.parse import parse_read
from streams.parts import Shared
from streams.retries import RetrySchedule, backoff
from streams.settings import StreamSettings
from streams.settle import Settler

__all__ = ["BatchHandler", "Consumer", "Context", "Gate", "Handler"]

log = logging.getLogger("streams.consumer")

# Awaited before every read or claim; returns once the stage can work. It is
# cancelled when the consumer stops while waiting.
Gate = Callable[[], Awaitable[None]]


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
        self.middleware = tuple(middleware)
        self.stop_event = stop or asyncio.Event()
        self.gate = gate
        self.hooks = Hooks(self.stage, self.middleware)
        self.retries = RetrySchedule()
        shared = Shared(client, settings, keys, name, self.hooks, self.retries, self.stop_event)
        self.settler = Settler(shared)
        self.claimer = Claimer(shared)
        self.deadlines = Deadlines(settings.handler_timeout_ms)
        self.dispatcher = Dispatcher(
            settings,
            codec,
            stage=self.stage,
            consumer=name,
            handler=handler,
            batch_handler=batch_handler,
            middleware=self.middleware,
            deadlines=self.deadlines,
            deferring=self.settler.deferring,
            presume=self.settler.presume if settings.presume_waiting else None,
        )
        self.dead_letters = self.settler.dead_letters
        self._url = settings.redis_url
        self._streams: dict[Any, Any] = dict.fromkeys(keys.streams(), ">")
        self._in_hand: Batch = []  # read (ahead) and not handled yet
        self._ahead: asyncio.Task[Batch | None] | None = None  # the read-ahead: gate, then read
        self._lost_check = False  # after an outage: take back deliveries whose reply was lost
        self._outage_since: float | None = None
        self._failures = 0  # consecutive failed steps (backoff)
        self._last_failure = 0.0

    @property
    def handled(self) -> int:
        """Entries acked by this consumer (for tests and progress)."""
        return self.settler.handled

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
            while True:
                if self._ahead is not None:  # the read-ahead passed the gate for us
                    if not await self._with_recovery(self._collect_ahead):
                        continue  # stopped at the gate, or the read failed
                    if self.stop_event.is_set():
                        break  # what it read is handed back, spending nothing
                elif not await self._gate_open():
                    break
                if self.settler.held and not await self._with_recovery(self.settler.settle_held):
                    continue  # Redis still unreachable: nothing new until it is done
                if self._lost_check:
                    await self._with_recovery(self._recover_lost_deliveries)
                if time.monotonic() >= next_claim:
                    await self._with_recovery(self._claim_tick)
                    next_claim = time.monotonic() + self.settings.claim_interval_ms / 1000
                if self.retries.due(time.monotonic()):
                    await self._with_recovery(self._run_due_retries)
                    continue
                got = await self._with_recovery(partial(self._read_and_handle, burst))
                if not got and burst and not self.retries:
                    return
        finally:
            grace.cancel()  # waits on an event or sleeps: safe to cancel
            task = asyncio.current_task()
            given_up = task is not None and task.cancelling() > 0  # Redis silent at stop
            await self._end_read_ahead(given_up)
            if self.stop_event.is_set() and not given_up:
                await self._shutdown()

    async def _grace_timer(self) -> None:
        """Once stop is requested, give in-flight handlers shutdown_grace_ms, then time
        them out (their entries stay pending and are handed back)."""
        await self.stop_event.wait()
        await asyncio.sleep(self.settings.shutdown_grace_ms / 1000)
        self.deadlines.cut_short()

    async def _start(self) -> bool:
        for stream in self.keys.streams():
            await ensure_group(self.client, self._url, stream, self.keys.group)
        if await self._gate_open():
            await self._handle_all(self.claimer.own_pending())
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
            self.hooks.redis_error(verdict.kind, verdict.reason)
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
                    self.hooks.group_recreated(stream)
        except Exception as again:  # Redis went away meanwhile: the next step retries
            log.warning("%s/%s: recreating the group failed: %s", self.stage, self.name, again)
            await self._pause(self._backoff_s())
            return
        self.retries.clear()  # the pending list went with the group
        self._in_hand = []
        log.debug("recovered from %s", exc)

    def _backoff_s(self) -> float:
        """Exponential in the consecutive failures, 0.05 s .. 2 s, equal jitter."""
        return backoff(min(self._failures, 6), 0.05, 2.0)

    async def _pause(self, seconds: float) -> None:
        """Sleep, but wake up at once when stop is requested."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stop_event.wait(), seconds)

    # ------------------------------------------------------------------ handling
    async def _handle(self, msgs: Batch) -> None:
        """Dispatch a batch and settle its outcome."""
        outcome = await self.dispatcher.dispatch(msgs)
        if not await self.settler.settle(outcome) and self._outage_since is None:
            self._outage_since = time.monotonic()  # the next step that succeeds says it is back

    async def _handle_all(self, source: AsyncIterator[Batch]) -> None:
        async for batch in source:
            await self._handle(batch)

    # ------------------------------------------------------------------- reading
    async def _read(self, block_ms: int | None) -> Batch:
        raw = await (  # never cancelled: returns within block_ms
            self.client.xreadgroup(
                self.keys.group,
                self.name,
                self._streams,
                count=self.settings.batch_size,
                block=block_ms,
            )
        )
        if not raw:
            return []
        by_stream = parse_read(raw)
        if len(by_stream) == 1:
            ((stream, entries),) = by_stream.items()
            return [Message(stream, entry_id, fields, 1) for entry_id, fields in entries]
        return [
            Message(stream, entry_id, fields, 1)
            for stream in self.keys.streams()
            for entry_id, fields in by_stream.get(stream, ())
        ]

    async def _read_and_handle(self, burst: bool) -> bool:
        msgs, self._in_hand = self._in_hand, []
        if not msgs:
            block_ms: int | None = self.settings.block_ms
            due = self.retries.next_at()
            if due is not None:
                block_ms = max(1, min(self.settings.block_ms, int((due - time.monotonic()) * 1000)))
            elif burst:
                block_ms = None  # do not wait for new entries
            msgs = await self._read(block_ms)
        if not msgs:
            return False
        # read the next batch while this one is handled: the gate first, then a read
        # that does not block (an empty stream is waited for by the next pass's read)
        self._ahead = asyncio.create_task(self._read_ahead())
        await self._handle(msgs)
        return True

    async def _read_ahead(self) -> Batch | None:
        """The next batch (None: stopped at the gate)."""
        if not await self._gate_open():
            return None
        return await self._read(None)

    async def _collect_ahead(self) -> bool:
        """Take the read-ahead's batch in hand; False if it stopped at the gate."""
        task, self._ahead = self._ahead, None
        assert task is not None
        got = await task
        if got is None:
            return False
        self._in_hand = got
        return True

    async def _end_read_ahead(self, given_up: bool) -> None:
        """Finish the read-ahead (a read in flight is never cancelled: it does not
        block, so it returns at once); what it read stays in hand."""
        task, self._ahead = self._ahead, None
        if task is None:
            return
        if given_up:
            task.cancel()
            return
        await asyncio.wait({task})
        if not task.cancelled() and task.exception() is None and task.result():
            self._in_hand += task.result() or []

    # --------------------------------------------------------- claims and retries
    async def _claim_tick(self) -> None:
        await self._handle_all(self.claimer.claim_tick())

    async def _run_due_retries(self) -> None:
        await self._handle_all(self.claimer.due_retries(self.retries.due(time.monotonic())))

    async def _recover_lost_deliveries(self) -> None:
        self._lost_check = False
        in_hand = self.settler.in_hand() | {(m.stream, m.entry_id) for m in self._in_hand}
        await self._handle_all(self.claimer.lost_deliveries(in_hand))

    # ------------------------------------------------------------------ shutdown
    async def _shutdown(self) -> None:
        """Finish kept work, hand back everything still pending for us (a batch read
        ahead and never handled spends nothing), then delete our consumer."""
        try:
            await self.settler.settle_held()
            if self._in_hand:
                await self.settler.release(self._in_hand)
                self._in_hand = []
            handed = await self.settler.hand_back()
            for stream in self.keys.streams():
                await self.claimer.delete_consumer(
                    keys=[stream, self.keys.heartbeats], args=[self.keys.group, self.name]
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


def _step_name(step: Callable[..., Any]) -> str:
    func = step.func if isinstance(step, partial) else step
    return getattr(func, "__name__", repr(func))

"""Acting on an :class:`~streams.dispatch.Outcome`: the consumer's writes to Redis.

Deferral counts first (a deferred entry must not be retried or handed back before
its count is in Redis), then the outbox is published, the successes acked, the
dead letters moved; failures are sorted once (:func:`streams.retries.decide`) into
deferrals, retries and dead letters. What Redis could not take because it was
unreachable is *held* (same outbox, same message ids) and finished first once it is
back: an outage never spends a delivery.

At shutdown, :meth:`Settler.hand_back` re-adds whatever is still pending for the
consumer (atomically with its ack), its spent deliveries carried in ``attempt``;
:meth:`Settler.release` first records entries that were read but never handled as
deferred, so handing them back spends nothing.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from streams.connection import redact
from streams.deadletter import DeadLetters
from streams.dispatch import Outcome
from streams.errors import RedisUnavailable
from streams.faults import redis_down
from streams.message import Message
from streams.parts import Shared
from streams.retries import Key, category, decide, is_deferral
from streams.scripts import ACK_FORGET, HAND_BACK, RECORD_DEFERRALS, SET_DEFERRALS, Lua

log = logging.getLogger("streams.consumer")


class DeferralLog:
    """Writes deferral counts to Redis as handlers defer, so a consumer killed in the
    middle of a batch has recorded the deferrals before the kill: only the entries
    running, or read and not yet started, at that moment count a delivery. Group
    commit: one write in flight, the next carries whatever deferred meanwhile.
    :meth:`settle` makes sure a batch's counts are written (and raises if Redis
    cannot take them)."""

    def __init__(self, write: Callable[[list[tuple[Message[Any], int]]], Awaitable[None]]) -> None:
        self._write = write
        self._queue: dict[Key, tuple[Message[Any], int]] = {}
        self._written: dict[Key, int] = {}
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

    def forget(self, msgs: Sequence[Message[Any]]) -> None:
        for m in msgs:
            self._written.pop((m.stream, m.entry_id), None)

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


class Settler:
    def __init__(self, shared: Shared) -> None:
        client, settings, keys = shared.client, shared.settings, shared.keys
        self.client = client
        self.settings = settings
        self.keys = keys
        self.name = shared.name
        self.stage = shared.stage
        self.hooks = shared.hooks
        self.retries = shared.retries
        self.dead_letters = DeadLetters(client, keys, settings.redis_url)
        self._url = settings.redis_url
        self._hand_back = Lua(client, HAND_BACK)
        self._record_deferrals = Lua(client, RECORD_DEFERRALS)
        self._set_deferrals = Lua(client, SET_DEFERRALS)
        self._ack_forget = Lua(client, ACK_FORGET)
        self.deferral_log = DeferralLog(self._write_deferrals)
        self.held: list[Outcome] = []  # finished work kept through an outage
        self.handled = 0  # entries acked

    async def presume(self, msgs: Sequence[Message[Any]]) -> None:
        """Before a handler runs (``presume_waiting``): record each delivery as a
        deferral, so a consumer killed while handling spends nothing; a failure the
        handler returns spends it after all (:meth:`_fail`)."""
        for m in msgs:
            m.deferred()
            m.presumed = True
            self.deferral_log.note(m, m.deferrals)
        await self.deferral_log.idle()

    def deferring(self, msg: Message[Any]) -> None:
        """A handler deferred ``msg`` just now: record it while the batch runs on."""
        self.deferral_log.note(msg, msg.deferrals + 1)

    def in_hand(self) -> set[Key]:
        """Entries of held work (pending for us, known to us)."""
        return {(m.stream, m.entry_id) for o in self.held for m in o.messages()}

    async def settle(self, outcome: Outcome) -> bool:
        """Publish and ack what succeeded, schedule or dead-letter what failed. False
        if Redis could not take it now: the work is held (see :meth:`settle_held`)."""
        for msg in outcome.interrupted:
            # cut short by shutdown: not spent; left pending and handed back
            if not msg.presumed:
                msg.deferred()
            outcome.deferred.append(msg)
        outcome.interrupted = []
        for msg, exc in outcome.failed:
            self._fail(msg, exc, outcome)
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
            self.held.append(outcome)
            return False
        return True

    async def settle_held(self) -> bool:
        """Finish the work kept through an outage, oldest first; True once all is done."""
        while self.held:
            outcome = self.held[0]
            try:
                await self._finish(outcome)
            except RedisUnavailable:
                raise
            except Exception as exc:  # READONLY, OOM...: still an outage to wait out
                if redis_down(exc):
                    raise RedisUnavailable(redact(self._url), exc) from exc
                raise
            self.held.pop(0)
            log.warning("%s/%s: finished work kept through the outage", self.stage, self.name)
        return True

    async def _finish(self, outcome: Outcome) -> None:
        """Publish, ack, move dead letters; on an error the outcome holds what is left.

        A publish that fails for a reason other than Redis being unreachable fails its
        entries (they are retried as any failure); an outage propagates."""
        if outcome.deferred:
            await self.deferral_log.settle(outcome.deferred)
            outcome.deferred = []
        if outcome.spent:  # presumed deferrals that failed: their counts go back down
            await self._write_deferrals([(m, m.deferrals) for m in outcome.spent], exact=True)
            self.deferral_log.forget(outcome.spent)
            outcome.spent = []
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

    def _fail(self, msg: Message[Any], exc: BaseException, outcome: Outcome) -> None:
        """Schedule a failed entry's retry, or add the dead letter to move instead; a
        deferred entry goes to ``outcome.deferred`` (its count is written first)."""
        if msg.presumed and not is_deferral(exc):  # a real failure spends the delivery
            msg.spent()
            outcome.spent.append(msg)
        decision = decide(self.settings, msg, exc)
        if decision.action == "defer":
            # not a failure of the entry: the handler did not get to try, or could not
            # reach Redis. This delivery is recorded as a deferral: not spent.
            if not msg.presumed:
                msg.deferred()
            outcome.deferred.append(msg)
            self._schedule(msg, decision.delay_ms)
            self.hooks.deferred(msg, decision.delay_ms, str(exc))
            return
        self.hooks.failed(msg, exc, category(exc))
        if decision.action == "dead-letter":
            outcome.letters.append((msg, decision.category, decision.error))
            return
        self._schedule(msg, decision.delay_ms)
        self.hooks.retry(msg, decision.delay_ms)

    def _schedule(self, msg: Message[Any], delay_ms: int) -> None:
        self.retries.add(msg, time.monotonic() + delay_ms / 1000, delay_ms)

    async def _ack(self, msgs: Sequence[Message[Any]]) -> None:
        group = self.keys.group
        deferred = False
        by_stream: dict[str, list[str]] = {}
        for m in msgs:
            by_stream.setdefault(m.stream, []).append(m.entry_id)
            deferred = deferred or m.deferrals > 0
        if deferred:  # some were deferred before: ack and drop their counts at once
            streams = {m.stream for m in msgs if m.deferrals}
            for stream, ids in by_stream.items():
                if stream in streams:
                    await self._ack_forget(keys=[stream, self.keys.deferrals], args=[group, *ids])
                else:
                    await self.client.xack(stream, group, *ids)
        elif len(by_stream) == 1:
            ((stream, ids),) = by_stream.items()
            await self.client.xack(stream, group, *ids)
        else:
            pipe = self.client.pipeline(transaction=False)
            for stream, ids in by_stream.items():
                pipe.xack(stream, group, *ids)
            await pipe.execute()
        self.handled += len(msgs)
        self.hooks.acked(len(msgs))

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
            self.hooks.dead_letter(msg, category, error)

    async def _write_deferrals(
        self, batch: list[tuple[Message[Any], int]], *, exact: bool = False
    ) -> None:
        """Record counts (they only grow), or with ``exact`` set them as given."""
        by_stream: dict[str, list[Any]] = {}
        for msg, count in batch:
            by_stream.setdefault(msg.stream, []).extend((msg.entry_id, count))
        script = self._set_deferrals if exact else self._record_deferrals
        for stream, pairs in by_stream.items():
            await script(
                keys=[stream, self.keys.deferrals], args=[self.keys.group, self.name, *pairs]
            )

    # ------------------------------------------------------------------ shutdown
    async def release(self, msgs: Sequence[Message[Any]]) -> None:
        """Entries read but never handled (a read-ahead batch at stop): their delivery
        is recorded as a deferral, so handing them back spends nothing."""
        for m in msgs:
            m.deferred()
        await self.deferral_log.settle(msgs)

    async def hand_back(self) -> int:
        """Re-add everything still pending for this consumer (and ack it, atomically);
        how many entries were handed back."""
        await self.deferral_log.idle()
        handed = 0
        group = self.keys.group
        for stream in self.keys.streams():
            while True:
                rows = await self.client.xpending_range(
                    stream, group, min="-", max="+", count=500, consumername=self.name
                )
                if not rows:
                    break
                for row in rows:
                    await self._hand_back(
                        keys=[stream, self.keys.deferrals],
                        args=[group, self.name, row["message_id"]],
                    )
                    handed += 1
        self.retries.clear()
        return handed

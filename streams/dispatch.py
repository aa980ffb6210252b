"""Running the handlers on a batch, without Redis: messages in, an :class:`Outcome` out.

decode ─► middleware ``around_batch`` ─► handler (or batch handler, each message
through ``around_message``) under the handler timeout. Nothing one entry does
escapes: an undecodable entry, or one over ``max_deliveries``, becomes a dead
letter; a failing handler or middleware fails its entries. What to do with the
failures is decided by the settling (:mod:`streams.settle`), once.

The shutdown grace (:class:`Deadlines`) cuts the running handlers' timeouts short;
an entry whose handler was cut off so is ``interrupted``: not its fault, so not
spent.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from streams.errors import MessageError
from streams.message import Codec, Message
from streams.middleware import BatchCall, MessageCall, Middleware
from streams.producer import Outbox, Route
from streams.retries import describe, is_deferral
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


@dataclass
class Outcome:
    """What became of a batch; the settling acts on it."""

    ok: list[Message[Any]] = field(default_factory=list)
    failed: list[tuple[Message[Any], BaseException]] = field(default_factory=list)
    interrupted: list[Message[Any]] = field(default_factory=list)  # cut off by shutdown
    outbox: Outbox | None = None
    # dead letters to move: (message, category, error)
    letters: list[tuple[Message[Any], str, str]] = field(default_factory=list)
    # deferred entries whose deferral count must be in Redis before anything else
    deferred: list[Message[Any]] = field(default_factory=list)
    # presumed deferrals (presume_waiting) that failed: their counts to lower
    spent: list[Message[Any]] = field(default_factory=list)

    def messages(self) -> list[Message[Any]]:
        return [*self.ok, *(m for m, _ in self.failed), *self.interrupted, *self.deferred] + [
            m for m, _, _ in self.letters
        ]


def _stray_cancel(exc: BaseException) -> bool:
    """A CancelledError raised by handler code while nobody cancelled us: a failure of
    that entry, not a request to stop."""
    task = asyncio.current_task()
    return isinstance(exc, asyncio.CancelledError) and task is not None and not task.cancelling()


class Deadlines:
    """The handler timeout of every running handler, cut short once the shutdown
    grace is over."""

    def __init__(self, timeout_ms: int) -> None:
        self.timeout_s = timeout_ms / 1000
        self.grace_over = False
        self._running: set[asyncio.Timeout] = set()

    def cut_short(self) -> None:
        self.grace_over = True
        now = asyncio.get_running_loop().time()
        for deadline in list(self._running):
            deadline.reschedule(now)

    @contextlib.asynccontextmanager
    async def __call__(self) -> AsyncIterator[None]:
        async with asyncio.timeout(self.timeout_s) as deadline:
            if self.grace_over:
                deadline.reschedule(asyncio.get_running_loop().time())
            self._running.add(deadline)
            try:
                yield
            finally:
                self._running.discard(deadline)


class Dispatcher:
    """Runs one stage's handler on batches; knows nothing of Redis. ``deferring`` is
    told at once of each entry whose handler deferred (its count is recorded while
    the rest of the batch runs)."""

    def __init__(
        self,
        settings: StreamSettings,
        codec: Codec,
        *,
        stage: str,
        consumer: str,
        handler: Handler | None,
        batch_handler: BatchHandler | None,
        middleware: Sequence[Middleware],
        deadlines: Deadlines,
        deferring: Callable[[Message[Any]], None],
        presume: Callable[[Sequence[Message[Any]]], Awaitable[None]] | None = None,
    ) -> None:
        self.settings = settings
        self.codec = codec
        self.stage = stage
        self.consumer = consumer
        self.handler = handler
        self.batch_handler = batch_handler
        # only middleware that wrap anything take part in the call chain
        self._around_batch = [
            mw for mw in middleware if type(mw).around_batch is not Middleware.around_batch
        ]
        self._around_message = [
            mw for mw in middleware if type(mw).around_message is not Middleware.around_message
        ]
        self.deadlines = deadlines
        self.deferring = deferring
        self.presume = presume

    async def dispatch(self, msgs: Sequence[Message[Any]]) -> Outcome:
        outcome = Outcome()
        runnable: list[Message[Any]] = []
        decode = self.codec.decode
        max_deliveries = self.settings.max_deliveries
        for msg in msgs:
            try:
                msg.envelope = decode(msg.fields)
            except Exception as exc:  # the codec raises MessageError; anything else too
                category = exc.category if isinstance(exc, MessageError) else "decode"
                error = str(exc) if isinstance(exc, MessageError) else describe(exc)
                outcome.letters.append((msg, category, error))
                continue
            if msg.attempts > max_deliveries:
                outcome.letters.append(
                    (
                        msg,
                        "max-deliveries",
                        f"delivered {msg.attempts} times (max_deliveries="
                        f"{max_deliveries}); its consumers kept dying or timing out",
                    )
                )
                continue
            runnable.append(msg)
        if runnable and self.presume is not None:
            await self.presume(runnable)  # settings.presume_waiting: see Settler.presume
        if runnable:
            await self._run(runnable, outcome)
        if self.deadlines.grace_over:
            self._sort_interrupted(outcome)
        return outcome

    async def _run(self, runnable: list[Message[Any]], outcome: Outcome) -> None:
        async def innermost(batch: Sequence[Message[Any]]) -> None:
            await self._invoke(list(batch), outcome)

        call: BatchCall = innermost
        for mw in reversed(self._around_batch):
            call = partial(mw.around_batch, self.stage, call_next=call)
        try:
            await call(runnable)
        except BaseException as exc:  # a middleware failed: the rest of the batch failed
            if not isinstance(exc, Exception) and not _stray_cancel(exc):
                raise
            handled = {id(m) for m in outcome.ok} | {id(m) for m, _ in outcome.failed}
            outcome.failed += [(m, exc) for m in runnable if id(m) not in handled]

    def _sort_interrupted(self, outcome: Outcome) -> None:
        """Handlers timed out by the shutdown grace: not the entries' fault."""
        failed = outcome.failed
        outcome.failed = [(m, e) for m, e in failed if not isinstance(e, TimeoutError)]
        outcome.interrupted = [m for m, e in failed if isinstance(e, TimeoutError)]
        if outcome.interrupted:
            log.warning(
                "%s/%s: shutdown grace over, %d handlers interrupted",
                self.stage,
                self.consumer,
                len(outcome.interrupted),
            )

    async def _invoke(self, msgs: list[Message[Any]], outcome: Outcome) -> None:
        if self.batch_handler is not None:
            outcome.outbox = Outbox(self.codec)
            ctx = Context(self.stage, self.consumer, outcome.outbox)
            try:
                async with self.deadlines():
                    failures = await self.batch_handler(msgs, ctx) or {}
            except BaseException as exc:
                if not isinstance(exc, Exception) and not _stray_cancel(exc):
                    raise
                outcome.outbox = None  # a failed batch publishes nothing
                outcome.failed += [(m, exc) for m in msgs]
                return
            if not failures:
                outcome.ok += msgs
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
            ctx = Context(self.stage, self.consumer, box)

            async def base(m: Message[Any]) -> None:
                async with self.deadlines():
                    await handler(m, ctx)

            call: MessageCall = base
            for mw in reversed(self._around_message):
                call = partial(mw.around_message, self.stage, call_next=call)
            try:
                await call(msg)
            except BaseException as exc:
                if not isinstance(exc, Exception) and not _stray_cancel(exc):
                    raise
                if is_deferral(exc) and not msg.presumed:  # recorded now, not at the end
                    self.deferring(msg)
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

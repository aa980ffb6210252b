"""notify: GeofenceEvents -> signed POSTs to every matching webhook subscription.

Each (event, subscription) is a delivery row in the database: ``pending`` until the
endpoint answers 2xx (``delivered``) or it gives up (``dead``). The stream entry stays
pending until every one of its deliveries is settled; a dead one then dead-letters the
entry (``Reject``, with each endpoint's last status and body excerpt), and ``dlq
redrive`` starts the dead deliveries over (a delivered one is never sent again). A
410 Gone ends only its own subscription's delivery and disables that subscription
(with the reason, in ``webhook list``): nothing is dead-lettered for it.

**A batch at a time.** The handler takes a read's entries together: one transaction
plans all their deliveries (:func:`schemas.webhook_store.plan_batch`: rows, leases,
the order check), the attempts run concurrently over keep-alive connections, and the
attempts that end together are recorded in one transaction (:class:`_Recorder`). An
exit whose enter was delivered in the same pass is planned again at once.

**Nothing waits in the handler.** It waits at most ``notify_inline_wait_s`` for its
attempts; one still running (a slow endpoint), a backoff, a ``Retry-After`` pause, an
open circuit or a far rate slot make the entry ``Defer(delay)``, and the delay is the
time the wait ends: the backoff's end, the pause's or the circuit's, or the entry's
place in its endpoint's queue of rate slots (:attr:`_Origin.tail`). Until then a
redelivered entry is answered from memory, without a database query, so a backlog
behind a rate limit costs nothing while it waits; the rows are still looked at every
``notify_order_wait_s / 4`` (the order rule's sign of life).

**The endpoint is the URL's origin** (:mod:`processors.endpoints`): one rate limit,
circuit breaker and ``Retry-After`` pause in Redis for all subscriptions to it and all
workers; at most ``notify_endpoint_concurrency`` requests at once per origin and
worker. A high-priority subscription (``priority`` 1) queues for its endpoint's slots
in its own lane, ahead of the normal deliveries waiting there.

**Order per tracker and endpoint** (see :mod:`schemas.webhook_store`): a delivery
waits while any earlier event of its tracker that the subscription receives is still
owed to it, in the order (observed_at, geofence id, kind).

Database errors are not caught here: :meth:`processors.database.Database.run`
classifies them (an outage or a lost conflict defers the entry without spending a
delivery; anything else is a real failure, retried and dead-lettered in the end).

Exactly once, as far as HTTP allows: a delivery is marked delivered after its 2xx; a
worker killed between the two leaves it pending, and it is sent again with the same
``webhook-id`` (the event's natural key), by which the receiver drops the repeat.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import httpx
from prometheus_client import CollectorRegistry, Counter, Histogram

from processors import webhooks
from processors.config import AppSettings
from processors.database import Database
from processors.endpoints import Admission, EndpointGate
from processors.ssrf import Refused, Resolver
from schemas import webhook_store
from schemas.notify import GeofenceEvent
from schemas.secretbox import SecretBox
from schemas.webhook_store import Item, Plan, Result, Subscription
from streams.consumer import Context
from streams.errors import Defer, RateLimited, Reject
from streams.message import Message

log = logging.getLogger("trackstream.notify")

SUBSCRIPTIONS_TTL_S = 1.0
GATE_CALLS = 16  # endpoint gate calls at once (each takes a Redis connection)
ROUNDS = 3  # passes over one read's entries (an exit after its enter, in one call)
Key = tuple[str, int]  # (event id, subscription id)


class NotifyMetrics:
    """``trackstream_webhook_*`` per subscription (the endpoint's id, not its URL)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        labels = ("subscription",)
        self.delivered = Counter(
            "trackstream_webhook_deliveries", "Events delivered (2xx)", labels, registry=registry
        )
        self.failures = Counter(
            "trackstream_webhook_failures",
            "Failed attempts (kind: retry, dead)",
            (*labels, "kind"),
            registry=registry,
        )
        self.latency = Histogram(
            "trackstream_webhook_latency_seconds",
            "Time from request to response of one attempt",
            labels,
            registry=registry,
        )


@dataclass
class _Origin:
    """This process's side of one endpoint: its gate, its request slots, its queues."""

    gate: EndpointGate
    sem: asyncio.Semaphore
    interval_s: float
    tail: float = 0.0  # monotonic time the last queued normal delivery is due
    tail_high: float = 0.0  # the same for high-priority deliveries

    def queue(self, wait_s: float, high: bool) -> float:
        """A place in the queue for a rate slot ``wait_s`` away; returns the delay."""
        now = time.monotonic()
        if high:
            due = self.tail_high = max(self.tail_high, now + wait_s) + self.interval_s
        else:
            due = self.tail = max(self.tail, now + wait_s) + self.interval_s
        return due - now - self.interval_s


@dataclass
class _Sent:
    """One request's outcome for each delivery it carried."""

    outcome: dict[Key, str] = field(default_factory=dict)  # delivered | retry | dead
    retry_in_s: dict[Key, float] = field(default_factory=dict)
    dead: dict[Key, str] = field(default_factory=dict)  # reasons, of those to letter


@dataclass
class _Entry:
    msg: Message[GeofenceEvent]
    subs: list[Subscription]
    waits: list[float] = field(default_factory=list)
    running: int = 0
    letters: dict[Key, str] = field(default_factory=dict)
    order_waits: int = 0

    @property
    def event(self) -> GeofenceEvent:
        return self.msg.payload


class _Recorder:
    """Records attempts in as few transactions as they allow: those that end while a
    record is being written go together into the next one."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self._queue: list[tuple[Result, asyncio.Future[None]]] = []
        self._task: asyncio.Task[None] | None = None

    async def record(self, results: Sequence[Result]) -> None:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        self._queue += [(r, fut) for r in results[:-1]]
        self._queue.append((results[-1], fut))
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._flush())
        await asyncio.shield(fut)

    async def _flush(self) -> None:
        while self._queue:
            batch, self._queue = self._queue, []
            try:
                await self.db.run(webhook_store.record_batch, [r for r, _ in batch], now=_now())
            except Exception as exc:
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(exc)
            else:
                for _, fut in batch:
                    if not fut.done():
                        fut.set_result(None)


class NotifyStage:
    batch_size = 100  # entries per read unless TRACKSTREAM_BATCH_SIZE is set
    # mostly waiting (rate slots, order, backoff): a worker dying while the handler runs
    # spends no delivery; the attempts are bounded by notify_max_attempts
    presume_waiting = True

    def __init__(
        self,
        db: Database,
        app: AppSettings,
        gate_for: Callable[[str], EndpointGate],
        registry: CollectorRegistry,
        box: SecretBox,
        http: httpx.AsyncClient | None = None,
        *,
        max_defer_s: float = 20.0,
        resolver: Resolver | None = None,
    ) -> None:
        self.db = db
        self.app = app
        self.box = box
        # an entry deferred longer than claim_idle_ms would be claimed by some
        # consumer: come back well before that
        self.max_defer_s = max_defer_s
        self.touch_s = app.notify_order_wait_s / 4
        self._gate_for = gate_for
        self.http = http or httpx.AsyncClient(
            timeout=httpx.Timeout(app.notify_timeout_s),
            follow_redirects=False,
            limits=httpx.Limits(max_connections=200, max_keepalive_connections=100),
        )
        self.resolver = resolver or Resolver()
        self.metrics = NotifyMetrics(registry)
        self.recorder = _Recorder(db)
        self._origins: dict[str, _Origin] = {}
        self._tasks: dict[Key, asyncio.Task[_Sent | None]] = {}
        self._not_before: dict[Key, float] = {}  # monotonic: no need to look before
        self._looked: dict[Key, float] = {}  # monotonic: last plan of the row
        self._subs: list[Subscription] = []
        self._subs_at = -1e9
        self._owner = ""
        self._going: set[Key] = set()  # this pass's deliveries planned to go
        self.lease_s = app.notify_timeout_s + app.notify_max_rate_wait_s + 5

    async def subscriptions(self) -> list[Subscription]:
        if time.monotonic() - self._subs_at > SUBSCRIPTIONS_TTL_S:
            self._subs = await self.db.run(webhook_store.active_subscriptions, self.box)
            self._subs_at = time.monotonic()
        return self._subs

    def _origin(self, sub: Subscription) -> _Origin:
        o = self._origins.get(sub.origin)
        if o is None:
            gate = self._gate_for(sub.origin)
            o = self._origins[sub.origin] = _Origin(
                gate,
                asyncio.Semaphore(self.app.notify_endpoint_concurrency),
                1 / gate.limiter.rate_per_s,
            )
        return o

    # -- the handler

    async def handle_batch(
        self, msgs: Sequence[Message[GeofenceEvent]], ctx: Context
    ) -> Mapping[str, BaseException]:
        self._owner = ctx.consumer
        known = await self.subscriptions()
        entries = []
        for m in msgs:
            ev = m.payload
            subs = [s for s in known if s.matches(ev.tracker_id, ev.geofence_id, ev.kind)]
            if subs:
                entries.append(_Entry(m, subs))
        todo = entries
        for round_ in range(ROUNDS):
            delivered = await self._pass(todo, ctx.consumer)
            # an entry held only by the order of a delivery this pass settled: again
            todo = [
                e
                for e in todo
                if e.order_waits
                and not e.running
                and any((s.id, e.event.tracker_id) in delivered for s in e.subs)
            ]
            if not todo or round_ == ROUNDS - 1:
                break
            for e in todo:
                e.waits, e.order_waits = [], 0
        failures: dict[str, BaseException] = {}
        letters: list[tuple[_Entry, list[Key]]] = []
        for e in entries:
            if e.running or e.waits:
                poll_s = self.app.notify_poll_s
                delay_s = min([*e.waits, poll_s] if e.running else e.waits)
                delay_s = max(0.001, min(delay_s, self.max_defer_s))
                failures[e.msg.entry_id] = Defer(
                    "webhook deliveries pending", max(1, int(delay_s * 1000))
                )
            elif e.letters:
                letters.append((e, list(e.letters)))
                failures[e.msg.entry_id] = Reject(
                    "webhook delivery failed: " + "; ".join(e.letters.values())
                )
            if e.letters or e.msg.entry_id not in failures:  # done with it
                for s in e.subs:
                    self._forget((e.event.event_id, s.id))
        if letters:
            await self.db.run(_mark_lettered, letters, _now())
        return failures

    def _forget(self, key: Key) -> None:
        self._not_before.pop(key, None)
        self._looked.pop(key, None)

    async def _pass(self, entries: list[_Entry], owner: str) -> set[tuple[int, str]]:
        """Plan and start what may go now; returns the (subscription, tracker) pairs
        with a delivery settled in this pass."""
        now = time.monotonic()
        plan_items = []
        for e in entries:
            due = []
            for s in e.subs:
                key = (e.event.event_id, s.id)
                task = self._tasks.get(key)
                if task is not None and not task.done():
                    e.running += 1
                    continue
                nb = self._not_before.get(key, 0.0)
                if nb > now and now - self._looked.get(key, 0.0) < self.touch_s:
                    e.waits.append(nb - now)  # still waiting, known from memory
                    continue
                due.append(s)
            if due:
                plan_items.append((e, due))
        if not plan_items:
            return set()
        items = [
            Item(e.event, due, e.msg.envelope.msg_id if e.msg.envelope else "", _ms(e.msg))
            for e, due in plan_items
        ]
        plans: dict[Key, Plan] = await self.db.run(
            webhook_store.plan_batch,
            items,
            _now(),
            owner=owner,
            lease_s=self.lease_s,
            order_wait_s=self.app.notify_order_wait_s,
        )
        started: list[tuple[_Entry, Key, asyncio.Task[_Sent | None]]] = []
        go: list[tuple[_Entry, Subscription, Plan]] = []
        for e, due in plan_items:
            for s in due:
                key = (e.event.event_id, s.id)
                self._looked[key] = now
                plan = plans[key]
                if plan.action == "dead":
                    if plan.letter:
                        e.letters[key] = f"subscription {s.id} ({s.shown_url}): {plan.reason}"
                elif plan.action == "wait":
                    if plan.reason == "order":
                        e.order_waits += 1
                        wait_s = self._order_wait_s(s)
                    else:
                        wait_s = plan.wait_s
                    self._not_before[key] = now + wait_s
                    e.waits.append(wait_s)
                elif plan.action == "go":
                    go.append((e, s, plan))
        self._going = {(e.event.event_id, s.id) for e, s, _ in go}
        gate_calls = asyncio.Semaphore(GATE_CALLS)  # within the Redis pool

        async def start(e: _Entry, s: Subscription, p: Plan) -> Any:
            async with gate_calls:
                return await self._start(e.event, s, p.attempt)

        starts = await asyncio.gather(*(start(e, s, p) for e, s, p in go))
        for (e, s, _), wait in zip(go, starts, strict=True):
            key = (e.event.event_id, s.id)
            if isinstance(wait, asyncio.Task):
                started.append((e, key, wait))
            else:
                self._not_before[key] = time.monotonic() + wait
                e.waits.append(wait)
        settled: set[tuple[int, str]] = set()
        if started:
            await asyncio.wait([t for _, _, t in started], timeout=self.app.notify_inline_wait_s)
        for e, key, task in started:
            if not task.done():
                e.running += 1
                continue
            sent = task.result() if not task.cancelled() and task.exception() is None else None
            if sent is None or key not in sent.outcome:  # not recorded: look again soon
                e.waits.append(self.app.notify_poll_s)
                continue
            outcome = sent.outcome[key]
            if outcome == "retry":
                wait_s = sent.retry_in_s[key]
                self._not_before[key] = time.monotonic() + wait_s
                e.waits.append(wait_s)
                continue
            settled.add((key[1], e.event.tracker_id))
            if key in sent.dead:
                e.letters[key] = sent.dead[key]
        return settled

    def _order_wait_s(self, sub: Subscription) -> float:
        """How long a delivery waiting for its predecessor waits: until its endpoint's
        queue of rate slots drains when there is one, a moment otherwise."""
        o = self._origin(sub)
        queued_s = (o.tail_high if sub.priority else o.tail) - time.monotonic()
        return max(self.app.notify_poll_s, min(queued_s, self.max_defer_s))

    async def _start(
        self, event: GeofenceEvent, sub: Subscription, attempt: int
    ) -> asyncio.Task[_Sent | None] | float:
        """Start an attempt, or say how long to wait before trying to."""
        o = self._origin(sub)
        admission = await o.gate.admit()
        if admission.wait_s > 0:
            return admission.wait_s
        try:
            slot_in_s = await o.gate.reserve()
        except RateLimited as exc:
            if admission.trial:  # give the trial back: nothing was sent
                await o.gate.record(True, Admission(0, True, 1), None)
            return o.queue(exc.retry_after_s, bool(sub.priority))
        batch = [(event, attempt)]
        if sub.batch_max > 1:
            batch += await self.db.run(
                webhook_store.take_more,
                sub,
                event,
                sub.batch_max - 1,
                _now(),
                owner=self._owner,
                lease_s=self.lease_s,
                order_wait_s=self.app.notify_order_wait_s,
                busy=sorted(
                    k[0]
                    for k in {*self._going, *self._tasks}
                    if k[1] == sub.id and k[0] != event.event_id
                ),
            )
        task = asyncio.create_task(self._deliver(batch, sub, o, admission, slot_in_s))
        for ev, _ in batch:
            key = (ev.event_id, sub.id)
            self._tasks[key] = task
            self._not_before.pop(key, None)
        task.add_done_callback(_retrieve)
        task.add_done_callback(
            lambda t: self._finished(t, [(e.event_id, sub.id) for e, _ in batch])
        )
        return task

    def _finished(self, task: asyncio.Task[Any], keys: list[Key]) -> None:
        for key in keys:
            if self._tasks.get(key) is task:
                del self._tasks[key]

    async def _deliver(
        self,
        batch: list[tuple[GeofenceEvent, int]],
        sub: Subscription,
        o: _Origin,
        admission: Admission,
        slot_in_s: float,
    ) -> _Sent | None:
        """One request, recorded; None if it could not be recorded."""
        events = [e for e, _ in batch]
        async with o.sem:
            if slot_in_s > 0:
                await asyncio.sleep(slot_in_s)  # our reserved rate slot
            try:
                target = await self.resolver.target(
                    sub.url, allow_private=sub.allow_private, allow_http=sub.allow_http
                )
            except Refused as exc:
                answer = webhooks.Answer("permanent", None, 0.0, f"refused: {exc}")
            except OSError as exc:
                answer = webhooks.Answer("retry", None, 0.0, str(exc))
            else:
                answer = await webhooks.attempt(self.http, sub.url, sub.secret, events, target)
        await o.gate.record(answer.outcome != "retry", admission, answer.retry_after_s)
        label = str(sub.id)
        self.metrics.latency.labels(label).observe(answer.latency_ms / 1000)
        sent = _Sent()
        results = []
        for event, attempt in batch:
            key = (event.event_id, sub.id)
            outcome, retry_in_s = self._settle(answer, attempt)
            if outcome == "delivered":
                self.metrics.delivered.labels(label).inc()
            else:
                self.metrics.failures.labels(label, outcome).inc()
            if outcome != "delivered" or log.isEnabledFor(logging.DEBUG):
                log.log(
                    logging.WARNING if outcome == "dead" else logging.INFO,
                    "webhook %s -> subscription %d (%s) attempt %d: %s (%s)",
                    event.event_id,
                    sub.id,
                    sub.shown_url,
                    attempt,
                    outcome,
                    answer.error or answer.status,
                )
            results.append(
                Result(
                    event.event_id,
                    sub.id,
                    attempt,
                    answer.status,
                    answer.latency_ms,
                    answer.error,
                    outcome,
                    retry_in_s,
                )
            )
            sent.outcome[key] = outcome
            sent.retry_in_s[key] = retry_in_s
            if answer.status == 410:
                self._subs_at = -1e9  # disabled: read the subscriptions again
            if outcome == "dead" and answer.status != 410:
                status = f"HTTP {answer.status}" if answer.status is not None else "no response"
                why = f"{status} after {attempt} attempts: {answer.error or ''}".strip()
                sent.dead[key] = f"subscription {sub.id} ({sub.shown_url}): {why}"
        try:
            await self.recorder.record(results)
        except Exception:  # the lease runs out and the delivery is tried again
            log.exception("could not record webhook attempts for subscription %d", sub.id)
            return None
        return sent

    def _settle(self, answer: webhooks.Answer, attempt: int) -> tuple[Any, float]:
        if answer.outcome == "delivered":
            return "delivered", 0.0
        if answer.outcome == "permanent" or attempt >= self.app.notify_max_attempts:
            return "dead", 0.0
        delay_s = webhooks.backoff_s(
            attempt, self.app.notify_retry_base_s, self.app.notify_retry_max_s
        )
        if answer.retry_after_s is not None:
            delay_s = max(delay_s, min(answer.retry_after_s, 3600.0))
        return "retry", delay_s

    async def aclose(self, grace_s: float = 5.0) -> None:
        """Let attempts in flight finish (up to ``grace_s``), then close the client."""
        tasks = {t for t in self._tasks.values() if not t.done()}
        if tasks:
            _, late = await asyncio.wait(tasks, timeout=grace_s)
            for t in late:
                t.cancel()
            for t in late:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await t
        await self.http.aclose()


def _mark_lettered(session: Any, letters: list[tuple[_Entry, list[Key]]], now: datetime) -> None:
    for e, keys in letters:
        msg_id = e.msg.envelope.msg_id if e.msg.envelope else ""
        webhook_store.mark_lettered(session, keys, msg_id, now)


def _ms(msg: Message[Any]) -> int:
    return int(msg.entry_id.partition("-")[0])


def _now() -> datetime:
    """Wall-clock time: retries and leases are real time, whatever the pipeline's clock."""
    return datetime.now(UTC)


def _retrieve(task: asyncio.Task[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("webhook attempt failed", exc_info=task.exception())

"""notify: GeofenceEvent -> a signed POST to every matching webhook subscription.

Each (event, subscription) is a delivery row in the database: ``pending`` until the
endpoint answers 2xx (``delivered``) or it gives up (``dead``). The stream entry stays
pending until every one of its deliveries is settled; a dead one then dead-letters the
entry (``Reject``, with each endpoint's last status and body excerpt), and ``dlq
redrive`` starts the dead deliveries over (a delivered one is never sent again).

**Nothing waits in the handler.** An attempt runs as a task of the stage; the handler
starts it, waits at most ``notify_inline_wait_s`` for it, and otherwise returns
``Defer(poll)``: the entry comes back to this consumer a moment later and the handler
looks again. Backoff, Retry-After, an open circuit, a full endpoint, a far rate slot
all become ``Defer(delay)`` too. So a slow or failing endpoint holds only its own
deliveries, never the consumer loop or the other endpoints. Per endpoint (subscription)
and process: at most ``notify_endpoint_concurrency`` attempts at once and a circuit
breaker; across all notify workers: a rate limit in Redis (``SharedRateLimiter``).

**Order per tracker and endpoint.** Before an attempt, the delivery's predecessor is
looked up: the tracker's latest earlier event that this subscription receives, read
from ``geofence_events`` (the geofence stage writes it before it publishes, so the
predecessor is known even when its notification is still on its way, retried, or on
another worker). While that predecessor's delivery to this subscription is pending, or
not created yet, the delivery waits. So an exit is sent only after the enter before it
was answered 2xx (or dead-lettered, which releases its successors), whichever worker
holds either and however often they are retried. A predecessor older than the
subscription, or whose notification is overdue by ``notify_order_wait_s`` (lost
upstream), does not hold it. Redelivered duplicates cannot overtake: a delivery row
is leased (``lease_until``) by the worker attempting it.

The database unreachable or locked (``OperationalError``) defers the entry without
spending a delivery, so an outage does not dead-letter notifications.

Exactly once, as far as HTTP allows: a delivery is marked delivered after its 2xx; a
worker killed between the two leaves it pending, and it is sent again with the same
``webhook-id`` (the event's natural key), by which the receiver drops the repeat.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import httpx
from prometheus_client import CollectorRegistry, Counter, Histogram
from sqlalchemy.exc import OperationalError

from processors import webhooks
from processors.config import AppSettings
from processors.database import Database
from processors.resilience import CircuitBreaker, CircuitOpen
from schemas import webhook_store
from schemas.notify import GeofenceEvent
from schemas.webhook_store import Plan, Subscription
from streams.consumer import Context
from streams.errors import Defer, RateLimited, Reject
from streams.message import Message
from streams.ratelimit import SharedRateLimiter

log = logging.getLogger("trackstream.notify")

SUBSCRIPTIONS_TTL_S = 1.0
DB_RETRY_MS = 2_000


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
class _Endpoint:
    breaker: CircuitBreaker
    limiter: SharedRateLimiter
    in_flight: int = 0


@dataclass
class _Pass:
    """What one look at an entry's deliveries found."""

    started: list[asyncio.Task[Any]] = field(default_factory=list)
    waits: list[float] = field(default_factory=list)
    running: int = 0
    dead: list[str] = field(default_factory=list)


class NotifyStage:
    def __init__(
        self,
        db: Database,
        app: AppSettings,
        limiter_for: Callable[[int], SharedRateLimiter],
        registry: CollectorRegistry,
        http: httpx.AsyncClient | None = None,
        *,
        max_defer_s: float = 20.0,
    ) -> None:
        self.db = db
        self.app = app
        # an entry deferred longer than claim_idle_ms would be claimed (a delivery
        # spent) by some consumer: look again well before that
        self.max_defer_s = max_defer_s
        self._limiter_for = limiter_for
        self.http = http or httpx.AsyncClient(
            timeout=httpx.Timeout(app.notify_timeout_s),
            follow_redirects=False,
            limits=httpx.Limits(max_connections=200, max_keepalive_connections=50),
        )
        self.metrics = NotifyMetrics(registry)
        self._endpoints: dict[int, _Endpoint] = {}
        self._tasks: dict[tuple[str, int], asyncio.Task[Any]] = {}
        self._busy: set[tuple[str, int]] = set()  # (event, subscription) starting or running
        self._subs: list[Subscription] = []
        self._subs_at = -1e9
        self.lease_s = app.notify_timeout_s + app.notify_max_rate_wait_s + 5

    async def subscriptions(self) -> list[Subscription]:
        if time.monotonic() - self._subs_at > SUBSCRIPTIONS_TTL_S:
            self._subs = await self.db.run(webhook_store.active_subscriptions)
            self._subs_at = time.monotonic()
        return self._subs

    def _endpoint(self, sub: Subscription) -> _Endpoint:
        ep = self._endpoints.get(sub.id)
        if ep is None:
            breaker = CircuitBreaker(
                self.app.notify_breaker_failures,
                self.app.notify_breaker_reset_s,
                name=f"webhook-{sub.id}",
            )
            ep = self._endpoints[sub.id] = _Endpoint(breaker, self._limiter_for(sub.id))
        return ep

    async def handle(self, msg: Message[GeofenceEvent], ctx: Context) -> None:
        event = msg.payload
        try:
            known = await self.subscriptions()
        except OperationalError as exc:
            raise Defer(f"database: {type(exc.orig).__name__}", DB_RETRY_MS) from exc
        subs = [s for s in known if s.matches(event.tracker_id, event.geofence_id, event.kind)]
        if not subs:
            return
        entry_ms = int(msg.entry_id.partition("-")[0])
        for round_ in range(2):
            try:
                look = await self._look(event, subs, ctx.consumer, entry_ms)
            except OperationalError as exc:  # database down or locked: no delivery spent
                raise Defer(f"database: {type(exc.orig).__name__}", DB_RETRY_MS) from exc
            if look.started and round_ == 0:
                await asyncio.wait(look.started, timeout=self.app.notify_inline_wait_s)
                if (settled := _settled(look)) is not None:
                    look = settled  # all answered and recorded: no need to look again
                    break
                continue  # look again: a fast endpoint has answered by now
            break
        if not (look.started or look.running or look.waits):
            if look.dead:
                raise Reject("webhook delivery failed: " + "; ".join(look.dead))
            return
        poll_s = self.app.notify_poll_s
        delay_s = min([*look.waits, poll_s] if look.running or look.started else look.waits)
        delay_s = min(delay_s, self.max_defer_s)
        raise Defer("webhook deliveries pending", max(1, int(delay_s * 1000)))

    async def _look(
        self, event: GeofenceEvent, subs: list[Subscription], owner: str, entry_ms: int
    ) -> _Pass:
        look = _Pass()
        todo = []
        for s in subs:
            if (event.event_id, s.id) in self._busy:  # an attempt of ours is under way
                look.running += 1
            else:
                todo.append(s)
        plans: dict[int, Plan] = await self.db.run(
            webhook_store.plan_attempts,
            event,
            todo,
            _now(),
            owner=owner,
            lease_s=self.lease_s,
            entry_ms=entry_ms,
            order_wait_s=self.app.notify_order_wait_s,
            order_poll_s=self.app.notify_poll_s,
        )
        for s in todo:
            plan = plans[s.id]
            if plan.action == "dead":
                look.dead.append(f"subscription {s.id} ({_host(s.url)}): {plan.reason}")
            elif plan.action == "wait":
                look.waits.append(plan.wait_s)
            elif plan.action == "go":
                key = (event.event_id, s.id)
                if key in self._busy:  # a duplicate entry of this event got there first
                    look.running += 1
                    continue
                self._busy.add(key)
                wait: asyncio.Task[Any] | float = 0.0
                try:
                    wait = await self._start(event, s, plan.attempt)
                finally:
                    if not isinstance(wait, asyncio.Task):
                        self._busy.discard(key)
                if isinstance(wait, asyncio.Task):
                    look.started.append(wait)
                else:
                    look.waits.append(wait)
        return look

    async def _start(
        self, event: GeofenceEvent, sub: Subscription, attempt: int
    ) -> asyncio.Task[Any] | float:
        """Start an attempt, or say how long to wait before trying to."""
        ep = self._endpoint(sub)
        if (blocked := ep.breaker.blocked_for_s(self.app.notify_poll_s)) > 0:
            return blocked
        if ep.in_flight >= self.app.notify_endpoint_concurrency:
            return self.app.notify_poll_s
        try:
            slot_in_s = await ep.limiter.reserve()
        except RateLimited as exc:
            return exc.retry_after_s
        try:
            token = ep.breaker.admit()
        except CircuitOpen as exc:
            return exc.retry_after_s
        ep.in_flight += 1
        task = asyncio.create_task(self._deliver(event, sub, ep, attempt, token, slot_in_s))
        key = (event.event_id, sub.id)
        self._tasks[key] = task
        task.add_done_callback(_retrieve)
        task.add_done_callback(lambda _t: self._finished(key))
        return task

    def _finished(self, key: tuple[str, int]) -> None:
        self._busy.discard(key)
        self._tasks.pop(key, None)

    async def _deliver(
        self,
        event: GeofenceEvent,
        sub: Subscription,
        ep: _Endpoint,
        attempt: int,
        token: int,
        slot_in_s: float,
    ) -> tuple[str, str] | None:
        """One attempt, recorded; returns (outcome, dead reason), None if not recorded."""
        try:
            if slot_in_s > 0:
                await asyncio.sleep(slot_in_s)  # our reserved rate slot
            answer = await webhooks.attempt(self.http, sub.url, sub.secret, event)
        except BaseException as exc:
            ep.breaker.record(token, exc)
            raise
        finally:
            ep.in_flight -= 1
        ep.breaker.record(token, RuntimeError(answer.error) if answer.outcome == "retry" else None)
        label = str(sub.id)
        self.metrics.latency.labels(label).observe(answer.latency_ms / 1000)
        outcome, retry_in_s = self._settle(answer, attempt)
        if outcome == "delivered":
            self.metrics.delivered.labels(label).inc()
        else:
            self.metrics.failures.labels(label, outcome).inc()
        log_at = logging.INFO if outcome != "dead" else logging.WARNING
        log.log(
            log_at,
            "webhook %s -> subscription %d attempt %d: %s (%s)",
            event.event_id,
            sub.id,
            attempt,
            outcome,
            answer.error or answer.status,
        )
        try:
            await self.db.run(
                webhook_store.record_attempt,
                event.event_id,
                sub.id,
                attempt,
                now=_now(),
                status=answer.status,
                latency_ms=answer.latency_ms,
                error=answer.error,
                outcome=outcome,
                retry_in_s=retry_in_s,
            )
        except Exception:  # the lease runs out and the delivery is tried again
            log.exception("could not record webhook attempt for %s", event.event_id)
            return None
        if outcome == "dead":
            status = f"HTTP {answer.status}" if answer.status is not None else "no response"
            why = f"{status} after {attempt} attempts: {answer.error or ''}".strip()
            return outcome, f"subscription {sub.id} ({_host(sub.url)}): {why}"
        return outcome, ""

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
        tasks = [t for t in self._tasks.values() if not t.done()]
        if tasks:
            _, late = await asyncio.wait(tasks, timeout=grace_s)
            for t in late:
                t.cancel()
            for t in late:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await t
        await self.http.aclose()


def _host(url: str) -> str:
    """Scheme, host and port only: a URL's path or query may carry a token."""
    parts = httpx.URL(url)
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{parts.host}{port}"


def _now() -> datetime:
    """Wall-clock time: retries and leases are real time, whatever the pipeline's clock."""
    return datetime.now(UTC)


def _settled(look: _Pass) -> _Pass | None:
    """The pass's outcome if it only started attempts and each has ended delivered or
    dead, recorded; None when the database must be asked again."""
    if look.running or look.waits or not all(t.done() for t in look.started):
        return None
    dead = list(look.dead)
    for t in look.started:
        if t.cancelled() or t.exception() is not None or t.result() is None:
            return None
        outcome, reason = t.result()
        if outcome == "retry":
            return None
        if outcome == "dead":
            dead.append(reason)
    return _Pass(dead=dead)


def _retrieve(task: asyncio.Task[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("webhook attempt failed", exc_info=task.exception())

"""Prometheus metrics of the runtime, as middleware, on an injected registry.

=============================================  =========  ====================
name                                           type       labels
=============================================  =========  ====================
trackstream_messages_processed_total           counter    stage
trackstream_messages_failed_total              counter    stage, category
trackstream_messages_retried_total             counter    stage
trackstream_messages_deferred_total            counter    stage   (Defer: no delivery spent)
trackstream_messages_dead_lettered_total       counter    stage, category
trackstream_messages_claimed_total             counter    stage
trackstream_group_recreated_total              counter    stage
trackstream_handle_duration_seconds            histogram  stage   (one batch)
trackstream_batch_size                         histogram  stage
trackstream_consumer_pending                   gauge      stage   (group pending)
trackstream_consumer_lag                       gauge      stage   (group lag)
trackstream_redis_errors_total                 counter    stage, kind, reason (streams.faults)
=============================================  =========  ====================
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from streams.message import Message
from streams.middleware import BatchCall, Middleware

BATCH_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)


class StreamMetrics(Middleware):
    def __init__(self, registry: CollectorRegistry) -> None:
        def counter(name: str, doc: str, labels: Sequence[str] = ("stage",)) -> Counter:
            return Counter(name, doc, labels, registry=registry)

        self.processed = counter("trackstream_messages_processed", "Entries handled and acked")
        self.failed = counter(
            "trackstream_messages_failed", "Handler failures", ("stage", "category")
        )
        self.retried = counter("trackstream_messages_retried", "Entries scheduled for a retry")
        self.dead_lettered = counter(
            "trackstream_messages_dead_lettered",
            "Entries moved to the dead-letter stream",
            ("stage", "category"),
        )
        self.deferred = counter(
            "trackstream_messages_deferred", "Entries deferred without spending a delivery"
        )
        self.claimed = counter("trackstream_messages_claimed", "Idle entries claimed")
        self.recreated = counter("trackstream_group_recreated", "Consumer groups recreated")
        self.heartbeat_failures = counter(
            "trackstream_heartbeat_failures", "Heartbeats of a worker that failed"
        )
        self.redis_errors = counter(
            "trackstream_redis_errors",
            "Steps that failed on Redis: transient, group-missing or bug (see streams.faults)",
            ("stage", "kind", "reason"),
        )
        self.duration = Histogram(
            "trackstream_handle_duration_seconds",
            "Time to handle one batch",
            ("stage",),
            registry=registry,
        )
        self.batch_size = Histogram(
            "trackstream_batch_size",
            "Entries per handled batch",
            ("stage",),
            buckets=BATCH_BUCKETS,
            registry=registry,
        )
        self.pending = Gauge(
            "trackstream_consumer_pending",
            "Pending entries of the group",
            ("stage",),
            registry=registry,
        )
        self.lag = Gauge(
            "trackstream_consumer_lag",
            "Entries not yet delivered to the group",
            ("stage",),
            registry=registry,
        )

    async def around_batch(
        self, stage: str, batch: Sequence[Message[Any]], call_next: BatchCall
    ) -> None:
        start = time.perf_counter()
        try:
            await call_next(batch)
        finally:
            self.duration.labels(stage).observe(time.perf_counter() - start)
            self.batch_size.labels(stage).observe(len(batch))

    def on_acked(self, stage: str, count: int) -> None:
        self.processed.labels(stage).inc(count)

    def on_failed(self, stage: str, msg: Message[Any], exc: BaseException, category: str) -> None:
        self.failed.labels(stage, category).inc()

    def on_retry(self, stage: str, msg: Message[Any], delay_ms: int) -> None:
        self.retried.labels(stage).inc()

    def on_deferred(self, stage: str, msg: Message[Any], delay_ms: int, reason: str) -> None:
        self.deferred.labels(stage).inc()

    def on_dead_letter(self, stage: str, msg: Message[Any], category: str, error: str) -> None:
        self.dead_lettered.labels(stage, category).inc()

    def on_claimed(self, stage: str, count: int) -> None:
        self.claimed.labels(stage).inc(count)

    def on_group_recreated(self, stage: str, stream: str) -> None:
        self.recreated.labels(stage).inc()

    def on_heartbeat_failed(self, stage: str, consumer: str, exc: BaseException) -> None:
        self.heartbeat_failures.labels(stage).inc()

    def on_backlog(self, stage: str, pending: int, lag: int | None) -> None:
        self.pending.labels(stage).set(pending)
        if lag is not None:
            self.lag.labels(stage).set(lag)

    def on_redis_error(self, stage: str, kind: str, reason: str) -> None:
        self.redis_errors.labels(stage, kind, reason).inc()

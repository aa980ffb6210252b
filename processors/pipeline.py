"""Wiring: builds the stages, workers, scheduler and reconciler from settings.

Everything a process needs is made here, once; tests pass their own source, geocoder,
clock and registry.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from prometheus_client import CollectorRegistry

from processors import topology
from processors.clock import Clock, system_clock
from processors.config import AppSettings
from processors.database import Database
from processors.endpoints import EndpointGate
from processors.geocoding import CachedGeocoder, Geocoder, NominatimGeocoder, OfflineGeocoder
from processors.reconciler import Reconciler
from processors.resilience import CircuitBreaker, Limiter
from processors.revalidate import FetchRevalidator
from processors.scheduler import Capacity, Scheduler
from processors.sources import (
    HttpLocationSource,
    LocationSource,
    ResilientSource,
    SimulatedFleet,
)
from processors.stage import (
    Closable,
    Gated,
    SingleStage,
    SizedBatches,
    Stage,
    StageRegistry,
    StageSpec,
)
from processors.stages.fetch import FetchStage
from processors.stages.geocode import GeocodeStage
from processors.stages.geofence import GeofenceStage
from processors.stages.notify import NotifyStage
from processors.stages.viewrefresh import ViewRefreshStage
from schemas.events import FetchRequested, LocationGeocoded, LocationReported, ViewsChanged
from schemas.notify import GeofenceEvent
from schemas.secretbox import SecretBox
from streams.connection import Client, connect
from streams.consumer import Context
from streams.errors import Reject
from streams.keys import StageKeys
from streams.lock import LeaseLock
from streams.message import Message
from streams.metrics import StreamMetrics
from streams.middleware import LoggingMiddleware, Middleware
from streams.producer import Producer
from streams.ratelimit import SharedRateLimiter
from streams.settings import StreamSettings
from streams.worker import Worker


def build_source(
    app: AppSettings, clock: Clock, limiter: Limiter
) -> tuple[LocationSource, SimulatedFleet | None]:
    """The configured location source wrapped in rate limit, breaker and retries."""
    fleet = None
    inner: LocationSource
    if app.source == "http":
        assert app.source_url is not None
        inner = HttpLocationSource(app.source_url, None, app.source_timeout_s, app.source_api_key)
    else:
        fleet = SimulatedFleet(app.fleet_seed, clock, messy=app.fleet_messy)
        inner = fleet
    resilient = ResilientSource(
        inner,
        CircuitBreaker(app.breaker_failures, app.breaker_reset_s),
        limiter,
        attempts=app.source_retries,
    )
    return resilient, fleet


def build_geocoder(app: AppSettings, limiter: Limiter) -> Geocoder:
    inner: Geocoder
    if app.geocoder == "nominatim":
        assert app.geocoder_url is not None
        inner = NominatimGeocoder(
            app.geocoder_url,
            None,
            limiter,
            CircuitBreaker(app.breaker_failures, app.breaker_reset_s),
        )
    else:
        inner = OfflineGeocoder()
    return CachedGeocoder(inner, app.geocoder_cache_size) if app.geocoder_cache_size else inner


class Pipeline:
    def __init__(
        self,
        streams: StreamSettings,
        app: AppSettings,
        *,
        clock: Clock = system_clock,
        source: LocationSource | None = None,
        geocoder: Geocoder | None = None,
        registry: CollectorRegistry | None = None,
        client: Client | None = None,
        db: Database | None = None,
    ) -> None:
        self.streams = streams
        self.app = app
        self.clock = clock
        self.client = client or connect(streams)
        self.codec = topology.codec(streams.max_message_bytes)
        self.routes = topology.routes(streams.prefix)
        self.producer = Producer(self.client, self.codec, streams.redis_url)
        # a statement never runs much past its handler's timeout (see processors.database)
        self.db = db or Database(
            app.database_url, statement_timeout_ms=max(5_000, streams.handler_timeout_ms)
        )
        self.fleet: SimulatedFleet | None = None
        if source is None:
            # a request waits at most a third of its handler timeout for a slot, then
            # is deferred: many fetch workers queue in the stream, not in handlers
            limiter = self._shared_limiter(
                topology.FETCH,
                "source",
                app.source_rate_per_s,
                app.source_burst,
                max_wait_s=streams.handler_timeout_ms / 3000,
            )
            source, self.fleet = build_source(app, clock, limiter)
        self.source = source
        self._geocoder = geocoder
        self.registry = registry if registry is not None else CollectorRegistry()
        self.metrics = StreamMetrics(self.registry)
        self.middleware: list[Middleware] = [LoggingMiddleware(), self.metrics]
        self._stages: dict[str, Stage] = {}

    @property
    def geocoder(self) -> Geocoder:
        if self._geocoder is None:
            limiter = self._shared_limiter(
                topology.GEOCODE, "geocoder", self.app.geocoder_rate_per_s, 1
            )
            self._geocoder = build_geocoder(self.app, limiter)
        return self._geocoder

    def _shared_limiter(
        self,
        stage: str,
        name: str,
        rate_per_s: float,
        burst: int,
        max_wait_s: float | None = None,
    ) -> Limiter:
        """A rate limit that holds for all workers together (kept in Redis), so adding
        fetch or geocode workers never calls the external API more often."""
        key = StageKeys(self.streams.prefix, stage).ratelimit(name)
        return SharedRateLimiter(
            self.client, key, rate_per_s, burst, self.streams.redis_url, max_wait_s=max_wait_s
        )

    def _endpoint_gate(self, origin: str) -> EndpointGate:
        """One webhook endpoint (a URL's origin), shared by every subscription to it and
        every notify worker: rate limit, circuit breaker, Retry-After pause. A slot
        further than notify_max_rate_wait_s away is not taken (the delivery waits)."""
        return EndpointGate(
            self.client,
            self.streams.prefix,
            topology.NOTIFY,
            origin,
            rate_per_s=self.app.notify_rate_per_min / 60,
            max_rate_wait_s=self.app.notify_max_rate_wait_s,
            threshold=self.app.notify_breaker_failures,
            reset_s=self.app.notify_breaker_reset_s,
            trial_s=self.app.notify_timeout_s + 1,
            url=self.streams.redis_url,
        )

    def stage(self, name: str) -> Stage:
        """The stage named ``name``, built once (see :data:`STAGES`)."""
        if name not in self._stages:
            self._stages[name] = STAGES.build(name, self)
        return self._stages[name]

    def worker(
        self, name: str, *, consumer: str | None = None, concurrency: int | None = None
    ) -> Worker:
        stage = self.stage(name)
        changes: dict[str, Any] = {}
        if concurrency is not None:
            changes["concurrency"] = concurrency
        # a set-based stage reads larger batches, unless TRACKSTREAM_BATCH_SIZE is set
        preferred = stage.batch_size if isinstance(stage, SizedBatches) else None
        if preferred is not None and "batch_size" not in self.streams.model_fields_set:
            changes["batch_size"] = preferred
        if getattr(stage, "presume_waiting", False):  # see StreamSettings.presume_waiting
            changes["presume_waiting"] = True
        settings = self.streams.with_(**changes) if changes else self.streams
        handler, batch_handler = _typed(STAGES.get(name).input_type, stage)
        return Worker(
            self.client,
            settings,
            self.routes[name],
            self.codec,
            handler=handler,
            batch_handler=batch_handler,
            consumer=consumer,
            middleware=self.middleware,
            gate=_gate(self.db, stage.ready if isinstance(stage, Gated) else None),
        )

    def scheduler(self, *, use_lock: bool = True) -> Scheduler:
        keys = StageKeys(self.streams.prefix, topology.SCHEDULER)
        ttl_ms = max(1_000, int(self.app.schedule_interval_s * 3 * 1000))
        lock = (
            LeaseLock(self.client, keys, "tick", ttl_ms, self.streams.redis_url)
            if use_lock
            else None
        )
        return Scheduler(
            self.db,
            self.producer,
            self.routes[topology.FETCH],
            lock,
            self.clock,
            capacity=Capacity(
                self.app.source_rate_per_s,
                self.app.batch_trackers,
                self.app.fetch_backlog_bound_s,
            ),
            min_fetch_interval_s=self.app.min_fetch_interval_s,
            max_tracker_age_s=self.app.max_tracker_age_s,
            max_batches_per_tick=self.app.max_batches_per_tick,
            report_key=keys.state("report"),
            report_ttl_ms=max(60_000, int(self.app.schedule_interval_s * 5 * 1000)),
        )

    def reconciler(self) -> Reconciler:
        return Reconciler(
            self.db,
            self.producer,
            self.routes,
            self.clock,
            self.app.reconcile_grace_s,
            max_republish=self.app.reconcile_max_republish,
            retention_days=self.app.history_retention_days,
        )

    async def aclose(self) -> None:
        for stage in self._stages.values():
            if isinstance(stage, Closable):
                await stage.aclose()
        await self.client.aclose()
        self.db.dispose()


def _wrong_type(msg: Message[Any], expected: type) -> Reject | None:
    if isinstance(msg.payload, expected):
        return None
    return Reject(
        f"{type(msg.payload).__name__} does not belong on this stream "
        f"(it takes {expected.__name__})"
    )


def _gate(db: Database, stage_ready: Any) -> Any:
    """The worker's gate: the database is up (see :meth:`Database.ready`), then whatever
    the stage itself waits for (its source's circuit, loading its data)."""

    async def gate() -> None:
        await db.ready()
        if stage_ready is not None:
            await stage_ready()

    return gate


def _typed(expected: type, stage: Stage) -> tuple[Any, Any]:
    """The stage's handler, wrapped so that a valid event of the wrong type is rejected.
    A database outage or conflict is already a deferring :class:`DatabaseUnavailable`
    (:meth:`Database.run` translates, for every stage)."""
    if isinstance(stage, SingleStage):
        handle = stage.handle

        async def checked(msg: Message[Any], ctx: Context) -> None:
            if (bad := _wrong_type(msg, expected)) is not None:
                raise bad
            await handle(msg, ctx)

        return checked, None

    handle_batch = stage.handle_batch

    async def checked_batch(
        msgs: Sequence[Message[Any]], ctx: Context
    ) -> Mapping[str, BaseException] | None:
        failures: dict[str, BaseException] = {}
        good = []
        for m in msgs:
            if (bad := _wrong_type(m, expected)) is not None:
                failures[m.entry_id] = bad
            else:
                good.append(m)
        if good:
            failures.update(await handle_batch(good, ctx) or {})
        return failures

    return None, checked_batch


# -- the stages: name, input event, factory


def _fetch(p: Pipeline) -> FetchStage:
    revalidator = FetchRevalidator(
        p.db, p.clock, p.app.min_fetch_interval_s, p.registry, p.app.fix_future_tolerance_s
    )
    return FetchStage(
        p.db,
        p.source,
        p.routes,
        p.clock,
        revalidator,
        lateness_s=p.app.source_lateness_s,
        future_tolerance_s=p.app.fix_future_tolerance_s,
        min_fetch_interval_s=p.app.min_fetch_interval_s,
        registry=p.registry,
    )


def _geocode(p: Pipeline) -> GeocodeStage:
    return GeocodeStage(p.db, p.geocoder, p.routes, p.clock)


def _geofence(p: Pipeline) -> GeofenceStage:
    return GeofenceStage(p.db, p.routes, p.clock, p.app.geofence_rules(), p.registry)


def _view_refresh(p: Pipeline) -> ViewRefreshStage:
    keys = p.routes[topology.VIEW_REFRESH].keys()
    return ViewRefreshStage(p.db, p.client, keys, p.app.view_refresh_interval_s)


def _notify(p: Pipeline) -> NotifyStage:
    return NotifyStage(
        p.db,
        p.app,
        p._endpoint_gate,
        p.registry,
        SecretBox(p.app.webhook_key_list()),
        max_defer_s=p.streams.claim_idle_ms / 3000,
    )


STAGES: StageRegistry[Pipeline] = StageRegistry(
    [
        StageSpec(topology.FETCH, FetchRequested, _fetch),
        StageSpec(topology.GEOCODE, LocationReported, _geocode),
        StageSpec(topology.GEOFENCE, LocationGeocoded, _geofence),
        StageSpec(topology.VIEW_REFRESH, ViewsChanged, _view_refresh),
        StageSpec(topology.NOTIFY, GeofenceEvent, _notify),
    ]
)

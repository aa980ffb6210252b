"""A Prometheus exporter for the whole pipeline: read on every scrape, nothing cached.

Every stage shard of the topology (fetch, geocode, geofence, view-refresh, all shards)
is read with :func:`streams.monitor.stage_status`; the freshness numbers come from the
database when one is configured; the scheduler's demand vs capacity from the report the
leading scheduler leaves in Redis (``trackstream_scheduler_*``: demand and capacity in
trackers/s, cycle, fetch backlog and its bound, overloaded; absent while none runs).

==============================================  =======  ============  ===================
name                                            type     labels        what
==============================================  =======  ============  ===================
trackstream_stream_length                       gauge    stage, shard  entries in the streams
trackstream_stream_lag                          gauge    stage, shard  not yet delivered
trackstream_stream_pending                      gauge    stage, shard  delivered, not acked
trackstream_stream_oldest_pending_age_seconds   gauge    stage, shard  0 when none pending
trackstream_stream_consumers                    gauge    stage, shard  all consumers
trackstream_stream_live_consumers               gauge    stage, shard  fresh heartbeat
trackstream_dead_letters                        gauge    stage, shard  dead-letter entries
trackstream_stalest_tracker_age_seconds         gauge                  oldest active fetch
trackstream_trackers_in_run                     gauge                  active, in their run
trackstream_trackers_stale                      gauge                  not fetched for 12 h
trackstream_tracker_max_age_seconds             gauge                  the guarantee (12 h)
trackstream_scheduler_*                         gauge                  the scheduler's report
trackstream_reports_not_geocoded                gauge                  reports to geocode
trackstream_reports_not_checked                 gauge                  to geofence-check
trackstream_history_partition_bytes             gauge    table, part.  PostgreSQL only
trackstream_history_partition_rows              gauge    table, part.  (estimated; exact
                                                                       for the default)
trackstream_exporter_scrape_errors_total        counter  source        redis (| database)
trackstream_exporter_up                         gauge                  1 if Redis answered
==============================================  =======  ============  ===================

prometheus-client collects synchronously while the Redis client is asyncio, so the
collector owns one event loop in a daemon thread (and its Redis client lives there);
a scrape submits one coroutine that reads all stage shards concurrently and, while
it runs, queries the database in a worker thread. Both are bounded by the scrape
timeout. Redis and database failures (or timeouts) are counted and leave their
metrics out of that scrape; they never fail the scrape. The exporter never writes
to the database, nor creates a SQLite file that does not exist.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry
from redis import exceptions as rex

from processors import topology
from processors.clock import Clock, system_clock
from processors.scheduler import SchedulerReport, read_report
from streams.connection import Client, connect
from streams.errors import ConfigError, GroupMissing, RedisCommandError
from streams.keys import StageKeys
from streams.monitor import StageStatus, retrying, stage_status
from streams.settings import StreamSettings

log = logging.getLogger("trackstream.exporter")

STAGE_LABELS = ("stage", "shard")


def pipeline_keys(prefix: str) -> list[StageKeys]:
    """Every shard of every pipeline stage, in pipeline order."""
    routes = topology.routes(prefix)
    return [keys for stage in topology.STAGES for keys in routes[stage].all_keys()]


def backlog(status: StageStatus) -> int:
    """Entries the group has yet to receive.

    A stream without its group (no worker has started yet) counts as fully
    undelivered: the group will be created at ``0`` and read all of it. (The
    runtime's ``StageStatus.lag`` counts such a stream as 0.)
    """
    return sum((s.lag or 0) if s.group_exists else s.length for s in status.streams)


def client_settings(settings: StreamSettings) -> StreamSettings:
    """Settings for a monitoring client: fail fast instead of retrying for seconds."""
    return settings.with_(
        connect_retries=min(settings.connect_retries, 1),
        socket_timeout_ms=min(settings.socket_timeout_ms, 2_000),
    )


def redis_answered(exc: BaseException) -> bool:
    """Did Redis reply (with an error) rather than fail to reply at all?"""
    return isinstance(exc, rex.ResponseError | RedisCommandError | GroupMissing)


@dataclass(frozen=True, slots=True)
class Freshness:
    stalest_age_s: float | None
    not_geocoded: int
    not_checked: int
    in_run: int = 0
    stale: int = 0  # in-run trackers not fetched for more than max_age_s
    max_age_s: float = 43_200.0
    # (table, partition, rows, bytes) of the history's partitions (PostgreSQL only)
    partitions: tuple[tuple[str, str, int, int], ...] = ()
    # trackers the location API answers with an error, by code (schemas.source_store)
    source_errors: dict[str, int] = field(default_factory=dict)


def sqlite_file(database_url: str) -> Path | None:
    """The file of a SQLite URL (None for PostgreSQL or an in-memory SQLite)."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        url = make_url(database_url)
    except ArgumentError as exc:
        raise ConfigError("database_url", f"{exc}") from None
    if url.get_backend_name() != "sqlite":
        return None
    if url.database in (None, "", ":memory:") or url.query.get("mode") == "memory":
        return None
    return Path(url.database).expanduser()


class FreshnessReader:
    """The pipeline's freshness from the database (sync SQLAlchemy, one short session).

    The exporter only reads: a SQLite file that does not exist is an error of the scrape,
    never created (``schemas.db.make_engine`` would create it and its directory).
    """

    def __init__(
        self,
        database_url: str,
        clock: Clock = system_clock,
        connect_timeout_s: int = 3,
        max_age_s: float = 43_200.0,
    ) -> None:
        self.database_url = database_url
        self.clock = clock
        self.max_age_s = max_age_s
        self.connect_timeout_s = connect_timeout_s
        self._sqlite_file = sqlite_file(database_url)
        self._sessions: Any = None
        self._engine: Any = None
        self._lock = threading.Lock()

    def _factory(self) -> Any:
        with self._lock:
            if self._sessions is None:
                from schemas.db import make_engine, session_factory

                if self._sqlite_file is not None:
                    engine = make_engine(self.database_url)
                else:
                    engine = make_engine(
                        self.database_url,
                        connect_args={"connect_timeout": self.connect_timeout_s},
                    )
                self._engine = engine
                self._sessions = session_factory(engine)
            return self._sessions

    def read(self) -> Freshness:
        if self._sqlite_file is not None and not self._sqlite_file.is_file():
            raise FileNotFoundError(f"no SQLite database at {self._sqlite_file}")
        from schemas import report_store, schedule, source_store

        with self._factory()() as session:
            fleet = schedule.freshness(session, self.clock(), self.max_age_s)
            parts: tuple[tuple[str, str, int, int], ...] = ()
            if self._sqlite_file is None:  # SQLite's would be a count of the whole table
                from schemas.history import partition_sizes

                parts = tuple(
                    (p.table, p.name, p.rows, p.bytes or 0)
                    for p in partition_sizes(session.connection())
                )
            return Freshness(
                partitions=parts,
                stalest_age_s=fleet.oldest_age_s,
                not_geocoded=int(report_store.count_not_geocoded(session)),
                not_checked=int(report_store.count_not_checked(session)),
                in_run=fleet.in_run,
                stale=fleet.stale,
                max_age_s=self.max_age_s,
                source_errors=source_store.errors_by_code(session),
            )

    def close(self) -> None:
        with self._lock:
            if self._engine is not None:
                self._engine.dispose()
            self._engine = self._sessions = None


class _LoopThread:
    """One asyncio event loop in a daemon thread, for sync callers."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self.thread.start()

    def submit(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def stop(self) -> None:
        if self.loop.is_closed():
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


class PipelineCollector(Collector):
    """Collects stage and freshness metrics on every scrape. Call :meth:`close` when done."""

    def __init__(
        self,
        settings: StreamSettings,
        *,
        database_url: str | None = None,
        scrape_timeout_s: float = 5.0,
        clock: Clock = system_clock,
        client_factory: Callable[[StreamSettings], Client] = connect,
        max_tracker_age_s: float = 43_200.0,
    ) -> None:
        self.settings = client_settings(settings)
        self.keys = pipeline_keys(settings.prefix)
        self.report_key = StageKeys(settings.prefix, topology.SCHEDULER).state("report")
        self.scheduler_report: SchedulerReport | None = None
        self.scrape_timeout_s = scrape_timeout_s
        self.freshness = (
            FreshnessReader(database_url, clock, max_age_s=max_tracker_age_s)
            if database_url
            else None
        )
        self._client_factory = client_factory
        self._client: Client | None = None
        self._errors = {"redis": 0} | ({"database": 0} if self.freshness else {})
        self._errors_lock = threading.Lock()
        self._db_pool = (
            ThreadPoolExecutor(1, thread_name_prefix="trackstream-exporter-db")
            if self.freshness
            else None
        )
        self._db_busy: Future[Freshness] | None = None
        self._db_lock = threading.Lock()
        self._loop = _LoopThread("trackstream-exporter")

    # ------------------------------------------------------------------ reading
    async def _statuses(self) -> list[StageStatus | BaseException]:
        if self._client is None:
            self._client = self._client_factory(self.settings)
        client, url = self._client, self.settings.redis_url

        results = list(
            await asyncio.gather(
                # a transient fault is retried within the scrape rather than leaving
                # the stage out of it
                *(retrying(partial(stage_status, client, k, url)) for k in self.keys),
                read_report(client, self.report_key, url),
                return_exceptions=True,
            )
        )
        report = results.pop()
        self.scheduler_report = report if isinstance(report, SchedulerReport) else None
        return results  # type: ignore[return-value]

    def _read_database(self) -> Freshness | None:
        """Freshness, or None (counted) if the database failed or did not answer in time.

        The read runs in a worker thread so that a hung database (or a SQLite write lock
        held by a long transaction) delays a scrape by at most ``scrape_timeout_s``.
        """
        if self.freshness is None or self._db_pool is None:
            return None
        with self._db_lock:
            if self._db_busy is not None and not self._db_busy.done():
                log.warning("the previous database read has not finished: skipped")
                self._count_error("database")
                return None
            future: Future[Freshness] = self._db_pool.submit(self.freshness.read)
            self._db_busy = future
        try:
            return future.result(self.scrape_timeout_s)
        except FutureTimeout:
            log.warning("the database did not answer within %.1f s", self.scrape_timeout_s)
        except Exception as exc:
            log.warning("reading pipeline freshness from the database failed: %s", exc)
        self._count_error("database")
        return None

    def _count_error(self, source: str) -> None:
        with self._errors_lock:
            self._errors[source] += 1

    # --------------------------------------------------------------- collecting
    def describe(self) -> list[Metric]:
        """The metric families without samples (no Redis call at registration)."""
        return list(self._families())

    def collect(self) -> Iterator[Metric]:
        self.scheduler_report = None
        redis_future = self._loop.submit(self._statuses())
        fresh = self._read_database()  # meanwhile, in this thread
        statuses, up = self._finish_redis(redis_future)
        families = self._families()
        by_name = {family.name: family for family in families}
        dead_after_ms = self.settings.consumer_dead_after_ms
        for st in statuses:
            labels = [st.stage, str(st.shard)]
            oldest_ms = st.oldest_pending_age_ms or 0
            values = {
                "trackstream_stream_length": st.length,
                "trackstream_stream_lag": backlog(st),
                "trackstream_stream_pending": st.pending,
                "trackstream_stream_oldest_pending_age_seconds": oldest_ms / 1000,
                "trackstream_stream_consumers": len(st.consumers),
                "trackstream_stream_live_consumers": len(st.live_consumers(dead_after_ms)),
                "trackstream_dead_letters": st.dead_letters,
            }
            for name, value in values.items():
                by_name[name].add_metric(labels, value)
        if fresh is not None:
            if fresh.stalest_age_s is not None:
                by_name["trackstream_stalest_tracker_age_seconds"].add_metric(
                    [], fresh.stalest_age_s
                )
            by_name["trackstream_trackers_in_run"].add_metric([], fresh.in_run)
            by_name["trackstream_trackers_stale"].add_metric([], fresh.stale)
            by_name["trackstream_tracker_max_age_seconds"].add_metric([], fresh.max_age_s)
            by_name["trackstream_reports_not_geocoded"].add_metric([], fresh.not_geocoded)
            by_name["trackstream_reports_not_checked"].add_metric([], fresh.not_checked)
            for table, part, rows, size in fresh.partitions:
                by_name["trackstream_history_partition_rows"].add_metric([table, part], rows)
                by_name["trackstream_history_partition_bytes"].add_metric([table, part], size)
            for code, n in fresh.source_errors.items():
                by_name["trackstream_trackers_source_error"].add_metric([code], n)
        if (report := self.scheduler_report) is not None:
            for name, value in (
                ("trackstream_scheduler_demand_trackers_per_second", report.demand_per_s),
                ("trackstream_scheduler_capacity_trackers_per_second", report.capacity_per_s),
                ("trackstream_scheduler_cycle_seconds", report.cycle_s),
                ("trackstream_scheduler_fetch_backlog", report.backlog),
                ("trackstream_scheduler_fetch_backlog_bound", report.backlog_bound),
                ("trackstream_scheduler_overloaded", 1 if report.level == "overloaded" else 0),
            ):
                by_name[name].add_metric([], value)
        with self._errors_lock:
            errors = dict(self._errors)
        for source, count in errors.items():
            by_name["trackstream_exporter_scrape_errors"].add_metric([source], count)
        by_name["trackstream_exporter_up"].add_metric([], 1 if up else 0)
        yield from families

    def _finish_redis(self, future: Any) -> tuple[list[StageStatus], bool]:
        """Statuses that could be read, and whether Redis answered at all."""
        try:
            results = future.result(self.scrape_timeout_s)
        except FutureTimeout:
            future.cancel()
            log.warning("Redis did not answer within %.1f s", self.scrape_timeout_s)
            self._count_error("redis")
            return [], False
        except Exception as exc:
            log.warning("reading stage status failed: %s", exc)
            self._count_error("redis")
            return [], False
        statuses = [r for r in results if isinstance(r, StageStatus)]
        failures = [r for r in results if not isinstance(r, StageStatus)]
        for failure in failures:
            log.warning("reading stage status failed: %s", failure)
            self._count_error("redis")
        return statuses, all(redis_answered(f) for f in failures)

    def _families(self) -> list[GaugeMetricFamily | CounterMetricFamily]:
        def gauge(name: str, doc: str, labels: Sequence[str] = STAGE_LABELS) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, doc, labels=list(labels))

        families: list[GaugeMetricFamily | CounterMetricFamily] = [
            gauge("trackstream_stream_length", "Entries in the stage's streams"),
            gauge("trackstream_stream_lag", "Entries not yet delivered to the stage's group"),
            gauge("trackstream_stream_pending", "Entries delivered but not yet acked"),
            gauge(
                "trackstream_stream_oldest_pending_age_seconds",
                "Age of the oldest pending entry (0 when none is pending)",
            ),
            gauge("trackstream_stream_consumers", "Consumers in the stage's group"),
            gauge(
                "trackstream_stream_live_consumers",
                "Consumers whose heartbeat is younger than consumer_dead_after_ms",
            ),
            gauge("trackstream_dead_letters", "Entries in the stage's dead-letter stream"),
            gauge(
                "trackstream_stalest_tracker_age_seconds",
                "Time since the least recently fetched active tracker was fetched",
                (),
            ),
            gauge("trackstream_trackers_in_run", "Active trackers inside their production run", ()),
            gauge(
                "trackstream_trackers_stale",
                "In-run trackers not fetched for more than max_tracker_age_s (12 h)",
                (),
            ),
            gauge(
                "trackstream_tracker_max_age_seconds",
                "The freshness guarantee: every in-run tracker fetched within this",
                (),
            ),
            gauge(
                "trackstream_scheduler_demand_trackers_per_second",
                "Fetches/s for every in-run tracker once per min_fetch_interval_s",
                (),
            ),
            gauge(
                "trackstream_scheduler_capacity_trackers_per_second",
                "Fetches/s the location API's rate limit allows",
                (),
            ),
            gauge(
                "trackstream_scheduler_cycle_seconds",
                "Expected time between two fetches of one tracker",
                (),
            ),
            gauge(
                "trackstream_scheduler_fetch_backlog", "Fetch requests undelivered or pending", ()
            ),
            gauge(
                "trackstream_scheduler_fetch_backlog_bound",
                "Fetch requests the scheduler lets be outstanding",
                (),
            ),
            gauge(
                "trackstream_scheduler_overloaded",
                "1 when a round of the fleet takes longer than max_tracker_age_s",
                (),
            ),
            gauge("trackstream_reports_not_geocoded", "Stored reports not yet geocoded", ()),
            gauge("trackstream_reports_not_checked", "Stored reports not yet geofence-checked", ()),
            gauge(
                "trackstream_history_partition_rows",
                "Rows per history partition (the planner's estimate; exact for the default)",
                ("table", "partition"),
            ),
            gauge(
                "trackstream_history_partition_bytes",
                "Size of each history partition with its indexes",
                ("table", "partition"),
            ),
            gauge(
                "trackstream_trackers_source_error",
                "Trackers the location API answered with an error at their last fetch, by code",
                ("code",),
            ),
            CounterMetricFamily(
                "trackstream_exporter_scrape_errors",
                "Failed reads during scrapes, by source",
                labels=["source"],
            ),
            gauge("trackstream_exporter_up", "1 if Redis answered the last scrape, else 0", ()),
        ]
        return families

    def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            try:
                self._loop.submit(client.aclose()).result(5)
            except Exception as exc:  # closing a broken connection
                log.debug("closing the Redis client: %s", exc)
        self._loop.stop()
        if self._db_pool is not None:
            self._db_pool.shutdown(wait=True, cancel_futures=True)
        if self.freshness is not None:
            self.freshness.close()


def build_registry(
    settings: StreamSettings,
    *,
    database_url: str | None = None,
    max_tracker_age_s: float = 43_200.0,
) -> tuple[CollectorRegistry, PipelineCollector]:
    """A fresh registry holding only the pipeline collector."""
    registry = CollectorRegistry()
    collector = PipelineCollector(
        settings, database_url=database_url, max_tracker_age_s=max_tracker_age_s
    )
    registry.register(collector)
    return registry, collector

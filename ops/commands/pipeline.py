"""Running the pipeline: ``worker``, ``scheduler``, ``reconcile``, ``db upgrade``,
``seed`` and ``fetch-now``. (``demo`` lives in :mod:`ops.commands.demo`.)"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from ops.common import console, fail, handle_errors, options, setup_logging
from processors import topology
from streams.connection import probe

if TYPE_CHECKING:
    from processors.config import AppSettings
    from processors.pipeline import Pipeline
    from streams.settings import StreamSettings

log = logging.getLogger("trackstream")


def _stage_arg(value: str) -> str:
    from processors.pipeline import STAGES

    try:
        return STAGES.get(value).name
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None


def _serve_metrics(port: int | None, host: str, registry: object) -> None:
    if port:
        from ops.metrics_http import serve_metrics

        serve_metrics(registry, host, port)  # type: ignore[arg-type]
        log.info("metrics on http://%s:%d/metrics", host, port)


async def _stop_on_signal(stop: asyncio.Event) -> None:
    import signal

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)


async def _every(
    interval_s: float, stop: asyncio.Event, step: object, grace_s: float = 5.0
) -> None:
    """Run ``step()`` every ``interval_s`` until ``stop``; a failed round is logged. A
    round still running ``grace_s`` after ``stop`` (Redis not answering) is cancelled."""
    while not stop.is_set():
        round_ = asyncio.ensure_future(step())  # type: ignore[operator]
        stopper = asyncio.ensure_future(stop.wait())
        await asyncio.wait({round_, stopper}, return_when=asyncio.FIRST_COMPLETED)
        stopper.cancel()
        if not round_.done():
            await asyncio.wait({round_}, timeout=grace_s)
            if not round_.done():
                log.error("round still running %.0f s after stop; cancelled", grace_s)
                round_.cancel()
                await asyncio.wait({round_}, timeout=1)
                return
        if not round_.cancelled() and round_.exception() is not None:
            log.error(
                "round failed; trying again in %.1f s", interval_s, exc_info=round_.exception()
            )
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), interval_s)


def _once_logging(verbose: bool) -> None:
    """With --once a database outage ends the command with one error line (exit 3):
    the long-running "holding reads until it answers" log would only repeat it."""
    if not verbose:
        logging.getLogger("trackstream.database").setLevel(logging.CRITICAL)


def _settings(
    ctx: typer.Context, verbose: bool, once: bool = False
) -> tuple[StreamSettings, AppSettings]:
    """The long-running commands' start: logging, then the stream and app settings."""
    setup_logging(verbose)
    if once:
        _once_logging(verbose)
    return options(ctx).settings()


@contextlib.asynccontextmanager
async def _pipeline(
    stream_settings: StreamSettings, app_settings: AppSettings
) -> AsyncIterator[Pipeline]:
    """A pipeline on a Redis that answers (a wrong or silent Redis: exit 3 at once),
    closed when the command ends."""
    from processors.pipeline import Pipeline

    await probe(stream_settings)
    pipeline = Pipeline(stream_settings, app_settings)
    try:
        yield pipeline
    finally:
        await pipeline.aclose()


def register(app: typer.Typer) -> None:
    @app.command()
    @handle_errors
    def worker(
        ctx: typer.Context,
        stage: Annotated[
            str,
            typer.Argument(
                help="fetch | geocode | geofence | view-refresh | notify", callback=_stage_arg
            ),
        ],
        concurrency: Annotated[int | None, typer.Option(min=1, help="messages at once")] = None,
        consumer: Annotated[
            str | None, typer.Option(help="consumer name (default: host-N)")
        ] = None,
        burst: Annotated[bool, typer.Option(help="exit when the stream is drained")] = False,
        verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
    ) -> None:
        """Consume one stage. Start as many as you like, on any hosts."""
        from streams.worker import run_until_signal

        stream_settings, app_settings = _settings(ctx, verbose)

        async def main() -> None:
            async with _pipeline(stream_settings, app_settings) as pipeline:
                metrics = (app_settings.metrics_port, app_settings.metrics_host)
                _serve_metrics(*metrics, pipeline.registry)
                w = pipeline.worker(stage, consumer=consumer, concurrency=concurrency)
                await run_until_signal(w, burst=burst)

        asyncio.run(main())

    @app.command()
    @handle_errors
    def scheduler(
        ctx: typer.Context,
        once: Annotated[bool, typer.Option(help="one tick, then exit")] = False,
        verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
    ) -> None:
        """Publish fetch batches of due trackers, most overdue first, every schedule
        interval, never more than the fetch stage can absorb (fetch_backlog_s)."""
        stream_settings, app_settings = _settings(ctx, verbose, once)

        async def main() -> None:
            async with _pipeline(stream_settings, app_settings) as pipeline:
                await _schedule(pipeline)

        async def _schedule(pipeline: Pipeline) -> None:
            sched = pipeline.scheduler()

            async def tick() -> list[Any]:
                from ops.runstate import record_tick

                batches = await sched.tick()
                if sched.lock is None or sched.lock.fence is not None:  # the leader's tick
                    await record_tick(
                        pipeline.client,
                        stream_settings.prefix,
                        app_settings.schedule_interval_s,
                        batches,
                        stream_settings.redis_url,
                    )
                return batches

            if once:
                batches = await tick()
                if sched.lock is not None and sched.lock.fence is None:
                    holder = await pipeline.client.get(sched.lock.key)
                    who = holder.decode(errors="replace") if holder else "unknown"
                    host, _, rest = who.partition(":")
                    console.print(
                        f"published 0 batches: another scheduler leads "
                        f"({host} pid {rest.split(':')[0]}) and publishes instead"
                    )
                    return
                console.print(f"published {len(batches)} batches")
                if sched.last_report is not None:
                    console.print(sched.last_report.summary())
                return
            stop = asyncio.Event()
            await _stop_on_signal(stop)
            await _every(app_settings.schedule_interval_s, stop, tick)

        asyncio.run(main())

    @app.command()
    @handle_errors
    def reconcile(
        ctx: typer.Context,
        once: Annotated[bool, typer.Option(help="one round, then exit")] = False,
        verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
    ) -> None:
        """Re-publish reports the database shows as not geocoded / not geofence-checked."""
        stream_settings, app_settings = _settings(ctx, verbose, once)

        async def main() -> None:
            async with _pipeline(stream_settings, app_settings) as pipeline:
                await _reconcile(pipeline)

        async def _reconcile(pipeline: Pipeline) -> None:
            rec = pipeline.reconciler()

            async def run_once() -> Any:
                from ops.runstate import record_round

                done = await rec.run_once()
                await record_round(
                    pipeline.client,
                    stream_settings.prefix,
                    app_settings.reconcile_interval_s,
                    done,
                    stream_settings.redis_url,
                )
                return done

            async def round_() -> None:
                done = await run_once()
                if done.geocode or done.geofence:
                    log.warning(
                        "re-published %d to geocode, %d to geofence", done.geocode, done.geofence
                    )

            if once:
                done = await run_once()
                console.print(
                    f"re-published {done.geocode} to geocode, {done.geofence} to geofence"
                    + (f"; left alone (behind): {', '.join(done.skipped)}" if done.skipped else "")
                )
                return
            stop = asyncio.Event()
            await _stop_on_signal(stop)
            await _every(app_settings.reconcile_interval_s, stop, round_)

        asyncio.run(main())

    db_app = typer.Typer(help="Database schema.", no_args_is_help=True)
    app.add_typer(db_app, name="db")

    @db_app.command("upgrade")
    @handle_errors
    def db_upgrade(ctx: typer.Context, revision: str = "head") -> None:
        """Create or upgrade the schema (tables and views) on SQLite or PostgreSQL."""
        from schemas.db import current_revision, upgrade
        from streams.connection import redact

        _, app_settings = options(ctx).settings()
        url = app_settings.database_url
        before = current_revision(url)
        upgrade(url, revision)
        after = current_revision(url)
        if before == after:
            console.print(f"database {redact(url)} is already at {after}: nothing to do")
        else:
            console.print(
                f"database {redact(url)} upgraded from {before or 'an empty database'} to {after}"
            )

    @app.command()
    @handle_errors
    def seed(
        ctx: typer.Context,
        trackers: Annotated[
            Path | None, typer.Option(exists=True, dir_okay=False, help="CSV of trackers")
        ] = None,
        geofences: Annotated[
            Path | None, typer.Option(exists=True, dir_okay=False, help="GeoJSON of geofences")
        ] = None,
        simulated: Annotated[
            int, typer.Option(min=0, help="add N simulated trackers and the demo geofences")
        ] = 0,
    ) -> None:
        """Load trackers (CSV: external_id,name,run_starts_at,run_ends_at,active) and
        geofences (GeoJSON: Point with radius_m, Polygon or MultiPolygon; property name)."""
        from ops import seeding
        from processors.database import Database

        if trackers is None and geofences is None and not simulated:
            raise fail("give --trackers, --geofences or --simulated N", 2)
        _, app_settings = options(ctx).settings()
        db = Database(app_settings.database_url)
        try:
            if trackers is not None:
                n = db.run_sync(seeding.load_trackers_csv, trackers)
                console.print(f"trackers: {n} loaded from {trackers}")
            if geofences is not None:
                n = db.run_sync(seeding.load_geofences_geojson, geofences)
                console.print(f"geofences: {n} loaded from {geofences}")
            if simulated:
                t, g = db.run_sync(seeding.seed_simulated, simulated, app_settings.fleet_seed)
                console.print(f"simulated: {t} trackers, {g} geofences")
        except seeding.SeedError as exc:
            raise fail(str(exc), 2) from None
        finally:
            db.dispose()

    @app.command("fetch-now")
    @handle_errors
    def fetch_now(
        ctx: typer.Context,
        trackers: Annotated[list[str], typer.Argument(help="tracker external ids")],
    ) -> None:
        """Fetch these trackers urgently: the fetch stage serves its priority lane first
        (the source's rate limit still holds)."""
        from ops import seeding
        from processors.database import Database
        from schemas.events import FetchRequested
        from streams.connection import connect
        from streams.producer import Producer

        stream_settings, app_settings = options(ctx).settings()
        db = Database(app_settings.database_url)
        try:
            unknown = db.run_sync(seeding.unknown_trackers, trackers)
        finally:
            db.dispose()
        if unknown:
            raise fail(f"unknown tracker(s): {', '.join(unknown)}", 2)

        async def main() -> int:
            import secrets
            from datetime import UTC, datetime

            client = connect(stream_settings)
            try:
                batches = [
                    FetchRequested(
                        batch_id=secrets.token_hex(8),
                        tracker_ids=trackers[i : i + 64],
                        requested_at=datetime.now(UTC),
                        priority=True,
                    )
                    for i in range(0, len(trackers), 64)
                ]
                route = topology.routes(stream_settings.prefix)[topology.FETCH]
                await Producer(client, topology.codec(), stream_settings.redis_url).publish(
                    route, batches, priority=True
                )
                return len(batches)
            finally:
                await client.aclose()

        n = asyncio.run(main())
        console.print(f"queued {len(trackers)} tracker(s) in {n} priority batch(es)")

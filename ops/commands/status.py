"""``status``: every stage's lag, pending entries, consumers, dead letters and
throughput; with thresholds (defaults in :mod:`ops.commands._health`), a health check
(exit 1 on a breach)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from functools import partial
from typing import Annotated, Any

import typer
from rich import box
from rich.console import Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from ops.commands import _freshness, _health, _retention
from ops.commands._operator import (
    JsonOption,
    age_text,
    as_str,
    echo_json,
    is_alive,
    run,
    shard_label,
    stage_exists,
    stage_shards,
)
from ops.common import console, err_console, handle_errors, options
from processors import topology
from processors.config import AppSettings
from streams.connection import Client, redact, translate
from streams.errors import NoSuchKey, RedisCommandError, RedisUnavailable
from streams.keys import StageKeys
from streams.monitor import StageStatus, retrying, stage_status
from streams.settings import StreamSettings


@dataclass
class Sample:
    """One reading of a stage shard: its status and the group's acked-entries counter."""

    keys: StageKeys
    status: StageStatus
    acked: int | None
    at: float
    health: _health.Health | None = None


@dataclass
class Thresholds:
    max_lag: int | None
    max_pending_age_s: float | None
    require_consumers: bool
    dead_after_ms: int
    max_lag_age_s: float | None = None
    max_dead_letters: int | None = None
    app: AppSettings | None = None


@dataclass
class StageView:
    sample: Sample
    throughput: float | None
    breaches: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def _backlog(status: StageStatus) -> int:
    """Not yet delivered; a stream without the group counts whole (the group, when a
    worker creates it, starts at 0 and reads everything)."""
    return sum((s.lag or 0) if s.group_exists else s.length for s in status.streams)


async def _acked(client: Client, keys: StageKeys) -> int | None:
    """Entries the group has read and no longer has pending, over the stage's streams
    (``entries-read`` of XINFO GROUPS); None when Redis does not know it."""
    total, seen = 0, False
    for stream in keys.streams():
        try:
            groups = await client.xinfo_groups(stream)
        except NoSuchKey:
            continue
        for g in groups:
            if as_str(g["name"]) != keys.group:
                continue
            read = g.get("entries-read")
            if read is None and as_str(g.get("last-delivered-id", "")) == "0-0":
                read = 0  # Redis 7.0 reports null for a group that never read anything
            if read is None:
                return None
            total += int(read) - int(g["pending"])
            seen = True
    return total if seen else None


async def _sample(
    client: Client, keys: StageKeys, url: str, app: AppSettings | None = None
) -> Sample:
    status = await stage_status(client, keys, url)
    try:
        with translate(url, keys.stream, keys.group):
            acked = await _acked(client, keys)
    except RedisCommandError:
        acked = None
    with translate(url, keys.stream, keys.group):
        now_ms = time.time_ns() // 1_000_000
        health = await _health.health(client, keys, status, now_ms, app)
    return Sample(keys, status, acked, time.monotonic(), health)


async def _sample_all(
    client: Client, all_keys: list[StageKeys], url: str, app: AppSettings | None = None
) -> list[Sample]:
    """Every stage at once, each read :func:`~streams.monitor.retrying`."""
    return list(
        await asyncio.gather(*(retrying(partial(_sample, client, k, url, app)) for k in all_keys))
    )


def _view(sample: Sample, previous: Sample | None, limits: Thresholds) -> StageView:
    throughput = None
    if previous is not None and previous.acked is not None and sample.acked is not None:
        dt = sample.at - previous.at
        delta = sample.acked - previous.acked
        if dt > 0 and delta >= 0:
            throughput = delta / dt
    view = StageView(sample, throughput)
    status = sample.status
    label = shard_label(sample.keys)
    lag = _backlog(status)
    if limits.max_lag is not None and lag > limits.max_lag:
        view.breaches.append(f"{label}: lag {lag} > {limits.max_lag}")
    age = status.oldest_pending_age_ms
    max_age = limits.max_pending_age_s
    if max_age is not None and age is not None and age / 1000 > max_age:
        view.breaches.append(f"{label}: oldest pending entry is {age_text(age)} old > {max_age:g}s")
    if limits.require_consumers and not status.live_consumers(limits.dead_after_ms):
        view.breaches.append(f"{label}: no live consumer")
    h = sample.health
    if h is not None:
        max_lag_age = limits.max_lag_age_s
        if max_lag_age and h.lag_age_ms is not None and h.lag_age_ms / 1000 > max_lag_age:
            view.breaches.append(
                f"{label}: behind by {age_text(h.lag_age_ms)} (its oldest unfinished entry) "
                f"> {max_lag_age:g}s"
            )
        drain = _health.drain_breach(label, status.stage, h, limits.app)
        if drain is not None:
            view.breaches.append(drain)
        recent = h.newest_dead_letter_age_ms
        if recent is not None and recent / 1000 <= _health.RECENT_DEAD_S:
            view.warnings.append(
                f"{label}: {status.dead_letters} dead letter(s), the newest {age_text(recent)} old"
            )
    max_dead = limits.max_dead_letters
    if max_dead is not None and status.dead_letters > max_dead:
        view.breaches.append(f"{label}: {status.dead_letters} dead letters > {max_dead}")
    return view


def _view_dict(view: StageView, limits: Thresholds) -> dict[str, Any]:
    status = view.sample.status
    stream_exists, group_exists = stage_exists(status)
    h = view.sample.health
    return {
        "stage": status.stage,
        "shard": status.shard,
        "group": status.group,
        "stream_exists": stream_exists,
        "group_exists": group_exists,
        "length": status.length,
        "lag": _backlog(status),
        "lag_exact": all(s.lag_exact for s in status.streams if s.group_exists),
        "pending": status.pending,
        "oldest_pending_age_ms": status.oldest_pending_age_ms,
        "dead_letters": status.dead_letters,
        "throughput_per_s": None if view.throughput is None else round(view.throughput, 3),
        "consumers": [
            {**asdict(c), "alive": is_alive(c, limits.dead_after_ms)} for c in status.consumers
        ],
        "live_consumers": len(status.live_consumers(limits.dead_after_ms)),
        "streams": [asdict(s) for s in status.streams],
        "lag_age_ms": None if h is None else h.lag_age_ms,
        "newest_dead_letter_age_ms": None if h is None else h.newest_dead_letter_age_ms,
        "arrivals_per_min": None
        if h is None or h.arrivals_per_min is None
        else round(h.arrivals_per_min, 1),
        "capacity_per_min": None if h is None else h.capacity_per_min,
        "breaches": view.breaches,
        "warnings": view.warnings,
        "healthy": not view.breaches,
        "state": _state(view),
    }


def _state(view: StageView) -> str:
    """ok, warn (recent dead letters), breach, or no stream / no group."""
    stream_exists, group_exists = stage_exists(view.sample.status)
    if view.breaches:
        return "breach"
    if view.warnings:
        return "warn"
    if not stream_exists:
        return "no stream"
    if not group_exists:
        return "no group"
    return "ok"


def _report(views: list[StageView], limits: Thresholds, settings: StreamSettings) -> dict[str, Any]:
    breaches = [b for v in views for b in v.breaches]
    return {
        "time": datetime.now(UTC).isoformat(),
        "redis": redact(settings.redis_url),
        "cluster": settings.redis_cluster,
        "prefix": settings.prefix,
        "thresholds": {
            "max_lag": limits.max_lag,
            "max_pending_age_s": limits.max_pending_age_s,
            "max_lag_age_s": limits.max_lag_age_s,
            "max_dead_letters": limits.max_dead_letters,
            "require_consumers": limits.require_consumers,
            "consumer_dead_after_ms": limits.dead_after_ms,
        },
        "healthy": not breaches,
        "breaches": breaches,
        "stages": [_view_dict(v, limits) for v in views],
    }


def _status_tables(
    views: list[StageView],
    limits: Thresholds,
    settings: StreamSettings,
    *,
    show_breaches: bool = False,
) -> Group:
    stages = Table(
        title=f"trackstream {settings.prefix} @ {redact(settings.redis_url)}"
        + (" (cluster)" if settings.redis_cluster else ""),
        title_justify="left",
        box=box.SIMPLE_HEAD,  # fits 80 columns with every header whole
        pad_edge=False,
        collapse_padding=True,
    )
    for col in ("stage", "state", "length", "lag", "pending", "oldest", "live", "dlq"):
        stages.add_column(
            col, justify="left" if col in ("stage", "state") else "right", no_wrap=True
        )
    stages.add_column("acked/s", justify="right", no_wrap=True)
    consumers = Table(title="consumers", title_justify="left", box=box.SIMPLE_HEAD)
    for col in ("stage", "consumer", "idle", "pending", "heartbeat", "alive"):
        consumers.add_column(col, justify="left" if col in ("stage", "consumer") else "right")
    for view in views:
        status = view.sample.status
        label = shard_label(view.sample.keys)
        state = {
            "breach": Text("BREACH", style="bold red"),
            "no stream": Text("no stream", style="dim"),
            "no group": Text("no group", style="yellow"),
            "warn": Text("warn", style="yellow"),
        }.get(_state(view), Text("ok", style="green"))
        exact = all(s.lag_exact for s in status.streams if s.group_exists)
        live = len(status.live_consumers(limits.dead_after_ms))
        stages.add_row(
            label,
            state,
            str(status.length),
            f"{_backlog(status)}{'' if exact else '+'}",
            str(status.pending),
            age_text(status.oldest_pending_age_ms),
            f"{live}/{len(status.consumers)}",
            Text(str(status.dead_letters), style="red" if status.dead_letters else ""),
            "-" if view.throughput is None else f"{view.throughput:.1f}",
        )
        for c in status.consumers:
            alive = is_alive(c, limits.dead_after_ms)
            consumers.add_row(
                label,
                Text(c.name),
                age_text(c.idle_ms),
                str(c.pending),
                age_text(c.heartbeat_age_ms),
                Text("yes", style="green") if alive else Text("no", style="red"),
            )
    parts: list[Any] = [stages]
    if consumers.row_count:
        parts.append(consumers)
    if show_breaches:
        parts.extend(Text(f"breach: {b}", style="bold red") for v in views for b in v.breaches)
    parts.extend(Text(f"warning: {w}", style="yellow") for v in views for w in v.warnings)
    return Group(*parts)


def _print_breaches(report: dict[str, Any]) -> None:
    for b in report["breaches"]:
        err_console.print(Text(f"breach: {b}", style="bold red"))


def register(app: typer.Typer) -> None:
    @app.command()
    @handle_errors
    def status(
        ctx: typer.Context,
        watch: Annotated[bool, typer.Option("--watch", "-w", help="refresh until Ctrl-C")] = False,
        as_json: JsonOption = False,
        interval: Annotated[
            float | None,
            typer.Option(
                min=0.05,
                help="seconds between samples: the --watch refresh (default 2), or, without "
                "--watch, a window to measure throughput over (default: no throughput)",
            ),
        ] = None,
        count: Annotated[
            int | None, typer.Option(min=1, help="with --watch: stop after N refreshes")
        ] = None,
        max_lag: Annotated[
            int | None, typer.Option(min=0, help="breach when a stage has more undelivered")
        ] = None,
        max_pending_age_s: Annotated[
            float | None,
            typer.Option(min=0, help="breach when an entry has been pending longer (seconds)"),
        ] = None,
        max_lag_age_s: Annotated[
            float,
            typer.Option(
                min=0,
                help="breach when a stage's oldest unfinished entry is older (seconds; 0: off)",
            ),
        ] = _health.MAX_LAG_AGE_S,
        max_dead_letters: Annotated[
            int, typer.Option(min=0, help="breach when a stage has more dead letters")
        ] = _health.MAX_DEAD_LETTERS,
        require_consumers: Annotated[
            bool,
            typer.Option(
                "--require-consumers/--no-require-consumers",
                help="breach when a stage has no live consumer (fresh heartbeat)",
            ),
        ] = True,
        database: Annotated[
            bool,
            typer.Option(
                "--database/--no-database",
                help="show freshness from the database (trackers past max_tracker_age_s, "
                "the least recently fetched); a tracker past it is a breach",
            ),
        ] = True,
        max_tracker_age_s: Annotated[
            float | None,
            typer.Option(min=0, help="breach when a tracker was last fetched longer ago"),
        ] = None,
    ) -> None:
        """Every stage: lag, pending, oldest pending age, consumers, dead letters, throughput.

        Exits 1 (printing the reasons) when a stage breaches a threshold, so it doubles as
        a health check.
        """
        settings, app_settings = options(ctx).settings()
        limits = Thresholds(
            max_lag,
            max_pending_age_s,
            require_consumers,
            settings.consumer_dead_after_ms,
            max_lag_age_s,
            max_dead_letters,
            app_settings,
        )
        all_keys = [k for stage in topology.STAGES for k in stage_shards(settings, stage)]
        url = settings.redis_url
        last: dict[str, Any] = {}

        async def report_of(client: Client, views: list[StageView]) -> dict[str, Any]:
            report = _report(views, limits, settings)
            info = await _freshness.fleet(client, settings, app_settings, database)
            fleet_breaches = _freshness.breaches(info, max_tracker_age_s)
            report.update(info)
            report["retention"] = await _retention.retention(client, settings, all_keys)
            report["breaches"] = [*report["breaches"], *fleet_breaches]
            report["healthy"] = not report["breaches"]
            return report

        def views_of(samples: list[Sample], previous: list[Sample] | None) -> list[StageView]:
            before = previous or [None] * len(samples)  # type: ignore[list-item]
            return [_view(s, p, limits) for s, p in zip(samples, before, strict=True)]

        async def once(client: Client) -> None:
            previous = None
            if interval:
                previous = await _sample_all(client, all_keys, url, app_settings)
                await asyncio.sleep(interval)
            views = views_of(await _sample_all(client, all_keys, url, app_settings), previous)
            last["report"] = await report_of(client, views)
            if as_json:
                echo_json(last["report"])
            else:
                console.print(_status_tables(views, limits, settings))
                for line in (*_freshness.lines(last["report"]), *_retention.lines(last["report"])):
                    console.print(line)

        async def watching(client: Client) -> None:
            every = interval or 2.0
            previous: list[Sample] | None = None
            n = 0
            # not a terminal (a pipe, a log): print every frame instead of redrawing one
            redraw = not as_json and console.is_terminal
            live = Live(console=console, auto_refresh=False) if redraw else None
            try:
                if live is not None:
                    live.start()
                while count is None or n < count:
                    n += 1
                    try:
                        samples = await _sample_all(client, all_keys, url, app_settings)
                        views = views_of(samples, previous)
                        last["report"] = await report_of(client, views)
                    except RedisUnavailable as exc:  # a watch rides out an outage
                        last["error"] = exc
                        err_console.print(f"{datetime.now(UTC):%H:%M:%S}Z: {exc}")
                        if count is None or n < count:
                            await asyncio.sleep(every)
                        continue
                    previous = samples
                    if live is not None:
                        footer = Text(
                            f"{datetime.now(UTC):%H:%M:%S}Z, every {every:g}s; Ctrl-C to stop",
                            style="dim",
                        )
                        live.update(
                            Group(
                                _status_tables(views, limits, settings, show_breaches=True),
                                *_freshness.lines(last["report"]),
                                *_retention.lines(last["report"]),
                                footer,
                            ),
                            refresh=True,
                        )
                    elif as_json:
                        echo_json(last["report"])
                    else:
                        console.print(_status_tables(views, limits, settings, show_breaches=True))
                        console.print(Text(f"{datetime.now(UTC):%H:%M:%S}Z", style="dim"))
                    if count is None or n < count:
                        await asyncio.sleep(every)
            finally:
                if live is not None:
                    live.stop()

        with contextlib.suppress(KeyboardInterrupt):
            run(settings, watching if watch else once)
        report = last.get("report")
        if report is None:
            if "error" in last:  # --count refreshes, none of which reached Redis
                raise last["error"]
            raise typer.Exit(130)
        if not report["healthy"]:
            _print_breaches(report)
            raise typer.Exit(1)

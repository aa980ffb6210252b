"""``trim``: trim a stage's streams safely, only below what every group has processed."""

from __future__ import annotations

from typing import Annotated

import typer

from ops.commands._operator import StageArg, run, stage_shards
from ops.common import console, handle_errors, options
from streams.connection import Client
from streams.retention import TrimResult, safe_trim


def register(app: typer.Typer) -> None:
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
        shards = stage_shards(settings, stage)
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

        results = run(settings, body)
        verb = "would remove" if dry_run else "removed"
        for r in results:
            cut = f" (below {r.min_id})" if r.min_id else ""
            console.print(f"{r.stream}: {verb} {r.removed}{cut}; {r.reason}", highlight=False)
        total = sum(r.removed for r in results)
        console.print(
            f"{verb} {total} entries of stage {stage}" + (" (dry run)" if dry_run else "")
        )

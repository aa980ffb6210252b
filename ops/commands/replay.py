"""``replay``: process a range of a stage's main stream again, by copying it to the
stream's tail or by moving the group back. ``--from`` and ``--to`` are entry ids or
times, see :mod:`ops.timeparse`."""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated

import typer

from ops.commands._operator import YesOption, confirm, run, stage_arg, stage_shards
from ops.common import console, fail, handle_errors, options
from ops.timeparse import MAX_SEQ, id_key, parse_position
from streams.connection import Client
from streams.keys import StageKeys
from streams.monitor import stage_status
from streams.replay import ReplayResult, replay_copy, replay_rewind


def _position(option: str, value: str, *, end: bool = False) -> str:
    try:
        return parse_position(value, end=end)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint=f"'{option}'") from None


def _shown(entry_id: str) -> str:
    """An id for people: the 'whole millisecond' end bound as MS-*."""
    ms, _, seq = entry_id.partition("-")
    return f"{ms}-*" if seq == str(MAX_SEQ) else entry_id


class ReplayMode(StrEnum):
    copy = "copy"
    rewind = "rewind"


def register(app: typer.Typer) -> None:
    @app.command()
    @handle_errors
    def replay(
        ctx: typer.Context,
        stage: Annotated[str, typer.Argument(help="the stage to replay", callback=stage_arg)],
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
        shards = stage_shards(settings, stage)
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

        planned = run(settings, counted)
        total = sum(r.count for _, r in planned)
        skipped = sum(r.skipped for _, r in planned)
        span = f"[{_shown(lo)}, {_shown(hi)}]"
        skip_note = (
            f" ({skipped} dead-lettered entries in the range are skipped: use "
            f"'trackstream dlq redrive {stage}' for those)"
            if skipped
            else ""
        )
        if dry_run:
            verb = "copied to the tail of" if mode is ReplayMode.copy else "delivered again from"
            console.print(
                f"dry run: {total} entries of stage {stage} in {span} would be {verb} "
                f"{', '.join(k.stream for k, _ in planned)}{skip_note}"
            )
            return
        if total == 0:
            console.print(f"nothing to replay: no entries of stage {stage} in {span}{skip_note}")
            return
        if mode is ReplayMode.copy:
            question = f"Re-add {total} entries of stage {stage} in {span} to its stream?"
        else:
            question = f"Rewind group {stage} to before {lo}, delivering {total} entries again?"
        confirm(question, yes)
        results = run(settings, done)
        for keys, r in results:
            if mode is ReplayMode.copy:
                skipped_here = f" ({r.skipped} dead-lettered entries skipped)" if r.skipped else ""
                console.print(
                    f"replayed {r.count} entries of {keys.stream} in {span}{skipped_here}",
                    highlight=False,
                )
            else:
                console.print(
                    f"rewound group {keys.group} on {keys.stream} to before {r.start}: "
                    f"{r.count} entries will be delivered again"
                )

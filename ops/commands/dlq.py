"""``dlq list|show|redrive|purge``: a stage's dead letters, to inspect, to put back on
their stream or to delete."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Annotated, Any, TypeVar

import typer
from rich import box
from rich.table import Table
from rich.text import Text

from ops.commands._dlq_select import (
    AllOption,
    CategoryOption,
    IdsArg,
    SinceOption,
    entry_ids,
    group_by_shard,
    letters_by_id,
    parse_since,
    select_letters,
    select_targets,
)
from ops.commands._operator import (
    JsonOption,
    StageArg,
    YesOption,
    confirm,
    echo_json,
    run,
    shard_label,
    stage_shards,
)
from ops.common import console, err_console, fail, handle_errors, options
from streams.connection import Client
from streams.deadletter import DeadLetter, DeadLetters
from streams.keys import StageKeys
from streams.settings import StreamSettings

R = TypeVar("R")

LimitOption = Annotated[int | None, typer.Option(min=1, help="at most this many")]


def _when(ms: int) -> str:
    if not ms:
        return "-"
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] + "Z"


def _one_line(text: str, width: int = 80) -> str:
    line = " ".join(text.split())
    return line if len(line) <= width else line[: width - 1] + "…"


def _letter_dict(keys: StageKeys, letter: DeadLetter) -> dict[str, Any]:
    return {"stage": keys.stage, "shard": keys.shard, **letter.as_dict()}


def _describe(all_: bool, category: str | None, since: str | None) -> str:
    parts = []
    if category:
        parts.append(f"category {category}")
    if since:
        parts.append(f"since {since}")
    return f" ({', '.join(parts)})" if all_ and parts else ""


def _chosen(
    settings: StreamSettings,
    stage: str,
    verb: str,
    ids: list[str] | None,
    all_: bool,
    category: str | None,
    since: str | None,
    limit: int | None,
) -> tuple[list[tuple[StageKeys, DeadLetter]], list[str]]:
    """The dead letters a redrive or purge means, and the ids not found; exits (1 if
    some ids were not found, else 0) when that leaves nothing to do."""
    selected, missing = select_targets(settings, stage, ids, all_, category, since, limit)
    for dlq_id in missing:
        err_console.print(f"no dead letter {dlq_id} in stage {stage}")
    if not selected:
        if not missing:
            console.print(f"no dead letters to {verb} in stage {stage}")
        raise typer.Exit(1 if missing else 0)
    return selected, missing


def _act(
    ctx: typer.Context,
    stage: str,
    verb: str,
    question: str,
    ids: list[str] | None,
    all_: bool,
    category: str | None,
    since: str | None,
    limit: int | None,
    yes: bool,
    per_shard: Callable[[DeadLetters, list[str]], Awaitable[R]],
) -> tuple[list[R], list[str]]:
    """What redrive and purge share: select the dead letters, ask ``question`` (with
    ``{n}`` and ``{what}``) unless --yes, then ``per_shard`` on each shard's ids.
    Returns the results by shard and the ids not found."""
    settings, _ = options(ctx).settings()
    selected, missing = _chosen(settings, stage, verb, ids, all_, category, since, limit)
    confirm(question.format(n=len(selected), what=_describe(all_, category, since)), yes)
    url = settings.redis_url

    async def body(client: Client) -> list[R]:
        return [
            await per_shard(DeadLetters(client, keys, url), dlq_ids)
            for keys, dlq_ids in group_by_shard(selected).items()
        ]

    return run(settings, body), missing


def register(app: typer.Typer) -> None:
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
        since_ms = parse_since(since)
        shards = stage_shards(settings, stage)

        async def body(client: Client) -> tuple[list[tuple[StageKeys, DeadLetter]], int]:
            letters = await select_letters(
                client,
                shards,
                settings.redis_url,
                category=category,
                since_ms=since_ms,
                limit=limit,
            )
            total = sum([await DeadLetters(client, k, settings.redis_url).count() for k in shards])
            return letters, total

        letters, total = run(settings, body)
        if as_json:
            echo_json([_letter_dict(k, letter) for k, letter in letters])
            return
        table = Table(
            title=f"dead letters of {stage}: {len(letters)} shown, {total} in all",
            title_justify="left",
            box=box.SIMPLE_HEAD,
        )
        wide = console.width >= 140
        columns = (
            ("id", "failed at", "category", "type", "origin id", "tries", "error")
            if wide
            else ("id", "category", "tries", "error")
        )
        for col in columns:
            table.add_column(
                col,
                justify="right" if col == "tries" else "left",
                no_wrap=col != "error",
                ratio=1 if col == "error" else None,
            )
        for keys, letter in letters:
            shown_id = letter.id if keys.shards == 1 else f"{shard_label(keys)}/{letter.id}"
            error = Text(_one_line(letter.error))
            if wide:
                table.add_row(
                    shown_id,
                    _when(letter.failed_ms),
                    letter.category,
                    Text(letter.type),
                    letter.origin_id,
                    str(letter.attempts),
                    error,
                )
                continue
            # narrow terminal: the details under the error, dimmed
            error.append(
                f"\n{letter.type} · failed {_when(letter.failed_ms)} · origin {letter.origin_id}",
                style="dim",
            )
            table.add_row(shown_id, letter.category, str(letter.attempts), error)
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
        (wanted,) = entry_ids([dlq_id], "'ID'")
        shards = stage_shards(settings, stage)

        async def body(client: Client) -> list[tuple[StageKeys, DeadLetter]]:
            found, _ = await letters_by_id(client, shards, settings.redis_url, [wanted])
            return found

        found = run(settings, body)
        if not found:
            raise fail(f"no dead letter {wanted} in stage {stage}")
        keys, letter = found[0]
        if as_json:
            echo_json(_letter_dict(keys, letter))
            return
        rows = [
            ("id", letter.id),
            ("stage", shard_label(keys)),
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

    @dlq_app.command("redrive")
    @handle_errors
    def dlq_redrive(
        ctx: typer.Context,
        stage: StageArg,
        ids: IdsArg = None,
        all_: AllOption = False,
        category: CategoryOption = None,
        since: SinceOption = None,
        limit: LimitOption = None,
        yes: YesOption = False,
    ) -> None:
        """Put dead letters back on their stream (each at most once) once the cause is fixed."""
        question = f"Redrive {{n}} dead letter(s) of stage {stage}{{what}} back to their stream?"
        by_shard, missing = _act(
            ctx, stage, "redrive", question, ids, all_, category, since, limit, yes, _redrive
        )
        result = {k: v for shard in by_shard for k, v in shard.items()}
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
        limit: LimitOption = None,
        yes: YesOption = False,
    ) -> None:
        """Delete dead letters for good."""
        question = f"Permanently delete {{n}} dead letter(s) of stage {stage}{{what}}?"
        by_shard, missing = _act(
            ctx, stage, "purge", question, ids, all_, category, since, limit, yes, _purge
        )
        n = sum(by_shard)
        console.print(f"purged {n} dead letter(s) of stage {stage}")
        if missing:
            raise typer.Exit(1)


async def _redrive(dlq: DeadLetters, dlq_ids: list[str]) -> dict[str, str | None]:
    return await dlq.redrive(dlq_ids)


async def _purge(dlq: DeadLetters, dlq_ids: list[str]) -> int:
    n = 0
    for i in range(0, len(dlq_ids), 1000):
        n += await dlq.purge(dlq_ids[i : i + 1000])
    return n

"""Which dead letters a ``dlq`` command means: the filter options and ids it takes, and
finding those dead letters over the shards of a stage. ``--since`` is an entry id or a
time, see :mod:`ops.timeparse`."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Annotated

import typer

from ops.commands._operator import run, stage_shards
from ops.timeparse import position_ms
from streams.connection import Client
from streams.deadletter import CATEGORIES, DeadLetter, DeadLetters
from streams.keys import StageKeys
from streams.parse import normalize_id
from streams.settings import StreamSettings


def _category_arg(value: str | None) -> str | None:
    if value is not None and value not in CATEGORIES:
        raise typer.BadParameter(
            f"unknown category {value!r}; categories are: {', '.join(CATEGORIES)}"
        )
    return value


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


def parse_since(value: str | None) -> int | None:
    if value is None:
        return None
    try:
        return position_ms(value)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="'--since'") from None


def entry_ids(values: Iterable[str], what: str) -> list[str]:
    out = []
    for value in values:
        try:
            out.append(normalize_id(value.strip()))
        except ValueError as exc:
            raise typer.BadParameter(str(exc), param_hint=what) from None
    return out


async def select_letters(
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


async def letters_by_id(
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


def group_by_shard(
    selected: list[tuple[StageKeys, DeadLetter]],
) -> dict[StageKeys, list[str]]:
    out: dict[StageKeys, list[str]] = {}
    for keys, letter in selected:
        out.setdefault(keys, []).append(letter.id)
    return out


def select_targets(
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
    wanted = entry_ids(ids or [], "'IDS'")
    since_ms = parse_since(since)
    shards = stage_shards(client_settings, stage)
    url = client_settings.redis_url

    async def body(client: Client) -> tuple[list[tuple[StageKeys, DeadLetter]], list[str]]:
        if wanted:
            return await letters_by_id(client, shards, url, wanted)
        letters = await select_letters(
            client, shards, url, category=category, since_ms=since_ms, limit=limit
        )
        return letters, []

    return run(client_settings, body)

"""What the operator commands (``status``, ``replay``, ``dlq``, ``consumers``, ``trim``)
share: stage arguments and options, one Redis client per run, confirmation, formatting.

They work on raw stream entries (no event codec), on a single Redis and on a Redis
Cluster alike: every command touches the keys of one stage shard at a time, and those
share one hash slot.

Exit codes: 0 done (``status``: healthy), 1 ``status`` found a breach / an action did
not (fully) happen / the operator declined, 2 usage or configuration error, 3 Redis
unavailable.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, TypeVar

import typer
from redis import exceptions as rex

from ops.common import console, fail
from processors import topology
from streams.connection import Client, connect, probe, redact
from streams.errors import RedisCommandError, RedisUnavailable
from streams.keys import StageKeys
from streams.monitor import ConsumerStatus, StageStatus
from streams.settings import StreamSettings

T = TypeVar("T")


def stage_arg(value: str) -> str:
    try:
        return topology.check_stage(value)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None


YesOption = Annotated[bool, typer.Option("--yes", "-y", help="do not ask for confirmation")]
JsonOption = Annotated[bool, typer.Option("--json", help="machine-readable JSON on stdout")]
StageArg = Annotated[str, typer.Argument(help="the stage", callback=stage_arg)]


def stage_shards(settings: StreamSettings, stage: str) -> list[StageKeys]:
    return topology.routes(settings.prefix)[stage].all_keys()


def run(settings: StreamSettings, body: Callable[[Client], Awaitable[T]]) -> T:
    """Run ``body`` with a fresh client; driver errors the runtime did not translate
    (a cluster whose nodes cannot be reached, a reply error) become clear failures."""

    async def main() -> T:
        await probe(settings)  # a wrong or silent Redis: one line and exit 3, not a hang
        client = connect(settings)
        try:
            return await body(client)
        finally:
            await client.aclose()

    try:
        return asyncio.run(main())
    except (
        rex.RedisClusterException,
        rex.ConnectionError,
        rex.TimeoutError,
        rex.InvalidResponse,
    ) as exc:
        raise RedisUnavailable(redact(settings.redis_url), exc) from None
    except (rex.ResponseError, RedisCommandError) as exc:
        raise fail(f"Redis replied with an error: {exc}") from None


def confirm(question: str, yes: bool) -> None:
    if yes:
        return
    if not typer.confirm(question, default=False):
        console.print("declined: nothing done")
        raise typer.Exit(1)


def age_text(ms: int | float | None) -> str:
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


def shard_label(keys: StageKeys) -> str:
    return keys.stage if keys.shards == 1 else f"{keys.stage}.{keys.shard}"


def as_str(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def echo_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, default=str) + "\n")
    sys.stdout.flush()


def stage_exists(status: StageStatus) -> tuple[bool, bool]:
    """(any stream exists, the group exists on any stream)."""
    group = any(s.group_exists for s in status.streams)
    # monitor reports a missing key as lag 0 without a group, a key without the group as lag None
    stream = group or any(s.lag is None or s.last_id is not None for s in status.streams)
    return stream, group


def is_alive(c: ConsumerStatus, dead_after_ms: int) -> bool:
    return c.heartbeat_age_ms is not None and c.heartbeat_age_ms < dead_after_ms

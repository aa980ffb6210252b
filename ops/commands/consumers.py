"""``consumers``: a stage's consumers (idle time, pending entries, heartbeat, alive or
not), and removing the dead ones, as the runtime does."""

from __future__ import annotations

from dataclasses import asdict
from typing import Annotated, Any

import typer
from rich.table import Table
from rich.text import Text

from ops.commands._operator import (
    JsonOption,
    StageArg,
    YesOption,
    age_text,
    as_str,
    confirm,
    echo_json,
    is_alive,
    run,
    stage_exists,
    stage_shards,
)
from ops.common import console, err_console, handle_errors, options
from streams.connection import Client
from streams.errors import GroupMissing, NoSuchKey
from streams.monitor import ConsumerStatus, StageStatus, heartbeats, stage_status
from streams.scripts import DELETE_IDLE_CONSUMER


def _dead(c: ConsumerStatus, dead_after_ms: int) -> bool:
    """What the runtime removes too: no heartbeat, no activity, nothing pending."""
    return not is_alive(c, dead_after_ms) and c.pending == 0 and c.idle_ms >= dead_after_ms


def register(app: typer.Typer) -> None:
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
        shards = stage_shards(settings, stage)
        url = settings.redis_url

        async def read(client: Client) -> list[StageStatus]:
            return [await stage_status(client, keys, url) for keys in shards]

        statuses = run(settings, read)
        rows = [(st, c) for st in statuses for c in st.consumers]
        if as_json and not remove_dead:
            echo_json(
                [
                    {
                        "stage": st.stage,
                        "shard": st.shard,
                        **asdict(c),
                        "alive": is_alive(c, dead_after),
                        "dead": _dead(c, dead_after),
                    }
                    for st, c in rows
                ]
            )
            return
        if not any(stage_exists(st)[1] for st in statuses):
            console.print(f"stage {stage} has no consumer group yet (has the stage run yet?)")
            return
        if not as_json:
            table = Table(title=f"consumers of {stage}", title_justify="left")
            for col in ("consumer", "idle", "pending", "heartbeat age", "alive"):
                table.add_column(col, justify="left" if col == "consumer" else "right")
            for st, c in rows:
                if is_alive(c, dead_after):
                    state = Text("yes", style="green")
                elif _dead(c, dead_after):
                    state = Text("dead", style="red")
                elif c.pending:
                    state = Text("no (pending: to be claimed)", style="yellow")
                else:
                    state = Text("no (recently active)", style="yellow")
                name = c.name if len(shards) == 1 else f"{st.stage}.{st.shard}/{c.name}"
                table.add_row(
                    Text(name),
                    age_text(c.idle_ms),
                    str(c.pending),
                    age_text(c.heartbeat_age_ms),
                    state,
                )
            console.print(table)
        if not remove_dead:
            return
        dead = [(st, c) for st, c in rows if _dead(c, dead_after)]
        if not dead:
            console.print("no dead consumers")
            return
        confirm(
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
                now_ms, beats = await heartbeats(client, keys)  # by Redis's clock
                lanes: dict[str, list[tuple[str, Any]]] = {}
                for stream in keys.streams():
                    try:
                        infos = await client.xinfo_consumers(stream, keys.group)
                    except (NoSuchKey, GroupMissing):  # no stream or no group on this lane
                        continue
                    for info in infos:
                        lanes.setdefault(as_str(info["name"]), []).append((stream, info))
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

        removed, kept = run(settings, remove)
        if as_json:
            echo_json({"removed": removed, "kept": kept})
        else:
            console.print(f"removed {len(removed)} dead consumer(s): {', '.join(removed) or '-'}")
            if kept:
                err_console.print(f"kept (became active or got pending entries): {', '.join(kept)}")

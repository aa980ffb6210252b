"""Publishing: batched ``XADD`` without trimming.

An :class:`Outbox` collects entries for any streams and writes each stream's entries
with one command (a Lua loop of ``XADD``, so one reply instead of one per entry), the
streams concurrently. Nothing here trims:
retention is :mod:`streams.retention`'s job, which never drops unprocessed entries.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from itertools import chain
from typing import Any

from pydantic import BaseModel

from streams.connection import Client
from streams.keys import StageKeys, shard_for
from streams.message import Codec, Fields
from streams.scripts import XADD_MANY, Lua


@dataclass(frozen=True, slots=True)
class Route:
    """Where messages for a stage go: its prefix, name and shard count."""

    prefix: str
    stage: str
    shards: int = 1

    def keys(self, partition_key: str = "") -> StageKeys:
        return _stage_keys(
            self.prefix, self.stage, shard_for(partition_key, self.shards), self.shards
        )

    def all_keys(self) -> list[StageKeys]:
        return [StageKeys(self.prefix, self.stage, i, self.shards) for i in range(self.shards)]


@functools.lru_cache(maxsize=4096)
def _stage_keys(prefix: str, stage: str, shard: int, shards: int) -> StageKeys:
    return StageKeys(prefix, stage, shard, shards)  # validated once per shard, not per entry


@functools.lru_cache(maxsize=4096)
def _stream_key(prefix: str, stage: str, shard: int, shards: int, priority: bool) -> str:
    keys = _stage_keys(prefix, stage, shard, shards)
    return keys.priority if priority else keys.stream


@dataclass
class Outbox:
    """Entries waiting to be written, in order."""

    codec: Codec
    entries: list[tuple[str, Fields]] = field(default_factory=list)

    def add(
        self,
        route: Route,
        payload: BaseModel,
        *,
        partition_key: str = "",
        priority: bool = False,
        trace: str | None = None,
    ) -> None:
        shard = shard_for(partition_key, route.shards)
        stream = _stream_key(route.prefix, route.stage, shard, route.shards, priority)
        self.entries.append((stream, self.codec.encode(payload, trace=trace)))

    def add_raw(self, stream: str, fields: Fields) -> None:
        self.entries.append((stream, fields))

    def extend(self, other: Outbox) -> None:
        self.entries.extend(other.entries)

    def __len__(self) -> int:
        return len(self.entries)

    async def flush(self, client: Client, url: str = "", *, ids: bool = True) -> list[str]:
        """Write everything, in order per stream; raises if any write failed, keeping
        the entries of the streams not written (same message ids) for a retry.

        All entries for one stream go in one ``XADD_MANY`` script call (one command, one
        reply), and the streams are written concurrently. Returns the new ids in the
        order the entries were added (none with ``ids=False``).
        """
        if not self.entries:
            return []
        groups: dict[str, list[int]] = {}
        for index, (stream, _) in enumerate(self.entries):
            groups.setdefault(stream, []).append(index)
        xadd_many = Lua(client, XADD_MANY)

        async def write(stream: str, indexes: list[int]) -> list[Any]:
            if len(indexes) == 1:
                return [await client.xadd(stream, self.entries[indexes[0]][1])]  # type: ignore[arg-type]
            args: list[Any] = []
            append, extend, entries = args.append, args.extend, self.entries
            for i in indexes:
                fields = entries[i][1]
                append(len(fields) * 2)
                extend(chain.from_iterable(fields.items()))
            return list(await xadd_many(keys=[stream], args=args))

        written = await asyncio.gather(
            *(write(s, ix) for s, ix in groups.items()), return_exceptions=True
        )
        errors = [w for w in written if isinstance(w, BaseException)]
        if errors:  # keep only the streams not written, so a retry adds no copies
            failed = {
                i
                for ix, w in zip(groups.values(), written, strict=True)
                if isinstance(w, BaseException)
                for i in ix
            }
            self.entries = [e for i, e in enumerate(self.entries) if i in failed]
            raise errors[0]
        out: list[str] = [""] * len(self.entries) if ids else []
        for indexes, new_ids in zip(groups.values(), written, strict=True):
            assert not isinstance(new_ids, BaseException)
            for i, new_id in zip(indexes, new_ids, strict=True) if ids else ():
                out[i] = new_id.decode() if isinstance(new_id, bytes) else str(new_id)
        self.entries.clear()
        return out


class Producer:
    """Publishes payloads to stages."""

    def __init__(self, client: Client, codec: Codec, url: str = "") -> None:
        self.client = client
        self.codec = codec
        self.url = url

    def outbox(self) -> Outbox:
        return Outbox(self.codec)

    async def publish(
        self,
        route: Route,
        payloads: Iterable[BaseModel],
        *,
        partition_key: Callable[[BaseModel], str] | None = None,
        priority: bool = False,
        trace: str | None = None,
    ) -> list[str]:
        box = self.outbox()
        for payload in payloads:
            key = partition_key(payload) if partition_key else ""
            box.add(route, payload, partition_key=key, priority=priority, trace=trace)
        return await box.flush(self.client, self.url)

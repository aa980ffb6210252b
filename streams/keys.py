"""Every Redis key trackstream uses, built in one place. This docstring is the key map.

A stage (or one shard of a stage) owns one Redis Cluster hash tag, ``{stage}`` or
``{stage.N}``, so all of its keys hash to one slot. That is what lets a dead-letter
move (``XADD`` to the dead-letter stream + ``XACK`` on the stream) run as one atomic
Lua script on a cluster. Different stages and shards use different tags and so
spread across slots. ``prefix`` separates deployments sharing one Redis.

======================================  ======  ==============================================
key                                     type    what
======================================  ======  ==============================================
``{p}:{stage}:stream``                  stream  the stage's input; consumer group ``stage``
``{p}:{stage}:priority``                stream  urgent lane, served before ``stream``
``{p}:{stage}:dlq``                     stream  dead letters: origin id, category, error, fields
``{p}:{stage}:redriven``                set     dead-letter ids already redriven (redrive once)
``{p}:{stage}:heartbeats``              hash    consumer name -> last heartbeat (unix ms)
``{p}:{stage}:lease:{consumer}``        string  holder token of a consumer name (``SET NX PX``)
``{p}:{stage}:lock:{name}``             string  a named lock of the stage (``SET NX PX``)
``{p}:{stage}:fence:{name}``            string  fencing counter that goes with ``lock:{name}``
``{p}:{stage}:state:{name}``            string  small state a stage shares across its workers
``{p}:{stage}:ratelimit:{name}``        string  a rate limit shared by all workers (GCRA, µs)
``{p}:{stage}:info:{consumer}``         hash    a worker's host, pid, counts (TTL >= 10 min)
``{p}:{stage}:history:{minute}``        hash    the stage's counts in one minute (TTL ~1 h)
======================================  ======  ==============================================

With ``shards > 1`` the tag is ``{stage.0}`` ... ``{stage.N-1}``; the consumer group
is always named after the stage.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,39}$")


def check_name(kind: str, value: str) -> str:
    """Stage names and prefixes go into keys: keep them short and tag-safe."""
    if not _NAME.match(value):
        raise ValueError(
            f"{kind} {value!r} is not valid: use 1-40 lowercase letters, digits, '-' or '_', "
            "starting with a letter"
        )
    return value


@dataclass(frozen=True, slots=True)
class StageKeys:
    """The keys of one stage shard."""

    prefix: str
    stage: str
    shard: int = 0
    shards: int = 1

    def __post_init__(self) -> None:
        check_name("prefix", self.prefix)
        check_name("stage", self.stage)
        if not 0 <= self.shard < self.shards:
            raise ValueError(f"shard {self.shard} is outside 0..{self.shards - 1}")

    @property
    def tag(self) -> str:
        name = self.stage if self.shards == 1 else f"{self.stage}.{self.shard}"
        return "{" + name + "}"

    @property
    def group(self) -> str:
        return self.stage

    def _key(self, kind: str) -> str:
        return f"{self.prefix}:{self.tag}:{kind}"

    @property
    def stream(self) -> str:
        return self._key("stream")

    @property
    def priority(self) -> str:
        return self._key("priority")

    @property
    def dlq(self) -> str:
        return self._key("dlq")

    @property
    def redriven(self) -> str:
        return self._key("redriven")

    @property
    def heartbeats(self) -> str:
        return self._key("heartbeats")

    def lease(self, consumer: str) -> str:
        return self._key(f"lease:{consumer}")

    def lock(self, name: str) -> str:
        return self._key(f"lock:{name}")

    def fence(self, name: str) -> str:
        return self._key(f"fence:{name}")

    def state(self, name: str) -> str:
        return self._key(f"state:{name}")

    def ratelimit(self, name: str) -> str:
        return self._key(f"ratelimit:{name}")

    def info(self, consumer: str) -> str:
        return self._key(f"info:{consumer}")

    def history(self, minute: int) -> str:
        return self._key(f"history:{minute}")

    def streams(self) -> tuple[str, str]:
        """Input streams in the order they are served."""
        return (self.priority, self.stream)


def stage_shards(prefix: str, stage: str, shards: int = 1) -> list[StageKeys]:
    return [StageKeys(prefix, stage, i, shards) for i in range(shards)]


def shard_for(partition_key: str, shards: int) -> int:
    """Stable shard of a partition key (crc32, not Python's salted hash)."""
    if shards == 1:
        return 0
    import zlib

    return zlib.crc32(partition_key.encode()) % shards

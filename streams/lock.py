"""A lease lock (``SET NX PX``) with a fencing number.

``acquire`` returns a fencing number that increases with every new holder; a holder
passes it along with its writes so a store can reject a stale holder's writes. The
same holder re-acquiring extends its lease and keeps its number.
"""

from __future__ import annotations

import os
import secrets
import socket

from streams.connection import Client
from streams.keys import StageKeys
from streams.scripts import ACQUIRE_LOCK, RELEASE_LOCK, Lua


class LeaseLock:
    def __init__(self, client: Client, keys: StageKeys, name: str, ttl_ms: int, url: str = ""):
        self.client = client
        self.key = keys.lock(name)
        self.fence_key = keys.fence(name)
        self.ttl_ms = ttl_ms
        self.url = url
        self.token = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        # EVALSHA/EVAL on the lock's own node: redis-py's scripts load on every master,
        # so one frozen master would stall every lease (and every worker's trimmer)
        self._acquire = Lua(client, ACQUIRE_LOCK)
        self._release = Lua(client, RELEASE_LOCK)
        self.fence: int | None = None

    async def acquire(self) -> int | None:
        """The fencing number if we hold the lock now, else None."""
        got = await self._acquire(keys=[self.key, self.fence_key], args=[self.token, self.ttl_ms])
        self.fence = int(got) if got else None
        return self.fence

    async def release(self) -> bool:
        released = await self._release(keys=[self.key], args=[self.token])
        self.fence = None
        return bool(released)

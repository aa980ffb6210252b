"""A worker: one process's consumers for a stage, with a stable name and heartbeats.

Consumer names are stable across restarts: ``{host}-{n}`` with the lowest ``n`` whose
lease (``SET NX PX``) is free, or free because the process that held it on this host
is gone. A worker restarted on the same host therefore takes its old name back and
re-reads its own pending entries at once; one on another host gets a new name, and
the old name's entries are claimed after ``claim_idle_ms``.

Signal handlers are installed by :func:`run_until_signal`, never by constructors.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import time
import weakref
from collections.abc import Sequence

from streams.connection import Client, translate
from streams.consumer import BatchHandler, Consumer, Gate, Handler
from streams.errors import StreamsError
from streams.keys import StageKeys, check_name
from streams.message import Codec
from streams.middleware import Middleware
from streams.producer import Route
from streams.settings import StreamSettings

log = logging.getLogger("streams.worker")


# this process's workers by token: a lease with our pid but none of these tokens was
# left by a predecessor (in a container, every restart may get the same pid)
_workers_here: weakref.WeakValueDictionary[str, Worker] = weakref.WeakValueDictionary()


def _holder_gone(pid: int, token: str) -> bool:
    if pid == os.getpid():
        return token not in _workers_here
    return not _pid_alive(pid)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Worker:
    def __init__(
        self,
        client: Client,
        settings: StreamSettings,
        route: Route,
        codec: Codec,
        *,
        handler: Handler | None = None,
        batch_handler: BatchHandler | None = None,
        consumer: str | None = None,
        shards: Sequence[int] | None = None,
        middleware: Sequence[Middleware] = (),
        gate: Gate | None = None,
    ) -> None:
        self.client = client
        self.settings = settings
        self.route = route
        self.codec = codec
        self.handler = handler
        self.batch_handler = batch_handler
        self.requested_name = check_name("consumer", consumer) if consumer else None
        self.shards = list(shards) if shards is not None else list(range(route.shards))
        self.middleware = tuple(middleware)
        self.gate = gate
        self.stop_event = asyncio.Event()
        self.name: str | None = None
        self.consumers: list[Consumer] = []
        self._token = f"{socket.gethostname()}:{os.getpid()}:{time.time_ns()}"
        _workers_here[self._token] = self
        self._lease_keys = StageKeys(route.prefix, route.stage, 0, route.shards)

    @property
    def handled(self) -> int:
        return sum(c.handled for c in self.consumers)

    def stop(self) -> None:
        self.stop_event.set()

    async def run(self, *, burst: bool = False) -> None:
        self.name = await self._acquire_name()
        self.consumers = [
            Consumer(
                self.client,
                self.settings,
                StageKeys(self.route.prefix, self.route.stage, s, self.route.shards),
                self.codec,
                name=self.name,
                handler=self.handler,
                batch_handler=self.batch_handler,
                middleware=self.middleware,
                stop=self.stop_event,
                gate=self.gate,
            )
            for s in self.shards
        ]
        await self._heartbeat_once()
        log.info(
            "%s: consumer %s started (pid %d), reading %s",
            self.route.stage,
            self.name,
            os.getpid(),
            ", ".join(c.keys.stream for c in self.consumers),
        )
        done = asyncio.Event()
        beat = asyncio.create_task(self._heartbeats(done))
        try:
            await asyncio.gather(*(c.run(burst=burst) for c in self.consumers))
        finally:
            done.set()  # not cancel(): a beat in flight finishes its command
            await beat
            if self.stop_event.is_set():
                await self._release_name()

    async def _acquire_name(self) -> str:
        ttl_ms = self.settings.consumer_dead_after_ms
        url = self.settings.redis_url
        if self.requested_name:
            with translate(url):
                await self.client.set(
                    self._lease_keys.lease(self.requested_name), self._token, px=ttl_ms
                )
            return self.requested_name
        host = check_name("consumer", socket.gethostname().lower().split(".")[0][:30] or "host")
        me = socket.gethostname()
        for n in range(1000):
            name = f"{host}-{n}"
            key = self._lease_keys.lease(name)
            with translate(url):
                if await self.client.set(key, self._token, px=ttl_ms, nx=True):
                    return name
                holder = await self.client.get(key)
            if holder is None:
                continue
            text = holder.decode(errors="replace") if isinstance(holder, bytes) else str(holder)
            h_host, _, rest = text.partition(":")
            pid = int(rest.split(":")[0]) if rest.split(":")[0].isdigit() else 0
            if h_host == me and pid and _holder_gone(pid, text):
                with translate(url):
                    # take over only if it is still that dead holder's lease
                    if (
                        await self.client.set(key, self._token, px=ttl_ms, xx=True, get=True)
                        == holder
                    ):
                        log.info("taking over consumer name %s from dead pid %d", name, pid)
                        return name
        raise StreamsError("no free consumer name (1000 leases held)")

    async def _heartbeat_once(self) -> None:
        assert self.name is not None
        now_ms = time.time_ns() // 1_000_000
        with translate(self.settings.redis_url):
            pipe = self.client.pipeline(transaction=False)
            pipe.set(
                self._lease_keys.lease(self.name),
                self._token,
                px=self.settings.consumer_dead_after_ms,
            )
            for c in self.consumers:
                pipe.hset(c.keys.heartbeats, self.name, now_ms)
            await pipe.execute()

    async def _heartbeats(self, done: asyncio.Event) -> None:
        interval_s = self.settings.heartbeat_interval_ms / 1000
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(done.wait(), interval_s)
            if done.is_set():
                return
            try:
                await self._heartbeat_once()
            except StreamsError as exc:
                log.warning("heartbeat failed: %s", exc)

    async def _release_name(self) -> None:
        if self.name is None:
            return
        with contextlib.suppress(StreamsError), translate(self.settings.redis_url):
            key = self._lease_keys.lease(self.name)
            if await self.client.get(key) == self._token.encode():
                await self.client.delete(key)


async def run_until_signal(*workers: Worker, burst: bool = False) -> None:
    """Run workers until SIGTERM/SIGINT, then stop them gracefully."""
    loop = asyncio.get_running_loop()

    def stop_all() -> None:
        log.info("stop requested: finishing in-flight work")
        for w in workers:
            w.stop()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop_all)
    try:
        await asyncio.gather(*(w.run(burst=burst) for w in workers))
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)

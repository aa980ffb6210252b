"""A worker: one process's consumers for a stage, with a stable name and heartbeats.

Consumer names are stable across restarts: ``{host}-{n}`` with the lowest ``n`` whose
lease (``SET NX PX``) is free, or free because the process that held it on this host
is gone. A worker restarted on the same host therefore takes its old name back and
re-reads its own pending entries at once; one on another host gets a new name, and
the old name's entries are claimed by a live peer once it is known dead.

Heartbeats: every ``heartbeat_interval_ms`` the worker renews its name's lease and
writes Redis's time (not the host's) into each shard's heartbeats hash; peers take a
consumer as dead after ``consumer_dead_after_ms`` without one (see
:mod:`streams.consumer`). A beat that fails, for whatever reason, is logged with the
worker's name, counted (``on_heartbeat_failed``) and tried again sooner; the loop
never ends before the worker does. A worker whose beats have failed for half of
``consumer_dead_after_ms`` knows its peers will soon take it for dead: it reads and
claims nothing new (its gate stays closed) until a beat gets through, instead of
consuming what they are about to claim.

Retention: each worker also runs a :class:`~streams.trimmer.Trimmer` over its shards
(one process per shard trims, by lease), so the streams stay bounded.

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
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

from streams.activity import Activity
from streams.connection import Client, refresh_topology
from streams.consumer import BatchHandler, Consumer, Gate, Handler
from streams.errors import RedisUnavailable, StreamsError
from streams.faults import classify, describe
from streams.keys import StageKeys, check_name
from streams.message import Codec
from streams.middleware import Middleware
from streams.producer import Route
from streams.retries import backoff
from streams.scripts import HEARTBEAT
from streams.settings import StreamSettings
from streams.trimmer import Trimmer

log = logging.getLogger("streams.worker")
T = TypeVar("T")


# this process's workers by token: a lease with our pid but none of these tokens was
# left by a predecessor (in a container, every restart may get the same pid)
_workers_here: weakref.WeakValueDictionary[str, Worker] = weakref.WeakValueDictionary()


def cancelling() -> bool:
    """True while the current task is being cancelled (then finally blocks must not
    wait on Redis again)."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


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
        self.activity = Activity()  # counts for the console, written with each heartbeat
        self.middleware = (*middleware, self.activity)
        self.gate = gate
        self.heartbeat_failures = 0
        self._beat_ok_at = time.monotonic()
        self._beat_fresh = asyncio.Event()
        self._beat_fresh.set()
        self.stop_event = asyncio.Event()
        self.name: str | None = None
        self.consumers: list[Consumer] = []
        self.trimmer: Trimmer | None = None
        self._token = f"{socket.gethostname()}:{os.getpid()}:{time.time_ns()}"
        _workers_here[self._token] = self
        self._lease_keys = StageKeys(route.prefix, route.stage, 0, route.shards)

    @property
    def handled(self) -> int:
        return sum(c.handled for c in self.consumers)

    def stop(self) -> None:
        self.stop_event.set()

    async def run(self, *, burst: bool = False) -> None:
        name = await self._starting(self._acquire_name)
        if name is None:  # stopped before Redis could be reached
            return
        self.name = name
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
                gate=self._gate,
            )
            for s in self.shards
        ]
        await self._starting(self._heartbeat_once)
        self._beat_ok_at = time.monotonic()
        log.info(
            "%s: consumer %s started (pid %d), reading %s",
            self.route.stage,
            self.name,
            os.getpid(),
            ", ".join(c.keys.stream for c in self.consumers),
        )
        done = asyncio.Event()
        beat = asyncio.create_task(self._heartbeats(done))
        self.trimmer = Trimmer(
            self.client, self.settings, [c.keys for c in self.consumers], owner=self.name
        )
        trim = asyncio.create_task(self.trimmer.run(done))
        try:
            await asyncio.gather(*(c.run(burst=burst) for c in self.consumers))
        finally:
            if cancelling():  # given up on (Redis silent): no more Redis calls
                beat.cancel()
                trim.cancel()
            else:
                done.set()  # not cancel(): a beat in flight finishes its command
                await beat
                await trim
                if self.stop_event.is_set():
                    await self._release_name()

    async def _starting(self, step: Callable[[], Awaitable[T]]) -> T | None:
        """Run a startup step until it succeeds; a Redis fault (a failover, a cluster
        still electing) is waited out like in the consumers. None if stopped first."""
        failures = 0
        while not self.stop_event.is_set():
            try:
                return await step()
            except Exception as exc:
                verdict = classify(exc)
                if verdict.kind == "bug" and not isinstance(exc, RedisUnavailable):
                    raise
                failures += 1
                log.warning("worker start: %s (%s); retrying", describe(exc), verdict.reason)
                if verdict.refresh:
                    await refresh_topology(self.client)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(
                        self.stop_event.wait(), backoff(failures, 0.05, 2.0, jitter="none")
                    )
        return None

    async def _acquire_name(self) -> str:
        ttl_ms = self.settings.consumer_dead_after_ms
        if self.requested_name:
            await self.client.set(
                self._lease_keys.lease(self.requested_name), self._token, px=ttl_ms
            )
            return self.requested_name
        host = check_name("consumer", socket.gethostname().lower().split(".")[0][:30] or "host")
        me = socket.gethostname()
        for n in range(1000):
            name = f"{host}-{n}"
            key = self._lease_keys.lease(name)
            if await self.client.set(key, self._token, px=ttl_ms, nx=True):
                return name
            holder = await self.client.get(key)
            if holder is None:
                continue
            text = holder.decode(errors="replace") if isinstance(holder, bytes) else str(holder)
            h_host, _, rest = text.partition(":")
            pid = int(rest.split(":")[0]) if rest.split(":")[0].isdigit() else 0
            # take over only if it is still that dead holder's lease
            if (
                h_host == me
                and pid
                and _holder_gone(pid, text)
                and await self.client.set(key, self._token, px=ttl_ms, xx=True, get=True) == holder
            ):
                log.info("taking over consumer name %s from dead pid %d", name, pid)
                return name
        raise StreamsError("no free consumer name (1000 leases held)")

    async def _heartbeat_once(self) -> None:
        assert self.name is not None
        await self.client.set(
            self._lease_keys.lease(self.name),
            self._token,
            px=self.settings.consumer_dead_after_ms,
        )
        for c in self.consumers:  # Redis's time, not ours. EVAL: on a cluster,
            # loading a script (EVALSHA's fallback) needs every master up
            await self.client.eval(HEARTBEAT, 1, c.keys.heartbeats, self.name)
        await self._write_activity()

    async def _write_activity(self) -> None:
        """The console's info hash and history; a failure here never fails the beat."""
        assert self.name is not None
        try:
            pipe = self.client.pipeline(transaction=False)
            self.activity.write(
                pipe,
                self._lease_keys,
                self.name,
                time.time_ns() // 1_000_000,
                self.settings.consumer_dead_after_ms,
            )
            await pipe.execute()
            self.activity.sent()
        except Exception as exc:
            log.debug("could not write the worker's activity: %s", exc)

    @property
    def beat_stale(self) -> bool:
        """No beat got through for half of consumer_dead_after_ms: peers may soon take
        this worker for dead."""
        age_s = time.monotonic() - self._beat_ok_at
        return age_s * 1000 > self.settings.consumer_dead_after_ms / 2

    @property
    def paused(self) -> bool:
        """Its consumers wait at their gate for a beat to get through."""
        return not self._beat_fresh.is_set()

    async def _gate(self) -> None:
        """The consumers' gate: a fresh heartbeat, then the stage's own gate."""
        if self.beat_stale:
            self._beat_fresh.clear()
            await self._beat_fresh.wait()
        if self.gate is not None:
            await self.gate()

    async def _heartbeats(self, done: asyncio.Event) -> None:
        interval_s = self.settings.heartbeat_interval_ms / 1000
        wait_s = interval_s
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(done.wait(), wait_s)
            if done.is_set():
                return
            try:
                await self._heartbeat_once()
            except Exception as exc:  # whatever it is, the next beat is tried
                self._beat_failed(exc)
                wait_s = min(interval_s, 0.5)
                continue
            wait_s = interval_s
            if not self._beat_fresh.is_set():
                log.warning("%s/%s: heartbeat back; reading again", self.route.stage, self.name)
            self._beat_ok_at = time.monotonic()
            self._beat_fresh.set()

    def _beat_failed(self, exc: Exception) -> None:
        self.heartbeat_failures += 1
        age_s = time.monotonic() - self._beat_ok_at
        stale = self.beat_stale
        log.log(
            logging.ERROR if stale else logging.WARNING,
            "%s/%s: heartbeat failed (%d so far, last one through %.1f s ago)%s: %s: %s",
            self.route.stage,
            self.name,
            self.heartbeat_failures,
            age_s,
            "; peers will soon take this worker for dead, so it reads nothing new until "
            "a beat gets through"
            if stale
            else "",
            type(exc).__name__,
            exc,
            exc_info=not isinstance(exc, StreamsError),
        )
        for mw in self.middleware:
            try:
                mw.on_heartbeat_failed(self.route.stage, self.name or "", exc)
            except Exception:  # observers must never break the heartbeat
                log.exception("middleware %s.on_heartbeat_failed failed", type(mw).__name__)

    async def _release_name(self) -> None:
        if self.name is None:
            return
        with contextlib.suppress(StreamsError):
            key = self._lease_keys.lease(self.name)
            if await self.client.get(key) == self._token.encode():
                await self.client.delete(key)


async def run_until_signal(*workers: Worker, burst: bool = False) -> None:
    """Run workers until SIGTERM/SIGINT, then stop them gracefully.

    After the signal the workers get ``shutdown_grace_ms`` for their handlers plus
    :data:`STOP_MARGIN_S` to hand back and clean up; if Redis does not answer in that
    time (a silent or paused server), the remaining work is cancelled and the
    process ends anyway: whatever was not acked is claimed by another worker.
    """
    loop = asyncio.get_running_loop()
    stopped = asyncio.Event()

    def stop_all() -> None:
        log.info("stop requested: finishing in-flight work")
        for w in workers:
            w.stop()
        stopped.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop_all)
    running: asyncio.Future[Any] = asyncio.ensure_future(
        asyncio.gather(*(w.run(burst=burst) for w in workers))
    )
    try:
        waiter: asyncio.Future[Any] = asyncio.ensure_future(stopped.wait())
        await asyncio.wait({running, waiter}, return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        if not running.done():
            grace_s = max(w.settings.shutdown_grace_ms for w in workers) / 1000
            done, _ = await asyncio.wait({running}, timeout=grace_s + STOP_MARGIN_S)
            if not done:
                log.error(
                    "workers did not stop within %.1f s (Redis not answering?); "
                    "exiting anyway, unacked entries will be claimed by other workers",
                    grace_s + STOP_MARGIN_S,
                )
                running.cancel()  # cancelled workers skip their Redis clean-up
                await asyncio.wait({running}, timeout=STOP_MARGIN_S)
                return
        await running
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        if not running.done():
            running.cancel()


# time a stopping worker gets on top of shutdown_grace_ms to hand back and clean up
STOP_MARGIN_S = 3.0

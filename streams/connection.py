"""One factory for Redis clients, and the one place driver errors are translated.

``redis://`` and ``rediss://`` (TLS) URLs, passwords and ACL users in the URL, and
cluster mode (``redis_cluster=True``). In cluster mode ``redis_url`` may list several
seed nodes, comma-separated: ``redis://:pw@10.0.0.1:6379,10.0.0.2:6379,10.0.0.3:6379``
(a bare ``host:port`` takes scheme, user, password and options from the first URL).
The client discovers the cluster from whichever seed answers, so a dead seed (a
master that was failed over) does not keep new processes from starting.

Every connection has a connect timeout (``connect_timeout_ms``) and a read timeout
(``socket_timeout_ms`` + ``block_ms``, so blocking reads do not trip it).
:func:`probe` checks, once at startup with a short timeout, that a Redis answers at
all; a silent port or one that speaks another protocol is then one clear error
instead of a hang.

The error boundary: the clients :func:`connect` returns translate every driver error
of a command or a pipeline into the runtime's own (:func:`streams.faults.to_streams_error`:
:class:`~streams.errors.GroupMissing`, :class:`~streams.errors.RedisUnavailable`,
:class:`~streams.errors.RedisCommandError`), so no caller sees a redis-py exception.
What each error means for a running loop is decided in :mod:`streams.faults`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, TypeAlias
from urllib.parse import urlsplit, urlunsplit

import redis.asyncio as aioredis
from redis import exceptions as rex
from redis.asyncio.client import Pipeline
from redis.asyncio.cluster import ClusterNode, ClusterPipeline, RedisCluster
from redis.asyncio.connection import Connection
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff, NoBackoff

from streams.errors import GroupMissing, RedisCommandError, RedisUnavailable
from streams.faults import classify, describe, to_streams_error
from streams.settings import StreamSettings, seed_urls

Client: TypeAlias = "aioredis.Redis | RedisCluster"

log = logging.getLogger("streams.connection")

try:
    import hiredis
except ImportError:  # pragma: no cover - hiredis is a declared dependency
    hiredis = None  # type: ignore[assignment,unused-ignore]


class HiredisPackConnection(Connection):
    """redis-py's asyncio connection packs commands in pure Python (its sync one uses
    hiredis); packing with hiredis roughly doubles pipelined XADD throughput."""

    def pack_command(self, *args: Any) -> list[bytes]:
        if isinstance(args[0], str):
            args = (*args[0].encode().split(), *args[1:])
        return [hiredis.pack_command(args)]


def redact(url: str) -> str:
    """The URL (or comma-separated seed list) without passwords, fit for logs and errors."""
    return ",".join(_redact_one(u) for u in url.split(","))


def _redact_one(url: str) -> str:
    if "://" not in url:
        return url
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    netloc = f"{user}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


class _Translating:
    """Translates the driver's errors (see the module docstring); ``_url`` is the
    redacted URL the errors name."""

    _url = ""

    def _error(self, exc: Exception, command: tuple[Any, ...]) -> Exception:
        return to_streams_error(exc, self._url, command)


class TrackstreamRedis(_Translating, aioredis.Redis):  # type: ignore[misc]
    """redis-py's asyncio client behind the runtime's error boundary."""

    async def execute_command(self, *args: Any, **options: Any) -> Any:
        try:
            return await super().execute_command(*args, **options)  # type: ignore[no-untyped-call]
        except Exception as exc:
            error = self._error(exc, args)
            if error is exc:
                raise
            raise error from exc

    def pipeline(self, transaction: bool = True, shard_hint: str | None = None) -> Pipeline:
        pipe = TranslatingPipeline(
            self.connection_pool, self.response_callbacks, transaction, shard_hint
        )
        pipe._url = self._url
        return pipe


class TranslatingPipeline(_Translating, Pipeline):  # type: ignore[misc]
    async def execute(self, raise_on_error: bool = True) -> list[Any]:
        try:
            return await super().execute(raise_on_error)
        except Exception as exc:
            error = self._error(exc, ())
            if error is exc:
                raise
            raise error from exc


class TranslatingClusterPipeline(_Translating, ClusterPipeline):  # type: ignore[misc]
    async def execute(
        self, raise_on_error: bool = True, allow_redirections: bool = True
    ) -> list[Any]:
        try:
            return await super().execute(raise_on_error, allow_redirections)
        except Exception as exc:
            error = self._error(exc, ())
            if error is exc:
                raise
            raise error from exc


class TrackstreamCluster(_Translating, RedisCluster):  # type: ignore[misc]
    """redis-py's asyncio cluster client, routing XREADGROUP/XREAD by their keys' slot.

    For commands with "movable keys" (XREADGROUP, XREAD) redis-py asks one node
    (``commands_parser.node``, the default node when the client initialised) for the
    keys with ``COMMAND GETKEYS`` on every call, outside its retry loop. When that
    node dies, every read fails with a connection error before it is even routed,
    and as nothing marks the client for re-initialisation it never picks another
    node: a stage whose own master is fine stalls until the dead node is back.
    The keys of XREADGROUP/XREAD are simply the first half of what follows
    ``STREAMS``; computing their slot here needs no round trip to any node.
    """

    _last_refresh = 0.0

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return await super().execute_command(*args, **kwargs)
        except Exception as exc:
            error = self._error(exc, args)
            if error is exc:
                raise
            raise error from exc

    def pipeline(self, transaction: Any | None = None, shard_hint: Any | None = None) -> Any:
        if shard_hint:
            return super().pipeline(transaction, shard_hint)  # raises, as redis-py does
        pipe = TranslatingClusterPipeline(self, transaction)  # type: ignore[abstract]
        pipe._url = self._url
        return pipe

    async def _determine_slot(self, command: str, *args: Any) -> int:
        keys = _stream_keys(command, args)
        if keys:
            slots = {self.keyslot(k) for k in keys}
            if len(slots) != 1:
                raise rex.RedisClusterException(f"{command}: keys in different slots")
            return slots.pop()
        return await super()._determine_slot(command, *args)

    async def refresh(self, min_interval_s: float = 1.0) -> None:
        """Re-read the cluster's slots from any reachable node (at most once per
        ``min_interval_s``); nodes still serving keep their connections."""
        now = time.monotonic()
        if now - self._last_refresh < min_interval_s:
            return
        self._last_refresh = now
        try:
            await self.nodes_manager.initialize()
            node = self.nodes_manager.default_node
            if node is not None:
                self.commands_parser.node = node  # where COMMAND GETKEYS still goes
        except Exception as exc:  # still down: the next refresh will try again
            log.debug("cluster topology refresh failed: %s", describe(exc))


def _stream_keys(command: Any, args: tuple[Any, ...]) -> list[Any]:
    name = command.decode() if isinstance(command, bytes) else str(command)
    name = name.upper()
    if name == "XREADGROUP":
        start = 3  # GROUP group consumer
    elif name == "XREAD":
        start = 0
    else:
        return []
    for i in range(start, len(args)):
        word = args[i].decode() if isinstance(args[i], bytes) else str(args[i])
        if word.upper() == "STREAMS":
            rest = args[i + 1 :]
            return list(rest[: len(rest) // 2]) if rest and len(rest) % 2 == 0 else []
    return []


async def refresh_topology(client: Client) -> None:
    """After a transient error: let a cluster client re-learn who serves which slot."""
    if isinstance(client, TrackstreamCluster):
        await client.refresh()


def _retry(settings: StreamSettings) -> Retry:
    return Retry(
        ExponentialWithJitterBackoff(
            base=settings.connect_backoff_base_ms / 1000, cap=settings.connect_backoff_max_ms / 1000
        ),
        settings.connect_retries,
    )


def connect(settings: StreamSettings) -> Client:
    """A client for the configured Redis (not yet connected: the first command connects)."""
    retry = _retry(settings)
    # blocking reads must not trip the socket timeout
    timeout_s = (settings.socket_timeout_ms + settings.block_ms) / 1000
    connect_s = settings.connect_timeout_ms / 1000
    seeds = seed_urls(settings.redis_url)
    if settings.redis_cluster:
        others = [urlsplit(u) for u in seeds[1:]]
        cluster = TrackstreamCluster.from_url(
            seeds[0],
            startup_nodes=[ClusterNode(p.hostname or "", p.port or 6379) for p in others],
            retry=retry,
            socket_timeout=timeout_s,
            socket_connect_timeout=connect_s,
            socket_keepalive=True,
        )
        cluster._url = redact(settings.redis_url)  # type: ignore[attr-defined]
        return cluster
    extra: dict[str, Any] = {}
    if hiredis is not None and seeds[0].startswith("redis://"):
        extra["connection_class"] = HiredisPackConnection
    client = TrackstreamRedis.from_url(
        seeds[0],
        **extra,
        retry=retry,
        retry_on_error=[rex.ConnectionError, rex.TimeoutError],
        socket_timeout=timeout_s,
        socket_connect_timeout=connect_s,
        socket_keepalive=True,
        health_check_interval=30,
    )
    client._url = redact(settings.redis_url)  # type: ignore[attr-defined]
    return client


async def probe(settings: StreamSettings) -> None:
    """Check once, quickly, that a Redis answers at one of the seed URLs.

    All seeds are tried at once; each gets ``connect_timeout_ms`` to accept and as long
    to answer PING, without retries. Raises :class:`RedisUnavailable` (one line, URL
    without password) if none does: refused, silent, not speaking Redis, or refusing
    the login.
    """
    timeout_s = settings.connect_timeout_ms / 1000
    seeds = seed_urls(settings.redis_url)
    tasks = [asyncio.ensure_future(_ping(url, timeout_s)) for url in seeds]
    try:
        for next_done in asyncio.as_completed(tasks):  # all seeds at once: the first wins
            if await next_done is None:
                return
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    problems = [t.result() for t in tasks]
    if len(seeds) > 1:
        problems = [f"{redact(url)}: {p}" for url, p in zip(seeds, problems, strict=True)]
    raise RedisUnavailable(redact(settings.redis_url), ProbeFailed("; ".join(map(str, problems))))


async def _ping(url: str, timeout_s: float) -> str | None:
    """None if ``url`` answers PING, else what is wrong with it."""
    client = aioredis.Redis.from_url(
        url,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        retry=Retry(NoBackoff(), 0),
        single_connection_client=True,
    )
    try:
        async with asyncio.timeout(timeout_s * 2 + 1):  # a backstop for the socket's
            await client.ping()
        return None
    except (TimeoutError, rex.TimeoutError):
        return f"no reply within {timeout_s:g} s"
    except rex.InvalidResponse as exc:
        return f"does not speak the Redis protocol ({_short(exc)})"
    except Exception as exc:
        return _short(exc)
    finally:
        try:
            async with asyncio.timeout(1):
                await client.aclose()
        except Exception:  # closing a broken connection: nothing left to do
            log.debug("closing the probe connection failed", exc_info=True)


class ProbeFailed(Exception):
    """No seed URL answered like a Redis."""


def _short(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[:160]


def is_transient(exc: BaseException) -> bool:
    return classify(exc).transient


@contextmanager
def translate(url: str, stream: str = "", group: str = "") -> Iterator[None]:
    """For a client not made by :func:`connect` (those translate by themselves): map
    redis-py errors to the runtime's own: NOGROUP -> GroupMissing, whatever
    :func:`streams.faults.classify` calls transient -> RedisUnavailable; the rest as
    it is."""
    try:
        yield
    except (GroupMissing, RedisUnavailable):
        raise
    except Exception as exc:
        verdict = classify(exc)
        if verdict.kind == "group-missing":
            raise GroupMissing(stream, group) from exc
        if verdict.transient:
            raise RedisUnavailable(redact(url), exc) from exc
        raise


async def ensure_group(
    client: Client, url: str, stream: str, group: str, start_id: str = "0"
) -> bool:
    """Create ``group`` on ``stream`` (and the stream). True if it was created now.

    Only ``BUSYGROUP`` (it exists already) is tolerated; any other error propagates.
    """
    try:
        with translate(url, stream, group):
            await client.xgroup_create(stream, group, id=start_id, mkstream=True)
    except (RedisCommandError, rex.ResponseError) as exc:
        if str(exc).startswith("BUSYGROUP"):
            return False
        raise
    return True

"""One factory for Redis clients, and the one place driver errors are translated.

``redis://`` and ``rediss://`` (TLS) URLs, passwords and ACL users in the URL, and
cluster mode (``redis_cluster=True``: a ``RedisCluster`` that discovers the other
nodes from the one in the URL). Connection errors are retried by redis-py with
exponential backoff and jitter; what is still failing surfaces as
:class:`~streams.errors.RedisUnavailable`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, TypeAlias
from urllib.parse import urlsplit, urlunsplit

import redis.asyncio as aioredis
from redis import exceptions as rex
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import Connection
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff

from streams.errors import GroupMissing, RedisUnavailable
from streams.settings import StreamSettings

Client: TypeAlias = "aioredis.Redis | RedisCluster"

_TRANSIENT = (rex.ConnectionError, rex.TimeoutError, rex.ClusterDownError, rex.TryAgainError)


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
    """The URL without its password, fit for logs and error messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    netloc = f"{user}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def connect(settings: StreamSettings) -> Client:
    """A client for the configured Redis (not yet connected: the first command connects)."""
    retry = Retry(
        ExponentialWithJitterBackoff(
            base=settings.connect_backoff_base_ms / 1000, cap=settings.connect_backoff_max_ms / 1000
        ),
        settings.connect_retries,
    )
    # blocking reads must not trip the socket timeout
    timeout_s = (settings.socket_timeout_ms + settings.block_ms) / 1000
    if settings.redis_cluster:
        return RedisCluster.from_url(
            settings.redis_url,
            retry=retry,
            socket_timeout=timeout_s,
            socket_connect_timeout=settings.socket_timeout_ms / 1000,
        )
    extra: dict[str, Any] = {}
    if hiredis is not None and settings.redis_url.startswith("redis://"):
        extra["connection_class"] = HiredisPackConnection
    return aioredis.Redis.from_url(
        settings.redis_url,
        **extra,
        retry=retry,
        retry_on_error=[rex.ConnectionError, rex.TimeoutError],
        socket_timeout=timeout_s,
        socket_connect_timeout=settings.socket_timeout_ms / 1000,
        health_check_interval=30,
    )


def is_transient(exc: BaseException) -> bool:
    return isinstance(exc, _TRANSIENT | RedisUnavailable)


@contextmanager
def translate(url: str, stream: str = "", group: str = "") -> Iterator[None]:
    """Map redis-py errors to the runtime's own (the only place that catches them)."""
    try:
        yield
    except rex.ResponseError as exc:
        if str(exc).startswith("NOGROUP"):
            raise GroupMissing(stream, group) from exc
        raise
    except _TRANSIENT as exc:
        raise RedisUnavailable(redact(url), exc) from exc
    except rex.RedisClusterException as exc:  # no reachable node / slots not covered
        raise RedisUnavailable(redact(url), exc) from exc


async def ensure_group(
    client: Client, url: str, stream: str, group: str, start_id: str = "0"
) -> bool:
    """Create ``group`` on ``stream`` (and the stream). True if it was created now.

    Only ``BUSYGROUP`` (it exists already) is tolerated; any other error propagates.
    """
    try:
        with translate(url, stream, group):
            await client.xgroup_create(stream, group, id=start_id, mkstream=True)
    except rex.ResponseError as exc:
        if str(exc).startswith("BUSYGROUP"):
            return False
        raise
    return True

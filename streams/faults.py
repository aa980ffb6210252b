"""What an error from Redis means for a loop that keeps running: the one classifier.

Every loop of the runtime (reading, claiming, retries, heartbeats, shutdown, the
producer's flush, locks, rate limits) asks :func:`classify` what to do with an
exception it did not expect, and nothing else decides. There are three answers:

================  ===========================================================
``transient``     Redis (or a cluster node, or the path to it) is not able to
                  serve right now: wait with backoff, refresh the cluster's
                  topology (``refresh``), reconnect, try again. Connection
                  refused/reset/timed out, LOADING, READONLY, MASTERDOWN,
                  CLUSTERDOWN, TRYAGAIN, MOVED/ASK past redis-py's redirect
                  budget, slots not covered, ``UNBLOCKED`` (a blocked read
                  cut off by a failover or a slot migration), a garbled
                  reply, and errors raised inside the driver itself from a
                  broken connection (e.g. ``'NoneType' object has no
                  attribute 'writelines'``).
``group-missing``  NOGROUP: the stream or its consumer group vanished
                  (restart without persistence, FLUSHALL, a slot moved
                  without its keys): recreate it, loudly.
``bug``           anything else (WRONGTYPE, a syntax error, a bug of ours):
                  log it with its context, count it, back off, keep running.
================  ===========================================================

No answer ends the process: a worker rides out any Redis fault.
"""

from __future__ import annotations

import traceback
from dataclasses import dataclass
from typing import Any, Literal

from redis import exceptions as rex

from streams.errors import (
    GroupMissing,
    NoSuchKey,
    RedisCommandError,
    RedisUnavailable,
    StreamsError,
)

Kind = Literal["transient", "group-missing", "bug"]


@dataclass(frozen=True, slots=True)
class Verdict:
    kind: Kind
    reason: str  # short label for logs and the metric: "connection", "clusterdown", ...
    refresh: bool = False  # the cluster's topology may have changed: refresh it

    @property
    def transient(self) -> bool:
        return self.kind == "transient"


# reply prefixes that mean "not now" (ResponseErrors redis-py does not subclass all of)
_TRANSIENT_REPLIES = {
    "UNBLOCKED": ("unblocked", True),  # failover demoted the master, or the key moved away
    "CLUSTERDOWN": ("clusterdown", True),
    "TRYAGAIN": ("tryagain", True),
    "MOVED": ("moved", True),
    "ASK": ("ask", True),
    "LOADING": ("loading", False),
    "READONLY": ("readonly", True),  # wrote to a node that was demoted to a replica
    "MASTERDOWN": ("masterdown", True),
    "NOREPLICAS": ("noreplicas", False),
    "BUSY": ("busy", False),  # a long script; it ends or is killed
    "OOM": ("oom", False),  # maxmemory: consumers acking frees it
}

_DRIVER_PACKAGES = ("/redis/", "\\redis\\", "/hiredis/", "/asyncio/")


def classify(exc: BaseException) -> Verdict:
    """Sort one exception; see the module docstring for the three kinds."""
    if isinstance(exc, GroupMissing):
        return Verdict("group-missing", "nogroup")
    if isinstance(exc, RedisUnavailable):
        cause = exc.__cause__
        if cause is not None and cause is not exc:
            inner = classify(cause)
            if inner.transient:
                return inner
        return Verdict("transient", "unavailable", refresh=True)
    if isinstance(exc, RedisCommandError):
        cause = exc.__cause__
        if cause is not None and cause is not exc:
            return classify(cause)
        return Verdict("bug", "reply")
    if isinstance(exc, rex.ResponseError):
        return _reply(exc)
    if isinstance(exc, rex.BusyLoadingError):
        return Verdict("transient", "loading")
    if isinstance(exc, rex.AuthenticationError):
        return Verdict("transient", "auth")
    if isinstance(exc, rex.MaxConnectionsError):
        return Verdict("transient", "pool-exhausted")
    if isinstance(exc, rex.TimeoutError | TimeoutError):
        return Verdict("transient", "timeout", refresh=True)
    if isinstance(exc, rex.ConnectionError | ConnectionError | OSError):
        return Verdict("transient", "connection", refresh=True)
    if isinstance(exc, rex.SlotNotCoveredError):
        return Verdict("transient", "slot-not-covered", refresh=True)
    if isinstance(exc, rex.ClusterError):  # redirect budget ("TTL exhausted") spent
        return Verdict("transient", "redirects", refresh=True)
    if isinstance(exc, rex.RedisClusterException):
        # "Redis Cluster cannot be connected", "All slots are not covered", ...
        if any(s in str(exc) for s in ("same key slot", "different slots", "Missing key")):
            return Verdict("bug", "crossslot")
        return Verdict("transient", "cluster", refresh=True)
    if isinstance(exc, rex.InvalidResponse):  # garbled reply: drop the connection
        return Verdict("transient", "protocol", refresh=True)
    if isinstance(exc, AttributeError | TypeError | IndexError | KeyError) and _from_driver(exc):
        # redis-py's own state broken by a connection that died mid-command
        return Verdict("transient", "driver", refresh=True)
    return Verdict("bug", type(exc).__name__)


def _reply(exc: rex.ResponseError) -> Verdict:
    text = str(exc)
    if text.startswith("NOGROUP"):
        return Verdict("group-missing", "nogroup")
    if isinstance(exc, rex.MasterDownError):
        return Verdict("transient", "masterdown", refresh=True)
    if isinstance(exc, rex.ClusterDownError):
        return Verdict("transient", "clusterdown", refresh=True)
    if isinstance(exc, rex.TryAgainError):
        return Verdict("transient", "tryagain", refresh=True)
    if isinstance(exc, rex.ReadOnlyError):
        return Verdict("transient", "readonly", refresh=True)
    if isinstance(exc, rex.MovedError | rex.AskError):
        return Verdict("transient", "moved", refresh=True)
    word = text.split(" ", 1)[0].upper()
    if word in _TRANSIENT_REPLIES:
        reason, refresh = _TRANSIENT_REPLIES[word]
        return Verdict("transient", reason, refresh)
    if "master -> replica" in text or "no longer exists" in text:
        return Verdict("transient", "unblocked", refresh=True)
    return Verdict("bug", f"reply-{word.lower()[:20]}")


def _from_driver(exc: BaseException) -> bool:
    """True if the innermost frame of ``exc`` is in redis-py (or asyncio's transports)."""
    frames = traceback.extract_tb(exc.__traceback__)
    return bool(frames) and any(p in frames[-1].filename for p in _DRIVER_PACKAGES)


# Redis (or the slot's master) cannot take the command now: says nothing about the entry
# being handled. Narrower than "transient": a handler's own TimeoutError or OSError (an
# HTTP source, the database) is not Redis being down.
_UNREACHABLE = (
    RedisUnavailable,
    rex.ConnectionError,
    rex.TimeoutError,
    rex.ClusterDownError,
    rex.TryAgainError,
    rex.MasterDownError,
    rex.ReadOnlyError,
    rex.OutOfMemoryError,
    rex.RedisClusterException,
)


def redis_down(exc: BaseException) -> bool:
    """Whether ``exc`` (or what it was raised from) says Redis is unreachable: work that
    failed for this keeps its deliveries (see :mod:`streams.consumer`)."""
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        if isinstance(cur, _UNREACHABLE):
            return True
        seen.add(id(cur))
        cur = cur.__cause__
    return False


def describe(exc: BaseException) -> str:
    """One line for a log: the exception's type and text."""
    return f"{type(exc).__name__}: {exc}".splitlines()[0][:300]


def to_streams_error(exc: Exception, url: str, command: tuple[Any, ...] = ()) -> Exception:
    """The runtime's error for a driver error (``exc`` itself if it is one already, or
    not from the driver): NOGROUP -> :class:`GroupMissing` (stream and group taken from
    ``command``), transient -> :class:`RedisUnavailable`, any other redis-py error ->
    :class:`RedisCommandError` (:class:`NoSuchKey` for a missing key). NOSCRIPT and
    WATCH conflicts stay redis-py's: its script and transaction helpers act on them.
    The caller raises the result ``from exc``."""
    if isinstance(exc, StreamsError | rex.NoScriptError | rex.WatchError):
        return exc  # ours already, or redis-py's signals to its script and WATCH helpers
    verdict = classify(exc)
    if verdict.kind == "group-missing":
        return GroupMissing(*_stream_and_group(command))
    if verdict.transient:
        return RedisUnavailable(url, exc)
    if isinstance(exc, rex.RedisError):
        text = str(exc)
        return NoSuchKey(text) if "no such key" in text.lower() else RedisCommandError(text)
    return exc


def _stream_and_group(command: tuple[Any, ...]) -> tuple[str, str]:
    """Best effort: the stream key and group a command names."""
    words = [a.decode(errors="replace") if isinstance(a, bytes) else str(a) for a in command]
    if not words:
        return "", ""
    name = words[0].upper()
    if name == "XREADGROUP" and len(words) > 2:
        upper = [w.upper() for w in words]
        at = upper.index("STREAMS") + 1 if "STREAMS" in upper else len(words)
        return (words[at] if at < len(words) else ""), words[2]
    if name in ("EVALSHA", "EVAL") and len(words) > 3 and words[2].isdigit():
        nkeys = int(words[2])
        keys, args = words[3 : 3 + nkeys], words[3 + nkeys :]
        return (keys[0] if keys else ""), (args[0] if args else "")
    rest = words[1:]  # XACK key group ..., "XINFO CONSUMERS" key group, ...
    return (rest[0] if rest else ""), (rest[1] if len(rest) > 1 else "")

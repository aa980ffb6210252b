"""Backoff and the retry schedule: what happens to an entry that failed.

:func:`backoff` is the one backoff function of the project (exponential, capped,
equal jitter); every loop that waits before trying again uses it. :func:`decide`
sorts one failure of one entry, once: a deferral (the handler did not get to try,
or Redis was unreachable: the delivery is not spent), a dead letter, or a retry
with backoff. :class:`RetrySchedule` holds the retries a consumer has scheduled;
it is the one collection the consumer's parts share.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

from streams.errors import Defer, MessageError, Reject, Retry
from streams.faults import redis_down
from streams.message import Message
from streams.settings import StreamSettings

Jitter = Literal["equal", "full", "none"]


def backoff(
    attempt: int,
    base: float,
    cap: float,
    *,
    jitter: Jitter = "equal",
    rng: Callable[[], float] = random.random,
) -> float:
    """The wait before try ``attempt + 1`` (``attempt`` 0 is the first wait), in the
    unit of ``base``/``cap``: ``base * 2**attempt`` capped at ``cap``; then "equal"
    jitter (uniform in [half of that, all of it)), "full" (uniform in [0, it)) or
    "none"."""
    wait = min(cap, base * 2.0 ** min(max(0, attempt), 64))
    if jitter == "equal":
        return wait / 2 + rng() * wait / 2
    if jitter == "full":
        return rng() * wait
    return wait


def retry_delay_ms(
    settings: StreamSettings, msg: Message[Any], requested: int | None = None
) -> int:
    """The wait before ``msg`` is tried again: ``requested`` if the handler asked, else
    exponential in its spent deliveries, ``retry_base_ms`` .. ``retry_max_ms``."""
    if requested is not None:
        return requested
    return int(backoff(msg.deliveries - 1, settings.retry_base_ms, settings.retry_max_ms))


def is_deferral(exc: BaseException) -> bool:
    """The handler did not get to try (Defer) or could not reach Redis: the delivery
    says nothing about the entry, so it is not spent."""
    return isinstance(exc, Defer) or redis_down(exc)


def category(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, MessageError):
        return exc.category
    return "handler"  # Reject, and any other exception


def describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


@dataclass(frozen=True, slots=True)
class Decision:
    """What to do with one failed entry: ``action`` is "defer", "retry" or
    "dead-letter"; ``delay_ms`` for the first two, ``category``/``error`` for the last."""

    action: str
    delay_ms: int = 0
    category: str = ""
    error: str = ""


def decide(settings: StreamSettings, msg: Message[Any], exc: BaseException) -> Decision:
    """Sort one failure of ``msg`` (see the module docstring)."""
    if is_deferral(exc):
        if isinstance(exc, Defer):
            delay_ms = retry_delay_ms(settings, msg, exc.delay_ms)
        else:  # not sooner than a second: the handler's Redis may be down for long
            delay_ms = min(settings.retry_max_ms, max(1_000, retry_delay_ms(settings, msg)))
        return Decision("defer", delay_ms)
    cat = category(exc)
    error = describe(exc)
    if isinstance(exc, Reject | MessageError):
        return Decision("dead-letter", category=cat, error=error)
    if msg.attempts >= settings.max_deliveries:
        final = "timeout" if cat == "timeout" else "max-deliveries"
        return Decision(
            "dead-letter", category=final, error=f"{error} (after {msg.attempts} deliveries)"
        )
    requested = exc.delay_ms if isinstance(exc, Retry) else None
    return Decision("retry", retry_delay_ms(settings, msg, requested))


Key = tuple[str, str]  # (stream, entry id)


@dataclass(slots=True)
class Due:
    """A retry scheduled by this consumer."""

    at: float  # monotonic time it is due
    msg: Message[Any]
    delay_ms: int  # nobody else claimed it if it stayed idle for half of this


class RetrySchedule:
    """The retries a consumer has scheduled, by (stream, entry id)."""

    def __init__(self) -> None:
        self._due: dict[Key, Due] = {}

    def add(self, msg: Message[Any], at: float, delay_ms: int) -> None:
        self._due[(msg.stream, msg.entry_id)] = Due(at, msg, delay_ms)

    def get(self, key: Key) -> Due | None:
        return self._due.get(key)

    def __contains__(self, key: object) -> bool:
        return key in self._due

    def __bool__(self) -> bool:
        return bool(self._due)

    def __iter__(self) -> Iterator[Key]:
        return iter(self._due)

    def next_at(self) -> float | None:
        return min((d.at for d in self._due.values()), default=None)

    def due(self, now: float) -> list[Due]:
        return [d for d in self._due.values() if d.at <= now]

    def drop(self, due: Due) -> None:
        self._due.pop((due.msg.stream, due.msg.entry_id), None)

    def clear(self) -> None:
        self._due.clear()

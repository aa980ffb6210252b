"""Circuit breaker, retries with backoff and full jitter, and a token-bucket rate limiter.

Pure asyncio, no I/O of their own. Time is injected (``clock`` is a monotonic float in
seconds, ``sleep`` an awaitable) so tests drive them without real waiting.

::

    CircuitOpen(retry_after_s)      the breaker refuses calls; never retried by retry_async

How they compose around one call to a flaky dependency (see ``ResilientSource``)::

    retry_async(attempt)            backoff between attempts, gives up after ``attempts``
        breaker.guard()             fail fast while open, count the attempt's outcome
            limiter.acquire()       space the real calls out to ``rate_per_s``
                call the dependency
"""

from __future__ import annotations

import asyncio
import enum
import logging
import random
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from types import TracebackType
from typing import ParamSpec, Protocol, TypeVar

from streams.retries import backoff

log = logging.getLogger(__name__)

T = TypeVar("T")
P = ParamSpec("P")

MonotonicClock = Callable[[], float]
Sleep = Callable[[float], Awaitable[object]]
Rng = Callable[[], float]


class CircuitOpen(Exception):
    """The breaker is open: the call was not made. Try again after ``retry_after_s``."""

    def __init__(self, retry_after_s: float, name: str = "breaker") -> None:
        super().__init__(f"circuit {name!r} is open; retry after {retry_after_s:.3f} s")
        self.retry_after_s = retry_after_s
        self.name = name


class BreakerState(enum.StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


StateListener = Callable[[BreakerState, BreakerState], None]


class CircuitBreaker:
    """Stops calling a dependency after ``failure_threshold`` consecutive failures.

    closed -> open after ``failure_threshold`` failures in a row; open -> half_open once
    ``reset_timeout_s`` has passed; in half_open at most ``half_open_max_calls`` trial
    calls are let through: one failure reopens it, all of them succeeding closes it.
    Exceptions listed in ``excluded`` mean the dependency answered (e.g. it rejected a
    bad request): they pass through and count as successes. Cancellation counts as
    neither. The outcome of a call admitted before the last state change is ignored.
    """

    def __init__(
        self,
        failure_threshold: int,
        reset_timeout_s: float,
        half_open_max_calls: int = 1,
        clock: MonotonicClock = time.monotonic,
        *,
        name: str = "breaker",
        excluded: tuple[type[BaseException], ...] = (),
        on_state_change: StateListener | None = None,
    ) -> None:
        if failure_threshold < 1:
            raise ValueError("failure_threshold must be >= 1")
        if reset_timeout_s <= 0:
            raise ValueError("reset_timeout_s must be > 0")
        if half_open_max_calls < 1:
            raise ValueError("half_open_max_calls must be >= 1")
        self.failure_threshold = failure_threshold
        self.reset_timeout_s = reset_timeout_s
        self.half_open_max_calls = half_open_max_calls
        self.name = name
        self.excluded = excluded
        self._clock = clock
        self._listeners: list[StateListener] = [on_state_change] if on_state_change else []
        self._state = BreakerState.CLOSED
        self._generation = 0  # bumped on every state change
        self._failures = 0  # consecutive, while closed
        self._opened_at = 0.0
        self._trials_started = 0  # while half_open
        self._trials_succeeded = 0

    @property
    def state(self) -> BreakerState:
        """The current state; an open breaker whose timeout has passed turns half_open here."""
        if self._state is BreakerState.OPEN and self._open_remaining_s() <= 0:
            self._transition(BreakerState.HALF_OPEN)
        return self._state

    @property
    def consecutive_failures(self) -> int:
        return self._failures

    def add_listener(self, listener: StateListener) -> None:
        """Call ``listener(old, new)`` on every state change (metrics, logging)."""
        self._listeners.append(listener)

    async def call(self, fn: Callable[P, Awaitable[T]], *args: P.args, **kwargs: P.kwargs) -> T:
        """``await fn(*args, **kwargs)`` through the breaker; raises CircuitOpen when open."""
        async with self.guard():
            return await fn(*args, **kwargs)

    def guard(self, success_on: tuple[type[BaseException], ...] = ()) -> _Guard:
        """An async context manager that admits one call and records how its body ended.

        Exceptions in ``success_on`` (like ``excluded``, for this call only) pass through
        and count as successes.
        """
        return _Guard(self, success_on)

    def blocked_for_s(self, poll_s: float = 0.1) -> float:
        """How long before a call would be admitted: 0 when closed or a half-open trial
        slot is free, the rest of the open period, or ``poll_s`` while trials run."""
        state = self.state
        if state is BreakerState.OPEN:
            return max(self._open_remaining_s(), 0.001)
        if state is BreakerState.HALF_OPEN and self._trials_started >= self.half_open_max_calls:
            return poll_s
        return 0.0

    def admit(self) -> int:
        """Admit one call or raise CircuitOpen; returns a token for :meth:`record`."""
        state = self.state
        if state is BreakerState.OPEN:
            raise CircuitOpen(self._open_remaining_s(), self.name)
        if state is BreakerState.HALF_OPEN:
            if self._trials_started >= self.half_open_max_calls:
                # Trials are in flight; if one fails the breaker stays open this long.
                raise CircuitOpen(self.reset_timeout_s, self.name)
            self._trials_started += 1
        return self._generation

    def record(self, token: int, exc: BaseException | None) -> None:
        """Record how the call admitted with ``token`` ended (``exc`` None = success)."""
        if token != self._generation:
            return  # admitted under an earlier state: its outcome says nothing now
        if isinstance(exc, asyncio.CancelledError):
            if self._state is BreakerState.HALF_OPEN:
                self._trials_started -= 1  # give the trial slot back
            return
        if exc is None or isinstance(exc, self.excluded):
            self._on_success()
        else:
            self._on_failure()

    def _on_success(self) -> None:
        if self._state is BreakerState.HALF_OPEN:
            self._trials_succeeded += 1
            if self._trials_succeeded >= self.half_open_max_calls:
                self._transition(BreakerState.CLOSED)
        else:
            self._failures = 0

    def _on_failure(self) -> None:
        if self._state is BreakerState.HALF_OPEN:
            self._transition(BreakerState.OPEN)
            return
        self._failures += 1
        if self._failures >= self.failure_threshold:
            self._transition(BreakerState.OPEN)

    def _open_remaining_s(self) -> float:
        return max(0.0, self._opened_at + self.reset_timeout_s - self._clock())

    def _transition(self, new: BreakerState) -> None:
        old, self._state = self._state, new
        self._generation += 1
        self._failures = 0
        self._trials_started = self._trials_succeeded = 0
        if new is BreakerState.OPEN:
            self._opened_at = self._clock()
        log.info("circuit %s: %s -> %s", self.name, old, new)
        for listener in self._listeners:
            try:
                listener(old, new)
            except Exception:  # a broken metrics hook must not break the breaker
                log.exception("circuit %s: state listener failed", self.name)


class _Guard:
    def __init__(
        self, breaker: CircuitBreaker, success_on: tuple[type[BaseException], ...]
    ) -> None:
        self._breaker = breaker
        self._success_on = success_on
        self._token: int | None = None

    async def __aenter__(self) -> None:
        self._token = self._breaker.admit()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._token is not None:
            self._breaker.record(self._token, None if isinstance(exc, self._success_on) else exc)


def backoff_delay_s(
    attempt: int, base_delay_s: float, max_delay_s: float, rng: Rng = random.random
) -> float:
    """Full-jitter backoff: uniform in [0, min(max_delay_s, base_delay_s * 2**attempt)).

    ``attempt`` counts retries from 0 (the wait before the second call).
    """
    if attempt < 0:
        raise ValueError("attempt must be >= 0")
    return backoff(attempt, base_delay_s, max_delay_s, jitter="full", rng=rng)


async def retry_async(
    fn: Callable[[], Awaitable[T]],
    *,
    attempts: int,
    base_delay_s: float,
    max_delay_s: float,
    retry_on: tuple[type[BaseException], ...] = (Exception,),
    sleep: Sleep = asyncio.sleep,
    rng: Rng = random.random,
    on_retry: Callable[[int, BaseException, float], None] | None = None,
) -> T:
    """Call ``fn`` up to ``attempts`` times, sleeping a full-jitter backoff in between.

    Only exceptions in ``retry_on`` are retried; CircuitOpen never is (the breaker
    already says when to come back). An exception carrying ``retry_after_s`` (a 429's
    Retry-After) waits at least that long, or is raised at once if that is longer than
    ``max_delay_s``, so the caller can reschedule instead of blocking. The last error
    is raised unchanged. ``on_retry(attempt, exc, delay_s)`` is called before each sleep.
    """
    if attempts < 1:
        raise ValueError("attempts must be >= 1")
    for attempt in range(attempts):
        try:
            return await fn()
        except CircuitOpen:
            raise
        except retry_on as exc:
            if attempt + 1 >= attempts:
                raise
            delay_s = backoff_delay_s(attempt, base_delay_s, max_delay_s, rng)
            hint_s = getattr(exc, "retry_after_s", None)
            if isinstance(hint_s, int | float):
                if hint_s > max_delay_s:
                    raise
                delay_s = max(delay_s, float(hint_s))
            if on_retry is not None:
                on_retry(attempt, exc, delay_s)
            log.debug("retry %d/%d in %.3f s after %r", attempt + 1, attempts - 1, delay_s, exc)
            await sleep(delay_s)
    raise AssertionError("unreachable")  # pragma: no cover


class Limiter(Protocol):
    """What sources and geocoders need of a rate limit: :class:`RateLimiter` (this
    process) or :class:`streams.ratelimit.SharedRateLimiter` (all processes)."""

    async def acquire(self) -> float: ...


class RateLimiter:
    """Token bucket: ``rate_per_s`` tokens a second, at most ``burst`` saved up.

    ``acquire`` reserves its tokens at once (the balance may go negative) and sleeps
    exactly until they are earned, so concurrent callers are served first come, first
    served without a lock. A cancelled wait returns its tokens.
    """

    def __init__(
        self,
        rate_per_s: float,
        burst: int = 1,
        *,
        clock: MonotonicClock = time.monotonic,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        if rate_per_s <= 0:
            raise ValueError("rate_per_s must be > 0")
        if burst < 1:
            raise ValueError("burst must be >= 1")
        self.rate_per_s = rate_per_s
        self.burst = burst
        self._clock = clock
        self._sleep = sleep
        self._tokens = float(burst)
        self._updated_at = clock()

    @property
    def tokens(self) -> float:
        """Tokens available now (negative while callers wait on reservations)."""
        self._refill()
        return self._tokens

    def try_acquire(self, n: int = 1) -> bool:
        """Take ``n`` tokens if they are available now, without waiting."""
        self._check(n)
        self._refill()
        if self._tokens >= n:
            self._tokens -= n
            return True
        return False

    async def acquire(self, n: int = 1) -> float:
        """Take ``n`` tokens, waiting as long as needed; returns the seconds waited."""
        self._check(n)
        self._refill()
        self._tokens -= n
        wait_s = -self._tokens / self.rate_per_s if self._tokens < 0 else 0.0
        if wait_s > 0:
            try:
                await self._sleep(wait_s)
            except asyncio.CancelledError:
                self._tokens += n
                raise
        return wait_s

    def _check(self, n: int) -> None:
        if not 1 <= n <= self.burst:
            raise ValueError(f"n must be between 1 and burst ({self.burst}), got {n}")

    def _refill(self) -> None:
        now = self._clock()
        elapsed_s = max(0.0, now - self._updated_at)
        self._updated_at = now
        self._tokens = min(float(self.burst), self._tokens + elapsed_s * self.rate_per_s)


# 408 Request Timeout, 425 Too Early, 429 Too Many Requests; every 5xx too
TRANSIENT_HTTP_STATUS = frozenset({408, 425, 429})


def transient_http_status(status: int) -> bool:
    """Whether an HTTP answer with this status is worth asking again later (408, 425,
    429, any 5xx) rather than a refusal that the same request will get again (other
    4xx, 3xx). The one status classifier of the external APIs: the location source
    uses it; the geocoder and the webhook deliveries can adopt it."""
    return status in TRANSIENT_HTTP_STATUS or status >= 500


def retry_after_s(value: str | None, now: datetime | None = None) -> float | None:
    """Seconds from an HTTP Retry-After header (delta-seconds or an HTTP date); None if
    absent or unreadable. Used by the location source and the webhook deliveries."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())

"""Circuit breaker, retries with full jitter and the token bucket, on a fake clock."""

from __future__ import annotations

import asyncio
import random

import pytest

from processors.resilience import (
    BreakerState,
    CircuitBreaker,
    CircuitOpen,
    RateLimiter,
    backoff_delay_s,
    retry_async,
    transient_http_status,
)


class FakeTime:
    """A monotonic clock and a sleep that advances it instead of waiting."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


async def ok() -> str:
    return "ok"


async def boom() -> None:
    raise ConnectionError("down")


async def fail(breaker: CircuitBreaker, times: int) -> None:
    for _ in range(times):
        with pytest.raises(ConnectionError):
            await breaker.call(boom)


def make_breaker(t: FakeTime, **kw: object) -> tuple[CircuitBreaker, list[tuple[str, str]]]:
    changes: list[tuple[str, str]] = []
    breaker = CircuitBreaker(
        3, 10.0, clock=t, on_state_change=lambda old, new: changes.append((old, new)), **kw
    )
    return breaker, changes


# --- circuit breaker -------------------------------------------------------------


async def test_breaker_opens_after_threshold_consecutive_failures() -> None:
    t = FakeTime()
    breaker, changes = make_breaker(t)
    await fail(breaker, 2)
    assert breaker.state == "closed"
    assert breaker.consecutive_failures == 2
    await fail(breaker, 1)
    assert breaker.state == BreakerState.OPEN
    assert changes == [("closed", "open")]

    calls = 0

    async def counted() -> None:
        nonlocal calls
        calls += 1

    t.now += 4.0
    with pytest.raises(CircuitOpen) as info:
        await breaker.call(counted)
    assert calls == 0
    assert info.value.retry_after_s == pytest.approx(6.0)


async def test_success_resets_the_failure_count_while_closed() -> None:
    t = FakeTime()
    breaker, _ = make_breaker(t)
    await fail(breaker, 2)
    assert await breaker.call(ok) == "ok"
    await fail(breaker, 2)
    assert breaker.state == "closed"


async def test_half_open_after_timeout_then_closes_on_success() -> None:
    t = FakeTime()
    breaker, changes = make_breaker(t)
    await fail(breaker, 3)
    t.now += 9.999
    assert breaker.state == "open"
    t.now += 0.001
    assert breaker.state == "half_open"
    assert await breaker.call(ok) == "ok"
    assert breaker.state == "closed"
    assert changes == [("closed", "open"), ("open", "half_open"), ("half_open", "closed")]
    await fail(breaker, 2)  # the count starts afresh
    assert breaker.state == "closed"


async def test_half_open_reopens_on_failure_for_a_full_timeout() -> None:
    t = FakeTime()
    breaker, changes = make_breaker(t)
    await fail(breaker, 3)
    t.now += 10.0
    await fail(breaker, 1)
    assert breaker.state == "open"
    with pytest.raises(CircuitOpen) as info:
        await breaker.call(ok)
    assert info.value.retry_after_s == pytest.approx(10.0)
    assert changes[-2:] == [("open", "half_open"), ("half_open", "open")]


async def test_blocked_for_says_when_a_call_would_be_admitted() -> None:
    t = FakeTime()
    breaker, _ = make_breaker(t)
    assert breaker.blocked_for_s() == 0
    await fail(breaker, 3)
    assert breaker.blocked_for_s() == pytest.approx(10.0)
    t.now += 7.5
    assert breaker.blocked_for_s() == pytest.approx(2.5)
    t.now += 2.5
    assert breaker.blocked_for_s() == 0, "half open: a trial slot is free"
    started = asyncio.Event()
    release = asyncio.Event()

    async def trial() -> str:
        started.set()
        await release.wait()
        return "ok"

    task = asyncio.create_task(breaker.call(trial))
    await started.wait()
    assert breaker.blocked_for_s(poll_s=0.25) == 0.25, "the only trial is in flight"
    release.set()
    assert await task == "ok"
    assert breaker.blocked_for_s() == 0 and breaker.state == "closed"


async def test_half_open_admits_only_max_calls_trials() -> None:
    t = FakeTime()
    breaker, _ = make_breaker(t, half_open_max_calls=2)
    await fail(breaker, 3)
    t.now += 10.0
    release = asyncio.Event()

    async def slow() -> str:
        await release.wait()
        return "ok"

    trials = [asyncio.create_task(breaker.call(slow)) for _ in range(2)]
    await asyncio.sleep(0)
    with pytest.raises(CircuitOpen):
        await breaker.call(ok)
    release.set()
    assert await asyncio.gather(*trials) == ["ok", "ok"]
    assert breaker.state == "closed"


async def test_cancelled_trial_gives_its_slot_back() -> None:
    t = FakeTime()
    breaker, _ = make_breaker(t)
    await fail(breaker, 3)
    t.now += 10.0
    trial = asyncio.create_task(breaker.call(asyncio.sleep, 3600))
    await asyncio.sleep(0)
    trial.cancel()
    with pytest.raises(asyncio.CancelledError):
        await trial
    assert breaker.state == "half_open"
    assert await breaker.call(ok) == "ok"
    assert breaker.state == "closed"


async def test_outcome_of_a_call_admitted_before_a_state_change_is_ignored() -> None:
    t = FakeTime()
    breaker, _ = make_breaker(t)
    release = asyncio.Event()

    async def slow() -> str:
        await release.wait()
        return "ok"

    straggler = asyncio.create_task(breaker.call(slow))  # admitted while closed
    await asyncio.sleep(0)
    await fail(breaker, 3)
    release.set()
    assert await straggler == "ok"
    assert breaker.state == "open"  # a late success does not close it


async def test_excluded_and_success_on_errors_do_not_trip_the_breaker() -> None:
    t = FakeTime()
    breaker = CircuitBreaker(1, 10.0, clock=t, excluded=(KeyError,))

    async def rejected() -> None:
        raise KeyError("bad request")

    with pytest.raises(KeyError):
        await breaker.call(rejected)
    with pytest.raises(ValueError):
        async with breaker.guard(success_on=(ValueError,)):
            raise ValueError("also an answer")
    assert breaker.state == "closed"
    with pytest.raises(ValueError):
        async with breaker.guard():
            raise ValueError("a failure this time")
    assert breaker.state == "open"


async def test_a_broken_listener_does_not_break_the_breaker(
    caplog: pytest.LogCaptureFixture,
) -> None:
    t = FakeTime()
    breaker = CircuitBreaker(1, 10.0, clock=t)
    breaker.add_listener(lambda old, new: 1 / 0)  # type: ignore[func-returns-value]
    await fail(breaker, 1)
    assert breaker.state == "open"
    assert "state listener failed" in caplog.text


def test_breaker_rejects_nonsense_settings() -> None:
    with pytest.raises(ValueError):
        CircuitBreaker(0, 1.0)
    with pytest.raises(ValueError):
        CircuitBreaker(1, 0.0)
    with pytest.raises(ValueError):
        CircuitBreaker(1, 1.0, half_open_max_calls=0)


# --- retries -----------------------------------------------------------------------


def test_backoff_is_full_jitter_under_an_exponential_ceiling() -> None:
    rng = random.Random(1).random
    for attempt in range(12):
        ceiling_s = min(5.0, 0.1 * 2**attempt)
        delays = [backoff_delay_s(attempt, 0.1, 5.0, rng) for _ in range(300)]
        assert all(0.0 <= d < ceiling_s for d in delays)
        assert max(delays) > 0.9 * ceiling_s and min(delays) < 0.1 * ceiling_s
    assert backoff_delay_s(3, 0.1, 5.0, lambda: 0.0) == 0.0
    assert backoff_delay_s(10_000, 0.1, 5.0, lambda: 0.5) == 2.5  # no overflow
    with pytest.raises(ValueError):
        backoff_delay_s(-1, 0.1, 5.0)


async def test_retry_stops_after_attempts_and_raises_the_last_error() -> None:
    t = FakeTime()
    calls = 0

    async def flaky() -> None:
        nonlocal calls
        calls += 1
        raise ConnectionError(f"call {calls}")

    with pytest.raises(ConnectionError, match="call 4"):
        await retry_async(
            flaky, attempts=4, base_delay_s=0.5, max_delay_s=1.5, sleep=t.sleep, rng=lambda: 0.99
        )
    assert calls == 4
    assert t.sleeps == pytest.approx([0.495, 0.99, 1.485])


async def test_retry_returns_the_first_success() -> None:
    t = FakeTime()
    results = iter([ConnectionError(), TimeoutError(), "done"])
    retried: list[int] = []

    async def flaky() -> str:
        r = next(results)
        if isinstance(r, Exception):
            raise r
        return r

    value = await retry_async(
        flaky,
        attempts=5,
        base_delay_s=1.0,
        max_delay_s=10.0,
        retry_on=(ConnectionError, TimeoutError),
        sleep=t.sleep,
        rng=lambda: 0.5,
        on_retry=lambda attempt, exc, delay_s: retried.append(attempt),
    )
    assert value == "done"
    assert t.sleeps == [0.5, 1.0]
    assert retried == [0, 1]


async def test_non_retryable_errors_and_circuit_open_are_raised_at_once() -> None:
    t = FakeTime()
    calls = 0

    async def bad_request() -> None:
        nonlocal calls
        calls += 1
        raise ValueError("bad")

    with pytest.raises(ValueError):
        await retry_async(
            bad_request,
            attempts=5,
            base_delay_s=1,
            max_delay_s=1,
            retry_on=(ConnectionError,),
            sleep=t.sleep,
        )
    assert calls == 1

    async def open_circuit() -> None:
        nonlocal calls
        calls += 1
        raise CircuitOpen(3.0)

    with pytest.raises(CircuitOpen):
        await retry_async(
            open_circuit,
            attempts=5,
            base_delay_s=1,
            max_delay_s=1,
            retry_on=(Exception,),
            sleep=t.sleep,
        )
    assert calls == 2
    assert t.sleeps == []


async def test_retry_honours_retry_after_and_gives_up_when_it_is_too_long() -> None:
    t = FakeTime()

    class Throttled(Exception):
        def __init__(self, retry_after_s: float) -> None:
            super().__init__("429")
            self.retry_after_s = retry_after_s

    hints = iter([2.0, 60.0])

    async def throttled() -> None:
        raise Throttled(next(hints))

    with pytest.raises(Throttled) as info:
        await retry_async(
            throttled, attempts=5, base_delay_s=0.1, max_delay_s=5.0, sleep=t.sleep, rng=lambda: 0.5
        )
    assert t.sleeps == [2.0]  # waited for the first hint, gave up on the second
    assert info.value.retry_after_s == 60.0
    with pytest.raises(ValueError):
        await retry_async(ok, attempts=0, base_delay_s=1, max_delay_s=1)


# --- rate limiter ------------------------------------------------------------------


async def test_rate_limiter_spends_the_burst_then_waits_exactly() -> None:
    t = FakeTime()
    limiter = RateLimiter(2.0, 2, clock=t, sleep=t.sleep)
    assert await limiter.acquire() == 0.0
    assert await limiter.acquire() == 0.0
    assert await limiter.acquire() == pytest.approx(0.5)
    assert t.sleeps == [pytest.approx(0.5)]
    t.now += 0.25  # half a token earned
    assert await limiter.acquire() == pytest.approx(0.25)
    t.now += 100.0  # saves up at most `burst`
    assert limiter.tokens == 2.0


async def test_concurrent_waiters_are_served_in_order() -> None:
    t = FakeTime()
    waits: list[float] = []

    async def record(seconds: float) -> None:  # does not advance the clock
        waits.append(seconds)

    limiter = RateLimiter(4.0, 1, clock=t, sleep=record)
    await asyncio.gather(*(limiter.acquire() for _ in range(4)))
    assert waits == pytest.approx([0.25, 0.5, 0.75])


async def test_try_acquire_never_waits() -> None:
    t = FakeTime()
    limiter = RateLimiter(1.0, 3, clock=t, sleep=t.sleep)
    assert limiter.try_acquire(3)
    assert not limiter.try_acquire()
    t.now += 0.999
    assert not limiter.try_acquire()
    t.now += 0.001
    assert limiter.try_acquire()
    assert t.sleeps == []
    with pytest.raises(ValueError):
        limiter.try_acquire(4)
    with pytest.raises(ValueError):
        RateLimiter(0.0, 1)


async def test_a_cancelled_wait_returns_its_tokens() -> None:
    t = FakeTime()
    limiter = RateLimiter(1.0, 1, clock=t)  # real sleep: the wait is cancelled
    assert limiter.try_acquire()
    waiter = asyncio.create_task(limiter.acquire())
    await asyncio.sleep(0)
    assert limiter.tokens == -1.0
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert limiter.tokens == 0.0


@pytest.mark.parametrize(
    ("status", "transient"),
    [
        *[(s, True) for s in (408, 425, 429, 500, 503, 599)],
        *[(s, False) for s in (200, 204, 301, 400, 401, 404, 410, 422)],
    ],
)
def test_one_http_status_classifier_says_what_is_worth_asking_again(status, transient):
    assert transient_http_status(status) is transient

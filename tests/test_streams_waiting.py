"""Waiting spends nothing: a deferred entry (waiting for its rate slot) never counts
toward ``max_deliveries``, whoever holds it, across SIGKILLs, claims and graceful
hand-backs; a redriven dead letter gets a fresh count. Real worker processes
(tests/defer_worker.py) on a real Redis and a 3-master cluster."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from streams.connection import connect
from streams.deadletter import DeadLetters
from streams.errors import Retry
from streams.message import Codec
from streams.producer import Producer, Route
from streams.worker import Worker
from tests.conftest import RedisTarget
from tests.support import Ping, fast_settings, run_until, wait_for

ROOT = Path(__file__).resolve().parent.parent
MAX_DELIVERIES = 3


@pytest.fixture(params=["standalone", "cluster"])
def target(request: pytest.FixtureRequest) -> RedisTarget:
    if request.param == "standalone":
        return RedisTarget(request.getfixturevalue("redis_server").url, False)
    return RedisTarget(request.getfixturevalue("redis_cluster").url, True)


class Workers:
    """defer_worker processes, started and stopped by PID, logs in ``log_dir``."""

    def __init__(self, target: RedisTarget, prefix: str, rate: float, log_dir: Path) -> None:
        self.target, self.prefix, self.rate, self.log_dir = target, prefix, rate, log_dir
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.options = {"max_deliveries": MAX_DELIVERIES, "shutdown_grace_ms": 500}

    def start(self, name: str) -> None:
        log = open(self.log_dir / f"{name}.log", "ab")  # noqa: SIM115 - the child keeps it
        self.procs[name] = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.defer_worker",
                self.target.url,
                "1" if self.target.cluster else "0",
                self.prefix,
                name,
                str(self.rate),
                json.dumps(self.options),
            ],
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()

    def stop(self, name: str, sig: int, timeout_s: float = 15) -> int:
        proc = self.procs.pop(name)
        os.kill(proc.pid, sig)
        return proc.wait(timeout_s)

    def alive(self) -> bool:
        return all(p.poll() is None for p in self.procs.values())

    def close(self) -> None:
        for name in list(self.procs):
            if self.procs[name].poll() is None:
                self.stop(name, signal.SIGKILL)
            else:
                self.procs.pop(name)


async def _setup(target: RedisTarget, prefix: str, total: int) -> tuple[Any, Route]:
    settings = fast_settings(target, prefix)
    client = connect(settings)
    route = Route(prefix, "work")
    await Producer(client, Codec([Ping])).publish(route, [Ping(n=n) for n in range(total)])
    return client, route


async def _sent(client: Any, prefix: str) -> dict[int, int]:
    return {int(k): int(v) for k, v in (await client.hgetall(f"{prefix}:sent")).items()}


async def _seen(client: Any, prefix: str, what: str) -> list[int]:
    got = await client.hgetall(f"{prefix}:seen")
    return [int(v) for k, v in got.items() if k.decode().endswith(":" + what)]


async def _until_sent(client: Any, prefix: str, total: int, timeout_s: float) -> bool:
    """Wait up to ``timeout_s`` for every entry to be sent; True if they were."""
    try:
        await wait_for(
            lambda: _all_sent(client, prefix, total), timeout_s, "every entry to be sent"
        )
    except AssertionError:
        return False
    return True


async def _all_sent(client: Any, prefix: str, total: int) -> bool:
    return len(await _sent(client, prefix)) == total


async def _drained(client: Any, route: Route) -> None:
    keys = route.keys()

    async def nothing_pending() -> bool:
        return not await client.xpending_range(keys.stream, keys.group, "-", "+", 1)

    await wait_for(nothing_pending, 20, "nothing left pending")
    assert not await client.exists(keys.deferrals), "every deferral count dropped with its ack"


@pytest.mark.slow
@pytest.mark.timeout(150)
async def test_a_worker_sigkilled_every_3_s_over_a_waiting_backlog_dead_letters_nothing(
    target, unique_prefix, tmp_path
):
    """75 entries behind a limit of 3/s (25 s of backlog), max_deliveries=3. A steady
    worker and one SIGKILLed every 2.5-3.5 s and restarted, alternately under its old
    name (it re-reads its own pending entries) and a new one (its peer claims them
    from the dead consumer); entries waiting longer than claim_idle_ms are claimed
    by XAUTOCLAIM over and over. Every entry is sent, none dead-lettered."""
    total, rate = 75, 3.0
    client, route = await _setup(target, unique_prefix, total)
    try:
        workers = Workers(target, unique_prefix, rate, tmp_path)
        kills = 0
        try:
            workers.start("steady")
            workers.start("doomed")
            deadline = time.monotonic() + 90
            while not await _until_sent(client, unique_prefix, total, random.uniform(2.5, 3.5)):
                assert time.monotonic() < deadline, f"not all sent after {kills} kills"
                assert workers.alive(), "a worker exited by itself"
                doomed = next(n for n in workers.procs if n != "steady")
                workers.stop(doomed, signal.SIGKILL)
                kills += 1
                workers.start("doomed" if kills % 2 == 0 else f"doomed-{kills}")
            await _drained(client, route)
        finally:
            workers.close()
        dead = await DeadLetters(client, route.keys()).list(limit=100)
        assert [(d.category, d.error) for d in dead] == [], f"after {kills} kills"
        sent = await _sent(client, unique_prefix)
        assert sorted(sent) == list(range(total))
        # at-least-once: a kill repeats the sends of its in-flight batch that were not
        # acked yet, so an entry is sent again at most once per kill
        assert max(sent.values()) <= 1 + kills
        assert kills >= 5, "the backlog waited through several kills"
        assert max(await _seen(client, unique_prefix, "deliveries")) < MAX_DELIVERIES
    finally:
        await client.aclose()


@pytest.mark.slow
@pytest.mark.timeout(150)
async def test_rolling_sigterm_restarts_over_a_waiting_backlog_spend_nothing(
    target, unique_prefix, tmp_path
):
    """A deploy: two workers restarted gracefully (SIGTERM) one after the other, 12
    times, while 40 entries wait behind a limit of 2/s, max_deliveries=3. Every
    restart hands the waiting entries back: none is dead-lettered, and every entry is
    sent with its attempt count unchanged (attempt 0, first spent delivery)."""
    total, rate = 40, 2.0
    client, route = await _setup(target, unique_prefix, total)
    try:
        workers = Workers(target, unique_prefix, rate, tmp_path)
        names = ["a", "b"]
        restarts = 0
        try:
            for name in names:
                workers.start(name)
            while restarts < 12:
                assert not await _until_sent(client, unique_prefix, total, 1.2), "drained too soon"
                name = names[restarts % 2]
                assert workers.stop(name, signal.SIGTERM) == 0, "a graceful stop"
                workers.start(name)
                restarts += 1
            assert await _until_sent(client, unique_prefix, total, 60)
            await _drained(client, route)
        finally:
            workers.close()
        dead = await DeadLetters(client, route.keys()).list(limit=100)
        assert [(d.category, d.error) for d in dead] == []
        assert sorted(await _sent(client, unique_prefix)) == list(range(total))
        assert set(await _seen(client, unique_prefix, "attempt")) == {0}, "hand-backs spent nothing"
        assert set(await _seen(client, unique_prefix, "deliveries")) == {1}
        handed_back = await client.xlen(route.keys().stream) - total
        assert handed_back >= total, "the restarts did hand the waiting entries back"
    finally:
        await client.aclose()


async def test_a_redriven_letter_gets_its_full_set_of_attempts(standalone_target, unique_prefix):
    """A letter that spent its deliveries partly before hand-backs (``attempt`` 2 of
    max_deliveries 3) dies after one more failure; redriven, it is tried 3 times
    again before it is dead-lettered again."""
    settings = fast_settings(standalone_target, unique_prefix, max_deliveries=MAX_DELIVERIES)
    client = connect(settings)
    try:
        codec = Codec([Ping])
        route = Route(unique_prefix, "work")
        keys = route.keys()
        await client.xadd(keys.stream, codec.encode(Ping(n=1), attempt=2))
        calls: list[int] = []

        async def failing(msg, ctx):
            calls.append(msg.attempts)
            raise Retry("the endpoint is down", delay_ms=1)

        letters = DeadLetters(client, keys)

        async def dead(n: int) -> bool:
            return await letters.count() == n

        await run_until(Worker(client, settings, route, codec, handler=failing), lambda: dead(1))
        assert calls == [3]
        (letter,) = await letters.list()
        assert letter.attempts == 3 and letter.fields[b"attempt"] == b"2"
        (new_id,) = (await letters.redrive([letter.id])).values()
        assert new_id is not None
        calls.clear()
        await run_until(Worker(client, settings, route, codec, handler=failing), lambda: dead(1))
        assert calls == [1, 2, 3], "a fresh count: the full set of attempts"
        (again,) = await letters.list()
        assert again.origin_id == new_id and again.attempts == 3
        assert again.fields[b"attempt"] == b"0"
    finally:
        await client.aclose()

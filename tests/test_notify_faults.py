"""Fault loops on the real notify stage: worker processes SIGKILLed every few seconds,
and rolling SIGTERM restarts (a deploy), over a backlog waiting behind each endpoint's
rate limit, on PostgreSQL. The receivers answer 204 and verify every request with the
reference ``standardwebhooks`` library; they count deliveries by webhook id.

Waiting for a rate slot spends no delivery (issue 21), so through all of it: every
event reaches every subscription, nothing is dead-lettered that did not really fail,
and a delivery that did die is never sent again. Each test prints its figures.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess
import sys
import time
from collections import Counter
from typing import Any

import pytest
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from streams.errors import NoSuchKey
from tests.conftest import RedisTarget
from tests.support import wait_for
from tests.test_notify import ROOT, START, Env, ids
from tests.webhook_support import Receiver, make_secret, timeline

RATE_PER_MIN = 240  # per endpoint (origin): one request every 250 ms
FAULTS = {
    "notify_rate_per_min": RATE_PER_MIN,
    "claim_idle_ms": 3_000,
    "handler_timeout_ms": 2_000,
    "notify_max_attempts": 2,
}


def reference_verify(secret: str, headers: dict[str, str], body: bytes) -> bool:
    try:
        Webhook(secret).verify(body, headers)
    except WebhookVerificationError:
        return False
    return True


@pytest.fixture
def receivers() -> Any:
    started: list[Receiver] = []

    def make(n: int, status: int = 204) -> Receiver:
        r = Receiver(
            make_secret(n), respond=lambda _id, _n: (status, 0.0, {}), check=reference_verify
        )
        started.append(r.start())
        return r

    yield make
    for r in started:
        r.stop()


class Workers:
    """Notify workers as real processes (``trackstream worker notify``), by name."""

    def __init__(self, env: Env) -> None:
        self.env = env
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.started_at: dict[str, float] = {}

    def spawn(self, name: str) -> None:
        self.started_at[name] = time.time()
        self.procs[name] = subprocess.Popen(
            [sys.executable, "-m", "ops.cli", "worker", "notify", "--consumer", name],
            cwd=ROOT,
            env=self.env.env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    async def ready(self, name: str) -> None:
        """Its process holds the consumer name: a heartbeat newer than its start."""
        client = self.env.pipelines[0].client
        keys = self.env.keys()

        async def beating() -> bool:
            assert self.procs[name].poll() is None, f"worker {name} exited"
            beat = await client.hget(keys.heartbeats, name)
            return beat is not None and int(beat) > self.started_at[name] * 1000

        await wait_for(beating, 30, f"worker {name} running")

    def stop(self, name: str, sig: int) -> int:
        p = self.procs[name]
        p.send_signal(sig)
        return p.wait(30)

    def close(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs.values():
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)


async def pending(env: Env) -> int:
    client, keys = env.pipelines[0].client, env.keys()
    total = 0
    for stream in keys.streams():
        with contextlib.suppress(NoSuchKey):  # a lane nothing was published to
            total += int((await client.xpending(stream, keys.group))["pending"])
    return total


def figures(name: str, receivers: list[Receiver], letters: int, **more: Any) -> dict[str, Any]:
    accepted = sum(len(r.accepted()) for r in receivers)
    unique = sum(len(r.accepted_ids()) for r in receivers)
    out = {"deliveries": unique, "duplicates": accepted - unique, "dead_letters": letters, **more}
    print(f"\nFIGURES {name}: " + ", ".join(f"{k}={v}" for k, v in out.items()))
    return out


async def all_delivered(env: Env, healthy: list[Receiver], want: set[str]) -> None:
    """Wait for every event at every receiver; failing, say where the rest are."""
    try:
        for r in healthy:
            await wait_for(lambda r=r: r.accepted_ids() >= want, 60, "every event delivered")
    except AssertionError as exc:
        missing = sum(len(want - r.accepted_ids()) for r in healthy)
        letters = [dl.error for dl in await env.dead_letters()]
        states = Counter(env.states().values())
        raise AssertionError(
            f"{exc}: {missing} missing, deliveries {dict(states)}, pending {await pending(env)}, "
            f"{len(letters)} dead letters {letters[:3]}"
        ) from None


def setup(env: Env, receivers: Any, trackers: int, steps: int) -> tuple[list[Any], list[Receiver]]:
    names = [f"T{i}" for i in range(trackers)]
    g1, g2 = env.seed(names, 2)
    healthy = [receivers(1), receivers(2)]  # two origins: a rate limit each
    for r in healthy:
        env.subscribe(r)
    events = timeline(names, [g1, g2], START, steps)
    return events, healthy


@pytest.mark.timeout(150)
async def test_sigkill_every_3s_over_a_rate_limited_backlog_delivers_everything_once(
    redis_server, pg_url, unique_prefix, receivers
):
    env = Env(RedisTarget(redis_server.url, False), unique_prefix, pg_url, **FAULTS)
    workers = Workers(env)
    try:
        # 120 events to each of two endpoints at 4/s: a backlog of ~30 s waiting for slots
        events, healthy = setup(env, receivers, trackers=6, steps=20)
        payloads = env.write_events(events)
        env.pipeline()
        await env.publish(payloads)
        for name in ("w1", "w2"):
            workers.spawn(name)
        for name in ("w1", "w2"):
            await workers.ready(name)
        want = ids(events)
        kills, began = 0, time.monotonic()
        while time.monotonic() - began < 36 and any(r.accepted_ids() != want for r in healthy):
            await asyncio.sleep(3)  # the fault schedule, not a wait for a condition
            victim = ("w1", "w2")[kills % 2]
            workers.stop(victim, signal.SIGKILL)
            kills += 1
            workers.spawn(victim)  # the same name: it re-reads its own pending entries
            await workers.ready(victim)
        backlog_left = {r.url: len(want - r.accepted_ids()) for r in healthy}
        killing_s = time.monotonic() - began
        await all_delivered(env, healthy, want)
        await wait_for(lambda: set(env.states().values()) == {"delivered"}, 30, "settled")
        await wait_for(lambda: _no_pending(env), 30, "stream drained")
        letters = await env.dead_letters()
        stats = figures(
            "sigkill",
            healthy,
            len(letters),
            kills=kills,
            killing_s=round(killing_s, 1),
            left_when_killing_stopped=sum(backlog_left.values()),
            drained_s=round(time.monotonic() - began, 1),
        )
        assert kills >= 8, "the backlog was too short to kill through"
        assert sum(backlog_left.values()) > 0, "the kills ended after the backlog"
        assert letters == [], [dl.error for dl in letters]
        for r in healthy:
            assert all(x.valid for x in r.log), "every request verifies"
            assert r.accepted_ids() == want  # once each, counted by webhook id
        # a worker killed between a 2xx and recording it sends that one again (same id)
        assert stats["duplicates"] <= kills * env.app.notify_endpoint_concurrency
    finally:
        workers.close()
        await env.aclose()


async def _no_pending(env: Env) -> bool:
    return await pending(env) == 0


@pytest.mark.xfail(
    reason="unfinished (notify-ops): after the first SIGTERM restarts the deliveries stop "
    "progressing for 30 s; cause not yet found",
    strict=False,
)
@pytest.mark.timeout(150)
async def test_rolling_sigterm_restarts_lose_nothing_and_never_resend_the_dead(
    redis_server, pg_url, unique_prefix, receivers
):
    env = Env(RedisTarget(redis_server.url, False), unique_prefix, pg_url, **FAULTS)
    workers = Workers(env)
    try:
        events, healthy = setup(env, receivers, trackers=5, steps=20)  # 100 events, ~25 s each
        failing = receivers(3, status=500)  # T0's events die after notify_max_attempts
        failing_sub = env.subscribe(failing, tracker_ids=["T0"])
        payloads = env.write_events(events)
        env.pipeline()
        await env.publish(payloads)
        for name in ("w1", "w2"):
            workers.spawn(name)
        for name in ("w1", "w2"):
            await workers.ready(name)
        want = ids(events)
        doomed = ids([e for e in events if e[0] == "T0"])
        restarts, codes, began = 0, [], time.monotonic()
        while restarts < 10 and any(r.accepted_ids() != want for r in healthy):
            before = sum(len(r.accepted_ids()) for r in healthy)
            # a deploy restarts one worker after the other, each once it has done some work
            await wait_for(
                lambda b=before: sum(len(r.accepted_ids()) for r in healthy) >= b + 4,
                30,
                "progress between restarts",
            )
            name = ("w1", "w2")[restarts % 2]
            codes.append(workers.stop(name, signal.SIGTERM))
            restarts += 1
            workers.spawn(name)
            await workers.ready(name)
        backlog_left = sum(len(want - r.accepted_ids()) for r in healthy)
        await all_delivered(env, healthy, want)
        await wait_for(lambda: _no_pending(env), 30, "stream drained")
        letters = await env.dead_letters()
        # a few more restarts once everything settled: nothing comes back to life
        sent_to_failing = len(failing.log)
        for name in ("w1", "w2"):
            codes.append(workers.stop(name, signal.SIGTERM))
            workers.spawn(name)
            await workers.ready(name)
        await wait_for(lambda: _no_pending(env), 10, "still drained")
        per_id = Counter(x.msg_id for x in failing.log)
        stats = figures(
            "sigterm",
            healthy,
            len(letters),
            restarts=restarts,
            left_when_restarts_stopped=backlog_left,
            failing_requests=len(failing.log),
            drained_s=round(time.monotonic() - began, 1),
        )
        assert restarts >= 6 and backlog_left > 0, "the backlog was too short to restart through"
        assert codes == [0] * len(codes), f"every graceful stop exits 0: {codes}"
        assert stats["duplicates"] == 0, "a graceful restart re-sent a delivered event"
        for r in (*healthy, failing):
            assert all(x.valid for x in r.log), "every request verifies"
        # only the entries with a delivery that really died are dead-lettered, each once
        assert len(letters) == len(doomed), [dl.error for dl in letters]
        assert all(f"subscription {failing_sub}" in dl.error for dl in letters)
        # each dead delivery had exactly its attempts, and none after it died
        assert set(per_id) == doomed
        assert set(per_id.values()) == {env.app.notify_max_attempts}, per_id
        assert len(failing.log) == sent_to_failing
    finally:
        workers.close()
        await env.aclose()

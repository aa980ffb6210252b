"""A worker process of each stage killed with SIGKILL mid-run: another consumer claims
its entries; nothing is lost and nothing is duplicated in the database."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from processors import topology
from processors.topology import FETCH, GEOCODE, GEOFENCE, VIEW_REFRESH
from streams.deadletter import DeadLetters
from tests.conftest import RedisTarget
from tests.pipeline_support import Harness
from tests.support import FAST, wait_for

ROOT = Path(__file__).resolve().parent.parent
UPSTREAM = {
    FETCH: [],
    GEOCODE: [FETCH],
    GEOFENCE: [FETCH, GEOCODE],
    VIEW_REFRESH: [FETCH, GEOCODE, GEOFENCE],
}


def worker_env(h: Harness) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRACKSTREAM_")}
    values = {
        **FAST,
        "redis_url": h.streams.redis_url,
        "redis_cluster": h.streams.redis_cluster,
        "prefix": h.streams.prefix,
        "database_url": h.app.database_url,
        "batch_size": 2,
        "view_refresh_interval_s": 0,
    }
    env.update(
        {
            f"TRACKSTREAM_{k.upper()}": str(v).lower() if isinstance(v, bool) else str(v)
            for k, v in values.items()
        }
    )
    return env


async def entries_read(h: Harness, keys) -> int:
    for g in await h.client.xinfo_groups(keys.stream):
        name = g["name"].decode() if isinstance(g["name"], bytes) else g["name"]
        if name == keys.group:
            return int(g.get("entries-read") or 0)
    return 0


@pytest.mark.slow
@pytest.mark.parametrize("stage", list(UPSTREAM))  # notify's: tests/test_notify.py
@pytest.mark.parametrize("where", ["standalone-sqlite", "cluster-postgresql"])
async def test_sigkilled_stage_worker_loses_and_duplicates_nothing(
    stage, where, request, unique_prefix, tmp_path
):
    if where == "cluster-postgresql":
        target = RedisTarget(request.getfixturevalue("redis_cluster").url, True)
        db_url = request.getfixturevalue("pg_url")
    else:
        target = RedisTarget(request.getfixturevalue("redis_server").url, False)
        db_url = f"sqlite:///{tmp_path}/crash.db"
    # small batches everywhere: every stage's stream gets a backlog of several entries
    h = Harness(target, unique_prefix, db_url, trackers=48, batch_trackers=2, batch_size=4)
    try:
        await h.cycle(minutes=30)  # a first round all the way through: a history
        await h.scheduler.tick()  # the second round stops in front of the stage
        await h.drain(UPSTREAM[stage])
        keys = h.keys(stage)
        read_before = await entries_read(h, keys)
        backlog = await h.client.xlen(keys.stream) - read_before
        assert backlog >= 8, f"{stage} needs work to be killed in the middle of"

        proc = subprocess.Popen(
            [sys.executable, "-m", "tests.pipeline_worker", stage, "doomed", "0.05"],
            cwd=ROOT,
            env=worker_env(h),
        )
        try:

            async def mid_run() -> bool:
                assert proc.poll() is None, "the worker exited early"
                pending = await h.client.xpending(keys.stream, keys.group)
                read = await entries_read(h, keys)
                return read >= read_before + 4 and int(pending["pending"]) > 0

            await wait_for(mid_run, 60, f"the {stage} worker to be mid-run")
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(10)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)

        stranded = await h.client.xpending_range(keys.stream, keys.group, "-", "+", 100, "doomed")
        assert stranded, "the killed worker died holding entries"

        async def finished() -> bool:  # the stranded entries are claimable after claim_idle_ms
            return await h.pump(rounds=3)

        await wait_for(finished, 60, "everything handled after the crash")
        reports = h.reports()
        assert reports
        assert all(r.geocoded_at and r.geofence_checked_at for r in reports)
        assert len({(r.tracker_id, r.observed_at) for r in reports}) == len(reports)
        assert h.events() == h.expected_events()
        for s in topology.STAGES:
            assert await DeadLetters(h.client, h.keys(s)).count() == 0, s
    finally:
        await h.aclose()

"""view-refresh with two workers (two processes' worth of stage objects) on one interval:
notices naming trackers, arriving in waves while the interval holds refreshes back."""

from __future__ import annotations

import asyncio
import time
from datetime import timedelta
from itertools import pairwise

from sqlalchemy import text

from processors.pipeline import Pipeline
from processors.topology import VIEW_REFRESH
from schemas import report_store
from schemas.events import LocationReported, ViewsChanged
from schemas.views import VIEW_NAMES
from streams.deadletter import DeadLetters
from streams.producer import Producer
from tests.pipeline_support import FixedGeocoder, Harness
from tests.support import wait_for


async def test_two_workers_share_the_interval_and_every_acked_notice_is_covered(
    standalone_target, unique_prefix, tmp_path
):
    interval_s = 0.4
    h = Harness(
        standalone_target,
        unique_prefix,
        f"sqlite:///{tmp_path}/views.db",
        trackers=6,
        view_refresh_interval_s=interval_s,
    )
    other = Pipeline(h.streams, h.app, clock=h.clock, geocoder=FixedGeocoder())
    trackers = [f"SIM-{i:05d}" for i in range(1, 7)]
    refreshed: list[float] = []
    workers = []
    for p, name in ((h.pipeline, "a"), (other, "b")):
        stage = p.stage(VIEW_REFRESH)
        real = stage.refresh

        async def timed(view: str, real=real) -> None:
            if view == "latest_location":
                refreshed.append(time.monotonic())
            await real(view)

        stage.refresh = timed
        workers.append(p.worker(VIEW_REFRESH, consumer=name))
    tasks = [asyncio.create_task(w.run()) for w in workers]
    producer = Producer(h.client, h.pipeline.codec)
    newest = {}
    try:
        for wave in range(4):
            at = h.clock() + timedelta(minutes=5 * wave)
            changed = trackers[wave % 3 :: 2]  # overlapping sets
            h.db.run_sync(
                report_store.insert_reports,
                [
                    LocationReported(
                        tracker_id=t, observed_at=at, lat=50.0 + wave, lon=4.0,
                        source="test", fetched_at=at,
                    )
                    for t in changed
                ],
            )  # fmt: skip
            newest.update(dict.fromkeys(changed, 50.0 + wave))
            notices = [
                ViewsChanged(views=list(VIEW_NAMES), changed_at=at, tracker_ids=[t])
                for t in changed
            ]
            await producer.publish(h.pipeline.routes[VIEW_REFRESH], notices)
            done = sum(len(trackers[w % 3 :: 2]) for w in range(wave + 1))
            await wait_for(
                lambda done=done: sum(w.handled for w in workers) == done, 20, f"wave {wave}"
            )
            # every notice acked so far is in the view: no worker acked one early
            latest = dict(
                h.db.run_sync(
                    lambda s: s.execute(text("SELECT tracker_id, lat FROM latest_location")).all()
                )
            )
            assert latest == newest, wave
        assert await DeadLetters(h.client, h.keys(VIEW_REFRESH)).count() == 0
    finally:
        for w in workers:
            w.stop()
        await asyncio.wait_for(asyncio.gather(*tasks), 15)
        await other.aclose()
        await h.aclose()
    assert len(refreshed) >= 2
    gaps = [b - a for a, b in pairwise(sorted(refreshed))]
    assert min(gaps) >= interval_s * 0.9, gaps  # one interval, shared by both workers

"""The operator's console in a real headless Chromium: the trackers page, the map
(vendored Leaflet, no tile server), a trace, the workers and history views, search and
bulk redrive, against a pipeline that ran on real Redis and a SQLite database."""

from __future__ import annotations

import json
import os
import re
from datetime import UTC, datetime

import pytest
from sqlalchemy import func, select

from ops.dashboard import create_app
from processors.topology import GEOCODE
from schemas.tables import Geofence
from tests.browser import LiveServer, chromium_page, require_chromium, screenshots_dir
from tests.pipeline_support import Harness

pytestmark = pytest.mark.browser

TOKEN = "console-test-token"
TRACKERS = 6
TRACKED = "SIM-00002"
POISONED = 3
SHOTS = screenshots_dir()  # screenshots to look at after a run


async def poison(h: Harness, n: int) -> None:
    """``n`` entries naming TRACKED that geocode rejects (validation)."""
    for i in range(n):
        await h.client.xadd(
            h.keys(GEOCODE).stream,
            {
                "type": "location.reported",
                "v": "1",
                "msg_id": f"poison-{i}",
                "data": json.dumps({"tracker_id": TRACKED, "n": i}),
            },
        )
    await h.drain([GEOCODE])


@pytest.fixture
async def ran(standalone_target, unique_prefix, tmp_path):
    require_chromium()
    db_url = f"sqlite:///{tmp_path}/console.db"
    h = Harness(
        standalone_target, unique_prefix, db_url, trackers=TRACKERS, start=datetime.now(UTC)
    )
    try:
        await h.cycle()  # two reports per tracker: a track to draw
        await h.cycle()
        await poison(h, POISONED)
        yield h
    finally:
        await h.aclose()


async def test_console_trackers_map_trace_workers_history_and_bulk_redrive(ran):
    from playwright.async_api import expect

    h = ran
    reports = h.reports()
    assert len({r.tracker_id for r in reports}) == TRACKERS
    fences = h.db.run_sync(
        lambda s: s.scalar(select(func.count()).select_from(Geofence).where(Geofence.active))
    )
    settings = h.app.model_copy(update={"dashboard_token": TOKEN, "dashboard_read_token": "reader"})
    app = create_app(h.streams, settings)  # its own client: the server runs its own loop
    async with LiveServer(app) as server, chromium_page() as page:
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        # the read token is asked for before anything is shown
        await page.goto(server.url + "#trackers")
        await expect(page.locator("#read-form")).to_be_visible()
        await page.locator("#read-token").fill("reader")
        await page.locator("#read-save").click()
        await expect(page.locator("#read-form")).to_be_hidden()

        # trackers: every one fetched just now, all within the guarantee
        await expect(page.locator("#trackers-summary")).to_have_text(
            f"{TRACKERS} trackers ({TRACKERS} fresh); {TRACKERS} of {TRACKERS} in run "
            "fetched within 12 h"
        )
        await expect(page.locator("#tracker-rows tr")).to_have_count(TRACKERS)
        bucket = page.locator('#trackers-hist [data-bucket="< 1 h"] .n')
        await expect(bucket).to_have_text(str(TRACKERS))
        await expect(page.locator('#trackers-hist [data-bucket="> 12 h"] .n')).to_have_text("0")
        first_fix = page.locator(f'#tracker-rows tr[data-tracker="{TRACKED}"] time').first
        await expect(first_fix).to_have_text(re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$"))
        assert "local" in (await first_fix.get_attribute("title") or "")
        await page.screenshot(path=str(SHOTS / "console-trackers.png"), full_page=True)

        # the map: Leaflet from the app itself, no tile server, geofences and trackers drawn
        await page.locator('nav#views a[data-view="map"]').click()
        await expect(page.locator("path.geofence")).to_have_count(fences)
        await expect(page.locator("path.tracker-marker")).to_have_count(TRACKERS)
        await expect(page.locator("path.track")).to_have_count(TRACKERS)
        events = h.events()
        assert events, "the demo geofences saw some enter/exit events"
        await expect(page.locator("#map-events .event")).to_have_count(min(len(events), 100))
        assert await page.locator("img.leaflet-tile").count() == 0
        await expect(page.locator("#map-note")).to_contain_text("No base map configured")
        marker = page.locator(f"path.tracker-{TRACKED}")
        await marker.dispatch_event("click")
        selected = page.locator("#map-selected-body")
        await expect(selected.locator('[data-field="tracker"]')).to_have_text(TRACKED)
        latest = max((r for r in reports if r.tracker_id == TRACKED), key=lambda r: r.observed_at)
        await expect(selected).to_contain_text(f"{latest.lat:.5f}, {latest.lon:.5f}")
        await page.screenshot(path=str(SHOTS / "console-map.png"))

        # a trace, from the map's tracker
        await selected.get_by_role("button", name="Trace latest report").click()
        await expect(page).to_have_url(re.compile(rf"#trace/{TRACKED}$"))
        title = f"{TRACKED} · report #{latest.id} observed "
        await expect(page.locator("#trace-title")).to_contain_text(title)
        for field in ("fetched", "geocoded", "checked"):
            await expect(page.locator(f'#trace-timeline [data-field="{field}"] time')).to_have_text(
                re.compile(r"Z$")
            )
        for stage in ("fetch", "geocode", "geofence"):
            await expect(page.locator(f'#trace-entries tr[data-stage="{stage}"]')).to_have_count(1)
        await expect(page.locator("#trace-entries")).to_contain_text("done")
        await page.screenshot(path=str(SHOTS / "console-trace.png"), full_page=True)

        # workers: this process ran every stage; geocode's count is the reports it handled
        await page.locator('nav#views a[data-view="workers"]').click()
        row = page.locator('#worker-rows tr[data-stage="geocode"]')
        await expect(row).to_have_count(1)
        await expect(row).to_contain_text(str(os.getpid()))
        await expect(row.locator('[data-field="processed"]')).to_have_text(str(len(reports)))
        await page.screenshot(path=str(SHOTS / "console-workers.png"), full_page=True)

        # history: the same count, kept per minute in Redis
        await page.locator('nav#views a[data-view="history"]').click()
        await expect(page.locator('[data-chart="geocode"]')).to_contain_text(
            f"last hour: {len(reports)} processed"
        )
        await page.screenshot(path=str(SHOTS / "console-history.png"), full_page=True)

        # the pipeline: geocode is not "ok" with dead letters, and the panel opens on it
        await page.locator('nav#views a[data-view="pipeline"]').click()
        card = page.locator('#stages [data-stage="geocode"]')
        await expect(card.locator('[data-field="state"]')).to_have_text("dead letters")
        await expect(page.locator("#dlq-stage")).to_have_value("geocode")
        await expect(page.locator("#dlq-rows tr")).to_have_count(POISONED)

        # search by tracker id finds the dead letters
        await page.locator("#find-tracker").fill(TRACKED)
        await page.locator("#find-go").click()
        await expect(page.locator("#find-dead tbody tr")).to_have_count(POISONED)

        # bulk redrive of the category
        await page.locator("#dlq-category").select_option("validation")
        page.once("dialog", lambda dialog: dialog.accept())
        await page.locator("#bulk-redrive").click()
        await expect(page.locator("#token-form")).to_be_visible()
        await page.locator("#token").fill(TOKEN)
        await page.locator("#token-save").click()
        await expect(page.locator("#dlq-message")).to_have_text(
            f"Redriven {POISONED} dead letter(s) of geocode"
        )
        await expect(page.locator("#dlq-rows tr")).to_have_count(0)
        assert errors == []
    assert await h.client.xlen(h.keys(GEOCODE).dlq) == 0
    redriven = [
        f
        for _, f in await h.client.xrange(h.keys(GEOCODE).stream)
        if f[b"msg_id"].startswith(b"poison-")
    ]
    assert len(redriven) == 2 * POISONED  # the originals and the redriven copies

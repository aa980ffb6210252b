"""The console's stage cards in headless Chromium judge health like ``status`` does:
a stage 44 minutes behind is red, a few old dead letters leave a card "ok", recent
ones make it a warning, and the arrows follow the pipeline (notify is fed by geofence)."""

from __future__ import annotations

import re
import time

import pytest

from ops.dashboard import create_app
from processors.config import AppSettings
from streams.connection import connect
from streams.keys import StageKeys
from tests.browser import LiveServer, chromium_page, require_chromium, screenshots_dir
from tests.support import fast_settings

pytestmark = pytest.mark.browser
SCREENSHOT = screenshots_dir() / "console-cards.png"
DAY_MS = 24 * 3_600_000


async def _stage(client, prefix, stage, *, ages_ms=(), dead_ages_ms=()):
    """A stage with a live consumer, undelivered entries and dead letters this old."""
    k = StageKeys(prefix, stage)
    now = time.time_ns() // 1_000_000
    for i, age in enumerate(sorted(ages_ms, reverse=True)):
        await client.xadd(k.stream, {"n": str(i)}, id=f"{now - age}-{i}")
    for i, age in enumerate(sorted(dead_ages_ms, reverse=True)):
        await client.xadd(k.dlq, {"n": str(i)}, id=f"{now - age}-{i}")
    await client.xgroup_create(k.stream, k.group, id="0", mkstream=True)
    await client.xgroup_createconsumer(k.stream, k.group, "c1")
    await client.hset(k.heartbeats, "c1", now)


async def test_cards_follow_status_health_and_the_pipeline(standalone_target, unique_prefix):
    from playwright.async_api import expect

    require_chromium()
    settings = fast_settings(standalone_target, unique_prefix, consumer_dead_after_ms=600_000)
    client = connect(settings)
    try:
        await _stage(client, unique_prefix, "fetch")
        await _stage(
            client, unique_prefix, "geocode", dead_ages_ms=[3 * DAY_MS, 2 * DAY_MS, DAY_MS]
        )
        await _stage(client, unique_prefix, "geofence", dead_ages_ms=[10_000])
        await _stage(client, unique_prefix, "view-refresh")
        await _stage(client, unique_prefix, "notify", ages_ms=[44 * 60_000, 60_000])
        app = create_app(settings, AppSettings.build())
        async with LiveServer(app) as server, chromium_page() as page:
            await page.goto(server.url)
            await expect(page.locator("#conn")).to_have_text("live")

            def card(stage):
                return page.locator(f'#stages [data-stage="{stage}"]')

            def state(stage):
                return card(stage).locator('[data-field="state"]')

            await expect(state("notify")).to_have_text(re.compile(r"^behind 44 m \d+ s$"))
            await expect(card("notify")).to_have_attribute("data-state", "stuck")
            await expect(state("geocode")).to_have_text("ok")  # three old dead letters
            await expect(card("geocode").locator('[data-field="dead_letters"]')).to_have_text("3")
            await expect(state("geofence")).to_have_text("dead letters")  # 10 s old
            await expect(card("geofence")).to_have_attribute("data-state", "warn")
            for stage in ("geocode", "geofence", "view-refresh"):
                await expect(card(stage)).to_have_attribute("data-arrow", "1")
            for stage in ("fetch", "notify"):
                await expect(card(stage)).not_to_have_attribute("data-arrow", "1")
            await expect(card("notify").locator('[data-field="fed"]')).to_have_text(
                "\u2190 fed by geofence"
            )
            await expect(card("geocode").locator('[data-field="fed"]')).to_have_text("")
            await expect(page.locator("#retention")).to_contain_text("processed entries kept")
            await page.screenshot(path=str(SCREENSHOT), full_page=False)
    finally:
        await client.aclose()


async def test_read_token_page_waits_and_says_when_a_token_is_rejected(
    standalone_target, unique_prefix
):
    from playwright.async_api import expect

    require_chromium()
    settings = fast_settings(standalone_target, unique_prefix)
    app = create_app(settings, AppSettings.build(dashboard_read_token="reader"))
    async with LiveServer(app) as server, chromium_page() as page:
        await page.goto(server.url)
        await expect(page.locator("#read-form")).to_be_visible()
        # nothing was read yet: not "no consumers", not "no webhook subscriptions"
        for empty in ("#consumers-empty", "#webhooks-empty"):
            await expect(page.locator(empty)).to_have_text("Waiting for a read token\u2026")
        await expect(page.locator("#read-error")).to_be_hidden()
        await page.locator("#read-token").fill("wrong")
        await page.locator("#read-save").click()
        await expect(page.locator("#read-error")).to_be_visible()
        await expect(page.locator("#read-error")).to_contain_text("rejected")
        await expect(page.locator("#read-form")).to_be_visible()
        await page.locator("#read-token").fill("reader")
        await page.locator("#read-save").click()
        await expect(page.locator("#conn")).to_have_text("live")
        await expect(page.locator("#read-form")).to_be_hidden()
        await expect(page.locator("#consumers-empty")).to_have_text(
            "No consumers have joined any stage yet."
        )

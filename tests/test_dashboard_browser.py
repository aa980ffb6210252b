"""The dashboard page in a real headless Chromium, against a live server and a live pipeline.

Four workers run the stages on a real Redis (pass-through handlers; one poison message
dead-letters in geocode), uvicorn serves the dashboard on a loopback port, and
Playwright drives Debian's chromium (see :mod:`tests.browser`). Without chromium the
tests are skipped, or fail on CI. Every wait is for a condition, never a fixed time.
"""

from __future__ import annotations

import asyncio
import contextlib
import re

import pytest

from ops.dashboard import create_app
from processors import topology
from processors.config import AppSettings
from streams.connection import connect
from streams.errors import Reject
from streams.message import Codec
from streams.producer import Producer
from streams.settings import StreamSettings
from streams.worker import Worker
from tests.browser import LiveServer, chromium_page, require_chromium, screenshots_dir
from tests.support import FAST, Ping, wait_for

pytestmark = pytest.mark.browser

TOKEN = "browser-test-token"
SCREENSHOT = screenshots_dir() / "dashboard.png"
POISON = -1
NUMBER = re.compile(r"^\d[\d,]*$")


async def feed(client, codec, route, per_tick: int = 10, tick_s: float = 0.05) -> None:
    """Steady traffic into fetch, so that the page has rates to show (paced, not waited on)."""
    producer = Producer(client, codec)
    n = 1_000
    while True:
        await producer.publish(route, [Ping(n=i) for i in range(n, n + per_tick)])
        n += per_tick
        await asyncio.sleep(tick_s)


@pytest.fixture
async def live_pipeline(redis_server, unique_prefix):
    """Four running stage workers; ``seen`` collects what reached view-refresh."""
    require_chromium()  # before starting anything
    settings = StreamSettings.build(redis_url=redis_server.url, prefix=unique_prefix, **FAST)
    client = connect(settings)
    codec = Codec([Ping])
    routes = topology.routes(unique_prefix)
    poison = {POISON}
    seen: set[int] = set()
    nxt = dict(zip(topology.STAGES, topology.STAGES[1:], strict=False))

    def forwarder(stage: str):
        async def handle(msg, ctx):
            n = msg.payload.n
            if stage == topology.GEOCODE and n in poison:
                raise Reject(f"cannot geocode report {n}")
            if stage in nxt:
                ctx.publish(routes[nxt[stage]], msg.payload)
            else:
                seen.add(n)

        return handle

    workers = [
        Worker(client, settings, routes[stage], codec, handler=forwarder(stage))
        for stage in topology.STAGES
    ]
    tasks = [asyncio.create_task(w.run()) for w in workers]
    try:
        yield settings, client, codec, routes, poison, seen
    finally:
        for w in workers:
            w.stop()
        await asyncio.wait_for(asyncio.gather(*tasks), 15)
        await client.aclose()


async def dead_lettered(client, codec, routes, seen) -> tuple[str, dict]:
    """30 messages through all stages and the poison one in geocode's dead letters."""
    await Producer(client, codec).publish(
        routes[topology.FETCH], [Ping(n=n) for n in (*range(30), POISON)]
    )
    dlq = routes[topology.GEOCODE].keys().dlq
    await wait_for(lambda: len(seen) == 30, 15, "30 messages through all stages")
    await wait_for(lambda: client.xlen(dlq), 15, "the poison message to be dead-lettered")
    (dead_id, dead_fields), *_ = await client.xrange(dlq)
    return dead_id.decode(), dead_fields


async def test_dashboard_shows_stages_and_redrives_a_dead_letter(live_pipeline):
    from playwright.async_api import expect

    settings, client, codec, routes, poison, seen = live_pipeline
    dead_id, dead_fields = await dead_lettered(client, codec, routes, seen)
    dlq = routes[topology.GEOCODE].keys().dlq

    app = create_app(settings, AppSettings.build(dashboard_token=TOKEN))
    feeder: asyncio.Task[None] | None = None
    async with LiveServer(app) as server, chromium_page() as page:
        try:
            await page.goto(server.url)
            await expect(page.locator("#conn")).to_have_text("live")

            await expect(page.locator("#stages [data-stage]")).to_have_count(len(topology.STAGES))
            for stage in topology.STAGES:
                card = page.locator(f'#stages [data-stage="{stage}"]')
                for field in ("lag", "pending", "length"):
                    await expect(card.locator(f'[data-field="{field}"]')).to_have_text(NUMBER)
                await expect(card.locator('[data-field="consumers"]')).to_have_text("1 / 1")
                # flowing, but geocode dead-lettered an entry: a warning, not "ok"
                state = "dead letters" if stage == topology.GEOCODE else "ok"
                await expect(card.locator('[data-field="state"]')).to_have_text(state)
            geocode = page.locator('#stages [data-stage="geocode"]')
            await expect(geocode.locator('[data-field="length"]')).to_have_text("31")
            fetch = page.locator('#stages [data-stage="fetch"]')
            await expect(fetch.locator('[data-field="length"]')).to_have_text("31")

            # one live consumer per stage in the consumers table
            consumer_rows = page.locator("#consumer-rows tr")
            await expect(consumer_rows).to_have_count(len(topology.STAGES))
            await expect(page.locator("#consumer-rows .live-state.live")).to_have_count(
                len(topology.STAGES)
            )
            for stage in topology.STAGES:
                await expect(
                    page.locator(f'#consumer-rows tr[data-stage="{stage}"]')
                ).to_have_count(1)

            feeder = asyncio.create_task(feed(client, codec, routes[topology.FETCH]))
            # a later poll gives a throughput figure
            await expect(geocode.locator('[data-field="throughput"]')).to_have_text(
                re.compile(r"^[1-9][\d.,]* /s$"), timeout=8_000
            )
            dead_button = geocode.locator('[data-field="dead_letters"]')
            await expect(dead_button).to_have_text("1")
            await expect(page.locator("#readonly")).to_be_hidden()

            await dead_button.click()
            await expect(page.locator("#dlq-stage")).to_have_value("geocode")
            row = page.locator(f'tr[data-dlq-id="{dead_id}"]')
            await expect(row).to_contain_text("cannot geocode report -1")
            await expect(row).to_contain_text("handler")
            await expect(row).to_contain_text("test.ping")
            await expect(page.locator("#dlq-total")).to_have_text("1 in geocode")
            await page.screenshot(path=str(SCREENSHOT), full_page=True)

            poison.clear()  # the fix is deployed: the redriven entry will go through
            await row.locator('button[data-action="redrive"]').click()
            await expect(page.locator("#token-form")).to_be_visible()
            await page.locator("#token").fill(TOKEN)
            await page.locator("#token-save").click()
            await expect(page.locator("#dlq-message")).to_contain_text(f"Redriven {dead_id}")
            await expect(page.locator("tr[data-dlq-id]")).to_have_count(0)
            await expect(page.locator("#token-form")).to_be_hidden()
            await expect(page.locator("#dlq-empty")).to_be_visible()
            stored = await page.evaluate("sessionStorage.getItem('trackstream.dashboardToken')")
            assert stored == TOKEN

            # gone from the dead letters, back in geocode's stream, and through the pipeline
            assert await client.xrange(dlq, min=dead_id, max=dead_id) == []
            stream = routes[topology.GEOCODE].keys().stream
            copies = [
                entry_id
                for entry_id, fields in await client.xrange(stream)
                if fields[b"msg_id"] == dead_fields[b"msg_id"]
            ]
            assert len(copies) == 2  # the original entry and the redriven one
            await wait_for(lambda: POISON in seen, 10, "the redriven message to reach the end")
            await expect(dead_button).to_have_text("0")
        finally:
            if feeder is not None:
                feeder.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await feeder


async def test_dashboard_without_a_token_is_read_only(live_pipeline):
    from playwright.async_api import expect

    settings, client, codec, routes, _, seen = live_pipeline
    dead_id, _ = await dead_lettered(client, codec, routes, seen)

    app = create_app(settings, AppSettings.build(dashboard_token=None))
    async with LiveServer(app) as server, chromium_page() as page:
        await page.goto(server.url)
        await page.locator('#stages [data-stage="geocode"] [data-field="dead_letters"]').click()
        row = page.locator(f'tr[data-dlq-id="{dead_id}"]')
        await expect(row).to_contain_text("cannot geocode report -1")
        await expect(page.locator("#readonly")).to_be_visible()
        await expect(page.locator("#readonly")).to_contain_text("TRACKSTREAM_DASHBOARD_TOKEN")
        await expect(row.locator('button[data-action="redrive"]')).to_be_disabled()
        await expect(row.locator('button[data-action="delete"]')).to_be_disabled()
    assert await client.xlen(routes[topology.GEOCODE].keys().dlq) == 1

"""The console's pages in headless Chromium: trackers search and paging over more than
2,000 trackers, the events log's filters and pages, webhook health with pause and
resume, the entry browser (pages, pending, dead letters, find by id), the history
partitions, the read token, the dark theme and a phone-sized screen.

One server and one browser for the module, over data seeded directly: a SQLite
database (trackers, geofences, events, webhook deliveries and attempts) and real
Redis streams (entries, a consumer group holding some pending, a dead letter)."""

from __future__ import annotations

import asyncio
import re
import secrets
from datetime import UTC, datetime, timedelta

import pytest
import pytest_asyncio

from ops.dashboard import create_app
from processors.config import AppSettings
from schemas import geofence_defs, tracker_store, webhook_store
from schemas.db import upgrade
from schemas.secretbox import SecretBox, new_key
from schemas.tables import GeofenceEvent, WebhookAttempt, WebhookDelivery, WebhookSubscription
from streams.connection import connect
from streams.deadletter import DeadLetters
from streams.keys import StageKeys
from streams.settings import StreamSettings
from tests.browser import CHROMIUM_ARGS, LiveServer, require_chromium, screenshots_dir
from tests.support import FAST, wait_for

pytestmark = [pytest.mark.browser, pytest.mark.asyncio(loop_scope="module")]

TOKEN = "pages-test-token"
READER = "pages-reader"
TRACKERS = 2_150
EVENTS_RECENT = 120  # within the last 24 hours
EVENTS_OLD = 10  # three days ago
ENTRIES = 60
PENDING = 5
SHOTS = screenshots_dir()


def seed_db(db_url: str, now: datetime) -> dict[str, int]:
    from processors.database import Database

    upgrade(db_url)
    db = Database(db_url)
    box = SecretBox([new_key()])

    def fill(session):
        rows = [
            {
                "external_id": f"FLT-{i:05d}",
                "name": f"Fleet van {i}",
                "run_starts_at": now - timedelta(days=1),
                "run_ends_at": now + timedelta(days=30),
            }
            for i in range(1, TRACKERS)
        ]
        rows.append({"external_id": "ZZ-HARVEST", "name": "Blue Harvester"})
        tracker_store.upsert_trackers(session, rows)
        depot = geofence_defs.add_geofence(
            session, "Depot", "circle", center_lat=48.1, center_lon=11.5, radius_m=500
        )
        port = geofence_defs.add_geofence(
            session, "Harbour", "circle", center_lat=53.5, center_lon=9.9, radius_m=900
        )
        events = []
        for i in range(EVENTS_RECENT):
            events.append(
                GeofenceEvent(
                    tracker_id=f"FLT-{1 + i % 4:05d}",
                    geofence_id=depot.id if i % 3 else port.id,
                    observed_at=now - timedelta(minutes=5 * i + 1),
                    kind="enter" if i % 2 else "exit",
                )
            )
        for i in range(EVENTS_OLD):
            events.append(
                GeofenceEvent(
                    tracker_id="FLT-00009",
                    geofence_id=depot.id,
                    observed_at=now - timedelta(days=3, minutes=i),
                    kind="enter",
                )
            )
        session.add_all(events)
        secret = "whsec_" + "QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVo0NTY3ODk="
        sub = webhook_store.add_subscription(
            session, "https://hooks.example.com/in?token=x", secret, box=box
        )
        webhook_store.add_subscription(session, "https://other.example.com/x", secret, box=box)
        states = ["delivered"] * 7 + ["dead"] * 2 + ["pending"] * 3
        for i, state in enumerate(states):
            session.add(
                WebhookDelivery(
                    event_id=f"ev-{i}",
                    subscription_id=sub,
                    tracker_id="FLT-00001",
                    geofence_id=depot.id,
                    observed_at=now - timedelta(minutes=i),
                    kind="enter",
                    state=state,
                    attempts=0 if i == 11 else 2,  # one pending delivery not tried yet
                    delivered_at=now - timedelta(minutes=i) if state == "delivered" else None,
                )
            )
        session.add(
            WebhookAttempt(
                event_id="ev-9",
                subscription_id=sub,
                attempt=2,
                status=503,
                error="Service Unavailable",
                at=now - timedelta(minutes=1),
            )
        )
        session.add(
            WebhookAttempt(event_id="ev-0", subscription_id=sub, attempt=1, status=204, at=now)
        )
        return {"depot": depot.id, "port": port.id, "sub": sub}

    try:
        return db.run_sync(fill)
    finally:
        db.dispose()


async def seed_streams(client, prefix: str) -> dict[str, object]:
    """geocode: ENTRIES entries, PENDING of them pending on consumer c1, one more
    dead-lettered; its priority lane holds one entry."""
    keys = StageKeys(prefix, "geocode", 0, 1)
    ids = []
    for i in range(ENTRIES):
        ids.append(
            (
                await client.xadd(
                    keys.stream,
                    {
                        "type": "location.reported",
                        "v": "1",
                        "msg_id": f"m-{i}",
                        "data": f'{{"tracker_id": "FLT-{i:05d}", "n": {i}}}',
                    },
                )
            ).decode()
        )
    await client.xadd(keys.priority, {"type": "location.reported", "msg_id": "urgent"})
    await client.xgroup_create(keys.stream, keys.group, id="0")
    await client.xgroup_create(keys.priority, keys.group, id="0")
    read = await client.xreadgroup(keys.group, "c1", {keys.stream: ">"}, count=PENDING + 1)
    held = [(i.decode(), f) for i, f in read[0][1]]
    dead_id, dead_fields = held[-1]
    letter = await DeadLetters(client, keys).move(
        stream=keys.stream,
        entry_id=dead_id,
        consumer="c1",
        category="handler",
        error="geocoder said no",
        attempts=3,
        fields=dead_fields,
    )
    return {"ids": ids, "pending": [i for i, _ in held[:-1]], "dead": dead_id, "letter": letter}


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def console(redis_server, tmp_path_factory):
    require_chromium()
    from playwright.async_api import async_playwright

    now = datetime.now(UTC)
    db_url = f"sqlite:///{tmp_path_factory.mktemp('pages')}/console.db"
    ids = seed_db(db_url, now)
    prefix = f"t{secrets.token_hex(4)}"
    settings = StreamSettings.build(redis_url=redis_server.url, prefix=prefix, **FAST)
    client = connect(settings)
    streams = await seed_streams(client, prefix)
    app_settings = AppSettings.build(
        database_url=db_url, dashboard_token=TOKEN, dashboard_read_token=READER
    )
    app = create_app(settings, app_settings)
    try:
        async with LiveServer(app) as server, async_playwright() as pw:
            browser = await pw.chromium.launch(
                executable_path=str(require_chromium()), args=CHROMIUM_ARGS, headless=True
            )
            try:
                yield {
                    "server": server,
                    "browser": browser,
                    "client": client,
                    "db_url": db_url,
                    "prefix": prefix,
                    **ids,
                    **streams,
                }
            finally:
                await browser.close()
    finally:
        await client.aclose()


async def open_page(console, view: str, *, width=1360, height=900, token=READER, **context):
    """A fresh browser context (its own storage) on ``#view``, with the read token."""
    ctx = await console["browser"].new_context(
        viewport={"width": width, "height": height}, **context
    )
    if token:
        await ctx.add_init_script(f"sessionStorage.setItem('trackstream.readToken', '{token}')")
    page = await ctx.new_page()
    page.set_default_timeout(10_000)
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    if view != "about:blank":
        await page.goto(console["server"].url + "#" + view)
    return page, errors


async def test_trackers_search_and_paging_past_2000(console):
    from playwright.async_api import expect

    page, errors = await open_page(console, "trackers")
    count = page.locator("#trackers-count")
    await expect(count).to_have_text(f"1\u2013100 of {TRACKERS:,}")
    await expect(page.locator("#tracker-rows tr")).to_have_count(100)
    await expect(page.locator("#trackers-summary")).to_contain_text(f"{TRACKERS} trackers")
    await page.locator("#trackers-sort").select_option("id")
    await expect(page.locator("#tracker-rows tr").first).to_have_attribute(
        "data-tracker", "FLT-00001"
    )
    for n in (2, 3):
        await page.locator("#trackers-next").click()
        await expect(count).to_have_text(f"{(n - 1) * 100 + 1}\u2013{n * 100} of {TRACKERS:,}")
    await page.locator("#trackers-last").click()  # rows past 2,000 are reachable
    await expect(count).to_have_text(f"2,101\u2013{TRACKERS:,} of {TRACKERS:,}")
    await expect(page.locator("#tracker-rows tr")).to_have_count(TRACKERS - 2_100)
    await expect(page.locator('#tracker-rows tr[data-tracker="ZZ-HARVEST"]')).to_have_count(1)
    await expect(page.locator("#trackers-next")).to_be_disabled()
    await page.locator("#trackers-prev").click()
    await expect(count).to_have_text(f"2,001\u20132,100 of {TRACKERS:,}")

    # by part of an id, then by part of a name, any case; a new search starts at page 1
    await page.locator("#trackers-q").fill("flt-0213")
    await expect(count).to_have_text("1\u201310 of 10 matching \u201cflt-0213\u201d")
    await expect(page.locator("#tracker-rows tr").first).to_have_attribute(
        "data-tracker", "FLT-02130"
    )
    await page.locator("#trackers-q").fill("harvester")
    await expect(page.locator("#tracker-rows tr")).to_have_count(1)
    await expect(page.locator("#tracker-rows tr")).to_contain_text("Blue Harvester")
    await page.locator("#trackers-q").fill("nobody-like-this")
    await expect(count).to_have_text("no tracker matches \u201cnobody-like-this\u201d")
    await page.screenshot(path=str(SHOTS / "console-trackers-search.png"))
    assert errors == []


async def test_events_filters_and_paging(console):
    from playwright.async_api import expect

    page, errors = await open_page(console, "events")
    rows = page.locator("#event-rows tr")
    where = page.locator('#events-pager [data-field="page"]')
    await expect(rows).to_have_count(50)
    await expect(where).to_contain_text("page 1 \u00b7 50 event(s) since")
    newest = await rows.first.get_attribute("data-event")
    await page.locator('#events-pager [data-page="next"]').click()
    await expect(where).to_contain_text("page 2")
    await expect(rows).to_have_count(50)
    await page.locator('#events-pager [data-page="next"]').click()
    await expect(rows).to_have_count(EVENTS_RECENT - 100)
    await expect(page.locator('#events-pager [data-page="next"]')).to_be_disabled()
    await page.locator('#events-pager [data-page="prev"]').click()
    await page.locator('#events-pager [data-page="prev"]').click()
    await expect(where).to_contain_text("page 1")
    await expect(rows.first).to_have_attribute("data-event", newest or "")

    # kind, tracker and geofence (by name), then all time
    await page.locator("#events-kind").select_option("exit")
    await page.locator("#events-tracker").fill("FLT-00001")
    await page.locator("#events-apply").click()
    expected = sum(1 for i in range(EVENTS_RECENT) if i % 2 == 0 and i % 4 == 0)
    await expect(rows).to_have_count(expected)
    assert await page.locator('#event-rows tr[data-kind="enter"]').count() == 0
    await page.locator("#events-fence").fill("Harbour")
    await page.locator("#events-apply").click()
    expected = sum(1 for i in range(EVENTS_RECENT) if i % 4 == 0 and i % 3 == 0)
    await expect(rows).to_have_count(expected)
    await page.locator("#events-clear").click()
    await expect(rows).to_have_count(50)
    await page.locator("#events-tracker").fill("FLT-00009")
    await page.locator("#events-apply").click()
    await expect(page.locator("#events-empty")).to_be_visible()
    await page.locator("#events-since").fill("all")
    await page.locator("#events-apply").click()
    await expect(rows).to_have_count(EVENTS_OLD)
    await expect(where).to_contain_text("all time")
    await page.locator("#events-fence").fill("No such fence")
    await page.locator("#events-apply").click()
    await expect(page.locator("#events-error")).to_contain_text("no geofence named")
    await expect(page.locator("#events-table")).to_be_hidden()  # no rows of the last filter
    await page.screenshot(path=str(SHOTS / "console-events.png"))
    assert errors == []


async def test_webhook_health_pause_and_resume(console):
    from playwright.async_api import expect

    from processors.database import Database

    page, errors = await open_page(console, "about:blank")
    # the notify stage's backlog-drain figures in api/webhooks: shown when they come,
    # and the health table does not wait for them (the answer is held until it shows)
    shown = asyncio.Event()
    held: list[int] = []

    async def drain_figures(route):
        held.append(1)
        await shown.wait()
        answer = await route.fetch()
        body = await answer.json()
        for sub in body["subscriptions"]:
            sub["drain"] = {"arrival_per_min": 115, "allowed_per_min": 20}
        await route.fulfill(response=answer, json=body)

    await page.route(re.compile(r"/api/webhooks$"), drain_figures)
    await page.goto(console["server"].url + "#webhooks")
    row = page.locator(f'#hook-rows tr[data-sub="{console["sub"]}"]')
    await expect(row.locator('[data-field="delivered"]')).to_have_text("7")
    await wait_for(lambda: bool(held), 5, "the page to ask api/webhooks")
    assert await row.locator('[data-field="drain"]').inner_text() == ""
    shown.set()
    await expect(row.locator('[data-field="drain"]')).to_have_text(
        "drain: arrival per min 115, allowed per min 20"
    )
    await expect(row.locator('[data-field="failing"]')).to_have_text("2")
    await expect(row.locator('[data-field="waiting"]')).to_have_text("1")
    await expect(row.locator('[data-field="dead"]')).to_have_text("2")
    await expect(row.locator('[data-field="last_error"]')).to_contain_text(
        "HTTP 503: Service Unavailable"
    )
    assert "token=x" not in await row.inner_text()  # the URL without its query
    await expect(page.locator("#hook-rows tr")).to_have_count(2)

    await row.locator('button[data-action="pause"]').click()
    await expect(page.locator("#hooks-token-form")).to_be_visible()
    await page.locator("#hooks-token").fill("wrong")
    await page.locator("#hooks-token-form button[type=submit]").click()
    await expect(page.locator("#hooks-message")).to_have_text(
        "The token was not accepted; enter it again."
    )
    await page.locator("#hooks-token").fill(TOKEN)
    await page.locator("#hooks-token-form button[type=submit]").click()
    await expect(page.locator("#hooks-message")).to_contain_text(
        f"Paused subscription {console['sub']}"
    )
    await expect(row.locator('[data-field="state"]')).to_have_text("paused")
    db = Database(console["db_url"])
    try:
        active = db.run_sync(lambda s: s.get(WebhookSubscription, console["sub"]).active)
        assert active is False
        await row.locator('button[data-action="resume"]').click()  # the token is kept
        await expect(row.locator('[data-field="state"]')).to_have_text("active")
        assert db.run_sync(lambda s: s.get(WebhookSubscription, console["sub"]).active)
    finally:
        db.dispose()
    await page.screenshot(path=str(SHOTS / "console-webhooks.png"), full_page=True)
    assert errors == []


async def test_entry_browser_pages_lanes_and_find_by_id(console):
    from playwright.async_api import expect

    page, errors = await open_page(console, "entries/geocode")
    rows = page.locator("#entry-rows tr")
    await expect(rows).to_have_count(25)
    ids = console["ids"]
    await expect(rows.first).to_have_attribute("data-entry-id", ids[-1])  # newest first
    await expect(page.locator("#entries-summary")).to_contain_text(
        f"{ENTRIES} entries, {PENDING} pending"
    )
    await page.locator('#entries-pager [data-page="next"]').click()
    await page.locator('#entries-pager [data-page="next"]').click()
    await expect(rows).to_have_count(ENTRIES - 50)
    await expect(rows.last).to_have_attribute("data-entry-id", ids[0])
    await expect(page.locator(f'#entry-rows tr[data-entry-id="{ids[0]}"]')).to_have_attribute(
        "data-state", "pending"
    )
    await expect(
        page.locator(f'#entry-rows tr[data-entry-id="{ids[PENDING + 1]}"]')
    ).to_have_attribute("data-state", "waiting")

    await page.locator("#entries-view").select_option("pending")
    await expect(rows).to_have_count(PENDING)
    await expect(rows.first).to_contain_text("pending on c1 \u00b7 1 deliveries (1 counted)")
    await page.locator("#entries-lane").select_option("dlq")
    await expect(rows).to_have_count(1)
    await expect(rows.first).to_contain_text("handler after 3 deliveries: geocoder said no")
    await page.locator("#entries-lane").select_option("priority")
    await page.locator("#entries-view").select_option("all")
    await expect(rows).to_have_count(1)
    await expect(rows.first).to_have_attribute("data-state", "waiting")

    # find by id, in every stage: a pending entry, then one that is not there
    wanted = console["pending"][1]
    await page.locator("#entries-id").fill(wanted)
    await page.locator("#entries-find-go").click()
    found = page.locator("#entries-found-table tbody tr")
    await expect(found).to_have_count(1)
    await expect(found).to_contain_text("geocode / stream")
    await expect(found).to_have_attribute("data-state", "pending")
    await found.locator("summary").click()
    await expect(found.locator("pre")).to_contain_text('"tracker_id": "FLT-00001"')
    await page.locator("#entries-id").fill("1-1")
    await page.locator("#entries-find-go").click()
    await expect(page.locator('#entries-found [data-field="found"]')).to_contain_text(
        "No entry 1-1 in any stage"
    )
    await page.locator("#entries-id").fill("not-an-id")
    await page.locator("#entries-find-go").click()
    await expect(page.locator("#entries-found")).to_contain_text("is not a stream id")
    await page.screenshot(path=str(SHOTS / "console-entries.png"), full_page=True)
    assert errors == []


async def test_partitions_view_on_sqlite(console):
    from playwright.async_api import expect

    page, errors = await open_page(console, "partitions")
    events = page.locator('#partition-rows tr[data-table="geofence_events"]')
    await expect(events.locator('[data-field="rows"]')).to_have_text(
        str(EVENTS_RECENT + EVENTS_OLD)
    )
    await expect(page.locator('#partition-rows tr[data-table="location_history"]')).to_have_count(1)
    await expect(page.locator("#partitions-retention")).to_have_text(
        "No retention set (TRACKSTREAM_HISTORY_RETENTION_DAYS): everything is kept."
    )
    assert errors == []


async def test_read_token_wait_and_rejection_on_the_new_pages(console):
    from playwright.async_api import expect

    page, _ = await open_page(console, "events", token=None)
    await expect(page.locator("#read-form")).to_be_visible()
    for empty in ("#events-empty", "#consumers-empty", "#webhooks-empty"):
        await expect(page.locator(empty)).to_have_text("Waiting for a read token\u2026")
    await page.locator("#read-token").fill("not-it")
    await page.locator("#read-save").click()
    await expect(page.locator("#read-error")).to_contain_text("rejected")
    await page.locator("#read-token").fill(READER)
    await page.locator("#read-save").click()
    await expect(page.locator("#event-rows tr")).to_have_count(50)
    await expect(page.locator("#read-form")).to_be_hidden()


async def test_dark_theme_follows_the_system_and_the_toggle_sticks(console):
    from playwright.async_api import expect

    page, errors = await open_page(console, "trackers", color_scheme="dark")
    root = page.locator("html")
    await expect(root).to_have_attribute("data-shown-theme", "dark")
    background = "getComputedStyle(document.documentElement).backgroundColor"
    assert await page.evaluate(background) == "rgb(15, 20, 26)"
    await expect(page.locator("#tracker-rows tr")).to_have_count(100)
    await page.screenshot(path=str(SHOTS / "console-dark.png"))
    await page.locator("#theme-toggle").click()
    await expect(root).to_have_attribute("data-theme", "light")
    assert await page.evaluate(background) == "rgb(244, 246, 248)"
    await page.reload()
    await expect(root).to_have_attribute("data-shown-theme", "light")  # it stuck
    await page.locator("#theme-toggle").click()
    await expect(root).to_have_attribute("data-theme", "dark")
    assert errors == []


async def test_every_page_fits_a_phone(console):
    from playwright.async_api import expect

    page, errors = await open_page(console, "pipeline", width=375, height=740, is_mobile=True)
    wide = "document.documentElement.scrollWidth - document.documentElement.clientWidth"
    ready = {
        "pipeline": "#stages [data-stage]",
        "trackers": "#tracker-rows tr",
        "events": "#event-rows tr",
        "map": "#map",
        "trace": "#trace-form",
        "entries/geocode": "#entry-rows tr",
        "webhooks": "#hook-rows tr",
        "workers": "#workers-table",
        "history": "#charts [data-chart]",
        "partitions": "#partition-rows tr",
    }
    for view, shown in ready.items():
        await page.goto(console["server"].url + "#" + view)
        await expect(page.locator(shown).first).to_be_visible()
        assert await page.evaluate(wide) <= 0, f"#{view} scrolls sideways on a phone"
        if view in ("pipeline", "webhooks"):
            await page.screenshot(path=str(SHOTS / f"console-phone-{view}.png"), full_page=True)
        if view == "trackers":  # its table is wider than the screen: it scrolls in its card
            card = page.locator("#trackers-table").locator("xpath=..")
            assert await card.evaluate("c => c.scrollWidth > c.clientWidth")
            await page.screenshot(path=str(SHOTS / "console-phone-trackers.png"))
    assert errors == []

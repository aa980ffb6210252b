"""The console pages' API refuses what it cannot do, in one line: pause and resume need
the mutation token, bad paging and filter values are a 400 naming the parameter."""

from __future__ import annotations

import httpx
import pytest

from ops.dashboard import create_app
from processors.config import AppSettings
from schemas import webhook_store
from schemas.db import upgrade
from schemas.secretbox import SecretBox, new_key
from streams.settings import StreamSettings

TOKEN = "api-token"


@pytest.fixture(scope="module")
def db_url(tmp_path_factory):
    from processors.database import Database

    url = f"sqlite:///{tmp_path_factory.mktemp('pages-api')}/api.db"
    upgrade(url)
    db = Database(url)
    secret = "whsec_" + "QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVo0NTY3ODk="
    try:
        db.run_sync(
            lambda s: webhook_store.add_subscription(
                s, "https://hooks.example.com/in", secret, box=SecretBox([new_key()])
            )
        )
    finally:
        db.dispose()
    return url


async def _call(db_url, token, *requests):
    settings = StreamSettings.build(redis_url="redis://127.0.0.1:9", prefix="pagesapi")
    app = create_app(settings, AppSettings.build(database_url=db_url, dashboard_token=token))
    out = []
    try:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://console") as c:
            for method, path, headers in requests:
                r = await c.request(method, path, headers=headers)
                out.append((r.status_code, r.json()))
    finally:
        await app.state.dashboard.aclose()
    return out


async def test_pause_and_resume_need_the_mutation_token(db_url):
    auth = {"Authorization": f"Bearer {TOKEN}"}
    (off,) = await _call(db_url, None, ("POST", "/api/webhooks/1/pause", auth))
    assert off[0] == 403 and "TRACKSTREAM_DASHBOARD_TOKEN" in off[1]["error"]
    bare, wrong, unknown, bad, paused, health, resumed = await _call(
        db_url,
        TOKEN,
        ("POST", "/api/webhooks/1/pause", {}),
        ("POST", "/api/webhooks/1/pause", {"Authorization": "Bearer nope"}),
        ("POST", "/api/webhooks/99/pause", auth),
        ("POST", "/api/webhooks/x1/pause", auth),
        ("POST", "/api/webhooks/1/pause", auth),
        ("GET", "/api/webhooks/health", {}),
        ("POST", "/api/webhooks/1/resume", auth),
    )
    assert bare[0] == wrong[0] == 401
    assert unknown == (404, {"error": "no webhook subscription 99"})
    assert bad[0] == 400 and "not a subscription id" in bad[1]["error"]
    assert paused == (200, {"id": 1, "url": "https://hooks.example.com/in", "state": "paused"})
    (sub,) = health[1]["subscriptions"]
    assert sub["state"] == "paused" and sub["delivered"] == 0 and sub["last_error"] is None
    assert resumed[1]["state"] == "active"


@pytest.mark.parametrize(
    ("path", "says"),
    [
        ("/api/trackers?limit=5000", "limit must be between 1 and 2000"),
        ("/api/trackers?offset=-1", "offset must be between"),
        ("/api/trackers?sort=name", "sort must be stale or id"),
        ("/api/events?kind=inside", "kind must be enter or exit"),
        ("/api/events?since=soon", "since: 'soon' is neither"),
        ("/api/events?limit=0", "limit must be between 1 and 500"),
        ("/api/stages/geocode/entries?lane=side", "lane must be one of: stream, priority, dlq"),
        ("/api/stages/geocode/entries?count=1000", "count must be between 1 and 200"),
        ("/api/entries/abc", "'abc' is not a stream id"),
    ],
)
async def test_bad_paging_and_filters_are_a_400_naming_the_parameter(db_url, path, says):
    ((status, body),) = await _call(db_url, None, ("GET", path, {}))
    assert status == 400 and says in body["error"], body


async def test_trackers_pages_share_one_read_until_a_fresh_one(tmp_path):
    from processors.database import Database
    from schemas import tracker_store

    url = f"sqlite:///{tmp_path}/snap.db"
    upgrade(url)
    db = Database(url)
    add = tracker_store.upsert_trackers
    try:
        db.run_sync(lambda s: add(s, [{"external_id": f"T-{i:03d}"} for i in range(150)]))
        settings = StreamSettings.build(redis_url="redis://127.0.0.1:9", prefix="pagesapi")
        app = create_app(settings, AppSettings.build(database_url=url))
        transport = httpx.ASGITransport(app=app)
        try:
            async with httpx.AsyncClient(transport=transport, base_url="http://c") as c:
                first = (await c.get("/api/trackers?sort=id")).json()
                db.run_sync(lambda s: add(s, [{"external_id": "T-999"}]))
                second = (await c.get("/api/trackers?sort=id&offset=100")).json()
                fresh = (await c.get("/api/trackers?sort=id&offset=100&fresh=1")).json()
        finally:
            await app.state.dashboard.aclose()
    finally:
        db.dispose()
    assert (first["shown"], first["matched"]) == (100, 150)
    assert first["trackers"][0]["tracker_id"] == "T-000"
    # the second page comes from the same read: the pages add up, the summary agrees
    assert (second["shown"], second["matched"], second["as_of"]) == (50, 150, first["as_of"])
    assert second["summary"]["total"] == 150
    assert (fresh["shown"], fresh["matched"], fresh["summary"]["total"]) == (51, 151, 151)

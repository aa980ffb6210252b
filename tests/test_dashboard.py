"""The dashboard's HTTP API against a real Redis (standalone and cluster), in process."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import httpx
import pytest

from ops.dashboard import create_app
from ops.dashboard.throughput import Throughput
from processors import topology
from processors.config import AppSettings
from streams.connection import connect
from streams.embedded import free_port
from streams.errors import Reject
from streams.message import Codec
from streams.producer import Producer
from streams.settings import StreamSettings
from streams.worker import Worker
from tests.support import Ping, fast_settings

TOKEN = "t0ken-for-tests"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
async def env(redis_target, unique_prefix):
    settings = fast_settings(redis_target, unique_prefix, consumer_dead_after_ms=60_000)
    client = connect(settings)
    yield settings, client, Codec([Ping]), topology.routes(unique_prefix)
    await client.aclose()


def http(app) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://dashboard")


@pytest.fixture
async def api(env):
    settings, client, *_ = env
    app = create_app(settings, AppSettings.build(dashboard_token=TOKEN), client=client)
    async with http(app) as c:
        yield c


async def poisoned_geocode(env, poison=(0, 1)) -> None:
    """geocode: five entries handled by a worker, those in ``poison`` dead-lettered."""
    settings, client, codec, routes = env
    geocode = routes[topology.GEOCODE]
    await Producer(client, codec).publish(geocode, [Ping(n=n) for n in range(5)])

    async def handle(msg, ctx):
        if msg.payload.n in poison:
            raise Reject(f"poison {msg.payload.n}")

    await Worker(client, settings, geocode, codec, handler=handle).run(burst=True)


async def test_health_and_readiness(api):
    assert (await api.get("/healthz")).json() == {"status": "ok"}
    ready = await api.get("/readyz")
    assert ready.status_code == 200, ready.text


async def test_not_ready_when_redis_is_down():
    settings = StreamSettings.build(redis_url=f"redis://127.0.0.1:{free_port()}/0", prefix="down")
    app = create_app(settings, AppSettings.build())  # its own client, closed by the lifespan
    async with app.router.lifespan_context(app), http(app) as c:
        assert (await c.get("/healthz")).status_code == 200
        ready = await c.get("/readyz")
        assert ready.status_code == 503
        assert ready.json()["status"] == "unavailable"
        assert "127.0.0.1" in ready.json()["reason"]
        stages = await c.get("/api/stages")
        assert stages.status_code == 503
        assert "unavailable" in stages.json()["error"]


async def test_readiness_follows_redis(redis_factory, unique_prefix):
    server = redis_factory()
    settings = StreamSettings.build(redis_url=server.url, prefix=unique_prefix)
    app = create_app(settings, AppSettings.build())
    async with app.router.lifespan_context(app), http(app) as c:
        assert (await c.get("/readyz")).status_code == 200
        server.kill()
        assert (await c.get("/readyz")).status_code == 503
        assert (await c.get("/healthz")).status_code == 200  # alive all the same
        server.start()
        assert (await c.get("/readyz")).status_code == 200
        assert (await c.get("/api/stages")).status_code == 200


async def test_stages_show_backlog_consumers_and_dead_letters(api, env):
    settings, client, codec, routes = env
    await poisoned_geocode(env)
    fetch = routes[topology.FETCH]
    await Producer(client, codec).publish(fetch, [Ping(n=n) for n in range(3)])

    body = (await api.get("/api/stages")).json()
    assert body["mutations_enabled"] is True
    by_stage = {s["stage"]: s for s in body["stages"]}
    assert list(by_stage) == list(topology.STAGES)
    geocode = by_stage["geocode"]
    assert (geocode["length"], geocode["lag"], geocode["pending"]) == (5, 0, 0)
    assert geocode["dead_letters"] == 2
    assert (geocode["consumers"], geocode["live_consumers"]) == (1, 1)
    assert geocode["oldest_pending_age_s"] is None
    assert geocode["throughput_per_s"] is None  # one sample so far
    assert geocode["shards"] == 1 and geocode["shard_detail"][0]["shard"] == 0
    fetch_view = by_stage["fetch"]
    assert (fetch_view["length"], fetch_view["lag"], fetch_view["consumers"]) == (3, 3, 0)

    assert [c["live"] for c in geocode["consumer_detail"]] == [True]
    assert fetch_view["consumer_detail"] == []
    # the worker trimmed geocode (nothing removed: retention keeps an hour); fetch never
    assert geocode["last_trim_age_s"] is not None and fetch_view["last_trim_age_s"] is None
    assert body["retention"] == {
        "retention_ms": settings.retention_ms,
        "trim_interval_ms": settings.trim_interval_ms,
        "automatic": True,
    }

    consumers = (await api.get("/api/stages/geocode/consumers")).json()["consumers"]
    assert len(consumers) == 1
    assert consumers[0]["live"] is True and consumers[0]["pending"] == 0
    assert consumers[0]["name"] == geocode["consumer_detail"][0]["name"]
    assert consumers[0]["heartbeat_age_ms"] >= 0


async def test_dead_letter_listing_and_filters(api, env):
    await poisoned_geocode(env)
    listing = (await api.get("/api/stages/geocode/dlq")).json()
    assert listing["total"] == 2
    letters = listing["dead_letters"]
    assert [d["category"] for d in letters] == ["handler", "handler"]
    assert {d["error"] for d in letters} == {"Reject: poison 0", "Reject: poison 1"}
    assert letters[0]["type"] == "test.ping" and letters[0]["attempts"] == 1
    assert letters[0]["origin"].endswith(":{geocode@2}:stream")  # its tag in streams/keys.py
    assert "data" in letters[0]["fields"]
    assert len((await api.get("/api/stages/geocode/dlq?limit=1")).json()["dead_letters"]) == 1
    none = await api.get("/api/stages/geocode/dlq?category=timeout")
    assert none.json()["dead_letters"] == []
    assert (await api.get("/api/stages/geocode/dlq?category=nope")).status_code == 400
    assert (await api.get("/api/stages/geocode/dlq?limit=0")).status_code == 400


async def test_show_one_dead_letter(api, env):
    await poisoned_geocode(env, poison=(4,))
    (listed,) = (await api.get("/api/stages/geocode/dlq")).json()["dead_letters"]
    shown = await api.get(f"/api/stages/geocode/dlq/{listed['id']}")
    assert shown.status_code == 200
    assert shown.json() == listed
    assert shown.json()["error"] == "Reject: poison 4"
    assert shown.json()["origin_id"] and shown.json()["consumer"]
    assert (await api.get("/api/stages/geocode/dlq/1-1")).status_code == 404
    assert (await api.get("/api/stages/geocode/dlq/nope")).status_code == 400


async def test_redrive_needs_the_token_and_brings_the_entry_back(api, env):
    _, client, codec, routes = env
    await poisoned_geocode(env)
    letters = (await api.get("/api/stages/geocode/dlq")).json()["dead_letters"]
    first, second = letters[0]["id"], letters[1]["id"]
    stream = routes[topology.GEOCODE].keys().stream

    url = f"/api/stages/geocode/dlq/{first}/redrive"
    assert (await api.post(url)).status_code == 401
    basic = await api.post(url, headers={"Authorization": f"Basic {TOKEN}"})
    assert basic.status_code == 401
    prefix = await api.post(url, headers={"Authorization": f"Bearer {TOKEN[:-1]}"})
    assert prefix.status_code == 401
    wrong = await api.post(url, headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401 and wrong.headers["www-authenticate"] == "Bearer"
    assert await client.xlen(routes[topology.GEOCODE].keys().dlq) == 2

    ok = await api.post(url, headers=AUTH)
    assert ok.status_code == 200, ok.text
    new_id = ok.json()["redriven"][first]
    back = await client.xrange(stream, min=new_id, max=new_id)
    assert codec.decode(back[0][1]).msg_id == letters[0]["fields"]["msg_id"]
    assert (await api.post(url, headers=AUTH)).status_code == 404  # once only

    bulk = await api.post(
        "/api/stages/geocode/dlq/redrive", json={"ids": [second, "1-1"]}, headers=AUTH
    )
    assert bulk.status_code == 200
    assert bulk.json()["redriven"][second] is not None
    assert bulk.json()["redriven"]["1-1"] is None
    assert (await api.get("/api/stages/geocode/dlq")).json()["total"] == 0
    assert await client.xlen(stream) == 7

    bad = await api.post("/api/stages/geocode/dlq/redrive", json={"ids": "x"}, headers=AUTH)
    assert bad.status_code == 400


async def test_bulk_redrive_checks_every_id_before_redriving_any(api, env):
    _, client, _, routes = env
    await poisoned_geocode(env)
    ids = [d["id"] for d in (await api.get("/api/stages/geocode/dlq")).json()["dead_letters"]]
    response = await api.post(
        "/api/stages/geocode/dlq/redrive", json={"ids": [*ids, "bogus"]}, headers=AUTH
    )
    assert response.status_code == 400 and "bogus" in response.json()["error"]
    assert await client.xlen(routes[topology.GEOCODE].keys().dlq) == 2
    not_json = await api.post("/api/stages/geocode/dlq/redrive", content=b"{nope", headers=AUTH)
    assert not_json.status_code == 400


async def test_delete_needs_the_token(api, env):
    await poisoned_geocode(env, poison=(3,))
    dlq_id = (await api.get("/api/stages/geocode/dlq")).json()["dead_letters"][0]["id"]
    assert (await api.delete(f"/api/stages/geocode/dlq/{dlq_id}")).status_code == 401
    gone = await api.delete(f"/api/stages/geocode/dlq/{dlq_id}", headers=AUTH)
    assert gone.json() == {"deleted": [dlq_id]}
    assert (await api.delete(f"/api/stages/geocode/dlq/{dlq_id}", headers=AUTH)).status_code == 404
    assert (await api.delete("/api/stages/geocode/dlq/not-an-id", headers=AUTH)).status_code == 400


async def test_mutations_disabled_without_a_configured_token(env):
    settings, client, *_ = env
    await poisoned_geocode(env, poison=(2,))
    app = create_app(settings, AppSettings.build(dashboard_token=None), client=client)
    async with http(app) as c:
        dlq_id = (await c.get("/api/stages/geocode/dlq")).json()["dead_letters"][0]["id"]
        for response in (
            await c.post(f"/api/stages/geocode/dlq/{dlq_id}/redrive", headers=AUTH),
            await c.post("/api/stages/geocode/dlq/redrive", json={"ids": [dlq_id]}),
            await c.delete(f"/api/stages/geocode/dlq/{dlq_id}", headers=AUTH),
        ):
            assert response.status_code == 403
            assert "TRACKSTREAM_DASHBOARD_TOKEN" in response.json()["error"]
        assert (await c.get("/api/stages/geocode/dlq")).json()["total"] == 1
        assert (await c.get("/api/stages")).json()["mutations_enabled"] is False


async def test_unknown_stage_is_404(api):
    for response in (
        await api.get("/api/stages/nope/consumers"),
        await api.get("/api/stages/nope/dlq"),
        await api.get("/api/stages/nope/dlq/1-0"),
        await api.post("/api/stages/nope/dlq/1-0/redrive", headers=AUTH),
        await api.post("/api/stages/nope/dlq/redrive", json={"ids": []}, headers=AUTH),
        await api.delete("/api/stages/nope/dlq/1-0", headers=AUTH),
    ):
        assert response.status_code == 404
        assert "unknown stage 'nope'" in response.json()["error"]


async def test_page_is_self_contained(api):
    page = await api.get("/")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert "default-src 'none'" in page.headers["content-security-policy"]
    html = page.text
    assert "api/stages" in html and 'id="token"' in html
    assert "https://" not in html and "http://" not in html.replace("http://www.w3.org", "")
    # every asset is the app's own (vendored Leaflet, with its license): no CDN
    assets = re.findall(r'(?:src|href)="([^"#]+)"', html)
    assert all(a.startswith("static/") for a in assets), assets
    assert {"static/leaflet/leaflet.css", "static/leaflet/leaflet.js"} <= set(assets)
    assert {"static/console/console.css", "static/console/pages.js"} <= set(assets)
    for path in (*assets, "static/leaflet/LICENSE.txt", "static/leaflet/images/marker-icon.png"):
        got = await api.get("/" + path)
        assert got.status_code == 200, path
    license_text = (await api.get("/static/leaflet/LICENSE.txt")).text
    assert "Agafonkin" in license_text and "BSD 2-Clause" in license_text
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert (await api.get("/static/../app.py")).status_code == 404


async def test_read_token_guards_the_api_but_not_the_page(env):
    settings, client, *_ = env
    app_settings = AppSettings.build(dashboard_token=TOKEN, dashboard_read_token="reader")
    app = create_app(settings, app_settings, client=client)
    async with http(app) as c:
        assert (await c.get("/")).status_code == 200
        assert (await c.get("/healthz")).status_code == 200
        assert (await c.get("/static/leaflet/leaflet.js")).status_code == 200
        denied = await c.get("/api/stages")
        assert denied.status_code == 401 and "read token" in denied.json()["error"]
        wrong = await c.get("/api/stages", headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401
        for token in ("reader", TOKEN):
            ok = await c.get("/api/stages", headers={"Authorization": f"Bearer {token}"})
            assert ok.status_code == 200, token
        # the read token does not allow mutations
        redrive = await c.post(
            "/api/stages/geocode/dlq/redrive",
            json={"ids": []},
            headers={"Authorization": "Bearer reader"},
        )
        assert redrive.status_code == 401


def test_map_tiles_setting_is_checked_and_allowed_by_the_csp():
    from ops.dashboard.app import csp
    from streams.errors import ConfigError

    with pytest.raises(ConfigError, match="map_tiles_url"):
        AppSettings.build(map_tiles_url="tile.example.org/{z}/{x}/{y}.png")
    assert "img-src 'self' data:;" in csp(None)
    policy = csp("https://{s}.tile.example.org/{z}/{x}/{y}.png")
    assert "img-src 'self' data: https://*.tile.example.org;" in policy


def test_throughput_estimate_over_a_window():
    now = [100.0]
    rate = Throughput(window_s=10, clock=lambda: now[0])
    assert rate.observe("geocode", 0) is None  # one sample: no rate yet
    now[0] += 2
    assert rate.observe("geocode", 50) == pytest.approx(25)
    now[0] += 20
    rate.observe("geocode", 250)
    now[0] += 2
    assert rate.observe("geocode", 270) == pytest.approx(10)  # older samples left the window
    now[0] += 2
    assert rate.observe("geocode", 5) is None  # trimmed: start again


def test_dashboard_command_serves_and_stops_on_sigterm(redis_server, unique_prefix, tmp_path):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRACKSTREAM_")}
    env["TRACKSTREAM_DASHBOARD_TOKEN"] = TOKEN
    args = ["--redis-url", redis_server.url, "--prefix", unique_prefix, "dashboard"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "ops.cli", *args, "--port", str(port)],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                ready = httpx.get(f"{base}/readyz", timeout=2)
                break
            except httpx.TransportError:
                assert proc.poll() is None, proc.communicate()[0]
                assert time.monotonic() < deadline, "the dashboard did not start"
                time.sleep(0.05)
        assert ready.json() == {"status": "ok"}
        body = httpx.get(f"{base}/api/stages", timeout=5).json()
        assert body["prefix"] == unique_prefix and body["mutations_enabled"] is True
        assert [s["stage"] for s in body["stages"]] == list(topology.STAGES)
        assert httpx.post(f"{base}/api/stages/geocode/dlq/1-0/redrive").status_code == 401
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, out
    assert "redrive enabled" in out


async def test_workers_show_the_scheduler_leader_and_the_last_tick_and_round(env):
    from types import SimpleNamespace

    from ops import runstate

    settings, client, *_ = env
    app = create_app(settings, AppSettings.build(), client=client)
    async with http(app) as c:
        empty = (await c.get("/api/workers")).json()
        assert empty["scheduler"] == {"leader": None, "last_tick": None}
        assert empty["reconciler"] is None
        await client.set(runstate.leader_key(settings.prefix), "box-7:4242:ab12", px=30_000)
        batches = [SimpleNamespace(tracker_ids=["A", "B"]), SimpleNamespace(tracker_ids=["C"])]
        await runstate.record_tick(client, settings.prefix, 30, batches)
        done = SimpleNamespace(geocode=4, geofence=1, skipped=("geofence",))
        await runstate.record_round(client, settings.prefix, 60, done)
        body = (await c.get("/api/workers")).json()
    leader = body["scheduler"]["leader"]
    assert (leader["host"], leader["pid"]) == ("box-7", "4242")
    assert 0 < leader["lease_ms"] <= 30_000
    tick = body["scheduler"]["last_tick"]
    assert (tick["batches"], tick["trackers"]) == (2, 3)
    assert tick["next_ms"] - tick["at_ms"] == 30_000
    rnd = body["reconciler"]
    assert (rnd["geocode"], rnd["geofence"], rnd["skipped"]) == (4, 1, ["geofence"])
    assert rnd["next_ms"] - rnd["at_ms"] == 60_000


async def test_workers_report_counts_and_history_per_minute(env):
    """A live worker's outcomes reach its info hash and the stage's per-minute history."""
    import asyncio

    from tests.support import wait_for

    settings, client, codec, routes = env
    geocode = routes[topology.GEOCODE]
    await Producer(client, codec).publish(geocode, [Ping(n=n) for n in range(7)])

    async def handle(msg, ctx):
        if msg.payload.n in (0, 1):
            raise Reject(f"poison {msg.payload.n}")

    worker = Worker(client, settings, geocode, codec, handler=handle)
    task = asyncio.create_task(worker.run())
    app = create_app(settings, AppSettings.build(), client=client)
    try:
        async with http(app) as c:

            async def counted() -> bool:
                rows = (await c.get("/api/workers")).json()["workers"]
                mine = [w for w in rows if w["stage"] == "geocode"]
                return bool(mine) and mine[0].get("processed") == 5

            await wait_for(counted, 10, "the worker's counts in its info hash")
            (w,) = [
                w
                for w in (await c.get("/api/workers")).json()["workers"]
                if w["stage"] == "geocode"
            ]
            assert (w["failed"], w["dead_lettered"], w["in_flight"]) == (2, 2, 0)
            assert w["pid"] == os.getpid() and w["live"] and w["version"]
            history = (await c.get("/api/history")).json()["stages"]
            rows = history["geocode"]
            assert len(rows) == 60
            totals = {k: sum(r[k] for r in rows) for k in ("processed", "failed", "dead_lettered")}
            assert totals == {"processed": 5, "failed": 2, "dead_lettered": 2}
            assert sum(r["processed"] for r in history["fetch"]) == 0
    finally:
        worker.stop()
        await asyncio.wait_for(task, 10)


async def test_bulk_redrive_and_purge_by_category_and_time(api, env):
    _, client, _, routes = env
    await poisoned_geocode(env)  # two dead letters, category "handler"
    dlq = routes[topology.GEOCODE].keys().dlq
    url = "/api/stages/geocode/dlq/bulk"
    assert (await api.post(url, json={"action": "purge"})).status_code == 401
    bad = await api.post(url, json={"action": "explode"}, headers=AUTH)
    assert bad.status_code == 400
    bad_time = await api.post(url, json={"action": "purge", "since": "soon"}, headers=AUTH)
    assert bad_time.status_code == 400 and "since" in bad_time.json()["error"]
    other = await api.post(url, json={"action": "purge", "category": "decode"}, headers=AUTH)
    assert other.json()["count"] == 0
    later = await api.post(
        url, json={"action": "purge", "since": "2999-01-01T00:00:00Z"}, headers=AUTH
    )
    assert later.json()["count"] == 0
    assert await client.xlen(dlq) == 2
    redriven = await api.post(
        url, json={"action": "redrive", "category": "handler", "since": "1h"}, headers=AUTH
    )
    assert redriven.json()["count"] == 2, redriven.text
    assert await client.xlen(dlq) == 0
    copies = [f for _, f in await client.xrange(routes[topology.GEOCODE].keys().stream)]
    assert len(copies) == 5 + 2  # the five published and the two redriven

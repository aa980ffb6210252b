"""`trackstream webhook ...`, the dashboard's webhook list, the delivery pieces, and the
geofence stage publishing events that notify delivers, through the whole pipeline."""

from __future__ import annotations

import json
import os
import stat
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

from ops.cli import app as cli_app
from ops.dashboard.app import create_app
from processors import topology
from processors.config import AppSettings
from processors.database import Database
from processors.webhooks import backoff_s, body, retry_after_s, signed_headers
from schemas import webhook_store
from schemas.db import upgrade
from schemas.events import LocationGeocoded
from schemas.notify import GeofenceEvent
from streams.producer import Producer
from streams.settings import StreamSettings
from tests.pipeline_support import Harness
from tests.webhook_support import Receiver, expected_id, make_secret, verify


def cli(db_url: str, *args: str) -> Any:
    result = CliRunner().invoke(cli_app, ["--database-url", db_url, *args])
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


@pytest.fixture
def receiver() -> Any:
    r = Receiver(make_secret(9)).start()
    yield r
    r.stop()


def test_signature_matches_an_independent_implementation() -> None:
    secret = make_secret(1)
    event = GeofenceEvent(
        tracker_id="SIM 1/ä",
        geofence_id=3,
        observed_at=datetime(2026, 1, 2, tzinfo=UTC),
        kind="exit",
    )
    payload = body(event)
    now = datetime(2026, 12, 2, 10, 0, 0, 700_000, tzinfo=UTC)
    headers = signed_headers(secret, event.event_id, payload, now)
    assert headers["webhook-timestamp"] == str(int(now.timestamp()))
    assert headers["webhook-id"].isascii() and " " not in headers["webhook-id"]
    assert verify(secret, headers, payload)
    assert not verify(make_secret(2), headers, payload)
    assert not verify(secret, headers, payload.replace(b"exit", b"entr"))
    data = json.loads(payload)
    assert data["type"] == "geofence.exit" and data["data"]["geofence_id"] == 3
    assert data["data"]["id"] == headers["webhook-id"]


def test_event_id_is_the_natural_key() -> None:
    at = datetime(2026, 3, 4, 5, 6, 7, 890, tzinfo=UTC)
    e = GeofenceEvent(tracker_id="T-1", geofence_id=2, observed_at=at, kind="enter")
    assert e.event_id == expected_id("T-1", 2, at, "enter")
    same = GeofenceEvent(tracker_id="T-1", geofence_id=2, observed_at=at.astimezone(), kind="enter")
    assert same.event_id == e.event_id  # the same instant in another zone


def test_retry_after_and_backoff() -> None:
    now = datetime(2026, 12, 2, 10, 0, tzinfo=UTC)
    assert retry_after_s("7") == 7.0
    assert retry_after_s("Wed, 02 Dec 2026 10:00:30 GMT", now) == 30.0
    assert retry_after_s("soon") is None and retry_after_s(None) is None
    assert [backoff_s(n, 2, 300, lambda: 0.0) for n in (1, 2, 3, 10)] == [1, 2, 4, 150]
    assert backoff_s(3, 2, 300, lambda: 0.999) < 8


@pytest.mark.parametrize(
    ("secret", "problem"),
    [("abc", "must start with 'whsec_'"), ("whsec_!!", "not base64"), ("whsec_AAAA", "3 bytes")],
)
def test_bad_secrets_are_refused(secret: str, problem: str) -> None:
    with pytest.raises(webhook_store.InvalidSubscription, match=problem):
        webhook_store.check_secret(secret)


def test_webhook_commands_never_print_the_secret(tmp_path, receiver) -> None:
    db_url = f"sqlite:///{tmp_path}/ops.db"
    upgrade(db_url)
    secret_file = tmp_path / "hook.secret"
    added = cli(db_url, "webhook", "add", receiver.url, "--secret-file", str(secret_file))
    assert added.exit_code == 0, added.output
    secret = secret_file.read_text().strip()
    assert stat.S_IMODE(os.stat(secret_file).st_mode) == 0o600
    webhook_store.check_secret(secret)
    assert secret not in added.output and secret[6:20] not in added.output

    (tmp_path / "given.secret").write_text(receiver.secret + "\n")
    again = cli(
        db_url, "webhook", "add", receiver.url, "--secret-file", str(tmp_path / "given.secret"),
        "--geofence", "4", "--tracker", "T1", "--kind", "exit",
    )  # fmt: skip
    assert again.exit_code == 0, again.output

    listed = cli(db_url, "webhook", "list", "--json")
    rows = json.loads(listed.output)
    assert [(r["id"], r["geofence_ids"], r["tracker_ids"], r["kinds"]) for r in rows] == [
        (1, "all", "all", "enter,exit"),
        (2, [4], ["T1"], "exit"),
    ]
    table = cli(db_url, "webhook", "list")
    for out in (listed.output, table.output):
        assert secret not in out and receiver.secret not in out
    assert rows[1]["secret_fingerprint"] in table.output

    tested = cli(db_url, "webhook", "test", "2")
    assert tested.exit_code == 0, tested.output
    assert "delivered: 200" in tested.output
    assert len(receiver.accepted()) == 1 and receiver.log[0].valid
    assert receiver.secret not in tested.output

    bad = tmp_path / "bad.secret"
    bad.write_text("hunter2")
    refused = cli(db_url, "webhook", "add", receiver.url, "--secret-file", str(bad))
    assert refused.exit_code == 2 and "whsec_" in refused.output and "hunter2" not in refused.output
    assert (
        cli(db_url, "webhook", "add", "ftp://x", "--secret-file", str(secret_file)).exit_code == 2
    )

    removed = cli(db_url, "webhook", "remove", "1")
    assert removed.exit_code == 0 and "removed webhook subscription 1" in removed.output
    assert [r["id"] for r in json.loads(cli(db_url, "webhook", "list", "--json").output)] == [2]
    assert cli(db_url, "webhook", "remove", "99").exit_code == 2

    db = Database(db_url)
    try:
        db.run_sync(
            webhook_store.record_attempt,
            "gfe_x",
            2,
            1,
            now=datetime.now(UTC),
            status=503,
            latency_ms=12.5,
            error="HTTP 503: 'busy'",
            outcome="retry",
            retry_in_s=1,
        )
    finally:
        db.dispose()
    log = json.loads(cli(db_url, "webhook", "deliveries", "--json").output)
    assert [(r["event_id"], r["subscription_id"], r["status"]) for r in log] == [("gfe_x", 2, 503)]
    assert "gfe_x" in cli(db_url, "webhook", "deliveries").output


async def test_dashboard_lists_subscriptions_and_deliveries_without_secrets(tmp_path) -> None:
    db_url = f"sqlite:///{tmp_path}/dash.db"
    upgrade(db_url)
    secret = make_secret(3)
    db = Database(db_url)
    try:
        sid = db.run_sync(webhook_store.add_subscription, "http://127.0.0.1:9/h", secret)
        db.run_sync(
            webhook_store.record_attempt,
            "gfe_y",
            sid,
            1,
            now=datetime.now(UTC),
            status=200,
            latency_ms=3.0,
            error=None,
            outcome="delivered",
        )
    finally:
        db.dispose()
    app = create_app(
        StreamSettings.build(redis_url="redis://127.0.0.1:9/0"),
        AppSettings.build(database_url=db_url),
    )
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://d") as c,
    ):
        res = await c.get("/api/webhooks")
        page = (await c.get("/")).text
    assert res.status_code == 200
    assert secret not in res.text and secret[6:] not in res.text
    body_ = res.json()
    assert [s["url"] for s in body_["subscriptions"]] == ["http://127.0.0.1:9/h"]
    assert [(d["event_id"], d["status"]) for d in body_["deliveries"]] == [("gfe_y", 200)]
    assert "api/webhooks" in page


async def test_geofence_stage_events_reach_a_webhook_through_the_pipeline(
    standalone_target, unique_prefix, tmp_path, receiver
):
    """The real pipeline: what the receiver gets is exactly the enter/exit events
    computed independently from the stored history; a second pass sends nothing new."""
    h = Harness(
        standalone_target,
        unique_prefix,
        f"sqlite:///{tmp_path}/e2e.db",
        trackers=20,
        notify_rate_per_min=60_000,
        notify_poll_s=0.05,
    )
    try:
        h.db.run_sync(webhook_store.add_subscription, receiver.url, receiver.secret)
        for _ in range(4):
            await h.cycle(minutes=30)
        expected = {expected_id(t, g, at, k) for t, at, g, k in h.expected_events()}
        assert expected, "the simulated fleet crossed some geofences"
        assert receiver.accepted_ids() == expected
        assert all(r.valid for r in receiver.log)
        assert len(receiver.accepted()) == len(expected)
        # the geofence stage's input redelivered: the same ids again, nothing re-sent
        notify_stream = h.keys(topology.NOTIFY).stream
        published = await h.client.xlen(notify_stream)
        replay = [
            LocationGeocoded(
                tracker_id=r.tracker_id, observed_at=r.observed_at, lat=r.lat, lon=r.lon
            )
            for r in h.reports()
        ]
        await Producer(h.client, h.pipeline.codec).publish(
            h.pipeline.routes[topology.GEOFENCE], replay
        )
        before = len(receiver.log)
        await h.drain()
        assert await h.client.xlen(notify_stream) > published
        assert len(receiver.log) == before
    finally:
        await h.aclose()


def test_order_rule_in_the_database(db_url: str) -> None:
    """An exit waits while the enter before it is owed to the endpoint; a delivered or
    dead enter releases it, and so does a predecessor nobody looks after any more, or
    one older than the subscription."""
    upgrade(db_url)
    db = Database(db_url)
    t0 = datetime(2026, 5, 1, 12, 0, tzinfo=UTC)
    enter = GeofenceEvent(tracker_id="A", geofence_id=1, observed_at=t0, kind="enter")
    exit_ = GeofenceEvent(
        tracker_id="A", geofence_id=1, observed_at=t0.replace(minute=5), kind="exit"
    )

    def seed(s: Any) -> None:
        from schemas import store

        store.upsert_trackers(s, [{"external_id": "A"}])
        store.add_geofence(s, "g", "circle", 1.0, 2.0, 50.0)

    def events(s: Any) -> None:
        from schemas import store

        for e in (enter, exit_):
            store.replace_events_at(s, e.tracker_id, e.observed_at, {e.geofence_id: e.kind})

    def plan(e: GeofenceEvent, now: datetime, owner: str = "w1") -> webhook_store.Plan:
        sub = db.run_sync(webhook_store.active_subscriptions)[-1]
        plans = db.run_sync(
            webhook_store.plan_attempts, e, [sub], now, owner=owner, lease_s=30,
            entry_ms=0, order_wait_s=600, order_poll_s=0.25,
        )  # fmt: skip
        return plans[sub.id]

    def record(e: GeofenceEvent, now: datetime, outcome: Any) -> None:
        sub = db.run_sync(webhook_store.active_subscriptions)[-1]
        db.run_sync(
            webhook_store.record_attempt, e.event_id, sub.id, 1, now=now, status=200,
            latency_ms=1.0, error=None, outcome=outcome,
        )  # fmt: skip

    try:
        db.run_sync(seed)
        db.run_sync(webhook_store.add_subscription, "http://127.0.0.1:9/a", make_secret(1))
        db.run_sync(events)  # after the subscription: it is owed both
        now = datetime.now(UTC)
        assert plan(exit_, now).reason == "order"  # the enter's entry has not come yet
        assert plan(enter, now).action == "go"
        assert plan(exit_, now).reason == "order"  # the enter is in flight
        assert plan(enter, now, owner="w2").reason == "in flight elsewhere"
        record(enter, now, "delivered")
        assert plan(enter, now).action == "delivered"
        assert plan(exit_, now).action == "go"

        # a second endpoint: its enter dead -> the exit goes
        db.run_sync(webhook_store.add_subscription, "http://127.0.0.1:9/b", make_secret(2))
        assert plan(enter, now).action == "go"
        record(enter, now, "dead")
        assert plan(exit_, now).action == "go"

        # a third: the enter pending but untouched for order_wait_s (its entry is gone)
        db.run_sync(webhook_store.add_subscription, "http://127.0.0.1:9/c", make_secret(3))
        assert plan(enter, now - timedelta(seconds=601)).action == "go"
        assert plan(exit_, now).action == "go"
    finally:
        db.dispose()

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
from schemas.secretbox import SecretBox
from streams.producer import Producer
from streams.settings import StreamSettings
from tests.pipeline_support import Harness
from tests.webhook_support import Receiver, expected_id, make_secret, verify

KEY = "q6Hq2F1l9cZkzM3-Yk2Zq1lq3zH2kR8cQwN8bX2mV0E="  # a Fernet key, for the tests only
BOX = SecretBox([KEY])
LOOPBACK = {"box": BOX, "allow_private": True, "allow_http": True}


def cli(db_url: str, *args: str, keys: str | None = KEY) -> Any:
    env = {"TRACKSTREAM_WEBHOOK_KEYS": keys or ""}
    result = CliRunner().invoke(cli_app, ["--database-url", db_url, *args], env=env)
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
    loopback = ("--allow-private", "--allow-http")
    added = cli(
        db_url, "webhook", "add", receiver.url, "--secret-file", str(secret_file), *loopback
    )
    assert added.exit_code == 0, added.output
    secret = secret_file.read_text().strip()
    assert stat.S_IMODE(os.stat(secret_file).st_mode) == 0o600
    webhook_store.check_secret(secret)
    assert secret not in added.output and secret[6:20] not in added.output

    (tmp_path / "given.secret").write_text(receiver.secret + "\n")
    again = cli(
        db_url, "webhook", "add", receiver.url, "--secret-file", str(tmp_path / "given.secret"),
        "--geofence", "4", "--tracker", "T1", "--kind", "exit", *loopback,
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
    refused = cli(db_url, "webhook", "add", receiver.url, "--secret-file", str(bad), *loopback)
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
        sid = db.run_sync(
            webhook_store.add_subscription,
            "http://u:pw@127.0.0.1:9/h?token=t0k",
            secret,
            **LOOPBACK,
        )
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
    assert [s["url"] for s in body_["subscriptions"]] == ["http://127.0.0.1:9/h?..."]
    assert "pw" not in res.text and "t0k" not in res.text
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
        webhook_keys=KEY,
    )
    try:
        h.db.run_sync(webhook_store.add_subscription, receiver.url, receiver.secret, **LOOPBACK)
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


def _plan_env(db_url: str) -> Database:
    upgrade(db_url)
    db = Database(db_url)

    def seed(s: Any) -> None:
        from schemas import geofence_defs, tracker_store

        tracker_store.upsert_trackers(s, [{"external_id": "A"}])
        geofence_defs.add_geofence(s, "g1", "circle", 1.0, 2.0, 50.0)
        geofence_defs.add_geofence(s, "g2", "circle", 1.0, 2.0, 80.0)

    db.run_sync(seed)
    return db


def _write(db: Database, *events: GeofenceEvent) -> None:
    from ops.bench import fixtures

    def work(s: Any) -> None:
        by_at: dict[Any, dict[int, str]] = {}
        for e in events:
            by_at.setdefault((e.tracker_id, e.observed_at), {})[e.geofence_id] = e.kind
        for (t, at), kinds in by_at.items():
            fixtures.replace_events_at(s, t, at, kinds)

    db.run_sync(work)


def _planner(db: Database) -> Any:
    def plan(
        e: GeofenceEvent, now: datetime, owner: str = "w1", msg_id: str = "m", entry_ms: int = 0
    ) -> webhook_store.Plan:
        sub = db.run_sync(webhook_store.active_subscriptions, BOX)[-1]
        item = webhook_store.Item(e, [sub], msg_id, entry_ms)
        plans = db.run_sync(
            webhook_store.plan_batch, [item], now, owner=owner, lease_s=30, order_wait_s=600
        )
        return plans[(e.event_id, sub.id)]

    return plan


def _record(db: Database, e: GeofenceEvent, now: datetime, outcome: Any, status: int = 200) -> None:
    sub = db.run_sync(webhook_store.active_subscriptions, BOX)[-1]
    db.run_sync(
        webhook_store.record_attempt, e.event_id, sub.id, 1, now=now, status=status,
        latency_ms=1.0, error=None, outcome=outcome,
    )  # fmt: skip


def _add(db: Database, path: str, n: int) -> int:
    url = f"http://127.0.0.1:9/{path}"
    return db.run_sync(webhook_store.add_subscription, url, make_secret(n), **LOOPBACK)


def test_order_rule_in_the_database(db_url: str) -> None:
    """An exit waits while the enter before it is owed to the endpoint; a delivered or
    dead enter releases it, and so does a predecessor nobody looks after any more, or
    one older than the subscription."""
    db = _plan_env(db_url)
    plan = _planner(db)
    t0 = datetime(2026, 5, 1, 12, 0, tzinfo=UTC)
    enter = GeofenceEvent(tracker_id="A", geofence_id=1, observed_at=t0, kind="enter")
    exit_ = GeofenceEvent(
        tracker_id="A", geofence_id=1, observed_at=t0.replace(minute=5), kind="exit"
    )
    try:
        _add(db, "a", 1)
        _write(db, enter, exit_)  # after the subscription: it is owed both
        now = datetime.now(UTC)
        assert plan(exit_, now).reason == "order"  # the enter's entry has not come yet
        assert plan(enter, now).action == "go"
        assert plan(exit_, now).reason == "order"  # the enter is in flight
        assert plan(enter, now, owner="w2").reason == "in flight elsewhere"
        _record(db, enter, now, "delivered")
        assert plan(enter, now).action == "delivered"
        assert plan(exit_, now).action == "go"

        # a second endpoint: its enter dead -> the exit goes
        _add(db, "b", 2)
        assert plan(enter, now).action == "go"
        _record(db, enter, now, "dead", 500)
        assert plan(exit_, now).action == "go"

        # a third: the enter pending but untouched for order_wait_s (its entry is gone)
        _add(db, "c", 3)
        assert plan(enter, now - timedelta(seconds=601)).action == "go"
        assert plan(exit_, now).action == "go"
    finally:
        db.dispose()


def test_order_with_ties_checks_every_earlier_event(db_url: str) -> None:
    """Enter g1 and g2 at the same instant, then exit g1: the order is (observed_at,
    geofence id, kind), so enter g2 waits for enter g1, and exit g1 waits for both
    (not only for the latest earlier one, which is enter g2)."""
    db = _plan_env(db_url)
    plan = _planner(db)
    t0 = datetime(2026, 5, 1, 12, 0, tzinfo=UTC)
    enter1 = GeofenceEvent(tracker_id="A", geofence_id=1, observed_at=t0, kind="enter")
    enter2 = GeofenceEvent(tracker_id="A", geofence_id=2, observed_at=t0, kind="enter")
    exit1 = GeofenceEvent(
        tracker_id="A", geofence_id=1, observed_at=t0 + timedelta(minutes=1), kind="exit"
    )
    try:
        _add(db, "a", 1)
        _write(db, enter1, enter2, exit1)
        now = datetime.now(UTC)
        assert plan(enter2, now).reason == "order"  # the tie goes to geofence 1 first
        assert plan(enter1, now).action == "go"
        _record(db, enter1, now, "retry")  # enter g1 needs a retry
        assert plan(enter2, now).reason == "order"
        assert plan(exit1, now).reason == "order"
        assert plan(enter1, now).action == "go"
        _record(db, enter1, now, "delivered")
        assert plan(enter2, now).action == "go"
        assert plan(exit1, now).reason == "order", "enter g2 is still in flight"
        _record(db, enter2, now, "delivered")
        assert plan(exit1, now).action == "go"
    finally:
        db.dispose()


def test_a_dead_delivery_stays_dead_until_its_letter_is_redriven(db_url: str) -> None:
    """Dead after its attempts: a hand-back (same msg id, newer entry) before the dead
    letter, a duplicate entry (another msg id) after it, and the entry read again
    before the letter was out all see it dead; only the letter's redrive (its msg id,
    an entry newer than the letter) starts it over, with no attempts spent."""
    db = _plan_env(db_url)
    plan = _planner(db)
    t0 = datetime(2026, 5, 1, 12, 0, tzinfo=UTC)
    enter = GeofenceEvent(tracker_id="A", geofence_id=1, observed_at=t0, kind="enter")
    try:
        sid = _add(db, "a", 1)
        _write(db, enter)
        now = datetime.now(UTC)
        ms = int(now.timestamp() * 1000)
        assert plan(enter, now, msg_id="m1", entry_ms=ms - 5000).action == "go"
        _record(db, enter, now, "dead", 500)
        handed_back = plan(enter, now, msg_id="m1", entry_ms=ms + 1000)
        assert handed_back.action == "dead" and handed_back.letter
        db.run_sync(webhook_store.mark_lettered, [(enter.event_id, sid)], "m1", now)
        again = plan(enter, now, msg_id="m1", entry_ms=ms - 5000)  # redelivered before the move
        assert again.action == "dead" and again.letter
        duplicate = plan(enter, now, msg_id="m2", entry_ms=ms + 2000)
        assert duplicate.action == "dead" and not duplicate.letter  # m1's letter carries it
        redriven = plan(enter, now, msg_id="m1", entry_ms=ms + 3000)
        assert redriven.action == "go" and redriven.attempt == 1
    finally:
        db.dispose()


def test_a_410_disables_only_its_subscription(db_url: str) -> None:
    db = _plan_env(db_url)
    plan = _planner(db)
    t0 = datetime(2026, 5, 1, 12, 0, tzinfo=UTC)
    enter = GeofenceEvent(tracker_id="A", geofence_id=1, observed_at=t0, kind="enter")
    try:
        other = _add(db, "other", 2)
        gone = _add(db, "gone", 1)
        _write(db, enter)
        now = datetime.now(UTC)
        assert plan(enter, now).action == "go"
        _record(db, enter, now, "dead", 410)
        rows = {r["id"]: r for r in db.run_sync(webhook_store.subscription_rows, True)}
        assert not rows[gone]["active"] and "410" in rows[gone]["disabled_reason"]
        assert rows[other]["active"] and rows[other]["disabled_reason"] is None
        assert [s.id for s in db.run_sync(webhook_store.active_subscriptions, BOX)] == [other]
    finally:
        db.dispose()

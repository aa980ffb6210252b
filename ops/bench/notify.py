"""``trackstream webhook bench``: deliveries per second to a fast local receiver.

Each run uses a throwaway SQLite database (or ``--bench-database-url``, from which the
run deletes its own rows afterwards, so the next run starts from the same state) and
its own key prefix on the configured Redis (deleted afterwards), publishes ``events`` geofence
events (an enter and an exit for each of ``events / 2`` trackers, so the order rule is
in play), starts ``workers`` notify worker processes (``trackstream worker notify``)
and times from the first publish to the last 2xx at a receiver on 127.0.0.1. The rate
limit is set out of the way, but every attempt still asks it (one Redis call).
"""

from __future__ import annotations

import asyncio
import os
import secrets
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from streams.settings import StreamSettings


class _Receiver:
    def __init__(self) -> None:
        self.ids: set[str] = set()
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as real receivers do

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("content-length") or 0))
                with receiver.lock:
                    receiver.ids.add(self.headers.get("webhook-id", ""))
                self.send_response(204)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/hook"

    def count(self) -> int:
        with self.lock:
            return len(self.ids)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def run_once(
    streams: StreamSettings,
    events: int,
    workers: int,
    timeout_s: float = 300,
    database_url: str | None = None,
) -> dict[str, Any]:
    """One measured run; returns events, workers, seconds, deliveries_per_s. With
    ``database_url`` (an empty database the bench may fill) instead of a SQLite file."""
    from ops.bench import fixtures
    from processors import topology
    from processors.database import Database
    from processors.webhooks import new_secret
    from schemas import geofence_defs, tracker_store, webhook_store
    from schemas.db import upgrade
    from schemas.notify import GeofenceEvent
    from schemas.secretbox import SecretBox, new_key
    from streams.connection import connect
    from streams.producer import Producer

    prefix = f"bench{secrets.token_hex(4)}"
    receiver = _Receiver()
    with tempfile.TemporaryDirectory(prefix="ts-notify-bench-") as tmp:
        db_url = database_url or f"sqlite:///{Path(tmp) / 'bench.db'}"
        upgrade(db_url)
        db = Database(db_url)
        trackers = [f"BENCH-{prefix}-{i:05d}" for i in range(max(1, events // 2))]
        start = datetime(2026, 1, 1, tzinfo=UTC)
        key = new_key()
        made: dict[str, int] = {}

        def seed(s: Any) -> list[GeofenceEvent]:
            tracker_store.upsert_trackers(s, [{"external_id": t} for t in trackers])
            g = made["geofence"] = geofence_defs.add_geofence(
                s, prefix, "circle", 0.0, 0.0, 100.0
            ).id
            made["subscription"] = webhook_store.add_subscription(
                s,
                receiver.url,
                new_secret(),
                box=SecretBox([key]),
                allow_private=True,
                allow_http=True,
            )
            out = []
            for i in range(events):
                t, kind = trackers[i // 2 % len(trackers)], ("enter", "exit")[i % 2]
                at = start + timedelta(minutes=i // (2 * len(trackers)) * 2 + i % 2)
                fixtures.replace_events_at(s, t, at, {g: kind})
                out.append(GeofenceEvent(tracker_id=t, geofence_id=g, observed_at=at, kind=kind))  # type: ignore[arg-type]
            return out

        payloads = db.run_sync(seed)
        db.dispose()
        env = {k: v for k, v in os.environ.items() if not k.startswith("TRACKSTREAM_")}
        env.update(
            {
                "TRACKSTREAM_REDIS_URL": streams.redis_url,
                "TRACKSTREAM_REDIS_CLUSTER": str(streams.redis_cluster).lower(),
                "TRACKSTREAM_PREFIX": prefix,
                "TRACKSTREAM_DATABASE_URL": db_url,
                "TRACKSTREAM_NOTIFY_RATE_PER_MIN": "100000000",
                "TRACKSTREAM_NOTIFY_POLL_S": "0.05",
                "TRACKSTREAM_NOTIFY_ENDPOINT_CONCURRENCY": "32",
                "TRACKSTREAM_WEBHOOK_KEYS": key,
            }
        )
        procs = [
            subprocess.Popen(
                [sys.executable, "-m", "ops.cli", "worker", "notify", "--consumer", f"b{i}"],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            for i in range(workers)
        ]

        async def publish_and_wait() -> float:
            client = connect(streams.with_(prefix=prefix))
            try:
                route = topology.routes(prefix)[topology.NOTIFY]
                await client.xgroup_create(route.keys().stream, topology.NOTIFY, "0", mkstream=True)
                await asyncio.sleep(1.0)  # let the workers start and join the group
                began = time.monotonic()
                await Producer(client, topology.codec()).publish(route, payloads)
                while receiver.count() < events:
                    if time.monotonic() - began > timeout_s:
                        raise TimeoutError(f"only {receiver.count()} of {events} delivered")
                    if any(p.poll() is not None for p in procs):
                        raise RuntimeError("a notify worker exited")
                    await asyncio.sleep(0.01)
                took = time.monotonic() - began
                keys = [k async for k in client.scan_iter(match=f"{prefix}:*")]
                for k in keys:
                    await client.delete(k)
                return took
            finally:
                await client.aclose()

        try:
            took = asyncio.run(publish_and_wait())
        finally:
            for p in procs:
                p.terminate()
            for p in procs:
                try:
                    p.wait(20)
                except subprocess.TimeoutExpired:
                    p.kill()
            receiver.close()
            db = Database(db_url)
            try:
                db.run_sync(_clean, made, trackers)
            finally:
                db.dispose()
    return {
        "events": events,
        "workers": workers,
        "seconds": round(took, 3),
        "deliveries_per_s": round(events / took, 1),
    }


def _clean(session: Any, made: dict[str, int], trackers: list[str]) -> None:
    """Delete what one run added (its subscription, deliveries, attempts, events,
    trackers and geofence), so a shared bench database starts each run the same."""
    from sqlalchemy import delete

    from schemas.tables import (
        Geofence,
        GeofenceEvent,
        Tracker,
        WebhookAttempt,
        WebhookDelivery,
        WebhookSubscription,
    )

    sid, gid = made.get("subscription"), made.get("geofence")
    if sid is not None:
        session.execute(delete(WebhookAttempt).where(WebhookAttempt.subscription_id == sid))
        session.execute(delete(WebhookDelivery).where(WebhookDelivery.subscription_id == sid))
        session.execute(delete(WebhookSubscription).where(WebhookSubscription.id == sid))
    for i in range(0, len(trackers), 1000):
        chunk = trackers[i : i + 1000]
        session.execute(delete(GeofenceEvent).where(GeofenceEvent.tracker_id.in_(chunk)))
        session.execute(delete(Tracker).where(Tracker.external_id.in_(chunk)))
    if gid is not None:
        session.execute(delete(Geofence).where(Geofence.id == gid))


def bench(
    streams: StreamSettings,
    events: int,
    workers: list[int],
    progress: Callable[[str], None] = lambda _m: None,
    database_url: str | None = None,
) -> list[dict[str, Any]]:
    results = []
    for n in workers:
        progress(f"{events} deliveries with {n} notify worker(s) ...")
        results.append(run_once(streams, events, n, database_url=database_url))
    return results

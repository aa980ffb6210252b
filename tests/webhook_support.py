"""Webhook receivers for the notify tests: real HTTP servers on 127.0.0.1, in threads,
that verify every request with their own implementation of the Standard Webhooks
signature (hmac + hashlib + base64 here, not the code under test)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from tests.servers import free_port

REPLAY_WINDOW_S = 300


def verify(secret: str, headers: dict[str, str], body: bytes) -> bool:
    """The specification, independently: v1 = base64(HMAC-SHA256(base64decode(secret
    after 'whsec_'), "{id}.{timestamp}.{body}")); any of the space-separated
    signatures may match."""
    key = base64.b64decode(secret.removeprefix("whsec_"))
    msg_id, stamp = headers.get("webhook-id", ""), headers.get("webhook-timestamp", "")
    if not msg_id or not stamp.isdigit():
        return False
    mac = hmac.new(key, f"{msg_id}.{stamp}.".encode() + body, hashlib.sha256).digest()
    expected = base64.b64encode(mac).decode()
    for part in headers.get("webhook-signature", "").split(" "):
        version, _, sig = part.partition(",")
        if version == "v1" and hmac.compare_digest(sig, expected):
            return True
    return False


def make_secret(n: int = 0) -> str:
    return (
        "whsec_" + base64.b64encode(hashlib.sha256(f"test-secret-{n}".encode()).digest()).decode()
    )


@dataclass
class Received:
    at: float  # time.monotonic()
    msg_id: str
    stamp: int
    valid: bool
    body: dict[str, Any]
    status: int


@dataclass
class Receiver:
    """``respond(msg_id, n)`` -> (status, seconds to sleep first, extra headers); n is
    how often this id was seen before. Only 2xx answers count as delivered."""

    secret: str
    respond: Callable[[str, int], tuple[int, float, dict[str, str]]] = lambda _id, _n: (
        200,
        0.0,
        {},
    )
    replay_window_s: float | None = None
    check: Callable[[str, dict[str, str], bytes], bool] = verify  # the signature check
    port: int = field(default_factory=free_port)
    log: list[Received] = field(default_factory=list)
    _server: ThreadingHTTPServer | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def start(self) -> Receiver:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                raw = self.rfile.read(length)
                headers = {k.lower(): v for k, v in self.headers.items()}
                receiver.answer(self, headers, raw)

            def log_message(self, *args: Any) -> None:
                pass

        ThreadingHTTPServer.allow_reuse_address = True
        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def answer(self, req: BaseHTTPRequestHandler, headers: dict[str, str], raw: bytes) -> None:
        msg_id = headers.get("webhook-id", "")
        stamp = int(headers.get("webhook-timestamp", "0") or 0)
        valid = self.check(self.secret, headers, raw)
        with self._lock:
            seen = sum(1 for r in self.log if r.msg_id == msg_id)
        status, sleep_s, extra = self.respond(msg_id, seen)
        if not valid:
            status = 401
        elif self.replay_window_s is not None and abs(time.time() - stamp) > self.replay_window_s:
            status = 400  # a replay (or a stale retry): rejected
        if sleep_s:
            time.sleep(sleep_s)
        with self._lock:
            self.log.append(
                Received(time.monotonic(), msg_id, stamp, valid, json.loads(raw), status)
            )
        req.send_response(status)
        for k, v in extra.items():
            req.send_header(k, v)
        text = b"ok" if status < 300 else f"no thanks ({status})".encode()
        req.send_header("content-length", str(len(text)))
        req.end_headers()
        req.wfile.write(text)

    # -- what arrived

    def accepted(self) -> list[Received]:
        with self._lock:
            return [r for r in self.log if 200 <= r.status < 300]

    def accepted_ids(self) -> set[str]:
        return {r.msg_id for r in self.accepted()}

    def first_arrivals(self) -> list[str]:
        """Ids in the order they were first accepted."""
        seen: list[str] = []
        for r in self.accepted():
            if r.msg_id not in seen:
                seen.append(r.msg_id)
        return seen


def expected_id(tracker: str, geofence: int, at: datetime, kind: str) -> str:
    """The natural key as the notify stage's webhook-id, spelled out independently."""
    return f"gfe_{tracker}_{geofence}_{at.strftime('%Y%m%dT%H%M%S')}.{at.microsecond:06d}Z_{kind}"


def timeline(trackers: list[str], geofences: list[int], start: datetime, steps: int) -> list[Any]:
    """(tracker, geofence, observed_at, kind) alternating enter/exit per (tracker,
    geofence), a minute apart, geofences interleaved."""
    events = []
    for t in trackers:
        for i in range(steps):
            g = geofences[i // 2 % len(geofences)]
            kind = "enter" if i % 2 == 0 else "exit"
            events.append((t, g, start + timedelta(minutes=i), kind))
    return events

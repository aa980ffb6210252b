"""One webhook attempt per the Standard Webhooks specification, and what its answer means.

Signing uses the ``standardwebhooks`` package (the specification's reference
implementation; pure Python, no dependencies): ``webhook-signature`` is
``v1,`` + base64(HMAC-SHA256(secret, "{webhook-id}.{webhook-timestamp}.{body}")), the
secret being the base64 after ``whsec_``. The timestamp is taken at each attempt, so a
retry is never older than a receiver's replay window.

A subscription with ``batch_max`` N > 1 receives up to N events in one request: type
``geofence.batch``, ``data`` the list of the events' ``data`` objects in their order
(each with its own ``id``, by which a receiver drops repeats), ``webhook-id``
``gfb_`` + a digest of the event ids (the same for the same events).

The request goes to the address the SSRF guard checked (:class:`processors.ssrf.Resolver`):
the URL's host is swapped for that address, with the ``Host`` header and the TLS server
name kept as the host's name.

Outcomes::

    2xx                                   delivered
    408, 429, 5xx, timeout, no connection retry (429/503: Retry-After honoured)
    any other status (4xx, 3xx: redirects are not followed)   permanent
"""

from __future__ import annotations

import base64
import hashlib
import random
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal

import httpx
import orjson
from standardwebhooks.webhooks import Webhook

from processors.resilience import retry_after_s
from processors.ssrf import Target
from schemas.notify import GeofenceEvent
from schemas.webhook_store import EXCERPT_CHARS
from streams.retries import backoff

USER_AGENT = "trackstream-notify/1"


@dataclass(frozen=True, slots=True)
class Answer:
    """How one attempt ended."""

    outcome: Literal["delivered", "retry", "permanent"]
    status: int | None
    latency_ms: float
    error: str | None = None
    retry_after_s: float | None = None


def new_secret() -> str:
    """A Standard Webhooks secret: ``whsec_`` + base64 of 32 random bytes."""
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


def _stamp(at: datetime) -> str:
    return at.isoformat().replace("+00:00", "Z")


def _data(event: GeofenceEvent) -> dict[str, object]:
    return {
        "id": event.event_id,
        "tracker_id": event.tracker_id,
        "geofence_id": event.geofence_id,
        "kind": event.kind,
        "observed_at": _stamp(event.observed_at),
    }


def body(event: GeofenceEvent) -> bytes:
    """The JSON payload (the specification's suggested ``type``/``timestamp``/``data``)."""
    data = {
        "type": f"geofence.{event.kind}",
        "timestamp": _stamp(event.observed_at),
        "data": _data(event),
    }
    return orjson.dumps(data)


def batch_body(events: Sequence[GeofenceEvent]) -> bytes:
    """Several events in one request: ``data`` is the list of their ``data`` objects."""
    data = {
        "type": "geofence.batch",
        "timestamp": _stamp(max(e.observed_at for e in events)),
        "data": [_data(e) for e in events],
    }
    return orjson.dumps(data)


def message_id(events: Sequence[GeofenceEvent]) -> str:
    if len(events) == 1:
        return events[0].event_id
    digest = hashlib.sha256("\n".join(e.event_id for e in events).encode()).hexdigest()
    return "gfb_" + digest[:32]


def signed_headers(secret: str, msg_id: str, payload: bytes, now: datetime) -> dict[str, str]:
    stamp = datetime.fromtimestamp(int(now.timestamp()), UTC)
    signature = Webhook(secret).sign(msg_id, stamp, payload.decode())
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(int(stamp.timestamp())),
        "webhook-signature": signature,
        "content-type": "application/json",
        "user-agent": USER_AGENT,
    }


async def attempt(
    http: httpx.AsyncClient,
    url: str,
    secret: str,
    events: GeofenceEvent | Sequence[GeofenceEvent],
    target: Target | None = None,
) -> Answer:
    """POST the event (or events, one request) once; never raises for a network or
    HTTP failure. With ``target`` the request goes to its checked address."""
    batch = [events] if isinstance(events, GeofenceEvent) else list(events)
    payload = body(batch[0]) if len(batch) == 1 else batch_body(batch)
    headers = signed_headers(secret, message_id(batch), payload, datetime.now(UTC))
    request_url = httpx.URL(url)
    extensions: dict[str, object] = {}
    if target is not None and target.ip != target.host:
        headers["host"] = request_url.netloc.decode("ascii").rpartition("@")[2]
        request_url = request_url.copy_with(host=target.ip)
        if request_url.scheme == "https":
            extensions["sni_hostname"] = target.host
    start = time.monotonic()
    try:
        async with http.stream(
            "POST", request_url, content=payload, headers=headers, extensions=extensions
        ) as resp:
            status = resp.status_code
            excerpt = b"" if 200 <= status < 300 else await _head(resp, EXCERPT_CHARS * 4)
    except httpx.TimeoutException as exc:
        return Answer("retry", None, _ms(start), f"timeout: {type(exc).__name__}")
    except httpx.HTTPError as exc:
        return Answer("retry", None, _ms(start), f"{type(exc).__name__}: {exc}"[:EXCERPT_CHARS])
    latency = _ms(start)
    if 200 <= status < 300:
        return Answer("delivered", status, latency)
    text = excerpt.decode("utf-8", errors="replace")
    error = f"HTTP {status}: {text[:EXCERPT_CHARS]!r}"
    if status in (408, 429) or status >= 500:
        hint = retry_after_s(resp.headers.get("retry-after")) if status in (429, 503) else None
        return Answer("retry", status, latency, error, hint)
    return Answer("permanent", status, latency, error)


async def _head(resp: httpx.Response, limit: int) -> bytes:
    """The start of a body, without reading (or holding) the rest of it."""
    data = b""
    async for chunk in resp.aiter_bytes():
        data += chunk
        if len(data) >= limit:
            break
    return data[:limit]


def backoff_s(
    attempt: int, base_s: float, max_s: float, rng: Callable[[], float] = random.random
) -> float:
    """Exponential backoff with equal jitter: in [c/2, c), c = min(max_s, base_s * 2**(n-1))
    after attempt n. The floor keeps the retry window predictable."""
    return backoff(attempt - 1, base_s, max_s, rng=rng)


def _ms(start: float) -> float:
    return (time.monotonic() - start) * 1000

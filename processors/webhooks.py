"""One webhook attempt per the Standard Webhooks specification, and what its answer means.

Signing uses the ``standardwebhooks`` package (the specification's reference
implementation; pure Python, no dependencies): ``webhook-signature`` is
``v1,`` + base64(HMAC-SHA256(secret, "{webhook-id}.{webhook-timestamp}.{body}")), the
secret being the base64 after ``whsec_``. The timestamp is taken at each attempt, so a
retry is never older than a receiver's replay window.

Outcomes::

    2xx                                   delivered
    408, 429, 5xx, timeout, no connection retry (429/503: Retry-After honoured)
    any other status (4xx, 3xx: redirects are not followed)   permanent
"""

from __future__ import annotations

import base64
import random
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal

import httpx
import orjson
from standardwebhooks.webhooks import Webhook

from processors.resilience import retry_after_s
from schemas.notify import GeofenceEvent
from schemas.webhook_store import EXCERPT_CHARS

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


def body(event: GeofenceEvent) -> bytes:
    """The JSON payload (the specification's suggested ``type``/``timestamp``/``data``)."""
    data = {
        "type": f"geofence.{event.kind}",
        "timestamp": event.observed_at.isoformat().replace("+00:00", "Z"),
        "data": {
            "id": event.event_id,
            "tracker_id": event.tracker_id,
            "geofence_id": event.geofence_id,
            "kind": event.kind,
            "observed_at": event.observed_at.isoformat().replace("+00:00", "Z"),
        },
    }
    return orjson.dumps(data)


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


async def attempt(http: httpx.AsyncClient, url: str, secret: str, event: GeofenceEvent) -> Answer:
    """POST the event once; never raises for a network or HTTP failure."""
    payload = body(event)
    headers = signed_headers(secret, event.event_id, payload, datetime.now(UTC))
    start = time.monotonic()
    try:
        async with http.stream("POST", url, content=payload, headers=headers) as resp:
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
    ceiling = min(max_s, base_s * 2.0 ** min(max(attempt - 1, 0), 32))
    return ceiling / 2 + ceiling / 2 * rng()


def _ms(start: float) -> float:
    return (time.monotonic() - start) * 1000

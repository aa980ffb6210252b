"""Each webhook subscription's health, and pausing or resuming one from the console.

==========  ======================================  ==========================================
method      path                                    what
==========  ======================================  ==========================================
GET         /api/webhooks/health                    every subscription (paused ones too):
                                                    delivered, failing, dead, last error
POST        /api/webhooks/{id}/pause                stop delivering to it            (token)
POST        /api/webhooks/{id}/resume               deliver to it again              (token)
==========  ======================================  ==========================================

Counts come from ``webhook_deliveries`` (one row per event and subscription):
``delivered``; ``failing``, pending after at least one failed attempt (being retried);
``waiting``, pending and not tried yet; ``dead``, given up. The last error is the
newest attempt of the delivery log that failed.

A pause is :func:`schemas.webhook_store.set_subscription_active` with the reason
``paused in the console``, the same switch as ``trackstream webhook remove`` and
``enable``: while paused the notify stage neither sends to the subscription nor
records new events for it (they are not delivered later), and resume takes it back
from the next event on. A subscription a 410 disabled is resumed the same way.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import case, func, or_, select
from sqlalchemy.orm import Session
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from schemas import webhook_store
from schemas.tables import WebhookAttempt, WebhookDelivery, WebhookSubscription

PAUSED = "paused in the console"


def _iso(at: datetime | None) -> str | None:
    if at is None:
        return None
    at = at if at.tzinfo else at.replace(tzinfo=UTC)
    return at.isoformat(timespec="seconds").replace("+00:00", "Z")


def _state(active: bool, reason: str | None) -> str:
    if active:
        return "active"
    if reason == PAUSED:
        return "paused"
    return "disabled" if reason else "removed"


def health(session: Session) -> list[dict[str, Any]]:
    """Every subscription with its delivery counts and latest failure, by id."""
    d = WebhookDelivery
    bucket = case(
        (d.state != "pending", d.state),
        (d.attempts > 0, "failing"),
        else_="waiting",
    )
    counts: dict[int, dict[str, int]] = {}
    delivered_at: dict[int, datetime | None] = {}
    for sub_id, kind, n in session.execute(
        select(d.subscription_id, bucket, func.count()).group_by(d.subscription_id, bucket)
    ):
        counts.setdefault(sub_id, {})[kind] = n
    for sub_id, at in session.execute(
        select(d.subscription_id, func.max(d.delivered_at)).group_by(d.subscription_id)
    ):
        delivered_at[sub_id] = at
    a = WebhookAttempt
    failed = or_(a.error.is_not(None), a.status.is_(None), a.status < 200, a.status >= 300)
    newest = select(func.max(a.id)).where(failed).group_by(a.subscription_id)
    rows = session.scalars(select(a).where(a.id.in_(newest)))
    last_error = {row.subscription_id: row for row in rows}
    out = []
    for s in session.scalars(select(WebhookSubscription).order_by(WebhookSubscription.id)):
        c = counts.get(s.id, {})
        err = last_error.get(s.id)
        out.append(
            {
                "id": s.id,
                "url": webhook_store.redact_url(s.url),
                "description": s.description,
                "kinds": s.kinds,
                "state": _state(s.active, s.disabled_reason),
                "disabled_reason": s.disabled_reason,
                "delivered": c.get("delivered", 0),
                "failing": c.get("failing", 0),
                "waiting": c.get("waiting", 0),
                "dead": c.get("dead", 0),
                "last_delivered_at": _iso(delivered_at.get(s.id)),
                "last_error": None
                if err is None
                else {
                    "at": _iso(err.at),
                    "status": err.status,
                    "error": err.error,
                    "event_id": err.event_id,
                    "attempt": err.attempt,
                },
            }
        )
    return out


def _switch(session: Session, sub_id: int, active: bool) -> dict[str, Any]:
    url = webhook_store.set_subscription_active(session, sub_id, active)
    row = session.get(WebhookSubscription, sub_id)
    assert row is not None  # set_subscription_active raised LookupError otherwise
    if not active:
        row.disabled_reason = PAUSED
    return {"id": sub_id, "url": url, "state": _state(active, row.disabled_reason)}


async def subscription_health(request: Request) -> Response:
    d = request.app.state.dashboard
    return JSONResponse({"subscriptions": await d.read_db(health)})


async def _set(request: Request, active: bool) -> Response:
    d = request.app.state.dashboard
    d.authorize(request)
    raw = request.path_params["id"]
    if not raw.isdigit() or len(raw) > 18:
        raise HTTPException(400, f"{raw!r} is not a subscription id")
    return JSONResponse(await d.read_db(_switch, int(raw), active))


async def pause(request: Request) -> Response:
    return await _set(request, False)


async def resume(request: Request) -> Response:
    return await _set(request, True)

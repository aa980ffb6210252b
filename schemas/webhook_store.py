"""Webhook subscriptions, delivery state and the delivery log (one function per question).

Like :mod:`schemas.store`, every function takes a session first and does not commit.
Secrets are read only by :func:`active_subscriptions` (for signing); everything an
operator sees comes from :func:`subscription_rows`, which leaves them out.

A delivery (one event to one subscription) is ``pending`` until it is ``delivered`` or
``dead``; :func:`plan_attempts` decides, in one transaction, which pending deliveries
may be attempted now (see :mod:`processors.stages.notify` for the order rule).
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal, cast
from urllib.parse import urlsplit

from sqlalchemy import Table, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from schemas.notify import event_id
from schemas.tables import GeofenceEvent as EventRow
from schemas.tables import WebhookAttempt, WebhookDelivery, WebhookSubscription

SECRET_PREFIX = "whsec_"
KINDS = ("enter", "exit")
EXCERPT_CHARS = 300

_deliveries = cast(Table, WebhookDelivery.__table__)


class InvalidSubscription(ValueError):
    """A subscription setting that cannot work; the message names the setting."""


@dataclass(frozen=True, slots=True)
class Subscription:
    """An active subscription as the notify stage uses it (with its secret)."""

    id: int
    url: str
    secret: str
    geofence_ids: frozenset[int] | None
    tracker_ids: frozenset[str] | None
    kinds: frozenset[str]
    created_at: datetime

    def matches(self, tracker_id: str, geofence_id: int, kind: str) -> bool:
        return (
            kind in self.kinds
            and (self.geofence_ids is None or geofence_id in self.geofence_ids)
            and (self.tracker_ids is None or tracker_id in self.tracker_ids)
        )


@dataclass(frozen=True, slots=True)
class Plan:
    """What to do now about one delivery."""

    action: Literal["delivered", "dead", "wait", "go"]
    attempt: int = 0  # for "go": the number of this attempt (1 = first)
    wait_s: float = 0.0  # for "wait"
    reason: str = ""


# -- subscriptions


def check_secret(secret: str) -> str:
    """A Standard Webhooks secret: ``whsec_`` + base64 of 24-64 random bytes."""
    if not secret.startswith(SECRET_PREFIX):
        raise InvalidSubscription("secret: must start with 'whsec_' (Standard Webhooks)")
    try:
        raw = base64.b64decode(secret[len(SECRET_PREFIX) :], validate=True)
    except (binascii.Error, ValueError):
        raise InvalidSubscription("secret: the part after 'whsec_' is not base64") from None
    if not 24 <= len(raw) <= 64:
        raise InvalidSubscription(f"secret: decodes to {len(raw)} bytes; use 24 to 64")
    return secret


def check_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidSubscription(f"url: {url!r} is not an http:// or https:// URL")
    if len(url) > 2048:
        raise InvalidSubscription("url: longer than 2048 characters")
    return url


def check_kinds(kinds: Iterable[str]) -> str:
    chosen = sorted(set(kinds))
    bad = [k for k in chosen if k not in KINDS]
    if bad or not chosen:
        raise InvalidSubscription(f"kinds: {bad or 'none'}; choose from enter, exit")
    return ",".join(chosen)


def add_subscription(
    session: Session,
    url: str,
    secret: str,
    *,
    geofence_ids: Sequence[int] | None = None,
    tracker_ids: Sequence[str] | None = None,
    kinds: Iterable[str] = KINDS,
    description: str | None = None,
) -> int:
    row = WebhookSubscription(
        url=check_url(url),
        secret=check_secret(secret),
        geofence_ids=json.dumps(sorted({int(g) for g in geofence_ids})) if geofence_ids else None,
        tracker_ids=json.dumps(sorted(set(tracker_ids))) if tracker_ids else None,
        kinds=check_kinds(kinds),
        description=description,
        active=True,
    )
    session.add(row)
    session.flush()
    return int(row.id)


def set_subscription_active(session: Session, subscription_id: int, active: bool) -> str:
    """Returns the subscription's URL; LookupError when there is none."""
    row = session.get(WebhookSubscription, subscription_id)
    if row is None:
        raise LookupError(f"no webhook subscription {subscription_id}")
    row.active = active
    return row.url


def subscription_rows(session: Session, include_inactive: bool = False) -> list[dict[str, Any]]:
    """The subscriptions for operators: everything but the secret."""
    stmt = select(WebhookSubscription).order_by(WebhookSubscription.id)
    if not include_inactive:
        stmt = stmt.where(WebhookSubscription.active.is_(True))
    return [
        {
            "id": s.id,
            "url": s.url,
            "geofence_ids": json.loads(s.geofence_ids) if s.geofence_ids else "all",
            "tracker_ids": json.loads(s.tracker_ids) if s.tracker_ids else "all",
            "kinds": s.kinds,
            "active": s.active,
            "description": s.description,
            "created_at": s.created_at.isoformat(timespec="seconds"),
        }
        for s in session.scalars(stmt)
    ]


def subscription(session: Session, subscription_id: int) -> Subscription:
    row = session.get(WebhookSubscription, subscription_id)
    if row is None:
        raise LookupError(f"no webhook subscription {subscription_id}")
    return _spec(row)


def active_subscriptions(session: Session) -> list[Subscription]:
    stmt = select(WebhookSubscription).where(WebhookSubscription.active.is_(True))
    return [_spec(s) for s in session.scalars(stmt.order_by(WebhookSubscription.id))]


def _spec(s: WebhookSubscription) -> Subscription:
    return Subscription(
        id=s.id,
        url=s.url,
        secret=s.secret,
        geofence_ids=frozenset(json.loads(s.geofence_ids)) if s.geofence_ids else None,
        tracker_ids=frozenset(json.loads(s.tracker_ids)) if s.tracker_ids else None,
        kinds=frozenset(s.kinds.split(",")),
        created_at=s.created_at,
    )


# -- deliveries


def _insert(session: Session) -> Any:
    dialect = session.get_bind().dialect.name
    return (pg_insert if dialect == "postgresql" else sqlite_insert)(_deliveries)


def plan_attempts(
    session: Session,
    event: Any,  # schemas.notify.GeofenceEvent
    subs: Sequence[Subscription],
    now: datetime,
    *,
    owner: str,
    lease_s: float,
    entry_ms: int,
    order_wait_s: float,
    order_poll_s: float,
) -> dict[int, Plan]:
    """Create the event's delivery rows (idempotent) and say, per subscription, what to
    do now. "go" also takes the row's lease for ``owner``.

    A dead delivery seen from a stream entry newer than its death (``entry_ms``: the
    entry id's time) is a redrive: it starts over with no attempts spent.
    """
    if not subs:
        return {}
    eid = event.event_id
    stmt = _insert(session).values(
        [
            {
                "event_id": eid,
                "subscription_id": s.id,
                "tracker_id": event.tracker_id,
                "geofence_id": event.geofence_id,
                "observed_at": event.observed_at,
                "kind": event.kind,
                "state": "pending",
                "attempts": 0,
                "created_at": now,
                "updated_at": now,
            }
            for s in subs
        ]
    )
    session.execute(stmt.on_conflict_do_nothing(index_elements=["event_id", "subscription_id"]))
    rows = {
        r.subscription_id: r
        for r in session.scalars(
            select(WebhookDelivery)
            .where(
                WebhookDelivery.event_id == eid,
                WebhookDelivery.subscription_id.in_([s.id for s in subs]),
            )
            .with_for_update()
        )
    }
    plans: dict[int, Plan] = {}
    for s in subs:
        row = rows[s.id]
        if row.state == "dead" and entry_ms > _ms(row.updated_at):
            row.state, row.attempts, row.next_attempt_at = "pending", 0, None
            row.updated_at = now
        if row.state != "pending":
            plans[s.id] = Plan(cast(Any, row.state), reason=_reason(row))
            continue
        row.updated_at = now  # looked after: see _predecessor_pending
        if row.next_attempt_at is not None and row.next_attempt_at > now:
            plans[s.id] = Plan("wait", wait_s=_secs(row.next_attempt_at - now), reason="backoff")
        elif row.lease_until is not None and row.lease_until > now and row.lease_owner != owner:
            wait_s = min(_secs(row.lease_until - now), order_poll_s * 5)
            plans[s.id] = Plan("wait", wait_s=wait_s, reason="in flight elsewhere")
        elif _predecessor_pending(session, s, event, now, order_wait_s):
            plans[s.id] = Plan("wait", wait_s=order_poll_s, reason="order")
        else:
            row.lease_until = now + timedelta(seconds=lease_s)
            row.lease_owner = owner
            plans[s.id] = Plan("go", attempt=row.attempts + 1)
    return plans


def _predecessor_pending(
    session: Session, sub: Subscription, event: Any, now: datetime, order_wait_s: float
) -> bool:
    """Is the tracker's previous event (of those this subscription receives) still
    owed to it? Events are read from geofence_events, which the geofence stage writes
    before it publishes: a predecessor is known here even if its notification is not."""
    stmt = (
        select(EventRow.geofence_id, EventRow.observed_at, EventRow.kind, EventRow.created_at)
        .where(
            EventRow.tracker_id == event.tracker_id,
            EventRow.observed_at < event.observed_at,
            EventRow.kind.in_(sorted(sub.kinds)),
        )
        .order_by(EventRow.observed_at.desc())
        .limit(1)
    )
    if sub.geofence_ids is not None:
        stmt = stmt.where(EventRow.geofence_id.in_(sorted(sub.geofence_ids)))
    if sub.tracker_ids is not None and event.tracker_id not in sub.tracker_ids:
        return False
    pred = session.execute(stmt).first()
    if pred is None:
        return False
    row = session.execute(
        select(WebhookDelivery.state, WebhookDelivery.updated_at).where(
            WebhookDelivery.event_id == event_id(event.tracker_id, *pred[:3]),
            WebhookDelivery.subscription_id == sub.id,
        )
    ).first()
    horizon = now - timedelta(seconds=order_wait_s)
    if row is not None:
        # pending and looked after (every pass over its entry touches it): wait; a
        # pending row nobody touched for order_wait_s lost its entry: do not wait
        return bool(row[0] == "pending" and row[1] > horizon)
    # not seen by notify yet: wait for it, unless the subscription is younger than it
    # or its notification is overdue (lost upstream)
    created = pred[3]
    return bool(created >= sub.created_at and created > horizon)


def record_attempt(
    session: Session,
    event_id: str,
    subscription_id: int,
    attempt: int,
    *,
    now: datetime,
    status: int | None,
    latency_ms: float | None,
    error: str | None,
    outcome: Literal["delivered", "retry", "dead"],
    retry_in_s: float = 0.0,
) -> None:
    """Log one HTTP attempt and move the delivery on (releasing its lease)."""
    session.add(
        WebhookAttempt(
            event_id=event_id,
            subscription_id=subscription_id,
            attempt=attempt,
            status=status,
            latency_ms=latency_ms,
            error=error[: EXCERPT_CHARS * 2] if error else None,
            at=now,
        )
    )
    values: dict[str, Any] = {
        "attempts": attempt,
        "last_status": status,
        "last_error": error,
        "updated_at": now,
        "lease_until": None,
        "lease_owner": None,
    }
    if outcome == "delivered":
        values.update(state="delivered", delivered_at=now, next_attempt_at=None)
    elif outcome == "dead":
        values.update(state="dead", next_attempt_at=None)
    else:
        values["next_attempt_at"] = now + timedelta(seconds=retry_in_s)
    session.execute(
        update(WebhookDelivery)
        .where(
            WebhookDelivery.event_id == event_id,
            WebhookDelivery.subscription_id == subscription_id,
            WebhookDelivery.state == "pending",
        )
        .values(**values)
    )


def recent_attempts(
    session: Session, limit: int = 50, subscription_id: int | None = None
) -> list[dict[str, Any]]:
    """The delivery log, newest first."""
    stmt = select(WebhookAttempt).order_by(WebhookAttempt.id.desc()).limit(limit)
    if subscription_id is not None:
        stmt = stmt.where(WebhookAttempt.subscription_id == subscription_id)
    return [
        {
            "at": a.at.isoformat(timespec="milliseconds"),
            "event_id": a.event_id,
            "subscription_id": a.subscription_id,
            "attempt": a.attempt,
            "status": a.status,
            "latency_ms": None if a.latency_ms is None else round(a.latency_ms, 1),
            "error": a.error,
        }
        for a in session.scalars(stmt)
    ]


def delivery_states(session: Session, event_ids: Sequence[str] | None = None) -> list[Any]:
    """``(event_id, subscription_id, state, attempts, last_status)`` rows."""
    stmt = select(
        WebhookDelivery.event_id,
        WebhookDelivery.subscription_id,
        WebhookDelivery.state,
        WebhookDelivery.attempts,
        WebhookDelivery.last_status,
    ).order_by(WebhookDelivery.event_id, WebhookDelivery.subscription_id)
    if event_ids is not None:
        stmt = stmt.where(WebhookDelivery.event_id.in_(list(event_ids)))
    return list(session.execute(stmt))


def _reason(row: WebhookDelivery) -> str:
    status = f"HTTP {row.last_status}" if row.last_status is not None else "no response"
    return f"{status} after {row.attempts} attempts: {row.last_error or ''}".strip()


def _ms(t: datetime) -> int:
    return int(t.timestamp() * 1000)


def _secs(d: timedelta) -> float:
    return max(0.0, d.total_seconds())

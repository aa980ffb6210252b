"""Webhook subscriptions, delivery state and the delivery log (one function per question).

Like :mod:`schemas.store`, every function takes a session first and does not commit.
Secrets are stored encrypted (:mod:`schemas.secretbox`) and decrypted only by
:func:`active_subscriptions` (for signing); everything an operator sees comes from
:func:`subscription_rows`, which leaves them out and shows URLs without credentials
or query (:func:`redact_url`).

A delivery (one event to one subscription) is ``pending`` until it is ``delivered`` or
``dead``; :func:`plan_batch` decides, in one transaction for a batch of events, which
pending deliveries may be attempted now, and :func:`record_batch` records a batch of
attempts in one transaction.

**Order** per tracker and subscription is the order of ``(observed_at, geofence_id,
kind)`` (``enter`` before ``exit``): a delivery waits while *any* earlier event of its
tracker that the subscription receives is still owed to it (its delivery pending and
looked after, or not created yet), not only the latest one, so simultaneous events
on overlapping geofences keep their order too.

**Dead stays dead.** A dead delivery starts over only when a redrive brings back the
dead letter that carried it: the entry's ``msg_id`` is the one recorded when it was
dead-lettered (``lettered_msg``) and its entry id is newer than that moment. A
graceful hand-back or a duplicate entry of the event never revives it.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal, cast
from urllib.parse import urlsplit, urlunsplit

from sqlalchemy import Table, and_, bindparam, or_, select, tuple_, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from schemas.secretbox import SecretBox
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
    priority: int = 0
    batch_max: int = 1
    allow_private: bool = False
    allow_http: bool = False

    @property
    def origin(self) -> str:
        """The endpoint: scheme, host and port. Rate limit, circuit breaker and
        Retry-After pause belong to it, whichever subscriptions share it."""
        return origin(self.url)

    @property
    def shown_url(self) -> str:
        return redact_url(self.url)

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
    # for "dead": this entry dead-letters it (False: a 410 disabled the subscription,
    # or another entry's dead letter already carries it)
    letter: bool = False


# -- URLs


def origin(url: str) -> str:
    """``scheme://host:port`` (the port always spelled out), lower case."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    port = parts.port or (443 if scheme == "https" else 80)
    host = (parts.hostname or "").lower()
    if ":" in host:
        host = f"[{host}]"
    return f"{scheme}://{host}:{port}"


def redact_url(url: str) -> str:
    """The URL as shown and logged: no user:password, no query, no fragment (either
    may carry a token); ``?...`` says a query was there."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = host + (f":{parts.port}" if parts.port else "")
    shown = urlunsplit((parts.scheme, netloc, parts.path, "", ""))
    return shown + ("?..." if parts.query else "")


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
    """The URL's form (the SSRF guard, :mod:`processors.ssrf`, checks its target)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidSubscription(f"url: {redact_url(url)!r} is not an http:// or https:// URL")
    if len(url) > 2048:
        raise InvalidSubscription("url: longer than 2048 characters")
    try:
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError:
        raise InvalidSubscription("url: the port is not a number in 0-65535") from None
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
    box: SecretBox,
    geofence_ids: Sequence[int] | None = None,
    tracker_ids: Sequence[str] | None = None,
    kinds: Iterable[str] = KINDS,
    description: str | None = None,
    priority: int = 0,
    batch_max: int = 1,
    allow_private: bool = False,
    allow_http: bool = False,
) -> int:
    if priority not in (0, 1):
        raise InvalidSubscription("priority: 0 (normal) or 1 (high)")
    if not 1 <= batch_max <= 1000:
        raise InvalidSubscription("batch_max: 1 to 1000 events a request")
    row = WebhookSubscription(
        url=check_url(url),
        secret=box.seal(check_secret(secret)),
        geofence_ids=json.dumps(sorted({int(g) for g in geofence_ids})) if geofence_ids else None,
        tracker_ids=json.dumps(sorted(set(tracker_ids))) if tracker_ids else None,
        kinds=check_kinds(kinds),
        description=description,
        active=True,
        priority=priority,
        batch_max=batch_max,
        allow_private=allow_private,
        allow_http=allow_http,
    )
    session.add(row)
    session.flush()
    return int(row.id)


def set_subscription_active(session: Session, subscription_id: int, active: bool) -> str:
    """Returns the subscription's URL (redacted); LookupError when there is none."""
    row = session.get(WebhookSubscription, subscription_id)
    if row is None:
        raise LookupError(f"no webhook subscription {subscription_id}")
    row.active = active
    if active:
        row.disabled_reason = None
    return redact_url(row.url)


def subscription_rows(session: Session, include_inactive: bool = False) -> list[dict[str, Any]]:
    """The subscriptions for operators: no secret, URLs redacted."""
    stmt = select(WebhookSubscription).order_by(WebhookSubscription.id)
    if not include_inactive:
        stmt = stmt.where(WebhookSubscription.active.is_(True))
    return [
        {
            "id": s.id,
            "url": redact_url(s.url),
            "geofence_ids": json.loads(s.geofence_ids) if s.geofence_ids else "all",
            "tracker_ids": json.loads(s.tracker_ids) if s.tracker_ids else "all",
            "kinds": s.kinds,
            "active": s.active,
            "disabled_reason": s.disabled_reason,
            "priority": "high" if s.priority else "normal",
            "batch_max": s.batch_max,
            "allow_private": s.allow_private,
            "allow_http": s.allow_http,
            "description": s.description,
            "created_at": s.created_at.isoformat(timespec="seconds"),
        }
        for s in session.scalars(stmt)
    ]


def subscription(session: Session, subscription_id: int, box: SecretBox) -> Subscription:
    row = session.get(WebhookSubscription, subscription_id)
    if row is None:
        raise LookupError(f"no webhook subscription {subscription_id}")
    return _spec(row, box)


def active_subscriptions(session: Session, box: SecretBox) -> list[Subscription]:
    stmt = select(WebhookSubscription).where(WebhookSubscription.active.is_(True))
    return [_spec(s, box) for s in session.scalars(stmt.order_by(WebhookSubscription.id))]


def rotate_secrets(session: Session, box: SecretBox) -> int:
    """Re-encrypt every stored secret with the newest key; returns how many."""
    rows = list(session.scalars(select(WebhookSubscription).with_for_update()))
    for row in rows:
        row.secret = box.rotate(row.secret)
    return len(rows)


def _spec(s: WebhookSubscription, box: SecretBox) -> Subscription:
    return Subscription(
        id=s.id,
        url=s.url,
        secret=box.open(s.secret),
        geofence_ids=frozenset(json.loads(s.geofence_ids)) if s.geofence_ids else None,
        tracker_ids=frozenset(json.loads(s.tracker_ids)) if s.tracker_ids else None,
        kinds=frozenset(s.kinds.split(",")),
        created_at=s.created_at,
        priority=s.priority,
        batch_max=s.batch_max,
        allow_private=s.allow_private,
        allow_http=s.allow_http,
    )


# -- deliveries


@dataclass(frozen=True, slots=True)
class Item:
    """One stream entry's event to plan: the subscriptions it goes to, and the entry."""

    event: Any  # schemas.notify.GeofenceEvent
    subs: Sequence[Subscription]
    msg_id: str
    entry_ms: int


def _insert(session: Session) -> Any:
    dialect = session.get_bind().dialect.name
    return (pg_insert if dialect == "postgresql" else sqlite_insert)(_deliveries)


def order_key(geofence_id: int, observed_at: datetime, kind: str) -> tuple[datetime, int, str]:
    return (observed_at, geofence_id, kind)


def plan_batch(
    session: Session,
    items: Sequence[Item],
    now: datetime,
    *,
    owner: str,
    lease_s: float,
    order_wait_s: float,
) -> dict[tuple[str, int], Plan]:
    """Create the events' delivery rows (idempotent) and say, per (event id,
    subscription id), what to do now. "go" also takes the row's lease for ``owner``."""
    plans: dict[tuple[str, int], Plan] = {}
    wanted = sorted({s.id for i in items for s in i.subs})
    active = set(
        session.scalars(
            select(WebhookSubscription.id).where(
                WebhookSubscription.id.in_(wanted), WebhookSubscription.active.is_(True)
            )
        )
    )
    if len(active) < len(wanted):  # removed, or disabled by a 410, since it was read
        for i in items:
            for s in i.subs:
                if s.id not in active:
                    plans[(i.event.event_id, s.id)] = Plan("dead", reason="disabled")
        items = [
            Item(i.event, [s for s in i.subs if s.id in active], i.msg_id, i.entry_ms)
            for i in items
        ]
    items = [i for i in items if i.subs]
    if not items:
        return plans
    values = {
        (i.event.event_id, s.id): {
            "event_id": i.event.event_id,
            "subscription_id": s.id,
            "tracker_id": i.event.tracker_id,
            "geofence_id": i.event.geofence_id,
            "observed_at": i.event.observed_at,
            "kind": i.event.kind,
            "state": "pending",
            "attempts": 0,
            "created_at": now,
            "updated_at": now,
        }
        for i in items
        for s in i.subs
    }
    ordered = [values[k] for k in sorted(values)]  # one lock order for every worker
    stmt = _insert(session).values(ordered)
    session.execute(stmt.on_conflict_do_nothing(index_elements=["event_id", "subscription_id"]))
    rows = {
        (r.event_id, r.subscription_id): r
        for r in session.scalars(
            select(WebhookDelivery)
            .where(
                tuple_(WebhookDelivery.event_id, WebhookDelivery.subscription_id).in_(
                    sorted(values)
                )
            )
            .order_by(WebhookDelivery.event_id, WebhookDelivery.subscription_id)
            .with_for_update()
        )
    }
    owed = _owed(session, items, now, order_wait_s)
    for i in items:
        ev = i.event
        mine = order_key(ev.geofence_id, ev.observed_at, ev.kind)
        for s in i.subs:
            key = (ev.event_id, s.id)
            row = rows[key]
            if row.state == "dead":
                plan = _dead(row, i, now)
                if plan is not None:
                    plans[key] = plan
                    continue
            if row.state != "pending":
                plans[key] = Plan(cast(Any, row.state), reason=_reason(row))
                continue
            row.updated_at = now  # looked after: see _owed
            earlier = [k for k in owed.get((s.id, ev.tracker_id), ()) if k < mine]
            if row.next_attempt_at is not None and _aware(row.next_attempt_at) > now:
                wait_s = _secs(_aware(row.next_attempt_at) - now)
                plans[key] = Plan("wait", wait_s=wait_s, reason="backoff")
            elif (
                row.lease_until is not None
                and _aware(row.lease_until) > now
                and row.lease_owner != owner
            ):
                wait_s = _secs(_aware(row.lease_until) - now)
                plans[key] = Plan("wait", wait_s=wait_s, reason="in flight elsewhere")
            elif earlier:
                plans[key] = Plan("wait", reason="order")
            else:
                row.lease_until = now + timedelta(seconds=lease_s)
                row.lease_owner = owner
                plans[key] = Plan("go", attempt=row.attempts + 1)
    return plans


def _dead(row: WebhookDelivery, item: Item, now: datetime) -> Plan | None:
    """A dead delivery seen again: None when this is its redrive (it starts over)."""
    if row.lettered_msg is None:
        gone = row.last_status == 410  # the subscription is disabled: nothing to redrive
        return Plan("dead", reason=_reason(row), letter=not gone)
    if row.lettered_msg != item.msg_id:
        return Plan("dead", reason=_reason(row))  # another entry's letter carries it
    assert row.lettered_at is not None
    if item.entry_ms <= _ms(_aware(row.lettered_at)):
        return Plan("dead", reason=_reason(row), letter=True)  # the letter is not out yet
    row.state, row.attempts, row.next_attempt_at = "pending", 0, None
    row.lettered_at = row.lettered_msg = None
    row.updated_at = now
    return None


def _owed(
    session: Session, items: Sequence[Item], now: datetime, order_wait_s: float
) -> dict[tuple[int, str], list[tuple[datetime, int, str]]]:
    """Per (subscription, tracker): the order keys of the tracker's events, up to the
    latest in ``items``, still owed to the subscription. Events are read from
    geofence_events, which the geofence stage writes before it publishes: an event is
    known here even if its notification is not yet.

    Owed: its delivery is pending and was looked at within ``order_wait_s`` (every
    pass over its entry touches it; one nobody touched for that long lost its entry),
    or there is no delivery yet, the event is younger than the subscription and not
    overdue by ``order_wait_s`` (lost upstream)."""
    horizon = now - timedelta(seconds=order_wait_s)
    latest: dict[tuple[int, str], datetime] = {}
    subs: dict[int, Subscription] = {}
    for i in items:
        for s in i.subs:
            if s.tracker_ids is not None and i.event.tracker_id not in s.tracker_ids:
                continue
            subs[s.id] = s
            k = (s.id, i.event.tracker_id)
            latest[k] = max(latest.get(k, i.event.observed_at), i.event.observed_at)
    out: dict[tuple[int, str], list[tuple[datetime, int, str]]] = {}
    d = WebhookDelivery
    for sid, s in subs.items():
        trackers = sorted({t for (i, t) in latest if i == sid})
        until = max(latest[(sid, t)] for t in trackers)
        stmt = (
            select(EventRow.tracker_id, EventRow.observed_at, EventRow.geofence_id, EventRow.kind)
            .outerjoin(
                d,
                and_(
                    d.subscription_id == sid,
                    d.tracker_id == EventRow.tracker_id,
                    d.geofence_id == EventRow.geofence_id,
                    d.observed_at == EventRow.observed_at,
                    d.kind == EventRow.kind,
                ),
            )
            .where(
                EventRow.tracker_id.in_(trackers),
                EventRow.observed_at <= until,
                EventRow.kind.in_(sorted(s.kinds)),
                or_(
                    and_(d.state == "pending", d.updated_at > horizon),
                    and_(
                        d.state.is_(None),
                        EventRow.created_at >= s.created_at,
                        EventRow.created_at > horizon,
                    ),
                ),
            )
        )
        if s.geofence_ids is not None:
            stmt = stmt.where(EventRow.geofence_id.in_(sorted(s.geofence_ids)))
        for tracker, at, gid, kind in session.execute(stmt):
            if at <= latest[(sid, tracker)]:
                out.setdefault((sid, tracker), []).append(order_key(gid, at, kind))
    return out


def take_more(
    session: Session,
    sub: Subscription,
    first: Any,  # schemas.notify.GeofenceEvent, already leased
    n: int,
    now: datetime,
    *,
    owner: str,
    lease_s: float,
    order_wait_s: float,
    busy: Sequence[str] = (),
) -> list[tuple[Any, int]]:
    """Up to ``n`` more deliveries to ``sub`` that may go with ``first`` in one batched
    request: pending, not leased by another worker nor ``busy`` (ours, going on
    their own), not in backoff, and with every
    earlier owed event of their tracker in the request too. Their leases are taken;
    returns (event, attempt) in the order they go."""
    from schemas.notify import GeofenceEvent

    d = WebhookDelivery
    rows = list(
        session.scalars(
            select(d)
            .where(
                d.subscription_id == sub.id,
                d.state == "pending",
                d.event_id != first.event_id,
                or_(d.next_attempt_at.is_(None), d.next_attempt_at <= now),
                d.event_id.not_in(list(busy)),  # ours, going on their own
                or_(d.lease_until.is_(None), d.lease_until <= now, d.lease_owner == owner),
            )
            .order_by(d.observed_at, d.geofence_id, d.kind)
            .limit(n * 2)
            .with_for_update(skip_locked=True)
        )
    )
    if not rows:
        return []
    events = [
        GeofenceEvent(
            tracker_id=r.tracker_id,
            geofence_id=r.geofence_id,
            observed_at=r.observed_at,
            kind=cast(Any, r.kind),
        )
        for r in rows
    ]
    items = [Item(first, [sub], "", 0)] + [Item(e, [sub], "", 0) for e in events]
    owed = _owed(session, items, now, order_wait_s)
    going = {(first.tracker_id, order_key(first.geofence_id, first.observed_at, first.kind))}
    out: list[tuple[Any, int]] = []
    for row, ev in zip(rows, events, strict=True):
        if len(out) >= n:
            break
        mine = order_key(ev.geofence_id, ev.observed_at, ev.kind)
        earlier = [k for k in owed.get((sub.id, ev.tracker_id), ()) if k < mine]
        if any((ev.tracker_id, k) not in going for k in earlier):
            continue
        going.add((ev.tracker_id, mine))
        row.lease_until = now + timedelta(seconds=lease_s)
        row.lease_owner = owner
        row.updated_at = now
        out.append((ev, row.attempts + 1))
    return out


@dataclass(frozen=True, slots=True)
class Result:
    """One attempt's outcome for one delivery, to record."""

    event_id: str
    subscription_id: int
    attempt: int
    status: int | None
    latency_ms: float | None
    error: str | None
    outcome: Literal["delivered", "retry", "dead"]
    retry_in_s: float = 0.0


def record_batch(session: Session, results: Sequence[Result], *, now: datetime) -> None:
    """Log the attempts and move their deliveries on (releasing their leases); a 410
    disables its subscription, with the reason, for every worker."""
    if not results:
        return
    session.execute(
        WebhookAttempt.__table__.insert(),  # type: ignore[attr-defined]
        [
            {
                "event_id": r.event_id,
                "subscription_id": r.subscription_id,
                "attempt": r.attempt,
                "status": r.status,
                "latency_ms": r.latency_ms,
                "error": r.error[: EXCERPT_CHARS * 2] if r.error else None,
                "at": now,
            }
            for r in results
        ],
    )
    columns = (
        "attempts",
        "last_status",
        "last_error",
        "updated_at",
        "lease_until",
        "lease_owner",
        "state",
        "delivered_at",
        "next_attempt_at",
    )
    rows = []
    for r in results:
        row: dict[str, Any] = {
            "attempts": r.attempt,
            "last_status": r.status,
            "last_error": r.error,
            "updated_at": now,
            "lease_until": None,
            "lease_owner": None,
            "state": "pending",
            "delivered_at": None,
            "next_attempt_at": None,
        }
        if r.outcome == "delivered":
            row.update(state="delivered", delivered_at=now)
        elif r.outcome == "dead":
            row["state"] = "dead"
        else:
            row["next_attempt_at"] = now + timedelta(seconds=r.retry_in_s)
        rows.append(
            {"b_event": r.event_id, "b_sub": r.subscription_id}
            | {f"v_{c}": row[c] for c in columns}
        )
    stmt = (
        update(_deliveries)
        .where(
            _deliveries.c.event_id == bindparam("b_event"),
            _deliveries.c.subscription_id == bindparam("b_sub"),
            _deliveries.c.state == "pending",
        )
        .values({c: bindparam(f"v_{c}") for c in columns})
    )
    session.connection().execute(stmt, rows)
    gone = sorted({r.subscription_id for r in results if r.status == 410})
    if gone:
        reason = f"the endpoint answered 410 Gone at {now.isoformat(timespec='seconds')}"
        session.execute(
            update(WebhookSubscription)
            .where(WebhookSubscription.id.in_(gone), WebhookSubscription.active.is_(True))
            .values(active=False, disabled_reason=reason)
        )


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
    """One attempt: :func:`record_batch` of one."""
    result = Result(
        event_id, subscription_id, attempt, status, latency_ms, error, outcome, retry_in_s
    )
    record_batch(session, [result], now=now)


def mark_lettered(
    session: Session, keys: Sequence[tuple[str, int]], msg_id: str, now: datetime
) -> None:
    """These dead deliveries go to the dead-letter stream in the entry ``msg_id``."""
    if keys:
        session.execute(
            update(WebhookDelivery)
            .where(
                tuple_(WebhookDelivery.event_id, WebhookDelivery.subscription_id).in_(list(keys)),
                WebhookDelivery.state == "dead",
            )
            .values(lettered_at=now, lettered_msg=msg_id)
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


def _aware(t: datetime) -> datetime:
    """SQLite hands back naive UTC datetimes."""
    from datetime import UTC

    return t if t.tzinfo is not None else t.replace(tzinfo=UTC)


def _secs(d: timedelta) -> float:
    return max(0.0, d.total_seconds())

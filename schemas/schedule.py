"""The trackers' schedule: which are due, the fetch-time claim, and their freshness.

Three timestamps on ``trackers``, each with one job:

- ``last_processed_at``: the scheduler's reservation (it picked the tracker then);
- ``fetch_claimed_at`` + ``fetch_batch``: the fetch stage claimed the tracker for one
  request just before calling the source (the 5-minute floor is enforced on this);
- ``last_fetched_at``: the last fetch that succeeded (the 12-hour guarantee is
  measured on this, so a reservation or a failed call never looks like freshness).

Like every store (:mod:`schemas.sql`), every function takes a session and does not commit.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, cast

from sqlalchemy import Select, Table, and_, case, func, or_, select, type_coerce, update
from sqlalchemy.orm import Session

from schemas.sql import in_list
from schemas.tables import Tracker, UTCDateTime

__all__ = [
    "FetchClaim",
    "FleetLoad",
    "Freshness",
    "claim_fetch",
    "fleet_load",
    "freshness",
    "mark_fetched",
    "reserve_due",
]

_trackers = cast(Table, Tracker.__table__)


def in_run(now: datetime) -> Any:
    """Active and inside the production run (a NULL bound is open)."""
    return and_(
        Tracker.active.is_(True),
        or_(Tracker.run_starts_at.is_(None), Tracker.run_starts_at <= now),
        or_(Tracker.run_ends_at.is_(None), Tracker.run_ends_at > now),
    )


def _due(now: datetime, min_interval_s: float) -> Any:
    """Neither reserved nor claimed for a fetch within the interval."""
    cutoff = now - timedelta(seconds=min_interval_s)
    return and_(
        in_run(now),
        or_(Tracker.last_processed_at.is_(None), Tracker.last_processed_at <= cutoff),
        or_(Tracker.fetch_claimed_at.is_(None), Tracker.fetch_claimed_at <= cutoff),
    )


# -- the scheduler


@dataclass(frozen=True, slots=True)
class FleetLoad:
    in_run: int  # active trackers inside their production run
    due: int  # of those, neither reserved nor fetched within the interval


def fleet_load(session: Session, now: datetime, min_interval_s: float) -> FleetLoad:
    total, due = session.execute(
        select(
            func.count(),
            func.coalesce(func.sum(case((_due(now, min_interval_s), 1), else_=0)), 0),
        ).where(in_run(now))
    ).one()
    return FleetLoad(int(total), int(due))


def reserve_due(session: Session, now: datetime, min_interval_s: float, limit: int) -> list[str]:
    """Reserves up to ``limit`` due trackers (``last_processed_at = now``) and returns
    their external ids, least recently reserved or fetched first (never first).

    Rows are locked ``FOR UPDATE SKIP LOCKED`` on PostgreSQL, so a concurrent scheduler
    gets a disjoint set; SQLite transactions hold the write lock (``BEGIN IMMEDIATE``).
    """
    if limit <= 0:
        return []
    stmt: Select[Any] = (
        select(Tracker.external_id)
        .where(_due(now, min_interval_s))
        .order_by(Tracker.last_processed_at.asc().nulls_first(), Tracker.id)
        .limit(limit)
    )
    if session.get_bind().dialect.name == "postgresql":
        stmt = stmt.with_for_update(skip_locked=True)
    ids = list(session.scalars(stmt))
    for i in range(0, len(ids), 5000):
        session.execute(
            update(_trackers)
            .where(_trackers.c.external_id.in_(ids[i : i + 5000]))
            .values(last_processed_at=now)
        )
    return ids


# -- the fetch stage


@dataclass(frozen=True, slots=True)
class FetchClaim:
    admitted: list[str]  # claimed for this request: call the source for these
    too_soon: list[str]  # claimed by another request within the interval
    outside_run: list[str]  # inactive, outside the production run, or unknown


def batch_token(batch_id: str) -> str:
    """A fixed-size token of a request's batch id (ids are not length-limited)."""
    return hashlib.blake2b(batch_id.encode(), digest_size=16).hexdigest()


def claim_fetch(
    session: Session,
    tracker_ids: Sequence[str],
    batch_id: str,
    now: datetime,
    min_interval_s: float,
) -> FetchClaim:
    """Claims the trackers of one fetch request just before the source is called.

    A tracker is admitted when it is in its run and no other request claimed it within
    ``min_interval_s``; the same request is admitted again (a retry after a failed
    call) unless its fetch already succeeded. The claim is one conditional ``UPDATE``:
    on PostgreSQL a concurrent claim of the same row waits and re-checks the condition,
    on SQLite writers are serialised, so two requests never both get a tracker.
    """
    ids = sorted({t for t in tracker_ids if "\x00" not in t})  # no such row (PG refuses NUL)
    if not ids:
        return FetchClaim([], [], list(dict.fromkeys(tracker_ids)))
    token = batch_token(batch_id)
    cutoff = now - timedelta(seconds=min_interval_s)
    if session.get_bind().dialect.name == "postgresql":
        # lock in id order first: overlapping claims cannot deadlock (NO KEY UPDATE:
        # inserts of reports referencing these trackers are not blocked)
        session.execute(
            select(Tracker.id)
            .where(in_list(session, Tracker.external_id, ids))
            .order_by(Tracker.id)
            .with_for_update(key_share=True)
        )
    mine_unfinished = and_(
        Tracker.fetch_batch == token,
        or_(Tracker.last_fetched_at.is_(None), Tracker.last_fetched_at < Tracker.fetch_claimed_at),
    )
    admitted = set(
        session.scalars(
            update(_trackers)
            .where(
                in_list(session, _trackers.c.external_id, ids),
                in_run(now),
                or_(
                    Tracker.fetch_claimed_at.is_(None),
                    Tracker.fetch_claimed_at <= cutoff,
                    mine_unfinished,
                ),
            )
            .values(fetch_claimed_at=now, fetch_batch=token)
            .returning(_trackers.c.external_id)
        )
    )
    rest = [t for t in ids if t not in admitted]
    in_run_rest: set[str] = set()
    if rest:
        stmt = select(Tracker.external_id).where(
            in_list(session, Tracker.external_id, rest), in_run(now)
        )
        in_run_rest = set(session.scalars(stmt))
    order = list(dict.fromkeys(tracker_ids))
    return FetchClaim(
        admitted=[t for t in order if t in admitted],
        too_soon=[t for t in order if t in in_run_rest],
        outside_run=[t for t in order if t not in admitted and t not in in_run_rest],
    )


def mark_fetched(session: Session, tracker_ids: Sequence[str], now: datetime) -> None:
    """The fetch of these trackers succeeded at ``now``."""
    ids = sorted(set(tracker_ids))
    if ids:
        session.execute(
            update(_trackers)
            .where(in_list(session, _trackers.c.external_id, ids))
            .values(last_fetched_at=now)
        )


# -- freshness


@dataclass(frozen=True, slots=True)
class Freshness:
    in_run: int  # active trackers inside their production run
    stale: int  # of those, not fetched for more than max_age_s
    oldest_age_s: float | None  # the least recently fetched one's age; None: no tracker


def freshness(session: Session, now: datetime, max_age_s: float) -> Freshness:
    """The fetch guarantee as numbers, over active trackers inside their run.

    A tracker's age counts from its last successful fetch, or, if it was never fetched
    in this run, from the start of its run (or its creation, whichever is later).
    """
    base = func.coalesce(Tracker.last_fetched_at, Tracker.created_at)
    since = type_coerce(
        case(
            (
                and_(Tracker.run_starts_at.is_not(None), Tracker.run_starts_at > base),
                Tracker.run_starts_at,
            ),
            else_=base,
        ),
        UTCDateTime(),
    )
    limit = now - timedelta(seconds=max_age_s)
    total, oldest, stale = session.execute(
        select(
            func.count(),
            type_coerce(func.min(since), UTCDateTime()),
            func.coalesce(func.sum(case((since < limit, 1), else_=0)), 0),
        ).where(in_run(now))
    ).one()
    age = None if oldest is None else max(0.0, (now - oldest).total_seconds())
    return Freshness(int(total), int(stale), age)

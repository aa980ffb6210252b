"""What the location source sent besides plain reports: rejected records, late reports,
per-tracker errors (tables ``rejected_reports`` and ``tracker_source_stats``).

Like every store (:mod:`schemas.sql`), every function takes a session and does not commit: the
fetch stage calls them in the transaction that stores the batch's reports, so the
counts always agree with the rows. Rows of ``tracker_source_stats`` are written in
tracker order (two workers with overlapping batches lock them in the same order).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, cast

from sqlalchemy import Table, func, insert, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from schemas.sql import in_list
from schemas.tables import RejectedReport, Tracker, TrackerSourceStats

__all__ = [
    "MAX_ERROR_BACKOFF_S",
    "SourceStats",
    "TrackerErrorRow",
    "add_counts",
    "clear_errors",
    "error_backoff_s",
    "errors_by_code",
    "insert_rejected",
    "record_errors",
    "source_stats",
    "totals",
]

MAX_ERROR_BACKOFF_S = 6 * 3600  # a tracker in error is tried at least this often

_stats = cast(Table, TrackerSourceStats.__table__)
_rejected = cast(Table, RejectedReport.__table__)
_trackers = cast(Table, Tracker.__table__)
_COUNTS = ("late_reports", "beyond_bound_reports", "rejected_reports")


def _upsert(session: Session) -> Any:
    dialect = session.get_bind().dialect.name
    return (pg_insert if dialect == "postgresql" else sqlite_insert)(_stats)


def insert_rejected(
    session: Session,
    records: Sequence[tuple[str | None, str, str]],
    received_at: datetime,
    source: str,
) -> None:
    """Keeps the records (tracker id as sent, reason, raw JSON) the source sent that
    cannot be stored as locations."""
    if records:
        session.execute(
            insert(_rejected),
            [
                {
                    "tracker_id": t,
                    "received_at": received_at,
                    "source": source,
                    "reason": reason,
                    "raw": raw,
                }
                for t, reason, raw in records
            ],
        )


def add_counts(session: Session, counts: Mapping[str, Mapping[str, int]], now: datetime) -> None:
    """Adds to the trackers' counters: ``counts[tracker] = {"late_reports": n, ...}``
    (known trackers only: the row references ``trackers``)."""
    rows = [
        {"tracker_id": t, **{c: int(counts[t].get(c, 0)) for c in _COUNTS}, "updated_at": now}
        for t in sorted(counts)
        if any(counts[t].values())
    ]
    if not rows:
        return
    stmt = _upsert(session).values(rows)
    stmt = stmt.on_conflict_do_update(
        index_elements=[_stats.c.tracker_id],
        set_={
            **{c: _stats.c[c] + stmt.excluded[c] for c in _COUNTS},
            "updated_at": stmt.excluded.updated_at,
        },
    )
    session.execute(stmt)


def error_backoff_s(error_count: int, min_interval_s: float, retry_after_s: float | None) -> float:
    """How long a tracker in error waits before it is due again: what the API asked
    for, else the fetch interval doubling with each error in a row, never less than
    the interval nor more than :data:`MAX_ERROR_BACKOFF_S`."""
    if retry_after_s is not None:
        wait_s = retry_after_s
    else:
        wait_s = min_interval_s * 2 ** min(max(error_count - 1, 0), 20)
    return max(min_interval_s, min(wait_s, MAX_ERROR_BACKOFF_S))


@dataclass(frozen=True, slots=True)
class TrackerErrorRow:
    tracker_id: str
    code: str
    message: str
    retry_after_s: float | None


def record_errors(
    session: Session, errors: Sequence[TrackerErrorRow], now: datetime, min_interval_s: float
) -> dict[str, datetime]:
    """Records each tracker's error (counting errors in a row) and reschedules it: its
    reservation (``trackers.last_processed_at``) is set so that the scheduler finds
    it due at ``retry_at``. Returns tracker -> retry_at."""
    by_id = {e.tracker_id: e for e in errors}
    if not by_id:
        return {}
    rows = [
        {
            "tracker_id": t,
            "error_code": by_id[t].code[:32],
            "error_message": by_id[t].message[:2000],
            "error_since": now,
            "error_count": 1,
            "updated_at": now,
        }
        for t in sorted(by_id)
    ]
    stmt = _upsert(session).values(rows)
    stmt = stmt.on_conflict_do_update(
        index_elements=[_stats.c.tracker_id],
        set_={
            "error_code": stmt.excluded.error_code,
            "error_message": stmt.excluded.error_message,
            "error_since": func.coalesce(_stats.c.error_since, stmt.excluded.error_since),
            "error_count": _stats.c.error_count + 1,
            "updated_at": stmt.excluded.updated_at,
        },
    ).returning(_stats.c.tracker_id, _stats.c.error_count)
    counts = {t: int(n) for t, n in session.execute(stmt).all()}
    retry: dict[str, datetime] = {}
    for t in sorted(counts):
        wait_s = error_backoff_s(counts[t], min_interval_s, by_id[t].retry_after_s)
        retry[t] = at = now + timedelta(seconds=wait_s)
        session.execute(update(_stats).where(_stats.c.tracker_id == t).values(retry_at=at))
        # due when last_processed_at <= now - interval (schemas.schedule._due)
        session.execute(
            update(_trackers)
            .where(_trackers.c.external_id == t)
            .values(last_processed_at=at - timedelta(seconds=min_interval_s))
        )
    return retry


def clear_errors(session: Session, tracker_ids: Sequence[str]) -> None:
    """These trackers were fetched without an error: their error state ends."""
    ids = sorted(set(tracker_ids))
    if ids:
        session.execute(
            update(_stats)
            .where(in_list(session, _stats.c.tracker_id, ids), _stats.c.error_code.is_not(None))
            .values(
                error_code=None, error_message=None, error_since=None, error_count=0, retry_at=None
            )
        )


@dataclass(frozen=True, slots=True)
class SourceStats:
    tracker_id: str
    late_reports: int
    beyond_bound_reports: int
    rejected_reports: int
    error_code: str | None
    error_message: str | None
    error_since: datetime | None
    error_count: int
    retry_at: datetime | None


def source_stats(
    session: Session, tracker_ids: Sequence[str] | None = None
) -> dict[str, SourceStats]:
    """Each tracker's row (only trackers that have one)."""
    stmt = select(
        _stats.c.tracker_id,
        *(_stats.c[c] for c in _COUNTS),
        _stats.c.error_code,
        _stats.c.error_message,
        _stats.c.error_since,
        _stats.c.error_count,
        _stats.c.retry_at,
    )
    if tracker_ids is not None:
        stmt = stmt.where(in_list(session, _stats.c.tracker_id, list(tracker_ids)))
    return {row[0]: SourceStats(*cast(tuple[Any, ...], row)) for row in session.execute(stmt)}


def errors_by_code(session: Session) -> dict[str, int]:
    """Trackers in error now, by the API's code."""
    stmt = (
        select(_stats.c.error_code, func.count())
        .where(_stats.c.error_code.is_not(None))
        .group_by(_stats.c.error_code)
        .order_by(_stats.c.error_code)
    )
    return {str(code): int(n) for code, n in session.execute(stmt).all()}


def totals(session: Session) -> dict[str, Any]:
    """The fleet's counts: late, beyond the bound, rejected (the per-tracker counters
    and the records not tied to a known tracker), and trackers in error by code."""
    late, beyond, rejected = session.execute(
        select(*(func.coalesce(func.sum(_stats.c[c]), 0) for c in _COUNTS))
    ).one()
    by_code = errors_by_code(session)
    rejected_rows = session.scalar(select(func.count()).select_from(_rejected)) or 0
    return {
        "late_reports": int(late),
        "beyond_bound_reports": int(beyond),
        "rejected_reports": int(rejected_rows),
        "rejected_of_known_trackers": int(rejected),
        "trackers_in_error": by_code,
    }

"""The geofence stage's reads and writes, set-based: a constant number of statements per
batch, whatever its size.

- :func:`lock_trackers`: one statement takes every tracker's advisory lock, in the
  order of the lock keys (PostgreSQL; SQLite serialises writers anyway).
- :func:`load_windows`: one query returns, for every tracker of the batch, its reports
  from the latest accepted report before the batch's first (evaluated under the
  current fences) through a few reports after the batch's last.
- :func:`save`: one UPDATE writes verdicts, states and checked marks; one DELETE and
  one INSERT replace the events of the recomputed windows.

PostgreSQL gets a batch's rows as one JSON parameter (``json_to_recordset``), so each
statement has one text, is prepared once by psycopg and its parameters cost little;
SQLite (the demo default) takes a portable path.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any, NamedTuple

from sqlalchemy import (
    BindParameter,
    DateTime,
    Float,
    Integer,
    String,
    Text,
    bindparam,
    column,
    text,
)
from sqlalchemy.orm import Session

from schemas.db import json_param
from schemas.tables import UTCDateTime

__all__ = [
    "EventRow",
    "StatusRow",
    "TrackerWindow",
    "fix_status_counts",
    "load_windows",
    "lock_trackers",
    "save",
]

LOCK_NAMESPACE = "trackstream.tracker."


# named tuples, not dataclasses: a batch makes hundreds of them (a tuple is made in C)
class TrackerWindow(NamedTuple):
    # (id, tracker_id, observed_at, lat, lon, accuracy_m, fetched_at, fix_status,
    #  fence_state, ...)
    rows: list[Any]
    anchored: bool  # rows[0] is the accepted report to start from
    truncated: bool  # more reports follow the last one loaded


class StatusRow(NamedTuple):
    id: int
    status: str
    state: str | None
    checked: bool  # a report of this batch: set geofence_checked_at
    observed_at: datetime  # with the id, the row's key in its partition


class EventRow(NamedTuple):
    tracker_id: str
    geofence_id: int
    observed_at: datetime
    kind: str
    report_at: datetime


def _pg(session: Session) -> bool:
    return session.get_bind().dialect.name == "postgresql"


def lock_trackers(session: Session, tracker_ids: Sequence[str]) -> None:
    """Locks the trackers until the transaction ends (transaction-scoped advisory locks
    on ``LOCK_NAMESPACE`` + id), sorted by lock key: two workers whose batches share
    trackers wait for each other, never deadlock."""
    if not tracker_ids or not _pg(session):
        return
    session.execute(
        text(
            "SELECT pg_advisory_xact_lock(k) FROM ("
            " SELECT DISTINCT hashtext(:ns || t) AS k"
            " FROM json_array_elements_text(CAST(:ids AS json)) t"
            " ORDER BY k OFFSET 0) s"
        ),
        {"ns": LOCK_NAMESPACE, "ids": json_param(sorted(set(tracker_ids)))},
    )


def _window_columns(time_type: Any) -> tuple[Any, ...]:
    return (
        column("id", Integer),
        column("tracker_id", String),
        column("observed_at", time_type),
        column("lat", Float),
        column("lon", Float),
        column("accuracy_m", Float),
        column("fetched_at", time_type),
        column("fix_status", String),
        column("fence_state", Text),
        column("a_at", time_type),
        column("after_n", Integer),
    )


# psycopg returns aware datetimes itself (in the session's time zone: fine for
# comparing and subtracting); SQLite's text needs UTCDateTime
_WINDOW_COLUMNS = _window_columns(UTCDateTime())
_PG_WINDOW_COLUMNS = _window_columns(DateTime(timezone=True))

_WINDOW_TAIL = """
a AS (
  SELECT b.tracker_id, b.t_max,
    (SELECT max(h.observed_at) FROM location_history h
      WHERE h.tracker_id = b.tracker_id AND h.observed_at < b.t_min
        AND h.fix_status = 'ok' AND substr(h.fence_state, 1, :plen) = :prefix) AS a_at
  FROM b
), w AS (
  SELECT h.id, h.tracker_id, h.observed_at, h.lat, h.lon, h.accuracy_m, h.fetched_at,
    h.fix_status, h.fence_state, a.a_at,
    {after} OVER (PARTITION BY h.tracker_id ORDER BY h.observed_at) AS after_n
  FROM location_history h JOIN a ON h.tracker_id = a.tracker_id
  WHERE a.a_at IS NULL OR h.observed_at >= a.a_at
)
SELECT id, tracker_id, observed_at, lat, lon, accuracy_m, fetched_at, fix_status,
  fence_state, a_at, after_n
FROM w WHERE after_n <= :lookahead ORDER BY tracker_id, observed_at
"""

_PG_WINDOWS = text(
    "WITH b AS (SELECT * FROM json_to_recordset(CAST(:spans AS json))"
    " AS b(tracker_id varchar, t_min timestamptz, t_max timestamptz)),"
    """
a AS (
  SELECT b.tracker_id, b.t_max,
    (SELECT max(h.observed_at) FROM location_history h
      WHERE h.tracker_id = b.tracker_id AND h.observed_at < b.t_min
        AND h.fix_status = 'ok' AND substr(h.fence_state, 1, :plen) = :prefix) AS a_at
  FROM b
)
SELECT h.id, a.tracker_id, h.observed_at, h.lat, h.lon, h.accuracy_m, h.fetched_at,
  h.fix_status, h.fence_state, a.a_at,
  CASE WHEN h.observed_at > a.t_max THEN 1 ELSE 0 END AS after_n
FROM a CROSS JOIN LATERAL (
  (SELECT * FROM location_history h WHERE h.tracker_id = a.tracker_id
     AND h.observed_at >= coalesce(a.a_at, '-infinity') AND h.observed_at <= a.t_max)
  UNION ALL
  (SELECT * FROM location_history h WHERE h.tracker_id = a.tracker_id
     AND h.observed_at > a.t_max ORDER BY h.observed_at LIMIT :lookahead)
) h
ORDER BY a.tracker_id, h.observed_at
"""
).columns(*_PG_WINDOW_COLUMNS)


def load_windows(
    session: Session,
    spans: Mapping[str, tuple[datetime, datetime]],
    state_prefix: str,
    lookahead: int | None = 8,
) -> dict[str, TrackerWindow]:
    """Per tracker (``spans``: tracker -> (first, last) report time of the batch): its
    reports from the latest accepted one before ``first`` whose state starts with
    ``state_prefix`` (none: from its first report) through ``lookahead`` reports after
    ``last`` (None: all)."""
    if not spans:
        return {}
    trackers = sorted(spans)
    limit = 2**31 - 2 if lookahead is None else lookahead
    params: dict[str, Any] = {
        "plen": len(state_prefix),
        "prefix": state_prefix,
        "lookahead": limit + 1,  # one more, to know whether more follow
    }
    if _pg(session):
        params["spans"] = json_param(
            {"tracker_id": t, "t_min": spans[t][0], "t_max": spans[t][1]} for t in trackers
        )
        rows = session.execute(_PG_WINDOWS, params).all()
    else:
        values = ", ".join(f"(:t{i}, :lo{i}, :hi{i})" for i in range(len(trackers)))
        binds: list[BindParameter[Any]] = []
        for i, t in enumerate(trackers):
            binds += [
                bindparam(f"t{i}", t, type_=String()),
                bindparam(f"lo{i}", spans[t][0], type_=UTCDateTime()),
                bindparam(f"hi{i}", spans[t][1], type_=UTCDateTime()),
            ]
        after = "sum(CASE WHEN h.observed_at > a.t_max THEN 1 ELSE 0 END)"
        stmt = (
            text(
                f"WITH b(tracker_id, t_min, t_max) AS (VALUES {values}),"
                + _WINDOW_TAIL.format(after=after)
            )
            .bindparams(*binds)
            .columns(*_WINDOW_COLUMNS)
        )
        rows = session.execute(stmt, params).all()
    out: dict[str, tuple[list[Any], bool, bool]] = {}
    seen_after: dict[str, int] = {}
    for r in rows:  # tuples: faster than named rows, in the order of _window_columns
        tracker, a_at, after_n = r[1], r[9], r[10]
        kept, anchored, _ = out.setdefault(tracker, ([], a_at is not None, False))
        n = seen_after[tracker] = seen_after.get(tracker, 0) + (after_n > 0)
        if n > limit:
            out[tracker] = (kept, anchored, True)
        else:
            kept.append(r)
    return {t: TrackerWindow(f, a, tr) for t, (f, a, tr) in out.items()}


_PG_UPDATE = text(
    "UPDATE location_history AS h SET fix_status = u.status, fence_state = u.state,"
    " geofence_checked_at = CASE WHEN u.checked THEN CAST(:now AS timestamptz)"
    " ELSE h.geofence_checked_at END"
    " FROM json_to_recordset(CAST(:rows AS json))"
    " AS u(id integer, observed_at timestamptz, status varchar, state text, checked boolean)"
    " WHERE h.id = u.id AND h.observed_at = u.observed_at"  # the partition key: one probe
)
_PG_DELETE = text(
    "DELETE FROM geofence_events e USING json_to_recordset(CAST(:windows AS json))"
    " AS w(tracker_id varchar, lo timestamptz, hi timestamptz)"
    " WHERE e.tracker_id = w.tracker_id AND e.geofence_id = ANY(CAST(:fences AS integer[]))"
    " AND (w.lo IS NULL OR e.report_at > w.lo) AND (w.hi IS NULL OR e.report_at <= w.hi)"
    " RETURNING e.tracker_id, e.geofence_id, e.observed_at, e.kind"
).columns(
    column("tracker_id", String),
    column("geofence_id", Integer),
    column("observed_at", UTCDateTime()),
    column("kind", String),
)
_PG_INSERT = text(
    "INSERT INTO geofence_events (tracker_id, geofence_id, observed_at, kind, report_at,"
    " created_at) SELECT x.t, x.g, x.o, x.k, x.r, CAST(:now AS timestamptz)"
    " FROM json_to_recordset(CAST(:rows AS json))"
    " AS x(t varchar, g integer, o timestamptz, k varchar, r timestamptz)"
    " ON CONFLICT (tracker_id, geofence_id, observed_at)"
    " DO UPDATE SET kind = excluded.kind, report_at = excluded.report_at"
)

_SQLITE_UPDATE = text(
    "UPDATE location_history SET fix_status = :status, fence_state = :state,"
    " geofence_checked_at = CASE WHEN :checked THEN :now ELSE geofence_checked_at END"
    " WHERE id = :id"
).bindparams(bindparam("now", type_=UTCDateTime()))
_SQLITE_INSERT = text(
    "INSERT INTO geofence_events (tracker_id, geofence_id, observed_at, kind, report_at,"
    " created_at) VALUES (:t, :g, :o, :k, :r, :now)"
    " ON CONFLICT (tracker_id, geofence_id, observed_at)"
    " DO UPDATE SET kind = excluded.kind, report_at = excluded.report_at"
).bindparams(
    bindparam("o", type_=UTCDateTime()),
    bindparam("r", type_=UTCDateTime()),
    bindparam("now", type_=UTCDateTime()),
)


def save(
    session: Session,
    statuses: Sequence[StatusRow],
    windows: Sequence[tuple[str, datetime | None, datetime | None]],
    events: Sequence[EventRow],
    fence_ids: Sequence[int],
    now: datetime,
) -> list[tuple[str, int, datetime, str]]:
    """Writes verdicts/states/checked marks, and replaces the events of the active
    fences ``fence_ids`` whose ``report_at`` lies in each window ``(tracker, lo, hi]``
    (None: unbounded) by ``events``. Returns the events deleted, as
    ``(tracker, geofence, observed_at, kind)``."""
    deleted: list[tuple[str, int, datetime, str]] = []
    if _pg(session):
        if statuses:
            session.execute(
                _PG_UPDATE,
                {
                    "rows": json_param(
                        {
                            "id": s.id,
                            "observed_at": s.observed_at,
                            "status": s.status,
                            "state": s.state,
                            "checked": s.checked,
                        }
                        for s in statuses
                    ),
                    "now": now,
                },
            )
        if windows and fence_ids:
            result = session.execute(
                _PG_DELETE,
                {
                    "windows": json_param(
                        {"tracker_id": t, "lo": lo, "hi": hi} for t, lo, hi in windows
                    ),
                    "fences": list(fence_ids),
                },
            )
            deleted = [(r.tracker_id, r.geofence_id, r.observed_at, r.kind) for r in result]
        if events:
            session.execute(
                _PG_INSERT,
                {
                    "rows": json_param(
                        {
                            "t": e.tracker_id,
                            "g": e.geofence_id,
                            "o": e.observed_at,
                            "k": e.kind,
                            "r": e.report_at,
                        }
                        for e in events
                    ),
                    "now": now,
                },
            )
        return deleted
    if statuses:
        session.execute(
            _SQLITE_UPDATE,
            [
                {"id": s.id, "status": s.status, "state": s.state, "checked": s.checked, "now": now}
                for s in statuses
            ],
        )
    if fence_ids:
        fences = ", ".join(str(int(g)) for g in sorted(set(fence_ids)))
        for tracker, lo, hi in windows:
            where = [f"tracker_id = :t AND geofence_id IN ({fences})"]
            binds: list[BindParameter[Any]] = [bindparam("t", tracker, type_=String())]
            if lo is not None:
                where.append("report_at > :lo")
                binds.append(bindparam("lo", lo, type_=UTCDateTime()))
            if hi is not None:
                where.append("report_at <= :hi")
                binds.append(bindparam("hi", hi, type_=UTCDateTime()))
            stmt = (
                text(
                    "DELETE FROM geofence_events WHERE "
                    + " AND ".join(where)
                    + " RETURNING tracker_id, geofence_id, observed_at, kind"
                )
                .bindparams(*binds)
                .columns(
                    column("tracker_id", String),
                    column("geofence_id", Integer),
                    column("observed_at", UTCDateTime()),
                    column("kind", String),
                )
            )
            deleted += [
                (r.tracker_id, r.geofence_id, r.observed_at, r.kind) for r in session.execute(stmt)
            ]
    if events:
        session.execute(
            _SQLITE_INSERT,
            [
                {
                    "t": e.tracker_id,
                    "g": e.geofence_id,
                    "o": e.observed_at,
                    "k": e.kind,
                    "r": e.report_at,
                    "now": now,
                }
                for e in events
            ],
        )
    return deleted


def fix_status_counts(session: Session) -> dict[str, int]:
    """Reports per verdict: ``ok``, each rejection reason, and ``unchecked``."""
    rows = session.execute(
        text("SELECT fix_status, count(*) FROM location_history GROUP BY fix_status")
    ).all()
    return {(status or "unchecked"): int(n) for status, n in rows}

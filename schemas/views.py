"""The read models the web front end reads: ``latest_location`` and ``geofence_occupancy``.

Both are plain tables (on PostgreSQL and SQLite alike) with a unique index, kept up to
date incrementally: a refresh costs what changed since the last one, not what exists.

- ``latest_location``: one row per tracker with at least one report: its latest
  report (by ``observed_at``) with the address, and the tracker's name. A tracker
  whose reports retention dropped keeps its row (its last known position) until the
  tracker itself is deleted.
- ``geofence_occupancy``: one row per active geofence: how many trackers are inside
  (those whose latest event for that geofence is ``enter``), when its latest event
  happened, and when the row was last refreshed.

What changed is recorded in ``view_changes`` (view, tracker) by :func:`note_changes`
(view-refresh records the trackers each ``ViewsChanged`` names; an empty tracker id
means "anything may have changed"). :func:`refresh_view` takes the recorded trackers
of a view and rewrites only their rows: for ``latest_location`` one index lookup per
tracker for its latest report; for ``geofence_occupancy`` it recomputes the trackers'
rows in ``geofence_presence`` (the latest event per tracker and geofence) and moves
the affected geofences' counts by the difference. Geofences added, renamed or
deactivated are picked up at every refresh (there are few of them).

Read them with :data:`LATEST_LOCATION` / :data:`GEOFENCE_OCCUPANCY` (Core tables that
return aware UTC datetimes on both dialects).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from sqlalchemy import (
    Column,
    Connection,
    Engine,
    Float,
    Index,
    Integer,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Table,
    Text,
    text,
)
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from schemas.tables import UTCDateTime

__all__ = [
    "ANY_TRACKER",
    "GEOFENCE_OCCUPANCY",
    "GEOFENCE_PRESENCE",
    "LATEST_LOCATION",
    "OWNED_TABLES",
    "VIEW_CHANGES",
    "VIEW_NAMES",
    "Health",
    "create_view",
    "drop_view",
    "ensure_changes_table",
    "ensure_views",
    "note_changes",
    "recreate_view",
    "refresh_view",
    "view_health",
]

Health = Literal["ok", "missing", "broken"]

ANY_TRACKER = ""
"""A change recorded for this tracker id makes the next refresh rebuild the view."""

CHUNK = 1000  # trackers per statement

view_metadata = MetaData()

LATEST_LOCATION = Table(
    "latest_location",
    view_metadata,
    Column("tracker_id", String(128), nullable=False),
    Column("tracker_name", String(256)),
    Column("observed_at", UTCDateTime(), nullable=False),
    Column("lat", Float, nullable=False),
    Column("lon", Float, nullable=False),
    Column("accuracy_m", Float),
    Column("source", String(64)),
    Column("city", String(256)),
    Column("country_code", String(8)),
    Column("country", String(256)),
    Column("address", Text),
    Column("geocoded_at", UTCDateTime()),
    Column("refreshed_at", UTCDateTime()),
    Index("uq_latest_location_tracker_id", "tracker_id", unique=True),
)

GEOFENCE_OCCUPANCY = Table(
    "geofence_occupancy",
    view_metadata,
    Column("geofence_id", Integer, nullable=False),
    Column("name", String(256)),
    Column("kind", String(16)),
    Column("trackers_inside", Integer, nullable=False),
    Column("last_event_at", UTCDateTime()),
    Column("refreshed_at", UTCDateTime()),
    Index("uq_geofence_occupancy_geofence_id", "geofence_id", unique=True),
)

GEOFENCE_PRESENCE = Table(
    "geofence_presence",
    view_metadata,
    Column("tracker_id", String(128), nullable=False),
    Column("geofence_id", Integer, nullable=False),
    Column("kind", String(8), nullable=False),
    Column("observed_at", UTCDateTime(), nullable=False),
    Index("uq_geofence_presence_tracker_id_geofence_id", "tracker_id", "geofence_id", unique=True),
    Index("ix_geofence_presence_geofence_id_kind", "geofence_id", "kind"),
    Index("ix_geofence_presence_geofence_id_observed_at", "geofence_id", "observed_at"),
)

VIEW_CHANGES = Table(
    "view_changes",
    view_metadata,
    Column("view", String(64), nullable=False),
    Column("tracker_id", String(128), nullable=False),
    PrimaryKeyConstraint("view", "tracker_id", name="pk_view_changes"),
)

_LATEST_COLUMNS = [c.name for c in LATEST_LOCATION.columns]
_LATEST_SELECT = """h.tracker_id, t.name, h.observed_at, h.lat, h.lon, h.accuracy_m, h.source,
       h.city, h.country_code, h.country, h.address, h.geocoded_at, CURRENT_TIMESTAMP"""
_LATEST_UPSERT = "ON CONFLICT (tracker_id) DO UPDATE SET " + ", ".join(
    f"{c} = excluded.{c}" for c in _LATEST_COLUMNS[1:]
)
_LATEST_INSERT = f"INSERT INTO latest_location ({', '.join(_LATEST_COLUMNS)})"

_PRESENCE_INSERT = "INSERT INTO geofence_presence (tracker_id, geofence_id, kind, observed_at)"

_SQL: dict[str, dict[str, str]] = {
    "postgresql": {
        # one index descent per tracker (its latest report), whatever its history
        "latest_some": f"""{_LATEST_INSERT}
SELECT {_LATEST_SELECT}
FROM unnest(CAST(:ids AS varchar[])) AS d(tracker_id)
JOIN trackers t ON t.external_id = d.tracker_id
CROSS JOIN LATERAL (
    SELECT * FROM location_history h WHERE h.tracker_id = d.tracker_id
    ORDER BY h.observed_at DESC LIMIT 1
) h
{_LATEST_UPSERT}""",
        "latest_all": f"""{_LATEST_INSERT}
SELECT DISTINCT ON (h.tracker_id) {_LATEST_SELECT}
FROM location_history h JOIN trackers t ON t.external_id = h.tracker_id
ORDER BY h.tracker_id, h.observed_at DESC
{_LATEST_UPSERT}""",
        # per tracker, a backward scan of its own events in the unique index: never a
        # scan of every event (the planner chose one for 10 % of the trackers)
        "presence_some": f"""{_PRESENCE_INSERT}
SELECT e.tracker_id, e.geofence_id, e.kind, e.observed_at
FROM unnest(CAST(:ids AS varchar[])) AS d(tracker_id)
CROSS JOIN LATERAL (
    SELECT DISTINCT ON (x.geofence_id) x.tracker_id, x.geofence_id, x.kind, x.observed_at
    FROM geofence_events x WHERE x.tracker_id = d.tracker_id
    ORDER BY x.geofence_id DESC, x.observed_at DESC
) e
RETURNING geofence_id, kind""",
        "presence_delete": """DELETE FROM geofence_presence
WHERE tracker_id = ANY(CAST(:ids AS varchar[])) RETURNING geofence_id, kind""",
        "latest_gone": """DELETE FROM latest_location
WHERE tracker_id = ANY(CAST(:ids AS varchar[])) AND NOT EXISTS (
    SELECT 1 FROM trackers t WHERE t.external_id = latest_location.tracker_id)""",
        "presence_all": f"""{_PRESENCE_INSERT}
SELECT DISTINCT ON (e.tracker_id, e.geofence_id)
    e.tracker_id, e.geofence_id, e.kind, e.observed_at
FROM geofence_events e ORDER BY e.tracker_id, e.geofence_id, e.observed_at DESC""",
    },
    "sqlite": {
        "latest_some": f"""{_LATEST_INSERT}
SELECT {_LATEST_SELECT}
FROM json_each(:ids) d
CROSS JOIN location_history h ON h.tracker_id = d.value AND h.observed_at = (
    SELECT MAX(h2.observed_at) FROM location_history h2 WHERE h2.tracker_id = d.value)
JOIN trackers t ON t.external_id = h.tracker_id
WHERE true
{_LATEST_UPSERT}""",
        "latest_all": f"""{_LATEST_INSERT}
SELECT {_LATEST_SELECT}
FROM location_history h JOIN trackers t ON t.external_id = h.tracker_id
WHERE h.observed_at = (
    SELECT MAX(h2.observed_at) FROM location_history h2 WHERE h2.tracker_id = h.tracker_id)
{_LATEST_UPSERT}""",
        "presence_some": f"""{_PRESENCE_INSERT}
SELECT e.tracker_id, e.geofence_id, e.kind, e.observed_at
FROM json_each(:ids) d CROSS JOIN geofence_events e ON e.tracker_id = d.value
WHERE e.observed_at = (SELECT MAX(e2.observed_at) FROM geofence_events e2
    WHERE e2.tracker_id = e.tracker_id AND e2.geofence_id = e.geofence_id)
RETURNING geofence_id, kind""",
        "presence_delete": """DELETE FROM geofence_presence
WHERE tracker_id IN (SELECT value FROM json_each(:ids)) RETURNING geofence_id, kind""",
        "latest_gone": """DELETE FROM latest_location
WHERE tracker_id IN (SELECT value FROM json_each(:ids)) AND NOT EXISTS (
    SELECT 1 FROM trackers t WHERE t.external_id = latest_location.tracker_id)""",
        "presence_all": f"""{_PRESENCE_INSERT}
SELECT e.tracker_id, e.geofence_id, e.kind, e.observed_at FROM geofence_events e
WHERE e.observed_at = (SELECT MAX(e2.observed_at) FROM geofence_events e2
    WHERE e2.tracker_id = e.tracker_id AND e2.geofence_id = e.geofence_id)""",
    },
}

# portable: the geofence list (few rows) is synced at every occupancy refresh
_OCCUPANCY_SYNC = (
    """DELETE FROM geofence_occupancy WHERE geofence_id NOT IN (
    SELECT g.id FROM geofences g WHERE g.active)""",
    """UPDATE geofence_occupancy SET
    name = (SELECT g.name FROM geofences g WHERE g.id = geofence_occupancy.geofence_id),
    kind = (SELECT g.kind FROM geofences g WHERE g.id = geofence_occupancy.geofence_id)
WHERE EXISTS (SELECT 1 FROM geofences g WHERE g.id = geofence_occupancy.geofence_id
    AND (g.name <> geofence_occupancy.name OR g.kind <> geofence_occupancy.kind))""",
    """INSERT INTO geofence_occupancy
    (geofence_id, name, kind, trackers_inside, last_event_at, refreshed_at)
SELECT g.id, g.name, g.kind,
    (SELECT COUNT(*) FROM geofence_presence p WHERE p.geofence_id = g.id AND p.kind = 'enter'),
    (SELECT MAX(p.observed_at) FROM geofence_presence p WHERE p.geofence_id = g.id),
    CURRENT_TIMESTAMP
FROM geofences g
WHERE g.active AND NOT EXISTS (
    SELECT 1 FROM geofence_occupancy o WHERE o.geofence_id = g.id)""",
)
_OCCUPANCY_MOVE = """UPDATE geofence_occupancy SET
    trackers_inside = trackers_inside + :delta,
    last_event_at = (SELECT MAX(p.observed_at) FROM geofence_presence p
                     WHERE p.geofence_id = :gid),
    refreshed_at = CURRENT_TIMESTAMP
WHERE geofence_id = :gid"""


@dataclass(frozen=True)
class _View:
    table: Table
    helpers: tuple[Table, ...] = ()

    @property
    def name(self) -> str:
        return self.table.name

    @property
    def columns(self) -> list[str]:
        return [c.name for c in self.table.columns]

    @property
    def unique_index(self) -> Index:
        return next(i for i in self.table.indexes if i.unique)

    @property
    def key(self) -> list[str]:
        return [c.name for c in self.unique_index.columns]


_VIEWS = {
    v.name: v
    for v in (
        _View(LATEST_LOCATION),
        _View(GEOFENCE_OCCUPANCY, (GEOFENCE_PRESENCE,)),
    )
}
VIEW_NAMES: tuple[str, ...] = ("latest_location", "geofence_occupancy")
assert set(VIEW_NAMES) == set(_VIEWS)
OWNED_TABLES: tuple[str, ...] = (*VIEW_NAMES, GEOFENCE_PRESENCE.name, VIEW_CHANGES.name)
"""Tables this module creates and keeps (not in the ORM metadata, not autogenerated)."""


def _view(name: str) -> _View:
    try:
        return _VIEWS[name]
    except KeyError:
        raise ValueError(f"unknown view {name!r}; views are: {', '.join(VIEW_NAMES)}") from None


def _is_pg(conn: Connection | Engine) -> bool:
    return conn.dialect.name == "postgresql"


def _sql(conn: Connection, name: str) -> Any:
    return text(_SQL["postgresql" if _is_pg(conn) else "sqlite"][name])


def _ids_param(conn: Connection, ids: Sequence[str]) -> Any:
    return list(ids) if _is_pg(conn) else json.dumps(list(ids))


def _lock(conn: Connection, name: str) -> None:
    """Serialises refresh/recreate of one view across processes (PostgreSQL; SQLite
    transactions take the write lock up front)."""
    if _is_pg(conn):
        conn.execute(
            text("SELECT pg_advisory_xact_lock(hashtext(:k))"), {"k": f"trackstream.view.{name}"}
        )


# -- create / drop (also used by the migrations, on their connection)


def create_view(conn: Connection, name: str, *, populate: bool = True) -> None:
    """Creates the view ``name`` (which must not exist) with its unique index and its
    helper tables, and ``view_changes`` if missing; populated from the history."""
    v = _view(name)
    VIEW_CHANGES.create(conn, checkfirst=True)
    for helper in v.helpers:
        helper.drop(conn, checkfirst=True)
        helper.create(conn)
    v.table.create(conn)
    if populate:
        _rebuild(conn, v)


def drop_view(conn: Connection, name: str) -> None:
    """Drops whatever object is called ``name`` (matview, view or table) and the view's
    helper tables."""
    v = _view(name)
    for obj in (v.name, *(h.name for h in v.helpers)):
        _drop_any(conn, obj)


def drop_changes(conn: Connection) -> None:
    VIEW_CHANGES.drop(conn, checkfirst=True)


def _drop_any(conn: Connection, name: str) -> None:
    if _is_pg(conn):
        kind = conn.execute(
            text(
                "SELECT c.relkind FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
                "WHERE c.relname = :name AND n.nspname = current_schema()"
            ),
            {"name": name},
        ).scalar()
        statement = (
            {
                "m": "MATERIALIZED VIEW",
                "v": "VIEW",
                "r": "TABLE",
                "p": "TABLE",
                "f": "FOREIGN TABLE",
                "i": "INDEX",
                "S": "SEQUENCE",
            }.get(str(kind))
            if kind is not None
            else None
        )
        if statement:
            conn.execute(text(f"DROP {statement} IF EXISTS {name} CASCADE"))
    else:
        kind = conn.execute(
            text("SELECT type FROM sqlite_master WHERE name = :name"), {"name": name}
        ).scalar()
        if kind in ("table", "view", "index", "trigger"):
            conn.execute(text(f"DROP {str(kind).upper()} IF EXISTS {name}"))


# -- recording changes


def note_changes(
    conn: Connection | Engine, views: Iterable[str], tracker_ids: Iterable[str] | None
) -> None:
    """Records that these trackers' data changed for ``views`` (None or no trackers:
    anything may have changed, the next refresh rebuilds). Idempotent."""
    names = [_view(v).name for v in views]
    ids = sorted(set(tracker_ids or ())) or [ANY_TRACKER]
    rows = [{"view": v, "tracker_id": t} for v in names for t in ids]
    if not rows:
        return
    if isinstance(conn, Engine):
        with conn.begin() as c:
            _note(c, rows)
    else:
        _note(conn, rows)


def ensure_changes_table(engine: Engine) -> bool:
    """Creates ``view_changes`` if it is missing; True if it was."""
    with engine.begin() as conn:
        if _table_health(conn, VIEW_CHANGES) != "missing":
            return False
        VIEW_CHANGES.create(conn)
        return True


def _note(conn: Connection, rows: list[dict[str, str]]) -> None:
    if _is_pg(conn):  # one statement per view, in a fixed order (no deadlock between writers)
        by_view: dict[str, list[str]] = {}
        for r in rows:
            by_view.setdefault(r["view"], []).append(r["tracker_id"])
        for view, ids in sorted(by_view.items()):
            conn.execute(
                text(
                    "INSERT INTO view_changes (view, tracker_id) "
                    "SELECT :v, unnest(CAST(:ids AS varchar[])) ON CONFLICT DO NOTHING"
                ),
                {"v": view, "ids": sorted(ids)},
            )
        return
    conn.execute(sqlite_insert(VIEW_CHANGES).on_conflict_do_nothing(), rows)


def _take_changes(conn: Connection, name: str) -> list[str]:
    return list(
        conn.execute(
            text("DELETE FROM view_changes WHERE view = :v RETURNING tracker_id"), {"v": name}
        ).scalars()
    )


# -- refresh


def refresh_view(engine: Engine, name: str) -> int | None:
    """Applies the changes recorded for ``name`` in one transaction: the number of
    trackers refreshed, or None when the view was rebuilt (a change for any tracker).
    Also picks up added, renamed or deactivated geofences (occupancy)."""
    v = _view(name)
    with engine.begin() as conn:
        _lock(conn, v.name)
        ids = _take_changes(conn, v.name)
        if ANY_TRACKER in ids:
            _rebuild(conn, v, clear=True)
            return None
        if v.table is GEOFENCE_OCCUPANCY:
            for statement in _OCCUPANCY_SYNC:
                conn.execute(text(statement))
        for i in range(0, len(ids), CHUNK):
            chunk = ids[i : i + CHUNK]
            if v.table is LATEST_LOCATION:
                _refresh_latest(conn, chunk)
            else:
                _refresh_occupancy(conn, chunk)
        return len(ids)


def _refresh_latest(conn: Connection, ids: Sequence[str]) -> None:
    param = {"ids": _ids_param(conn, ids)}
    conn.execute(_sql(conn, "latest_some"), param)
    conn.execute(_sql(conn, "latest_gone"), param)  # trackers deleted


def _refresh_occupancy(conn: Connection, ids: Sequence[str]) -> None:
    param = {"ids": _ids_param(conn, ids)}
    old = conn.execute(_sql(conn, "presence_delete"), param).all()
    new = conn.execute(_sql(conn, "presence_some"), param).all()
    delta: Counter[int] = Counter()
    for gid, kind in old:
        delta[gid] -= kind == "enter"
    for gid, kind in new:
        delta[gid] += kind == "enter"
    if delta:
        conn.execute(
            text(_OCCUPANCY_MOVE),
            [{"gid": gid, "delta": d} for gid, d in sorted(delta.items())],
        )


def _rebuild(conn: Connection, v: _View, *, clear: bool = False) -> None:
    """Recomputes the whole view from the history (what a refresh avoids)."""
    if clear:
        conn.execute(text("DELETE FROM view_changes WHERE view = :v"), {"v": v.name})
    if v.table is LATEST_LOCATION:
        # a tracker whose reports retention dropped keeps its last position: only the
        # rows of trackers that are gone are cleared, the others are overwritten
        conn.execute(
            text(
                "DELETE FROM latest_location WHERE NOT EXISTS (SELECT 1 FROM trackers t"
                " WHERE t.external_id = latest_location.tracker_id)"
            )
        )
        conn.execute(_sql(conn, "latest_all"))
    else:
        conn.execute(text("DELETE FROM geofence_presence"))
        conn.execute(_sql(conn, "presence_all"))
        conn.execute(text("DELETE FROM geofence_occupancy"))
        for statement in _OCCUPANCY_SYNC:
            conn.execute(text(statement))


# -- health


def view_health(engine: Engine, name: str) -> Health:
    """``ok``; ``missing`` (no object of that name); or ``broken``: something of that
    name exists but is not a table (say, the materialized view of an old schema), has
    the wrong columns, lacks the unique index, or cannot be queried, or a helper table
    (``view_changes``, ``geofence_presence``) is missing or wrong."""
    v = _view(name)
    try:
        with engine.connect() as conn:
            found = _table_health(conn, v.table)
            if found != "ok":
                return found
            for helper in (*v.helpers, VIEW_CHANGES):
                if _table_health(conn, helper) != "ok":
                    return "broken"
            return "ok"
    except Exception:  # a catalog query that fails means we cannot trust the object
        return "broken"


def _table_health(conn: Connection, table: Table) -> Health:
    key = [
        c.name
        for c in (next((i for i in table.indexes if i.unique), None) or table.primary_key).columns
    ]
    if _is_pg(conn):
        row = conn.execute(
            text(
                "SELECT c.oid, c.relkind FROM pg_class c "
                "JOIN pg_namespace n ON n.oid = c.relnamespace "
                "WHERE c.relname = :name AND n.nspname = current_schema()"
            ),
            {"name": table.name},
        ).first()
        if row is None:
            return "missing"
        oid, relkind = row
        if relkind != "r":
            return "broken"
        columns = list(
            conn.execute(
                text(
                    "SELECT attname FROM pg_attribute WHERE attrelid = :oid AND attnum > 0 "
                    "AND NOT attisdropped ORDER BY attnum"
                ),
                {"oid": oid},
            ).scalars()
        )
        keys: Iterable[list[str] | None] = conn.execute(
            text(
                "SELECT array_agg(a.attname::text ORDER BY k.ord) FROM pg_index i "
                "CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord) "
                "JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum "
                "WHERE i.indrelid = :oid AND i.indisunique AND i.indisvalid "
                "AND i.indpred IS NULL AND i.indexprs IS NULL GROUP BY i.indexrelid"
            ),
            {"oid": oid},
        ).scalars()
    else:
        kind = conn.execute(
            text("SELECT type FROM sqlite_master WHERE name = :name"), {"name": table.name}
        ).scalar()
        if kind is None:
            return "missing"
        if kind != "table":
            return "broken"
        columns = [r[1] for r in conn.execute(text(f"PRAGMA table_info({table.name})"))]
        found = []
        for idx in conn.execute(text(f"PRAGMA index_list({table.name})")).mappings():
            if idx["unique"] and not idx["partial"]:
                info = conn.execute(text(f"PRAGMA index_info('{idx['name']}')")).all()
                found.append([r[2] for r in sorted(info)])
        keys = found
    if columns != [c.name for c in table.columns]:
        return "broken"
    if not any(cols is not None and list(cols) == key for cols in keys):
        return "broken"
    conn.execute(text(f"SELECT * FROM {table.name} LIMIT 1")).all()
    return "ok"


def recreate_view(engine: Engine, name: str) -> None:
    """Drops whatever is called ``name`` (and its helpers), creates the view again and
    populates it from the history; changes recorded for it are covered by that."""
    v = _view(name)
    with engine.begin() as conn:
        _lock(conn, v.name)
        drop_view(conn, v.name)
        if _table_health(conn, VIEW_CHANGES) == "broken":
            _drop_any(conn, VIEW_CHANGES.name)
        create_view(conn, v.name, populate=False)
        _rebuild(conn, v, clear=True)


def ensure_views(engine: Engine) -> dict[str, Health]:
    """Recreates every view that is not healthy; returns the health found before."""
    found: dict[str, Health] = {}
    for name in VIEW_NAMES:
        found[name] = view_health(engine, name)
        if found[name] != "ok":
            recreate_view(engine, name)
    return found

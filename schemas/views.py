"""The read models the web front end reads: ``latest_location`` and ``geofence_occupancy``.

On PostgreSQL they are materialized views, each with a unique index so that
``REFRESH MATERIALIZED VIEW CONCURRENTLY`` can run while readers read. On SQLite (no
materialized views) they are plain tables with the same columns and unique index,
rebuilt in one transaction (``DELETE`` + ``INSERT ... SELECT``).

- ``latest_location``: one row per tracker with at least one report: its latest
  report (by ``observed_at``) with the address, and the tracker's name.
- ``geofence_occupancy``: one row per active geofence: how many trackers are inside
  (those whose latest event for that geofence is ``enter``), when its latest event
  happened, and when the view was refreshed.

Read them with :data:`LATEST_LOCATION` / :data:`GEOFENCE_OCCUPANCY` (Core tables that
return aware UTC datetimes on both dialects).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from sqlalchemy import (
    Column,
    Connection,
    Engine,
    Float,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    text,
)

from schemas.tables import UTCDateTime

__all__ = [
    "GEOFENCE_OCCUPANCY",
    "LATEST_LOCATION",
    "VIEW_NAMES",
    "Health",
    "create_view",
    "drop_view",
    "ensure_views",
    "recreate_view",
    "refresh_view",
    "view_health",
]

Health = Literal["ok", "missing", "broken"]

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

_LATEST_LOCATION_SELECT = """
SELECT h.tracker_id AS tracker_id, t.name AS tracker_name, h.observed_at AS observed_at,
       h.lat AS lat, h.lon AS lon, h.accuracy_m AS accuracy_m, h.source AS source,
       h.city AS city, h.country_code AS country_code, h.country AS country,
       h.address AS address, h.geocoded_at AS geocoded_at, CURRENT_TIMESTAMP AS refreshed_at
FROM location_history h
JOIN trackers t ON t.external_id = h.tracker_id
WHERE h.observed_at = (
    SELECT MAX(h2.observed_at) FROM location_history h2 WHERE h2.tracker_id = h.tracker_id
)
"""

_GEOFENCE_OCCUPANCY_SELECT = """
SELECT g.id AS geofence_id, g.name AS name, g.kind AS kind,
       COUNT(cur.tracker_id) AS trackers_inside,
       (SELECT MAX(e3.observed_at) FROM geofence_events e3 WHERE e3.geofence_id = g.id)
           AS last_event_at,
       CURRENT_TIMESTAMP AS refreshed_at
FROM geofences g
LEFT JOIN (
    SELECT e.geofence_id AS geofence_id, e.tracker_id AS tracker_id
    FROM geofence_events e
    WHERE e.kind = 'enter' AND e.observed_at = (
        SELECT MAX(e2.observed_at) FROM geofence_events e2
        WHERE e2.geofence_id = e.geofence_id AND e2.tracker_id = e.tracker_id
    )
) cur ON cur.geofence_id = g.id
WHERE g.active
GROUP BY g.id, g.name, g.kind
"""


@dataclass(frozen=True)
class _View:
    table: Table
    select_sql: str

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
        _View(LATEST_LOCATION, _LATEST_LOCATION_SELECT),
        _View(GEOFENCE_OCCUPANCY, _GEOFENCE_OCCUPANCY_SELECT),
    )
}
VIEW_NAMES: tuple[str, ...] = ("latest_location", "geofence_occupancy")
assert set(VIEW_NAMES) == set(_VIEWS)


def _view(name: str) -> _View:
    try:
        return _VIEWS[name]
    except KeyError:
        raise ValueError(f"unknown view {name!r}; views are: {', '.join(VIEW_NAMES)}") from None


def _is_pg(conn: Connection | Engine) -> bool:
    return conn.dialect.name == "postgresql"


def _lock(conn: Connection, name: str) -> None:
    """Serialises refresh/recreate of one view across processes (PostgreSQL)."""
    if _is_pg(conn):
        conn.execute(
            text("SELECT pg_advisory_xact_lock(hashtext(:k))"), {"k": f"trackstream.view.{name}"}
        )


# -- create / drop (also used by the migrations, on their connection)


def create_view(conn: Connection, name: str, *, populate: bool = True) -> None:
    """Creates the view ``name`` (which must not exist) with its unique index."""
    v = _view(name)
    if _is_pg(conn):
        data = "WITH DATA" if populate else "WITH NO DATA"
        conn.execute(text(f"CREATE MATERIALIZED VIEW {v.name} AS {v.select_sql} {data}"))
        v.unique_index.create(conn)
    else:
        v.table.create(conn)
        if populate:
            _rebuild_sqlite(conn, v)


def drop_view(conn: Connection, name: str) -> None:
    """Drops whatever object is called ``name`` (matview, view or table)."""
    v = _view(name)
    if _is_pg(conn):
        kind = conn.execute(
            text(
                "SELECT c.relkind FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
                "WHERE c.relname = :name AND n.nspname = current_schema()"
            ),
            {"name": v.name},
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
            conn.execute(text(f"DROP {statement} IF EXISTS {v.name} CASCADE"))
    else:
        kind = conn.execute(
            text("SELECT type FROM sqlite_master WHERE name = :name"), {"name": v.name}
        ).scalar()
        if kind in ("table", "view", "index", "trigger"):
            conn.execute(text(f"DROP {str(kind).upper()} IF EXISTS {v.name}"))


def _rebuild_sqlite(conn: Connection, v: _View) -> None:
    cols = ", ".join(v.columns)
    conn.execute(text(f"DELETE FROM {v.name}"))
    conn.execute(text(f"INSERT INTO {v.name} ({cols}) {v.select_sql}"))


# -- the operations view-refresh uses


def refresh_view(engine: Engine, name: str) -> None:
    """Refreshes ``name``: concurrently on PostgreSQL (a plain refresh the first time,
    when it was never populated), a rebuild in one transaction on SQLite."""
    v = _view(name)
    with engine.begin() as conn:
        _lock(conn, v.name)
        if _is_pg(conn):
            populated = conn.execute(
                text(
                    "SELECT ispopulated FROM pg_matviews "
                    "WHERE matviewname = :name AND schemaname = current_schema()"
                ),
                {"name": v.name},
            ).scalar()
            if populated is None:
                raise LookupError(f"materialized view {v.name} does not exist")
            concurrently = "CONCURRENTLY " if populated else ""
            conn.execute(text(f"REFRESH MATERIALIZED VIEW {concurrently}{v.name}"))
        else:
            _rebuild_sqlite(conn, v)


def view_health(engine: Engine, name: str) -> Health:
    """``ok``; ``missing`` (no object of that name); or ``broken``: something of that
    name exists but is not the right kind (a table or plain view on PostgreSQL), has
    the wrong columns, lacks the unique index, or cannot be queried."""
    v = _view(name)
    try:
        with engine.connect() as conn:
            if _is_pg(conn):
                return _pg_health(conn, v)
            return _sqlite_health(conn, v)
    except Exception:  # a catalog query that fails means we cannot trust the object
        return "broken"


def _pg_health(conn: Connection, v: _View) -> Health:
    row = conn.execute(
        text(
            "SELECT c.oid, c.relkind, m.ispopulated FROM pg_class c "
            "JOIN pg_namespace n ON n.oid = c.relnamespace "
            "LEFT JOIN pg_matviews m ON m.schemaname = n.nspname AND m.matviewname = c.relname "
            "WHERE c.relname = :name AND n.nspname = current_schema()"
        ),
        {"name": v.name},
    ).first()
    if row is None:
        return "missing"
    oid, relkind, populated = row
    if relkind != "m":
        return "broken"
    columns = conn.execute(
        text(
            "SELECT attname FROM pg_attribute WHERE attrelid = :oid AND attnum > 0 "
            "AND NOT attisdropped ORDER BY attnum"
        ),
        {"oid": oid},
    ).scalars()
    if list(columns) != v.columns:
        return "broken"
    keys = conn.execute(
        text(
            "SELECT array_agg(a.attname::text ORDER BY k.ord) FROM pg_index i "
            "CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord) "
            "JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum "
            "WHERE i.indrelid = :oid AND i.indisunique AND i.indisvalid "
            "AND i.indpred IS NULL AND i.indexprs IS NULL GROUP BY i.indexrelid"
        ),
        {"oid": oid},
    ).scalars()
    if not _has_key(keys, v.key):
        return "broken"
    if populated:
        conn.execute(text(f"SELECT * FROM {v.name} LIMIT 1")).all()
    return "ok"


def _sqlite_health(conn: Connection, v: _View) -> Health:
    kind = conn.execute(
        text("SELECT type FROM sqlite_master WHERE name = :name"), {"name": v.name}
    ).scalar()
    if kind is None:
        return "missing"
    if kind != "table":
        return "broken"
    columns = [r[1] for r in conn.execute(text(f"PRAGMA table_info({v.name})"))]
    if columns != v.columns:
        return "broken"
    keys = []
    for idx in conn.execute(text(f"PRAGMA index_list({v.name})")).mappings():
        if idx["unique"] and not idx["partial"]:
            info = conn.execute(text(f"PRAGMA index_info({idx['name']})")).all()
            keys.append([r[2] for r in sorted(info)])
    if not _has_key(keys, v.key):
        return "broken"
    conn.execute(text(f"SELECT * FROM {v.name} LIMIT 1")).all()
    return "ok"


def _has_key(indexes: Iterable[list[str] | None], key: list[str]) -> bool:
    return any(cols is not None and list(cols) == key for cols in indexes)


def recreate_view(engine: Engine, name: str) -> None:
    """Drops whatever is called ``name``, creates the view again and populates it."""
    v = _view(name)
    with engine.begin() as conn:
        _lock(conn, v.name)
        drop_view(conn, v.name)
        create_view(conn, v.name, populate=True)


def ensure_views(engine: Engine) -> dict[str, Health]:
    """Recreates every view that is not healthy; returns the health found before."""
    found: dict[str, Health] = {}
    for name in VIEW_NAMES:
        found[name] = view_health(engine, name)
        if found[name] != "ok":
            recreate_view(engine, name)
    return found

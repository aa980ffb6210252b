"""The read models become tables kept incrementally: ``latest_location`` and
``geofence_occupancy`` (materialized views on PostgreSQL until now) are plain tables
with the same names and columns, plus ``geofence_presence`` (latest event per tracker
and geofence) and ``view_changes`` (what changed since the last refresh). See
:mod:`schemas.views`.

Revision ID: 0006
Revises: 0007 (0002 on its branch; re-chained after merging main)
Create Date: 2026-12-02
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op
from sqlalchemy import text

from schemas import views

revision: str = "0006"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# the definitions this revision replaces (for downgrade)
_OLD_PG = {
    "latest_location": """
SELECT h.tracker_id AS tracker_id, t.name AS tracker_name, h.observed_at AS observed_at,
       h.lat AS lat, h.lon AS lon, h.accuracy_m AS accuracy_m, h.source AS source,
       h.city AS city, h.country_code AS country_code, h.country AS country,
       h.address AS address, h.geocoded_at AS geocoded_at, CURRENT_TIMESTAMP AS refreshed_at
FROM location_history h
JOIN trackers t ON t.external_id = h.tracker_id
WHERE h.observed_at = (
    SELECT MAX(h2.observed_at) FROM location_history h2 WHERE h2.tracker_id = h.tracker_id
)""",
    "geofence_occupancy": """
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
GROUP BY g.id, g.name, g.kind""",
}
_OLD_KEYS = {"latest_location": "tracker_id", "geofence_occupancy": "geofence_id"}


def upgrade() -> None:
    bind = op.get_bind()
    for name in views.VIEW_NAMES:
        views.drop_view(bind, name)
        views.create_view(bind, name, populate=True)


def downgrade() -> None:
    bind = op.get_bind()
    for name in views.VIEW_NAMES:
        views.drop_view(bind, name)
    views.drop_changes(bind)
    for name in views.VIEW_NAMES:
        if bind.dialect.name == "postgresql":
            bind.execute(text(f"CREATE MATERIALIZED VIEW {name} AS {_OLD_PG[name]} WITH DATA"))
            bind.execute(
                text(
                    f"CREATE UNIQUE INDEX uq_{name}_{_OLD_KEYS[name]} ON {name} ({_OLD_KEYS[name]})"
                )
            )
        else:  # SQLite: the same tables as now, filled once
            views.create_view(bind, name, populate=True)
            if name == "geofence_occupancy":
                bind.execute(text("DROP TABLE geofence_presence"))
    views.drop_changes(bind)

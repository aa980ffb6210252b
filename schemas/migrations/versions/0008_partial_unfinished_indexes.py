"""The reconciler's indexes cover only unfinished reports: ``(fetched_at, id) WHERE
geocoded_at IS NULL`` and ``(geocoded_at, id) WHERE geofence_checked_at IS NULL``.

The full indexes they replace took an entry for every report and a new one at each
stage's update (every update of an indexed column writes every index): 12 index
entries per report through the pipeline, now 9, and the two indexes hold only the
reports in flight.

Revision ID: 0008
Revises: 0006
Create Date: 2026-12-06
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

NOT_GEOCODED = sa.text("geocoded_at IS NULL")
NOT_CHECKED = sa.text("geofence_checked_at IS NULL")


def upgrade() -> None:
    op.create_index(
        "ix_location_history_not_geocoded",
        "location_history",
        ["fetched_at", "id"],
        postgresql_where=NOT_GEOCODED,
        sqlite_where=NOT_GEOCODED,
    )
    op.create_index(
        "ix_location_history_not_checked",
        "location_history",
        ["geocoded_at", "id"],
        postgresql_where=NOT_CHECKED,
        sqlite_where=NOT_CHECKED,
    )
    op.drop_index("ix_location_history_geocoded_at_fetched_at", "location_history")
    op.drop_index("ix_location_history_geofence_checked_at_geocoded_at", "location_history")


def downgrade() -> None:
    op.create_index(
        "ix_location_history_geocoded_at_fetched_at",
        "location_history",
        ["geocoded_at", "fetched_at"],
    )
    op.create_index(
        "ix_location_history_geofence_checked_at_geocoded_at",
        "location_history",
        ["geofence_checked_at", "geocoded_at"],
    )
    op.drop_index("ix_location_history_not_checked", "location_history")
    op.drop_index("ix_location_history_not_geocoded", "location_history")

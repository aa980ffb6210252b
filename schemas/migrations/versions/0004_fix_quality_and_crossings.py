"""Geofencing with position quality, hysteresis and crossings: each report's verdict
(``fix_status``: ok or why it was rejected) and the geofence state after it
(``fence_state``), and on each event the report that decided it (``report_at``; the
event's own ``observed_at`` is the estimated crossing time).

Revision ID: 0004
Revises: 0002
Create Date: 2026-12-02
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("location_history", sa.Column("fix_status", sa.String(16), nullable=True))
    op.add_column("location_history", sa.Column("fence_state", sa.Text(), nullable=True))
    op.add_column(
        "geofence_events", sa.Column("report_at", sa.DateTime(timezone=True), nullable=True)
    )
    op.execute("UPDATE geofence_events SET report_at = observed_at")
    op.create_index(
        "ix_geofence_events_tracker_id_report_at", "geofence_events", ["tracker_id", "report_at"]
    )


def downgrade() -> None:
    op.drop_index("ix_geofence_events_tracker_id_report_at", "geofence_events")
    with op.batch_alter_table("geofence_events") as batch:
        batch.drop_column("report_at")
    with op.batch_alter_table("location_history") as batch:
        batch.drop_column("fence_state")
        batch.drop_column("fix_status")

"""What the location source sent that is not a plain report: ``rejected_reports`` (a
record that cannot be stored as a location, kept raw with the reason) and
``tracker_source_stats`` (per tracker: late reports, reports later than the lateness
bound, rejected records, and the API's per-tracker error, if any).

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "rejected_reports",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("tracker_id", sa.String(128), nullable=True),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("source", sa.String(64), nullable=False),
        sa.Column("reason", sa.String(256), nullable=False),
        sa.Column("raw", sa.Text, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_rejected_reports"),
    )
    op.create_index(
        "ix_rejected_reports_tracker_id_received_at",
        "rejected_reports",
        ["tracker_id", "received_at"],
    )
    op.create_table(
        "tracker_source_stats",
        sa.Column("tracker_id", sa.String(128), nullable=False),
        sa.Column("late_reports", sa.Integer, nullable=False, server_default="0"),
        sa.Column("beyond_bound_reports", sa.Integer, nullable=False, server_default="0"),
        sa.Column("rejected_reports", sa.Integer, nullable=False, server_default="0"),
        sa.Column("error_code", sa.String(32), nullable=True),
        sa.Column("error_message", sa.Text, nullable=True),
        sa.Column("error_since", sa.DateTime(timezone=True), nullable=True),
        sa.Column("error_count", sa.Integer, nullable=False, server_default="0"),
        sa.Column("retry_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("tracker_id", name="pk_tracker_source_stats"),
        sa.ForeignKeyConstraint(
            ["tracker_id"],
            ["trackers.external_id"],
            ondelete="CASCADE",
            name="fk_tracker_source_stats_tracker_id_trackers",
        ),
    )


def downgrade() -> None:
    op.drop_table("tracker_source_stats")
    op.drop_index("ix_rejected_reports_tracker_id_received_at", "rejected_reports")
    op.drop_table("rejected_reports")

"""Reconciler bookkeeping on location_history: when a report was last re-published and
how often, so lost work is re-sent at most a few times, a grace period apart.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column(
        "location_history",
        sa.Column("republished_at", sa.DateTime(timezone=True), nullable=True),
    )
    op.add_column(
        "location_history",
        sa.Column("republish_count", sa.Integer(), server_default="0", nullable=False),
    )


def downgrade() -> None:
    with op.batch_alter_table("location_history") as batch:
        batch.drop_column("republish_count")
        batch.drop_column("republished_at")

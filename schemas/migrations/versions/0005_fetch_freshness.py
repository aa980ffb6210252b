"""Fetch bookkeeping on trackers: when a tracker was last fetched (the 12-hour
guarantee is measured on it), and which request last claimed it at fetch time (the
5-minute floor is enforced on it, see :mod:`schemas.schedule`).

``last_processed_at`` stays the scheduler's reservation. Existing trackers start with
``last_fetched_at`` = ``last_processed_at``, the best record of their last fetch.

Revision ID: 0005
Revises: 0002
Create Date: 2026-12-02
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("trackers", sa.Column("last_fetched_at", sa.DateTime(timezone=True)))
    op.add_column("trackers", sa.Column("fetch_claimed_at", sa.DateTime(timezone=True)))
    op.add_column("trackers", sa.Column("fetch_batch", sa.String(length=32)))
    op.execute("UPDATE trackers SET last_fetched_at = last_processed_at")


def downgrade() -> None:
    with op.batch_alter_table("trackers") as batch:
        batch.drop_column("fetch_batch")
        batch.drop_column("fetch_claimed_at")
        batch.drop_column("last_fetched_at")

"""Webhooks for the notify stage: subscriptions, per-(event, subscription) delivery
state, and the delivery log (one row per HTTP attempt).

Revision ID: 0007
Revises: 0002
Create Date: 2026-12-02
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _ts(name: str, nullable: bool = True, **kw: object) -> sa.Column:  # type: ignore[type-arg]
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable, **kw)  # type: ignore[arg-type]


def upgrade() -> None:
    op.create_table(
        "webhook_subscriptions",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("url", sa.String(2048), nullable=False),
        sa.Column("secret", sa.String(256), nullable=False),
        sa.Column("geofence_ids", sa.Text(), nullable=True),
        sa.Column("tracker_ids", sa.Text(), nullable=True),
        sa.Column("kinds", sa.String(16), nullable=False),
        sa.Column("description", sa.String(256), nullable=True),
        sa.Column("active", sa.Boolean(), server_default=sa.true(), nullable=False),
        _ts("created_at", nullable=False, server_default=sa.func.now()),
        sa.PrimaryKeyConstraint("id", name="pk_webhook_subscriptions"),
    )
    op.create_table(
        "webhook_deliveries",
        sa.Column("event_id", sa.String(400), nullable=False),
        sa.Column("subscription_id", sa.Integer(), nullable=False),
        sa.Column("tracker_id", sa.String(128), nullable=False),
        sa.Column("geofence_id", sa.Integer(), nullable=False),
        _ts("observed_at", nullable=False),
        sa.Column("kind", sa.String(8), nullable=False),
        sa.Column("state", sa.String(12), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        _ts("next_attempt_at"),
        _ts("lease_until"),
        sa.Column("lease_owner", sa.String(128), nullable=True),
        sa.Column("last_status", sa.Integer(), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        _ts("created_at", nullable=False),
        _ts("updated_at", nullable=False),
        _ts("delivered_at"),
        sa.CheckConstraint(
            "state IN ('pending', 'delivered', 'dead')", name="ck_webhook_deliveries_state"
        ),
        sa.ForeignKeyConstraint(
            ["subscription_id"],
            ["webhook_subscriptions.id"],
            name="fk_webhook_deliveries_subscription_id_webhook_subscriptions",
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("event_id", "subscription_id", name="pk_webhook_deliveries"),
    )
    op.create_index(
        "ix_webhook_deliveries_subscription_id_tracker_id_observed_at",
        "webhook_deliveries",
        ["subscription_id", "tracker_id", "observed_at"],
    )
    op.create_table(
        "webhook_attempts",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("event_id", sa.String(400), nullable=False),
        sa.Column("subscription_id", sa.Integer(), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("status", sa.Integer(), nullable=True),
        sa.Column("latency_ms", sa.Float(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        _ts("at", nullable=False),
        sa.ForeignKeyConstraint(
            ["subscription_id"],
            ["webhook_subscriptions.id"],
            name="fk_webhook_attempts_subscription_id_webhook_subscriptions",
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name="pk_webhook_attempts"),
    )
    op.create_index("ix_webhook_attempts_at", "webhook_attempts", ["at"])


def downgrade() -> None:
    op.drop_index("ix_webhook_attempts_at", table_name="webhook_attempts")
    op.drop_table("webhook_attempts")
    op.drop_index(
        "ix_webhook_deliveries_subscription_id_tracker_id_observed_at",
        table_name="webhook_deliveries",
    )
    op.drop_table("webhook_deliveries")
    op.drop_table("webhook_subscriptions")

"""Notify made real: a dead delivery remembers the dead letter that carried it (a
redrive is recognised by its message id, never by a newer entry id); a subscription
has a priority, an opt-in batch size, the SSRF guard's exceptions it was added with
and, when an endpoint said 410 Gone, the reason
it was disabled.

Secrets stay in ``webhook_subscriptions.secret`` (256 characters hold a Fernet token
of the longest secret); ``trackstream webhook rotate-key`` encrypts those still in
plain text.

Revision ID: 0010
Revises: 0008
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("webhook_deliveries") as t:
        t.add_column(sa.Column("lettered_at", sa.DateTime(timezone=True), nullable=True))
        t.add_column(sa.Column("lettered_msg", sa.String(64), nullable=True))
    with op.batch_alter_table("webhook_subscriptions") as t:
        t.add_column(
            sa.Column("priority", sa.Integer(), server_default=sa.text("0"), nullable=False)
        )
        t.add_column(
            sa.Column("batch_max", sa.Integer(), server_default=sa.text("1"), nullable=False)
        )
        t.add_column(sa.Column("disabled_reason", sa.Text(), nullable=True))
        # the SSRF guard's exceptions, given at `webhook add` (--allow-private, --allow-http)
        t.add_column(
            sa.Column("allow_private", sa.Boolean(), server_default=sa.false(), nullable=False)
        )
        t.add_column(
            sa.Column("allow_http", sa.Boolean(), server_default=sa.false(), nullable=False)
        )


def downgrade() -> None:
    with op.batch_alter_table("webhook_subscriptions") as t:
        t.drop_column("allow_http")
        t.drop_column("allow_private")
        t.drop_column("disabled_reason")
        t.drop_column("batch_max")
        t.drop_column("priority")
    with op.batch_alter_table("webhook_deliveries") as t:
        t.drop_column("lettered_msg")
        t.drop_column("lettered_at")

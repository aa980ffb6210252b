"""Each report's IANA time zone (``location_history.time_zone``), set by the geocode
stage from the zone boundaries (processors.geocoding.Zones); NULL for reports geocoded
before, or by a geocoder that gives none.

Revision ID: 0012
Revises: 0008
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0012"
down_revision: str | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("location_history", sa.Column("time_zone", sa.String(64), nullable=True))


def downgrade() -> None:
    op.drop_column("location_history", "time_zone")

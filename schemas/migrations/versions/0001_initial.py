"""Initial schema: trackers, location_history, geofences, geofence_events, and the views
latest_location and geofence_occupancy (materialized views on PostgreSQL, tables on SQLite).

Revision ID: 0001
Revises:
Create Date: 2026-03-01
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from schemas import views

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _ts(name: str, nullable: bool = True, **kw: object) -> sa.Column:  # type: ignore[type-arg]
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable, **kw)  # type: ignore[arg-type]


def upgrade() -> None:
    op.create_table(
        "trackers",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("external_id", sa.String(128), nullable=False),
        sa.Column("name", sa.String(256), nullable=False),
        sa.Column("active", sa.Boolean(), server_default=sa.true(), nullable=False),
        _ts("run_starts_at"),
        _ts("run_ends_at"),
        _ts("last_processed_at"),
        _ts("created_at", nullable=False, server_default=sa.func.now()),
        sa.PrimaryKeyConstraint("id", name="pk_trackers"),
        sa.UniqueConstraint("external_id", name="uq_trackers_external_id"),
    )
    op.create_index(
        "ix_trackers_active_last_processed_at", "trackers", ["active", "last_processed_at"]
    )

    op.create_table(
        "location_history",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("tracker_id", sa.String(128), nullable=False),
        _ts("observed_at", nullable=False),
        sa.Column("lat", sa.Float(), nullable=False),
        sa.Column("lon", sa.Float(), nullable=False),
        sa.Column("accuracy_m", sa.Float(), nullable=True),
        sa.Column("source", sa.String(64), nullable=False),
        _ts("fetched_at", nullable=False),
        sa.Column("city", sa.String(256), nullable=True),
        sa.Column("country_code", sa.String(8), nullable=True),
        sa.Column("country", sa.String(256), nullable=True),
        sa.Column("address", sa.Text(), nullable=True),
        _ts("geocoded_at"),
        _ts("geofence_checked_at"),
        sa.PrimaryKeyConstraint("id", name="pk_location_history"),
        sa.ForeignKeyConstraint(
            ["tracker_id"],
            ["trackers.external_id"],
            ondelete="CASCADE",
            name="fk_location_history_tracker_id_trackers",
        ),
        sa.UniqueConstraint(
            "tracker_id", "observed_at", name="uq_location_history_tracker_id_observed_at"
        ),
    )
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

    op.create_table(
        "geofences",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("name", sa.String(256), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("center_lat", sa.Float(), nullable=True),
        sa.Column("center_lon", sa.Float(), nullable=True),
        sa.Column("radius_m", sa.Float(), nullable=True),
        sa.Column("geometry_geojson", sa.Text(), nullable=True),
        sa.Column("active", sa.Boolean(), server_default=sa.true(), nullable=False),
        _ts("updated_at", nullable=False, server_default=sa.func.now()),
        sa.PrimaryKeyConstraint("id", name="pk_geofences"),
        sa.CheckConstraint("kind IN ('circle', 'polygon')", name=op.f("ck_geofences_kind")),
        sa.CheckConstraint(
            "kind <> 'circle' OR (center_lat IS NOT NULL AND center_lon IS NOT NULL "
            "AND radius_m > 0)",
            name=op.f("ck_geofences_circle"),
        ),
        sa.CheckConstraint(
            "kind <> 'polygon' OR geometry_geojson IS NOT NULL", name=op.f("ck_geofences_polygon")
        ),
    )

    op.create_table(
        "geofence_events",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("tracker_id", sa.String(128), nullable=False),
        sa.Column("geofence_id", sa.Integer(), nullable=False),
        _ts("observed_at", nullable=False),
        sa.Column("kind", sa.String(8), nullable=False),
        _ts("created_at", nullable=False, server_default=sa.func.now()),
        sa.PrimaryKeyConstraint("id", name="pk_geofence_events"),
        sa.ForeignKeyConstraint(
            ["tracker_id"],
            ["trackers.external_id"],
            ondelete="CASCADE",
            name="fk_geofence_events_tracker_id_trackers",
        ),
        sa.ForeignKeyConstraint(
            ["geofence_id"],
            ["geofences.id"],
            ondelete="CASCADE",
            name="fk_geofence_events_geofence_id_geofences",
        ),
        sa.UniqueConstraint(
            "tracker_id",
            "geofence_id",
            "observed_at",
            name="uq_geofence_events_tracker_id_geofence_id_observed_at",
        ),
        sa.CheckConstraint("kind IN ('enter', 'exit')", name=op.f("ck_geofence_events_kind")),
    )
    op.create_index(
        "ix_geofence_events_tracker_id_observed_at",
        "geofence_events",
        ["tracker_id", "observed_at"],
    )
    op.create_index(
        "ix_geofence_events_geofence_id_tracker_id_observed_at",
        "geofence_events",
        ["geofence_id", "tracker_id", "observed_at"],
    )

    # The views are defined once, in schemas.views (which view-refresh also uses to
    # recreate a missing or broken view). A change to a view definition gets a new
    # migration that calls views.drop_view + views.create_view.
    bind = op.get_bind()
    for name in views.VIEW_NAMES:
        views.drop_view(bind, name)
        views.create_view(bind, name, populate=True)


def downgrade() -> None:
    bind = op.get_bind()
    for name in views.VIEW_NAMES:
        views.drop_view(bind, name)
    op.drop_table("geofence_events")
    op.drop_table("geofences")
    op.drop_table("location_history")
    op.drop_table("trackers")

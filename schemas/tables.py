"""The tables (SQLAlchemy 2 declarative), portable between PostgreSQL and SQLite.

Timestamps are :class:`UTCDateTime`: ``timestamptz`` on PostgreSQL; on SQLite (which has
no timezone type) they are stored as naive UTC text in one fixed format, so they sort
and compare correctly as strings, and are returned timezone-aware (UTC) on both.

The read models ``latest_location`` and ``geofence_occupancy`` (tables kept
incrementally) live in
:mod:`schemas.views`.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    Boolean,
    CheckConstraint,
    DateTime,
    Dialect,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    false,
    func,
    text,
    true,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

__all__ = [
    "Base",
    "Geofence",
    "GeofenceEventRow",
    "LocationReport",
    "RejectedReport",
    "Tracker",
    "TrackerSourceStats",
    "UTCDateTime",
    "WebhookAttempt",
    "WebhookDelivery",
    "WebhookSubscription",
    "utcnow",
]

NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """An aware datetime in, an aware UTC datetime out, on every dialect.

    Naive datetimes are refused when bound: a naive value is ambiguous, and on SQLite it
    would silently compare against UTC text.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: Dialect) -> Any:
        if value is None:
            return None
        if not isinstance(value, datetime):
            raise TypeError(f"expected a datetime, got {type(value).__name__}")
        if value.utcoffset() is None:
            raise ValueError(f"naive datetime {value.isoformat()}: give a timezone-aware one")
        value = value.astimezone(UTC)
        if dialect.name == "sqlite":
            return value.replace(tzinfo=None)
        return value

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)  # type: ignore[no-any-return]
        return value.astimezone(UTC)  # type: ignore[no-any-return]

    @property
    def python_type(self) -> type[datetime]:
        return datetime


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)
    type_annotation_map = {datetime: UTCDateTime()}


class Tracker(Base):
    """A tracker; ``run_starts_at``/``run_ends_at`` bound its production run (NULL: open)."""

    __tablename__ = "trackers"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    external_id: Mapped[str] = mapped_column(String(128), unique=True)
    name: Mapped[str] = mapped_column(String(256))
    active: Mapped[bool] = mapped_column(Boolean, default=True, server_default=true())
    run_starts_at: Mapped[datetime | None]
    run_ends_at: Mapped[datetime | None]
    last_processed_at: Mapped[datetime | None]  # the scheduler's reservation
    # fetch bookkeeping (schemas.schedule): last successful fetch; last claim at fetch time
    last_fetched_at: Mapped[datetime | None]
    fetch_claimed_at: Mapped[datetime | None]
    fetch_batch: Mapped[str | None] = mapped_column(String(32))
    created_at: Mapped[datetime] = mapped_column(default=utcnow, server_default=func.now())

    __table_args__ = (
        # the scheduler's query: active trackers by last_processed_at
        Index("ix_trackers_active_last_processed_at", "active", "last_processed_at"),
    )

    def __repr__(self) -> str:
        return f"Tracker({self.external_id!r}, active={self.active})"


class LocationReport(Base):
    """One location report; its natural key is ``(tracker_id, observed_at)``."""

    __tablename__ = "location_history"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    tracker_id: Mapped[str] = mapped_column(
        String(128), ForeignKey("trackers.external_id", ondelete="CASCADE")
    )
    observed_at: Mapped[datetime]
    lat: Mapped[float] = mapped_column(Float)
    lon: Mapped[float] = mapped_column(Float)
    accuracy_m: Mapped[float | None] = mapped_column(Float)
    source: Mapped[str] = mapped_column(String(64))
    fetched_at: Mapped[datetime]
    city: Mapped[str | None] = mapped_column(String(256))
    country_code: Mapped[str | None] = mapped_column(String(8))
    country: Mapped[str | None] = mapped_column(String(256))
    address: Mapped[str | None] = mapped_column(Text)
    time_zone: Mapped[str | None] = mapped_column(String(64))  # IANA, from the geocoder
    geocoded_at: Mapped[datetime | None]
    geofence_checked_at: Mapped[datetime | None]
    # the reconciler's bookkeeping: last re-publish, and how many so far
    republished_at: Mapped[datetime | None]
    republish_count: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # the geofence stage's verdict ("ok" or why the fix was rejected) and the geofence
    # state after the report (processors.crossings.Carry); NULL: not evaluated yet
    fix_status: Mapped[str | None] = mapped_column(String(16))
    fence_state: Mapped[str | None] = mapped_column(Text)

    __table_args__ = (
        UniqueConstraint("tracker_id", "observed_at"),
        # the reconciler: reports not geocoded / not checked (partial: only those
        # in flight, and a stage's update removes its row from them)
        Index(
            "ix_location_history_not_geocoded",
            "fetched_at",
            "id",
            postgresql_where=text("geocoded_at IS NULL"),
            sqlite_where=text("geocoded_at IS NULL"),
        ),
        Index(
            "ix_location_history_not_checked",
            "geocoded_at",
            "id",
            postgresql_where=text("geofence_checked_at IS NULL"),
            sqlite_where=text("geofence_checked_at IS NULL"),
        ),
    )

    def __repr__(self) -> str:
        return f"LocationReport({self.tracker_id!r}, {self.observed_at.isoformat()})"


class RejectedReport(Base):
    """A record the location source sent that cannot be stored as a location (lat 95, a
    time without an offset, a string for a number, a tracker not asked for), kept raw
    (as JSON, at most ``RAW_MAX`` characters) with the reason."""

    __tablename__ = "rejected_reports"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    tracker_id: Mapped[str | None] = mapped_column(String(128))  # as sent, if it was a string
    received_at: Mapped[datetime]
    source: Mapped[str] = mapped_column(String(64))
    reason: Mapped[str] = mapped_column(String(256))
    raw: Mapped[str] = mapped_column(Text)

    __table_args__ = (
        Index("ix_rejected_reports_tracker_id_received_at", "tracker_id", "received_at"),
    )


class TrackerSourceStats(Base):
    """What the source did for one tracker beyond plain reports: late reports (observed
    before the tracker's cursor), reports later than the lateness bound, rejected
    records, and the API's current per-tracker error (``error_code`` NULL: none). A row
    exists only for a tracker that had any of these."""

    __tablename__ = "tracker_source_stats"

    tracker_id: Mapped[str] = mapped_column(
        String(128), ForeignKey("trackers.external_id", ondelete="CASCADE"), primary_key=True
    )
    late_reports: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    beyond_bound_reports: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    rejected_reports: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    error_code: Mapped[str | None] = mapped_column(String(32))
    error_message: Mapped[str | None] = mapped_column(Text)
    error_since: Mapped[datetime | None]  # first error of the current run of errors
    error_count: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    retry_at: Mapped[datetime | None]  # when the tracker is due again after the error
    updated_at: Mapped[datetime]


class Geofence(Base):
    """A circle (center + radius in metres) or a polygon (GeoJSON Polygon/MultiPolygon)."""

    __tablename__ = "geofences"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(256))
    kind: Mapped[str] = mapped_column(String(16))
    center_lat: Mapped[float | None] = mapped_column(Float)
    center_lon: Mapped[float | None] = mapped_column(Float)
    radius_m: Mapped[float | None] = mapped_column(Float)
    geometry_geojson: Mapped[str | None] = mapped_column(Text)
    active: Mapped[bool] = mapped_column(Boolean, default=True, server_default=true())
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, server_default=func.now())

    __table_args__ = (
        CheckConstraint("kind IN ('circle', 'polygon')", name="kind"),
        CheckConstraint(
            "kind <> 'circle' OR (center_lat IS NOT NULL AND center_lon IS NOT NULL "
            "AND radius_m > 0)",
            name="circle",
        ),
        CheckConstraint("kind <> 'polygon' OR geometry_geojson IS NOT NULL", name="polygon"),
    )

    def __repr__(self) -> str:
        return f"Geofence({self.id}, {self.name!r}, {self.kind})"


class GeofenceEventRow(Base):
    """A tracker entered or left a geofence at ``observed_at`` (a report's time, or the
    crossing time estimated between two reports)."""

    __tablename__ = "geofence_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    tracker_id: Mapped[str] = mapped_column(
        String(128), ForeignKey("trackers.external_id", ondelete="CASCADE")
    )
    geofence_id: Mapped[int] = mapped_column(ForeignKey("geofences.id", ondelete="CASCADE"))
    observed_at: Mapped[datetime]
    kind: Mapped[str] = mapped_column(String(8))
    created_at: Mapped[datetime] = mapped_column(default=utcnow, server_default=func.now())
    # the report whose check decided the event (observed_at is the crossing time)
    report_at: Mapped[datetime | None]

    __table_args__ = (
        UniqueConstraint("tracker_id", "geofence_id", "observed_at"),
        Index("ix_geofence_events_tracker_id_report_at", "tracker_id", "report_at"),
        CheckConstraint("kind IN ('enter', 'exit')", name="kind"),
        Index("ix_geofence_events_tracker_id_observed_at", "tracker_id", "observed_at"),
        # occupancy: latest event per (geofence, tracker)
        Index(
            "ix_geofence_events_geofence_id_tracker_id_observed_at",
            "geofence_id",
            "tracker_id",
            "observed_at",
        ),
    )

    def __repr__(self) -> str:
        return (
            f"GeofenceEventRow({self.tracker_id!r}, {self.geofence_id}, "
            f"{self.observed_at.isoformat()}, {self.kind})"
        )


# The old name, kept only because schemas/webhook_store.py (another branch's file) still
# imports it; the event is schemas.notify.GeofenceEvent. Drop it once that import is
# changed to GeofenceEventRow.
GeofenceEvent = GeofenceEventRow


# -- webhooks (the notify stage; queries in schemas.webhook_store)


class WebhookSubscription(Base):
    """An endpoint and the events it wants; NULL filters mean all. ``secret`` is the
    Standard Webhooks signing secret (``whsec_``+base64): never printed or logged."""

    __tablename__ = "webhook_subscriptions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    url: Mapped[str] = mapped_column(String(2048))
    secret: Mapped[str] = mapped_column(String(256))
    geofence_ids: Mapped[str | None] = mapped_column(Text)  # JSON list of ints
    tracker_ids: Mapped[str | None] = mapped_column(Text)  # JSON list of strings
    kinds: Mapped[str] = mapped_column(String(16), default="enter,exit")
    description: Mapped[str | None] = mapped_column(String(256))
    active: Mapped[bool] = mapped_column(Boolean, default=True, server_default=true())
    created_at: Mapped[datetime] = mapped_column(default=utcnow, server_default=func.now())
    priority: Mapped[int] = mapped_column(Integer, default=0, server_default="0")  # 1: high
    batch_max: Mapped[int] = mapped_column(Integer, default=1, server_default="1")
    disabled_reason: Mapped[str | None] = mapped_column(Text)  # e.g. the endpoint's 410
    allow_private: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    allow_http: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())

    def __repr__(self) -> str:  # no secret
        return f"WebhookSubscription({self.id}, {self.url!r}, active={self.active})"


class WebhookDelivery(Base):
    """One event to one subscription: pending until delivered or dead. The lease keeps
    two notify workers from sending it at once."""

    __tablename__ = "webhook_deliveries"

    event_id: Mapped[str] = mapped_column(String(400), primary_key=True)
    subscription_id: Mapped[int] = mapped_column(
        ForeignKey("webhook_subscriptions.id", ondelete="CASCADE"), primary_key=True
    )
    tracker_id: Mapped[str] = mapped_column(String(128))
    geofence_id: Mapped[int] = mapped_column(Integer)
    observed_at: Mapped[datetime]
    kind: Mapped[str] = mapped_column(String(8))
    state: Mapped[str] = mapped_column(String(12), default="pending")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime | None]
    lease_until: Mapped[datetime | None]
    lease_owner: Mapped[str | None] = mapped_column(String(128))
    last_status: Mapped[int | None] = mapped_column(Integer)
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)
    delivered_at: Mapped[datetime | None]
    # a dead delivery whose entry was dead-lettered: when, and the message id a
    # redrive of that letter carries (the only thing that starts it over)
    lettered_at: Mapped[datetime | None]
    lettered_msg: Mapped[str | None] = mapped_column(String(64))

    __table_args__ = (
        CheckConstraint("state IN ('pending', 'delivered', 'dead')", name="state"),
        # the order check: this subscription's deliveries of one tracker, by time
        Index(
            "ix_webhook_deliveries_subscription_id_tracker_id_observed_at",
            "subscription_id",
            "tracker_id",
            "observed_at",
        ),
    )


class WebhookAttempt(Base):
    """The delivery log: one row per HTTP attempt."""

    __tablename__ = "webhook_attempts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    event_id: Mapped[str] = mapped_column(String(400))
    subscription_id: Mapped[int] = mapped_column(
        ForeignKey("webhook_subscriptions.id", ondelete="CASCADE")
    )
    attempt: Mapped[int] = mapped_column(Integer)
    status: Mapped[int | None] = mapped_column(Integer)
    latency_ms: Mapped[float | None] = mapped_column(Float)
    error: Mapped[str | None] = mapped_column(Text)
    at: Mapped[datetime] = mapped_column(default=utcnow)

    __table_args__ = (Index("ix_webhook_attempts_at", "at"),)

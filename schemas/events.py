"""The payloads that travel between the stages (pydantic v2, serialised with orjson).

Every model is frozen, rejects unknown fields and carries the class variables ``TYPE``
(the envelope's ``type`` field) and ``VERSION`` (the payload schema version) that
:class:`streams.message.Codec` needs. Datetimes must carry a timezone (naive ones are
rejected) and are normalised to UTC. Tracker ids are the trackers' external ids
(``"SIM-00001"``).

A breaking change to a model bumps its ``VERSION`` and adds a classmethod
``upgrade(data: dict, from_version: int) -> dict`` so older entries still decode.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, ClassVar

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field

__all__ = [
    "ALL_EVENTS",
    "Event",
    "FetchRequested",
    "LocationGeocoded",
    "LocationReported",
    "UTCDateTime",
    "ViewsChanged",
]

MAX_BATCH_TRACKERS = 64


def _require_aware(value: object) -> object:
    if isinstance(value, datetime) and value.tzinfo is None:
        raise ValueError(
            f"datetime {value.isoformat()} has no timezone; give an aware datetime (e.g. UTC)"
        )
    return value


def _to_utc(value: datetime) -> datetime:
    if value.utcoffset() is None:  # parsed from a string without an offset
        raise ValueError(f"datetime {value.isoformat()} has no timezone")
    return value.astimezone(UTC)


UTCDateTime = Annotated[datetime, BeforeValidator(_require_aware), AfterValidator(_to_utc)]
"""A timezone-aware datetime, normalised to UTC; naive input is rejected."""

TrackerId = Annotated[str, Field(min_length=1, max_length=128)]
Latitude = Annotated[float, Field(ge=-90.0, le=90.0, allow_inf_nan=False)]
Longitude = Annotated[float, Field(ge=-180.0, le=180.0, allow_inf_nan=False)]


class Event(BaseModel):
    """Base of every payload: immutable, strict about unknown fields."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    TYPE: ClassVar[str]
    VERSION: ClassVar[int] = 1


class FetchRequested(Event):
    """The scheduler asks the fetch stage to fetch up to 64 trackers."""

    TYPE: ClassVar[str] = "fetch.requested"
    VERSION: ClassVar[int] = 1

    batch_id: Annotated[str, Field(min_length=1)]
    tracker_ids: Annotated[list[TrackerId], Field(min_length=1, max_length=MAX_BATCH_TRACKERS)]
    requested_at: UTCDateTime
    priority: bool = False


class LocationReported(Event):
    """A location report as returned by the location source and stored by fetch."""

    TYPE: ClassVar[str] = "location.reported"
    VERSION: ClassVar[int] = 1

    tracker_id: TrackerId
    observed_at: UTCDateTime
    lat: Latitude
    lon: Longitude
    accuracy_m: Annotated[float, Field(ge=0.0, allow_inf_nan=False)] | None = None
    source: Annotated[str, Field(min_length=1)]
    fetched_at: UTCDateTime


class LocationGeocoded(Event):
    """A stored report with its reverse-geocoded address."""

    TYPE: ClassVar[str] = "location.geocoded"
    VERSION: ClassVar[int] = 1

    tracker_id: TrackerId
    observed_at: UTCDateTime
    lat: Latitude
    lon: Longitude
    city: str | None = None
    country_code: str | None = None
    country: str | None = None
    address: str | None = None


class ViewsChanged(Event):
    """Data behind these views changed; view-refresh coalesces these notices."""

    TYPE: ClassVar[str] = "views.changed"
    VERSION: ClassVar[int] = 1

    views: list[Annotated[str, Field(min_length=1)]]
    changed_at: UTCDateTime
    tracker_ids: list[TrackerId] = Field(default_factory=list)


ALL_EVENTS: tuple[type[Event], ...] = (
    FetchRequested,
    LocationReported,
    LocationGeocoded,
    ViewsChanged,
)

"""The payloads that travel between the stages (pydantic v2, serialised with orjson).

Every model is frozen, rejects unknown fields and carries the class variables ``TYPE``
(the envelope's ``type`` field) and ``VERSION`` (the payload schema version) that
:class:`streams.message.Codec` needs. Datetimes must carry a timezone (naive ones are
rejected) and are normalised to UTC. Types are strict (no ``true`` as 1.0, no number
as a time); ids and names refuse control characters. Tracker ids are the trackers'
external ids (``"SIM-00001"``).

A breaking change to a model bumps its ``VERSION`` and adds a classmethod
``upgrade(data: dict, from_version: int) -> dict`` so older entries still decode.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Annotated, ClassVar

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

__all__ = [
    "ALL_EVENTS",
    "Event",
    "FetchRequested",
    "GeofenceId",
    "Identifier",
    "LocationGeocoded",
    "LocationReported",
    "Name",
    "TrackerId",
    "UTCDateTime",
    "ViewsChanged",
]

MAX_BATCH_TRACKERS = 64


def _utc_datetime(value: object) -> datetime:
    """An aware datetime, or an ISO-8601 string with an offset (the JSON the codec
    writes), as UTC. Numbers (Unix times), booleans and naive times are refused."""
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value)
        except ValueError:
            raise ValueError(
                f"{value!r} is not an ISO-8601 datetime (e.g. 2026-03-02T08:00:00Z)"
            ) from None
    elif not isinstance(value, datetime):
        raise ValueError(
            f"expected an ISO-8601 datetime string, not {type(value).__name__} {value!r}"
        )
    if value.utcoffset() is None:
        raise ValueError(
            f"datetime {value.isoformat()} has no timezone; give an aware datetime (e.g. UTC)"
        )
    try:
        return value.astimezone(UTC)
    except OverflowError:
        raise ValueError(f"datetime {value.isoformat()} is out of range in UTC") from None


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")  # Unicode category Cc: C0, DEL, C1


def _no_control_characters(value: object) -> object:
    if isinstance(value, str) and (bad := _CONTROL.search(value)):
        raise ValueError(f"must not contain control characters (found U+{ord(bad.group()):04X})")
    return value


UTCDateTime = Annotated[datetime, BeforeValidator(_utc_datetime)]
"""A timezone-aware datetime, normalised to UTC; naive times and numbers are rejected."""

Name = Annotated[str, Field(min_length=1, max_length=256), BeforeValidator(_no_control_characters)]
"""A non-empty display name without control characters (PostgreSQL refuses NUL)."""

Identifier = Annotated[
    str, Field(min_length=1, max_length=128), BeforeValidator(_no_control_characters)
]
"""An id: 1-128 characters, no control characters."""

TrackerId = Identifier
GeofenceId = Identifier
Source = Annotated[str, Field(min_length=1, max_length=64), BeforeValidator(_no_control_characters)]
AddressLine = Annotated[
    str, Field(min_length=1, max_length=2000), BeforeValidator(_no_control_characters)
]
Latitude = Annotated[float, Field(ge=-90.0, le=90.0, allow_inf_nan=False)]
Longitude = Annotated[float, Field(ge=-180.0, le=180.0, allow_inf_nan=False)]
CountryCode = Annotated[str, Field(pattern=r"^[A-Z]{2}$")]
# an IANA time zone name: "Europe/Paris", "America/Argentina/Buenos_Aires", "Etc/GMT+3"
TimeZoneName = Annotated[
    str, Field(pattern=r"^[A-Za-z][A-Za-z0-9_+\-]*(/[A-Za-z0-9_+\-]+)*$", max_length=64)
]


class Event(BaseModel):
    """Base of every payload: immutable, strict about unknown fields and types (no
    coercion: ``true`` is not a number, a number is not a time or a string)."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    TYPE: ClassVar[str]
    VERSION: ClassVar[int] = 1


class FetchRequested(Event):
    """The scheduler asks the fetch stage to fetch up to 64 trackers."""

    TYPE: ClassVar[str] = "fetch.requested"
    VERSION: ClassVar[int] = 1

    batch_id: Identifier
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
    source: Source
    fetched_at: UTCDateTime


class LocationGeocoded(Event):
    """A stored report with its reverse-geocoded address."""

    TYPE: ClassVar[str] = "location.geocoded"
    VERSION: ClassVar[int] = 1

    tracker_id: TrackerId
    observed_at: UTCDateTime
    lat: Latitude
    lon: Longitude
    city: Name | None = None
    country_code: CountryCode | None = None
    country: Name | None = None
    address: AddressLine | None = None
    region: Name | None = None  # state / province
    district: Name | None = None  # neighbourhood within the city
    time_zone: TimeZoneName | None = None  # IANA, where the report was


class ViewsChanged(Event):
    """Data behind these views changed; view-refresh coalesces these notices."""

    TYPE: ClassVar[str] = "views.changed"
    VERSION: ClassVar[int] = 1

    views: list[Name]
    changed_at: UTCDateTime
    tracker_ids: list[TrackerId] = Field(default_factory=list)


ALL_EVENTS: tuple[type[Event], ...] = (
    FetchRequested,
    LocationReported,
    LocationGeocoded,
    ViewsChanged,
)

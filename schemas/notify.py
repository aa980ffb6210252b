"""The notify stage's input: one geofence enter/exit event, and its natural key.

The geofence stage publishes a :class:`GeofenceEvent` for each event it writes. Its
:attr:`~GeofenceEvent.event_id` is the event's natural key (tracker, geofence,
observed_at, kind), so a redelivered report publishes the same ids, and the id doubles
as the ``webhook-id`` a receiver drops repeats by.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, ClassVar, Literal
from urllib.parse import quote

from pydantic import Field

from schemas.events import Event, TrackerId, UTCDateTime

__all__ = ["NOTIFY_EVENTS", "GeofenceEvent", "event_id"]


def event_id(tracker_id: str, geofence_id: int, observed_at: datetime, kind: str) -> str:
    """``gfe_{tracker}_{geofence}_{observed_at µs UTC}_{kind}``: header-safe ASCII (the
    tracker id is percent-encoded)."""
    stamp = observed_at.strftime("%Y%m%dT%H%M%S.%fZ")
    return f"gfe_{quote(tracker_id, safe='-.')}_{geofence_id}_{stamp}_{kind}"


class GeofenceEvent(Event):
    """A tracker entered or left a geofence at ``observed_at``."""

    TYPE: ClassVar[str] = "geofence.event"
    VERSION: ClassVar[int] = 1

    tracker_id: TrackerId
    geofence_id: Annotated[int, Field(ge=1)]
    observed_at: UTCDateTime
    kind: Literal["enter", "exit"]

    @property
    def event_id(self) -> str:
        return event_id(self.tracker_id, self.geofence_id, self.observed_at, self.kind)


NOTIFY_EVENTS: tuple[type[Event], ...] = (GeofenceEvent,)

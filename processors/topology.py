"""The pipeline's shape: stage names, their routes, the events between them.

::

    scheduler --FetchRequested--> [fetch] --LocationReported--> [geocode]
        --LocationGeocoded--> [geofence] --ViewsChanged--> [view-refresh]
                                         --GeofenceEvent--> [notify] --> webhooks

``fetch-now`` puts FetchRequested on fetch's priority lane. The scheduler's lock
lives under the ``scheduler`` tag.
"""

from __future__ import annotations

from streams.message import Codec
from streams.producer import Route

FETCH = "fetch"
GEOCODE = "geocode"
GEOFENCE = "geofence"
VIEW_REFRESH = "view-refresh"
NOTIFY = "notify"
SCHEDULER = "scheduler"
STAGES = (FETCH, GEOCODE, GEOFENCE, VIEW_REFRESH, NOTIFY)


def routes(prefix: str) -> dict[str, Route]:
    return {stage: Route(prefix, stage) for stage in (*STAGES, SCHEDULER)}


def codec(max_bytes: int = 512 * 1024) -> Codec:
    from schemas.events import ALL_EVENTS
    from schemas.notify import NOTIFY_EVENTS

    return Codec((*ALL_EVENTS, *NOTIFY_EVENTS), max_bytes=max_bytes)


def check_stage(name: str) -> str:
    """``name`` if it is a stage's stream (the runnable stages, their input events and
    factories: ``processors.pipeline.STAGES``)."""
    if name not in STAGES:
        raise ValueError(f"unknown stage {name!r}; stages are: {', '.join(STAGES)}")
    return name

"""The stage registry: every stream stage is registered with its input event, and a
stage that cannot handle anything is refused when it is built."""

from __future__ import annotations

from typing import Any

import pytest

from processors import topology
from processors.pipeline import STAGES
from processors.stage import BatchStage, SingleStage, StageRegistry, StageSpec
from processors.stages.fetch import FetchStage
from processors.stages.geofence import GeofenceStage
from schemas.events import FetchRequested, LocationGeocoded


def test_every_stream_stage_is_registered_in_pipeline_order():
    assert STAGES.names == topology.STAGES
    assert STAGES.get(topology.FETCH).input_type is FetchRequested
    assert STAGES.get(topology.GEOFENCE).input_type is LocationGeocoded
    with pytest.raises(ValueError, match="unknown stage 'nosuch'; stages are: fetch, geocode"):
        STAGES.get("nosuch")


def test_the_protocols_tell_single_from_batch_stages():
    fetch = FetchStage.__new__(FetchStage)
    geofence = GeofenceStage.__new__(GeofenceStage)
    assert isinstance(fetch, SingleStage) and not isinstance(fetch, BatchStage)
    assert isinstance(geofence, BatchStage) and not isinstance(geofence, SingleStage)


def test_a_stage_without_a_handler_is_refused():
    class Inert:
        pass

    class Batch:
        async def handle_batch(self, msgs: Any, ctx: Any) -> None:
            return None

    registry: StageRegistry[None] = StageRegistry(
        [StageSpec("inert", object, lambda _: Inert()), StageSpec("b", object, lambda _: Batch())]
    )
    with pytest.raises(TypeError, match="neither handle"):
        registry.build("inert", None)
    assert isinstance(registry.build("b", None), Batch)

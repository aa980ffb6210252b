"""The event payloads: validation, immutability, and the round trip through the codec."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import orjson
import pytest
from pydantic import ValidationError

from schemas.events import (
    ALL_EVENTS,
    FetchRequested,
    LocationGeocoded,
    LocationReported,
    ViewsChanged,
)
from streams.message import Codec

T0 = datetime(2026, 3, 2, 8, 0, tzinfo=UTC)


def reported(**changes: object) -> LocationReported:
    data: dict[str, object] = {
        "tracker_id": "SIM-00001",
        "observed_at": T0,
        "lat": 51.9,
        "lon": 4.4,
        "accuracy_m": 12.5,
        "source": "simulated",
        "fetched_at": T0 + timedelta(seconds=3),
    }
    data.update(changes)
    return LocationReported(**data)  # type: ignore[arg-type]


SAMPLES = [
    FetchRequested(batch_id="b1", tracker_ids=["SIM-00001", "SIM-00002"], requested_at=T0),
    reported(),
    LocationGeocoded(
        tracker_id="SIM-00001",
        observed_at=T0,
        lat=51.9,
        lon=4.4,
        city="Rotterdam",
        country_code="NL",
        country="Netherlands",
        address=None,
    ),
    ViewsChanged(views=["latest_location"], changed_at=T0, tracker_ids=["SIM-00001"]),
]


def test_every_event_has_type_and_version() -> None:
    assert len({m.TYPE for m in ALL_EVENTS}) == len(ALL_EVENTS) == 4
    assert all(m.VERSION == 1 for m in ALL_EVENTS)
    assert {type(s) for s in SAMPLES} == set(ALL_EVENTS)


@pytest.mark.parametrize("event", SAMPLES, ids=lambda e: type(e).__name__)
def test_round_trip_through_json_and_codec(event: object) -> None:
    cls = type(event)
    assert cls.model_validate_json(event.model_dump_json()) == event  # type: ignore[attr-defined]
    codec = Codec(ALL_EVENTS)
    envelope = codec.decode(codec.encode(event))  # type: ignore[arg-type]
    assert envelope.type == cls.TYPE  # type: ignore[attr-defined]
    assert envelope.payload == event


@pytest.mark.parametrize("event", SAMPLES, ids=lambda e: type(e).__name__)
def test_frozen(event: object) -> None:
    name = next(iter(type(event).model_fields))  # type: ignore[attr-defined]
    with pytest.raises(ValidationError, match="frozen"):
        setattr(event, name, "other")


@pytest.mark.parametrize("event", SAMPLES, ids=lambda e: type(e).__name__)
def test_extra_fields_rejected(event: object) -> None:
    data = event.model_dump()  # type: ignore[attr-defined]
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        type(event).model_validate({**data, "surprise": 1})  # type: ignore[attr-defined]


def test_fetch_batch_size_limits() -> None:
    ids = [f"SIM-{i:05d}" for i in range(64)]
    assert len(FetchRequested(batch_id="b", tracker_ids=ids, requested_at=T0).tracker_ids) == 64
    with pytest.raises(ValidationError, match="at most 64"):
        FetchRequested(batch_id="b", tracker_ids=[*ids, "SIM-99999"], requested_at=T0)
    with pytest.raises(ValidationError, match="at least 1"):
        FetchRequested(batch_id="b", tracker_ids=[], requested_at=T0)
    with pytest.raises(ValidationError, match="at least 1 character"):
        FetchRequested(batch_id="b", tracker_ids=["SIM-1", ""], requested_at=T0)


def test_naive_datetime_rejected() -> None:
    with pytest.raises(ValidationError, match="has no timezone"):
        reported(observed_at=datetime(2026, 3, 2, 8, 0))
    with pytest.raises(ValidationError, match="has no timezone"):
        LocationReported.model_validate_json(
            reported().model_dump_json().replace('"2026-03-02T08:00:00Z"', '"2026-03-02T08:00:00"')
        )


def test_datetimes_normalised_to_utc() -> None:
    cest = timezone(timedelta(hours=2))
    r = reported(observed_at=datetime(2026, 3, 2, 10, 0, tzinfo=cest))
    assert r.observed_at == T0
    assert r.observed_at.utcoffset() == timedelta(0)
    assert r.observed_at.tzinfo is UTC


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("lat", 90.5),
        ("lat", -91),
        ("lon", 180.1),
        ("lon", -181),
        ("lat", float("nan")),
        ("accuracy_m", -1.0),
    ],
)
def test_coordinates_out_of_range_rejected(field: str, value: float) -> None:
    with pytest.raises(ValidationError, match=field):
        reported(**{field: value})


def test_optional_fields_default() -> None:
    r = reported(accuracy_m=None)
    assert r.accuracy_m is None
    g = LocationGeocoded(tracker_id="SIM-1", observed_at=T0, lat=0, lon=0)
    assert (g.city, g.country_code, g.country, g.address) == (None, None, None, None)
    v = ViewsChanged(views=["latest_location"], changed_at=T0)
    assert v.tracker_ids == []
    assert FetchRequested(batch_id="b", tracker_ids=["x"], requested_at=T0).priority is False


# --- strict payloads -----------------------------------------------------------------

GOOD_JSON = reported().model_dump(mode="json")


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("lat", True, "valid number"),
        ("lon", False, "valid number"),
        ("lat", "51.9", "valid number"),
        ("accuracy_m", True, "valid number"),
        ("observed_at", 12.5, "ISO-8601"),
        ("observed_at", 1_772_438_400, "ISO-8601"),
        ("observed_at", True, "ISO-8601"),
        ("observed_at", "12.5", "ISO-8601"),
        ("observed_at", "1772438400", "ISO-8601"),
        ("observed_at", "yesterday", "ISO-8601"),
        ("observed_at", "2026-03-02", "no timezone"),
        ("fetched_at", "0001-01-01T00:00:00+01:00", "out of range in UTC"),
        ("fetched_at", "9999-12-31T23:30:00-01:00", "out of range in UTC"),
        ("tracker_id", 17, "valid string"),
        ("tracker_id", "SIM-\x0000001", "control characters"),
        ("tracker_id", "SIM-00001\n", "control characters"),
        ("tracker_id", "SIM\x7f", "control characters"),
        ("tracker_id", "SIM\x85", "control characters"),
        ("tracker_id", "x" * 129, "at most 128"),
        ("source", "sim\x00", "control characters"),
        ("source", "s" * 65, "at most 64"),
    ],
)
def test_no_lenient_coercion(field: str, value: object, message: str) -> None:
    """Each rejected form, from Python objects and from JSON (how the codec reads it)."""
    data = {**GOOD_JSON, field: value}
    with pytest.raises(ValidationError, match=message):
        LocationReported.model_validate(data)
    with pytest.raises(ValidationError, match=message):
        LocationReported.model_validate_json(orjson.dumps(data))


def test_overflowing_aware_datetime_is_a_validation_error() -> None:
    early = datetime(1, 1, 1, 0, 30, tzinfo=timezone(timedelta(hours=1)))
    with pytest.raises(ValidationError, match="out of range in UTC"):
        reported(observed_at=early)


def test_the_codecs_own_forms_still_validate() -> None:
    r = reported(observed_at="2026-03-02T10:00:00+02:00", lat=52, lon=-4)  # ints are numbers
    assert r.observed_at == T0 and r.lat == 52.0 and isinstance(r.lat, float)
    codec = Codec(ALL_EVENTS)
    assert codec.decode(codec.encode(r)).payload == r
    assert reported(observed_at="2026-03-02T08:00:00.000001Z").observed_at.microsecond == 1


def test_ids_names_and_flags_are_strict() -> None:
    with pytest.raises(ValidationError, match="control characters"):
        FetchRequested(batch_id="b", tracker_ids=["SIM-1", "SIM-\x002"], requested_at=T0)
    with pytest.raises(ValidationError, match="control characters"):
        FetchRequested(batch_id="b\t1", tracker_ids=["SIM-1"], requested_at=T0)
    with pytest.raises(ValidationError, match="valid boolean"):
        FetchRequested.model_validate(
            {"batch_id": "b", "tracker_ids": ["x"], "requested_at": T0, "priority": 1}
        )
    with pytest.raises(ValidationError, match="control characters"):
        ViewsChanged(views=["latest_location"], changed_at=T0, tracker_ids=["a\x00"])
    with pytest.raises(ValidationError, match="control characters"):
        ViewsChanged(views=["latest\x00location"], changed_at=T0)
    geo = {"tracker_id": "SIM-1", "observed_at": T0, "lat": 0.0, "lon": 0.0}
    for field, value, message in [
        ("city", "Rotter\x00dam", "control characters"),
        ("address", "Coolsingel\x00", "control characters"),
        ("region", "South\nHolland", "control characters"),
        ("district", "", "at least 1 character"),
        ("country_code", "nl", "pattern"),
        ("country_code", "NLD", "pattern"),
        ("city", 5, "valid string"),
    ]:
        with pytest.raises(ValidationError, match=message):
            LocationGeocoded.model_validate({**geo, field: value})
    g = LocationGeocoded.model_validate({**geo, "region": "Zuid-Holland", "district": "Centrum"})
    assert (g.region, g.district) == ("Zuid-Holland", "Centrum")

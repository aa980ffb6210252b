"""Pure logic of the runtime: no server needed."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from streams.connection import redact
from streams.errors import ConfigError, DecodeError, MessageTooLarge, PayloadInvalid
from streams.keys import StageKeys, shard_for
from streams.message import Codec
from streams.parse import id_before, normalize_id
from streams.replay import to_id
from streams.settings import StreamSettings
from tests.support import Ping


def test_keys_of_a_stage_share_one_hash_tag():
    k = StageKeys("ts", "work")
    assert k.stream == "ts:{work}:stream"
    assert k.dlq == "ts:{work}:dlq"
    assert all("{work}" in key for key in (k.priority, k.heartbeats, k.lease("a"), k.lock("x")))
    shard = StageKeys("ts", "work", 2, 4)
    assert shard.stream == "ts:{work.2}:stream" and shard.group == "work"
    # placed stages (the key map): another tag, the same group
    geocode = StageKeys("ts", "geocode", 1, 2)
    assert geocode.stream == "ts:{geocode@2.1}:stream" and geocode.group == "geocode"
    assert StageKeys("ts", "geofence").dlq == "ts:{geofence@3}:dlq"


@pytest.mark.parametrize("bad", ["", "Upper", "has space", "a{b}", "x" * 41, "1starts"])
def test_bad_stage_names_are_refused(bad):
    with pytest.raises(ValueError, match="stage"):
        StageKeys("ts", bad)


def test_shard_is_stable_and_spreads():
    assert shard_for("tracker-1", 8) == shard_for("tracker-1", 8)
    assert len({shard_for(f"t{i}", 8) for i in range(200)}) == 8
    with pytest.raises(ValueError, match="outside"):
        StageKeys("ts", "a", 3, 3)


@pytest.mark.parametrize(
    ("values", "named"),
    [
        ({"block_ms": 0}, "TRACKSTREAM_BLOCK_MS"),
        ({"max_deliveries": "many"}, "TRACKSTREAM_MAX_DELIVERIES"),
        ({"claim_idle_ms": 10, "handler_timeout_ms": 100}, "TRACKSTREAM_CLAIM_IDLE_MS"),
        ({"redis_url": "http://x"}, "TRACKSTREAM_REDIS_URL"),
        ({"prefix": "Bad Prefix"}, "TRACKSTREAM_PREFIX"),
    ],
)
def test_bad_settings_name_the_setting(values, named):
    with pytest.raises(ConfigError) as err:
        StreamSettings.build(**values)
    assert named in str(err.value)


def test_settings_are_frozen_and_read_from_the_environment(monkeypatch):
    monkeypatch.setenv("TRACKSTREAM_BATCH_SIZE", "7")
    s = StreamSettings.build()
    assert s.batch_size == 7
    with pytest.raises(Exception, match="frozen"):
        s.batch_size = 8  # type: ignore[misc]
    monkeypatch.setenv("TRACKSTREAM_BATCH_SIZE", "-1")
    with pytest.raises(ConfigError, match="TRACKSTREAM_BATCH_SIZE"):
        StreamSettings.build()


def test_codec_round_trip_and_envelope():
    codec = Codec([Ping])
    fields = codec.encode(Ping(n=3), trace="tr-1")
    env = codec.decode(fields)
    assert env.payload == Ping(n=3)
    assert (env.type, env.version, env.attempt, env.trace) == ("test.ping", 1, 0, "tr-1")
    assert env.produced_ms > 0
    ids = {codec.decode(codec.encode(Ping(n=i))).msg_id for i in range(1000)}
    assert len(ids) == 1000 and env.msg_id not in ids, "every message gets its own id"


def test_codec_errors_are_typed():
    codec = Codec([Ping])
    good = codec.encode(Ping(n=1))
    with pytest.raises(DecodeError, match="missing"):
        codec.decode({b"data": b"{}"})
    with pytest.raises(DecodeError, match="newer"):
        codec.decode({**good, b"v": b"9"})
    with pytest.raises(DecodeError, match="not JSON"):
        codec.decode({**good, b"data": b"{"})
    with pytest.raises(PayloadInvalid, match="n"):
        codec.decode({**good, b"data": b'{"n": "x"}'})
    with pytest.raises(MessageTooLarge, match="max_message_bytes"):
        Codec([Ping], max_bytes=5).encode(Ping(n=123456))


def test_ids_and_times():
    assert normalize_id("5") == "5-0" and normalize_id("5-3") == "5-3"
    with pytest.raises(ValueError, match="not a stream id"):
        normalize_id("yesterday")
    assert id_before("5-3") == "5-2"
    assert id_before("5-0") == "4-18446744073709551615"
    t = datetime(2026, 1, 1, tzinfo=UTC)
    assert to_id(t) == f"{int(t.timestamp() * 1000)}-0"
    assert to_id(t.astimezone(timezone(timedelta(hours=2)))) == to_id(t)
    with pytest.raises(ValueError, match="timezone"):
        to_id(datetime(2026, 1, 1))


def test_redact_hides_passwords():
    assert redact("redis://user:secret@h:6380/0") == "redis://user:***@h:6380/0"
    assert redact("rediss://:pw@h/0") == "rediss://:***@h/0"
    assert redact("redis://h:1/0") == "redis://h:1/0"

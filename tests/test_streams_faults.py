"""The one classifier of Redis errors (streams.faults), on the exceptions redis-py
raises for the replies and failures seen in clusters (pure logic: the fault tests in
test_cluster_faults.py and test_bounded_io.py produce them for real)."""

from __future__ import annotations

import pytest
from redis import exceptions as rex

from streams.connection import _stream_keys, translate
from streams.errors import GroupMissing, RedisUnavailable
from streams.faults import classify

CASES = [
    # (exception, kind, reason)
    (rex.ResponseError("UNBLOCKED force unblock from blocking operation, instance state "
                       "changed (master -> replica?)"), "transient", "unblocked"),
    (rex.ResponseError("UNBLOCKED the stream key no longer exists"), "transient", "unblocked"),
    (rex.ClusterDownError("CLUSTERDOWN The cluster is down"), "transient", "clusterdown"),
    (rex.ResponseError("CLUSTERDOWN Hash slot not served"), "transient", "clusterdown"),
    (rex.TryAgainError("TRYAGAIN Multiple keys request during rehashing"), "transient", "tryagain"),
    (rex.MovedError("3999 127.0.0.1:6381"), "transient", "moved"),
    (rex.AskError("3999 127.0.0.1:6381"), "transient", "moved"),
    (rex.ClusterError("TTL exhausted."), "transient", "redirects"),
    (rex.BusyLoadingError("LOADING Redis is loading the dataset"), "transient", "loading"),
    (rex.ReadOnlyError("READONLY You can't write against a read only replica."), "transient",
     "readonly"),
    (rex.MasterDownError("MASTERDOWN Link with MASTER is down"), "transient", "masterdown"),
    (rex.SlotNotCoveredError('Slot "5" is not covered by the cluster.'), "transient",
     "slot-not-covered"),
    (rex.RedisClusterException("Redis Cluster cannot be connected."), "transient", "cluster"),
    (rex.ConnectionError("Connection reset by peer"), "transient", "connection"),
    (ConnectionResetError(104, "Connection reset by peer"), "transient", "connection"),
    (rex.TimeoutError("Timeout reading from socket"), "transient", "timeout"),
    (rex.InvalidResponse("Protocol Error: b'H'"), "transient", "protocol"),
    (rex.ResponseError("NOGROUP No such key 'x' or consumer group 'g'"), "group-missing",
     "nogroup"),
    (GroupMissing("s", "g"), "group-missing", "nogroup"),
    (rex.ResponseError("WRONGTYPE Operation against a key holding the wrong kind of value"),
     "bug", "reply-wrongtype"),
    (rex.ResponseError("CROSSSLOT Keys in request don't hash to the same slot"), "bug",
     "reply-crossslot"),
    (rex.RedisClusterException("XREADGROUP: keys in different slots"), "bug", "crossslot"),
    (ValueError("a bug of ours"), "bug", "ValueError"),
]  # fmt: skip


@pytest.mark.parametrize(("exc", "kind", "reason"), CASES, ids=lambda v: str(v)[:40])
def test_every_error_seen_is_sorted(exc, kind, reason):
    verdict = classify(exc)
    assert (verdict.kind, verdict.reason) == (kind, reason)


def test_an_attribute_error_inside_the_driver_is_transient_elsewhere_a_bug():
    import redis.asyncio.connection as driver

    text = "raise AttributeError(\"'NoneType' object has no attribute 'writelines'\")"
    for filename, kind in ((driver.__file__, "transient"), (__file__, "bug")):
        try:
            exec(compile(text, filename, "exec"))  # a frame "in" that file
        except AttributeError as exc:
            assert classify(exc).kind == kind, filename


def test_translate_maps_by_the_classifier():
    with pytest.raises(RedisUnavailable, match="CLUSTERDOWN"), translate("redis://u:pw@h:1/0"):
        raise rex.ClusterDownError("CLUSTERDOWN The cluster is down")
    with pytest.raises(RedisUnavailable, match=r"u:\*\*\*@h"), translate("redis://u:pw@h:1/0"):
        raise rex.ResponseError("UNBLOCKED the stream key no longer exists")
    with pytest.raises(GroupMissing), translate("redis://h:1/0", "s", "g"):
        raise rex.ResponseError("NOGROUP No such key")
    with pytest.raises(rex.ResponseError, match="WRONGTYPE"), translate("redis://h:1/0"):
        raise rex.ResponseError("WRONGTYPE Operation against a key")


def test_stream_keys_of_xreadgroup_and_xread_are_read_locally():
    args = ("GROUP", "streams", "c1", "COUNT", 10, "BLOCK", 100, "STREAMS", "a", "b", ">", ">")
    assert _stream_keys("XREADGROUP", args) == ["a", "b"]
    assert _stream_keys("XREAD", ("COUNT", 1, "STREAMS", "k", "0")) == ["k"]
    assert _stream_keys("XADD", ("k", "*", "f", "v")) == []

"""The operator commands (status, replay, dlq, consumers, trim) end to end: the CLI in
process (typer's CliRunner) against a real standalone Redis and a real cluster.

The commands call ``asyncio.run`` themselves, so these tests are plain functions and
set up their data with ``asyncio.run`` of small coroutines."""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import pytest
from typer.testing import CliRunner

from ops.cli import app
from ops.commands.status import Sample, Thresholds, _view
from ops.timeparse import MAX_SEQ, parse_position
from streams.connection import Client, connect
from streams.errors import Reject
from streams.message import Codec
from streams.monitor import StageStatus
from streams.parse import entry_ms
from streams.producer import Producer, Route
from streams.worker import Worker
from tests.servers import free_port
from tests.support import Ping, fast_settings

STAGE = "geocode"
CODEC = Codec([Ping])
BORDERS = str.maketrans(dict.fromkeys("│╭╮╰╯─", " "))


def cli(target: Any, prefix: str, *args: str, input: str | None = None, **env: str) -> Any:
    flags = ["--redis-url", target.url, "--cluster" if target.cluster else "--no-cluster"]
    result = CliRunner().invoke(
        app,
        [*flags, "--prefix", prefix, *args],
        input=input,
        env={"TRACKSTREAM_CONNECT_RETRIES": "1", **env},
    )
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


def flat(text: str) -> str:
    """Output with rich's line wrapping and error-panel borders undone."""
    return " ".join(text.translate(BORDERS).split())


def redis(target: Any, prefix: str, fn: Callable[[Client], Awaitable[Any]]) -> Any:
    async def main() -> Any:
        client = connect(fast_settings(target, prefix))
        try:
            return await fn(client)
        finally:
            await client.aclose()

    return asyncio.run(main())


def publish(target: Any, prefix: str, numbers: range | list[int]) -> list[str]:
    async def go(client: Client) -> list[str]:
        route = Route(prefix, STAGE)
        return await Producer(client, CODEC).publish(route, [Ping(n=n) for n in numbers])

    return redis(target, prefix, go)


def keys(prefix: str) -> Any:
    return Route(prefix, STAGE).keys()


def stream_numbers(target: Any, prefix: str) -> list[int]:
    async def go(client: Client) -> list[int]:
        raw = await client.xrange(keys(prefix).stream)
        return [CODEC.decode(fields).payload.n for _, fields in raw]

    return redis(target, prefix, go)


def read_some(target: Any, prefix: str, consumer: str, count: int, ack: int) -> list[str]:
    """Create the group at 0, deliver ``count`` entries to ``consumer``, ack ``ack``."""

    async def go(client: Client) -> list[str]:
        k = keys(prefix)
        await client.xgroup_create(k.stream, k.group, id="0", mkstream=True)
        raw = await client.xreadgroup(k.group, consumer, {k.stream: ">"}, count=count)
        items = raw.items() if isinstance(raw, dict) else raw
        ids = [i.decode() for _, entries in items for i, _ in entries]
        if ack:
            await client.xack(k.stream, k.group, *ids[:ack])
        return ids

    return redis(target, prefix, go)


def dead_letter(target: Any, prefix: str, numbers: list[int], poison: set[int]) -> None:
    """Publish ``numbers`` and run the stage once: the ``poison`` ones are dead-lettered."""
    publish(target, prefix, numbers)

    async def handle(msg: Any, ctx: Any) -> None:
        if msg.payload.n in poison:
            raise Reject(f"tracker {msg.payload.n} is [not] known")

    async def go(client: Client) -> None:
        settings = fast_settings(target, prefix)
        await Worker(client, settings, Route(prefix, STAGE), CODEC, handler=handle).run(burst=True)

    redis(target, prefix, go)


# ---------------------------------------------------------------------------- status


def test_status_json_numbers_and_health_exit_codes(redis_target, unique_prefix):
    publish(redis_target, unique_prefix, range(10))
    read_some(redis_target, unique_prefix, "c1", count=6, ack=4)
    k = keys(unique_prefix)
    now_ms = time.time_ns() // 1_000_000
    redis(redis_target, unique_prefix, lambda c: c.hset(k.heartbeats, "c1", now_ms))

    result = cli(redis_target, unique_prefix, "status", "--json", "--no-require-consumers")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["healthy"] is True and report["breaches"] == []
    assert report["prefix"] == unique_prefix and report["cluster"] == redis_target.cluster
    assert [s["stage"] for s in report["stages"]] == [
        "fetch",
        "geocode",
        "geofence",
        "view-refresh",
        "notify",
    ]
    stages = {s["stage"]: s for s in report["stages"]}
    geo = stages[STAGE]
    assert (geo["length"], geo["lag"], geo["pending"], geo["dead_letters"]) == (10, 4, 2, 0)
    assert geo["stream_exists"] and geo["group_exists"] and geo["lag_exact"]
    assert geo["oldest_pending_age_ms"] is not None and geo["oldest_pending_age_ms"] >= 0
    assert geo["throughput_per_s"] is None  # one sample: no rate
    (consumer,) = geo["consumers"]
    assert consumer["name"] == "c1" and consumer["pending"] == 2 and consumer["alive"] is True
    assert consumer["heartbeat_age_ms"] is not None and consumer["idle_ms"] >= 0
    assert geo["live_consumers"] == 1
    assert {s["stream"] for s in geo["streams"]} == {k.stream, k.priority}
    # a stage nobody has published to yet is reported, not a crash
    fetch = stages["fetch"]
    assert (fetch["stream_exists"], fetch["group_exists"], fetch["length"]) == (False, False, 0)
    assert fetch["consumers"] == [] and fetch["throughput_per_s"] is None

    # thresholds: lag 4 breaches --max-lag 0 but not --max-lag 4
    result = cli(redis_target, unique_prefix, "status", "--no-require-consumers", "--max-lag", "0")
    assert result.exit_code == 1
    assert "geocode: lag 4 > 0" in flat(result.stderr)
    ok = cli(redis_target, unique_prefix, "status", "--no-require-consumers", "--max-lag", "4")
    assert ok.exit_code == 0, ok.output
    assert "geocode" in ok.stdout and "c1" in ok.stdout
    result = cli(
        redis_target,
        unique_prefix,
        "status",
        "--json",
        "--no-require-consumers",
        "--max-pending-age-s",
        "0",
    )
    assert result.exit_code == 1
    assert json.loads(result.stdout)["breaches"][0].startswith("geocode: oldest pending entry")
    # consumers are required by default: the other stages have none alive
    result = cli(redis_target, unique_prefix, "status", "--json")
    assert result.exit_code == 1
    breaches = json.loads(result.stdout)["breaches"]
    assert "fetch: no live consumer" in breaches
    assert not any(b.startswith("geocode") for b in breaches)

    # a window gives a rate (nothing moved: 0 for a stage with a group, - for the others)
    result = cli(
        redis_target,
        unique_prefix,
        "status",
        "--json",
        "--no-require-consumers",
        "--interval",
        "0.1",
    )
    stages = {s["stage"]: s for s in json.loads(result.stdout)["stages"]}
    assert stages[STAGE]["throughput_per_s"] == 0 and stages["fetch"]["throughput_per_s"] is None
    # --watch --json: one JSON document per refresh
    result = cli(
        redis_target,
        unique_prefix,
        "status",
        "--watch",
        "--json",
        "--count",
        "2",
        "--interval",
        "0.05",
        "--no-require-consumers",
    )
    assert result.exit_code == 0, result.output
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 2 and all(json.loads(line)["healthy"] for line in lines)
    # --watch into a pipe: every frame is printed, 80 columns show every header whole
    args = ("status", "--watch", "--count", "3", "--interval", "0.05", "--no-require-consumers")
    result = cli(redis_target, unique_prefix, *args, COLUMNS="80")
    assert result.exit_code == 0, result.output
    headers = [line.split() for line in result.stdout.splitlines() if "acked/s" in line]
    assert (
        headers
        == [["stage", "state", "length", "lag", "pending", "oldest", "live", "dlq", "acked/s"]] * 3
    )
    assert max(len(line) for line in result.stdout.splitlines()) <= 80


def test_dlq_list_is_readable_at_80_columns(redis_target, unique_prefix):
    dead_letter(redis_target, unique_prefix, [1, 2], poison={1, 2})
    result = cli(redis_target, unique_prefix, "dlq", "list", STAGE, COLUMNS="80")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert max(len(line) for line in lines) <= 80 and "…" not in "".join(lines[:4])
    assert flat(result.stdout).count("tracker 1 is [not] known") == 1
    assert "ping · failed" in result.stdout


# ---------------------------------------------------------------------------- replay


def test_replay_dry_run_copy_by_id_and_time_and_rewind(redis_target, unique_prefix):
    first = publish(redis_target, unique_prefix, range(5))
    while time.time_ns() // 1_000_000 <= entry_ms(first[-1]):  # the next ms: distinct ids
        time.sleep(0.001)
    second = publish(redis_target, unique_prefix, range(5, 10))
    ids = first + second
    assert entry_ms(first[-1]) < entry_ms(second[0])

    result = cli(
        redis_target, unique_prefix, "replay", STAGE, "--from", ids[3], "--to", ids[6], "--dry-run"
    )
    assert result.exit_code == 0, result.output
    assert "dry run: 4 entries" in flat(result.stdout)
    assert len(stream_numbers(redis_target, unique_prefix)) == 10

    # declined: nothing happens
    result = cli(redis_target, unique_prefix, "replay", STAGE, "--from", ids[3], input="n\n")
    assert result.exit_code == 1
    assert len(stream_numbers(redis_target, unique_prefix)) == 10

    result = cli(
        redis_target, unique_prefix, "replay", STAGE, "--from", ids[3], "--to", ids[6], "--yes"
    )
    assert result.exit_code == 0, result.output
    assert "replayed 4 entries" in flat(result.stdout)
    assert stream_numbers(redis_target, unique_prefix) == [*range(10), 3, 4, 5, 6]

    # by time: the second batch, from its first millisecond through its last one
    def iso(entry_id: str) -> str:
        return datetime.fromtimestamp(entry_ms(entry_id) / 1000, UTC).isoformat()

    result = cli(
        redis_target,
        unique_prefix,
        "replay",
        STAGE,
        "--from",
        iso(second[0]),
        "--to",
        iso(second[-1]),
        "--yes",
    )
    assert result.exit_code == 0, result.output
    assert stream_numbers(redis_target, unique_prefix) == [*range(10), 3, 4, 5, 6, *range(5, 10)]

    # rewind: the group goes back to just before --from
    read_some(redis_target, unique_prefix, "c1", count=100, ack=100)
    result = cli(
        redis_target, unique_prefix, "replay", STAGE, "--from", ids[8], "--mode", "rewind", "-y"
    )
    assert result.exit_code == 0, result.output
    assert "11 entries will be delivered again" in flat(result.stdout)

    async def group_position(client: Client) -> str:
        (group,) = await client.xinfo_groups(keys(unique_prefix).stream)
        return group["last-delivered-id"].decode()

    ms, seq = ids[8].split("-")
    expected = f"{ms}-{int(seq) - 1}" if int(seq) else f"{int(ms) - 1}-18446744073709551615"
    assert redis(redis_target, unique_prefix, group_position) == expected


def test_replay_to_a_bare_millisecond_takes_all_of_it_and_skips_dead_letters(
    redis_target, unique_prefix
):
    async def add(client: Client) -> None:
        for i in range(30):  # 30 entries in one millisecond, then one in the next
            await client.xadd(keys(unique_prefix).stream, CODEC.encode(Ping(n=i)), id=f"5000-{i}")
        await client.xadd(keys(unique_prefix).stream, CODEC.encode(Ping(n=99)), id="5001-0")

    redis(redis_target, unique_prefix, add)
    args = ("replay", STAGE, "--from", "5000", "--to", "5000")
    result = cli(redis_target, unique_prefix, *args, "--dry-run")
    assert result.exit_code == 0, result.output
    assert "dry run: 30 entries" in flat(result.stdout)

    dead_letter(redis_target, unique_prefix, [], poison={3, 7})  # the stage runs once
    result = cli(redis_target, unique_prefix, *args, "--dry-run")
    assert "dry run: 28 entries" in flat(result.stdout)
    assert "2 dead-lettered entries in the range are skipped" in flat(result.stdout)
    result = cli(redis_target, unique_prefix, *args, "--yes")
    assert result.exit_code == 0, result.output
    assert "replayed 28 entries" in flat(result.stdout)
    copied = stream_numbers(redis_target, unique_prefix)[31:]
    assert copied == [n for n in range(30) if n not in (3, 7)]


def test_replay_rejects_bad_positions(redis_target, unique_prefix):
    for args, name in [
        (["--from", "12x"], "--from"),
        (["--from", "2024-05-01T10:00:00"], "--from"),  # no timezone
        (["--from", "0", "--to", "yesterday-ish"], "--to"),
        (["--from", "200", "--to", "100"], "--to"),
        (["--from", "0", "--to", "5", "--mode", "rewind"], "--to"),
    ]:
        result = cli(redis_target, unique_prefix, "replay", STAGE, *args)
        assert result.exit_code == 2, (args, result.output)
        assert name in result.output


# ---------------------------------------------------------------------------- dead letters


def test_dlq_list_show_redrive_once_and_purge_confirmation(redis_target, unique_prefix):
    dead_letter(redis_target, unique_prefix, [1, 2, 3], poison={2})

    result = cli(redis_target, unique_prefix, "dlq", "list", STAGE, "--json")
    assert result.exit_code == 0, result.output
    (letter,) = json.loads(result.stdout)
    assert letter["category"] == "handler" and letter["attempts"] == 1
    assert "[not] known" in letter["error"] and letter["origin"] == keys(unique_prefix).stream
    assert json.loads(letter["fields"]["data"]) == {"n": 2}
    table = cli(redis_target, unique_prefix, "dlq", "list", STAGE)
    assert table.exit_code == 0 and letter["id"] in table.stdout and "handler" in table.stdout
    other = cli(redis_target, unique_prefix, "dlq", "list", STAGE, "--category", "decode", "--json")
    assert json.loads(other.stdout) == []
    bad = cli(redis_target, unique_prefix, "dlq", "list", STAGE, "--category", "oops")
    assert bad.exit_code == 2 and "max-deliveries" in flat(bad.output)

    shown = cli(redis_target, unique_prefix, "dlq", "show", STAGE, letter["id"])
    assert shown.exit_code == 0, shown.output
    assert "[not] known" in shown.stdout and letter["origin_id"] in shown.stdout
    as_json = cli(redis_target, unique_prefix, "dlq", "show", STAGE, letter["id"], "--json")
    assert json.loads(as_json.stdout)["id"] == letter["id"]
    missing = cli(redis_target, unique_prefix, "dlq", "show", STAGE, "1-1")
    assert missing.exit_code == 1 and "no dead letter 1-1" in flat(missing.stderr)
    assert cli(redis_target, unique_prefix, "dlq", "show", STAGE, "x-1").exit_code == 2
    huge = cli(redis_target, unique_prefix, "dlq", "show", STAGE, "99999999999999999999-1")
    assert huge.exit_code == 2 and "at most 18446744073709551615" in flat(huge.output)

    # redrive needs ids or --all; declining changes nothing
    assert cli(redis_target, unique_prefix, "dlq", "redrive", STAGE).exit_code == 2
    no = cli(redis_target, unique_prefix, "dlq", "redrive", STAGE, letter["id"], input="n\n")
    assert no.exit_code == 1 and stream_numbers(redis_target, unique_prefix) == [1, 2, 3]
    assert "declined: nothing done" in no.output and "error" not in no.output

    result = cli(redis_target, unique_prefix, "dlq", "redrive", STAGE, letter["id"], "--yes")
    assert result.exit_code == 0, result.output
    assert "redriven 1" in result.stdout
    again = cli(redis_target, unique_prefix, "dlq", "redrive", STAGE, letter["id"], "--yes")
    assert again.exit_code == 1
    assert stream_numbers(redis_target, unique_prefix) == [1, 2, 3, 2]  # back exactly once
    result = cli(redis_target, unique_prefix, "dlq", "list", STAGE, "--json")
    assert json.loads(result.stdout) == []

    # purge asks first: "n" purges nothing, --yes purges
    dead_letter(redis_target, unique_prefix, [4, 5], poison={4, 5})
    assert (
        len(json.loads(cli(redis_target, unique_prefix, "dlq", "list", STAGE, "--json").stdout))
        == 2
    )
    result = cli(redis_target, unique_prefix, "dlq", "purge", STAGE, "--all", input="n\n")
    assert result.exit_code == 1
    assert "Permanently delete 2 dead letter(s)" in flat(result.output)
    assert (
        len(json.loads(cli(redis_target, unique_prefix, "dlq", "list", STAGE, "--json").stdout))
        == 2
    )
    result = cli(redis_target, unique_prefix, "dlq", "purge", STAGE, "--all", "--yes")
    assert result.exit_code == 0 and "purged 2" in result.stdout
    assert json.loads(cli(redis_target, unique_prefix, "dlq", "list", STAGE, "--json").stdout) == []


# ---------------------------------------------------------------------------- consumers, trim


def test_consumers_lists_and_removes_only_dead_ones(redis_target, unique_prefix):
    env = {"TRACKSTREAM_CONSUMER_DEAD_AFTER_MS": "200", "TRACKSTREAM_HEARTBEAT_INTERVAL_MS": "50"}
    publish(redis_target, unique_prefix, range(3))
    read_some(redis_target, unique_prefix, "busy", count=2, ack=0)  # pending, no heartbeat
    k = keys(unique_prefix)

    async def more(client: Client) -> None:
        await client.xgroup_createconsumer(k.stream, k.group, "ghost")
        await client.xgroup_createconsumer(k.stream, k.group, "alive")

    redis(redis_target, unique_prefix, more)

    async def idle_ms(client: Client) -> list[int]:
        return [int(c["idle"]) for c in await client.xinfo_consumers(k.stream, k.group)]

    deadline = time.monotonic() + 10
    while min(redis(redis_target, unique_prefix, idle_ms)) <= 250:  # idle past dead_after
        assert time.monotonic() < deadline, "consumers never went idle"
        time.sleep(0.02)
    # a heartbeat stamped a minute ahead stays fresh however slow the CLI calls below
    # are (consumer_dead_after_ms is 200 here, so a real "now" would go stale mid-test)
    beat_ms = time.time_ns() // 1_000_000 + 60_000
    redis(redis_target, unique_prefix, lambda c: c.hset(k.heartbeats, "alive", beat_ms))

    result = cli(redis_target, unique_prefix, "consumers", STAGE, "--json", **env)
    assert result.exit_code == 0, result.output
    rows = {r["name"]: r for r in json.loads(result.stdout)}
    assert set(rows) == {"alive", "busy", "ghost"}
    assert rows["alive"]["alive"] and not rows["alive"]["dead"]
    assert rows["busy"]["pending"] == 2 and not rows["busy"]["alive"] and not rows["busy"]["dead"]
    assert rows["ghost"]["dead"]

    result = cli(redis_target, unique_prefix, "consumers", STAGE, "--remove-dead", "--yes", **env)
    assert result.exit_code == 0, result.output
    assert "removed 1 dead consumer(s): ghost" in flat(result.stdout)

    async def names(client: Client) -> set[str]:
        return {c["name"].decode() for c in await client.xinfo_consumers(k.stream, k.group)}

    assert redis(redis_target, unique_prefix, names) == {"alive", "busy"}


def test_trim_removes_only_acknowledged_entries(redis_target, unique_prefix):
    publish(redis_target, unique_prefix, range(10))
    read_some(redis_target, unique_prefix, "c1", count=6, ack=3)  # 3..5 pending, 6..9 new

    result = cli(redis_target, unique_prefix, "trim", STAGE, "--dry-run")
    assert result.exit_code == 0, result.output
    assert "would remove 3 entries" in flat(result.stdout)
    assert len(stream_numbers(redis_target, unique_prefix)) == 10
    result = cli(redis_target, unique_prefix, "trim", STAGE)
    assert result.exit_code == 0, result.output
    assert "removed 3 entries" in flat(result.stdout)
    assert stream_numbers(redis_target, unique_prefix) == list(range(3, 10))
    # a stage without streams is fine
    assert cli(redis_target, unique_prefix, "trim", "fetch").exit_code == 0


# ---------------------------------------------------------------------------- units


def test_positions_accept_ids_times_dates_and_durations():
    now = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
    ms = int(now.timestamp() * 1000)
    assert parse_position("17") == "17-0" and parse_position("17-3") == "17-3"
    assert parse_position("17", end=True) == f"17-{MAX_SEQ}"
    assert parse_position("17-3", end=True) == "17-3"
    assert parse_position("-") == "-" and parse_position("+", end=True) == "+"
    assert parse_position("2024-05-01T12:00:00Z") == f"{ms}-0"
    assert parse_position("2024-05-01T14:00+02:00", end=True) == f"{ms}-{MAX_SEQ}"
    assert parse_position("2024-05-01") == f"{ms - 12 * 3600_000}-0"
    assert parse_position("15m", now=now) == f"{ms - 15 * 60_000}-0"
    assert parse_position("2h ago", now=now) == f"{ms - 2 * 3600_000}-0"
    for bad in ("12x", "2024-05-01T12:00", "soon", "1-2-3"):
        with pytest.raises(ValueError, match=re.escape(repr(bad))):
            parse_position(bad)


def test_acked_count_is_known_when_the_priority_lane_never_had_an_entry(
    redis_target, unique_prefix
):
    from ops.commands.status import _acked

    publish(redis_target, unique_prefix, range(5))
    read_some(redis_target, unique_prefix, "c1", count=5, ack=3)

    async def go(client: Client) -> int | None:
        k = keys(unique_prefix)
        await client.xgroup_create(k.priority, k.group, id="0", mkstream=True)
        return await _acked(client, k)

    assert redis(redis_target, unique_prefix, go) == 3


def test_throughput_is_the_acked_rate_between_two_samples():
    status = StageStatus(STAGE, 0, STAGE, [])
    limits = Thresholds(None, None, False, 1_000)
    k = keys("tp")
    before, after = Sample(k, status, 10, 100.0), Sample(k, status, 30, 102.0)
    assert _view(after, before, limits).throughput == 10.0
    assert _view(after, None, limits).throughput is None
    assert _view(after, Sample(k, status, None, 100.0), limits).throughput is None
    assert _view(before, after, limits).throughput is None  # counter went back: group recreated


# ---------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "args",
    [
        ["replay", "nope", "--from", "0"],
        ["dlq", "list", "nope"],
        ["dlq", "redrive", "nope", "--all"],
        ["consumers", "nope"],
        ["trim", "nope"],
    ],
)
def test_unknown_stage_is_a_usage_error_listing_the_stages(standalone_target, unique_prefix, args):
    result = cli(standalone_target, unique_prefix, *args)
    assert result.exit_code == 2
    assert "fetch, geocode, geofence, view-refresh" in flat(result.output)


@pytest.mark.parametrize("cluster", [False, True], ids=["standalone", "cluster"])
@pytest.mark.parametrize("args", [["status", "--json"], ["dlq", "list", STAGE]])
def test_unreachable_redis_exits_3_without_the_password(cluster, args):
    port = free_port()

    class Target:
        url = f"redis://user:secret@127.0.0.1:{port}"

    Target.cluster = cluster  # type: ignore[attr-defined]
    result = cli(Target, "tx", *args, TRACKSTREAM_CONNECT_RETRIES="0")
    assert result.exit_code == 3, result.output
    text = flat(result.output)
    assert f"redis://user:***@127.0.0.1:{port}" in text and "unavailable" in text
    assert "secret" not in result.output


def _flaky_stage_status(monkeypatch: pytest.MonkeyPatch, failures: int) -> Counter[str]:
    """Each stage's first ``failures`` samples fail as a dropped connection does."""
    import ops.commands.status as status_cmd
    from streams.errors import RedisUnavailable

    real = status_cmd.stage_status
    calls: Counter[str] = Counter()

    async def flaky(client: Any, keys: Any, url: str) -> Any:
        calls[keys.stage] += 1
        if calls[keys.stage] <= failures:
            raise RedisUnavailable("redis://127.0.0.1:1", ConnectionError("Connection lost"))
        return await real(client, keys, url)

    monkeypatch.setattr(status_cmd, "stage_status", flaky)
    return calls


def test_status_retries_a_transient_fault(standalone_target, unique_prefix, monkeypatch):
    """A sample only reads: a dropped connection is tried again (three times), not an
    exit 3."""
    calls = _flaky_stage_status(monkeypatch, failures=3)
    result = cli(standalone_target, unique_prefix, "status", "--json", "--no-require-consumers")
    assert result.exit_code == 0, result.output
    assert len(json.loads(result.stdout)["stages"]) == 5
    assert set(calls.values()) == {4}
    _flaky_stage_status(monkeypatch, failures=4)
    result = cli(standalone_target, unique_prefix, "status", "--json", "--no-require-consumers")
    assert result.exit_code == 3 and "Connection lost" in result.output


def test_status_watch_rides_out_refreshes_that_fail(standalone_target, unique_prefix, monkeypatch):
    """Every attempt of the first refresh fails: the watch says so and goes on; the
    second refresh reports. With no refresh at all reaching Redis it exits 3."""
    _flaky_stage_status(monkeypatch, failures=4)
    args = ["status", "--watch", "--json", "--count", "2", "--interval", "0.05"]
    result = cli(standalone_target, unique_prefix, *args, "--no-require-consumers")
    assert result.exit_code == 0, result.output
    assert "Connection lost" in result.stderr
    assert len([line for line in result.stdout.splitlines() if line.startswith("{")]) == 1
    _flaky_stage_status(monkeypatch, failures=10**6)
    result = cli(standalone_target, unique_prefix, *args, "--no-require-consumers")
    assert result.exit_code == 3, result.output


def test_help_paragraphs_are_not_cut_mid_sentence():
    result = CliRunner().invoke(app, ["status", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    assert "threshold, so it doubles as a health check." in result.output

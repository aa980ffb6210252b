"""``status``'s health from lag age, dead letters, drain rate and the database
(thresholds in ops/commands/_health.py): never "ok" for a stage that is behind."""

from __future__ import annotations

import json
import time
from typing import Any

from streams.keys import StageKeys
from tests.servers import free_port
from tests.test_cli_admin import cli, flat, redis

ARGS = ("status", "--no-require-consumers", "--no-database")


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _add(target: Any, prefix: str, stage: str, ages_ms: list[int], *, dlq: bool = False) -> None:
    """Entries (or dead letters) with ids that make them ``ages_ms`` old; the stage's
    group exists at 0, so every entry is undelivered."""
    k = StageKeys(prefix, stage)

    async def go(client: Any) -> None:
        now = _now_ms()
        stream = k.dlq if dlq else k.stream
        for i, age in enumerate(sorted(ages_ms, reverse=True)):
            await client.xadd(stream, {"n": str(i)}, id=f"{now - age}-{i}")
        if not dlq:
            await client.xgroup_create(k.stream, k.group, id="0")

    redis(target, prefix, go)


def _stage(report: dict[str, Any], stage: str) -> dict[str, Any]:
    return next(s for s in report["stages"] if s["stage"] == stage)


def test_a_stage_44_minutes_behind_is_a_breach_not_ok(standalone_target, unique_prefix):
    _add(standalone_target, unique_prefix, "notify", [44 * 60_000, 60_000])
    result = cli(standalone_target, unique_prefix, *ARGS, "--json")
    assert result.exit_code == 1
    report = json.loads(result.stdout)
    notify = _stage(report, "notify")
    assert notify["state"] == "breach" and not report["healthy"]
    assert 44 * 60_000 <= notify["lag_age_ms"] < 45 * 60_000
    assert "notify: behind by 44m00s (its oldest unfinished entry) > 300s" in report["breaches"]
    table = cli(standalone_target, unique_prefix, *ARGS)
    row = next(ln for ln in table.stdout.splitlines() if ln.strip().startswith("notify"))
    assert "BREACH" in row and " ok " not in row + " "
    # the threshold is an option; 0 turns it off
    relaxed = cli(standalone_target, unique_prefix, *ARGS, "--max-lag-age-s", "3600")
    assert relaxed.exit_code == 0
    assert cli(standalone_target, unique_prefix, *ARGS, "--max-lag-age-s", "0").exit_code == 0


def test_dead_letters_old_few_ok_recent_warn_many_breach(standalone_target, unique_prefix):
    day = 24 * 3_600_000
    _add(standalone_target, unique_prefix, "geocode", [3 * day, 2 * day, day], dlq=True)
    report = json.loads(cli(standalone_target, unique_prefix, *ARGS, "--json").stdout)
    geocode = _stage(report, "geocode")
    assert geocode["dead_letters"] == 3 and geocode["warnings"] == []
    assert geocode["newest_dead_letter_age_ms"] >= day
    _add(standalone_target, unique_prefix, "geocode", [5_000], dlq=True)
    result = cli(standalone_target, unique_prefix, *ARGS)
    assert result.exit_code == 0  # a warning, not a breach
    text = flat(result.stdout)
    assert "warning: geocode: 4 dead letter(s), the newest" in text
    row = next(ln for ln in result.stdout.splitlines() if ln.strip().startswith("geocode"))
    assert " warn " in row
    result = cli(standalone_target, unique_prefix, *ARGS, "--max-dead-letters", "3")
    assert result.exit_code == 1 and "geocode: 4 dead letters > 3" in flat(result.stderr)


def test_a_backlog_that_cannot_drain_at_the_configured_rate(standalone_target, unique_prefix):
    # 115 entries a minute over the last five minutes; notify drains 20/min
    ages = [int(i * 290_000 / 575) + 500 for i in range(575)]
    _add(standalone_target, unique_prefix, "notify", ages)
    result = cli(
        standalone_target,
        unique_prefix,
        *ARGS,
        "--max-lag-age-s",
        "0",
        "--json",
        TRACKSTREAM_NOTIFY_RATE_PER_MIN="20",
    )
    assert result.exit_code == 1
    notify = _stage(json.loads(result.stdout), "notify")
    assert notify["arrivals_per_min"] == 115.0 and notify["capacity_per_min"] == 20.0
    assert notify["breaches"] == [
        "notify: falls behind by 95/min (115/min arriving, drains at most 20/min by "
        "notify_rate_per_min)"
    ]
    # a faster configured rate drains it: no breach
    ok = cli(
        standalone_target,
        unique_prefix,
        *ARGS,
        "--max-lag-age-s",
        "0",
        TRACKSTREAM_NOTIFY_RATE_PER_MIN="200",
    )
    assert ok.exit_code == 0, ok.output


def test_status_with_the_database_down_is_not_healthy(standalone_target, unique_prefix):
    url = f"postgresql+psycopg://nobody:x@127.0.0.1:{free_port()}/none"
    args = ("status", "--no-require-consumers", "--json")
    result = cli(standalone_target, unique_prefix, *args, TRACKSTREAM_DATABASE_URL=url)
    assert result.exit_code == 1
    report = json.loads(result.stdout)
    assert report["healthy"] is False
    (breach,) = [b for b in report["breaches"] if b.startswith("database:")]
    assert "unavailable" in breach and "\n" not in breach

"""What makes a stage unhealthy in ``status`` (and the console's card colours), with
the default thresholds the README documents:

- **behind**: the oldest entry its group has not finished (undelivered, or pending) is
  older than ``max_lag_age_s`` (300 s): a breach;
- **dead letters**: more than ``max_dead_letters`` (100) in its dead-letter stream is a
  breach; fewer, with one newer than ``RECENT_DEAD_S`` (1 h), a warning (not "ok");
  a few old ones are history, not a state;
- **cannot drain**: a backlog while entries arrive faster (over the last
  ``ARRIVAL_WINDOW_S``) than the stage's configured rate lets it finish them (fetch:
  ``source_rate_per_s``, notify: ``notify_rate_per_min`` per endpoint): a breach
  saying by how much it falls behind.
"""

from __future__ import annotations

from dataclasses import dataclass

from processors import topology
from processors.config import AppSettings
from streams.connection import Client
from streams.keys import StageKeys
from streams.monitor import StageStatus
from streams.parse import entry_ms, parse_entries

MAX_LAG_AGE_S = 300.0
MAX_DEAD_LETTERS = 100
RECENT_DEAD_S = 3600.0
ARRIVAL_WINDOW_S = 300
ARRIVAL_COUNT_CAP = 100_000


@dataclass(frozen=True, slots=True)
class Health:
    lag_age_ms: int | None  # the oldest unfinished entry's age; None when caught up
    newest_dead_letter_age_ms: int | None
    arrivals_per_min: float | None  # over ARRIVAL_WINDOW_S; None when not measured
    capacity_per_min: float | None  # what the configured rate lets it finish


def capacity_per_min(stage: str, app: AppSettings | None) -> tuple[float, str] | None:
    """Entries per minute the stage can finish at most, by its configured rate."""
    if app is None:
        return None
    if stage == topology.FETCH:
        return app.source_rate_per_s * 60, "source_rate_per_s"
    if stage == topology.NOTIFY:
        return app.notify_rate_per_min, "notify_rate_per_min"
    return None


async def _first_after(client: Client, stream: str, after: str) -> str | None:
    entries = parse_entries(await client.xrange(stream, min=after, max="+", count=1))
    return entries[0][0] if entries else None


async def _arrivals(client: Client, stream: str, now_ms: int) -> int:
    n, cursor = 0, f"{now_ms - ARRIVAL_WINDOW_S * 1000}-0"
    while n < ARRIVAL_COUNT_CAP:
        entries = parse_entries(await client.xrange(stream, min=cursor, max="+", count=1000))
        n += len(entries)
        if len(entries) < 1000:
            break
        cursor = "(" + entries[-1][0]
    return n


async def health(
    client: Client, keys: StageKeys, status: StageStatus, now_ms: int, app: AppSettings | None
) -> Health:
    oldest: int | None = None
    for s in status.streams:
        candidates = []
        if s.oldest_pending_id is not None:
            candidates.append(entry_ms(s.oldest_pending_id))
        if not s.group_exists and s.length:
            first = await _first_after(client, s.stream, "-")
        elif s.lag and s.last_delivered_id is not None:
            first = await _first_after(client, s.stream, "(" + s.last_delivered_id)
        else:
            first = None
        if first is not None:
            candidates.append(entry_ms(first))
        for ms in candidates:
            oldest = ms if oldest is None else min(oldest, ms)
    dead = None
    if status.dead_letters:
        newest = parse_entries(await client.xrevrange(keys.dlq, count=1))
        dead = max(0, now_ms - entry_ms(newest[0][0])) if newest else None
    arrivals = capacity = None
    cap = capacity_per_min(keys.stage, app)
    if cap is not None and oldest is not None:  # only a stage with a backlog
        added = sum([await _arrivals(client, s, now_ms) for s in keys.streams()])
        arrivals = added * 60 / ARRIVAL_WINDOW_S
        capacity = cap[0] / max(1, keys.shards)  # the rate is shared by the shards
    return Health(None if oldest is None else max(0, now_ms - oldest), dead, arrivals, capacity)


def drain_breach(label: str, stage: str, h: Health, app: AppSettings | None) -> str | None:
    cap = capacity_per_min(stage, app)
    if cap is None or h.arrivals_per_min is None or h.capacity_per_min is None:
        return None
    if h.arrivals_per_min <= h.capacity_per_min:
        return None
    short = h.arrivals_per_min - h.capacity_per_min
    return (
        f"{label}: falls behind by {short:.0f}/min ({h.arrivals_per_min:.0f}/min arriving, "
        f"drains at most {h.capacity_per_min:g}/min by {cap[1]})"
    )

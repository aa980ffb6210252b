"""The fleet lines of ``status``: freshness against the guarantee, ``max_tracker_age_s`` (read from
the database, never written) and the scheduler's last report (demand vs capacity,
the fetch backlog; left in Redis by the leading scheduler)."""

from __future__ import annotations

import asyncio
from dataclasses import asdict
from datetime import UTC, datetime
from typing import Any

from rich.text import Text

from ops.exporter import FreshnessReader, sqlite_file
from processors import topology
from processors.config import AppSettings
from processors.scheduler import SchedulerReport, read_report
from streams.connection import Client
from streams.keys import StageKeys
from streams.settings import StreamSettings

DB_TIMEOUT_S = 5.0


def _read_freshness(app: AppSettings) -> dict[str, Any]:
    path = sqlite_file(app.database_url)
    if path is not None and not path.is_file():
        return {"error": f"no database at {path}"}
    reader = FreshnessReader(app.database_url, max_age_s=app.max_tracker_age_s)
    try:
        fresh = reader.read()
    finally:
        reader.close()
    return {
        "in_run": fresh.in_run,
        "stale": fresh.stale,
        "oldest_age_s": None if fresh.stalest_age_s is None else round(fresh.stalest_age_s, 1),
        "max_age_s": fresh.max_age_s,
    }


async def fleet(
    client: Client, settings: StreamSettings, app: AppSettings, with_database: bool
) -> dict[str, Any]:
    """``{"freshness": {...} | None, "scheduler": {...} | None}`` (an ``error`` key
    when the database could not be read in time)."""
    freshness: dict[str, Any] | None = None
    if with_database:
        try:
            freshness = await asyncio.wait_for(
                asyncio.to_thread(_read_freshness, app), DB_TIMEOUT_S
            )
        except TimeoutError:
            freshness = {
                "error": f"the database did not answer within {DB_TIMEOUT_S:g} s",
                "unreachable": True,
            }
        except Exception as exc:  # shown, never fatal: status is about Redis first
            freshness = {"error": _one_line(exc), "unreachable": _down(exc, app)}
    key = StageKeys(settings.prefix, topology.SCHEDULER).state("report")
    report = await read_report(client, key, settings.redis_url)
    return {"freshness": freshness, "scheduler": None if report is None else asdict(report)}


def _down(exc: Exception, app: AppSettings) -> bool:
    """A database server that refuses or drops the connection (a breach); not a SQLite
    file without tables, nor a schema not yet upgraded."""
    from sqlalchemy.exc import InterfaceError, OperationalError

    local = sqlite_file(app.database_url) is not None
    return not local and isinstance(exc, OperationalError | InterfaceError)


def _one_line(exc: Exception) -> str:
    from sqlalchemy.exc import DBAPIError

    cause = exc.orig if isinstance(exc, DBAPIError) and exc.orig is not None else exc
    return f"{type(cause).__name__}: {' '.join(str(cause).split())}"


def _age(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def breaches(info: dict[str, Any], max_tracker_age_s: float | None) -> list[str]:
    fresh = info.get("freshness") or {}
    out = []
    if fresh.get("unreachable"):  # configured but not answering (a missing file is not)
        out.append(f"database: unavailable ({fresh['error']})")
    if fresh.get("stale"):
        limit = _age(fresh["max_age_s"])
        out.append(f"freshness: {fresh['stale']} tracker(s) not fetched for {limit}")
    oldest = fresh.get("oldest_age_s")
    if max_tracker_age_s is not None and oldest is not None and oldest > max_tracker_age_s:
        out.append(f"freshness: oldest tracker fetched {_age(oldest)} ago > {max_tracker_age_s:g}s")
    return out


def lines(info: dict[str, Any]) -> list[Text]:
    out = []
    fresh = info.get("freshness")
    if fresh is not None and "error" in fresh:
        out.append(Text(f"freshness: unavailable ({fresh['error']})", style="yellow"))
    elif fresh is not None:
        limit = fresh["max_age_s"]
        oldest = fresh["oldest_age_s"]
        style = "green"
        if fresh["stale"]:
            style = "bold red"
        elif oldest is not None and oldest > limit * 5 / 6:
            style = "yellow"  # where the alert TrackerStaleSoon fires (10 of 12 h)
        oldest_text = "-" if oldest is None else f"{_age(oldest)} ago"
        out.append(
            Text(
                f"freshness: {fresh['in_run']} trackers in their run, {fresh['stale']} not "
                f"fetched for {_age(limit)}; least recently fetched {oldest_text}",
                style=style,
            )
        )
    sched = info.get("scheduler")
    if sched is None:
        out.append(Text("scheduler: no report in Redis (no scheduler running?)", style="yellow"))
    else:
        report = SchedulerReport(**sched)
        at = datetime.fromisoformat(report.at)
        ago = max(0.0, (datetime.now(UTC) - at).total_seconds())
        style = {"ok": "green", "slow": "yellow"}.get(report.level, "bold red")
        out.append(Text(f"scheduler: {report.summary()} (as of {_age(ago)} ago)", style=style))
    return out

"""``trackstream trackers`` (each tracker's last fix and freshness) and ``trackstream
trace`` (one report's way through the pipeline: database columns, stream entries and
their deliveries, dead letters, reconciler re-sends)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any

import typer
from rich.table import Table

from ops import fleet
from ops.commands._operator import JsonOption, age_text, echo_json
from ops.common import console, fail, handle_errors, options
from ops.fleet import STATES


def read_db(ctx: typer.Context, fn: Any, *args: Any) -> Any:
    """``fn(session, *args)`` in one read transaction; a missing SQLite file is an error
    (never created here)."""
    from ops.exporter import sqlite_file
    from processors.database import Database

    _, app_settings = options(ctx).settings()
    path = sqlite_file(app_settings.database_url)
    if path is not None and not path.exists():
        raise fail(f"no database at {path} (run 'trackstream seed' or 'trackstream db upgrade')", 2)
    db = Database(app_settings.database_url)
    try:
        return db.run_sync(fn, *args)
    finally:
        db.dispose()


def _when(value: str | None) -> str:
    return "-" if value is None else value.replace("T", " ").removesuffix("Z")


def _minute(value: str | None) -> str:
    """Month, day, hour and minute ("12-07 16:22"): the table keeps to 80 columns."""
    return _when(value)[5:16] if value is not None else "-"


def local_time(value: str | None, zone: str | None, seconds: bool = False) -> str:
    """An ISO UTC instant in the IANA zone ``zone``: "10:15 CET" (with ``seconds``
    "2026-12-07 10:15:00 CET"; "-" when
    either is unknown, or the zone is not in this machine's tz database)."""
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    if value is None or not zone:
        return "-"
    try:
        at = datetime.fromisoformat(value.replace("Z", "+00:00")).astimezone(ZoneInfo(zone))
    except (ZoneInfoNotFoundError, ValueError):
        return "-"
    return at.strftime("%Y-%m-%d %H:%M:%S %Z" if seconds else "%H:%M %Z")


def fleet_lines(summary: dict[str, Any]) -> list[str]:
    states = ", ".join(f"{n} {s}" for s, n in summary["states"].items() if n)
    buckets = "  ".join(f"{b['label']}: {b['count']}" for b in summary["buckets"])
    return [
        f"{summary['total']} trackers ({states or 'none'}); "
        f"{summary['within_guarantee']} of {summary['in_run']} in run fetched within "
        f"{summary['guarantee']}",
        f"since last fetch  {buckets}",
    ]


def source_line(totals: dict[str, Any], lateness_s: float) -> str:
    """The fleet's line: late reports, later than the bound, rejected, errors."""
    errors = ", ".join(f"{n} {code}" for code, n in totals["trackers_in_error"].items())
    return (
        f"source: {totals['late_reports']} late report(s) stored, "
        f"{totals['beyond_bound_reports']} of them later than the {lateness_s:g} s bound; "
        f"{totals['rejected_reports']} record(s) rejected; "
        f"trackers in error: {errors or 'none'}"
    )


def source_cell(s: Any) -> str:
    if s is None:
        return "-"
    parts = []
    if s.error_code:
        retry = f", retry {_minute(_iso(s.retry_at))}" if s.retry_at else ""
        parts.append(f"{s.error_code} x{s.error_count}{retry}")
    if s.late_reports:
        beyond = f" ({s.beyond_bound_reports} beyond bound)" if s.beyond_bound_reports else ""
        parts.append(f"late {s.late_reports}{beyond}")
    if s.rejected_reports:
        parts.append(f"rejected {s.rejected_reports}")
    return "; ".join(parts) or "-"


def _iso(at: datetime | None) -> str | None:
    return None if at is None else at.isoformat(timespec="seconds").replace("+00:00", "Z")


def register(app: typer.Typer) -> None:
    @app.command()
    @handle_errors
    def trackers(
        ctx: typer.Context,
        state: Annotated[
            str | None,
            typer.Option(help=f"only trackers in this state: {', '.join(STATES)}"),
        ] = None,
        limit: Annotated[int, typer.Option(min=1, help="rows to list, stalest first")] = 50,
        source_trouble: Annotated[
            bool,
            typer.Option(
                "--source-trouble",
                help="only trackers with a source error, late reports or rejected records",
            ),
        ] = False,
        as_json: JsonOption = False,
    ) -> None:
        """Each tracker's last fix, age, last fetch and state, stalest first, with the
        fleet's freshness against the guarantee (max_tracker_age_s, 12 h by default).

        States: fresh (fetched within 2 x min_fetch_interval_s), late, overdue (not
        fetched within max_tracker_age_s), out of run (outside its production run),
        inactive. Ages count from the last successful fetch (a never-fetched tracker: from
        its creation). Times are UTC, and the last fix also in the local time of where it
        was (its IANA zone, stored by the geocode stage).

        The "source" column: the location API's error for the tracker, if it answered
        with one (and when it is tried again), and its late reports (within / later
        than source_lateness_s) and rejected records; a summary line counts them for the
        fleet (both shown only when there is any). --source-trouble lists only trackers
        with any of these.
        """
        from ops.fleet import distribution
        from ops.fleet import trackers as fleet_trackers

        if state is not None and state not in STATES:
            raise typer.BadParameter(f"must be one of: {', '.join(STATES)}", param_hint="--state")
        _, app_settings = options(ctx).settings()
        now = datetime.now(UTC)
        guarantee_s = app_settings.max_tracker_age_s
        rows, stats, totals = read_db(
            ctx,
            fleet.with_source,
            now,
            app_settings.min_fetch_interval_s,
            guarantee_s,
            fleet_trackers,
        )
        summary = distribution(rows, guarantee_s)
        shown = [
            r
            for r in rows
            if (state is None or r.state == state) and (not source_trouble or r.tracker_id in stats)
        ][:limit]
        lateness_s = app_settings.source_lateness_s
        if as_json:
            echo_json(
                {
                    "summary": {**summary, "source": {**totals, "lateness_s": lateness_s}},
                    "trackers": [
                        {**r.as_dict(), "source": fleet.source_json(stats.get(r.tracker_id))}
                        for r in shown
                    ],
                }
            )
            return
        trouble = bool(stats) or totals["rejected_reports"] > 0
        lines = fleet_lines(summary) + ([source_line(totals, lateness_s)] if trouble else [])
        for line in lines:
            console.print(line, highlight=False, soft_wrap=True)
        if not shown:
            console.print("no trackers" + (f" {state}" if state else ""))
            return
        table = Table(box=None, pad_edge=False, header_style="bold")
        table.add_column("tracker", no_wrap=True, min_width=max(len(r.tracker_id) for r in shown))
        table.add_column("state", no_wrap=True, min_width=9)
        table.add_column("age", justify="right", no_wrap=True)
        table.add_column("fix UTC", no_wrap=True)
        table.add_column("local", no_wrap=True)
        table.add_column("fetch UTC", no_wrap=True)
        table.add_column("position")
        with_source = any(r.tracker_id in stats for r in shown)
        if with_source:  # only when there is something to show: the table stays narrow
            table.add_column("source")
        for r in shown:
            extra = [source_cell(stats.get(r.tracker_id))] if with_source else []
            table.add_row(
                r.tracker_id,
                r.state,
                age_text((r.age_s or 0) * 1000),
                _minute(r.last_fix_at),
                local_time(r.last_fix_at, r.time_zone),
                _minute(r.last_fetch_at),
                "-" if r.lat is None else f"{r.lat:.3f},{r.lon:.3f}",
                *extra,
            )
        console.print(table)
        if len(rows) > len(shown) and state is None and not source_trouble:
            console.print(f"({len(shown)} of {len(rows)} shown; --limit to see more)")

    @app.command()
    @handle_errors
    def trace(
        ctx: typer.Context,
        tracker: Annotated[str, typer.Argument(help="the tracker's id (like SIM-00001)")],
        at: Annotated[
            str | None,
            typer.Option(
                help="the report observed at this time or the latest before it "
                "(ISO-8601, or a duration ago like 2h); default: the latest report"
            ),
        ] = None,
        scan: Annotated[
            int, typer.Option(min=1, max=100_000, help="newest entries searched per stream")
        ] = 2_000,
        as_json: JsonOption = False,
    ) -> None:
        """Trace one report: when it was fetched, geocoded and geofence-checked, the
        events it produced, its stream entries with their deliveries, its dead letters,
        and the reconciler's re-sends.

        Stream entries are found by the tracker id in their payload among the newest
        --scan entries of each stage stream and dead-letter stream.
        """
        from ops.commands._operator import run
        from ops.fleet import report_instants, report_trace
        from ops.timeparse import parse_time
        from ops.tracing import find_entries

        when = None
        if at is not None:
            try:
                when = parse_time(at)
            except ValueError as exc:
                raise typer.BadParameter(str(exc), param_hint="--at") from None
        stream_settings, _ = options(ctx).settings()
        try:
            report = read_db(ctx, report_trace, tracker, when)
        except LookupError as exc:
            raise fail(f"{exc.args[0]} (see 'trackstream trackers')", 2) from None
        observed, fetched = report_instants(report)
        found = run(
            stream_settings,
            lambda client: find_entries(
                client,
                stream_settings.prefix,
                tracker,
                observed_at=observed,
                fetched_at=fetched,
                scan=scan,
                url=stream_settings.redis_url,
            ),
        )
        if as_json:
            echo_json({"report": report, **found})
            return
        print_trace(tracker, at, report, found)


def trace_lines(tracker: str, report: dict[str, Any] | None, found: dict[str, Any]) -> list[str]:
    out = []
    if report is None:
        out.append(f"{tracker}: no report stored")
    else:
        out += [
            f"{tracker} report observed {_when(report['observed_at'])} UTC "
            f"at {report['lat']:.5f},{report['lon']:.5f} (report #{report['report_id']})",
            "  local time        "
            + (
                f"{local_time(report['observed_at'], report.get('time_zone'), seconds=True)}"
                f" ({report['time_zone']})"
                if report.get("time_zone")
                else "unknown (not geocoded yet, or no time zone)"
            ),
            f"  fetched           {_when(report['fetched_at'])}  from {report['source']}",
            f"  geocoded          {_when(report['geocoded_at'])}"
            + (f"  {report['address'] or report['city']}" if report["city"] else ""),
            f"  geofence-checked  {_when(report['geofence_checked_at'])}",
        ]
        events = ", ".join(f"{e['kind']} {e['geofence']}" for e in report["events"])
        out.append(f"  events            {events or 'none'}")
        resends = report["republish_count"]
        out.append(
            f"  reconciler        {resends} re-send(s)"
            + (f", last {_when(report['republished_at'])}" if resends else "")
        )
    entries = found["entries"]
    out.append(f"stream entries ({len(entries)}):" if entries else "stream entries: none found")
    for e in entries:
        stamp = datetime.fromtimestamp(e["at_ms"] / 1000, UTC).isoformat(timespec="seconds")
        state = e["state"]
        if state == "pending":
            state = f"pending on {e['consumer']}, {e['deliveries']} deliveries"
        resent = f", re-sent x{e['attempt']}" if e["attempt"] else ""
        out.append(
            f"  {e['stage']:<12} {e['id']:<16} {_when(stamp.replace('+00:00', 'Z'))}  "
            f"{e['type']}: {state}{resent}"
        )
    letters = found["dead_letters"]
    out.append(f"dead letters ({len(letters)}):" if letters else "dead letters: none")
    for d in letters:
        out.append(
            f"  {d['stage']:<12} {d['id']:<16} {d['category']}, attempts {d['attempts']}: "
            f"{d['error']}"
        )
    return out


def print_trace(
    tracker: str, at: str | None, report: dict[str, Any] | None, found: dict[str, Any]
) -> None:
    for line in trace_lines(tracker, report, found):
        console.print(line, highlight=False, soft_wrap=True, markup=False)

"""``trackstream history``: the stored history's size per partition, and retention.

``status`` lists every partition of ``location_history`` and ``geofence_events`` (on
SQLite: each table as one) with rows and size, the default partition's rows (reports
no month partition takes) and what retention drops next. ``prune --older-than 400d``
drops what is older (whole partitions on PostgreSQL; see :mod:`schemas.history`).
``partman`` hands partition creation and retention to pg_partman (:mod:`schemas.partman`).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from ops.commands._operator import JsonOption, echo_json
from ops.common import console, fail, handle_errors, options


def _age(value: str) -> timedelta:
    from schemas.history import parse_age

    try:
        return parse_age(value)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None


def _size(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


def _iso(at: datetime | None) -> str | None:
    return at.isoformat(timespec="seconds") if at else None


def _part(p: Any) -> dict[str, Any]:
    return {
        "table": p.table,
        "partition": p.name,
        "from": _iso(p.start),
        "to": _iso(p.end),
        "rows": p.rows,
        "bytes": p.bytes,
        "oldest": _iso(p.oldest),
        "newest": _iso(p.newest),
    }


def register(app: typer.Typer) -> None:
    hist = typer.Typer(
        help="The stored history: size per partition, retention.", no_args_is_help=True
    )
    app.add_typer(hist, name="history")

    @hist.command("status")
    @handle_errors
    def status(
        ctx: typer.Context,
        exact: Annotated[
            bool, typer.Option(help="count every partition's rows (a scan each)")
        ] = False,
        as_json: JsonOption = False,
    ) -> None:
        """Rows and size per partition, and what retention drops next."""
        from schemas import history
        from schemas.db import make_engine

        _, app_settings = options(ctx).settings()
        engine = make_engine(app_settings.database_url)
        try:
            st = history.status(
                engine, datetime.now(UTC), app_settings.history_retention_days, exact=exact
            )
        finally:
            engine.dispose()
        data = {
            "retention_days": st.retention_days,
            "partitions": [_part(p) for p in st.partitions],
            "next_drop": [p.name for p in st.next_drop],
            "next_drop_at": _iso(st.next_drop_at),
            "partman": st.partman,
        }
        if as_json:
            echo_json(data)
            return
        table = Table("partition", "from", "to", "rows", "size")
        for p in st.partitions:
            rows = f"{p.rows:,}" if exact or p.default else f"~{p.rows:,}"
            span = (p.start, p.end) if p.start else (p.oldest, p.newest)  # default: its rows
            frm, to = (f"{x:%Y-%m-%d}" if x else "-" for x in span)
            table.add_row(p.name, frm, to, rows, _size(p.bytes))
        console.print(table)
        stragglers = [p for p in st.partitions if p.default and p.name != p.table and p.rows]
        for p in stragglers:
            console.print(
                f"{p.name}: {p.rows:,} reports outside every month partition "
                f"({_iso(p.oldest)} .. {_iso(p.newest)})",
                highlight=False,
            )
        for t, kept in st.partman.items():
            console.print(
                f"{t}: partitions created and dropped by pg_partman "
                f"(retention {kept or 'keep everything'})",
                highlight=False,
            )
        if st.retention_days is None:
            console.print("retention: keep everything (TRACKSTREAM_HISTORY_RETENTION_DAYS unset)")
        elif st.next_drop:
            when = "now" if st.next_drop_at and st.next_drop_at <= datetime.now(UTC) else None
            console.print(
                f"retention {st.retention_days} d drops next ({when or _iso(st.next_drop_at)}): "
                + ", ".join(p.name for p in st.next_drop),
                highlight=False,
            )
        else:
            console.print(f"retention {st.retention_days} d: nothing to drop")

    @hist.command("prune")
    @handle_errors
    def prune(
        ctx: typer.Context,
        older_than: Annotated[
            str | None,
            typer.Option(
                help="drop what is older than this: 400d, 12w, 36h "
                "(default: TRACKSTREAM_HISTORY_RETENTION_DAYS)"
            ),
        ] = None,
        dry_run: Annotated[bool, typer.Option(help="only say what would be dropped")] = False,
        archive: Annotated[
            Path | None,
            typer.Option(
                file_okay=False,
                help="write each dropped partition (and the default partition's old rows) "
                "to DIR/<partition>.parquet first; a failed write drops nothing more "
                "(PostgreSQL; needs pyarrow: the [archive] extra)",
            ),
        ] = None,
        as_json: JsonOption = False,
    ) -> None:
        """Drop history older than the cut-off (whole partitions on PostgreSQL)."""
        from schemas import history
        from schemas.db import make_engine

        _, app_settings = options(ctx).settings()
        if older_than is not None:
            age = _age(older_than)
        elif app_settings.history_retention_days is not None:
            age = timedelta(days=app_settings.history_retention_days)
        else:
            raise typer.BadParameter(
                "give --older-than (or set TRACKSTREAM_HISTORY_RETENTION_DAYS)",
                param_hint="--older-than",
            )
        cutoff = datetime.now(UTC) - age
        if archive is not None and not app_settings.database_url.startswith("postgresql"):
            raise typer.BadParameter(
                "needs PostgreSQL (on SQLite history is not partitioned)", param_hint="--archive"
            )
        if archive is not None and not dry_run:
            from schemas.archive import ArchiveError, require_pyarrow

            try:
                require_pyarrow()
            except ArchiveError as exc:
                raise typer.BadParameter(str(exc), param_hint="--archive") from None
        engine = make_engine(app_settings.database_url)
        try:
            result = history.prune(engine, cutoff, dry_run=dry_run, archive=archive)
        except Exception as exc:
            from schemas.archive import ArchiveError

            if isinstance(exc, ArchiveError):
                raise fail(f"{exc} (that partition is attached again)", 1) from None
            raise
        finally:
            engine.dispose()
        if result.busy:
            raise fail("another prune is running; nothing done", 1)
        if as_json:
            echo_json(
                {
                    "cutoff": _iso(cutoff),
                    "dry_run": dry_run,
                    "partitions": [p.name for p in result.partitions],
                    "rows": result.rows,
                    "seconds": round(result.seconds, 3),
                    "archives": [str(a) for a in result.archives],
                }
            )
            return
        verb = "would drop" if dry_run else "dropped"
        console.print(f"cut-off {_iso(cutoff)}", highlight=False)
        for p in result.partitions:
            console.print(f"{verb} partition {p.name} (~{p.rows:,} rows)", highlight=False)
        for table, n in sorted(result.rows.items()):
            console.print(f"{table}: {verb} {n:,} rows", highlight=False)
        for a in result.archives:
            console.print(f"archived to {a}", highlight=False)
        if not result.partitions and not result.rows:
            console.print("nothing older than the cut-off")
        console.print(f"took {result.seconds:.2f} s" + (" (dry run)" if dry_run else ""))

    @hist.command("partman")
    @handle_errors
    def partman_cmd(
        ctx: typer.Context,
        run: Annotated[
            bool,
            typer.Option("--run", help="only run one round of pg_partman's maintenance (for cron)"),
        ] = False,
        retention_days: Annotated[
            int | None,
            typer.Option(
                min=1,
                help="pg_partman drops partitions older than this "
                "(default: TRACKSTREAM_HISTORY_RETENTION_DAYS; unset: keep all)",
            ),
        ] = None,
        premake: Annotated[
            int, typer.Option(min=1, help="months pg_partman keeps created ahead")
        ] = 3,
        as_json: JsonOption = False,
    ) -> None:
        """Hand the history's partitions (creation ahead, retention) to pg_partman.

        Needs the pg_partman extension on the server (Debian: postgresql-15-partman).
        Safe to run again (it then only sets the retention). Afterwards the reconciler
        and `history prune` leave those partitions to pg_partman; its maintenance runs
        in its background worker (shared_preload_libraries = 'pg_partman_bgw',
        pg_partman_bgw.dbname), pg_cron, or `trackstream history partman --run`."""
        from schemas import partman
        from schemas.db import make_engine

        _, app_settings = options(ctx).settings()
        if not app_settings.database_url.startswith("postgresql"):
            raise typer.BadParameter(
                "pg_partman needs PostgreSQL (TRACKSTREAM_DATABASE_URL is not)",
                param_hint="TRACKSTREAM_DATABASE_URL",
            )
        days = retention_days if retention_days is not None else app_settings.history_retention_days
        engine = make_engine(app_settings.database_url)
        try:
            if run:
                partman.run(engine)
                handed: list[str] = []
            else:
                handed = partman.enable(engine, retention_days=days, premake=premake)
            with engine.connect() as conn:
                managed = partman.managed(conn)
        except partman.PartmanUnavailable as exc:
            raise fail(str(exc), 1) from None
        finally:
            engine.dispose()
        if as_json:
            echo_json(
                {
                    "handed_over": handed,
                    "managed": {
                        t: {"premake": m.premake, "retention": m.retention}
                        for t, m in managed.items()
                    },
                }
            )
            return
        for t in handed:
            console.print(f"{t}: now managed by pg_partman", highlight=False)
        for t, m in managed.items():
            keep = m.retention or "keep everything"
            console.print(
                f"{t}: pg_partman, {m.premake} months ahead, retention {keep}", highlight=False
            )
        if run:
            console.print("pg_partman maintenance ran")

    @hist.command("restore")
    @handle_errors
    def restore(
        ctx: typer.Context,
        files: Annotated[
            list[Path],
            typer.Argument(exists=True, dir_okay=False, help="Parquet files prune --archive wrote"),
        ],
        as_json: JsonOption = False,
    ) -> None:
        """Put archived history back (idempotent: rows already there are skipped)."""
        from schemas.archive import ArchiveError
        from schemas.archive import restore as do_restore
        from schemas.db import make_engine

        _, app_settings = options(ctx).settings()
        if not app_settings.database_url.startswith("postgresql"):
            raise typer.BadParameter(
                "restore needs PostgreSQL (TRACKSTREAM_DATABASE_URL is not)",
                param_hint="TRACKSTREAM_DATABASE_URL",
            )
        engine = make_engine(app_settings.database_url)
        try:
            done = do_restore(engine, list(files))
        except ArchiveError as exc:
            raise fail(str(exc), 1) from None
        finally:
            engine.dispose()
        if as_json:
            echo_json(
                [
                    {"file": str(r.path), "table": r.table, "rows": r.rows, "inserted": r.inserted}
                    for r in done
                ]
            )
            return
        for r in done:
            console.print(
                f"{r.path}: {r.rows:,} rows of {r.table}, {r.inserted:,} inserted "
                f"({r.rows - r.inserted:,} already there)",
                highlight=False,
            )

"""``trackstream geofence``: list, add, deactivate and reactivate geofences.

Every change goes through :mod:`schemas.geofence_defs`, which validates it (an unsplit polygon
across the antimeridian is refused) and bumps the geofences' version; the geofence
stage sees it at its next batch, without a restart, and evaluates each tracker's
history again with the fences in force when it next checks one of its reports.
(Edit the table by hand and nothing bumps it: the stage would keep its old index
until the next write.) A deactivated fence keeps the events it has.
"""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer
from rich.table import Table

from ops.commands._operator import JsonOption, echo_json
from ops.common import console, fail, handle_errors, options


def _describe(g: Any) -> str:
    if g.kind == "circle":
        return f"circle r={g.radius_m:,.0f} m at {g.center_lat:.5f},{g.center_lon:.5f}"
    geometry = json.loads(g.geometry_geojson or "{}")
    rings = geometry.get("coordinates") or []
    if geometry.get("type") == "MultiPolygon":
        return f"multipolygon of {len(rings)}"
    return f"polygon, {max(len(rings[0]) - 1, 0) if rings else 0} vertices"


def _row(g: Any) -> dict[str, Any]:
    return {
        "id": g.id,
        "name": g.name,
        "kind": g.kind,
        "active": g.active,
        "shape": _describe(g),
        "updated_at": g.updated_at.isoformat(timespec="seconds"),
    }


def _set_active(ctx: typer.Context, ids: list[int], active: bool) -> None:
    from processors.database import Database
    from schemas import geofence_defs

    _, app_settings = options(ctx).settings()
    db = Database(app_settings.database_url)

    def change(session: Any) -> list[str]:
        return [geofence_defs.update_geofence(session, i, active=active).name for i in ids]

    try:
        names = db.run_sync(change)  # one transaction: all or none
    except LookupError as exc:
        hint = "see 'trackstream geofence list --all'"
        raise fail(f"{exc.args[0]}; nothing changed ({hint})", 2) from None
    finally:
        db.dispose()
    verb = "activated" if active else "deactivated"
    for i, name in zip(ids, names, strict=True):
        console.print(f"{verb} geofence {i} ({name})")


def register(app: typer.Typer) -> None:
    geo = typer.Typer(
        help="Geofences: list, add, deactivate, activate; position quality.", no_args_is_help=True
    )
    app.add_typer(geo, name="geofence")

    @geo.command("list")
    @handle_errors
    def list_geofences(
        ctx: typer.Context,
        all_: Annotated[bool, typer.Option("--all", help="inactive geofences too")] = False,
        as_json: JsonOption = False,
    ) -> None:
        """The geofences the geofence stage checks (with --all: inactive ones too)."""
        from processors.database import Database
        from schemas import geofence_defs

        _, app_settings = options(ctx).settings()
        db = Database(app_settings.database_url)
        try:
            rows = db.run_sync(lambda s: [_row(g) for g in geofence_defs.list_geofences(s, all_)])
        finally:
            db.dispose()
        if as_json:
            echo_json(rows)
            return
        table = Table(title=f"{len(rows)} geofences" + ("" if all_ else " (active)"))
        for col in ("id", "name", "active", "shape", "updated"):
            table.add_column(col, justify="right" if col == "id" else "left")
        for r in rows:
            table.add_row(
                str(r["id"]), r["name"], "yes" if r["active"] else "no", r["shape"], r["updated_at"]
            )
        console.print(table)

    @geo.command("quality")
    @handle_errors
    def quality(ctx: typer.Context, as_json: JsonOption = False) -> None:
        """Reports by position-quality verdict: ok, or why they were rejected."""
        from processors.crossings import OK, REASONS
        from processors.database import Database
        from schemas import geofence_store

        _, app_settings = options(ctx).settings()
        db = Database(app_settings.database_url)
        try:
            counts = db.run_sync(geofence_store.fix_status_counts)
        finally:
            db.dispose()
        rows = {k: counts.get(k, 0) for k in (OK, *REASONS, "unchecked")}
        if as_json:
            echo_json(rows)
            return
        table = Table(
            title="location reports by verdict (rejected ones take no part in geofencing)"
        )
        table.add_column("verdict")
        table.add_column("reports", justify="right")
        for verdict, n in rows.items():
            table.add_row(verdict, f"{n:,}")
        console.print(table)

    @geo.command("add")
    @handle_errors
    def add(
        ctx: typer.Context,
        name: Annotated[str, typer.Argument(help="the geofence's name")],
        circle: Annotated[
            str | None,
            typer.Option(help="a circle: LAT,LON,RADIUS_M (e.g. 51.92,4.48,500)"),
        ] = None,
        geojson: Annotated[
            str | None,
            typer.Option(help="a GeoJSON Polygon/MultiPolygon: a file or the JSON itself"),
        ] = None,
    ) -> None:
        """Add a circle or a polygon (split polygons that cross the antimeridian)."""
        from pathlib import Path

        from processors.database import Database
        from schemas import geofence_defs, geofence_validation

        if (circle is None) == (geojson is None):
            raise fail("give exactly one of --circle LAT,LON,RADIUS_M or --geojson", 2)
        fields: dict[str, Any]
        if circle is not None:
            parts = circle.split(",")
            if len(parts) != 3:
                raise fail(f"--circle takes LAT,LON,RADIUS_M, not {circle!r}", 2)
            lat, lon, radius = (p.strip() for p in parts)
            fields = {"kind": "circle", "center_lat": lat, "center_lon": lon, "radius_m": radius}
        else:
            assert geojson is not None
            path = Path(geojson)
            try:
                raw = path.read_text() if not geojson.lstrip().startswith("{") else geojson
            except OSError as exc:  # no such file, a directory, no permission
                raise fail(f"--geojson {geojson}: {exc.strerror or exc}", 2) from None
            fields = {"kind": "polygon", "geometry_geojson": raw}
        _, app_settings = options(ctx).settings()
        db = Database(app_settings.database_url)
        try:
            fields = geofence_validation.validate_geofence(name=name, **fields)
            fields.pop("name")
            gid = db.run_sync(lambda s: geofence_defs.add_geofence(s, name, **fields).id)
        except geofence_validation.InvalidGeofence as exc:
            raise fail(f"{exc}; nothing added", 2) from None
        finally:
            db.dispose()
        console.print(f"added geofence {gid} ({name})")

    @geo.command("deactivate")
    @handle_errors
    def deactivate(
        ctx: typer.Context,
        ids: Annotated[list[int], typer.Argument(help="geofence ids")],
    ) -> None:
        """Stop checking these geofences (they stay, with their events)."""
        _set_active(ctx, ids, False)

    @geo.command("activate")
    @handle_errors
    def activate(
        ctx: typer.Context,
        ids: Annotated[list[int], typer.Argument(help="geofence ids")],
    ) -> None:
        """Check these geofences again."""
        _set_active(ctx, ids, True)

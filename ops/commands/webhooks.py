"""``trackstream webhook``: subscriptions for the notify stage, a test delivery, the log,
the keys that encrypt the secrets.

Secrets are never printed or logged: ``add`` reads one from ``--secret-file`` or, when
that file does not exist, generates one and writes it there (mode 0600) for the
receiver's owner, and stores it encrypted (:mod:`schemas.secretbox`). ``list`` shows a
fingerprint (the first 8 hex digits of its SHA-256) to tell secrets apart. URLs are
shown without credentials or query. ``add`` refuses what the SSRF guard refuses
(:mod:`processors.ssrf`) unless ``--allow-private`` / ``--allow-http`` say otherwise.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from ops.commands._operator import JsonOption, echo_json
from ops.common import console, fail, handle_errors, options


def _db(ctx: typer.Context) -> Any:
    from processors.database import Database

    _, app_settings = options(ctx).settings()
    return Database(app_settings.database_url)


def _box(ctx: typer.Context) -> Any:
    from schemas.secretbox import SecretBox, SecretKeyError

    _, app_settings = options(ctx).settings()
    try:
        return SecretBox(app_settings.webhook_key_list())
    except (SecretKeyError, ValueError) as exc:
        raise fail(str(exc), 2) from None


def _secret_from(path: Path) -> tuple[str, bool]:
    """(secret, generated): read from ``path``, or generated and written there."""
    if path.exists():
        return path.read_text().strip(), False
    from processors.webhooks import new_secret

    secret = new_secret()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secret + "\n")
    return secret, True


def fingerprint(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()[:8]


def register(app: typer.Typer) -> None:
    hook = typer.Typer(
        help="Webhook subscriptions of the notify stage: add, list, remove, test, deliveries.",
        no_args_is_help=True,
    )
    app.add_typer(hook, name="webhook")

    @hook.command("add")
    @handle_errors
    def add(
        ctx: typer.Context,
        url: Annotated[str, typer.Argument(help="the endpoint (http:// or https://)")],
        secret_file: Annotated[
            Path,
            typer.Option(
                help="file holding the whsec_ signing secret; created with a new one "
                "(mode 0600) if it does not exist. The secret is never printed."
            ),
        ],
        geofence: Annotated[
            list[int] | None, typer.Option("--geofence", help="only these geofence ids")
        ] = None,
        tracker: Annotated[
            list[str] | None, typer.Option("--tracker", help="only these tracker ids")
        ] = None,
        kind: Annotated[
            list[str] | None, typer.Option("--kind", help="enter and/or exit (default: both)")
        ] = None,
        description: Annotated[str | None, typer.Option(help="a note for operators")] = None,
        priority: Annotated[
            str, typer.Option(help="normal | high (its own lane for the endpoint's slots)")
        ] = "normal",
        batch_max: Annotated[
            int, typer.Option(min=1, max=1000, help="up to N events in one request (1: off)")
        ] = 1,
        allow_private: Annotated[
            bool,
            typer.Option(
                "--allow-private",
                help="allow loopback, private, link-local and unspecified addresses",
            ),
        ] = False,
        allow_http: Annotated[
            bool, typer.Option("--allow-http", help="allow plain http:// (not https://)")
        ] = False,
    ) -> None:
        """Subscribe an endpoint to geofence events (all of them unless filtered)."""
        from processors import ssrf
        from schemas import webhook_store
        from schemas.secretbox import SecretKeyError

        if priority not in ("normal", "high"):
            raise fail("--priority: normal or high", 2)
        box = _box(ctx)
        try:
            webhook_store.check_url(url)
            ssrf.check_url(url, allow_private=allow_private, allow_http=allow_http)
            webhook_store.check_kinds(kind or webhook_store.KINDS)
            if not box.has_key:
                box.seal("")  # raises: names the setting
            secret, generated = _secret_from(secret_file)
            webhook_store.check_secret(secret)
        except (OSError, webhook_store.InvalidSubscription, ssrf.Refused, SecretKeyError) as exc:
            raise fail(str(exc), 2) from None
        db = _db(ctx)
        try:
            sid = db.run_sync(
                webhook_store.add_subscription,
                url,
                secret,
                box=box,
                geofence_ids=geofence,
                tracker_ids=tracker,
                kinds=kind or webhook_store.KINDS,
                description=description,
                priority=1 if priority == "high" else 0,
                batch_max=batch_max,
                allow_private=allow_private,
                allow_http=allow_http,
            )
        finally:
            db.dispose()
        made = f"new secret written to {secret_file}" if generated else f"secret from {secret_file}"
        shown = webhook_store.redact_url(url)
        console.print(f"added webhook subscription {sid} -> {shown} ({made})")

    @hook.command("list")
    @handle_errors
    def list_(
        ctx: typer.Context,
        all_: Annotated[bool, typer.Option("--all", help="removed ones too")] = False,
        as_json: JsonOption = False,
    ) -> None:
        """The subscriptions (secrets shown only as a fingerprint)."""
        from schemas import webhook_store

        box = _box(ctx)
        db = _db(ctx)
        try:
            rows = db.run_sync(webhook_store.subscription_rows, all_)
            prints = db.run_sync(
                lambda s: {
                    r["id"]: fingerprint(webhook_store.subscription(s, r["id"], box).secret)
                    for r in rows
                }
            )
        finally:
            db.dispose()
        for r in rows:
            r["secret_fingerprint"] = prints[r["id"]]
        if as_json:
            echo_json(rows)
            return
        table = Table(title=f"{len(rows)} webhook subscriptions")
        for col in ("id", "url", "geofences", "trackers", "kinds", "priority", "active"):
            table.add_column(col, overflow="fold")
        table.add_column("secret sha256", no_wrap=True, min_width=8)
        for r in rows:
            table.add_row(
                str(r["id"]),
                r["url"],
                _ids(r["geofence_ids"]),
                _ids(r["tracker_ids"]),
                r["kinds"] + (f" (batch {r['batch_max']})" if r["batch_max"] > 1 else ""),
                r["priority"],
                "yes" if r["active"] else f"no: {r['disabled_reason'] or 'removed'}",
                r["secret_fingerprint"],
            )
        console.print(table)

    @hook.command("remove")
    @handle_errors
    def remove(
        ctx: typer.Context,
        ids: Annotated[list[int], typer.Argument(help="subscription ids")],
    ) -> None:
        """Stop delivering to these subscriptions (their delivery log stays)."""
        _set_active(ctx, ids, False, "removed")

    @hook.command("enable")
    @handle_errors
    def enable(
        ctx: typer.Context,
        ids: Annotated[list[int], typer.Argument(help="subscription ids")],
    ) -> None:
        """Deliver to these subscriptions again (one removed, or disabled by a 410)."""
        _set_active(ctx, ids, True, "enabled")

    @hook.command("new-key")
    def new_key() -> None:
        """Print a new Fernet key for TRACKSTREAM_WEBHOOK_KEYS (or the key file)."""
        from schemas.secretbox import new_key as make

        typer.echo(make())

    @hook.command("rotate-key")
    @handle_errors
    def rotate_key(ctx: typer.Context) -> None:
        """Re-encrypt every stored secret with the first configured key (and encrypt any
        stored in plain text). Put the new key first, run this, then drop the old one."""
        from schemas import webhook_store
        from schemas.secretbox import SecretKeyError

        box = _box(ctx)
        db = _db(ctx)
        try:
            n = db.run_sync(webhook_store.rotate_secrets, box)
        except SecretKeyError as exc:
            raise fail(str(exc), 2) from None
        finally:
            db.dispose()
        console.print(f"re-encrypted {n} webhook secrets with the first key")

    @hook.command("test")
    @handle_errors
    def test(
        ctx: typer.Context,
        sid: Annotated[int, typer.Argument(help="subscription id")],
    ) -> None:
        """Send one signed event (tracker 'test', geofence 1, enter, now) and show the
        answer; nothing is recorded."""
        import httpx

        from processors import ssrf, webhooks
        from schemas import webhook_store
        from schemas.notify import GeofenceEvent

        _, app_settings = options(ctx).settings()
        box = _box(ctx)
        db = _db(ctx)
        try:
            sub = db.run_sync(webhook_store.subscription, sid, box)
        except LookupError as exc:
            raise fail(str(exc.args[0]), 2) from None
        finally:
            db.dispose()
        event = GeofenceEvent(
            tracker_id="test", geofence_id=1, observed_at=datetime.now(UTC), kind="enter"
        )

        async def send() -> webhooks.Answer:
            try:
                target = await ssrf.Resolver().target(
                    sub.url, allow_private=sub.allow_private, allow_http=sub.allow_http
                )
            except ssrf.Refused as exc:
                return webhooks.Answer("permanent", None, 0.0, f"refused: {exc}")
            async with httpx.AsyncClient(timeout=app_settings.notify_timeout_s) as http:
                return await webhooks.attempt(http, sub.url, sub.secret, event, target)

        answer = asyncio.run(send())
        status = answer.status if answer.status is not None else "no response"
        console.print(
            f"{answer.outcome}: {status} in {answer.latency_ms:.0f} ms"
            + (f" ({answer.error})" if answer.error else "")
        )
        if answer.outcome != "delivered":
            raise typer.Exit(1)

    @hook.command("deliveries")
    @handle_errors
    def deliveries(
        ctx: typer.Context,
        subscription: Annotated[int | None, typer.Option(help="one subscription")] = None,
        limit: Annotated[int, typer.Option(min=1, max=10_000)] = 50,
        as_json: JsonOption = False,
    ) -> None:
        """The delivery log, newest first: every attempt with its status and latency."""
        from schemas import webhook_store

        db = _db(ctx)
        try:
            rows = db.run_sync(webhook_store.recent_attempts, limit, subscription)
        finally:
            db.dispose()
        if as_json:
            echo_json(rows)
            return
        table = Table(title=f"last {len(rows)} webhook attempts")
        for col in ("at", "event", "sub", "attempt", "status", "ms", "error"):
            table.add_column(col)
        for r in rows:
            table.add_row(
                r["at"],
                r["event_id"],
                str(r["subscription_id"]),
                str(r["attempt"]),
                "-" if r["status"] is None else str(r["status"]),
                "-" if r["latency_ms"] is None else f"{r['latency_ms']:.0f}",
                (r["error"] or "")[:80],
            )
        console.print(table)

    @hook.command("bench")
    @handle_errors
    def bench(
        ctx: typer.Context,
        events: Annotated[int, typer.Option(min=2, help="events to deliver per run")] = 2000,
        workers: Annotated[
            list[int] | None, typer.Option("--workers", min=1, help="worker processes per run")
        ] = None,
        bench_database_url: Annotated[
            str | None,
            typer.Option(help="an empty database the bench may fill (default: a SQLite file)"),
        ] = None,
        as_json: JsonOption = False,
    ) -> None:
        """Deliveries per second to a fast receiver on 127.0.0.1, with 1 and 2 notify
        workers (or --workers N ...). Uses the configured Redis under a throwaway prefix
        and a throwaway SQLite database."""
        from ops.bench.notify import bench as run_bench

        stream_settings, _ = options(ctx).settings()
        results = run_bench(
            stream_settings,
            events,
            workers or [1, 2],
            lambda m: console.print(m, style="dim"),
            database_url=bench_database_url,
        )
        if as_json:
            echo_json(results)
            return
        for r in results:
            console.print(
                f"{r['workers']} worker(s): {r['events']} deliveries in {r['seconds']:.2f} s "
                f"= {r['deliveries_per_s']:.0f}/s"
            )


def _ids(value: Any) -> str:
    return value if isinstance(value, str) else ",".join(str(v) for v in value)


def _set_active(ctx: typer.Context, ids: list[int], active: bool, done: str) -> None:
    """Switches the subscriptions on or off, all or none (an unknown id changes nothing)."""
    from schemas import webhook_store

    db = _db(ctx)
    try:
        urls = db.run_sync(
            lambda s: [webhook_store.set_subscription_active(s, i, active) for i in ids]
        )
    except LookupError as exc:
        raise fail(f"{exc.args[0]}; nothing changed", 2) from None
    finally:
        db.dispose()
    for i, url in zip(ids, urls, strict=True):
        console.print(f"{done} webhook subscription {i} ({url})")

"""Serving what operators look at: ``exporter`` (Prometheus /metrics) and ``dashboard``."""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated, Any

import typer

from ops.common import console, handle_errors, options, setup_logging, shown_url

log = logging.getLogger("trackstream")


def _database_for_exporter(url: str, wanted: bool) -> str | None:
    """The database to read freshness from, or None to export Redis metrics only.

    A SQLite file counts only once it exists: the exporter must not create an empty
    database of its own (the default URL is SQLite, so a Redis-only host needs nothing).
    """
    if not wanted:
        return None
    from ops.exporter import sqlite_file

    path = sqlite_file(url)
    if path is not None and not path.exists():
        console.print(f"no database at {path}: exporting Redis metrics only")
        return None
    return url


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def _wait_for_signal() -> None:
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in STOP_SIGNALS}
    try:
        stop.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _quiet_server_class() -> type:
    import uvicorn

    class QuietServer(uvicorn.Server):
        """uvicorn re-raises SIGTERM/SIGINT after its graceful shutdown (the process then
        dies by the signal, or prints a KeyboardInterrupt); a stop asked for is a clean
        exit (status 0), as for ``exporter``."""

        @contextmanager
        def capture_signals(self) -> Iterator[None]:
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            previous = {sig: signal.signal(sig, self.handle_exit) for sig in STOP_SIGNALS}
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

    return QuietServer


def _quiet_server(config: object) -> Any:
    """A uvicorn server for ``config`` (uvicorn is imported only when serving)."""
    return _quiet_server_class()(config)


def register(app: typer.Typer) -> None:
    @app.command()
    @handle_errors
    def exporter(
        ctx: typer.Context,
        host: Annotated[str, typer.Option(help="address to listen on")] = "127.0.0.1",
        port: Annotated[int, typer.Option(min=1, max=65535, help="port of /metrics")] = 9108,
        database: Annotated[
            bool,
            typer.Option(
                "--database/--no-database",
                help="also export freshness from the database (skipped if the default "
                "SQLite file does not exist)",
            ),
        ] = True,
        verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
    ) -> None:
        """Serve Prometheus metrics of every stage (and the database) on /metrics."""
        from prometheus_client import CollectorRegistry

        from ops.exporter import PipelineCollector
        from ops.metrics_http import serve_metrics

        setup_logging(verbose)
        stream_settings, app_settings = options(ctx).settings()
        database_url = _database_for_exporter(app_settings.database_url, database)
        collector = PipelineCollector(
            stream_settings,
            database_url=database_url,
            max_tracker_age_s=app_settings.max_tracker_age_s,
        )
        registry = CollectorRegistry()
        registry.register(collector)
        server, thread = serve_metrics(registry, host, port)
        console.print(
            f"metrics of {shown_url(stream_settings)} (prefix {stream_settings.prefix}"
            f"{', with database' if database_url else ', no database'}) on "
            f"http://{host}:{port}/metrics; Ctrl-C to stop"
        )
        try:
            _wait_for_signal()
        finally:
            server.shutdown()
            server.server_close()
            thread.join(5)
            collector.close()

    @app.command()
    @handle_errors
    def dashboard(
        ctx: typer.Context,
        host: Annotated[str, typer.Option(help="address to listen on")] = "127.0.0.1",
        port: Annotated[int, typer.Option(min=1, max=65535, help="port of the dashboard")] = 8080,
        verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
    ) -> None:
        """Serve the web dashboard: stages at a glance, dead letters to inspect and redrive.

        Redrive and delete need TRACKSTREAM_DASHBOARD_TOKEN to be set (and entered in the page).
        """
        import uvicorn

        from ops.dashboard import create_app

        setup_logging(verbose)
        stream_settings, app_settings = options(ctx).settings()
        app = create_app(stream_settings, app_settings)
        mode = "redrive enabled" if app_settings.dashboard_token else "read-only (no token)"
        console.print(
            f"dashboard of {shown_url(stream_settings)} (prefix {stream_settings.prefix}, "
            f"{mode}) on http://{host}:{port}/; Ctrl-C to stop"
        )
        config = uvicorn.Config(
            app,
            host=host,
            port=port,
            log_level="debug" if verbose else "warning",
            ws="none",  # no websockets: the page polls over plain HTTP
            lifespan="on",
            timeout_graceful_shutdown=5,
        )
        _quiet_server(config).run()

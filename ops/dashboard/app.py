"""The dashboard: a Starlette app with a JSON API over the stages and their dead letters,
and one self-contained page (``index.html``) that polls it.

==========  ======================================  ==========================================
method      path                                    what
==========  ======================================  ==========================================
GET         /                                       the page
GET         /healthz                                liveness: always 200
GET         /readyz                                 200 if Redis answers PING, else 503
GET         /api/stages                             every stage: backlog, consumers, rates
GET         /api/stages/{stage}/consumers           the stage's consumers, with heartbeat ages
GET         /api/stages/{stage}/dlq                 dead letters (``?category=&limit=``)
GET         /api/stages/{stage}/dlq/{id}            one dead letter, with its original fields
POST        /api/stages/{stage}/dlq/{id}/redrive    redrive one dead letter          (token)
POST        /api/stages/{stage}/dlq/redrive         redrive ``{"ids": [...]}``        (token)
DELETE      /api/stages/{stage}/dlq/{id}            delete one dead letter           (token)
POST        /api/stages/{stage}/dlq/bulk            redrive/purge by category + time (token)
GET         /api/trackers                           a page of trackers, states, freshness
                                                    (``?state=&q=&sort=&offset=&limit=``)
GET         /api/events                             geofence events, a page (``?tracker=&
                                                    fence=&kind=&since=&until=&before=``)
GET         /api/stages/{stage}/entries             a page of a stream, its priority lane or
                                                    dead letters (``?lane=&view=&cursor=``)
GET         /api/entries/{id}                       stream entries with this id, any stage
GET         /api/partitions                         history size per partition, retention
GET         /api/map                                positions, tracks, geofences, events
GET         /api/trace/{tracker}                    one report's trace (``?at=&scan=``)
GET         /api/search                             entries/dead letters (``?tracker=``)
GET         /api/workers                            workers, scheduler, reconciler
GET         /api/history                            per-minute counts per stage, last hour
GET         /static/...                             the page's assets (vendored Leaflet)
GET         /api/webhooks                           subscriptions, latest delivery attempts
GET         /api/webhooks/health                    each subscription: delivered, failing, dead
POST        /api/webhooks/{id}/pause                pause a subscription              (token)
POST        /api/webhooks/{id}/resume               resume it                         (token)
==========  ======================================  ==========================================

Mutating endpoints need ``Authorization: Bearer <dashboard_token>`` (compared in
constant time; missing or wrong: 401); without a configured token they are disabled
(403, saying how to enable them). With ``dashboard_read_token`` set, every other
``/api`` endpoint needs that token (or the mutation token) too; the page, its assets,
``/healthz`` and ``/readyz`` stay open. A header token is never sent by a browser on
its own, so there is no cross-site request forgery to guard against.
"""

from __future__ import annotations

import asyncio
import hmac
import re
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib import resources
from typing import Any

from redis import exceptions as rex
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.base import BaseHTTPMiddleware, RequestResponseEndpoint
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from ops.commands import _health, _retention
from ops.dashboard.throughput import Throughput
from ops.dashboard.webhooks import webhooks
from ops.exporter import backlog, client_settings, pipeline_keys
from processors import topology
from processors.config import AppSettings
from streams.connection import Client, connect, redact
from streams.deadletter import CATEGORIES, DeadLetters
from streams.errors import RedisUnavailable, StreamsError
from streams.keys import StageKeys
from streams.monitor import StageStatus, stage_statuses
from streams.settings import StreamSettings

# the stage each stage reads from (see processors.topology): the console's arrows
FED_BY = {
    topology.GEOCODE: topology.FETCH,
    topology.GEOFENCE: topology.GEOCODE,
    topology.VIEW_REFRESH: topology.GEOFENCE,
    topology.NOTIFY: topology.GEOFENCE,
}
ENTRY_ID = re.compile(r"^\d{1,20}-\d{1,20}$")
MAX_LIMIT = 500
MAX_IDS = 1_000
READY_TIMEOUT_S = 2.0
TOKEN_HINT = "set TRACKSTREAM_DASHBOARD_TOKEN to enable redrive and delete"
DB_TIMEOUT_S = 10.0


def csp(tiles_url: str | None) -> str:
    img = "'self' data:"
    if tiles_url:
        from urllib.parse import urlsplit

        parts = urlsplit(tiles_url.replace("{s}", "a"))
        host = parts.netloc.replace("a.", "*.", 1) if "{s}" in tiles_url else parts.netloc
        img += f" {parts.scheme}://{host}"
    return (
        "default-src 'none'; script-src 'self' 'unsafe-inline'; "
        "style-src 'self' 'unsafe-inline'; "
        f"connect-src 'self'; img-src {img}; base-uri 'none'; form-action 'none'; "
        "frame-ancestors 'none'"
    )


class Dashboard:
    """What the endpoints share: settings, the stage keys, one Redis client."""

    def __init__(
        self, stream_settings: StreamSettings, app_settings: AppSettings, client: Client | None
    ) -> None:
        self.settings = stream_settings
        self.app_settings = app_settings
        self.token = app_settings.dashboard_token or None
        self.read_token = app_settings.dashboard_read_token or None
        self._db: Any = None
        self.url = stream_settings.redis_url
        self.keys: dict[str, list[StageKeys]] = {}
        for keys in pipeline_keys(stream_settings.prefix):
            self.keys.setdefault(keys.stage, []).append(keys)
        self.throughput = Throughput()
        self._client = client
        self._owns_client = client is None

    @property
    def client(self) -> Client:
        # made on first use, inside the serving event loop
        if self._client is None:
            self._client = connect(client_settings(self.settings))
        return self._client

    async def aclose(self) -> None:
        if self._owns_client and self._client is not None:
            await self._client.aclose()
            self._client = None
        if self._db is not None:
            self._db.dispose()
            self._db = None

    async def read_db(self, fn: Any, *args: Any) -> Any:
        """``fn(session, *args)`` in a worker thread; 503 when there is no database (a
        missing SQLite file is never created here) or it does not answer in time."""
        from ops.exporter import sqlite_file
        from processors.database import Database

        url = self.app_settings.database_url
        path = sqlite_file(url)
        if path is not None and not path.exists():
            raise HTTPException(503, f"no database at {path}: trackers and the map need one")
        if self._db is None:
            self._db = Database(url)
        try:
            return await asyncio.wait_for(self._db.run(fn, *args), DB_TIMEOUT_S)
        except TimeoutError:
            raise HTTPException(
                503, f"the database did not answer within {DB_TIMEOUT_S:g} s"
            ) from None
        except LookupError as exc:
            raise HTTPException(404, str(exc.args[0])) from None
        except Exception as exc:
            from sqlalchemy.exc import DBAPIError

            if isinstance(exc, DBAPIError):
                cause = " ".join(str(exc.orig or exc).split())
                raise HTTPException(503, f"the database is unavailable: {cause}") from None
            raise

    def authorize_read(self, request: Request) -> None:
        if not self.read_token:
            return
        given = _bearer(request)
        if given is not None and any(
            hmac.compare_digest(given.encode(), t.encode())
            for t in (self.read_token, self.token)
            if t
        ):
            return
        raise HTTPException(
            401,
            "this dashboard needs a read token: 'Authorization: Bearer <token>' "
            "(TRACKSTREAM_DASHBOARD_READ_TOKEN)",
            headers={"WWW-Authenticate": "Bearer"},
        )

    def stage_keys(self, stage: str) -> list[StageKeys]:
        try:
            return self.keys[stage]
        except KeyError:
            known = ", ".join(self.keys)
            raise HTTPException(404, f"unknown stage {stage!r}; stages are: {known}") from None

    def dead_letters(self, keys: StageKeys) -> DeadLetters:
        return DeadLetters(self.client, keys, self.url)

    async def find(self, stage: str, dlq_id: str) -> DeadLetters | None:
        """The shard's dead letters that hold ``dlq_id``, if any."""
        for keys in self.stage_keys(stage):
            dl = self.dead_letters(keys)
            if await dl.get(dlq_id) is not None:
                return dl
        return None

    def authorize(self, request: Request) -> None:
        if not self.token:
            raise HTTPException(403, f"mutating endpoints are disabled: {TOKEN_HINT}")
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            given.strip().encode(), self.token.encode()
        ):
            raise HTTPException(
                401,
                "a valid 'Authorization: Bearer <token>' header is required",
                headers={"WWW-Authenticate": "Bearer"},
            )


def _bearer(request: Request) -> str | None:
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    return given.strip() if scheme.lower() == "bearer" and given.strip() else None


def _dashboard(request: Request) -> Dashboard:
    dashboard: Dashboard = request.app.state.dashboard
    return dashboard


def _age_s(ms: int | None) -> float | None:
    return None if ms is None else ms / 1000


def _shard_view(status: StageStatus, dead_after_ms: int) -> dict[str, Any]:
    return {
        "shard": status.shard,
        "length": status.length,
        "lag": backlog(status),
        "lag_exact": all(s.lag_exact for s in status.streams if s.group_exists),
        "pending": status.pending,
        "oldest_pending_age_s": _age_s(status.oldest_pending_age_ms),
        "dead_letters": status.dead_letters,
        "consumers": len(status.consumers),
        "live_consumers": len(status.live_consumers(dead_after_ms)),
    }


def _consumer_view(status: StageStatus, dead_after_ms: int) -> list[dict[str, Any]]:
    return [
        {
            "shard": status.shard,
            "name": c.name,
            "pending": c.pending,
            "idle_ms": c.idle_ms,
            "heartbeat_age_ms": c.heartbeat_age_ms,
            "live": c.heartbeat_age_ms is not None and c.heartbeat_age_ms < dead_after_ms,
        }
        for c in status.consumers
    ]


def _stage_view(stage: str, shards: list[dict[str, Any]]) -> dict[str, Any]:
    def total(name: str) -> int:
        return sum(int(s[name]) for s in shards)

    ages = [s["oldest_pending_age_s"] for s in shards if s["oldest_pending_age_s"] is not None]
    return {
        "stage": stage,
        "shards": len(shards),
        "length": total("length"),
        "lag": total("lag"),
        "lag_exact": all(s["lag_exact"] for s in shards),
        "pending": total("pending"),
        "oldest_pending_age_s": max(ages) if ages else None,
        "dead_letters": total("dead_letters"),
        "consumers": total("consumers"),
        "live_consumers": total("live_consumers"),
        "shard_detail": shards,
    }


def _health_view(healths: list[_health.Health]) -> dict[str, Any]:
    """A stage's health over its shards, judged like ``status`` does (the thresholds
    of :mod:`ops.commands._health`)."""
    lags = [h.lag_age_ms for h in healths if h.lag_age_ms is not None]
    dead = [h.newest_dead_letter_age_ms for h in healths if h.newest_dead_letter_age_ms is not None]
    short = [
        h.arrivals_per_min - h.capacity_per_min
        for h in healths
        if h.arrivals_per_min is not None and h.capacity_per_min is not None
    ]
    return {
        "lag_age_s": max(lags) / 1000 if lags else None,
        "newest_dead_letter_age_s": min(dead) / 1000 if dead else None,
        "falls_behind_per_min": round(sum(short), 1) if short and sum(short) > 0 else None,
        "max_lag_age_s": _health.MAX_LAG_AGE_S,
        "recent_dead_s": _health.RECENT_DEAD_S,
        "max_dead_letters": _health.MAX_DEAD_LETTERS,
    }


def _entry_id(value: str) -> str:
    if not ENTRY_ID.match(value):
        raise HTTPException(400, f"{value!r} is not a stream entry id (like 1700000000000-0)")
    return value


# ------------------------------------------------------------------------ endpoints
async def index(request: Request) -> Response:
    page: str = request.app.state.page
    d = _dashboard(request)
    return HTMLResponse(
        page,
        headers={
            "Cache-Control": "no-store",
            "Content-Security-Policy": csp(d.app_settings.map_tiles_url),
        },
    )


async def healthz(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def readyz(request: Request) -> Response:
    d = _dashboard(request)
    try:
        await asyncio.wait_for(d.client.ping(), READY_TIMEOUT_S)
    except Exception as exc:
        reason = str(exc) or type(exc).__name__
        return JSONResponse(
            {"status": "unavailable", "reason": f"Redis at {redact(d.url)}: {reason}"},
            status_code=503,
        )
    return JSONResponse({"status": "ok"})


async def stages(request: Request) -> Response:
    d = _dashboard(request)
    everything = [k for shards in d.keys.values() for k in shards]
    statuses = await stage_statuses(d.client, everything, d.url)
    dead_after_ms = d.settings.consumer_dead_after_ms
    now_ms = time.time_ns() // 1_000_000
    healths = [
        await _health.health(d.client, k, st, now_ms, d.app_settings)
        for k, st in zip(everything, statuses, strict=True)
    ]
    out = []
    for stage, shard_keys in d.keys.items():
        mine = [st for st, k in zip(statuses, everything, strict=True) if k in shard_keys]
        view = _stage_view(stage, [_shard_view(st, dead_after_ms) for st in mine])
        view["fed_by"] = FED_BY.get(stage)
        view.update(
            _health_view([h for h, k in zip(healths, everything, strict=True) if k in shard_keys])
        )
        view["throughput_per_s"] = d.throughput.observe(
            stage, view["length"] - view["lag"] - view["pending"]
        )
        view["consumer_detail"] = [c for st in mine for c in _consumer_view(st, dead_after_ms)]
        out.append(view)
    kept = await _retention.retention(d.client, d.settings, everything)
    for view in out:
        trims = [s for s in kept["shards"] if s["stage"].split(".")[0] == view["stage"]]
        ages = [s["last_trim_age_ms"] for s in trims]
        view["last_trim_age_s"] = None if None in ages or not ages else max(ages) / 1000
    return JSONResponse(
        {
            "prefix": d.settings.prefix,
            "retention": {k: v for k, v in kept.items() if k != "shards"},
            "consumer_dead_after_ms": dead_after_ms,
            "mutations_enabled": d.token is not None,
            "now_ms": time.time_ns() // 1_000_000,
            "stages": out,
        }
    )


async def consumers(request: Request) -> Response:
    d = _dashboard(request)
    stage = request.path_params["stage"]
    shard_keys = d.stage_keys(stage)
    statuses = await stage_statuses(d.client, shard_keys, d.url)
    dead_after_ms = d.settings.consumer_dead_after_ms
    rows = [c for st in statuses for c in _consumer_view(st, dead_after_ms)]
    return JSONResponse({"stage": stage, "consumers": rows})


async def list_dead_letters(request: Request) -> Response:
    d = _dashboard(request)
    stage = request.path_params["stage"]
    shard_keys = d.stage_keys(stage)
    category = request.query_params.get("category") or None
    if category is not None and category not in CATEGORIES:
        raise HTTPException(400, f"category must be one of: {', '.join(CATEGORIES)}")
    try:
        limit = int(request.query_params.get("limit", "100"))
    except ValueError:
        raise HTTPException(400, "limit must be an integer") from None
    if not 1 <= limit <= MAX_LIMIT:
        raise HTTPException(400, f"limit must be between 1 and {MAX_LIMIT}")
    letters: list[dict[str, Any]] = []
    total = 0
    for keys in shard_keys:
        dl = d.dead_letters(keys)
        total += await dl.count()
        for letter in await dl.list(category=category, limit=limit):
            letters.append({**letter.as_dict(), "shard": keys.shard})
    letters.sort(key=lambda x: (x["failed_ms"], x["id"]))
    return JSONResponse({"stage": stage, "total": total, "dead_letters": letters[:limit]})


async def show_dead_letter(request: Request) -> Response:
    d = _dashboard(request)
    stage, dlq_id = request.path_params["stage"], _entry_id(request.path_params["id"])
    for keys in d.stage_keys(stage):
        letter = await d.dead_letters(keys).get(dlq_id)
        if letter is not None:
            return JSONResponse({**letter.as_dict(), "shard": keys.shard})
    raise HTTPException(404, f"no dead letter {dlq_id} in {stage}")


async def redrive_one(request: Request) -> Response:
    d = _dashboard(request)
    d.authorize(request)
    stage, dlq_id = request.path_params["stage"], _entry_id(request.path_params["id"])
    dl = await d.find(stage, dlq_id)
    new_id = (await dl.redrive([dlq_id]))[dlq_id] if dl else None
    if new_id is None:
        raise HTTPException(404, f"no dead letter {dlq_id} in {stage} (or already redriven)")
    return JSONResponse({"redriven": {dlq_id: new_id}})


async def redrive_many(request: Request) -> Response:
    d = _dashboard(request)
    d.authorize(request)
    stage = request.path_params["stage"]
    d.stage_keys(stage)
    try:
        body = await request.json()
    except ValueError:
        raise HTTPException(400, 'the body must be JSON: {"ids": ["<id>", ...]}') from None
    ids = body.get("ids") if isinstance(body, dict) else None
    if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
        raise HTTPException(400, 'the body must be JSON: {"ids": ["<id>", ...]}')
    if len(ids) > MAX_IDS:
        raise HTTPException(400, f"at most {MAX_IDS} ids at once")
    result: dict[str, str | None] = {}
    for dlq_id in [_entry_id(i) for i in ids]:  # every id checked before any is redriven
        dl = await d.find(stage, dlq_id)
        result[dlq_id] = (await dl.redrive([dlq_id]))[dlq_id] if dl else None
    return JSONResponse({"redriven": result})


async def delete_dead_letter(request: Request) -> Response:
    d = _dashboard(request)
    d.authorize(request)
    stage, dlq_id = request.path_params["stage"], _entry_id(request.path_params["id"])
    dl = await d.find(stage, dlq_id)
    if dl is None or not await dl.purge([dlq_id]):
        raise HTTPException(404, f"no dead letter {dlq_id} in {stage}")
    return JSONResponse({"deleted": [dlq_id]})


class ReadGuard(BaseHTTPMiddleware):
    """With a read token configured, every ``/api`` request must carry it (or the
    mutation token, which the mutating endpoints check themselves as well)."""

    async def dispatch(self, request: Request, call_next: RequestResponseEndpoint) -> Response:
        if request.url.path.startswith("/api/"):
            try:
                _dashboard(request).authorize_read(request)
            except HTTPException as exc:
                return JSONResponse({"error": exc.detail}, exc.status_code, headers=exc.headers)
        return await call_next(request)


# -------------------------------------------------------------------------- errors
async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    return JSONResponse({"error": exc.detail}, exc.status_code, headers=exc.headers)


async def _unavailable(request: Request, exc: Exception) -> Response:
    return JSONResponse({"error": str(exc)}, 503)


async def _streams_error(request: Request, exc: Exception) -> Response:
    return JSONResponse({"error": str(exc)}, 500)


def create_app(
    stream_settings: StreamSettings, app_settings: AppSettings, *, client: Client | None = None
) -> Starlette:
    """The dashboard app. Without ``client`` it connects on first use and closes on exit."""
    dashboard = Dashboard(stream_settings, app_settings, client)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        try:
            yield
        finally:
            await dashboard.aclose()
            if getattr(app.state, "webhook_db", None) is not None:
                app.state.webhook_db.dispose()

    stage = "/api/stages/{stage}"
    from ops.dashboard import console, entries, events, partitions, subscriptions

    static = resources.files("ops.dashboard").joinpath("static")
    app = Starlette(
        routes=[
            Route("/", index),
            Route("/healthz", healthz),
            Route("/readyz", readyz),
            Mount("/static", StaticFiles(directory=str(static)), name="static"),
            Route("/api/trackers", console.trackers),
            Route("/api/map", console.map_view),
            Route("/api/trace/{tracker}", console.trace),
            Route("/api/search", console.search),
            Route("/api/workers", console.workers),
            Route("/api/history", console.history),
            Route(f"{stage}/dlq/bulk", console.bulk, methods=["POST"]),
            Route("/api/stages", stages),
            Route(f"{stage}/consumers", consumers),
            Route(f"{stage}/dlq", list_dead_letters),
            Route(f"{stage}/dlq/redrive", redrive_many, methods=["POST"]),
            Route(f"{stage}/dlq/{{id}}/redrive", redrive_one, methods=["POST"]),
            Route(f"{stage}/dlq/{{id}}", show_dead_letter, methods=["GET"]),
            Route(f"{stage}/dlq/{{id}}", delete_dead_letter, methods=["DELETE"]),
            Route("/api/webhooks", webhooks),
            Route("/api/webhooks/health", subscriptions.subscription_health),
            Route("/api/webhooks/{id}/pause", subscriptions.pause, methods=["POST"]),
            Route("/api/webhooks/{id}/resume", subscriptions.resume, methods=["POST"]),
            Route("/api/events", events.events),
            Route(f"{stage}/entries", entries.page),
            Route("/api/entries/{id}", entries.find),
            Route("/api/partitions", partitions.partitions),
        ],
        exception_handlers={
            HTTPException: _http_error,
            RedisUnavailable: _unavailable,
            rex.ConnectionError: _unavailable,
            rex.TimeoutError: _unavailable,
            rex.RedisClusterException: _unavailable,
            StreamsError: _streams_error,
        },
        middleware=[Middleware(ReadGuard)],
        lifespan=lifespan,
    )
    app.state.dashboard = dashboard
    app.state.database_url = app_settings.database_url
    app.state.page = resources.files("ops.dashboard").joinpath("index.html").read_text("utf-8")
    return app

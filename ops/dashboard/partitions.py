"""``GET /api/partitions``: the stored history's size per partition and what retention
drops next, as ``trackstream history status`` shows them (:func:`schemas.history.status`;
on SQLite each table is one "partition")."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy.orm import Session
from starlette.requests import Request
from starlette.responses import JSONResponse, Response


def _iso(at: datetime | None) -> str | None:
    if at is None:
        return None
    at = at if at.tzinfo else at.replace(tzinfo=UTC)
    return at.isoformat(timespec="seconds").replace("+00:00", "Z")


def _part(p: Any) -> dict[str, Any]:
    return {
        "table": p.table,
        "partition": p.name,
        "from": _iso(p.start),
        "to": _iso(p.end),
        "default": p.start is None and p.name != p.table,
        "rows": p.rows,
        "bytes": p.bytes,
        "oldest": _iso(p.oldest),
        "newest": _iso(p.newest),
    }


def read(session: Session, now: datetime, retention_days: int | None) -> dict[str, Any]:
    from schemas import history

    st = history.status(session.get_bind(), now, retention_days)  # type: ignore[arg-type]
    return {
        "dialect": session.get_bind().dialect.name,
        "retention_days": st.retention_days,
        "partitions": [_part(p) for p in st.partitions],
        "next_drop": [_part(p) for p in st.next_drop],
        "next_drop_at": _iso(st.next_drop_at),
        "now": _iso(now),
    }


async def partitions(request: Request) -> Response:
    d = request.app.state.dashboard
    now = datetime.now(UTC)
    return JSONResponse(await d.read_db(read, now, d.app_settings.history_retention_days))

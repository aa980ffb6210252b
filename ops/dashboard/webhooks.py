"""``GET /api/webhooks``: the notify stage's subscriptions (never their secrets) and its
latest delivery attempts, read from the database."""

from __future__ import annotations

import asyncio
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

RECENT = 30


async def webhooks(request: Request) -> Response:
    from processors.database import Database
    from schemas import webhook_store

    state = request.app.state
    db = getattr(state, "webhook_db", None)
    if db is None:
        db = state.webhook_db = Database(state.database_url)

    def read(session: Any) -> dict[str, Any]:
        return {
            "subscriptions": webhook_store.subscription_rows(session, include_inactive=False),
            "deliveries": webhook_store.recent_attempts(session, RECENT),
        }

    try:
        body = await asyncio.wait_for(db.run(read), 5)
    except Exception as exc:  # the page shows it; the rest of the dashboard carries on
        return JSONResponse({"error": f"database: {type(exc).__name__}"}, 503)
    return JSONResponse(body)

"""view-refresh: coalesces ViewsChanged notices and refreshes each view at most once per
``interval_s``, recreating a view that is missing or broken.

A notice is satisfied once a refresh of its views *started* after the notice was
produced (the refresh saw every change committed before it). A notice that arrives
within the interval of the last refresh is deferred (no delivery spent) until the
interval ends; by then a refresh covers it, so it is acked. The last refresh time of
each view is kept in Redis (stage state), so several view-refresh workers share the
interval.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping, Sequence

from processors.database import Database
from schemas import views
from schemas.events import ViewsChanged
from streams.connection import Client
from streams.consumer import Context
from streams.errors import Defer
from streams.keys import StageKeys
from streams.message import Message


class ViewRefreshStage:
    def __init__(self, db: Database, client: Client, keys: StageKeys, interval_s: float):
        self.db = db
        self.client = client
        self.keys = keys
        self.interval_ms = int(interval_s * 1000)
        self.refreshes: dict[str, int] = {}
        self.recreated: dict[str, int] = {}

    async def _last_refresh_ms(self, view: str) -> int:
        raw = await self.client.get(self.keys.state(f"refreshed:{view}"))
        return int(raw) if raw else 0

    async def refresh(self, view: str) -> None:
        started_ms = time.time_ns() // 1_000_000
        engine = self.db.engine
        if await asyncio.to_thread(views.view_health, engine, view) != "ok":
            await asyncio.to_thread(views.recreate_view, engine, view)
            self.recreated[view] = self.recreated.get(view, 0) + 1
        else:
            await asyncio.to_thread(views.refresh_view, engine, view)
        await self.client.set(self.keys.state(f"refreshed:{view}"), started_ms)
        self.refreshes[view] = self.refreshes.get(view, 0) + 1

    async def handle_batch(
        self, msgs: Sequence[Message[ViewsChanged]], ctx: Context
    ) -> Mapping[str, BaseException] | None:
        now_ms = time.time_ns() // 1_000_000
        wanted = {v for m in msgs for v in m.payload.views}
        waits: dict[str, int] = {}
        for view in sorted(wanted):
            last_ms = await self._last_refresh_ms(view)
            if all(_produced(m) < last_ms for m in msgs if view in m.payload.views):
                continue  # a refresh that started after these notices covers them
            since = now_ms - last_ms
            if since >= self.interval_ms:
                await self.refresh(view)
            else:
                waits[view] = self.interval_ms - since
        failures: dict[str, BaseException] = {}
        for m in msgs:
            pending = [waits[v] for v in m.payload.views if v in waits]
            if pending:
                # waiting for the interval is not a failure: no delivery is spent
                failures[m.entry_id] = Defer("coalescing view refresh", delay_ms=max(pending) + 5)
        return failures


def _produced(msg: Message[ViewsChanged]) -> int:
    return msg.envelope.produced_ms if msg.envelope else 0

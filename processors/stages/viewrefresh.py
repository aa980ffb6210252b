"""view-refresh: records what ViewsChanged notices say changed and refreshes each view
at most once per ``interval_s``, recreating a view that is missing or broken.

The views are kept incrementally (:mod:`schemas.views`): a notice's trackers are
recorded in the database (``view_changes``) when it first arrives, and a refresh
rewrites only the rows of the trackers recorded since the last one, so its cost
follows what changed, not the size of the history.

A notice is satisfied once a refresh *started* after its trackers were recorded (that
refresh took them). A notice that arrives within the interval of the last refresh is
deferred (no delivery spent) until the interval ends; by then a refresh covers it, so
it is acked. When each notice was recorded, and the last refresh time of each view,
are kept in Redis (stage state), so several view-refresh workers share the interval;
a slot key taken with ``SET NX PX interval`` lets only one of them start a refresh.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence

from sqlalchemy import Engine

from processors.database import Database
from schemas import views
from schemas.events import ViewsChanged
from streams.connection import Client
from streams.consumer import Context
from streams.errors import Defer, Reject
from streams.keys import StageKeys
from streams.message import Message

NOTED_TTL_MS = 24 * 3600 * 1000


class ViewRefreshStage:
    def __init__(self, db: Database, client: Client, keys: StageKeys, interval_s: float):
        self.db = db
        self.client = client
        self.keys = keys
        self.interval_ms = int(interval_s * 1000)
        self.refreshes: dict[str, int] = {}
        self.recreated: dict[str, int] = {}
        self.trackers_refreshed = 0

    async def _last_refresh_ms(self, view: str) -> int:
        raw = await self.client.get(self.keys.state(f"refreshed:{view}"))
        return int(raw) if raw else 0

    async def refresh(self, view: str) -> None:
        started_ms = time.time_ns() // 1_000_000
        if await self.db.run_engine(views.view_health, view) != "ok":
            await self.db.run_engine(views.recreate_view, view)
            self.recreated[view] = self.recreated.get(view, 0) + 1
        else:
            done = await self.db.run_engine(views.refresh_view, view)
            self.trackers_refreshed += done or 0
        await self.client.set(self.keys.state(f"refreshed:{view}"), started_ms)
        self.refreshes[view] = self.refreshes.get(view, 0) + 1

    async def _take_slot(self, view: str) -> int:
        """0 if this worker may refresh ``view`` now: at most one refresh starts per
        interval across workers (``SET NX PX``); otherwise the ms until it may."""
        if self.interval_ms <= 0:
            return 0
        key = self.keys.state(f"slot:{view}")
        if await self.client.set(key, 1, nx=True, px=self.interval_ms):
            return 0
        return max(1, int(await self.client.pttl(key)))

    def _noted_key(self, msg: Message[ViewsChanged]) -> str:
        return self.keys.state(f"noted:{msg.entry_id}")

    async def _noted(self, msgs: Sequence[Message[ViewsChanged]]) -> dict[str, int]:
        """When each notice's changes were recorded (unix ms); records the new ones."""
        pipe = self.client.pipeline(transaction=False)
        for m in msgs:
            pipe.get(self._noted_key(m))
        found = await pipe.execute()
        noted = {m.entry_id: int(v) for m, v in zip(msgs, found, strict=True) if v}
        new = [m for m in msgs if m.entry_id not in noted]
        if new:
            await self.db.run_engine(_record, new)
            at_ms = time.time_ns() // 1_000_000  # after the commit
            pipe = self.client.pipeline(transaction=False)
            for m in new:
                pipe.set(self._noted_key(m), at_ms, px=NOTED_TTL_MS)
                noted[m.entry_id] = at_ms
            await pipe.execute()
        return noted

    async def handle_batch(
        self, msgs: Sequence[Message[ViewsChanged]], ctx: Context
    ) -> Mapping[str, BaseException] | None:
        failures: dict[str, BaseException] = {}
        good = []
        for m in msgs:
            unknown = [v for v in m.payload.views if v not in views.VIEW_NAMES]
            if unknown:
                names = ", ".join(views.VIEW_NAMES)
                failures[m.entry_id] = Reject(f"unknown view(s) {unknown}; views are: {names}")
            else:
                good.append(m)
        if not good:
            return failures
        now_ms = time.time_ns() // 1_000_000
        noted = await self._noted(good)
        wanted = {v for m in good for v in m.payload.views}
        waits: dict[str, int] = {}
        for view in sorted(wanted):
            last_ms = await self._last_refresh_ms(view)
            if all(noted[m.entry_id] < last_ms for m in good if view in m.payload.views):
                continue  # a refresh that started after these were recorded took them
            since = now_ms - last_ms
            if since < self.interval_ms:
                waits[view] = self.interval_ms - since
            elif (wait_ms := await self._take_slot(view)) > 0:
                waits[view] = wait_ms  # another worker is refreshing it now
            else:
                await self.refresh(view)
        done = []
        for m in good:
            pending = [waits[v] for v in m.payload.views if v in waits]
            if pending:
                # waiting for the interval is not a failure: no delivery is spent
                failures[m.entry_id] = Defer("coalescing view refresh", delay_ms=max(pending) + 5)
            else:
                done.append(m)
        if done:
            await self.client.delete(*(self._noted_key(m) for m in done))
        return failures


def _record(engine: Engine, msgs: Sequence[Message[ViewsChanged]]) -> None:
    """Records the notices' changed trackers, one statement per view for the batch."""
    changed: dict[str, set[str]] = {}
    for m in msgs:
        for view in m.payload.views:
            changed.setdefault(view, set()).update(m.payload.tracker_ids or [views.ANY_TRACKER])

    def record() -> None:
        with engine.begin() as conn:
            for view, ids in sorted(changed.items()):
                views.note_changes(conn, [view], ids)

    try:
        record()
    except Exception:
        if not views.ensure_changes_table(engine):
            raise
        record()  # it was missing (dropped by hand): created again

"""The consumer's observers, typed: one method per ``on_*`` hook of
:class:`~streams.middleware.Middleware`, called on every middleware in order.

An observer that raises is logged and skipped: observers never break consumption.
Only the middleware that override a hook are called for it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

from streams.message import Message
from streams.middleware import Middleware

log = logging.getLogger("streams.consumer")


class Hooks:
    def __init__(self, stage: str, middleware: Sequence[Middleware]) -> None:
        self.stage = stage
        self.middleware = tuple(middleware)
        self._calls: dict[str, tuple[Callable[..., None], ...]] = {}
        for name in dir(Middleware):
            if name.startswith("on_"):
                base = getattr(Middleware, name)
                self._calls[name] = tuple(
                    getattr(mw, name)
                    for mw in self.middleware
                    if getattr(type(mw), name, base) is not base or name in vars(mw)
                )

    def _call(self, hook: str, *args: Any) -> None:
        for call in self._calls[hook]:
            try:
                call(self.stage, *args)
            except Exception:  # observers must never break consumption
                log.exception("middleware %s failed", getattr(call, "__qualname__", hook))

    def wants(self, hook: str) -> bool:
        return bool(self._calls[hook])

    def acked(self, count: int) -> None:
        self._call("on_acked", count)

    def failed(self, msg: Message[Any], exc: BaseException, category: str) -> None:
        self._call("on_failed", msg, exc, category)

    def retry(self, msg: Message[Any], delay_ms: int) -> None:
        self._call("on_retry", msg, delay_ms)

    def deferred(self, msg: Message[Any], delay_ms: int, reason: str) -> None:
        self._call("on_deferred", msg, delay_ms, reason)

    def dead_letter(self, msg: Message[Any], category: str, error: str) -> None:
        self._call("on_dead_letter", msg, category, error)

    def claimed(self, count: int) -> None:
        self._call("on_claimed", count)

    def group_recreated(self, stream: str) -> None:
        self._call("on_group_recreated", stream)

    def backlog(self, pending: int, lag: int | None) -> None:
        self._call("on_backlog", pending, lag)

    def redis_error(self, kind: str, reason: str) -> None:
        self._call("on_redis_error", kind, reason)

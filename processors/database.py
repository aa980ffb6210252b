"""The stages' door to the database: sync SQLAlchemy work run in a thread, one
transaction per call, so the event loop never blocks on I/O.

Database errors are classified here, in one place (:func:`classify_db_error`), and
translated in one place, :meth:`Database.run` (and :meth:`Database.run_engine`, its
twin for work on the engine): the stages see :class:`DatabaseUnavailable` or a real
failure, never a rule of their own on top.

- ``"down"``: the database cannot be reached or is going away (connection refused or
  reset, server closed the connection, admin/crash shutdown, starting up, too many
  connections). :meth:`Database.run` raises
  :class:`DatabaseUnavailable`, a :class:`~streams.errors.Defer` (the entry is
  redelivered without spending a delivery), and the gate :meth:`Database.ready` holds
  every worker's reads until a probe (``SELECT 1``, backoff up to 5 s) succeeds, so an
  outage of any length dead-letters nothing.
- ``"conflict"``: serialization failure, deadlock detected, lock not available, no
  pooled connection free in time. Also
  :class:`DatabaseUnavailable` (retried soon, no delivery spent); the gate stays open.
- anything else (``None``): a real failure, retried with backoff and dead-lettered in
  the end like any handler error.

A connection that failed is invalidated by SQLAlchemy and the session that used it is
discarded (each call has its own); ``pool_pre_ping`` replaces stale pooled connections
after an outage. A call cut short by its handler timeout never leaves its transaction
running behind the consumer's back: the thread is told to roll back instead of
committing, the caller waits for it, and on PostgreSQL ``statement_timeout`` bounds how
long a statement can run.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import random
import sqlite3
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any, Literal, TypeVar

from sqlalchemy import exc as sa_exc
from sqlalchemy import text
from sqlalchemy.orm import Session

from schemas.db import make_engine, normalize_url, session_factory
from streams.errors import Defer
from streams.retries import backoff

T = TypeVar("T")
log = logging.getLogger("trackstream.database")

Kind = Literal["down", "conflict"]

# SQLSTATEs that say "the database is not there (now)", by class or code
_DOWN_CLASSES = ("08",)  # connection exception
_DOWN_CODES = frozenset(
    {
        "57P01",  # admin_shutdown
        "57P02",  # crash_shutdown
        "57P03",  # cannot_connect_now (starting up, recovering)
        "53300",  # too_many_connections
        "58030",  # io_error
    }
)
_CONFLICT_CODES = frozenset(
    {
        "40001",  # serialization_failure
        "40P01",  # deadlock_detected
        "55P03",  # lock_not_available
    }
)
_PROBE_MAX_DELAY_S = 5.0


class DatabaseUnavailable(Defer):
    """The database is down or the transaction lost a conflict: not the entry's fault.
    A :class:`~streams.errors.Defer`, so the consumer redelivers without counting."""

    def __init__(self, reason: str, kind: Kind, delay_ms: int) -> None:
        super().__init__(reason, delay_ms=delay_ms)
        self.kind = kind


class Abandoned(Exception):
    """The caller stopped waiting (handler timeout): the transaction was rolled back."""


def _sqlstate(exc: BaseException) -> str | None:
    state = getattr(exc, "sqlstate", None) or getattr(exc, "pgcode", None)
    return str(state) if state else None


def _causes(exc: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    todo: list[BaseException | None] = [exc]
    while todo:
        e = todo.pop()
        if e is None or any(e is s for s in seen) or len(seen) > 20:
            continue
        seen.append(e)
        todo += [getattr(e, "orig", None), e.__cause__, e.__context__]
    return seen


def classify_db_error(exc: BaseException) -> Kind | None:
    """``"down"``, ``"conflict"`` or None (a real failure); see the module docstring."""
    if isinstance(exc, DatabaseUnavailable):
        return exc.kind
    for e in _causes(exc):
        if isinstance(e, sa_exc.DBAPIError) and e.connection_invalidated:
            return "down"
        if isinstance(e, sa_exc.PendingRollbackError):
            return "down"  # a session whose connection died
        if isinstance(e, sa_exc.TimeoutError):
            return "conflict"  # no pooled connection free in time: busy, not down
        state = _sqlstate(e)
        if state is not None:
            if state in _CONFLICT_CODES:
                return "conflict"
            if state in _DOWN_CODES or state[:2] in _DOWN_CLASSES:
                return "down"
            continue
        if isinstance(e, sqlite3.OperationalError) and "locked" in str(e):
            return "conflict"  # busy beyond the busy timeout
        if _is_psycopg_operational(e) or isinstance(e, ConnectionError):
            return "down"  # no SQLSTATE: refused, reset, closed unexpectedly
    return None


def _is_psycopg_operational(e: BaseException) -> bool:
    mod = type(e).__module__
    return (
        mod.startswith("psycopg")
        and type(e).__name__ in ("OperationalError", "InterfaceError")
        and _sqlstate(e) is None
    )


def is_permanent(exc: BaseException) -> bool:
    """A data error the same row will hit again (a NUL byte, a value out of range, a
    constraint): retrying cannot help."""
    for e in _causes(exc):
        if isinstance(e, sa_exc.DataError | sa_exc.IntegrityError):
            return True
        mod = type(e).__module__
        if mod.startswith("psycopg") and type(e).__name__ in ("DataError", "IntegrityError"):
            return True
        state = _sqlstate(e)
        if state is not None and state[:2] in ("22", "23"):
            return True
    return False


class Database:
    def __init__(
        self,
        url: str,
        *,
        statement_timeout_ms: int | None = None,
        connect_timeout_s: int = 5,
    ) -> None:
        self.url = url
        kwargs: dict[str, Any] = {}
        if normalize_url(url).get_backend_name() == "postgresql":
            connect_args: dict[str, Any] = {"connect_timeout": connect_timeout_s}
            # no JIT: the stages' statements are short, and on the partitioned history
            # the planner's cost of a batch read (one probe per partition and tracker)
            # passes the JIT thresholds; compiling it took 4.5 s of a 4.5 s read at 10
            # million rows (42 ms without)
            options = ["-c jit=off"]
            if statement_timeout_ms:
                options.append(f"-c statement_timeout={int(statement_timeout_ms)}")
            connect_args["options"] = " ".join(options)
            kwargs["connect_args"] = connect_args
        self.engine = make_engine(url, **kwargs)
        self.sessions = session_factory(self.engine)
        self.down_since: float | None = None  # monotonic time the outage was noticed
        self.outages = 0
        self._probe_lock: asyncio.Lock | None = None

    # -- calls

    def run_sync(
        self,
        fn: Callable[..., T],
        *args: Any,
        _cancelled: threading.Event | None = None,
        **kwargs: Any,
    ) -> T:
        with self.sessions() as session, session.begin():
            result = fn(session, *args, **kwargs)
            if _cancelled is not None and _cancelled.is_set():
                raise Abandoned("the caller stopped waiting: rolled back, not committed")
        return result

    async def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``fn(session, *args)`` in one transaction, in a worker thread.

        Raises :class:`DatabaseUnavailable` when the database is down or the transaction
        lost a conflict. If the caller is cancelled (its timeout), the transaction is
        rolled back unless it already committed, and the caller waits for that."""
        cancelled = threading.Event()
        work = functools.partial(self.run_sync, fn, *args, _cancelled=cancelled, **kwargs)
        task = asyncio.ensure_future(asyncio.to_thread(work))
        try:
            result = await asyncio.shield(task)
        except asyncio.CancelledError:
            cancelled.set()
            await _wait_out(task)
            raise
        except Exception as exc:
            raise self.translate(exc) from exc
        self._up()
        return result

    async def run_engine(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(engine, *args)`` in a worker thread, for work that manages its own
        connections and transactions (view refreshes, pruning); errors are translated
        as by :meth:`run`, the one place that translates them."""
        try:
            result = await asyncio.to_thread(fn, self.engine, *args)
        except Exception as exc:
            raise self.translate(exc) from exc
        self._up()
        return result

    def translate(self, exc: BaseException) -> BaseException:
        """``exc`` as :class:`DatabaseUnavailable` when it says the database is down or a
        conflict was lost (noting an outage); otherwise ``exc`` itself."""
        if isinstance(exc, DatabaseUnavailable):
            return exc
        kind = classify_db_error(exc)
        if kind is None:
            return exc
        if kind == "conflict":
            return DatabaseUnavailable(
                f"database conflict, retrying: {_short(exc)}", kind, 20 + random.randrange(200)
            )
        self._down(exc)
        return DatabaseUnavailable(f"database unavailable: {_short(exc)}", kind, 1_000)

    def session(self) -> Session:
        return self.sessions()

    def dispose(self) -> None:
        self.engine.dispose()

    # -- outages

    @property
    def is_down(self) -> bool:
        return self.down_since is not None

    def _down(self, exc: BaseException) -> None:
        if self.down_since is None:
            self.down_since = time.monotonic()
            self.outages += 1
            log.error("database unavailable (%s): holding reads until it answers", _short(exc))
            # the pooled connections are dead too: drop them rather than ping each
            with contextlib.suppress(Exception):
                self.engine.dispose()

    def _up(self) -> None:
        if self.down_since is not None:
            log.warning(
                "database is back after %.1f s: resuming", time.monotonic() - self.down_since
            )
            self.down_since = None

    def probe_sync(self) -> None:
        with self.engine.connect() as conn:
            conn.execute(text("SELECT 1"))

    async def ready(self) -> None:
        """The workers' gate: returns at once while the database is up; while it is
        down, probes it with backoff and returns once it answers."""
        if self.down_since is None:
            return
        if self._probe_lock is None:
            self._probe_lock = asyncio.Lock()
        async with self._probe_lock:  # one prober per process; the others wait for it
            attempt = 0
            while self.down_since is not None:
                try:
                    await asyncio.to_thread(self.probe_sync)
                except Exception as exc:
                    if classify_db_error(exc) is None:
                        log.warning("database probe: %s", _short(exc))
                    attempt += 1
                    await asyncio.sleep(backoff(attempt, 0.1, _PROBE_MAX_DELAY_S))
                else:
                    self._up()


async def _wait_out(task: Awaitable[Any]) -> None:
    """Wait for the thread's transaction to end, even when cancelled again meanwhile."""
    fut = asyncio.ensure_future(task)
    while not fut.done():
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait({fut})
    with contextlib.suppress(BaseException):
        fut.result()


def _short(exc: BaseException) -> str:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {first[:200]}"

"""processors.database: one classification of database errors, and a call cut short
by its caller's timeout never commits behind its back."""

from __future__ import annotations

import asyncio
import sqlite3
import time

import psycopg
import pytest
from sqlalchemy import exc as sa_exc
from sqlalchemy import text

from processors.database import Database, DatabaseUnavailable, classify_db_error, is_permanent
from tests.servers import free_port


def wrapped(orig: BaseException) -> sa_exc.DBAPIError:
    return sa_exc.OperationalError("SELECT 1", {}, orig)


@pytest.mark.parametrize(
    ("error", "kind"),
    [
        (wrapped(psycopg.OperationalError("server closed the connection unexpectedly")), "down"),
        (wrapped(psycopg.errors.AdminShutdown("terminating connection")), "down"),
        (wrapped(psycopg.errors.CrashShutdown("crash")), "down"),
        (wrapped(psycopg.errors.CannotConnectNow("starting up")), "down"),
        (wrapped(psycopg.errors.TooManyConnections("too many")), "down"),
        (
            sa_exc.PendingRollbackError("Can't reconnect until invalid transaction is rolled back"),
            "down",
        ),
        (wrapped(psycopg.errors.DeadlockDetected("deadlock detected")), "conflict"),
        (wrapped(psycopg.errors.SerializationFailure("could not serialize")), "conflict"),
        (wrapped(sqlite3.OperationalError("database is locked")), "conflict"),
        (wrapped(psycopg.errors.QueryCanceled("statement timeout")), None),
        (wrapped(psycopg.errors.UndefinedTable("no such table")), None),
        (ValueError("a bug"), None),
    ],
)
def test_classify(error: BaseException, kind: str | None) -> None:
    assert classify_db_error(error) == kind


def test_data_errors_are_permanent() -> None:
    nul = sa_exc.DataError("UPDATE", {}, psycopg.DataError("cannot contain NUL (0x00) bytes"))
    assert is_permanent(nul)
    assert not is_permanent(wrapped(psycopg.errors.DeadlockDetected("x")))


async def test_an_unreachable_database_defers_and_closes_the_gate() -> None:
    db = Database(f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/x")
    try:
        with pytest.raises(DatabaseUnavailable) as caught:
            await db.run(lambda s: s.execute(text("SELECT 1")))
        assert caught.value.kind == "down" and db.is_down
        with pytest.raises(TimeoutError):  # the gate holds while it stays down
            await asyncio.wait_for(db.ready(), 0.5)
    finally:
        db.dispose()


async def test_a_timed_out_call_rolls_back_and_is_waited_for(pg_url: str) -> None:
    db = Database(pg_url)
    try:
        db.run_sync(lambda s: s.execute(text("CREATE TABLE t (n int)")))

        def slow_insert(session) -> None:  # type: ignore[no-untyped-def]
            session.execute(text("INSERT INTO t VALUES (1)"))
            time.sleep(0.6)

        started = time.monotonic()
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.1):
                await db.run(slow_insert)
        assert time.monotonic() - started >= 0.5  # waited for the thread's transaction
        assert db.run_sync(lambda s: s.scalar(text("SELECT count(*) FROM t"))) == 0
        await db.run(lambda s: s.execute(text("INSERT INTO t VALUES (2)")))
        assert db.run_sync(lambda s: s.scalar(text("SELECT count(*) FROM t"))) == 1
    finally:
        db.dispose()

"""What every command shares: settings from flags + environment, one Redis client,
and turning known errors into a clear message and exit code (never a traceback)."""

from __future__ import annotations

import contextlib
import logging
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import wraps
from typing import Any, ParamSpec, TypeVar

import typer
from redis import exceptions as rex
from rich.console import Console
from rich.markup import escape
from sqlalchemy.exc import DBAPIError

from processors.config import AppSettings, load
from processors.database import DatabaseUnavailable
from streams.connection import Client, connect, redact
from streams.errors import ConfigError, GroupMissing, RedisUnavailable, StreamsError
from streams.settings import StreamSettings

console = Console()
err_console = Console(stderr=True)

P = ParamSpec("P")
T = TypeVar("T")

EXIT_CONFIG = 2
EXIT_UNAVAILABLE = 3


@dataclass
class Options:
    """Global flags (``trackstream --redis-url ... COMMAND``); None = environment/default."""

    overrides: dict[str, Any] = field(default_factory=dict)

    def settings(self, **more: Any) -> tuple[StreamSettings, AppSettings]:
        return load(**{**self.overrides, **{k: v for k, v in more.items() if v is not None}})


def options(ctx: typer.Context) -> Options:
    obj = ctx.find_root().obj
    return obj if isinstance(obj, Options) else Options()


def client_for(settings: StreamSettings) -> Client:
    return connect(settings)


def fail(message: str, code: int = 1) -> typer.Exit:
    err_console.print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True)  # one line
    return typer.Exit(code)


# the database URL itself is wrong (no such database, bad login): psycopg gives no
# SQLSTATE for a failed connection, only the server's message
_DB_CONFIG = re.compile(
    r'(database|role) "[^"]*" does not exist|password authentication failed|no password supplied'
)


_REDIS_LOGIN = re.compile(
    r"WRONGPASS|NOAUTH|invalid username-password|invalid password|Authentication required"
    r"|called with the client already authenticated",
    re.IGNORECASE,
)


def login_refused(exc: BaseException) -> bool:
    """Redis refused the credentials of ``redis_url`` (a wrong or missing password)."""
    seen: BaseException | None = exc
    for _ in range(10):
        if seen is None:
            return False
        # the start-up probe keeps only the reply's text (ProbeFailed)
        if isinstance(seen, rex.AuthenticationError) or _REDIS_LOGIN.search(str(seen)):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def database_failure(exc: DBAPIError, ctx: Any) -> typer.Exit:
    """A database error as one line: a wrong URL exits 2, an unreachable database 3."""
    url = ""
    if ctx is not None:
        with contextlib.suppress(StreamsError):
            url = redact(options(ctx).settings()[1].database_url)
    text = str(exc.orig or exc).strip()
    cause = " ".join(text.split()) or type(exc).__name__
    if _DB_CONFIG.search(text):
        return fail(f"setting database_url (TRACKSTREAM_DATABASE_URL) {url}: {cause}", EXIT_CONFIG)
    return fail(
        f"the database at {url or 'the configured URL'} is unavailable: {cause}", EXIT_UNAVAILABLE
    )


def handle_errors(fn: Callable[P, T]) -> Callable[P, T]:
    """Known failures become one clear line and a distinct exit code."""

    @wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return fn(*args, **kwargs)
        except DBAPIError as exc:
            ctx = next((a for a in (*args, *kwargs.values()) if hasattr(a, "find_root")), None)
            raise database_failure(exc, ctx) from None
        except DatabaseUnavailable as exc:  # a processor's translation of the same
            ctx = next((a for a in (*args, *kwargs.values()) if hasattr(a, "find_root")), None)
            cause = exc.__cause__
            if isinstance(cause, DBAPIError):
                raise database_failure(cause, ctx) from None
            raise fail(str(exc), EXIT_UNAVAILABLE) from None
        except ConfigError as exc:
            raise fail(str(exc), EXIT_CONFIG) from None
        except RedisUnavailable as exc:
            if login_refused(exc):  # like a wrong database login: the setting is wrong
                raise fail(
                    "setting redis_url (TRACKSTREAM_REDIS_URL): "
                    + str(exc).replace(" is unavailable: ", " refused the login: ", 1),
                    EXIT_CONFIG,
                ) from None
            raise fail(str(exc), EXIT_UNAVAILABLE) from None
        except GroupMissing as exc:
            raise fail(f"{exc} (has the stage run yet?)") from None
        except StreamsError as exc:
            raise fail(str(exc)) from None

    return wrapper


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def shown_url(settings: StreamSettings) -> str:
    return redact(settings.redis_url)

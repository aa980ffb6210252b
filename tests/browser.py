"""Helpers for tests in a real headless browser: Debian's chromium driven by Playwright,
and an ASGI app served by uvicorn on a free loopback port.

``playwright install`` is never needed: Playwright launches a Chromium of the machine's
(``/usr/bin/chromium`` from ``apt-get install chromium``, or ``chromium``,
``chromium-browser`` or ``google-chrome`` on PATH). Without one a browser test is
skipped with that reason, or fails when ``CI=true``.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import uvicorn

from streams.embedded import free_port
from tests.support import wait_for

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")


def find_chromium() -> Path | None:
    if Path("/usr/bin/chromium").exists():
        return Path("/usr/bin/chromium")
    found = next((w for w in map(shutil.which, CHROMIUM_NAMES) if w), None)
    return Path(found) if found else None


CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def require_chromium() -> Path:
    """The machine's Chromium; without one the test is skipped (fails on CI)."""
    found = find_chromium()
    if found is not None:
        return found
    message = (
        "no Chromium found (/usr/bin/chromium, or chromium, chromium-browser, google-chrome "
        "on PATH): apt-get install chromium (Debian), brew install --cask chromium (macOS)"
    )
    if IN_CI:
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


class LiveServer:
    """uvicorn on a free loopback port, in a thread with its own event loop."""

    def __init__(self, app: Any) -> None:
        self.port = free_port()
        config = uvicorn.Config(
            app,
            host="127.0.0.1",
            port=self.port,
            log_level="warning",
            ws="none",
            http="h11",
            lifespan="on",
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="live-server", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    async def __aenter__(self) -> LiveServer:
        self.thread.start()
        await wait_for(
            lambda: self.server.started or not self.thread.is_alive(), 10, "the server to start"
        )
        if not self.server.started:
            raise RuntimeError(f"the server on port {self.port} did not start")
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.server.should_exit = True
        await asyncio.to_thread(self.thread.join, 10)
        if self.thread.is_alive():
            raise RuntimeError("the server thread did not stop")


@asynccontextmanager
async def chromium_page(
    width: int = 1360, height: int = 900, timeout_ms: float = 10_000
) -> AsyncIterator[Any]:
    """A fresh page in headless chromium; the browser is closed afterwards."""
    chromium = require_chromium()
    from playwright.async_api import async_playwright

    async with async_playwright() as pw:
        browser = await pw.chromium.launch(
            executable_path=str(chromium), args=CHROMIUM_ARGS, headless=True
        )
        try:
            page = await browser.new_page(viewport={"width": width, "height": height})
            page.set_default_timeout(timeout_ms)
            yield page
        finally:
            await browser.close()


def screenshots_dir() -> Path:
    """Where browser tests leave their screenshots to look at after a run: one folder
    per user, so that one user's files never make another's run fail."""
    shots = Path(tempfile.gettempdir()) / f"trackstream-shots-{os.getuid()}"
    shots.mkdir(exist_ok=True)
    return shots


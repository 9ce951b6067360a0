"""What the web UI's browser tests share: Debian's /usr/bin/chromium driven by Playwright, a page whose every
request is checked to stay on 127.0.0.1 (no CDN, fonts, analytics), and small helpers to read and fill Gradio's
fields. Test modules import the fixtures (`browser`, `page`) by name."""

from __future__ import annotations

import os
import time
from pathlib import Path
from urllib.parse import urlparse

import pytest

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="module")
def browser():
    assert Path(CHROMIUM).exists(), "Debian chromium is missing: apt-get install chromium (scripts/setup.sh --test)"
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture()
def page(browser):
    context = browser.new_context(viewport={"width": 1400, "height": 1300}, locale="zh-CN")
    pg = context.new_page()
    pg.external_requests = []

    def guard(route):
        host = urlparse(route.request.url).hostname
        if route.request.url.startswith(("data:", "blob:")) or host in ("127.0.0.1", "localhost"):
            return route.continue_()
        pg.external_requests.append(route.request.url)
        return route.abort()

    pg.route("**/*", guard)
    pg.console_errors = []
    pg.on("pageerror", lambda e: pg.console_errors.append(str(e)))
    yield pg
    context.close()


def as_textarea(text: str) -> str:
    """What a <textarea> shows for `text`: browsers normalise CR LF and lone CR to LF."""
    return text.replace("\r\n", "\n").replace("\r", "\n")


def field(page, elem_id):
    return page.locator(f"#{elem_id} textarea, #{elem_id} input").first


def screenshot(page, tmp_path, name: str) -> Path:
    """A full-page screenshot in $ADGEN_SCREENSHOT_DIR (default: the test's tmp dir)."""
    out_dir = Path(os.environ.get("ADGEN_SCREENSHOT_DIR", tmp_path))
    out_dir.mkdir(parents=True, exist_ok=True)
    shot = out_dir / name
    page.screenshot(path=str(shot), full_page=True)
    print(f"screenshot: {shot}")
    return shot


def wait_for(predicate, timeout: float = 90, what: str = "a condition"):
    """Poll `predicate` until it returns something true (returned); an AssertionError naming `what` after
    `timeout` seconds. (Also the job manager's tests' wait.)"""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")

"""Fixtures of the browser tests: one headless chromium per test process, the real app served
over HTTP on a loopback port (`base_url`, tests/conftest.py), and a fresh browser context (cookies, language) per test.

The browser is Debian's `chromium` package (`.ci/run` installs it), driven by Playwright through
`executable_path`: no browser is ever downloaded. Without it the tests are skipped on a laptop and
fail in CI, where they must run.
"""
from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, BrowserContext, Page, sync_playwright

from tests.backends import in_ci

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
#: Where screenshots and axe results are kept (a CI artefact): `test-artifacts/` at the repository root.
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"


@pytest.fixture(scope="session")
def browser() -> Iterator[Browser]:
    """Headless chromium, launched once per test process and shared by its tests."""
    if not os.access(CHROMIUM, os.X_OK):
        problem = f"no chromium at {CHROMIUM} (apt-get install chromium)"
        if in_ci(os.environ):
            pytest.fail(f"browser tests must run in CI: {problem}")
        pytest.skip(problem)
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        yield launched
        launched.close()


@pytest.fixture
def context(browser: Browser, base_url: str) -> Iterator[BrowserContext]:
    """A fresh browser profile (no cookies) that prefers English, on the live server."""
    made = browser.new_context(base_url=base_url, locale="en-GB", viewport={"width": 1280, "height": 800})
    made.set_default_timeout(10_000)
    try:
        yield made
    finally:
        made.close()


@pytest.fixture
def page(context: BrowserContext) -> Page:
    """The one tab a test drives from page to page."""
    return context.new_page()


@pytest.fixture(scope="session")
def artifacts() -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    return ARTIFACTS

"""Chromium for the tests of segq's pages (the job viewer, /docs): Debian's
Chromium driven by Playwright, never a downloaded browser.

Every browser test gets its pages from the ``browser`` fixture
(tests/conftest.py), which holds one rule for all of them: a page that
logs any console error fails its test. Chromium logs there what a person
would never see otherwise: a script's exception, a resource that did not
load, and every refusal of the page's Content-Security-Policy."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from playwright.sync_api import Browser, ConsoleMessage, Page

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    # Colours as the PNGs hold them, so that pixels can be compared.
    "--force-color-profile=srgb",
]
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="chromium is not installed (apt-get install -y chromium)"
)


@dataclass
class BrowserSession:
    """Pages of one Chromium, each watched for console errors."""

    browser: Browser
    #: "<page url>: <message>" for each console error and uncaught exception.
    console_errors: list[str] = field(default_factory=list)

    def new_page(self, **options: Any) -> Page:
        page = self.browser.new_page(**options)
        page.on("console", lambda message: self._console(page, message))
        page.on("pageerror", lambda error: self.console_errors.append(f"{page.url}: {error}"))
        return page

    def _console(self, page: Page, message: ConsoleMessage) -> None:
        if message.type == "error":
            where = message.location.get("url") or page.url
            self.console_errors.append(f"{where}: {message.text}")


@contextmanager
def chromium_session() -> Iterator[BrowserSession]:
    """A BrowserSession; what its pages logged is in ``console_errors``."""
    from playwright.sync_api import sync_playwright

    assert CHROMIUM is not None, "chromium is not installed"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield BrowserSession(browser)
        finally:
            browser.close()

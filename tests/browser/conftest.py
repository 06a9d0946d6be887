"""One Chromium (Debian's, driven by Playwright) and one served console for the whole browser suite; a fresh browser
context, signed in as the test asks, for each test."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, BrowserContext, Page, Playwright, sync_playwright

from tests.browser.pages import SCREENSHOTS, sign_in
from tests.browser.site import Console, serve_console
from tests.conftest import require_browser

# Playwright's default for waiting on a locator is 30 s: a console page that takes seconds is a failure worth
# seeing sooner.
TIMEOUT_MS = 10_000


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in item.path.parents:
            item.add_marker(pytest.mark.browser)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if SCREENSHOTS.is_dir() and any(SCREENSHOTS.iterdir()):
        terminalreporter.write_line(f"console screenshots: {SCREENSHOTS}")


# Package-scoped, not session-scoped: Playwright's sync API keeps an event loop running in this thread while it is
# open, and every test after the browser tests that runs one of its own (asyncio.run) would fail.
@pytest.fixture(scope="package")
def playwright() -> Iterator[Playwright]:
    require_browser()
    with sync_playwright() as driver:
        yield driver


@pytest.fixture(scope="package")
def browser(playwright: Playwright) -> Iterator[Browser]:
    # Debian's Chromium, not one downloaded by `playwright install` (no CDN is reachable where kbms is built).
    launched = playwright.chromium.launch(executable_path=str(require_browser()))
    try:
        yield launched
    finally:
        launched.close()


@pytest.fixture(scope="package")
def console(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Console]:
    with serve_console(tmp_path_factory.mktemp("console")) as served:
        yield served


@pytest.fixture
def new_context(browser: Browser, console: Console) -> Iterator[Callable[..., BrowserContext]]:
    """Makes browser contexts on the console's URL (options as for ``Browser.new_context``); closes them after."""
    made: list[BrowserContext] = []

    def make(**options: object) -> BrowserContext:
        context = browser.new_context(base_url=console.url, **options)  # type: ignore[arg-type]
        context.set_default_timeout(TIMEOUT_MS)
        made.append(context)
        return context

    yield make
    for context in made:
        context.close()


@pytest.fixture
def page_as(new_context: Callable[..., BrowserContext]) -> Callable[..., Page]:
    """A page signed in with the given key (``viewport`` and other context options by keyword)."""

    def make(key: str, **options: object) -> Page:
        page = new_context(**options).new_page()
        sign_in(page, key)
        return page

    return make

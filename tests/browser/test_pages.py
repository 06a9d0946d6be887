"""Every page of the console: its security headers, no CSP violation by its own assets, no serious or critical
accessibility violation (axe-core), a screenshot, a phone's width without sideways scrolling, and the keyboard."""

from __future__ import annotations

import re
from collections.abc import Callable

import pytest
from playwright.sync_api import BrowserContext, ConsoleMessage, Page, expect

from tests.browser.pages import (
    SCREENSHOTS,
    describe,
    horizontal_overflow,
    screenshot,
    serious_violations,
    sign_in,
    update_readme_screenshot,
    visit,
)
from tests.browser.site import ADMIN, Console

LAPTOP = {"width": 1366, "height": 768}
PHONE = {"width": 390, "height": 844}


def pages(console: Console) -> dict[str, str]:
    return {
        "overview": "/console",
        "conversations": "/console/conversations",
        "conversation": f"/console/conversations/{console.ids['quokka']}",
        "rejects": "/console/rejects",
        "sources": "/console/sources",
    }


def checked_visit(page: Page, path: str, errors: list[str]) -> None:
    answer = visit(page, path)
    assert answer.status == 200, (path, answer.status)
    headers = answer.headers
    policy = headers.get("content-security-policy", "")
    assert "frame-ancestors 'none'" in policy, policy
    assert "unsafe-inline" not in re.sub(r"style-src[^;]*", "", policy), policy
    assert headers.get("x-content-type-options") == "nosniff"
    expect(page.locator("html")).to_have_attribute("lang", "en")
    expect(page).to_have_title(re.compile(r" · kbms console$"))
    expect(page.get_by_role("heading", level=1)).to_have_count(1)
    expect(page.locator("main#main")).to_have_count(1)
    page.wait_for_load_state("networkidle")
    assert errors == [], (path, errors)


def recording_errors(page: Page) -> list[str]:
    errors: list[str] = []

    def on_console(message: ConsoleMessage) -> None:
        if message.type == "error":
            errors.append(f"{message.text} ({message.location.get('url')})")

    page.on("console", on_console)
    page.on("pageerror", lambda error: errors.append(str(error)))
    return errors


@pytest.mark.parametrize("viewport", [LAPTOP, PHONE], ids=["laptop", "phone"])
def test_every_page_is_secure_accessible_and_fits(
    new_context: Callable[..., BrowserContext], console: Console, viewport: dict[str, int]
) -> None:
    size = "laptop" if viewport == LAPTOP else "phone"
    page = new_context(viewport=viewport).new_page()
    errors = recording_errors(page)
    checked_visit(page, "/console/login", errors)
    checked = {"login": (serious_violations(page), horizontal_overflow(page))}
    screenshot(page, f"login-{size}")
    sign_in(page, ADMIN)
    for name, path in pages(console).items():
        checked_visit(page, path, errors)
        # Times are shown in the viewer's timezone by console.js, UTC on hover.
        for time in page.locator("main time[datetime]").all()[:3]:
            expect(time).to_have_attribute("title", re.compile(r"UTC$"))
        checked[name] = (serious_violations(page), horizontal_overflow(page))
        screenshot(page, f"{name}-{size}")
        if size == "laptop" and name == "conversation":
            update_readme_screenshot(page)
    failures = {name: describe(found) for name, (found, _) in checked.items() if found}
    assert failures == {}, "\n".join(f"{name}:\n{text}" for name, text in failures.items())
    assert {name: px for name, (_, px) in checked.items() if px} == {}
    assert (SCREENSHOTS / f"conversation-{size}.png").stat().st_size > 0


def test_the_keyboard_reaches_the_navigation_and_the_filters(page_as: Callable[..., Page]) -> None:
    page = page_as(ADMIN)
    page.goto("/console/conversations")
    page.locator("body").focus()
    reached: list[str] = []
    for _ in range(40):
        page.keyboard.press("Tab")
        reached.append(
            page.evaluate(
                "(() => { const e = document.activeElement;"
                " return e.getAttribute('name') || (e.textContent || '').trim(); })()"
            )
        )
    for name in ("Overview", "Conversations", "Rejects", "Sources", "Sign out", "q", "provider", "Search"):
        assert name in reached, (name, reached)
    # Enter in the search box submits the filters.
    page.locator("form#filters [name=q]").fill("quokka")
    page.locator("form#filters [name=q]").press("Enter")
    expect(page).to_have_url(re.compile(r"[?&]q=quokka"))
    expect(page.locator("#conversations tbody tr")).to_have_count(1)


def test_times_are_in_the_viewers_timezone_with_utc_on_hover(page_as: Callable[..., Page], console: Console) -> None:
    page = page_as(ADMIN, timezone_id="America/New_York")
    page.goto(f"/console/conversations/{console.ids['quokka']}")
    created = page.locator("dl#summary time").first
    # 2023-11-14 22:13 UTC is 17:13 in New York (EST, UTC-5).
    expect(created).to_contain_text("17:13")
    expect(created).to_have_attribute("title", re.compile(r"^2023-11-14 22:13.* UTC$"))

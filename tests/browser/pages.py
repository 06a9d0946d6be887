"""What the browser tests do on a console page: sign in, check it with axe-core, measure it, photograph it."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from axe_playwright_python.sync_playwright import Axe
from playwright.sync_api import Page, Response, expect

ROOT = Path(__file__).resolve().parents[2]
# Where the screenshots of a run go (gitignored): KBMS_TEST_OUTPUT moves it; the run prints the path.
SCREENSHOTS = Path(os.environ.get("KBMS_TEST_OUTPUT") or ROOT / "test-output") / "screenshots"
# The README's picture of the console, rewritten only when asked (KBMS_UPDATE_SCREENSHOT=1).
README_SCREENSHOT = ROOT / "docs" / "console.png"
SERIOUS = ("serious", "critical")


def sign_in(page: Page, key: str) -> None:
    page.goto("/console/login")
    page.get_by_label("API key").fill(key)
    page.get_by_role("button", name="Sign in").click()
    expect(page).to_have_url(re.compile(r"/console$"))


def visit(page: Page, path: str) -> Response:
    """Go to ``path``; the answer of its last navigation (a redirect's target)."""
    answer = page.goto(path)
    assert answer is not None, path
    return answer


def serious_violations(page: Page) -> list[dict[str, Any]]:
    """axe-core's serious and critical violations on the page as it is now (every rule it runs by default)."""
    results = Axe().run(page)
    return [v for v in results.response["violations"] if v.get("impact") in SERIOUS]


def describe(violations: list[dict[str, Any]]) -> str:
    lines = []
    for violation in violations:
        targets = [" ".join(map(str, node["target"])) for node in violation["nodes"][:5]]
        lines.append(f"{violation['impact']}: {violation['id']}: {violation['help']} at {targets}")
    return "\n".join(lines)


def horizontal_overflow(page: Page) -> int:
    """How many CSS pixels the page is wider than the viewport (0: none; tables may scroll in their container)."""
    return int(page.evaluate("document.documentElement.scrollWidth - document.documentElement.clientWidth"))


def screenshot(page: Page, name: str) -> Path:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"{name}.png"
    page.screenshot(path=path, full_page=True)
    return path


def update_readme_screenshot(page: Page) -> bool:
    if os.environ.get("KBMS_UPDATE_SCREENSHOT") != "1":
        return False
    page.screenshot(path=README_SCREENSHOT, full_page=False)
    return True

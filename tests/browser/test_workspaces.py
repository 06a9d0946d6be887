"""A key limited to one workspace (ws-b) sees nothing of another (ws-a), on any page, whatever the URL asks."""

from __future__ import annotations

from collections.abc import Callable

from playwright.sync_api import Page, expect

from tests.browser.pages import visit
from tests.browser.site import READER_B, Console

# What ws-a holds: its name, a conversation's subject and words, a refused payload's external id.
OTHERS = ("ws-a", "Quokka", "quokka", "refused-ws-a")
# A refusal may name the workspace the URL asked for, and nothing of what it holds.
HELD = OTHERS[1:]


def visible_text(page: Page) -> str:
    return page.locator("main").inner_text()


def test_a_limited_key_sees_only_its_workspace(page_as: Callable[..., Page], console: Console) -> None:
    page = page_as(READER_B)
    for path in (
        "/console",
        "/console/conversations",
        "/console/conversations?q=quokka",
        "/console/conversations?workspace=ws-a",
        "/console/rejects",
        "/console/rejects?workspace=ws-a",
    ):
        status = visit(page, path).status
        assert status in (200, 403), (path, status)
        text = visible_text(page)
        assert not [word for word in (OTHERS if status == 200 else HELD) if word in text], (path, text)
    page.goto("/console/conversations")
    expect(page.locator("#conversations tbody tr")).to_have_count(1)
    expect(page.locator("#conversations")).to_contain_text("Wombat delivery late")
    page.goto("/console")
    expect(page.locator("#by-workspace")).to_contain_text("ws-b")

    assert visit(page, f"/console/conversations/{console.ids['quokka']}").status == 404
    assert not [word for word in OTHERS if word in visible_text(page)]
    assert visit(page, f"/console/conversations/{console.ids['ws-b']}").status == 200
    # Nor the source of another workspace.
    visit(page, "/console/sources")
    expect(page.locator("#sources")).not_to_contain_text(console.fake.app_id)

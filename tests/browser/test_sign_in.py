"""Signing in with an API key: a read key sees, an admin key may also act; the session cookie and where keys never
appear."""

from __future__ import annotations

import re
from collections.abc import Callable
from urllib.parse import quote

from playwright.sync_api import BrowserContext, Page, expect

from tests.browser.site import ADMIN, READER, Console

ACTIONS = ("Reprocess", "Reprocess all", "Sync now", "Retry dead letters")


def action_buttons(page: Page) -> list[str]:
    found = []
    for path in ("/console/rejects", "/console/sources"):
        page.goto(path)
        found += [name for name in ACTIONS if page.get_by_role("button", name=name, exact=True).count()]
    return found


def test_a_bad_key_is_refused_with_an_alert(new_context: Callable[..., BrowserContext]) -> None:
    page = new_context().new_page()
    page.goto("/console/login")
    expect(page.get_by_role("heading", level=1)).to_have_count(1)
    page.get_by_label("API key").fill("kbms_not-a-key-anyone-configured-xxxxxxxxxxxxxxxxxx")
    with page.expect_response(lambda r: r.request.method == "POST") as answer:
        page.get_by_role("button", name="Sign in").click()
    assert answer.value.status == 401
    expect(page.get_by_role("alert")).to_be_visible()
    expect(page.get_by_label("API key")).to_be_visible()
    page.goto("/console")
    expect(page).to_have_url(re.compile(r"/console/login\?next="))


def test_a_read_key_signs_in_sees_and_has_no_actions(
    new_context: Callable[..., BrowserContext], console: Console
) -> None:
    console.refuse("refused-for-the-reader", workspace="ws-b")  # a row an admin could act on
    page = new_context().new_page()
    # An unsigned visit is sent to sign in, and back where it was going afterwards (filters kept).
    page.goto("/console/conversations?q=quokka")
    expect(page).to_have_url(re.compile(r"/console/login\?next=" + re.escape(quote("/console/conversations", safe=""))))
    page.get_by_label("API key").fill(READER)
    page.get_by_role("button", name="Sign in").click()
    expect(page).to_have_url(re.compile(r"/console/conversations\?q=quokka$"))
    expect(page.locator("#conversations")).to_contain_text("Quokka invoice question")

    cookies = page.context.cookies()
    assert {(c["httpOnly"], c["sameSite"], c["path"]) for c in cookies} == {(True, "Strict", "/console")}
    assert [c for c in cookies if READER in c["value"]] == []
    # A session that ends, not one for as long as the browser lives.
    assert [c for c in cookies if c["expires"] <= 0] == []

    nav = page.get_by_role("navigation", name="Console")
    for name in ("Overview", "Conversations", "Rejects", "Sources"):
        expect(nav.get_by_role("link", name=name, exact=True)).to_be_visible()
    expect(page.get_by_role("button", name="Sign out")).to_be_visible()
    assert action_buttons(page) == []
    assert READER not in page.content()
    assert READER not in page.url
    # Nor may it act by sending what an admin's button would, with its own session's CSRF token.
    csrf = page.locator('input[name="csrf"]').first.get_attribute("value")
    source = f"/console/sources/intercom/{console.fake.app_id}/sync"
    refused = page.request.post(source, form={"csrf": csrf or ""}, max_redirects=0)
    assert refused.status == 403
    assert "admin scope" in refused.text()  # refused for the key's scope, not for a bad token

    page.get_by_role("button", name="Sign out").click()
    expect(page).to_have_url(re.compile(r"/console/login"))
    page.goto("/console/rejects")
    expect(page).to_have_url(re.compile(r"/console/login\?next="))


def test_an_admin_key_may_act(page_as: Callable[..., Page], console: Console) -> None:
    console.refuse("refused-for-the-admin", workspace="ws-b")  # so that Rejects has a row to act on
    page = page_as(ADMIN)
    assert action_buttons(page) == list(ACTIONS)
    assert ADMIN not in page.content()
    assert ADMIN not in page.url

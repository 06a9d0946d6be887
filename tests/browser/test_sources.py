"""Sources: the configured source and its sync state; an admin starts a pass, and what it brings arrives."""

from __future__ import annotations

import time
from collections.abc import Callable

from playwright.sync_api import Page, expect

from tests.browser.site import ADMIN, Console


def test_an_admin_starts_a_pass_and_sees_it(page_as: Callable[..., Page], console: Console) -> None:
    page = page_as(ADMIN)
    page.goto("/console/sources")
    row = page.locator("#sources tbody tr", has_text=console.fake.app_id)
    expect(row).to_have_count(1)
    expect(row).to_contain_text("intercom")
    # The pass at startup stored the fake's three conversations.
    page.goto(f"/console/conversations?workspace={console.fake.app_id}")
    expect(page.locator("#conversations tbody tr")).to_have_count(3)

    console.fake.add("9100", updated_at=int(time.time()), parts=1)
    page.goto("/console/sources")
    row.get_by_role("button", name="Sync now").click()
    expect(page.get_by_role("status")).to_contain_text("started")
    # The pass runs in the server: the conversation it fetched appears (polled, as an operator would reload).
    page.goto(f"/console/conversations?workspace={console.fake.app_id}")
    rows = page.locator("#conversations tbody tr")
    deadline = time.monotonic() + 20
    while rows.count() < 4 and time.monotonic() < deadline:
        page.wait_for_timeout(200)
        page.reload()
    expect(rows).to_have_count(4)
    page.goto("/console/sources")
    expect(page.locator("#sources tbody tr", has_text=console.fake.app_id)).to_contain_text("ok")

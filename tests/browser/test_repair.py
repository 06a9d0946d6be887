"""Refused payloads on Rejects, their cause fixed (a mapper fix), reprocessed by an admin, one or all since a time,
and accepted."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta

import pytest
from playwright.sync_api import Page, expect

from tests.browser.site import ADMIN, Console


@pytest.fixture
def fixable(console: Console) -> Iterator[Console]:
    """The console, whose Intercom mapper a test may fix; unfixed again after."""
    yield console
    console.intercom.fixed = False


def conversation_shows(page: Page, subject: str, *, messages: int) -> None:
    page.goto("/console/conversations?workspace=ws-a")
    page.locator("#conversations").get_by_role("link", name=subject).click()
    expect(page.get_by_role("heading", level=1)).to_have_text(subject)
    expect(page.locator("ol#timeline li.message")).to_have_count(messages)


def test_a_refused_payload_is_reprocessed_after_its_cause_is_fixed(
    page_as: Callable[..., Page], fixable: Console
) -> None:
    fixable.refuse("refused-one", workspace="ws-a")
    page = page_as(ADMIN)
    page.goto("/console/rejects?workspace=ws-a")
    row = page.locator("#rejects tbody tr", has_text="refused-one")
    expect(row).to_have_count(1)
    expect(row.locator(".reason")).not_to_have_text("—")

    # Reprocessed with today's mapper, it is still refused, and the page says so.
    row.get_by_role("button", name="Reprocess").click()
    outcome = page.locator("p#outcome[role=status]")
    expect(outcome).to_contain_text("still rejected")
    expect(row).to_have_count(1)

    fixable.intercom.fixed = True
    row.get_by_role("button", name="Reprocess").click()
    expect(outcome).to_contain_text(re.compile(r"accepted \(created\)"))
    expect(row).to_have_count(0)
    conversation_shows(page, "Refused refused-one", messages=2)


def test_an_admin_reprocesses_every_reject_since_a_time(page_as: Callable[..., Page], fixable: Console) -> None:
    since = (datetime.now(UTC) - timedelta(seconds=5)).strftime("%Y-%m-%dT%H:%M:%SZ")
    for name in ("refused-all-1", "refused-all-2"):
        fixable.refuse(name, workspace="ws-a")
    page = page_as(ADMIN)
    page.goto("/console/rejects")
    rows = page.locator("#rejects tbody tr", has_text="refused-all-")
    expect(rows).to_have_count(2)

    fixable.intercom.fixed = True
    form = page.locator("form#reprocess-all")
    form.get_by_label("Reprocess all since (UTC)").fill(since)
    form.get_by_role("button", name="Reprocess all").click()
    # At least these two (others refused in the same seconds by other tests may be among them).
    outcome = page.locator("p#outcome[role=status]")
    expect(outcome).to_contain_text(re.compile(r"\b([2-9]|\d\d+) deliveries reclassified"))
    expect(rows).to_have_count(0)
    conversation_shows(page, "Refused refused-all-2", messages=2)

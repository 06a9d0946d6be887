"""Search, open a conversation from the results, and read it as stored."""

from __future__ import annotations

import re
from collections.abc import Callable

from playwright.sync_api import Page, expect

from tests.browser.site import MANY, READER, Console


def test_search_and_open_a_conversation(page_as: Callable[..., Page], console: Console) -> None:
    page = page_as(READER)
    page.get_by_role("navigation", name="Console").get_by_role("link", name="Conversations").click()
    filters = page.locator("form#filters")
    filters.get_by_label(re.compile("search", re.I)).fill("quokka")
    filters.get_by_role("button", name="Search").click()
    # The filters are in the URL: the page can be shared.
    expect(page).to_have_url(re.compile(r"[?&]q=quokka(&|$)"))
    rows = page.locator("#conversations tbody tr")
    expect(rows).to_have_count(1)
    expect(rows.locator("mark").first).to_have_text(re.compile("quokka", re.I))

    rows.get_by_role("link", name="Quokka invoice question").click()
    expect(page).to_have_url(re.compile(rf"/console/conversations/{re.escape(console.ids['quokka'])}$"))
    expect(page.get_by_role("heading", level=1)).to_have_text("Quokka invoice question")
    expect(page.locator("dl#summary")).to_contain_text("ws-a")
    expect(page.locator("ul#participants li")).to_have_count(2)

    messages = page.locator("ol#timeline li.message")
    expect(messages).to_have_count(3)
    expect(messages.nth(1)).to_contain_text("Why does my quokka invoice list the plan twice?")
    expect(messages.nth(1)).to_have_attribute("data-visibility", "public")
    expect(messages.nth(2)).to_have_attribute("data-visibility", "internal")
    # Public and internal are told apart in words, not by colour alone.
    expect(messages.nth(2)).to_contain_text("Internal")
    expect(messages.nth(1)).not_to_contain_text("Internal")

    deliveries = page.locator("table#deliveries")
    expect(deliveries.locator("tbody tr")).to_have_count(1)
    raw = deliveries.locator("details").first
    expect(raw.locator("pre")).not_to_be_visible()
    raw.locator("summary", has_text="Raw payload").click()
    expect(raw.locator("pre")).to_be_visible()
    expect(raw.locator("pre")).to_contain_text('"quokka-1"')


def test_filters_and_pages(page_as: Callable[..., Page]) -> None:
    page = page_as(READER)
    page.goto("/console/conversations?provider=zendesk")
    rows = page.locator("#conversations tbody tr")
    expect(rows.first).to_be_visible()
    assert all("zendesk" in text.lower() for text in rows.all_inner_texts())
    page.goto("/console/conversations?workspace=ws-b")
    expect(rows).to_have_count(1)
    expect(rows).to_contain_text("Wombat delivery late")


def test_pages_follow_one_another(page_as: Callable[..., Page]) -> None:
    page = page_as(READER)
    page.goto("/console/conversations?workspace=ws-many")
    links = page.locator("#conversations tbody a")
    first = links.all_inner_texts()
    first_url = page.url
    page.locator('a[rel="next"]', has_text="Next page").click()
    page.wait_for_url(lambda url: url != first_url)
    expect(page).to_have_url(re.compile(r"workspace=ws-many"))  # the filters stay with the pages
    second = links.all_inner_texts()
    assert len(first) + len(second) == MANY
    assert set(first).isdisjoint(second)
    expect(page.locator('a[rel="next"]')).to_have_count(0)


def test_the_overview_counts_and_charts(page_as: Callable[..., Page]) -> None:
    page = page_as(READER)
    row = page.locator("#by-workspace tbody tr", has_text="ws-many")
    expect(row).to_contain_text(str(MANY))
    expect(page.get_by_role("img", name=re.compile("per minute"))).to_be_visible()
    row.get_by_role("link", name="ws-many").click()
    expect(page.locator("#conversations tbody tr")).to_have_count(50)  # a page of them, the filter in the URL
    expect(page).to_have_url(re.compile(r"workspace=ws-many"))

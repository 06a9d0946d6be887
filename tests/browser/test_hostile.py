"""A conversation whose text carries scripts, handlers, javascript: links and remote images: the console runs none of
it and loads nothing, with its Content-Security-Policy and (the sanitizer alone) without it. Asserted in the page."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import pytest
from playwright.sync_api import BrowserContext, ConsoleMessage, Dialog, Page, Request, expect

from tests.browser.pages import sign_in
from tests.browser.site import ADMIN, Console

# Records, from before any of the page's own code runs, every CSP violation the page reports.
WATCH_VIOLATIONS = """
window.__violations = [];
document.addEventListener('securitypolicyviolation',
    e => window.__violations.push(e.violatedDirective + ' ' + e.blockedURI));
"""
HANDLERS = "[...document.querySelectorAll('*')].flatMap(e => [...e.attributes].filter(a => /^on/i.test(a.name)))"
# Every <script> of the page must be the console's own asset.
SCRIPTS = "[...document.scripts].map(s => s.getAttribute('src') || 'inline: ' + s.textContent.slice(0, 80))"


@dataclass
class Watched:
    page: Page
    hosts: set[str] = field(default_factory=set)
    dialogs: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def watched(context: BrowserContext) -> Watched:
    context.add_init_script(WATCH_VIOLATIONS)
    page = context.new_page()
    seen = Watched(page)

    def on_request(request: Request) -> None:
        url = urlsplit(request.url)
        if url.scheme != "data":  # the page's own inline icon: nothing leaves the browser
            seen.hosts.add(url.netloc or url.scheme)

    def on_dialog(dialog: Dialog) -> None:
        seen.dialogs.append(dialog.message)
        dialog.dismiss()

    def on_console(message: ConsoleMessage) -> None:
        if message.type == "error":
            seen.errors.append(message.text)

    page.on("request", on_request)
    page.on("dialog", on_dialog)
    page.on("console", on_console)
    return seen


def assert_inert(seen: Watched, server: str) -> None:
    page = seen.page
    assert page.evaluate("typeof window.__pwned") == "undefined", page.evaluate("window.__pwned")
    assert seen.hosts <= {server}, seen.hosts
    assert seen.dialogs == []
    assert page.locator('a[href^="javascript:" i], iframe, object, embed, frame').count() == 0
    assert page.evaluate(HANDLERS + ".map(a => a.name)") == []
    assert set(page.evaluate(SCRIPTS)) <= {"/console/static/console.js"}, page.evaluate(SCRIPTS)
    remote = "[...document.querySelectorAll('[src], [srcset], [poster]')].map(e => e.src || e.getAttribute('srcset'))"
    assert [src for src in page.evaluate(remote) if urlsplit(src).netloc not in ("", server)] == []
    # Nothing the page was sent even tried to run or load something its policy refused.
    assert page.evaluate("window.__violations") == []
    assert seen.errors == []


@pytest.mark.parametrize("csp", ["with CSP", "sanitizer alone"])
def test_hostile_text_runs_nothing_and_loads_nothing(
    new_context: Callable[..., BrowserContext], console: Console, csp: str
) -> None:
    seen = watched(new_context(bypass_csp=csp == "sanitizer alone"))
    page, server = seen.page, urlsplit(console.url).netloc
    sign_in(page, ADMIN)

    page.goto(f"/console/conversations/{console.ids['hostile']}")
    timeline = page.locator("ol#timeline li.message")
    expect(timeline).to_have_count(3)
    for link in timeline.get_by_role("link").all():
        link.hover()  # what an operator's pointer does; following a link is theirs to choose
    hrefs = timeline.locator("a[href]").evaluate_all("links => links.map(a => a.protocol)")
    assert set(hrefs) <= {"http:", "https:", "mailto:"}, hrefs
    for details in page.locator("details").all():
        details.locator("summary").click()
    page.wait_for_load_state("networkidle")
    assert_inert(seen, server)
    expect(timeline.nth(1)).to_contain_text("Payload zebrafish")
    expect(page.get_by_role("heading", level=1)).to_contain_text("Hostile")
    # A name is no HTML: shown as the text it is.
    expect(page.locator("ul#participants")).to_contain_text("<script>window.__pwned")

    # Search snippets carry the text with <mark>s: no way in there either.
    page.goto("/console/conversations?q=zebrafish")
    expect(page.locator("#conversations tbody tr mark").first).to_be_visible()
    page.wait_for_load_state("networkidle")
    assert_inert(seen, server)

    for path in ("/console", "/console/conversations", "/console/rejects"):
        page.goto(path)
        page.wait_for_load_state("networkidle")
        assert_inert(seen, server)

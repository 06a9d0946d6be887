"""Each console page with data, on every engine: what it shows, what a workspace-limited key does not see, what
a hostile message becomes (text), and bad filters (a 4xx page, never a 5xx)."""

from __future__ import annotations

import re

import pytest

from tests.console.support import (
    ADMIN,
    READER_B,
    batch,
    console,
    ingest,
    settings_for,
    signed_in,
    store_both,
)
from tests.support.helpers import dumps, intercom_payload, part


def test_every_page_renders_with_data(database_url: str) -> None:
    with console(settings_for(database_url)) as client:
        stored = store_both(signed_in(client, ADMIN))
        overview = client.get("/console")
        conversations = client.get("/console/conversations")
        detail = client.get(f"/console/conversations/{stored.a}")
        rejects = client.get("/console/rejects")
    for response, title in (
        (overview, "Overview"),
        (conversations, "Conversations"),
        (detail, "Printer on fire"),
        (rejects, "Rejects"),
    ):
        assert response.status_code == 200, response.text
        html = response.text
        assert '<html lang="en">' in html
        assert f"<title>{title} · kbms console</title>" in html
        assert re.findall(r"<h1>(.*?)</h1>", html) == [title]
        assert '<main id="main">' in html
        nav = re.search(r'<nav aria-label="Console">(.*?)</nav>', html, re.S)
        assert nav is not None
        assert re.findall(r"<a [^>]*>([^<]*)</a>", nav.group(1)) == ["Overview", "Conversations", "Rejects"]
        ids = re.findall(r'\bid="([^"]+)"', html)
        assert len(ids) == len(set(ids)), ids
    by_workspace = re.search(r'<table id="by-workspace">(.*?)</table>', overview.text, re.S)
    assert by_workspace is not None
    assert re.findall(
        r"<td>intercom</td><td><a [^>]*>(ws-[ab])</a></td><td class=\"num\">1</td>", by_workspace.group(1)
    ) == [
        "ws-a",
        "ws-b",
    ]
    assert re.search(r'<svg id="activity" role="img" aria-label="[^"]*4 received, 2 rejected', overview.text)
    rows = re.findall(r'<a href="/console/conversations/([0-9a-f-]{36})">([^<]*)</a>', conversations.text)
    assert sorted(rows) == sorted([(stored.a, "Printer on fire"), (stored.b, "Billing question")])
    assert '<dl id="summary"' in detail.text
    assert "<dd>ws-a</dd>" in detail.text
    assert "<dd>conv-a</dd>" in detail.text
    assert '<ul id="participants">' in detail.text
    assert '<li class="message public" data-visibility="public">' in detail.text
    deliveries = re.search(r'<table id="deliveries">(.*?)</table>', detail.text, re.S)
    assert deliveries is not None
    assert deliveries.group(1).count("<summary>Raw payload</summary><pre>") == 1
    assert "&#34;conv-a&#34;" in deliveries.group(1) or "&quot;conv-a&quot;" in deliveries.group(1)
    table = re.search(r'<table id="rejects">(.*?)</table>', rejects.text, re.S)
    assert table is not None
    assert table.group(1).count("<tr>") == 3  # the head and two rejects
    assert "Field required" in table.group(1) or "missing" in table.group(1)


def test_timeline_tells_internal_notes_apart_in_order(database_url: str) -> None:
    payload = intercom_payload(
        "conv-notes",
        parts=[
            part("n1", "<p>only the team sees this</p>", at=1_700_000_200, part_type="note"),
            part("m1", "<p>first reply</p>", at=1_700_000_100),
        ],
    )
    with console(settings_for(database_url)) as client:
        conversation = ingest(signed_in(client, ADMIN), payload, workspace="ws-a")
        html = client.get(f"/console/conversations/{conversation}").text
    timeline = re.search(r'<ol id="timeline">(.*?)</ol>', html, re.S)
    assert timeline is not None
    items = re.findall(r'<li class="message (\w+)" data-visibility="(\w+)">(.*?)</li>', timeline.group(1), re.S)
    assert [(cls, visibility) for cls, visibility, _ in items][-2:] == [("public", "public"), ("internal", "internal")]
    assert "first reply" in items[-2][2]
    assert "Internal note" in items[-1][2]
    assert "only the team sees this" in items[-1][2]


def test_completeness_says_what_the_provider_counts_and_when_it_cut_short(database_url: str) -> None:
    cut = intercom_payload("conv-cut", parts=[part("c1", "<p>the newest</p>")])
    cut["conversation_parts"]["total_count"] = 620  # Intercom counts 620 parts and returned one
    unknown = intercom_payload("conv-unknown", parts=[part("u1", "<p>hello</p>")])
    with console(settings_for(database_url)) as client:
        admin = signed_in(client, ADMIN)
        cut_id, unknown_id = ingest(admin, cut, workspace="ws-a"), ingest(admin, unknown, workspace="ws-a")
        pages = {key: client.get(f"/console/conversations/{key}").text for key in (cut_id, unknown_id)}

    def said(html: str) -> str:
        found = re.search(r'<dd id="completeness">(.*?)</dd>', html, re.S)
        assert found is not None
        return re.sub(r"<[^>]+>", "", found.group(1))

    assert (
        said(pages[cut_id])
        == "2 stored of 621 the provider counts; cut short: the provider returned fewer than it counts"
    )
    assert said(pages[unknown_id]) == "2 stored (the provider's count is not known)"


def test_search_shows_marked_snippets_and_pages(database_url: str) -> None:
    with console(settings_for(database_url)) as client:
        signed_in(client, ADMIN)
        for n in range(3):
            ingest(
                client,
                intercom_payload(f"s{n}", parts=[part(f"p{n}", "<p>the toaster &lt;b&gt;smokes</p>")]),
                workspace="ws-a",
            )
        found = client.get("/console/conversations", params={"q": "toaster", "provider": "", "state": ""})
        assert found.status_code == 200
        snippets = re.findall(r'<td class="snippet">(.*?)</td>', found.text, re.S)
        assert len(snippets) == 3
        assert all("<mark>toaster</mark>" in s and "&lt;b&gt;" in s and "<b>" not in s for s in snippets)
        listed = client.get("/console/conversations", params={"workspace": "ws-a"})
        assert listed.text.count('<a href="/console/conversations/') == 3
        assert 'rel="next"' not in listed.text


def test_next_page_link_keeps_the_filters(database_url: str) -> None:
    lines = b"\n".join(dumps(intercom_payload(f"page-{n}", updated_at=1_700_000_000 + n)) for n in range(51))
    with console(settings_for(database_url)) as client:
        signed_in(client, ADMIN)
        batch(client, lines, workspace="ws-a")
        first = client.get("/console/conversations", params={"workspace": "ws-a"})
        link = re.search(r'<a rel="next" href="([^"]+)">Next page</a>', first.text)
        assert link is not None
        following = client.get(link.group(1).replace("&amp;", "&"))
        assert "workspace=ws-a" in link.group(1)
    ids = re.compile(r'<a href="/console/conversations/([0-9a-f-]{36})">')
    seen = ids.findall(first.text) + ids.findall(following.text)
    assert (len(ids.findall(first.text)), len(seen), len(set(seen))) == (50, 51, 51)
    assert 'rel="next"' not in following.text


def test_a_workspace_limited_key_sees_nothing_of_another(database_url: str) -> None:
    with console(settings_for(database_url)) as client:
        stored = store_both(signed_in(client, ADMIN))
    with console(settings_for(database_url)) as client:
        signed_in(client, READER_B)
        assert client.get(f"/console/conversations/{stored.a}").status_code == 404
        assert client.get(f"/console/conversations/{stored.b}").status_code == 200
        listed = client.get("/console/conversations").text
        assert stored.a not in listed
        assert stored.b in listed
        assert stored.a not in client.get("/console/conversations", params={"q": "Printer"}).text
        overview = client.get("/console").text
        assert "ws-a" not in overview
        assert "ws-b" in overview
        rejects = client.get("/console/rejects").text
        assert "reject-a" not in rejects
        assert "reject-b" in rejects
        assert client.get("/console/conversations", params={"workspace": "ws-a"}).status_code == 403
        assert client.get("/console/rejects", params={"workspace": "ws-a"}).status_code == 403


CONSOLE_TAGS = {
    "html",
    "head",
    "meta",
    "title",
    "link",
    "script",
    "body",
    "a",
    "header",
    "p",
    "nav",
    "ul",
    "li",
    "form",
    "span",
    "strong",
    "input",
    "button",
    "main",
    "h1",
    "h2",
    "section",
    "div",
    "table",
    "thead",
    "tbody",
    "tr",
    "th",
    "td",
    "dl",
    "dt",
    "dd",
    "ol",
    "details",
    "summary",
    "pre",
    "time",
    "label",
    "datalist",
    "option",
    "mark",
    "em",
    "code",
}


def test_hostile_message_is_inert_text(database_url: str) -> None:
    hostile = (
        "<p>&lt;script&gt;alert(1)&lt;/script&gt; "
        '&lt;img src=x onerror="alert(2)"&gt; '
        '&lt;a href="javascript:alert(3)"&gt;click&lt;/a&gt; '
        '&lt;img src="https://evil.example/track.png"&gt;</p>'
        '<script>alert(4)</script><img src=x onerror="alert(5)"><a href="javascript:alert(6)">link</a>'
        '<img src="https://evil.example/pixel.png">'
    )
    payload = intercom_payload("evil", title='<script>alert("subject")</script>', parts=[part("x1", hostile)])
    with console(settings_for(database_url)) as client:
        conversation = ingest(signed_in(client, ADMIN), payload, workspace="ws-a")
        pages = [
            client.get(f"/console/conversations/{conversation}").text,
            client.get("/console/conversations").text,
            client.get("/console/conversations", params={"q": "alert"}).text,
        ]
    for html in pages:
        # Every tag of the page is the console's own: what the provider sent is all text (its < escaped).
        tags = re.findall(r"<([a-zA-Z][a-zA-Z0-9]*)\b([^>]*)>", html)
        assert {name for name, _ in tags} <= CONSOLE_TAGS
        for name, attributes in tags:
            assert not re.search(r"\son[a-z]+\s*=", attributes), (name, attributes)
            for link in re.findall(r'(?:href|src|action)="([^"]*)"', attributes):
                assert link.startswith(("/console", "#main")) or link == "data:,", (name, link)
        assert [a for n, a in tags if n == "script"] == [' src="/console/static/console.js" defer']
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in pages[0]


@pytest.mark.parametrize(
    "path",
    [
        "/console/conversations?updated_after=yesterday",
        "/console/conversations?state=bogus",
        "/console/conversations?provider=nope",
        "/console/conversations?cursor=%%%",
        "/console/conversations?q=%21%21%21",
        "/console/conversations?workspace=" + "w" * 200,
        "/console/conversations?tag=%00",
        "/console/rejects?since=soon",
        "/console/rejects?cursor=12",
        "/console/rejects?cursor=99999999999999999999-1",
        "/console/rejects?provider=nope",
    ],
)
def test_bad_filters_are_a_4xx_page(database_url: str, path: str) -> None:
    with console(settings_for(database_url)) as client:
        response = signed_in(client, ADMIN).get(path)
    assert 400 <= response.status_code < 500, response.text
    assert '<p role="alert">' in response.text
    assert response.headers["content-type"].startswith("text/html")


def test_unknown_conversation_is_a_404_page(database_url: str) -> None:
    with console(settings_for(database_url)) as client:
        signed_in(client, ADMIN)
        for path in ("/console/conversations/00000000-0000-0000-0000-000000000000", "/console/conversations/x%00"):
            response = client.get(path)
            assert response.status_code == 404
            assert "<h1>Not found</h1>" in response.text


def test_rejects_are_paged_newest_first(database_url: str) -> None:
    lines = b"\n".join(dumps({"type": "conversation", "id": f"bad-{n}"}) for n in range(51))
    with console(settings_for(database_url)) as client:
        signed_in(client, ADMIN)
        batch(client, lines, workspace="ws-a")
        first = client.get("/console/rejects", params={"workspace": "ws-a", "provider": "", "since": ""})
        link = re.search(r'<a rel="next" href="([^"]+)">Next page</a>', first.text)
        assert link is not None
        assert "workspace=ws-a" in link.group(1)
        following = client.get(link.group(1).replace("&amp;", "&"))
    rows = re.compile(r'<input type="hidden" name="delivery" value="(\d+)">')
    seen = rows.findall(first.text) + rows.findall(following.text)
    assert (len(rows.findall(first.text)), len(seen), len(set(seen))) == (50, 51, 51)
    assert 'rel="next"' not in following.text


def test_overview_of_a_small_database_is_always_fresh(database_url: str) -> None:
    with console(settings_for(database_url)) as client:
        signed_in(client, ADMIN)
        assert "No conversations stored yet." in client.get("/console").text
        ingest(client, intercom_payload("fresh"), workspace="ws-a")
        assert "No conversations stored yet." not in client.get("/console").text

"""What internal consumers read: list filters with the keyset cursor, full-text search, the change feed, exports."""

from __future__ import annotations

import csv
import itertools
import json
import unicodedata
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import func, select
from typer.testing import CliRunner

from kbms import search
from kbms.api.cursor import encode_search_cursor
from kbms.cli import app as cli
from kbms.providers.intercom.signature import sign
from kbms.settings import Settings
from kbms.storage import admin_engine
from kbms.storage.schema import conversations
from tests.support import canary
from tests.support.helpers import intercom_payload, part

INGEST = "/integrations/intercom/conversations"
ZENDESK = "/integrations/zendesk/conversations"
LIST = "/internal/conversations"
SECRET = canary.secret("consumers")  # never to be logged (tests/support/canary.py)


@pytest.fixture
def client(database_url: str) -> Iterator[TestClient]:
    from kbms.api import create_app

    settings_ = Settings(database_url=database_url, secrets={"KBMS_INTERCOM_CLIENT_SECRET": SECRET})
    with TestClient(create_app(settings_)) as test_client:
        yield test_client


def tagged(*names: str) -> dict[str, Any]:
    return {"type": "tag.list", "tags": [{"type": "tag", "name": name} for name in names]}


def push(client: TestClient, external_id: str, **fields: Any) -> str:
    workspace = fields.pop("workspace", "w1")
    response = client.post(f"{INGEST}?workspace={workspace}", json=intercom_payload(external_id, **fields))
    assert response.status_code in (200, 201), response.text
    return str(response.json()["id"])


def walk(client: TestClient, url: str, limit: int = 4) -> list[str]:
    """Every page of a list, following next_cursor: the external ids in order."""
    seen: list[str] = []
    cursor = None
    while True:
        separator = "&" if "?" in url else "?"
        page_url = f"{url}{separator}limit={limit}" + (f"&cursor={cursor}" if cursor else "")
        response = client.get(page_url)
        assert response.status_code == 200, response.text
        page = response.json()
        seen += [item["external_id"] for item in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            return seen


# Filters and the cursor


def _push_intercom(client: TestClient, row: dict[str, Any]) -> None:
    push(
        client,
        row["external_id"],
        workspace=row["workspace"],
        updated_at=row["updated_at"],
        state=row["state"],
        tags=tagged(*row["tags"]),
    )


def _push_zendesk(client: TestClient, row: dict[str, Any]) -> None:
    ticket = {
        "id": row["external_id"],
        "created_at": 1_700_000_000,
        "updated_at": row["updated_at"],
        "status": row["state"],
        "tags": row["tags"],
    }
    response = client.post(f"{ZENDESK}?workspace={row['workspace']}", json={"ticket": ticket})
    assert response.status_code == 201, response.text


# How the corpus stores a row of each provider: the filters are about two providers' vocabularies (Zendesk's
# "solved", Intercom's "snoozed"), so the rows name them; the table keeps the test itself free of a branch on them.
STORE = {"intercom": _push_intercom, "zendesk": _push_zendesk}


def corpus(client: TestClient) -> list[dict[str, Any]]:
    """30 conversations over two providers, two workspaces, three states and some tags."""
    made = []
    for i in range(30):
        row: dict[str, Any] = {
            "external_id": f"c{i:02d}",
            "provider": "intercom" if i % 3 else "zendesk",
            "workspace": "w1" if i % 2 else "w2",
            "state": ("open", "closed", "snoozed")[i % 3] if i % 3 else ("open", "solved")[i % 2],
            "tags": [t for t, every in (("vip", 4), ("billing", 5)) if i % every == 0],
            "updated_at": 1_700_000_000 + 7 * i,
        }
        STORE[row["provider"]](client, row)
        made.append(row)
    return made


def test_every_filter_and_combination_pages_exactly_through_its_conversations(client: TestClient) -> None:
    made = corpus(client)
    newest_first = sorted(made, key=lambda r: r["updated_at"], reverse=True)
    cases: list[dict[str, Any]] = [
        {},
        {"provider": "zendesk"},
        {"workspace": "w1"},
        {"state": "closed"},
        {"state": "solved"},
        {"tag": "vip"},
        {"tag": "billing", "provider": "intercom"},
        {"updated_after": "2023-11-14T22:14:00Z"},
        {"updated_before": 1_700_000_100},
        {"updated_after": 1_700_000_050, "updated_before": 1_700_000_150, "workspace": "w2"},
        {"provider": "intercom", "workspace": "w2", "state": "open", "tag": "vip"},
    ]
    for case in cases:
        query = "&".join(f"{k}={v}" for k, v in case.items())
        got = walk(client, f"{LIST}?{query}")

        def keep(row: dict[str, Any], case: dict[str, Any] = case) -> bool:
            after = case.get("updated_after")
            after = 1_700_000_040 if after == "2023-11-14T22:14:00Z" else after
            return (
                all(row[k] == case[k] for k in ("provider", "workspace", "state") if k in case)
                and ("tag" not in case or case["tag"] in row["tags"])
                and (after is None or row["updated_at"] > after)
                and ("updated_before" not in case or row["updated_at"] < case["updated_before"])
            )

        assert got == [r["external_id"] for r in newest_first if keep(r)], case


def test_the_cursor_neither_repeats_nor_skips_while_conversations_arrive(client: TestClient) -> None:
    for i in range(20):
        push(client, f"old{i:02d}", updated_at=1_700_000_000 + i)
    seen: list[str] = []
    cursor = None
    arrivals = itertools.count()
    while True:
        page = client.get(f"{LIST}?limit=3" + (f"&cursor={cursor}" if cursor else "")).json()
        seen += [item["external_id"] for item in page["items"]]
        for _ in range(2):  # newer conversations arrive between pages
            push(client, f"new{next(arrivals):02d}", updated_at=1_800_000_000 + len(seen))
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == [f"old{i:02d}" for i in reversed(range(20))]


@pytest.mark.parametrize(
    ("bound", "matches"),
    [
        ("0001-01-01T00:00:00+01:00", True),  # before the first instant a datetime holds in UTC
        ("1900-01-01T00:00:00Z", True),
        ("2023-11-14t22:13:20z", False),  # RFC 3339 allows lower case; the conversation is at 22:13:20 exactly
        ("2023-11-14", True),  # ISO-8601 dates are still read (as midnight UTC)
        ("9999-12-31T23:59:59-23:59", False),  # after the last instant a datetime holds in UTC
        ("253402300799", False),  # 9999-12-31T23:59:59Z: the largest documented unix second
        ("1699999999.0", True),  # an integer written with ".0" is still one (JSON Schema's integers)
    ],
)
def test_a_filter_bound_may_be_any_instant(client: TestClient, bound: str, matches: bool) -> None:
    # Payload timestamps must fall in 1970-2100; a filter bound is just a point in time, as the document says.
    push(client, "one", updated_at=1_700_000_000)
    response = client.get(LIST, params={"updated_after": bound})
    assert response.status_code == 200, response.text
    assert [item["external_id"] for item in response.json()["items"]] == (["one"] if matches else [])


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ("state=gone", "state"),
        ("updated_after=253402300800", "updated_after"),  # past the last second a datetime holds
        ("updated_after=yesterday", "updated_after"),
        ("updated_before=1e9", "updated_before"),
        ("tag=", "tag"),
        ("workspace=a%20b", "workspace"),
        ("cursor=czE6MTA", "cursor"),  # a search cursor, without q
    ],
)
def test_bad_filters_are_422(client: TestClient, query: str, field: str) -> None:
    response = client.get(f"{LIST}?{query}")
    assert response.status_code == 422
    assert response.json()["details"][0]["field"] == field


# Full-text search


def ids(response: Any) -> list[str]:
    assert response.status_code == 200, response.text
    return [item["external_id"] for item in response.json()["items"]]


def test_words_in_text_match_and_words_in_markup_do_not(client: TestClient) -> None:
    body = '<p class="zebra">Hello <b>wonderful</b> world, <a href="https://giraffe.example/x">the docs</a></p>'
    push(client, "html", parts=[part("p1", body)])
    assert ids(client.get(LIST, params={"q": "wonderful"})) == ["html"]
    assert ids(client.get(LIST, params={"q": "docs"})) == ["html"]
    for markup in ("zebra", "giraffe", "href", "class", "span"):
        assert ids(client.get(LIST, params={"q": markup})) == [], markup


def test_accents_and_case_do_not_matter(client: TestClient) -> None:
    push(client, "fr", parts=[part("p1", "<p>Une Crème Brûlée, s'il vous plaît</p>")])
    push(client, "cv", parts=[part("p1", "<p>my resume is attached</p>")])
    for q in ("creme brulee", "CRÈME", "brûlée", "PLAIT"):
        assert ids(client.get(LIST, params={"q": q})) == ["fr"], q
    assert ids(client.get(LIST, params={"q": "résumé"})) == ["cv"]


def test_every_word_must_be_there(client: TestClient) -> None:
    push(client, "a", parts=[part("p1", "<p>invoice overdue</p>")])
    push(client, "b", parts=[part("p1", "<p>invoice paid</p>")])
    assert sorted(ids(client.get(LIST, params={"q": "invoice"}))) == ["a", "b"]
    assert ids(client.get(LIST, params={"q": "invoice overdue"})) == ["a"]
    assert ids(client.get(LIST, params={"q": "overdue paid"})) == []


def test_hits_are_ranked_and_carry_a_marked_snippet(client: TestClient) -> None:
    push(client, "once", parts=[part("p1", "<p>A refund, maybe.</p>")])
    push(client, "often", parts=[part("p1", "<p>Refund! Refund &amp; &lt;refund&gt; please: refund refund.</p>")])
    items = client.get(LIST, params={"q": "refund"}).json()["items"]
    assert [item["external_id"] for item in items] == ["often", "once"]
    assert items[0]["match"]["score"] > items[1]["match"]["score"]
    assert items[0]["match"]["message_id"] == "p1"
    assert items[0]["match"]["snippet"] == (
        "<mark>Refund</mark>! <mark>Refund</mark> &amp; &lt;<mark>refund</mark>&gt; please: "
        "<mark>refund</mark> <mark>refund</mark>."
    )
    accented = push(client, "fr", parts=[part("p2", "<p>Le café est froid</p>")])
    match = next(i for i in client.get(LIST, params={"q": "cafe"}).json()["items"] if i["id"] == accented)["match"]
    assert match["snippet"] == "Le <mark>café</mark> est froid"


def test_the_subject_is_searched(client: TestClient) -> None:
    push(client, "s", source={"type": "email", "id": "m0", "subject": "Quarterly statement", "body": "<p>hi</p>",
                                "author": {"type": "user", "id": "u1"}})  # fmt: skip
    items = client.get(LIST, params={"q": "quarterly"}).json()["items"]
    assert [(i["external_id"], i["match"]["message_id"]) for i in items] == [("s", None)]


def test_search_with_filters_updates_deletions_and_pages(client: TestClient) -> None:
    for i in range(7):
        push(client, f"k{i}", workspace="w1" if i % 2 else "w2", parts=[part("p1", "<p>kiwi</p>")])
    assert sorted(ids(client.get(LIST, params={"q": "kiwi", "workspace": "w1"}))) == ["k1", "k3", "k5"]
    assert sorted(walk(client, f"{LIST}?q=kiwi", limit=3)) == [f"k{i}" for i in range(7)]
    # An update's new words are found.
    push(client, "k0", workspace="w2", updated_at=1_800_000_000, parts=[part("p2", "<p>mango</p>")])
    assert ids(client.get(LIST, params={"q": "mango"})) == ["k0"]
    # A deleted conversation is not.
    item = {"type": "conversation", "id": "k0"}
    envelope: dict[str, Any] = {"type": "notification_event", "app_id": "w2", "topic": "conversation.deleted"}
    envelope["id"] = "d1"
    envelope["data"] = {"item": {**item, "conversation_id": "k0"}}
    body = json.dumps(envelope).encode()
    hook = client.post("/webhooks/intercom", content=body, headers={"x-hub-signature": sign(body, SECRET)})
    assert hook.status_code == 200, hook.text
    assert ids(client.get(LIST, params={"q": "mango"})) == []


def test_search_ranks_the_newest_matches_of_a_window(client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(search, "WINDOW", 4)
    # Created in order m0..m5; m0 says it most often, but it is not among the 4 newest matches.
    for i in range(6):
        body = "<p>" + " ".join(["lemon"] * (6 - i)) + f" filler{i}</p>"
        push(client, f"m{i}", workspace="w1" if i % 2 else "w2", parts=[part("p1", body)])
    assert ids(client.get(LIST, params={"q": "lemon"})) == ["m2", "m3", "m4", "m5"]
    assert walk(client, f"{LIST}?q=lemon", limit=3) == ["m2", "m3", "m4", "m5"]
    # The window is over the matches that pass the filters: w2's three are all ranked.
    assert ids(client.get(LIST, params={"q": "lemon", "workspace": "w2"})) == ["m0", "m2", "m4"]
    # Narrower words reach older conversations.
    assert ids(client.get(LIST, params={"q": "lemon filler0"})) == ["m0"]
    deeper = client.get(LIST, params={"q": "lemon", "cursor": encode_search_cursor(5)})
    assert (deeper.status_code, deeper.json()["details"][0]["issue"]) == (422, "too_deep")


HOSTILE = ['"', "*", "AND(", "((", ")", "NEAR(a b)", "a OR b", "x:y", "^start", "-not", "'; DROP TABLE x", "\x00"]


@pytest.mark.parametrize("q", HOSTILE)
def test_anything_typed_is_text(client: TestClient, q: str) -> None:
    push(client, "a", parts=[part("p1", "<p>start not a y b x</p>")])
    assert client.get(LIST, params={"q": q}).status_code in (200, 422)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(q=st.text(min_size=1, max_size=80))
def test_no_query_is_a_server_error(client: TestClient, q: str) -> None:
    response = client.get(LIST, params={"q": q})
    assert response.status_code in (200, 422), response.text


def test_a_query_without_words_is_422(client: TestClient) -> None:
    response = client.get(LIST, params={"q": "*** ((("})
    assert (response.status_code, response.json()["details"][0]["issue"]) == (422, "no_words")


# The change feed


def feed(client: TestClient, cursor: str | None = None, limit: int = 100) -> dict[str, Any]:
    response = client.get("/internal/changes", params={"limit": limit, **({"cursor": cursor} if cursor else {})})
    assert response.status_code == 200, response.text
    return dict(response.json())


def test_every_change_once_in_order_and_resumable_from_any_cursor(client: TestClient) -> None:
    first = push(client, "a")
    push(client, "a")  # unchanged: no change
    push(client, "a", updated_at=1_700_000_100, parts=[part("p1")])
    push(client, "b")
    envelope: dict[str, Any] = {"type": "notification_event", "app_id": "w1", "topic": "conversation.deleted"}
    envelope["id"] = "d1"
    envelope["data"] = {"item": {"type": "conversation", "id": "a", "conversation_id": "a"}}
    body = json.dumps(envelope).encode()
    assert client.post("/webhooks/intercom", content=body, headers={"x-hub-signature": sign(body, SECRET)}).is_success
    items = feed(client)["items"]
    assert [(i["external_id"], i["action"], i["revision"]) for i in items] == [
        ("a", "created", 1),
        ("a", "updated", 2),
        ("b", "created", 1),
        ("a", "deleted", 3),
    ]
    assert items[0]["conversation_id"] == first
    seqs = [i["seq"] for i in items]
    assert seqs == sorted(set(seqs))
    # Page by page, from every cursor: the same changes, each once.
    collected: list[int] = []
    cursor = None
    cursors = []
    while True:
        page = feed(client, cursor, limit=1)
        cursors.append(page["next_cursor"])
        if not page["items"]:
            assert page["next_cursor"] == cursor  # nothing new: the same cursor, to ask again
            break
        collected += [i["seq"] for i in page["items"]]
        cursor = page["next_cursor"]
    assert collected == seqs
    for position, resume in enumerate(cursors[:-1]):
        assert [i["seq"] for i in feed(client, resume)["items"]] == seqs[position + 1 :]


def test_a_bad_feed_cursor_is_422(client: TestClient) -> None:
    for cursor in ("nope", "djE6MTox", "ZjE6LTE"):  # garbage, a list cursor, a negative seq
        response = client.get("/internal/changes", params={"cursor": cursor})
        assert (response.status_code, response.json()["details"][0]["field"]) == (422, "cursor")


# Exports


def stored(database_url: str) -> int:
    engine = admin_engine(database_url)
    try:
        with engine.connect() as conn:
            live = select(func.count()).select_from(conversations).where(conversations.c.deleted_at.is_(None))
            return int(conn.execute(live).scalar_one())
    finally:
        engine.dispose()


def test_the_export_has_every_conversation_once(client: TestClient, database_url: str) -> None:
    for i in range(1203):  # more than two of the export's reads
        push(client, f"e{i}", updated_at=1_700_000_000 + i % 50, workspace="w1" if i % 3 else "w2")
    response = client.get("/internal/exports/conversations.ndjson")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/x-ndjson")
    lines = response.content.splitlines()
    assert len(lines) == int(response.headers["x-kbms-count"]) == stored(database_url) == 1203
    details = [json.loads(line) for line in lines]
    assert len({d["id"] for d in details}) == 1203
    assert client.get(f"{LIST}/{details[7]['id']}").content == lines[7]
    filtered = client.get("/internal/exports/conversations.ndjson?workspace=w2").content.splitlines()
    assert len(filtered) == 401
    assert {json.loads(line)["workspace"] for line in filtered} == {"w2"}


def test_kbms_export_in_every_format(client: TestClient, database_url: str, tmp_path: Path) -> None:
    pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    customer = {"type": "user", "id": "u1", "name": "Ana"}
    agent = {"type": "admin", "id": "a1", "name": "Ben"}
    push(
        client,
        "timed",
        created_at=1_700_000_000,
        updated_at=1_700_000_900,
        state="closed",
        parts=[
            part("r1", "<p>On it</p>", at=1_700_000_060, author=agent),
            part("c2", "<p>Thanks</p>", at=1_700_000_100, author=customer),
            part("x", None, at=1_700_000_900, part_type="close", author=agent),
        ],
    )
    push(client, "plain", tags=tagged("vip", "billing"))
    runner = CliRunner()
    for fmt, name in (("ndjson", "out.ndjson"), ("csv", "out.csv"), ("parquet", "pq")):
        result = runner.invoke(
            cli, ["export", "--format", fmt, "--out", str(tmp_path / name), "--database-url", database_url]
        )
        assert result.exit_code == 0, result.output
        assert "Exported 2 conversations" in result.output
    assert len((tmp_path / "out.ndjson").read_text().splitlines()) == 2
    rows = {row["external_id"]: row for row in csv.DictReader((tmp_path / "out.csv").read_text().splitlines())}
    assert (rows["timed"]["first_response_seconds"], rows["timed"]["resolution_seconds"]) == ("60.0", "900.0")
    assert (rows["plain"]["tags"], rows["plain"]["first_response_seconds"]) == ("vip;billing", "")
    table = pq.read_table(tmp_path / "pq" / "conversations.parquet").to_pylist()
    assert sorted(row["external_id"] for row in table) == ["plain", "timed"]
    assert next(row for row in table if row["external_id"] == "plain")["tags"] == ["vip", "billing"]
    messages = pq.read_table(tmp_path / "pq" / "messages.parquet").to_pylist()
    assert {(m["message_id"], m["author_role"]) for m in messages if m["message_id"] in ("r1", "c2")} == {
        ("r1", "agent"),
        ("c2", "customer"),
    }
    filtered = runner.invoke(
        cli, ["export", "--tag", "vip", "--out", str(tmp_path / "vip.ndjson"), "--database-url", database_url]
    )
    assert filtered.exit_code == 0
    assert [json.loads(line)["external_id"] for line in (tmp_path / "vip.ndjson").read_text().splitlines()] == ["plain"]


@settings(max_examples=2000, deadline=None)
@given(text=st.text(max_size=40) | st.text(alphabet="aeiouAÉÈÊËéèêëçÇßﬁⅣΣσςİı\u0301\u0308\u0327 ", max_size=40))
def test_folding_a_whole_text_is_folding_each_character(text: str) -> None:
    # The index folds runs of characters (fast); snippets fold character by character (to map positions back).
    # Both must equal the definition: each character decomposed (NFKD), its combining marks dropped, case folded.
    defined = "".join(
        "".join(c for c in unicodedata.normalize("NFKD", ch) if not unicodedata.combining(c)).casefold() for ch in text
    )
    assert search.fold(text) == search.folded_with_positions(text)[0] == defined


@settings(max_examples=2000, deadline=None)
@given(text=st.text(max_size=60) | st.text(alphabet="ab1_-. \t\nÉé\u0301ßﬁⅣ٣", max_size=60))
def test_words_are_the_word_runs_of_the_folded_text(text: str) -> None:
    # words() splits ASCII text without the regex (fast); it must find exactly the regex's runs.
    assert search.words(text) == search.WORD.findall(search.fold(text))

"""The storage contract: every backend must behave the same. Runs against each configured engine."""

from __future__ import annotations

import asyncio
import hashlib
from datetime import UTC, datetime
from typing import Any

import pytest
from sqlalchemy import func, select

from kbms.deliveries import Applied, Delivery, Pending
from kbms.errors import FieldIssue, ValidationFailed
from kbms.model import ConversationDeletion, ConversationSnapshot, micros
from kbms.providers import get_provider
from kbms.storage import Store, admin_engine
from kbms.storage.base import ALL, Cursor
from kbms.storage.schema import conversations, ledger, messages
from tests.support.helpers import dumps, intercom_payload, part

pytestmark = pytest.mark.anyio
NOW = datetime(2026, 1, 1, tzinfo=UTC)


def delivery(body: bytes, *, key: str | None = None, workspace: str = "w1") -> Delivery:
    digest = hashlib.sha256(body).hexdigest()
    return Delivery(
        provider="intercom",
        workspace=workspace,
        kind="push",
        topic=None,
        delivery_key=key or f"push:{workspace}:{digest}",
        body_hash=digest,
        body=body,
        received_at=NOW,
    )


def snapshot(payload: dict[str, Any], workspace: str = "w1") -> ConversationSnapshot:
    return get_provider("intercom").parse_push(dumps(payload), workspace=workspace, default_workspace="default")


async def put(store: Store, payload: dict[str, Any], *, key: str | None = None, workspace: str = "w1") -> Applied:
    body = dumps(payload)
    return await store.ingest(delivery(body, key=key, workspace=workspace), snapshot(payload, workspace))


def cid(applied: Applied) -> str:
    assert applied.conversation_id is not None
    return applied.conversation_id


def count(database_url: str, table: Any, *where: Any) -> int:
    engine = admin_engine(database_url)
    try:
        with engine.connect() as conn:
            return int(conn.execute(select(func.count()).select_from(table).where(*where)).scalar_one())
    finally:
        engine.dispose()


async def test_insert_then_read_back(store: Store) -> None:
    applied = await put(store, intercom_payload(parts=[part("p1")]))
    assert applied.result == "created"
    detail = await store.get_conversation(cid(applied))
    assert detail is not None
    assert (detail.external_id, detail.workspace, detail.revision) == ("c1", "w1", 1)
    assert [m.id for m in detail.messages] == ["c1-m0", "p1"]
    raw = await store.get_conversation_json(cid(applied))
    assert raw == detail.model_dump_json().encode()


async def test_unknown_conversation_is_none(store: Store) -> None:
    assert await store.get_conversation("nope") is None
    assert await store.get_conversation_json("nope") is None


async def test_same_delivery_twice_is_a_duplicate(store: Store, database_url: str) -> None:
    first = await put(store, intercom_payload())
    again = await put(store, intercom_payload())
    assert again == Applied("unchanged", first.conversation_id, "c1", duplicate_delivery=True)
    assert count(database_url, ledger) == 1


async def test_same_content_under_another_delivery_is_unchanged(store: Store, database_url: str) -> None:
    first = await put(store, intercom_payload())
    again = await put(store, intercom_payload(), key="another-delivery")
    assert (again.result, again.conversation_id, again.duplicate_delivery) == (
        "unchanged",
        first.conversation_id,
        False,
    )
    assert count(database_url, ledger) == 2
    assert count(database_url, conversations) == 1


async def test_merge_adds_parts_and_bumps_revision(store: Store) -> None:
    first = await put(store, intercom_payload(parts=[part("p1")]))
    second = await put(store, intercom_payload(updated_at=1_700_000_500, parts=[part("p2", at=1_700_000_400)]))
    assert second.result == "updated"
    detail = await store.get_conversation(cid(first))
    assert detail is not None
    assert [m.id for m in detail.messages] == ["c1-m0", "p1", "p2"]
    assert detail.revision == 2
    page = await store.list_conversations(limit=10, cursor=None)
    assert page.items[0].message_count == 3


async def test_workspaces_separate_conversations(store: Store) -> None:
    a = await put(store, intercom_payload(), workspace="w1")
    b = await put(store, intercom_payload(), workspace="w2")
    assert a.conversation_id != b.conversation_id
    assert (a.result, b.result) == ("created", "created")


async def test_rejections_are_kept_and_a_later_valid_delivery_takes_the_row(store: Store, database_url: str) -> None:
    body = b'{"id": "c9"}'
    await store.reject(delivery(body, key="k1"), [FieldIssue("created_at", "missing", "Field required")])
    await store.reject(delivery(body, key="k1"), [FieldIssue("created_at", "missing", "Field required")])
    assert count(database_url, ledger, ledger.c.outcome == "rejected") == 1
    known = await store.find_delivery("intercom", "k1")
    assert known is not None
    assert known.outcome == "rejected"
    # The same delivery key now validates (say, after a mapper fix): the rejected row is taken over.
    applied = await put(store, intercom_payload("c9"), key="k1")
    assert applied.result == "created"
    assert count(database_url, ledger) == 1
    known = await store.find_delivery("intercom", "k1")
    assert known is not None
    assert (known.outcome, known.conversation_id) == ("created", applied.conversation_id)


async def test_concurrent_deliveries_of_one_new_conversation_store_one(store: Store, database_url: str) -> None:
    results = await asyncio.gather(*(put(store, intercom_payload("c50"), key=f"k{i}") for i in range(50)))
    assert sorted(r.result for r in results).count("created") == 1
    assert len({r.conversation_id for r in results}) == 1
    assert count(database_url, conversations) == 1


async def test_concurrent_snapshots_each_with_a_new_part_keep_them_all(store: Store, database_url: str) -> None:
    payloads = [
        intercom_payload("c20", updated_at=1_700_000_000 + i, parts=[part(f"p{i}", at=1_700_000_000 + i)])
        for i in range(20)
    ]
    results = await asyncio.gather(*(put(store, p) for p in payloads))
    detail = await store.get_conversation(cid(results[0]))
    assert detail is not None
    assert {m.id for m in detail.messages} == {"c20-m0", *(f"p{i}" for i in range(20))}
    assert count(database_url, messages) == 21


async def test_pagination_is_newest_updated_first_without_duplicates_or_gaps(store: Store) -> None:
    # Pairs share an updated_at, so the tie-break on the key is exercised too.
    for i in range(25):
        await put(store, intercom_payload(f"c{i}", updated_at=1_700_000_000 + i // 2))
    seen: list[str] = []
    cursor: Cursor | None = None
    while True:
        page = await store.list_conversations(limit=4, cursor=cursor)
        seen += [item.external_id for item in page.items]
        if page.next_cursor is None:
            break
        cursor = page.next_cursor
        # Conversations arriving while a client pages (newer ones) must not disturb its walk.
        await put(store, intercom_payload(f"new{len(seen)}", updated_at=1_800_000_000))
    assert sorted(seen) == sorted(f"c{i}" for i in range(25))
    assert len(seen) == len(set(seen)) == 25
    stamps = [1_700_000_000 + int(e[1:]) // 2 for e in seen]
    assert stamps == sorted(stamps, reverse=True)


async def test_last_page_has_no_cursor(store: Store) -> None:
    for i in range(3):
        await put(store, intercom_payload(f"c{i}"))
    page = await store.list_conversations(limit=3, cursor=None)
    assert len(page.items) == 3
    assert page.next_cursor is None
    assert (await store.list_conversations(limit=10, cursor=None)).next_cursor is None


async def test_unicode_survives_and_nul_is_stripped(store: Store) -> None:
    text = "naïve café — 日本語 🙂 שלום e\u0301 \u202eRTL"
    payload = intercom_payload(parts=[part("p1", f"<p>{text}\u0000!</p>")])
    payload["source"]["author"]["name"] = "Zoë\u0000 Ørsted"
    applied = await put(store, payload)
    detail = await store.get_conversation(cid(applied))
    assert detail is not None
    assert detail.messages[1].content == f"{text}!"
    assert detail.participants[0].name == "Zoë Ørsted"


async def test_timestamps_are_utc_and_exact(store: Store) -> None:
    payload = intercom_payload(parts=[part("p1", at=0)])
    payload["created_at"] = "2024-06-01T12:00:00.123456+02:00"
    payload["conversation_parts"]["conversation_parts"][0]["created_at"] = "2024-06-01T09:30:00-01:00"
    applied = await put(store, payload)
    detail = await store.get_conversation(cid(applied))
    assert detail is not None
    assert detail.created_at == datetime(2024, 6, 1, 10, 0, 0, 123456, tzinfo=UTC)
    assert detail.messages[1].sent_at == datetime(2024, 6, 1, 10, 30, tzinfo=UTC)
    assert micros(detail.created_at) % 1_000_000 == 123456
    raw = await store.get_conversation_json(cid(applied))
    assert raw is not None
    assert b'"created_at":"2024-06-01T10:00:00.123456Z"' in raw


async def test_ping(store: Store) -> None:
    await store.ping()


async def test_search_documents_of_one_batch_are_its_last_words(store: Store) -> None:
    """A batch's search documents are written at its end (storage/feed.py, ``flush_changes``): what a conversation
    said last in the batch is found, what it said before is not, and one deleted in the batch is gone."""
    gone = intercom_payload("c-gone", title="zulu kept only until deleted")
    await put(store, gone)
    first = intercom_payload("c-batch", title="alpha", updated_at=1_700_000_100)
    second = intercom_payload("c-batch", title="bravo", updated_at=1_700_000_200)
    deletion = ConversationDeletion(provider="intercom", workspace="w1", external_id="c-gone")
    items = [
        Pending(delivery(dumps(first)), change=snapshot(first)),
        Pending(delivery(dumps(second)), change=snapshot(second)),
        Pending(delivery(b"deleted", key="delete:c-gone"), change=deletion),
    ]
    applied = await store.ingest_many(items)
    assert [a.result for a in applied if isinstance(a, Applied)] == ["created", "updated", "updated"]

    async def found(word: str) -> list[str]:
        return [hit.summary.id for hit in await store.search([word], filters=ALL, limit=10, offset=0)]

    assert await found("bravo") == [cid(applied[0])]  # type: ignore[arg-type]
    assert await found("alpha") == []
    assert await found("zulu") == []


async def test_a_document_the_engine_refuses_fails_its_own_write_only(store: Store, database_url: str) -> None:
    """PostgreSQL refuses a tsvector over 1 MB: that conversation is refused alone and its neighbours in the batch
    are stored (its document is written inside its own savepoint). SQLite has no such limit and stores all three."""

    def words(prefix: str) -> str:
        return "<p>" + " ".join(f"{prefix}{i:06d}" for i in range(100_000)) + "</p>"

    big = intercom_payload("c-big", parts=[part("p1", words("x")), part("p2", words("y"))])
    payloads = [intercom_payload("c-a"), big, intercom_payload("c-c")]
    applied = await store.ingest_many([Pending(delivery(dumps(p)), change=snapshot(p)) for p in payloads])
    refused = database_url.startswith("postgresql")
    kinds = [type(result).__name__ for result in applied]
    assert kinds == ["Applied", "ValidationFailed" if refused else "Applied", "Applied"]
    assert count(database_url, conversations) == (2 if refused else 3)


async def test_a_document_the_engine_refuses_fails_a_write_alone_whole(store: Store, database_url: str) -> None:
    """One ingestion on PostgreSQL sends its children, tags and search document with the COMMIT: a refusal found
    there still fails the write with its 422 issue, leaves nothing of it, and the store goes on writing."""
    words = "<p>" + " ".join(f"x{i:06d}" for i in range(100_000)) + "</p>"
    big = intercom_payload("c-big", parts=[part("p1", words), part("p2", words.replace("x", "y"))])
    refused = database_url.startswith("postgresql")
    if refused:
        with pytest.raises(ValidationFailed) as failure:
            await put(store, big)
        assert failure.value.issues[0].issue == "unstorable_value"
        assert [count(database_url, table) for table in (conversations, messages, ledger)] == [0, 0, 0]
    else:
        assert (await put(store, big)).result == "created"
    assert (await put(store, intercom_payload("c-after", parts=[part("p1")]))).result == "created"
    assert count(database_url, conversations) == (1 if refused else 2)

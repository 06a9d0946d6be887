"""PostgreSQL as the scale-out store: several server processes on one database, a bounded pool, one contract."""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Iterator
from pathlib import Path

import httpx2
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import text

from kbms.api import create_app
from kbms.deliveries import Delivery
from kbms.errors import StorageUnavailable, ValidationFailed
from kbms.ingest import Refused, ingest_batch, ingest_push
from kbms.providers import get_provider
from kbms.providers.intercom.signature import sign
from kbms.settings import Settings
from kbms.storage import admin_engine, open_store
from tests.conftest import LiveServer, migrated_sqlite_url, postgres_schema, start_server
from tests.support.helpers import INTERCOM, JSON_HEADERS, intercom_conversations, intercom_payload, part

pytestmark = [pytest.mark.postgres, pytest.mark.anyio]
INGEST = "/integrations/intercom/conversations"


@pytest.fixture
def postgres_url() -> Iterator[str]:
    with postgres_schema() as url:
        yield url


@pytest.mark.slow
async def test_two_servers_and_64_concurrent_partial_deliveries_give_one_conversation(
    postgres_url: str, tmp_path: Path
) -> None:
    # Server A runs two worker processes, server B one: three processes share the database.
    a = start_server(postgres_url, tmp_path / "a.log", args=("--workers", "2"))
    b = start_server(postgres_url, tmp_path / "b.log")
    try:
        rng = random.Random(7)
        parts = [part(f"p{i:02d}", f"<p>part {i}</p>", at=1_700_000_000 + i) for i in range(40)]
        deliveries = [
            intercom_payload("shared", updated_at=1_700_000_000 + i, parts=rng.sample(parts, rng.randint(1, 8)))
            for i in range(64)
        ]
        expected = {p["id"] for d in deliveries for p in d["conversation_parts"]["conversation_parts"]}
        limits = httpx2.Limits(max_connections=64)
        async with (
            httpx2.AsyncClient(base_url=a.url, timeout=30, limits=limits) as to_a,
            httpx2.AsyncClient(base_url=b.url, timeout=30, limits=limits) as to_b,
        ):
            responses = await asyncio.gather(
                *((to_a if i % 2 else to_b).post(INGEST, json=d) for i, d in enumerate(deliveries))
            )
            assert sorted({r.status_code for r in responses}) in ([200, 201], [201])
            assert [r.status_code for r in responses].count(201) == 1
            ids = {r.json()["id"] for r in responses}
            assert len(ids) == 1
            listed = (await to_a.get("/internal/conversations")).json()["items"]
            detail = (await to_b.get(f"/internal/conversations/{ids.pop()}")).json()
        assert [item["external_id"] for item in listed] == ["shared"]
        assert {m["id"] for m in detail["messages"]} == {"shared-m0", *expected}
        assert detail["updated_at"] == "2023-11-14T22:14:23Z"  # the newest of the 64 snapshots
    finally:
        a.stop()
        b.stop()


@pytest.mark.slow
async def test_an_exhausted_pool_answers_503_with_retry_after_and_recovers(postgres_url: str, tmp_path: Path) -> None:
    env = {"KBMS_DB_POOL_SIZE": "1", "KBMS_DB_POOL_TIMEOUT": "1"}
    server: LiveServer = start_server(postgres_url, tmp_path / "server.log", env=env)
    blocker = admin_engine(postgres_url)
    try:
        async with httpx2.AsyncClient(base_url=server.url, timeout=5) as http:
            created = await http.post(INGEST, json=intercom_payload("locked"))
            assert created.status_code == 201
            with blocker.connect() as conn, conn.begin():
                # Hold the conversation's row lock: the server's only connection will wait on it.
                conn.execute(text("SELECT pk FROM conversations WHERE external_id = 'locked' FOR UPDATE"))
                update = asyncio.create_task(
                    http.post(INGEST, json=intercom_payload("locked", updated_at=1_800_000_000))
                )
                await asyncio.sleep(0.3)
                # The client's 5 s timeout is the bound: a request waiting for a connection must not hang.
                busy = await asyncio.gather(*(http.get("/internal/conversations") for _ in range(5)))
            assert [r.status_code for r in busy] == [503] * 5
            assert all(r.headers["retry-after"] == "1" for r in busy)
            assert busy[0].json()["error_code"] == "unavailable"
            assert (await update).status_code == 200  # the lock was released before lock_timeout
            assert (await http.get("/internal/conversations")).status_code == 200
    finally:
        blocker.dispose()
        server.stop()


def _replay(url: str) -> list[bytes]:
    """Every answer kbms gives to a fixed sequence of requests, as bytes: pushes, webhooks (a redaction and a
    deletion among them), pages and details."""
    answers: list[bytes] = []
    settings = Settings(database_url=url, secrets={"KBMS_INTERCOM_CLIENT_SECRET": "identical"})
    with TestClient(create_app(settings)) as client:
        for _name, workspace, payload in intercom_conversations():
            answers.append(client.post(f"{INGEST}?workspace={workspace}", json=payload).content)
        for path in sorted(INTERCOM.glob("1*_webhook_*.json")):
            body = path.read_bytes()
            headers = {"content-type": "application/json", "x-hub-signature": sign(body, "identical")}
            answers.append(client.post("/webhooks/intercom", content=body, headers=headers).content)
        answers.append(
            client.post(
                INGEST, content=(INTERCOM / "04_rest_redacted_part_v2.16.json").read_bytes(), headers=JSON_HEADERS
            ).content
        )
        answers.append(client.post(INGEST, json=intercom_payload("later", updated_at=1_800_000_000)).content)
        cursor: str | None = None
        while True:
            page = client.get("/internal/conversations", params={"limit": 4, **({"cursor": cursor} if cursor else {})})
            answers.append(page.content)
            for item in page.json()["items"]:
                answers.append(client.get(f"/internal/conversations/{item['id']}").content)
            cursor = page.json()["next_cursor"]
            if cursor is None:
                return answers


def test_the_same_input_gives_byte_identical_output_on_both_engines(postgres_url: str, tmp_path: Path) -> None:
    on_sqlite = _replay(migrated_sqlite_url(tmp_path))
    on_postgres = _replay(postgres_url)
    assert len(on_sqlite) >= 30  # ingest answers, every page and every detail
    assert on_sqlite == on_postgres


async def test_a_value_the_database_refuses_is_rolled_back_alone_in_a_batch(
    postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A real data exception mid-batch (here SELECT 1/0 for one line) aborts only that line's savepoint."""
    from kbms.storage import writes

    original = writes.apply_delivery

    def refusing(statements: object, conn: object, delivery: Delivery, *args: object, **kwargs: object) -> object:
        if b'"bad"' in delivery.body:
            conn.exec_driver_sql("SELECT 1/0")  # type: ignore[attr-defined]
        return original(statements, conn, delivery, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(writes, "apply_delivery", refusing)
    store = open_store(Settings(database_url=postgres_url))
    try:
        bodies = [json.dumps(intercom_payload(name)).encode() for name in ("a", "bad", "c")]
        outcomes = await ingest_batch(store, get_provider("intercom"), bodies, workspace=None)
        assert [type(o).__name__ for o in outcomes] == ["IngestOutcome", "Refused", "IngestOutcome"]
        refused = outcomes[1]
        assert isinstance(refused, Refused)
        assert not refused.kept  # refused by the database: nothing of it is in the ledger
        assert isinstance(refused.error, ValidationFailed)
        assert refused.error.issues[0].issue == "unstorable_value"
        page = await store.list_conversations(limit=10, cursor=None)
        assert sorted(item.external_id for item in page.items) == ["a", "c"]
    finally:
        await store.close()


@pytest.mark.parametrize("idle", [True, False])
async def test_a_pooled_connection_that_died_while_idle_is_replaced_before_use(
    postgres_url: str, monkeypatch: pytest.MonkeyPatch, idle: bool
) -> None:
    """The pool tests a connection that has been idle (``PING_AFTER_IDLE``) before handing it out: one whose
    server session ended meanwhile (a restart, an idle timeout) is replaced, and the request never sees it. One in
    steady use is not tested: its request fails (503, retry) and the pool is renewed."""
    from sqlalchemy import make_url

    from kbms.errors import StorageUnavailable
    from kbms.storage.postgres import connect

    monkeypatch.setattr(connect, "PING_AFTER_IDLE", 0.0 if idle else 3600.0)
    name = f"kbms-ping-{random.getrandbits(48):012x}"
    url = make_url(postgres_url).update_query_dict({"application_name": name}).render_as_string(hide_password=False)
    store = open_store(Settings(database_url=url, db_pool_size=1))
    admin = admin_engine(postgres_url)
    try:
        assert await store.find_delivery("intercom", "no-such-key") is None  # the pool's one connection is made
        with admin.connect() as conn:
            killed = conn.execute(
                text("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name = :n"),
                {"n": name},
            ).scalar_one()
        assert killed == 1
        if idle:
            assert await store.find_delivery("intercom", "no-such-key") is None
        else:
            with pytest.raises(StorageUnavailable):
                await store.find_delivery("intercom", "no-such-key")
            assert await store.find_delivery("intercom", "no-such-key") is None  # the pool renewed itself
    finally:
        admin.dispose()
        await store.close()


async def test_a_lookup_runs_without_a_transaction_and_leaves_none_behind(postgres_url: str) -> None:
    """Lookups (one statement) run in autocommit, sparing a COMMIT; the pooled connection they used goes back to
    transactions for the next write (one connection in the pool: the same one)."""
    store = open_store(Settings(database_url=postgres_url, db_pool_size=1))

    def autocommit(conn: object) -> bool:
        return bool(conn.connection.driver_connection.autocommit)  # type: ignore[attr-defined]

    try:
        assert await store._lookup(autocommit) is True  # type: ignore[attr-defined]
        assert await store._write(autocommit) is False  # type: ignore[attr-defined]
        assert await store._read(autocommit) is False  # type: ignore[attr-defined]
    finally:
        await store.close()


async def test_a_failed_commit_leaves_the_pooled_connection_usable(
    postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The feed's statements and the COMMIT go in one pipeline: when one of them fails, COMMIT never runs and the
    transaction is left open in error on the driver. The store ends it, so the pool's one connection serves the
    next write (it was handed out as it was, and every write on it failed with InFailedSqlTransaction)."""
    from kbms.storage import feed
    from kbms.storage.postgres import store as postgres_store

    original = feed.flush_changes  # what the store calls, under its own name
    failures = [True]

    def failing(sql: object, conn: object) -> None:
        if failures:
            failures.pop()
            conn.connection.driver_connection.execute("SELECT 1/0")  # type: ignore[attr-defined]
        original(sql, conn)  # type: ignore[arg-type]

    monkeypatch.setattr(postgres_store, "flush_changes", failing)
    store = open_store(Settings(database_url=postgres_url, db_pool_size=1))
    provider = get_provider("intercom")
    try:
        first, second = (json.dumps(intercom_payload(name)).encode() for name in ("first", "second"))
        with pytest.raises(ValidationFailed):  # a data exception: what a value the database refuses raises
            await ingest_batch(store, provider, [first], workspace=None)
        outcomes = await ingest_batch(store, provider, [second], workspace=None)
        assert [type(o).__name__ for o in outcomes] == ["IngestOutcome"]
        page = await store.list_conversations(limit=10, cursor=None)
        assert [item.external_id for item in page.items] == ["second"]
    finally:
        await store.close()


async def test_one_ingestion_sends_what_it_reads_nothing_back_from_with_the_commit(
    postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A write alone in its transaction keeps its children, tags, search document and ledger outcome for the
    commit's round trip; a batch writes them as it goes, inside each line's savepoint."""
    from kbms.storage import feed
    from kbms.storage.postgres import store as postgres_store
    from kbms.storage.statements import Sql

    flushing: list[bool] = []
    seen: list[tuple[str, bool]] = []  # (what was written, whether by the end-of-transaction flush)
    original_flush, original_run_many = feed.flush_changes, Sql.run_many

    def flush(sql: Sql, conn: object) -> None:
        flushing.append(True)
        try:
            original_flush(sql, conn)  # type: ignore[arg-type]
        finally:
            flushing.pop()

    def run_many(self: Sql, conn: object, statement: object, rows: list[dict[str, object]]) -> None:
        name = getattr(getattr(statement, "table", None), "name", type(statement).__name__)
        seen.append((name, bool(flushing)))
        original_run_many(self, conn, statement, rows)  # type: ignore[arg-type]

    monkeypatch.setattr(postgres_store, "flush_changes", flush)
    monkeypatch.setattr(Sql, "run_many", run_many)
    store = open_store(Settings(database_url=postgres_url))
    provider = get_provider("intercom")
    payload = intercom_payload("alone", parts=[part("p1")], tags={"tags": [{"name": "vip"}]})
    try:
        await ingest_push(store, provider, json.dumps(payload).encode(), workspace=None)
        alone, seen[:] = list(seen), []
        await ingest_batch(store, provider, [json.dumps(intercom_payload(n)).encode() for n in "ab"], workspace=None)
        in_batch = list(seen)
    finally:
        await store.close()
    written = {name for name, _ in alone}
    assert {"participants", "messages", "conversation_tags", "ledger", "changes"} <= written
    assert all(at_commit for _name, at_commit in alone)
    assert [name for name, at_commit in in_batch if not at_commit] == ["participants", "messages"] * 2


async def test_a_batch_may_take_the_database_timeout_once_per_hundred_lines(postgres_url: str) -> None:
    """KBMS_DB_TIMEOUT bounds a batch's transaction, and its ledger lookup, once per 100 of its lines: `kbms ingest`
    writes 500 a transaction, and a single bound failed it whenever the server slowed down (here: a 1 s job, a 0.5 s
    timeout)."""
    store = open_store(Settings(database_url=postgres_url, db_timeout=0.5))

    def slow(conn: object) -> str:
        time.sleep(1)
        return "committed"

    try:
        assert await store._write_many(slow, lines=500) == "committed"  # type: ignore[attr-defined]
        assert await store._read_many(slow, lines=500) == "committed"  # type: ignore[attr-defined]
        with pytest.raises(StorageUnavailable):
            await store._write(slow)  # type: ignore[attr-defined]
    finally:
        await store.close()


@pytest.mark.parametrize(("first", "refreshes"), [(10_000, 1), (2, 3)])
def test_a_backfill_keeps_the_planner_statistics_fresh_as_it_grows_and_after(
    postgres_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, first: int, refreshes: int
) -> None:
    """Right after a bulk load, before autovacuum analyzed the tables, PostgreSQL guessed 500 rows for a common word
    and ranked every match (160 ms at 100,000 conversations) instead of walking the newest (6.5 ms); during one, a
    chunk's ledger lookup scanned every row of its provider (8.5 s at 540,000). ``kbms ingest`` analyzes what lists,
    searches and its own lookups read each time it has written as much again (from 10,000 rows on), and at the end.
    Here, 5 conversations in chunks of 2: from 2 on, at 2 and 4, then at the end."""
    from kbms import backfill

    tables = ("conversations", "search_documents", "ledger")

    def analyzed() -> dict[str, int]:
        engine = admin_engine(postgres_url)
        try:
            with engine.connect() as conn:
                query = text("SELECT relname, analyze_count FROM pg_stat_user_tables WHERE relname = ANY(:names)")
                rows = conn.execute(query, {"names": list(tables)}).all()
        finally:
            engine.dispose()
        return {name: count for name, count in rows}

    monkeypatch.setattr(backfill, "CHUNK_LINES", 2)
    statistics = backfill.Statistics
    monkeypatch.setattr(backfill, "Statistics", lambda: statistics(first))
    assert analyzed() == dict.fromkeys(tables, 0)
    path = tmp_path / "conversations.ndjson"
    path.write_text("\n".join(json.dumps(intercom_payload(f"c{n}")) for n in range(5)) + "\n")
    report = backfill.ingest_file(
        Settings(database_url=postgres_url), "intercom", path, workspace=None, jobs=1, advance=lambda _done: None
    )
    assert report.results["created"] == 5
    assert analyzed() == dict.fromkeys(tables, refreshes)

"""The sync state (issue 15) on every engine: the fetch queue, checkpoints, leases, dead letters, migration 0003."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
from sqlalchemy import inspect, select, true

from kbms.deliveries import Delivery
from kbms.model import ConversationDeletion, micros
from kbms.providers import get_provider
from kbms.providers.pull import Listed
from kbms.settings import Settings
from kbms.storage import Store, admin_engine, open_store
from kbms.storage import sync as sync_sql
from kbms.storage.base import KEEP, SyncCounts, SyncJob
from kbms.storage.migrate import alembic_config, upgrade
from kbms.storage.schema import conversations
from tests.conftest import postgres_schema
from tests.support.helpers import dumps, intercom_payload

pytestmark = pytest.mark.anyio
P, W = "intercom", "w1"
SECOND = 1_000_000
MINUTE = 60 * SECOND


def now() -> int:
    return micros(datetime.now(UTC))


def later() -> int:
    """A claim's ``now`` by which every job queued so far is due."""
    return now() + SECOND


async def claim(store: Store, *, owner: str = "a", limit: int = 100, at: int | None = None) -> list[SyncJob]:
    return await store.claim(P, W, owner=owner, limit=limit, now=later() if at is None else at, lease=MINUTE)


async def state(store: Store, provider: str = P, workspace: str = W) -> Any:
    found = {(s.provider, s.workspace): s for s in await store.sync_states()}
    return found.get((provider, workspace))


async def test_a_pending_conversation_keeps_one_job_the_earliest_due_and_the_newest_listing(store: Store) -> None:
    base = now() + MINUTE
    await store.enqueue(P, W, [Listed("a", 10), Listed("b", 20)], "backfill", not_before=base + 100)
    await store.enqueue(P, W, [Listed("a", 15, b"{}")], "sweep", not_before=base + 50)
    await store.enqueue(P, W, [Listed("a", 5, b"old")], "sweep", not_before=base + 500)  # an older listing
    assert (await state(store)).pending == 2
    assert await claim(store, at=base + 49) == []
    (a,) = await claim(store, at=base + 50)
    assert (a.external_id, a.reason, a.listed_updated_at, a.prefetched, a.attempts) == ("a", "backfill", 15, b"{}", 1)
    (b,) = await claim(store, at=base + 100)
    assert (b.external_id, b.listed_updated_at) == ("b", 20)


async def test_an_unknown_version_is_the_newest_and_duplicates_in_one_call_make_one_job(store: Store) -> None:
    await store.enqueue(P, W, [Listed("a", 10, b"x"), Listed("a", 30, b"y"), Listed("a", 20, b"z")], "sweep")
    (job,) = await claim(store)
    assert (job.listed_updated_at, job.prefetched) == (30, b"y")
    await store.finish(job)
    await store.enqueue(P, W, [Listed("a", 10, b"x")], "sweep")
    await store.enqueue(P, W, [Listed("a", None)], "webhook")  # a hint: the fetch may never be skipped
    await store.enqueue(P, W, [Listed("a", 40, b"w")], "sweep")
    (job,) = await claim(store)
    assert (job.listed_updated_at, job.prefetched, job.reason) == (None, None, "sweep")


async def test_the_checkpoint_moves_forward_only_and_the_cursor_as_told(store: Store) -> None:
    await store.enqueue(P, W, [], "backfill", position="page-2", checkpoint=100)
    source = await state(store)
    assert (source.checkpoint, source.cursor, source.pending) == (100, "page-2", 0)
    await store.enqueue(P, W, [Listed("a", 60)], "sweep", checkpoint=50)
    source = await state(store)
    assert (source.checkpoint, source.cursor, source.pending, source.oldest_queued) == (100, "page-2", 1, 60)
    assert source.stored_through == 59  # "a" (listed at 60) is queued, not stored yet
    await store.enqueue(P, W, [], "sweep", position=None, checkpoint=200)
    source = await state(store)
    assert (source.checkpoint, source.cursor) == (200, None)
    await store.enqueue(P, W, [], "sweep", position="again")
    assert ((await state(store)).checkpoint, (await state(store)).cursor) == (200, "again")


async def test_jobs_and_the_checkpoint_they_pass_commit_together(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    await store.enqueue(P, W, [], "backfill", position="p1", checkpoint=100)

    def crash(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("injected after the jobs were inserted")

    monkeypatch.setattr(sync_sql, "advance", crash)
    with pytest.raises(RuntimeError, match="injected"):
        await store.enqueue(P, W, [Listed("a", 150), Listed("b", 160)], "backfill", position="p2", checkpoint=160)
    monkeypatch.undo()
    source = await state(store)
    assert (source.checkpoint, source.cursor, source.pending) == (100, "p1", 0)
    assert await claim(store) == []
    monkeypatch.setattr(sync_sql, "advance", crash)
    with pytest.raises(RuntimeError, match="injected"):  # and for a source not seen before: nothing at all
        await store.enqueue(P, "w2", [Listed("a", 1)], "backfill", checkpoint=1)
    monkeypatch.undo()
    assert await state(store, P, "w2") is None


async def test_claims_lease_jobs_count_attempts_and_expired_leases_come_back(store: Store) -> None:
    await store.enqueue(P, W, [Listed(x, None) for x in "abc"], "backfill")
    at = later()
    first = await claim(store, owner="a", limit=2, at=at)
    assert [(j.external_id, j.attempts, j.owner, j.lease_until) for j in first] == [
        ("a", 1, "a", at + MINUTE),
        ("b", 1, "a", at + MINUTE),
    ]
    second = await claim(store, owner="b", at=at)
    assert [j.external_id for j in second] == ["c"]
    assert await claim(store, owner="b", at=at + MINUTE) == []  # leases run until then
    source = await state(store)
    assert (source.pending, source.running) == (0, 3)
    again = await claim(store, owner="b", at=at + MINUTE + 1)
    assert [(j.external_id, j.attempts, j.owner) for j in again] == [("a", 2, "b"), ("b", 2, "b"), ("c", 2, "b")]
    assert not await store.finish(first[0])  # a lost claim removes nothing
    assert not await store.retry_later(first[1], "late", next_attempt_at=at)
    assert not await store.bury(second[0], "late")
    assert all([await store.finish(job) for job in again])
    source = await state(store)
    assert (source.pending, source.running, source.dead_letters) == (0, 0, 0)


async def test_a_renewed_claim_holds_past_its_first_lease_and_a_lost_one_is_not_renewed(store: Store) -> None:
    await store.enqueue(P, W, [Listed(x, None) for x in "ab"], "backfill")
    at = later()
    mine = await claim(store, owner="a", limit=1, at=at)
    assert await store.renew(mine, until=at + 3 * MINUTE) == 1
    other = await claim(store, owner="b", at=at + 2 * MINUTE)
    assert [j.external_id for j in other] == ["b"]  # not "a"
    assert await store.finish(other[0])
    theirs = await claim(store, owner="b", at=at + 3 * MINUTE + 1)  # the renewed lease ran out: taken over
    assert [(j.external_id, j.attempts) for j in theirs] == [("a", 2)]
    assert await store.renew(mine, until=at + 9 * MINUTE) == 0  # a lost claim stays lost
    assert await store.finish(theirs[0])


async def test_claims_are_per_source(store: Store) -> None:
    await store.enqueue(P, W, [Listed("a", None)], "sweep")
    await store.enqueue("zendesk", W, [Listed("a", None)], "sweep")
    assert await store.claim(P, "other", owner="a", limit=10, now=later(), lease=MINUTE) == []
    assert [j.provider for j in await claim(store)] == [P]


async def test_finishing_keeps_a_job_queued_during_the_fetch(store: Store) -> None:
    await store.enqueue(P, W, [Listed("a", 10)], "sweep")
    (running,) = await claim(store)
    await store.enqueue(P, W, [Listed("a", None)], "webhook")  # a webhook arrives during the fetch
    assert await claim(store) == []  # not while the conversation's fetch runs: one claimer at a time
    source = await state(store)
    assert (source.pending, source.running) == (1, 1)
    assert await store.finish(running)
    (queued,) = await claim(store)
    assert (queued.external_id, queued.reason, queued.attempts, queued.listed_updated_at) == ("a", "webhook", 1, None)


async def test_a_failed_job_is_retried_later_and_joins_a_job_queued_meanwhile(store: Store) -> None:
    await store.enqueue(P, W, [Listed("a", 10, b"t")], "backfill")
    (job,) = await claim(store)
    retry_at = later() + MINUTE
    assert await store.retry_later(job, "503 from the provider", next_attempt_at=retry_at)
    assert await claim(store) == []
    (job,) = await claim(store, at=retry_at)
    assert (job.attempts, job.last_error, job.listed_updated_at, job.prefetched) == (
        2,
        "503 from the provider",
        10,
        b"t",
    )
    await store.enqueue(P, W, [Listed("a", None)], "webhook")
    assert await store.retry_later(job, "timeout", next_attempt_at=retry_at + MINUTE)
    source = await state(store)
    assert (source.pending, source.running) == (1, 0)
    (joined,) = await claim(store)  # the webhook's due time, the failures' count and error
    assert (joined.reason, joined.attempts, joined.last_error, joined.listed_updated_at) == (
        "webhook",
        3,
        "timeout",
        None,
    )


async def test_dead_letters_are_kept_apart_and_can_be_retried(store: Store) -> None:
    await store.enqueue(P, W, [Listed(x, 10) for x in ("a", "b", "c")], "backfill")
    jobs = await claim(store)
    assert await store.retry_later(jobs[0], "first", next_attempt_at=0)
    (a,) = [job for job in await claim(store) if job.external_id == "a"]
    before = now()
    for job in (a, jobs[1], jobs[2]):
        assert await store.bury(job, f"gone {job.external_id}")
    dead = await store.dead_letters(P, W)
    assert [(d.external_id, d.reason, d.attempts, d.last_error) for d in dead] == [
        ("a", "backfill", 2, "gone a"),
        ("b", "backfill", 1, "gone b"),
        ("c", "backfill", 1, "gone c"),
    ]
    assert dead[0].first_failed_at <= before <= dead[0].dead_at  # failed first when retried, dead since
    assert dead[1].first_failed_at == dead[1].dead_at
    assert [d.external_id for d in await store.dead_letters(P, W, limit=1, after="a")] == ["b"]
    assert await store.dead_letters(P, "other") == []
    source = await state(store)
    assert (source.pending, source.running, source.dead_letters) == (0, 0, 3)

    assert await store.retry_dead_letters(P, W, ["b", "nope"]) == 1
    (b,) = await claim(store)
    assert (b.external_id, b.attempts, b.last_error, b.reason) == ("b", 1, "gone b", "backfill")
    assert await store.retry_dead_letters(P, W) == 2
    assert [d.external_id for d in await store.dead_letters(P, W)] == []
    assert sorted(j.external_id for j in await claim(store)) == ["a", "c"]
    assert await store.retry_dead_letters(P, W) == 0


async def test_one_lister_per_source(store: Store) -> None:
    at = now()
    assert await store.lease_source(P, W, owner="a", now=at, until=at + MINUTE)
    assert not await store.lease_source(P, W, owner="b", now=at + 1, until=at + MINUTE)
    assert await store.lease_source(P, W, owner="a", now=at + 2, until=at + 2 * MINUTE)  # extended
    assert not await store.lease_source(P, W, owner="b", now=at + MINUTE + 1, until=at + 3 * MINUTE)
    assert await store.lease_source(P, "w2", owner="b", now=at, until=at + MINUTE)  # another source
    assert await store.lease_source(P, W, owner="b", now=at + 2 * MINUTE, until=at + 3 * MINUTE)  # expired
    source = await state(store)
    assert (source.lease_owner, source.lease_until) == ("b", at + 3 * MINUTE)
    await store.release_source(P, W, owner="a")  # not a's any more: nothing happens
    assert not await store.lease_source(P, W, owner="a", now=at + 2 * MINUTE, until=at + 3 * MINUTE)
    await store.release_source(P, W, owner="b")
    assert await store.lease_source(P, W, owner="a", now=at + 2 * MINUTE, until=at + 3 * MINUTE)


async def test_passes_and_totals_are_recorded(store: Store) -> None:
    assert await store.sync_states() == []
    await store.record_pass(P, W, started_at=100, outcome="running")
    await store.add_counts(P, W, SyncCounts(fetched=2, stored=2, requests=3))
    counts = SyncCounts(listed=5, fetched=3, stored=3, requests=9, rate_limit_waits=1)
    await store.record_pass(
        P, W, started_at=100, finished_at=200, outcome="failed", error="timeout", counts=counts, position="c1"
    )
    source = await state(store)
    assert (source.pass_started_at, source.pass_finished_at, source.pass_outcome, source.last_error) == (
        100,
        200,
        "failed",
        "timeout",
    )
    assert source.totals == SyncCounts(listed=5, fetched=5, stored=5, requests=12, rate_limit_waits=1)
    assert source.cursor == "c1"
    await store.record_pass(P, W, started_at=300, finished_at=400, outcome="ok", position=KEEP)
    source = await state(store)
    assert (source.pass_outcome, source.last_error, source.cursor, source.totals.requests) == ("ok", None, "c1", 12)
    await store.record_pass("zendesk", "acme", started_at=1, outcome="running")
    assert [(s.provider, s.workspace) for s in await store.sync_states()] == [(P, W), ("zendesk", "acme")]


async def test_stored_versions_name_live_conversations(store: Store) -> None:
    intercom = get_provider(P)
    for external_id, updated_at in (("a", 1_700_000_100), ("b", 1_700_000_200), ("gone", 1_700_000_300)):
        body = dumps(intercom_payload(external_id, updated_at=updated_at))
        await store.ingest(delivery(body), intercom.parse_push(body, workspace=W, default_workspace="d"))
    deletion = ConversationDeletion(provider=P, workspace=W, external_id="gone")
    await store.ingest(delivery(b'{"deleted": "gone"}'), deletion)
    versions = await store.stored_versions(P, W, ["a", "b", "gone", "unknown", "a"])
    assert versions == {"a": 1_700_000_100 * SECOND, "b": 1_700_000_200 * SECOND}
    assert await store.stored_versions(P, "w2", ["a"]) == {}
    assert await store.stored_versions(P, W, []) == {}
    many = [str(n) for n in range(2500)] + ["b"]  # more than one IN (...) list
    assert await store.stored_versions(P, W, many) == {"b": 1_700_000_200 * SECOND}


def delivery(body: bytes) -> Delivery:
    digest = hashlib.sha256(body).hexdigest()
    return Delivery(P, W, "pull", "pull.retrieve", f"pull:{W}:{digest}", digest, body, datetime.now(UTC), True, W)


@pytest.fixture
def postgres_url() -> Iterator[str]:
    with postgres_schema() as url:
        yield url


@pytest.fixture
async def two_stores(postgres_url: str) -> AsyncIterator[tuple[Store, Store]]:
    first, second = (open_store(Settings(database_url=postgres_url)) for _ in range(2))
    try:
        yield first, second
    finally:
        await first.close()
        await second.close()


@pytest.mark.postgres
async def test_concurrent_claims_on_postgresql_take_each_job_exactly_once(two_stores: tuple[Store, Store]) -> None:
    first, second = two_stores
    await first.enqueue(P, W, [Listed(f"c{n}", None) for n in range(300)], "backfill")
    claimed: list[tuple[str, int]] = []

    async def worker(store: Store, owner: str) -> None:
        while jobs := await store.claim(P, W, owner=owner, limit=7, now=later(), lease=MINUTE):
            claimed.extend((job.external_id, job.attempts) for job in jobs)
            await asyncio.gather(*(store.finish(job) for job in jobs))

    await asyncio.gather(*(worker(store, f"{n}") for n in range(3) for store in (first, second)))
    assert sorted(claimed) == sorted((f"c{n}", 1) for n in range(300))
    source = await state(first)
    assert (source.pending, source.running) == (0, 0)


@pytest.mark.postgres
async def test_a_claim_skips_rows_another_transaction_holds(two_stores: tuple[Store, Store], postgres_url: str) -> None:
    first, _second = two_stores
    await first.enqueue(P, W, [Listed(x, None) for x in "abc"], "backfill")
    engine = admin_engine(postgres_url)
    try:
        with engine.connect() as conn, conn.begin():
            conn.exec_driver_sql("SELECT pk FROM sync_jobs WHERE external_id = 'a' FOR UPDATE")
            jobs = await claim(first)  # neither waits for the lock nor takes the locked job
            assert [job.external_id for job in jobs] == ["b", "c"]
    finally:
        engine.dispose()
    assert [job.external_id for job in await claim(first)] == ["a"]


def test_the_truncated_filter_can_use_its_partial_index_on_sqlite(sqlite_url: str) -> None:
    c = conversations.c
    query = (
        select(c.id)
        .where(c.deleted_at.is_(None), c.truncated == true())
        .order_by(c.updated_at.desc(), c.id.desc())
        .limit(50)
    )
    engine = admin_engine(sqlite_url)
    try:
        with engine.connect() as conn:
            compiled = query.compile(conn, compile_kwargs={"literal_binds": True})
            plan = " ".join(str(row[-1]) for row in conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {compiled}"))
    finally:
        engine.dispose()
    assert "ix_conversations_live_truncated" in plan


def test_0003_upgrades_and_downgrades(empty_database_url: str) -> None:
    from alembic import command

    engine = admin_engine(empty_database_url)
    config = alembic_config()
    try:
        with engine.begin() as conn:
            config.attributes["connection"] = conn
            command.upgrade(config, "0002")
        with engine.begin() as conn:
            conn.exec_driver_sql(
                "INSERT INTO conversations (id, provider, workspace, external_id, created_at, updated_at, revision,"
                " header, participant_count, message_count, detail, changed_at)"
                " VALUES ('id-1', 'intercom', 'w', 'c1', 1, 2, 1, '{}', 0, 0, '{}', 3)"
            )
        upgrade(engine)
        with engine.connect() as conn:
            tables = set(inspect(conn).get_table_names())
            assert {"sync_sources", "sync_jobs", "sync_dead_letters"} <= tables
            row = conn.exec_driver_sql("SELECT provider_count, truncated FROM conversations").one()
            assert (row[0], bool(row[1])) == (None, False)
        with engine.begin() as conn:
            config.attributes["connection"] = conn
            command.downgrade(config, "0002")
        with engine.connect() as conn:
            assert not {"sync_sources", "sync_jobs", "sync_dead_letters"} & set(inspect(conn).get_table_names())
            columns = {column["name"] for column in inspect(conn).get_columns("conversations")}
            assert not {"provider_count", "truncated"} & columns
            assert conn.exec_driver_sql("SELECT external_id FROM conversations").scalar_one() == "c1"
        upgrade(engine)
    finally:
        engine.dispose()

"""A 2xx means committed, whatever kills the server.

Twenty times per engine: start ``kbms serve``, send deliveries from 16 concurrent clients (new webhooks, webhooks
sent again, the same one twice at once, NDJSON batches, batches sent again), and SIGKILL the server at a random
moment. After each kill, on the database the server left: every acknowledged delivery is there, nothing is
there twice, and the database is intact (SQLite: ``integrity_check``, ``foreign_key_check``; both engines:
unique keys, no orphan rows, counts that agree with the rows, the read model with its tables). Finally one more
server receives every delivery again, and the database holds exactly what was sent.

The randomness (the deliveries of each run and the moment of each kill) comes from one seed, printed with the
figures and taken from ``KBMS_CRASH_SEED`` to replay a failure; thread timing still varies between replays.
Servers are forked from a fork server (tests/support/forkserver.py): 40 ``python -m kbms serve`` would take minutes.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx2
import pytest
from sqlalchemy import Connection, text

from kbms.providers.intercom.signature import sign
from kbms.storage import admin_engine
from tests.support import canary
from tests.support.forkserver import ForkedServer, ForkServer
from tests.support.helpers import intercom_payload, part

pytestmark = [pytest.mark.anyio, pytest.mark.slow]
SECRET = canary.secret("crash")  # never to be logged (tests/support/canary.py)
RUNS = 20
CLIENTS = 16
CONVERSATIONS, PARTS = 60, 10  # webhook deliveries: one part each
BATCH_LINES = 5
KILL_WITHIN = (0.0, 0.8)  # seconds after the run's first acknowledgement


def webhook(conversation: int, index: int) -> dict[str, Any]:
    item = intercom_payload(
        f"hook-{conversation}",
        updated_at=1_700_000_000 + index,
        parts=[part(f"h{conversation}-p{index}", f"<p>part {index}</p>", at=1_700_000_000 + index)],
    )
    return {
        "type": "notification_event",
        "app_id": "crashapp",
        "id": f"notif-{conversation}-{index}",
        "topic": "conversation.user.replied",
        "data": {"type": "notification_event_data", "item": item},
    }


def batch(number: int) -> list[dict[str, Any]]:
    """Lines of new conversations, each with its own part (a batch is one transaction: all or nothing)."""
    return [
        intercom_payload(f"batch-{number}-{line}", parts=[part(f"b{number}-{line}-p", "<p>batched</p>")])
        for line in range(BATCH_LINES)
    ]


@dataclass(frozen=True)
class Request:
    kind: str  # "webhook" | "batch"
    key: str  # the webhook's notification id, or "batch-<n>"
    body: bytes
    conversations: dict[str, set[str]]  # external id -> the message ids this request brings


def webhook_request(conversation: int, index: int) -> Request:
    document = webhook(conversation, index)
    messages = {f"h{conversation}-p{index}", f"hook-{conversation}-m0"}
    return Request("webhook", document["id"], json.dumps(document).encode(), {f"hook-{conversation}": messages})


def batch_request(number: int) -> Request:
    lines = batch(number)
    body = b"".join(json.dumps(line).encode() + b"\n" for line in lines)
    conversations = {
        line["id"]: {line["source"]["id"], *(p["id"] for p in line["conversation_parts"]["conversation_parts"])}
        for line in lines
    }
    return Request("batch", f"batch-{number}", body, conversations)


class Universe:
    """What the clients send, one request after another in an order drawn from the seed: mostly new webhooks, a
    third sent again (from earlier runs or this one), some twice in a row (two clients race with it), and a batch
    now and then. Only what was taken counts as sent."""

    def __init__(self, rng: random.Random) -> None:
        self._rng = rng
        self._fresh = [webhook_request(c, i) for c in range(CONVERSATIONS) for i in range(PARTS)]
        rng.shuffle(self._fresh)
        self._batches = 0
        self._again: list[Request] = []
        self.sent: dict[str, Request] = {}

    def take(self) -> Request:
        if self._again:
            return self._again.pop()
        roll = self._rng.random()
        if roll < 0.05:
            self._batches += 1
            request = batch_request(self._batches)
        elif (roll < 0.35 or not self._fresh) and self.sent:
            request = self._rng.choice(list(self.sent.values()))
        else:
            request = self._fresh.pop()
        self.sent[request.key] = request
        if self._rng.random() < 0.05:
            self._again.append(request)
        return request


@dataclass
class Figures:
    engine: str
    seed: int
    runs: int = 0
    acknowledged: int = 0  # 2xx answers, over all runs
    in_flight_at_kill: int = 0  # requests sent but not answered when the server died, over all runs
    lost: int = 0
    duplicates: int = 0
    integrity: str = "not checked"
    distinct: int = 0  # distinct requests acknowledged
    seconds: float = 0.0

    def line(self) -> str:
        return (
            f"crash test [{self.engine}] seed={self.seed} runs={self.runs} acknowledged={self.acknowledged} "
            f"(distinct {self.distinct}) "
            f"in-flight-at-kill={self.in_flight_at_kill} lost={self.lost} duplicates={self.duplicates} "
            f"integrity={self.integrity} ({self.seconds:.1f} s)"
        )


async def send(
    server: ForkedServer, take: Callable[[], Request | None], *, kill_after: float | None
) -> tuple[set[str], int]:
    """Send what ``take`` gives (until None) from concurrent clients; SIGKILL the server ``kill_after`` seconds
    after the first acknowledgement. Returns the keys acknowledged, and how many requests were in flight at the
    kill."""
    acknowledged: set[str] = set()
    in_flight = 0
    first_ack = asyncio.Event()
    dead = asyncio.Event()

    async def client(http: httpx2.AsyncClient) -> None:
        nonlocal in_flight
        while not dead.is_set() and (request := take()) is not None:
            if request.kind == "webhook":
                path = "/webhooks/intercom"
                headers = {"content-type": "application/json", "x-hub-signature": sign(request.body, SECRET)}
            else:
                path = "/integrations/intercom/conversations/batch"
                headers = {"content-type": "application/x-ndjson"}
            in_flight += 1
            try:
                response = await http.post(path, content=request.body, headers=headers)
            except httpx2.TransportError:
                return  # the server died under this request: not acknowledged
            finally:
                in_flight -= 1
            assert response.status_code == 200, response.text
            if request.kind == "batch":
                assert {r["status"] for r in response.json()["results"]} <= {200, 201}, response.text
            acknowledged.add(request.key)
            first_ack.set()

    async def killer(after: float) -> int:
        await first_ack.wait()
        await asyncio.sleep(after)
        count = in_flight
        server.kill()
        dead.set()
        return count

    limits = httpx2.Limits(max_connections=CLIENTS)
    async with httpx2.AsyncClient(base_url=server.url, timeout=30, limits=limits) as http:
        killing = None if kill_after is None else asyncio.create_task(killer(kill_after))
        try:
            await asyncio.gather(*(client(http) for _ in range(CLIENTS)))
            return acknowledged, 0 if killing is None else await killing
        finally:
            if killing is not None:
                killing.cancel()


QUERIES = {
    # Unique keys hold (the constraints say so; this checks what is actually stored).
    "duplicate deliveries": "SELECT count(*) FROM (SELECT 1 FROM ledger GROUP BY provider, delivery_key "
    "HAVING count(*) > 1) d",
    "duplicate conversations": "SELECT count(*) FROM (SELECT 1 FROM conversations "
    "GROUP BY provider, workspace, external_id HAVING count(*) > 1) d",
    "duplicate messages": "SELECT count(*) FROM (SELECT 1 FROM messages GROUP BY conversation_pk, message_id "
    "HAVING count(*) > 1) d",
    # No orphans.
    "orphan messages": "SELECT count(*) FROM messages WHERE conversation_pk NOT IN (SELECT pk FROM conversations)",
    "orphan participants": "SELECT count(*) FROM participants "
    "WHERE conversation_pk NOT IN (SELECT pk FROM conversations)",
    "orphan events": "SELECT count(*) FROM events WHERE conversation_pk NOT IN (SELECT pk FROM conversations)",
    "orphan ledger links": "SELECT count(*) FROM ledger WHERE conversation_pk IS NOT NULL "
    "AND conversation_pk NOT IN (SELECT pk FROM conversations)",
    "orphan changes": "SELECT count(*) FROM changes WHERE conversation_id NOT IN (SELECT id FROM conversations)",
    # Counts agree with the rows.
    "message counts off": "SELECT count(*) FROM conversations c WHERE c.message_count <> "
    "(SELECT count(*) FROM messages m WHERE m.conversation_pk = c.pk)",
    "participant counts off": "SELECT count(*) FROM conversations c WHERE c.participant_count <> "
    "(SELECT count(*) FROM participants p WHERE p.conversation_pk = c.pk)",
    "revisions without their changes": "SELECT count(*) FROM conversations c WHERE c.revision <> "
    "(SELECT count(*) FROM changes ch WHERE ch.conversation_id = c.id)",
    "deliveries without an outcome": "SELECT count(*) FROM ledger WHERE outcome NOT IN "
    "('created', 'updated', 'unchanged', 'ignored', 'rejected')",
    "applied deliveries without a conversation": "SELECT count(*) FROM ledger "
    "WHERE outcome IN ('created', 'updated', 'unchanged') AND conversation_pk IS NULL",
}
SEARCH_ROWS = {"sqlite": "SELECT count(*) FROM search_index", "postgresql": "SELECT count(*) FROM search_documents"}


@dataclass
class State:
    """What a database holds after a run: problems found (each a count, 0 when sound), the webhook delivery keys
    in the ledger, and each conversation's message ids."""

    problems: dict[str, int]
    keys: set[str]
    rows: dict[str, set[str]]

    @property
    def duplicates(self) -> int:
        return sum(count for name, count in self.problems.items() if name.startswith("duplicate"))


def examine(conn: Connection) -> State:
    dialect = conn.dialect.name
    problems = {name: int(conn.execute(text(sql)).scalar_one()) for name, sql in QUERIES.items()}
    if dialect == "sqlite":
        problems["integrity_check"] = int(conn.exec_driver_sql("PRAGMA integrity_check").scalars().all() != ["ok"])
        problems["foreign_key_check"] = len(conn.exec_driver_sql("PRAGMA foreign_key_check").all())
    live = conn.execute(text("SELECT count(*) FROM conversations WHERE deleted_at IS NULL")).scalar_one()
    problems["search documents off"] = abs(conn.execute(text(SEARCH_ROWS[dialect])).scalar_one() - live)
    keys = set(conn.execute(text("SELECT delivery_key FROM ledger WHERE kind = 'webhook'")).scalars())
    rows: dict[str, set[str]] = {}
    for external_id, message_id in conn.execute(
        text("SELECT c.external_id, m.message_id FROM conversations c JOIN messages m ON m.conversation_pk = c.pk")
    ):
        rows.setdefault(external_id, set()).add(message_id)
    # The read model (the detail JSON the API serves) lists the same messages as the rows.
    problems["details off"] = sum(
        {m["id"] for m in json.loads(detail)["messages"]} != rows.get(external_id, set())
        for external_id, detail in conn.execute(text("SELECT external_id, detail FROM conversations"))
    )
    return State(problems, keys, rows)


def lost(requests: dict[str, Request], acknowledged: set[str], state: State) -> int:
    """Acknowledged requests whose delivery or messages are not in the database."""
    missing = 0
    for key in acknowledged:
        request = requests[key]
        in_ledger = request.kind != "webhook" or key in state.keys
        stored = all(ids <= state.rows.get(c, set()) for c, ids in request.conversations.items())
        missing += not (in_ledger and stored)
    return missing


def inspect(database_url: str, figures: Figures) -> State:
    """The database's state, checked: the figures are updated, and any problem fails the test."""
    engine = admin_engine(database_url)
    try:
        with engine.connect() as conn:
            state = examine(conn)
    finally:
        engine.dispose()
    figures.duplicates = state.duplicates
    figures.integrity = "ok" if not any(state.problems.values()) else "FAILED"
    assert not any(state.problems.values()), {name: n for name, n in state.problems.items() if n}
    return state


async def test_sigkill_at_random_moments_loses_no_acknowledged_delivery_and_stores_none_twice(
    database_url: str, fork_server: ForkServer, tmp_path: Path
) -> None:
    seed = int(os.environ.get("KBMS_CRASH_SEED") or random.SystemRandom().randrange(2**32))
    # Two generators: the kill moments replay exactly, whatever number of requests each run got through.
    universe, kills = Universe(random.Random(seed)), random.Random(seed + 1)
    figures = Figures("postgres" if database_url.startswith("postgresql") else "sqlite", seed)
    env = {"KBMS_INTERCOM_CLIENT_SECRET": SECRET}
    started = time.monotonic()
    acknowledged: set[str] = set()
    try:
        for run in range(RUNS):
            server = fork_server.spawn(database_url, tmp_path / f"run-{run}.log", env=env)
            try:
                acked, in_flight = await send(server, universe.take, kill_after=kills.uniform(*KILL_WITHIN))
            finally:
                server.kill()
            figures.runs += 1
            figures.acknowledged += len(acked)
            figures.in_flight_at_kill += in_flight
            acknowledged |= acked
            figures.distinct = len(acknowledged)
            state = inspect(database_url, figures)  # fails on a damaged database or anything stored twice
            figures.lost = lost(universe.sent, acknowledged, state)
            assert figures.lost == 0, f"run {run}: {figures.line()}"

        # Everything again, to a server left running: the database then holds exactly what was sent.
        everything = list(universe.sent.values())
        queue = list(everything)
        server = fork_server.spawn(database_url, tmp_path / "final.log", env=env)
        try:
            acked, _ = await send(server, lambda: queue.pop() if queue else None, kill_after=None)
        finally:
            server.kill()
        assert acked == set(universe.sent)
        state = inspect(database_url, figures)
        expected: dict[str, set[str]] = {}
        for request in everything:
            for external_id, ids in request.conversations.items():
                expected.setdefault(external_id, set()).update(ids)
        assert state.keys == {request.key for request in everything if request.kind == "webhook"}
        assert state.rows == expected
    finally:
        figures.seconds = time.monotonic() - started
        print(f"\n{figures.line()}")
    assert figures.in_flight_at_kill > 0  # the kills did land under load

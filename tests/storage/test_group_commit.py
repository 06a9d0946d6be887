"""SQLite's group commit: a batch's writes run without savepoints (they made SQLite copy every page a write changed
to its statement journal), so a write that fails makes the batch start again, each write in a savepoint of its own,
and fails alone."""

from __future__ import annotations

import asyncio
import json
from hashlib import sha256
from pathlib import Path
from typing import Any

import pytest

from kbms.ingest import IngestOutcome, ingest_push, push_delivery_key
from kbms.providers import get_provider
from kbms.settings import Settings
from kbms.storage import open_store, writes
from tests.conftest import migrated_sqlite_url
from tests.support.helpers import intercom_payload

pytestmark = pytest.mark.anyio


async def test_a_write_that_fails_in_a_group_commit_fails_alone_and_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    original = writes.apply_delivery
    calls: list[str] = []

    def failing_after_writing(statements: Any, conn: Any, delivery: Any, *args: Any, **kwargs: Any) -> Any:
        applied = original(statements, conn, delivery, *args, **kwargs)  # its ledger row and conversation, written
        calls.append(str(applied.external_id))
        if applied.external_id == "bad":
            raise RuntimeError("a bug in a write")
        return applied

    monkeypatch.setattr(writes, "apply_delivery", failing_after_writing)
    store = open_store(Settings(database_url=migrated_sqlite_url(tmp_path)))
    provider = get_provider("intercom")
    try:
        bodies = [json.dumps(intercom_payload(name)).encode() for name in ("a", "bad", "c", "d")]
        # Pushed together: one group commit holds them all (the first waits for the lock in a thread meanwhile).
        outcomes = await asyncio.gather(
            *(ingest_push(store, provider, body, workspace=None) for body in bodies), return_exceptions=True
        )
        kinds = [type(o).__name__ for o in outcomes]
        assert kinds == ["IngestOutcome", "RuntimeError", "IngestOutcome", "IngestOutcome"]
        assert all(o.result == "created" for o in outcomes if isinstance(o, IngestOutcome))
        # Run twice: once all together (until "bad" failed), then again, each alone.
        assert calls.count("bad") == 2
        assert calls.count("a") == 2
        page = await store.list_conversations(limit=10, cursor=None)
        assert sorted(item.external_id for item in page.items) == ["a", "c", "d"]
        # Nothing of the failed write is kept, its ledger row included: sent again, it is new.
        assert await store.find_delivery("intercom", _key(bodies[1])) is None
    finally:
        await store.close()


def _key(body: bytes) -> str:
    return push_delivery_key(None, sha256(body).hexdigest())

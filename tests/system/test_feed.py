"""The change feed under concurrent writers: a tailing reader sees every committed change once, in order.

On PostgreSQL, sequence numbers are drawn in one order and committed in another; a reader that followed ``seq``
naively would pass numbers whose transactions commit later, and never see them. Three server processes write
here while a reader tails the feed as fast as it can; at the end, what it read must be exactly the table.
"""

from __future__ import annotations

import threading
from pathlib import Path

import httpx2
import pytest
from sqlalchemy import select

from kbms.storage import admin_engine
from kbms.storage.schema import changes
from tests.conftest import start_server
from tests.support.helpers import intercom_payload, part

WRITERS = 8
WRITES_PER_WRITER = 40


@pytest.mark.slow
def test_a_tailing_reader_misses_nothing_and_repeats_nothing(database_url: str, tmp_path: Path) -> None:
    a = start_server(database_url, tmp_path / "a.log", args=("--workers", "2"))
    b = start_server(database_url, tmp_path / "b.log")
    done = threading.Event()
    read: list[int] = []
    errors: list[BaseException] = []

    def write(writer: int) -> None:
        try:
            with httpx2.Client(base_url=(a.url, b.url)[writer % 2], timeout=30) as client:
                for i in range(WRITES_PER_WRITER):
                    # New conversations and updates of shared ones: creators and mergers race.
                    shared = f"shared{i % 5}"
                    mine = intercom_payload(f"w{writer}-{i}")
                    update = intercom_payload(
                        shared, updated_at=1_700_000_000 + writer * 1000 + i, parts=[part(f"p{writer}-{i}")]
                    )
                    for payload in (mine, update):
                        response = client.post("/integrations/intercom/conversations", json=payload)
                        assert response.status_code in (200, 201), response.text
        except BaseException as exc:
            errors.append(exc)

    def tail() -> None:
        cursor = None
        try:
            with httpx2.Client(base_url=b.url, timeout=30) as client:
                while True:
                    finished = done.is_set()  # read before the request: one more full pass after the writers
                    params = {"limit": 13, **({"cursor": cursor} if cursor else {})}
                    page = client.get("/internal/changes", params=params).json()
                    read.extend(item["seq"] for item in page["items"])
                    cursor = page["next_cursor"]
                    if finished and not page["items"]:
                        return
        except BaseException as exc:
            errors.append(exc)

    reader = threading.Thread(target=tail)
    writers = [threading.Thread(target=write, args=(n,)) for n in range(WRITERS)]
    try:
        reader.start()
        for thread in writers:
            thread.start()
        for thread in writers:
            thread.join()
        done.set()
        reader.join()
        assert not errors, errors
    finally:
        done.set()
        a.stop()
        b.stop()

    engine = admin_engine(database_url)
    try:
        with engine.connect() as conn:
            committed = [seq for (seq,) in conn.execute(select(changes.c.seq).order_by(changes.c.seq))]
    finally:
        engine.dispose()
    assert len(committed) >= WRITERS * WRITES_PER_WRITER + 5  # every new conversation, and the shared ones
    assert read == committed  # nothing skipped, nothing repeated, in commit order

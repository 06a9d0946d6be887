"""SQLite when the database cannot be written: a full disk, files the kernel refuses to write, the write lock held
by another process, the file replaced or removed underneath. Every answer is a 2xx or a 503 with ``Retry-After``
(never a 500, never a hang: the HTTP client's timeout is the bound), nothing acknowledged is lost, and writes
succeed again, without a restart, once the fault is gone.

The faults are real (see tests/support/faults.py): the kernel or SQLite refuses, no store method is replaced.
"""

from __future__ import annotations

import asyncio
import json
import resource
import shutil
import sqlite3
from contextlib import closing
from pathlib import Path
from typing import Any

import httpx2
import pytest
from fastapi.testclient import TestClient

from kbms.api import create_app
from kbms.settings import Settings
from kbms.storage import failure_reason, is_unavailable
from tests.conftest import migrate
from tests.support.faults import (
    HOLD_FLOCK,
    HOLD_SQLITE_WRITE_LOCK,
    fill,
    held_by_another_process,
    small_filesystem,
    unwritable,
)
from tests.support.forkserver import ForkServer
from tests.support.helpers import intercom_payload, part

INGEST = "/integrations/intercom/conversations"
NDJSON = {"content-type": "application/x-ndjson"}


def conversation(name: str, *, text_bytes: int = 200) -> dict[str, Any]:
    return intercom_payload(name, parts=[part(f"{name}-p1", "<p>" + "x" * text_bytes + "</p>")])


class Ledger:
    """What the client was told: the conversations acknowledged (2xx), and how many 503s it got."""

    def __init__(self) -> None:
        self.acknowledged: set[str] = set()
        self.unavailable = 0

    def post(self, client: TestClient, name: str, *, text_bytes: int = 200) -> int:
        response = client.post(INGEST, json=conversation(name, text_bytes=text_bytes))
        return self.record(name, response)

    def record(self, name: str, response: httpx2.Response) -> int:
        assert response.status_code in (200, 201, 503), response.text
        if response.status_code == 503:
            assert response.headers["retry-after"] == "1"
            assert response.json()["error_code"] == "unavailable"
            self.unavailable += 1
        else:
            self.acknowledged.add(name)
        return response.status_code


def copy(database: Path, to: Path) -> None:
    """A consistent copy, by SQLite's backup API; both connections closed after (an open one would keep the
    database's WAL alive: see the replacement test)."""
    with closing(sqlite3.connect(database)) as source, closing(sqlite3.connect(to)) as target:
        source.backup(target)


def stored(database: Path) -> set[str]:
    """The conversations in the file at ``database`` (a fresh connection), after checking the file's integrity."""
    with closing(sqlite3.connect(database)) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        assert conn.execute("PRAGMA foreign_key_check").fetchall() == []
        return {row[0] for row in conn.execute("SELECT external_id FROM conversations")}


@pytest.fixture
def database(tmp_path: Path) -> Path:
    path = tmp_path / "db" / "kbms.db"
    path.parent.mkdir()
    migrate(f"sqlite:///{path}")
    return path


def app_on(database: Path) -> TestClient:
    return TestClient(create_app(Settings(database_url=f"sqlite:///{database}")))


@pytest.mark.parametrize("what", ["file", "file and directory"])
def test_a_database_not_writable_at_start_is_503_and_writes_resume_without_a_restart(database: Path, what: str) -> None:
    ledger = Ledger()
    with app_on(database) as client:  # the lock file and the schema exist; the WAL is gone at close
        assert ledger.post(client, "before") == 201
    paths = (database, database.parent) if what == "file and directory" else (database,)
    with app_on(database) as client:
        with unwritable(*paths):
            assert ledger.post(client, "refused") == 503
            assert ledger.post(client, "refused again") == 503
            assert client.get("/internal/conversations").status_code in (200, 503)
        assert ledger.post(client, "after") == 201  # the same process: its connection was opened read-only
        assert client.get("/ready").status_code == 200
    assert ledger.acknowledged == {"before", "after"} == stored(database)


def test_a_wal_that_cannot_be_written_is_503_until_it_can(database: Path) -> None:
    ledger = Ledger()
    with app_on(database) as client:
        assert ledger.post(client, "before") == 201
        with unwritable(database.with_name("kbms.db-wal"), open_files_too=True):
            assert ledger.post(client, "refused") == 503
            assert client.get("/internal/conversations").status_code == 200  # reads go on
        assert ledger.post(client, "after") == 201
    assert ledger.acknowledged == {"before", "after"} == stored(database)


def test_a_full_disk_is_503_and_writes_resume_once_space_is_freed(tmp_path: Path) -> None:
    ledger = Ledger()
    with small_filesystem(tmp_path / "small", size_kib=2048) as directory:
        database = directory / "kbms.db"
        migrate(f"sqlite:///{database}")
        with app_on(database) as client:
            assert ledger.post(client, "before") == 201
            filler = fill(directory)
            # Each write needs new space sooner or later (the WAL reuses what it has first).
            for i in range(200):
                if ledger.post(client, f"full-{i}", text_bytes=20_000) == 503:
                    break
            assert ledger.unavailable == 1
            assert ledger.post(client, "still full", text_bytes=20_000) == 503
            lines = [json.dumps(conversation(f"batched-{i}", text_bytes=20_000)) for i in range(3)]
            batch = client.post(f"{INGEST}/batch", content="\n".join(lines), headers=NDJSON)
            assert ledger.record("a batch", batch) == 503  # one transaction: none of its lines is kept
            assert client.get("/internal/conversations").status_code == 200
            filler.unlink()
            assert ledger.post(client, "after", text_bytes=20_000) == 201
            assert client.get("/ready").status_code == 200
        assert {"before", "after"} <= ledger.acknowledged == stored(database)


@pytest.mark.slow
@pytest.mark.anyio
async def test_writes_the_kernel_refuses_are_503_in_a_real_server(
    database: Path, fork_server: ForkServer, tmp_path: Path
) -> None:
    """Any user can do this one: RLIMIT_FSIZE set on the server process makes the kernel refuse its writes
    (EFBIG; Python ignores SIGXFSZ), and raising it again is the disk coming back."""
    ledger = Ledger()
    server = fork_server.spawn(f"sqlite:///{database}", tmp_path / "server.log")
    try:
        async with httpx2.AsyncClient(base_url=server.url, timeout=10) as http:

            async def post(name: str) -> int:
                return ledger.record(name, await http.post(INGEST, json=conversation(name, text_bytes=5000)))

            assert await post("before") == 201
            soft, hard = resource.prlimit(server.pid, resource.RLIMIT_FSIZE)
            resource.prlimit(server.pid, resource.RLIMIT_FSIZE, (0, hard))
            try:
                statuses = await asyncio.gather(*(post(f"refused-{i}") for i in range(8)))
                assert statuses == [503] * 8
            finally:
                resource.prlimit(server.pid, resource.RLIMIT_FSIZE, (soft, hard))
            assert await post("after") == 201
            assert (await http.get("/ready")).status_code == 200
    finally:
        server.kill()
    assert ledger.acknowledged == {"before", "after"} == stored(database)


@pytest.mark.timeout(60)  # a hang fails the test
@pytest.mark.parametrize(
    ("program", "locked"),
    [
        pytest.param(HOLD_SQLITE_WRITE_LOCK, "kbms.db", id="sqlite-write-transaction"),
        pytest.param(HOLD_FLOCK, "kbms.db.writer-lock", id="kbms-writer-lock-of-a-stopped-process"),
    ],
)
def test_a_write_lock_held_by_another_process_is_503_not_a_hang(database: Path, program: str, locked: str) -> None:
    ledger = Ledger()
    # The default wait is 5 s; half a second keeps the test short, on the same code path.
    with TestClient(create_app(Settings(database_url=f"sqlite:///{database}", db_timeout=0.5))) as client:
        assert ledger.post(client, "before") == 201
        with held_by_another_process(program, database.with_name(locked)):
            assert ledger.post(client, "locked out") == 503
            assert client.get("/internal/conversations").status_code == 200  # WAL readers do not wait
        assert ledger.post(client, "after") == 201
    assert ledger.acknowledged == {"before", "after"} == stored(database)


def test_a_write_that_meets_a_replaced_database_file_is_503_and_later_ones_go_to_the_new_file(
    database: Path, tmp_path: Path
) -> None:
    """A write acknowledged into the open, replaced file would be lost at its next checkpoint.

    Replacing a database file that a process has open is unsafe in itself (https://sqlite.org/howtocorrupt.html,
    2.4: the WAL next to it still belongs to the old file, and SQLite applies it to the new one); an online restore
    goes through SQLite (``sqlite3 kbms.db ".restore backup.db"``). What kbms promises: no acknowledgement for a
    write into the replaced file, and later writes go to the file at the path.
    """
    ledger = Ledger()
    backup = tmp_path / "backup.db"
    with app_on(database) as client:
        assert ledger.post(client, "kept") == 201
        copy(database, backup)
        assert ledger.post(client, "only in the old file") == 201
        backup.replace(database)
        assert ledger.post(client, "meets the swap") == 503
        assert ledger.post(client, "after the swap") == 201
        assert client.get("/ready").status_code == 200
        listed = {item["external_id"] for item in client.get("/internal/conversations").json()["items"]}
    in_new_file = stored(database)
    assert {"kept", "after the swap"} <= in_new_file == listed
    assert "meets the swap" not in in_new_file


@pytest.mark.parametrize("damage", ["removed", "not a database"])
def test_a_database_file_removed_or_unusable_is_503_until_it_is_restored(
    database: Path, tmp_path: Path, damage: str
) -> None:
    ledger = Ledger()
    backup = tmp_path / "backup.db"
    with app_on(database) as client:
        assert ledger.post(client, "kept") == 201
        copy(database, backup)
        if damage == "removed":
            database.unlink()
        else:
            garbage = tmp_path / "garbage"
            garbage.write_bytes(b"this is not an SQLite database\n" * 4096)
            garbage.replace(database)
        assert ledger.post(client, "nowhere to go") == 503
        assert ledger.post(client, "still nowhere") == 503
        assert client.get("/ready").status_code == 503
        assert client.get("/internal/conversations").status_code == 503
        shutil.copy(backup, database.with_name("restoring"))
        database.with_name("restoring").replace(database)
        assert ledger.post(client, "after the restore") == 201
        assert client.get("/ready").status_code == 200
    assert ledger.acknowledged == {"kept", "after the restore"} == stored(database)


def test_an_error_the_sqlite3_module_raises_itself_is_told_by_its_type() -> None:
    """A ``ProgrammingError`` of the module (a closed connection) has no SQLite result code to classify it by."""
    connection = sqlite3.connect(":memory:")
    connection.close()
    with pytest.raises(sqlite3.ProgrammingError) as raised:
        connection.execute("SELECT 1")
    assert not is_unavailable(raised.value)  # kbms's own mistake, not the database's state
    assert failure_reason(raised.value) == "ProgrammingError"

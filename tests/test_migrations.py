"""Migrations create exactly the schema the code declares, and upgrading is idempotent."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from kbms.storage import admin_engine
from kbms.storage.migrate import current_revision, head_revision, is_current, upgrade
from kbms.storage.schema import metadata


def test_migrated_schema_matches_the_declared_one(database_url: str) -> None:
    engine = admin_engine(database_url)
    try:
        with engine.connect() as conn:
            differences = compare_metadata(MigrationContext.configure(conn), metadata)
    finally:
        engine.dispose()
    assert differences == []


def test_upgrade_twice_and_current(database_url: str) -> None:
    engine = admin_engine(database_url)
    try:
        upgrade(engine)
        assert current_revision(engine) == head_revision()
        assert is_current(engine)
    finally:
        engine.dispose()


def test_sqlite_is_in_wal_mode_with_durable_commits(sqlite_url: str) -> None:
    engine = admin_engine(sqlite_url)
    try:
        with engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL
            assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
    finally:
        engine.dispose()


def test_concurrent_migrators_on_a_fresh_database_all_succeed(empty_database_url: str) -> None:
    def run() -> str | None:
        engine = admin_engine(empty_database_url)
        try:
            upgrade(engine)
            return current_revision(engine)
        finally:
            engine.dispose()

    with ThreadPoolExecutor(max_workers=4) as pool:
        revisions = list(pool.map(lambda _: run(), range(4)))
    assert revisions == [head_revision()] * 4

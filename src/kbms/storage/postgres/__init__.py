"""PostgreSQL, the scale-out store: many API processes (or hosts) on one database (``store.py``).

The engine object (``BACKEND``) of ``kbms.storage.BACKENDS``: its URLs and connections (``connect.py``), its SQL
(``syntax.py``), its errors (``failures.py``), its store (``store.py``).
"""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import URL
from sqlalchemy.engine import Engine

from kbms.settings import Settings
from kbms.storage.base import Store
from kbms.storage.postgres import failures
from kbms.storage.postgres.connect import check_options, make_engine, postgres_url
from kbms.storage.postgres.store import PostgresStore
from kbms.storage.postgres.syntax import FLAVOR

DRIVERS = ("psycopg", "psycopg2", "postgresql")  # the drivers a URL may name: kbms drives them all with psycopg 3
MIGRATION_LOCK = 0x6B626D73  # "kbms": the advisory lock that serializes concurrent migrators


class PostgresBackend:
    """``kbms.storage.backend.Backend`` for PostgreSQL."""

    title = "PostgreSQL"
    example = "postgresql://user@host/db"
    aliases: frozenset[str] = frozenset(("postgres",))  # the libpq spelling, which SQLAlchemy does not know
    flavor = FLAVOR
    migration_lock: str | None = f"SELECT pg_advisory_xact_lock({MIGRATION_LOCK})"

    unavailable = staticmethod(failures.unavailable)
    is_refused = staticmethod(failures.is_refused)
    reason_line = staticmethod(failures.reason_line)
    refuses_access = staticmethod(failures.refuses_access)
    failure_kind = staticmethod(failures.failure_kind)

    def accepts(self, url: URL) -> bool:
        return url.get_backend_name() in ("postgresql", "postgres") and url.get_driver_name() in DRIVERS

    def checked_url(self, url: URL) -> URL:
        check_options(url)
        return postgres_url(url)

    def database_file(self, url: URL) -> Path | None:
        return None

    def open_store(self, url: URL, settings: Settings, *, command: bool) -> Store:
        return PostgresStore(
            url,
            pool_size=settings.db_pool_size,
            pool_timeout=settings.db_pool_timeout,
            answer_timeout=settings.db_timeout,
        )

    def admin_engine(self, url: URL, *, lock_wait: float | None) -> Engine:
        return make_engine(url, pool_size=1, pool_timeout=10)

    def reading_engine(self, url: URL) -> Engine:
        return make_engine(url, pool_size=1, pool_timeout=10)


BACKEND = PostgresBackend()

__all__ = ["BACKEND", "PostgresBackend", "PostgresStore"]

"""Schema versions: apply the migrations, and tell whether a database is at the code's version."""

from __future__ import annotations

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import URL
from sqlalchemy.engine import Engine

from kbms.storage import backend_of

SCRIPT_LOCATION = "kbms.storage:migrations"


def alembic_config(url: URL | None = None) -> Config:
    config = Config()
    config.set_main_option("script_location", SCRIPT_LOCATION)
    if url is not None:
        config.set_main_option("sqlalchemy.url", url.render_as_string(hide_password=False).replace("%", "%%"))
    return config


def head_revision() -> str | None:
    return ScriptDirectory.from_config(alembic_config()).get_current_head()


def is_known(revision: str) -> bool:
    """Whether this kbms has the migration ``revision`` (a database migrated by a newer kbms has one it lacks)."""
    return any(script.revision == revision for script in ScriptDirectory.from_config(alembic_config()).walk_revisions())


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def upgrade(engine: Engine) -> None:
    """Apply every migration not yet applied (idempotent, and safe when several processes start at once)."""
    config = alembic_config()
    lock = backend_of(engine.url).migration_lock
    with engine.begin() as conn:
        if lock is not None:
            # Replicas that start together each run `kbms migrate`: one migrates, the others wait, then find
            # nothing to do. (Where it is None, as on SQLite, BEGIN IMMEDIATE already serializes them.)
            conn.exec_driver_sql(lock)
        config.attributes["connection"] = conn
        command.upgrade(config, "head")


def is_current(engine: Engine) -> bool:
    return current_revision(engine) == head_revision()

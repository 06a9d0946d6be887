"""Alembic environment: runs on the connection kbms hands over (``kbms migrate``), or on ``sqlalchemy.url``."""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection, create_engine

from kbms.storage.schema import declared, metadata


def _include(_object: object, name: str | None, type_: str, _reflected: bool, _compare_to: object) -> bool:
    return declared(name, type_)


def _run(connection: Connection) -> None:
    # render_as_batch: SQLite cannot ALTER most things; batch mode rebuilds the table instead.
    context.configure(connection=connection, target_metadata=metadata, render_as_batch=True, include_object=_include)
    with context.begin_transaction():
        context.run_migrations()


connection = context.config.attributes.get("connection")
if connection is not None:
    _run(connection)
else:
    with create_engine(context.config.get_main_option("sqlalchemy.url") or "").connect() as conn:
        _run(conn)

"""PostgreSQL's URLs and connections: the driver (psycopg 3), the options a URL may carry, and engines whose
sessions bound how long a statement or a lock may take."""

from __future__ import annotations

import time
from typing import Any

import psycopg
from psycopg.conninfo import make_conninfo
from sqlalchemy import URL, create_engine, event
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DisconnectionError
from sqlalchemy.pool import ConnectionPoolEntry

DRIVER = "postgresql+psycopg"
# Server-side limits, so that no request waits on the database for longer than a client would.
SESSION_OPTIONS = "-c lock_timeout=4000 -c statement_timeout=15000 -c idle_in_transaction_session_timeout=30000"


def postgres_url(url: URL) -> URL:
    """Any PostgreSQL URL, driven by psycopg 3."""
    return url.set(drivername=DRIVER)


def check_options(url: URL) -> None:
    """``ValueError`` naming an option of the URL's query that libpq does not know (``?ssl=true``). Checked by
    psycopg without connecting; only the names: a bad value is libpq's to tell when it connects."""
    options = {key: value if isinstance(value, str) else value[-1] for key, value in url.query.items()}
    try:
        make_conninfo("", **options)
    except psycopg.ProgrammingError as exc:  # 'invalid connection option "ssl"': a name, never a value
        first = (str(exc).strip().splitlines() or ["invalid connection option"])[0]
        raise ValueError(f"{first}: use libpq's parameters, e.g. ?sslmode=require") from None


def make_engine(url: URL, *, pool_size: int, pool_timeout: float) -> Engine:
    options = " ".join(filter(None, (url.query.get("options"), SESSION_OPTIONS)))  # type: ignore[arg-type]
    # ?application_name= in the URL names the connections (pg_stat_activity), e.g. one name per replica.
    application_name = url.query.get("application_name") or "kbms"
    engine = create_engine(
        postgres_url(url).difference_update_query(["options"]),
        hide_parameters=True,  # SQL parameters are payload data: keep them out of exception messages and logs
        pool_size=pool_size,
        max_overflow=0,
        pool_timeout=pool_timeout,
        # Keepalives: a silent network partition must not pin the pool's connections until TCP gives up.
        connect_args={
            "connect_timeout": 3,
            "options": options,
            "application_name": application_name,
            "keepalives": 1,
            "keepalives_idle": 10,
            "keepalives_interval": 5,
            "keepalives_count": 3,
            "tcp_user_timeout": 15_000,
        },
    )
    _ping_when_idle(engine)
    return engine


# A restarted server leaves dead connections in the pool, so a connection that has been idle is tested before use
# (one round trip, as SQLAlchemy's pool_pre_ping does). One in steady use is not: pinging before every transaction
# cost a round trip per transaction, two per ingested conversation, and 7 % of a write thread's time (py-spy). A
# connection that dies while in use fails its request with a 503 and has the pool renewed, pinged or not.
PING_AFTER_IDLE = 1.0  # seconds


def _ping_when_idle(engine: Engine) -> None:
    @event.listens_for(engine, "checkin")
    def _returned(_dbapi_connection: Any, record: ConnectionPoolEntry) -> None:
        record.info["returned"] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _ping(dbapi_connection: Any, record: ConnectionPoolEntry, _proxy: Any) -> None:
        # A new connection has no "returned": it has just been made, and needs no test.
        returned = record.info.get("returned")
        if returned is None or time.monotonic() - returned < PING_AFTER_IDLE:
            return
        try:
            alive = engine.dialect.do_ping(dbapi_connection)
        except psycopg.Error as exc:
            raise DisconnectionError(f"Idle connection failed its test ({type(exc).__name__})") from exc
        if not alive:
            raise DisconnectionError("Idle connection failed its test")

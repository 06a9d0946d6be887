"""What psycopg's errors mean, by their SQLSTATE: the database unavailable (a 503), a value it refuses (a 422),
kbms refused (credentials, privileges), or kbms's own mistake."""

from __future__ import annotations

import re

import psycopg

from kbms.storage.backend import FailureKind, driver_error
from kbms.storage.backend import is_unavailable as _is_unavailable

# Error classes (SQLSTATE prefixes, and single states) that mean "not now": connection failures, insufficient
# resources, operator intervention (statement timeout, shutdown), system errors, lock timeout.
UNAVAILABLE_STATES = ("08", "53", "57", "58", "55P03", "40001", "40P01")
# ...and those that mean "this value cannot be stored": data exceptions, program limits (an index row too big).
REFUSED_STATES = ("22", "54")
# Refusals that are about the database, not about kbms: invalid authorization (class 28), an unknown database
# (3D000), missing privileges (42501, e.g. on the schema kbms migrates), no schema to create tables in (3F000:
# search_path names none that exists and the user may use).
REFUSING_STATES = ("28", "3D000", "42501", "3F000")
# libpq tells a refusal at connection time in words only, without its SQLSTATE: these are the server's words
# (in English unless its lc_messages says otherwise; then the failure is told as "cannot reach").
CONNECTION_REFUSALS = (
    (re.compile(r"password authentication failed|role \".*\" does not exist|no pg_hba\.conf entry"), "28000"),
    (re.compile(r"database \".*\" does not exist"), "3D000"),
    (re.compile(r"permission denied"), "42501"),
)


def _state(exc: BaseException) -> str:
    return str(getattr(driver_error(exc), "sqlstate", None) or "")


def unavailable(driver: BaseException, exc: BaseException) -> bool | None:
    if not isinstance(driver, psycopg.Error):
        return None
    state = _state(exc)
    return state.startswith(UNAVAILABLE_STATES) or (not state and isinstance(driver, psycopg.OperationalError))


def is_unavailable(exc: BaseException) -> bool:
    """``kbms.storage.backend.is_unavailable`` for PostgreSQL's errors."""
    return _is_unavailable(exc, (unavailable,))


def is_refused(exc: BaseException) -> bool:
    return isinstance(driver_error(exc), psycopg.Error) and _state(exc).startswith(REFUSED_STATES)


def reason_line(driver: BaseException) -> str | None:
    """The server's or libpq's own words, without libpq's framing (which server, "FATAL:", the hint lines)."""
    if not isinstance(driver, psycopg.OperationalError):
        return None
    line = (str(driver).strip().splitlines() or [type(driver).__name__])[0]
    return line.rpartition(" failed: ")[2].removeprefix("FATAL:").strip()


def sqlstate(exc: BaseException) -> str:
    """The SQLSTATE of the PostgreSQL error in ``exc`` or its causes ("" if none is known)."""
    seen: set[int] = set()
    error: BaseException | None = exc
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        driver = getattr(error, "orig", None) or error
        if isinstance(driver, psycopg.Error):
            if driver.sqlstate:
                return driver.sqlstate
            text = str(driver)
            if "FATAL:" in text:  # the server answered, refusing
                return next((state for pattern, state in CONNECTION_REFUSALS if pattern.search(text)), "")
        error = error.__cause__ or error.__context__
    return ""


def refuses_access(exc: BaseException) -> bool:
    driver = getattr(exc, "orig", None) or exc
    return isinstance(driver, psycopg.Error) and sqlstate(exc).startswith(REFUSING_STATES)


def failure_kind(_reason: str, exc: BaseException | None) -> FailureKind:
    state = "" if exc is None else sqlstate(exc)
    if state.startswith(("28", "3D000")):
        return FailureKind.REFUSED
    if state.startswith("3F000"):
        return FailureKind.NO_SCHEMA
    if state.startswith("42501"):
        return FailureKind.NO_PRIVILEGE
    return FailureKind.UNREACHABLE

"""Logging: JSON lines on stderr through structlog, for kbms's own loggers and the standard library's.

Every line logged while a request is handled carries its ``request_id`` (``REQUEST_ID``, set by
``api/telemetry.py``). What never reaches a line: payload bodies, query strings, headers (``Authorization``,
signatures), client addresses, and exception messages: a driver's message quotes the row it refused, a ``KeyError``
quotes the key, so an exception is logged as its types and stack only (``describe_exception``). Libraries that print
data at info or debug are held at warning whatever the level (``QUIET``).
"""

from __future__ import annotations

import json
import logging
import sys
import time
import traceback
from contextvars import ContextVar
from typing import Any, TextIO

import structlog

LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}
# SQLAlchemy's engine loggers print every statement and every row fetched (customer data) at info and debug (it
# holds them at warning itself; so does kbms, whatever KBMS_LOG_LEVEL says); uvicorn's access log and HTTP clients
# (the test client; provider API calls) print whole URLs, query strings included, at info; Alembic narrates every
# schema check at info. kbms writes its own access line (``log_request``).
QUIET = ("sqlalchemy", "alembic", "uvicorn.access", "httpx", "httpcore", "httpx2", "httpcore2")
ACCESS = logging.getLogger("kbms.access")

_handler: logging.StreamHandler[TextIO] | None = None  # where every line goes; set by configure_logging
# The id of the request being handled, set by the telemetry middleware: added to every line logged meanwhile.
REQUEST_ID: ContextVar[str | None] = ContextVar("kbms_request_id", default=None)

_second: tuple[int, str] = (0, "")  # the last second _timestamp formatted, and its text
_quoted_routes: dict[str, str] = {}  # route template -> its JSON string (a bounded set: the app's routes)


def configure_logging(level: str, *, stream: TextIO | None = None) -> None:
    """Send every log record, as one JSON object per line, to ``stream`` (stderr). Safe to call more than once."""
    global _handler
    shared: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        _add_request_id,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            _exception_without_messages,
            structlog.processors.JSONRenderer(),
        ],
    )
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(LEVELS[level])
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
    for name in QUIET:
        logging.getLogger(name).setLevel(max(LEVELS[level], logging.WARNING))
    _handler = handler


def log_request(method: str, route: str, status: int, duration_ms: float, request_id: str) -> None:
    """The access line of one request, at info on ``kbms.access``, in the shape of every other line.

    Written here rather than through the processor chain: in a loop, a line through the standard library and
    structlog's formatter cost 28 us, this 3 us; inside the app, where a redelivery costs about 75 us, it adds 6 to
    12 us (``bench/request_overhead.py``). The values need no JSON escaping: ``method`` is one of a fixed set,
    ``request_id`` a checked token, and ``route`` (a route template) is escaped once and remembered.
    """
    handler = _handler
    if handler is None or not ACCESS.isEnabledFor(logging.INFO):
        return
    quoted = _quoted_routes.get(route)
    if quoted is None:
        quoted = _quoted_routes[route] = json.dumps(route)
    timestamp = _timestamp()
    line = (
        f'{{"event": "request", "method": "{method}", "route": {quoted}, "status": {status:d}, '
        f'"duration_ms": {duration_ms:.2f}, "request_id": "{request_id}", "level": "info", '
        f'"logger": "kbms.access", "timestamp": "{timestamp}"}}\n'
    )
    handler.acquire()
    try:
        handler.stream.write(line)
        handler.flush()
    except (OSError, ValueError):  # a closed or broken stderr must not fail the request
        pass
    finally:
        handler.release()


def _timestamp() -> str:
    """Now, as structlog's TimeStamper writes it (ISO 8601, UTC, microseconds), at a third of its cost: the part
    down to the second changes once a second."""
    global _second
    now = time.time()
    whole = int(now)
    second, text = _second
    if whole != second:
        text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole))
        _second = (whole, text)
    return f"{text}.{int((now - whole) * 1_000_000):06d}Z"


def _add_request_id(_logger: Any, _name: str, event_dict: structlog.typing.EventDict) -> Any:
    request_id = REQUEST_ID.get()
    if request_id is not None:
        event_dict.setdefault("request_id", request_id)
    return event_dict


def _exception_without_messages(_logger: Any, _name: str, event_dict: structlog.typing.EventDict) -> Any:
    exc_info = event_dict.pop("exc_info", None)
    if exc_info is True:
        exc_info = sys.exc_info()
    exc = exc_info if isinstance(exc_info, BaseException) else exc_info[1] if isinstance(exc_info, tuple) else None
    if exc is not None:
        event_dict["exception"] = describe_exception(exc)
    return event_dict


def describe_exception(exc: BaseException) -> str:
    """The exception's chain as a traceback, with each exception's type (and SQLSTATE) in place of its message."""
    lines: list[str] = []
    seen: set[int] = set()

    def walk(error: BaseException) -> None:
        if id(error) in seen:
            return
        seen.add(id(error))
        if error.__cause__ is not None:
            walk(error.__cause__)
            lines.append("\nThe above exception was the direct cause of the following exception:\n\n")
        elif error.__context__ is not None and not error.__suppress_context__:
            walk(error.__context__)
            lines.append("\nDuring handling of the above exception, another exception occurred:\n\n")
        if error.__traceback__ is not None:
            lines.append("Traceback (most recent call last):\n")
            lines.extend(traceback.StackSummary.extract(traceback.walk_tb(error.__traceback__)).format())
        lines.append(f"{_type_name(error)} (message withheld: it may quote data)\n")
        if isinstance(error, BaseExceptionGroup):
            for number, member in enumerate(error.exceptions, start=1):
                lines.append(f"\n[{_type_name(error)}: member {number} of {len(error.exceptions)}]\n")
                walk(member)

    walk(exc)
    return "".join(lines).rstrip("\n")


def _type_name(error: BaseException) -> str:
    cls = type(error)
    name = cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"
    sqlstate = getattr(error, "sqlstate", None)  # psycopg's errors: a code, never data
    return f"{name} [SQLSTATE {sqlstate}]" if isinstance(sqlstate, str) else name

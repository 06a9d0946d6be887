"""Per-request telemetry: a request id, one access line and the HTTP metrics, as one plain ASGI middleware.

Plain ASGI, not Starlette's ``BaseHTTPMiddleware`` (which runs the app in a task group and re-wraps every message):
this runs on every request, including the hot ingest and read routes. Its cost, measured in the app with
``bench/request_overhead.py``: about 14 us on ``/health`` (44 us without it) and 25-30 us on a redelivery (78 us
without it), the access line included; half as much with the access line off (``KBMS_LOG_LEVEL=warning``).

- The request id is the caller's ``X-Request-ID`` when it is a sane token (letters, digits, ``.``, ``_``, ``:``,
  ``-``; at most 128), else 128 random bits in hex. It is bound to every log line logged while the request is
  handled, echoed in the response's ``X-Request-ID``, and left on ``request.state.request_id`` for the 500 handler,
  which runs outside this middleware.
- Labels: the matched route's template, never the raw path (bounded, and paths can carry personal data); methods
  outside HTTP's usual set count as ``OTHER``.
"""

from __future__ import annotations

import random
import re
import time
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kbms.api.metrics import Metrics
from kbms.logs import REQUEST_ID, log_request

REQUEST_ID_HEADER = b"x-request-id"
SANE_REQUEST_ID = re.compile(rb"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
METHODS = frozenset(("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"))
UNMATCHED = "unmatched"
# A request that ends without an answer because its task was cancelled (the server stopping): nginx's name for it.
CANCELLED = 499


class RequestTelemetry:
    def __init__(self, app: ASGIApp, *, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        # An id need not be unguessable, only unique: 128 random bits, without the system call of secrets/uuid4.
        request_id = incoming_request_id(scope) or f"{random.getrandbits(128):032x}"
        scope.setdefault("state", {})["request_id"] = request_id
        echoed = (REQUEST_ID_HEADER, request_id.encode())
        status = 0

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", ()), echoed]
            await send(message)

        token = REQUEST_ID.set(request_id)
        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            status = status or 500  # Starlette's outermost middleware answers it with the 500 handler's body
            raise
        except BaseException:
            status = status or CANCELLED
            raise
        finally:
            seconds = time.perf_counter() - started
            method = scope["method"] if scope["method"] in METHODS else "OTHER"
            route = route_of(scope)
            self.metrics.request(method, route, status, seconds)
            log_request(method, route, status, seconds * 1000, request_id)
            REQUEST_ID.reset(token)


def incoming_request_id(scope: Scope) -> str | None:
    for name, value in scope["headers"]:
        if name == REQUEST_ID_HEADER:
            return value.decode("ascii") if SANE_REQUEST_ID.fullmatch(value) else None
    return None


def route_of(scope: Scope) -> str:
    """The template of the route that answered (set by the router), or ``unmatched``."""
    route: Any = scope.get("route")
    path = getattr(route, "path", None)
    return path if isinstance(path, str) else UNMATCHED

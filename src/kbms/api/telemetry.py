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
  outside HTTP's usual set count as ``OTHER``. A request answered before routing (an API key refused, a 503 from
  admission) or by a route that does not record itself (``/docs``, ``/openapi.json``, a static mount) is labelled
  with the template its path matches (``RouteTemplates``); only a path no route knows is ``unmatched``.
"""

from __future__ import annotations

import random
import re
import time
from collections.abc import Callable, Iterable

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
    def __init__(self, app: ASGIApp, *, metrics: Metrics, routes: Callable[[], Iterable[object]]) -> None:
        self.app = app
        self.metrics = metrics
        self.routes = routes
        self.templates: RouteTemplates | None = None  # built on first need, once every route is in place

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        # As the server gave it: a mount on the way in extends root_path with the part it matched.
        root_path: str = scope.get("root_path", "")
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
            route = self.route_of(scope, root_path)
            self.metrics.request(method, route, status, seconds)
            log_request(method, route, status, seconds * 1000, request_id)
            REQUEST_ID.reset(token)

    def route_of(self, scope: Scope, root_path: str) -> str:
        """The template of the route that answered (set by FastAPI's router), else of the route the path matches
        (``scope["path"]`` less the server's ``root_path``, as a router reads it)."""
        template = getattr(scope.get("route"), "path_format", None)
        if isinstance(template, str):
            return template
        if self.templates is None:
            self.templates = RouteTemplates(self.routes())
        path: str = scope["path"]
        return self.templates.match(path[len(root_path) :] if root_path and path.startswith(root_path) else path)


class RouteTemplates:
    """The path templates of routes (Starlette's and FastAPI's), to label requests no route recorded itself on.

    Matching ignores the method, as a 405 does. Used only for refusals, unknown paths and the documentation pages:
    routed API requests never get here.
    """

    def __init__(self, routes: Iterable[object]) -> None:
        templates: dict[str, re.Pattern[str]] = {}
        for route in routes:
            template, regex = getattr(route, "path_format", None), getattr(route, "path_regex", None)
            if isinstance(template, str) and isinstance(regex, re.Pattern):
                templates.setdefault(template, regex)  # a mount's is "<prefix>/{path}", whatever the file
        # Literal paths first, as no route with a parameter may shadow one ("/a/b" before "/a/{x}").
        self._ordered = sorted(templates.items(), key=lambda item: "{" in item[0])

    def match(self, path: str) -> str:
        for template, regex in self._ordered:
            if regex.match(path):
                return template
        return UNMATCHED


def incoming_request_id(scope: Scope) -> str | None:
    for name, value in scope["headers"]:
        if name == REQUEST_ID_HEADER:
            return value.decode("ascii") if SANE_REQUEST_ID.fullmatch(value) else None
    return None

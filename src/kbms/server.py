"""The HTTP server of ``kbms serve``: uvicorn, with the read deadlines it lacks.

uvicorn (0.54, httptools) closes idle keep-alive connections, but nothing bounds how long a request may take to
arrive. Measured against it: a connection that sends nothing, one that sends a header byte every 1.5 s and one that
sends its body a byte at a time all stayed open for as long as the client liked, and 16 MB of headers were read
into memory. A few hundred such connections cost an attacker nothing (slowloris, slow POST).

``DeadlineProtocol`` is uvicorn's httptools protocol with the deadlines of Apache's mod_reqtimeout:

- head: the request line and headers must be complete ``header_timeout`` seconds after the connection opens, or
  after the first byte of the next request on a kept-alive connection, and hold at most ``max_header_bytes``
  (else 408 or 431, and the connection is closed);
- body: ``body_timeout`` seconds from the end of the headers, plus one second for every ``body_min_rate`` bytes
  received: a client trickling bytes is cut off after about ``body_timeout`` seconds, while an upload faster than
  ``body_min_rate`` never is, however large;
- idle keep-alive connections are closed after ``keepalive_timeout`` (uvicorn's own timer).

And it buffers requests, as nginx does in front of an application: uvicorn hands a request to the application as
soon as its headers are in, so a client trickling its body held a request slot of the application (and an
admission slot, ``kbms.api.admission``) the whole time: a hundred slow POSTs would have starved everyone else.
Here the application gets a request once its body is complete, or once 64 KiB of it (uvicorn's flow-control mark:
a larger body then streams into the application, which enforces the size limit while reading). A request that
asks ``Expect: 100-continue`` is told to continue at once, since it would otherwise wait for the application.

Timers cost per connection, not per request: each connection keeps one timer, a request only moves the deadline,
and a timer that fires before the deadline re-arms itself for it.

A front proxy (nginx's client_header_timeout, client_body_timeout and request buffering) would do the same; this
keeps ``kbms serve`` safe without one. ``bench/hardening.py`` measures it against stock uvicorn.
"""

from __future__ import annotations

import asyncio
import socket
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from uvicorn._types import ASGI3Application
from uvicorn.config import Config
from uvicorn.protocols.http.flow_control import HIGH_WATER_LIMIT
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle
from uvicorn.server import ServerState

from kbms.api.errors import raw_response_of
from kbms.errors import HeadersTooLarge, RequestTimeout
from kbms.settings import Settings

Phase = Literal["head", "body"]


@dataclass(frozen=True, slots=True)
class ReadLimits:
    header_timeout: float
    body_timeout: float
    body_min_rate: int
    max_header_bytes: int

    @classmethod
    def of(cls, settings: Settings) -> ReadLimits:
        return cls(
            header_timeout=settings.header_timeout,
            body_timeout=settings.body_timeout,
            body_min_rate=settings.body_min_rate,
            max_header_bytes=settings.max_header_bytes,
        )


class DeadlineProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, with head and body deadlines and a bound on the head's size."""

    # Set by ``protocol(limits)``. uvicorn's worker processes (``kbms serve --workers N``) import this class by
    # name instead, and read the limits from the KBMS_* variables the supervisor exported, at the first connection.
    limits: ClassVar[ReadLimits | None] = None

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        limits = type(self).limits
        if limits is None:
            limits = type(self).limits = ReadLimits.of(Settings())
        self._limits = limits
        self._phase: Phase | None = None
        self._deadline = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._head_bytes = 0
        self._held: tuple[RequestResponseCycle, ASGI3Application] | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._start("head", self._limits.header_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._phase = None
        self._held = None
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._phase is None and not self.pipeline:
            # The first byte of the next request: on a kept-alive connection, or sent before the previous
            # answer (pipelined). Not while a pipelined request waits: what arrives then is its body.
            self._start("head", self._limits.header_timeout)
        if self._phase == "head":
            self._head_bytes += len(data)
        super().data_received(data)
        # Still in the head after this read: everything read so far was head (a read that completes the head may
        # carry body bytes too, so it is never counted against the limit).
        if self._phase == "head" and self._head_bytes > self._limits.max_header_bytes:
            self._refuse(HeadersTooLarge(self._limits.max_header_bytes))

    def on_headers_complete(self) -> None:
        # A pipelined request (one sent before the previous one's answer) waits, unread, until that answer is
        # complete: its body deadline starts when uvicorn starts it (_start_asgi_task), not now.
        pipelined = self.cycle is not None and not self.cycle.response_complete
        if pipelined:
            self._phase = None
        else:
            self._start("body", self._limits.body_timeout)
        super().on_headers_complete()

    def _start_asgi_task(self, cycle: RequestResponseCycle, app: ASGI3Application) -> None:
        if not cycle.more_body:  # the body is all here (a pipelined request that waited)
            super()._start_asgi_task(cycle, app)
            return
        if self._phase is None:  # a pipelined request whose body is still to come
            self._start("body", self._limits.body_timeout)
        if cycle.waiting_for_100_continue and not self.transport.is_closing():
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            cycle.waiting_for_100_continue = False
        self._held = (cycle, app)

    def on_body(self, body: bytes) -> None:
        self._deadline += len(body) / self._limits.body_min_rate
        super().on_body(body)
        if self._held is not None and len(self.cycle.body) >= HIGH_WATER_LIMIT:
            self._release_request()

    def on_message_complete(self) -> None:
        self._phase = None
        super().on_message_complete()
        if self._held is not None:
            self._release_request()

    def on_response_complete(self) -> None:
        if self._phase == "head":  # a next request began during the answer: its head gets its full time from now
            self._deadline = max(self._deadline, self.loop.time() + self._limits.header_timeout)
        super().on_response_complete()

    def _release_request(self) -> None:
        assert self._held is not None
        cycle, app = self._held
        self._held = None
        super()._start_asgi_task(cycle, app)

    def _start(self, phase: Phase, seconds: float) -> None:
        self._phase = phase
        self._head_bytes = 0
        self._deadline = self.loop.time() + seconds
        # One timer per connection: armed anew only if the running one would fire after the new deadline.
        if self._timer is None or self._timer.when() > self._deadline:
            if self._timer is not None:
                self._timer.cancel()
            self._timer = self.loop.call_at(self._deadline, self._check_deadline)

    def _check_deadline(self) -> None:
        self._timer = None
        if self._phase is None or self.transport.is_closing():
            return
        if self._phase == "head" and self.cycle is not None and not self.cycle.response_complete:
            # The next request began while this one is being answered: its head can wait for the answer, which
            # closing now would cut short.
            self._deadline = self.loop.time() + self._limits.header_timeout
        if self.loop.time() < self._deadline:
            self._timer = self.loop.call_at(self._deadline, self._check_deadline)
            return
        started = self._phase == "body" or self._head_bytes > 0
        if started:
            self._refuse(RequestTimeout())
        else:
            self.transport.close()  # opened and never used: nobody to answer

    def _refuse(self, error: RequestTimeout | HeadersTooLarge) -> None:
        # Answered only where no other answer is under way on the connection: a request's head, once the previous
        # request is answered; a body, if the application has not begun its answer. Either way the connection is
        # closed, which ends the application's read of the body (``http.disconnect``).
        cycle = self.cycle
        if self._phase == "head":
            answer = cycle is None or cycle.response_complete
        else:
            answer = cycle is not None and not cycle.response_started
        if answer:
            self.transport.write(raw_response_of(error))
        self._phase = None
        self._held = None  # never handed to the application
        self.transport.close()


def listening_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host`` and ``port`` (0: any free port), for ``uvicorn.Server.run(sockets=...)``.

    Raises ``OSError`` (``socket.gaierror`` for a host that does not resolve) when the address cannot be used,
    before anything else has started. Bound exactly as uvicorn binds its own (``Config.bind_socket``), so that this
    socket and the one of uvicorn's supervisor (``--workers`` N) listen on the same address: ``SO_REUSEADDR``, IPv6
    if the host has a ``:``, else IPv4 (a name resolving to IPv6 first is still bound on its IPv4 address).
    """
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except BaseException:
        sock.close()
        raise
    return sock


def protocol(limits: ReadLimits) -> type[DeadlineProtocol]:
    """``DeadlineProtocol`` bound to ``limits``, for ``uvicorn.run(http=...)``."""
    return type("BoundDeadlineProtocol", (DeadlineProtocol,), {"limits": limits})


def uvicorn_options(settings: Settings) -> dict[str, Any]:
    """The keyword arguments of ``uvicorn.run`` that bound slow and idle clients."""
    return {"http": protocol(ReadLimits.of(settings)), "timeout_keep_alive": settings.keepalive_timeout}


def uvicorn_arguments(settings: Settings) -> list[str]:
    """The same, as ``uvicorn`` command-line arguments (worker processes read the limits from KBMS_*)."""
    return [
        "--http",
        f"{DeadlineProtocol.__module__}:{DeadlineProtocol.__name__}",
        "--timeout-keep-alive",
        str(settings.keepalive_timeout),
    ]

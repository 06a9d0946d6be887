"""Admission control: a bounded number of requests in flight per process, a bounded wait for a slot, then 503.

Past its capacity a process does not get faster by accepting more: every extra request only makes all of them
slower, until clients time out and retry into a longer queue. So at most ``capacity`` requests run at once; up to
``queued`` more wait, first come first served, at most ``wait`` seconds for a slot; any other request is answered
at once with 503 ``unavailable`` and ``Retry-After`` (the documented error body), which costs a few microseconds
instead of a request's milliseconds. Nothing is kept between bursts, so service resumes by itself as soon as the
load drops.

The wait absorbs bursts, not sustained overload: a queue that has not emptied for ``wait`` seconds is standing,
and while it stands, newcomers wait at most ``STANDING_WAIT`` (CoDel, as in Facebook's "Fail at scale", ACM Queue
2015). Without it, under sustained overload the queue stays full, so every admitted request first sits out nearly
the whole wait, and so does every 503; with it, a standing queue answers in milliseconds either way.

This also bounds everything behind it: SQLite's queue of writes waiting for the next group commit holds at most
``capacity`` of them per process, and PostgreSQL requests wait for a pooled connection behind at most that many.

A plain ASGI middleware (no ``BaseHTTPMiddleware``: that wraps every request in extra tasks and streams): outside
everything except the error middleware, so a refused request reaches no router, dependency or API-key check.
``/health`` and ``/ready`` bypass it: an orchestrator must see a busy process as alive, and ``/ready`` reports on
the database, not on load.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Collection

from starlette.types import ASGIApp, Receive, Scope, Send

from kbms.api.errors import kbms_error_response
from kbms.errors import Overloaded

log = logging.getLogger(__name__)

EXEMPT = ("/health", "/ready")
STANDING_WAIT = 0.01  # seconds a newcomer waits while the queue stands: enough to take a slot that frees up now
WARN_EVERY_SECONDS = 10.0  # one line per burst, not one per refused request: logging is not free under overload


class Admission:
    """The middleware; ``in_flight`` and ``queued`` say how busy the process is right now."""

    def __init__(
        self, app: ASGIApp, *, capacity: int, queued: int, wait: float, exempt: Collection[str] = EXEMPT
    ) -> None:
        self.app = app
        self.capacity = capacity
        self.max_queued = queued
        self.wait = wait
        self.exempt = frozenset(exempt)
        self.in_flight = 0
        self._waiters: deque[asyncio.Future[bool]] = deque()
        self._queued_since = 0.0  # when the queue last went from empty to not empty
        self._refusal = kbms_error_response(Overloaded())  # built once: refusing must stay cheap
        self._refused_since_warning = 0
        self._warned_at = -WARN_EVERY_SECONDS

    @property
    def queued(self) -> int:
        return len(self._waiters)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self.exempt:
            await self.app(scope, receive, send)
            return
        if self.in_flight < self.capacity and not self._waiters:
            self.in_flight += 1
        elif not await self._wait_for_slot():
            self._note_refusal()
            await self._refusal(scope, receive, send)
            return
        try:
            await self.app(scope, receive, send)
        finally:
            self._release()

    async def _wait_for_slot(self) -> bool:
        """True once a finishing request hands this one its slot; False if the queue is full or the wait ends."""
        if len(self._waiters) >= self.max_queued or self.wait <= 0:
            return False
        loop = asyncio.get_running_loop()
        now = loop.time()
        if not self._waiters:
            self._queued_since = now
        slot: asyncio.Future[bool] = loop.create_future()
        self._waiters.append(slot)
        timer = loop.call_later(self.allowed_wait(now), self._expire, slot)
        try:
            return await slot
        except asyncio.CancelledError:
            if slot.done() and not slot.cancelled() and slot.result():
                self._release()  # handed a slot just as the request was cancelled: pass it on
            else:
                self._forget(slot)
            raise
        finally:
            timer.cancel()

    def allowed_wait(self, now: float) -> float:
        """How long a request arriving at ``now`` (loop time) may wait: short while the queue stands."""
        standing = len(self._waiters) > 1 and now - self._queued_since >= self.wait
        return min(self.wait, STANDING_WAIT) if standing else self.wait

    def _expire(self, slot: asyncio.Future[bool]) -> None:
        if not slot.done():
            slot.set_result(False)
            self._forget(slot)

    def _forget(self, slot: asyncio.Future[bool]) -> None:
        with contextlib.suppress(ValueError):  # already handed on
            self._waiters.remove(slot)  # O(queued), only ever under overload

    def _release(self) -> None:
        # The slot goes straight to the oldest waiter, so in_flight never dips below capacity while requests wait
        # (a newcomer cannot overtake them).
        while self._waiters:
            slot = self._waiters.popleft()
            if not slot.done():
                slot.set_result(True)
                return
        self.in_flight -= 1

    def _note_refusal(self) -> None:
        self._refused_since_warning += 1
        now = time.monotonic()
        if now - self._warned_at >= WARN_EVERY_SECONDS:
            log.warning(
                "overloaded: refused %d requests with 503 (%d in flight, %d waiting)",
                self._refused_since_warning,
                self.in_flight,
                len(self._waiters),
            )
            self._refused_since_warning = 0
            self._warned_at = now

"""How fast one source's requests may leave (issue 15): kbms's own ceiling, and the provider's advertised budget.

The provider tells its budget in each response's headers (Intercom: ``X-RateLimit-Limit``/``-Remaining``/``-Reset``,
per 10-second window), or only when it is exceeded (Zendesk: 429 and ``Retry-After``). A provider's client reads
its headers into a ``Budget`` (a ``BudgetReader``); the ``Pacer`` spreads the requests that are left over what is
left of the window, so that the budget is used without a burst that trips it, and holds every request after a 429
until the provider's reset. All waiting goes through ``Timing``, so tests on a virtual clock are exact and instant.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import httpx2

from kbms.providers.pull import ClientStats, Timing

CEILING_WINDOW = 60.0  # max_requests_per_minute counts the requests of any 60 seconds
# How far the provider's clock (its Date header, to the second) may differ from ours before its absolute resets
# are shifted to our clock: less than that is the header's own rounding, and shifting by it would waste up to a
# second of a 10-second window.
CLOCK_TOLERANCE = 2.0
SAME_WINDOW = 1.0  # two budgets whose resets are this close describe the same window (a skew shift can move it)


@dataclass(frozen=True, slots=True)
class Budget:
    """A response's word on the provider's rate limit: ``remaining`` requests of ``limit`` until ``reset_at``
    (seconds since the epoch on the client's clock, ``Timing.now``); None where the response does not say."""

    limit: int | None
    remaining: int
    reset_at: float | None


BudgetReader = Callable[[httpx2.Response, float], "Budget | None"]
"""Reads a response (and the client's ``now``) into a ``Budget``; None when the response says nothing of it."""


def no_budget(response: httpx2.Response, now: float) -> Budget | None:
    """For a provider that tells its limit only by a 429 (then ``retry_after`` reads when to come back)."""
    return None


def clock_offset(response: httpx2.Response, now: float) -> float:
    """How far the provider's clock is ahead of ours, from its ``Date`` header; 0 within ``CLOCK_TOLERANCE``."""
    value = response.headers.get("date")
    if value is None:
        return 0.0
    try:
        offset = email.utils.parsedate_to_datetime(value).timestamp() - now
    except (TypeError, ValueError):
        return 0.0
    return offset if abs(offset) > CLOCK_TOLERANCE else 0.0


class ServerClock:
    """How far the provider's clock is ahead of ours, learnt from its ``Date`` headers, to read its absolute resets
    on our clock. A ``Date`` is the provider's time floored to the second (and stamped before the answer travelled),
    so each answer's ``Date - now`` is up to a second below the truth: the highest of the last ``keep`` is nearest
    to it, and never above it (a reset read late is waited out a little long, never tripped). Only recent answers
    count, so a clock that steps back is followed."""

    def __init__(self, keep: int = 64) -> None:
        self._samples: deque[float] = deque(maxlen=keep)

    def offset(self, response: httpx2.Response, now: float) -> float:
        value = response.headers.get("date")
        if value is not None:
            with contextlib.suppress(TypeError, ValueError):
                self._samples.append(email.utils.parsedate_to_datetime(value).timestamp() - now)
        return max(self._samples, default=0.0)


def retry_after(response: httpx2.Response, now: float) -> float | None:
    """The seconds a response's ``Retry-After`` asks to wait (given in seconds or as an HTTP date); None without."""
    value = response.headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - clock_offset(response, now) - now)
    except (TypeError, ValueError):
        return None


class Pacer:
    """When each request of one source may leave: never more than ``max_per_minute`` in any 60 seconds (kbms's own
    ceiling, well under the provider's; spaced by ``60 / max_per_minute`` at least), within the provider's budget,
    and never before a 429's reset.

    Requests take their turn one after another (a lock), so concurrent requests of a source share one pacer and
    are spaced, not burst. The budget is counted down as requests leave and corrected by every answer: the
    provider's ``remaining`` cannot know of the requests still in flight, so the lower of the two is kept."""

    def __init__(self, *, max_per_minute: int, timing: Timing, stats: ClientStats, margin: float = 0.05) -> None:
        if max_per_minute < 1:
            raise ValueError("max_per_minute must be at least 1")
        self.max_per_minute = max_per_minute
        self._timing = timing
        self._stats = stats
        self._margin = margin  # past a reset before asking again: the provider's window turns on its own clock
        self._sent: deque[float] = deque()  # when each request of the last 60 seconds left
        self._last: float | None = None  # when the last request left
        self._limit: int | None = None
        self._remaining: int | None = None  # what is left of the window, counted down as requests leave
        self._reset_at: float | None = None  # the end of the current window, as last told
        self._latest_reset = float("-inf")  # the latest window told of: answers of earlier windows are stale
        self._hold_until = 0.0  # after a 429, nothing leaves before
        self._lock = asyncio.Lock()

    async def acquire(self, *others: Pacer) -> None:
        """Wait until a request may leave, and count it as gone. With ``others`` (an endpoint's own limit on top of
        the source's: Zendesk's export allows 10 a minute), first until each of them lets it leave, holding their
        locks (no other request of theirs leaves meanwhile, and waiting only widens their windows), then as alone;
        counted in each when it leaves. The source's lock is not held while an endpoint's window is waited for:
        the source's other requests go on."""
        async with contextlib.AsyncExitStack() as locks:
            for other in others:
                await locks.enter_async_context(other._lock)
            while (wait := max((other._wait(self._timing.now()) for other in others), default=0.0)) > 0:
                self._stats.waited_seconds += wait
                await self._timing.sleep(wait)
            async with self._lock:
                while (wait := self._wait(self._timing.now())) > 0:
                    self._stats.waited_seconds += wait
                    await self._timing.sleep(wait)
                now = self._timing.now()
                for pacer in (self, *others):
                    pacer._count(now)

    def _count(self, now: float) -> None:
        self._sent.append(now)
        self._last = now
        if self._remaining is not None:
            self._remaining -= 1

    def learn(self, budget: Budget | None) -> None:
        """What an answer said of the budget."""
        if budget is None:
            return
        self._limit = budget.limit
        if budget.reset_at is None:
            self._remaining = budget.remaining
            return
        if budget.reset_at < self._latest_reset - SAME_WINDOW:
            return  # an answer from an earlier window, arriving late
        # The same window, or the one the pacer assumed refilled when the last one ended (its count of what left
        # since then includes requests still in flight, which this answer cannot know of): keep the lower count.
        same = self._reset_at is None or abs(budget.reset_at - self._reset_at) <= SAME_WINDOW
        if same and self._remaining is not None:
            self._remaining = min(self._remaining, budget.remaining)
        else:
            self._remaining = budget.remaining
        self._reset_at = budget.reset_at
        self._latest_reset = max(self._latest_reset, budget.reset_at)

    def hold(self, until: float) -> None:
        """Nothing leaves before ``until`` (a 429's reset or ``Retry-After``)."""
        self._stats.rate_limit_waits += 1
        self._hold_until = max(self._hold_until, until)

    def _wait(self, now: float) -> float:
        waits = [self._hold_until - now]
        while self._sent and self._sent[0] <= now - CEILING_WINDOW:
            self._sent.popleft()
        if len(self._sent) >= self.max_per_minute:
            waits.append(self._sent[0] + CEILING_WINDOW - now)
        if self._last is not None:
            # At the ceiling's pace at most, so that a generous budget does not make a burst and then a pause.
            waits.append(self._last + CEILING_WINDOW / self.max_per_minute - now)
        if self._reset_at is not None and now >= self._reset_at:
            # The window is over: the provider has refilled it; the next answer tells the new one.
            self._remaining, self._reset_at = self._limit, None
        if self._remaining is not None and self._remaining <= 0:
            if self._reset_at is None:
                self._remaining = None  # spent, and no word of when it refills: let the provider's 429 say
            else:
                if self._hold_until < self._reset_at + self._margin:
                    self._stats.rate_limit_waits += 1
                    self._hold_until = self._reset_at + self._margin
                waits.append(self._hold_until - now)
        elif self._remaining is not None and self._reset_at is not None and self._last is not None:
            # Spread what is left evenly over what is left of the window: the k-th of r requests at 1/(r+1) of the
            # way each time leaves the last one just before the reset.
            waits.append(self._last + (self._reset_at - self._last) / (self._remaining + 1) - now)
        return max(waits)

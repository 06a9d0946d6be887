"""A virtual clock for pacing tests: ``sleep`` advances it at once, so a client that paces itself to a provider's
rate limit does so exactly, and a test of a minute of traffic takes no time. Give the same clock to the client
(``kbms.providers.pull.Timing``) and to the fake provider that counts its windows."""

from __future__ import annotations

import asyncio

from kbms.providers.pull import Timing


class VirtualClock:
    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self.time = start
        self.slept: list[float] = []  # every wait asked for, in order

    def now(self) -> float:
        return self.time

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.time += max(0.0, seconds)
        await asyncio.sleep(0)  # still a checkpoint: other tasks run, as they would while waiting

    def advance(self, seconds: float) -> None:
        self.time += seconds

    @property
    def timing(self) -> Timing:
        return Timing(now=self.now, sleep=self.sleep)

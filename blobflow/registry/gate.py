"""Politeness per host: a request rate cap, and a pause of the whole host after 429 or 503.

A registry that says "too many requests" means the host, not the one request: every request to
that host waits out ``Retry-After`` (or, without one, a pause that doubles while the throttling
goes on, from 0.5 s up to 30 s), and the pause ends at the first answer that is not a throttle.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

__all__ = ["HostGate"]

_FIRST_PAUSE = 0.5
_MAX_PAUSE = 30.0


class HostGate:
    def __init__(self, rate: float | None = None, *, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        self.rate = rate if rate and rate > 0 else None
        self._clock, self._sleep = clock, sleep
        self._next_slot = 0.0       # rate cap: the earliest time the next request may start
        self._paused_until = 0.0
        self._pause = 0.0           # the pause a throttle without Retry-After adds; doubles
        self.throttles = 0

    def delay(self) -> float:
        """How long a request starting now must wait, and take its slot (pure but for the clock)."""
        now = self._clock()
        start = max(now, self._paused_until)
        if self.rate is not None:
            start = max(start, self._next_slot)
            self._next_slot = start + 1.0 / self.rate
        return start - now

    async def enter(self) -> None:
        wait = self.delay()
        if wait > 0:
            await self._sleep(wait)
        # a pause set while we slept holds us too
        while (left := self._paused_until - self._clock()) > 0:
            await self._sleep(left)

    def throttled(self, retry_after: float | None) -> float:
        """A 429 or 503 came back: pause the host. Returns the pause."""
        self.throttles += 1
        if retry_after is not None:
            pause = min(retry_after, _MAX_PAUSE * 4)
        else:
            self._pause = min(_MAX_PAUSE, self._pause * 2 if self._pause else _FIRST_PAUSE)
            pause = self._pause
        self._paused_until = max(self._paused_until, self._clock() + pause)
        return pause

    def ok(self) -> None:
        self._pause = 0.0

"""The one retry layer: around whole blob operations, never nested inside them."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from typing import TypeVar

from .errors import BlobflowError
from .progress import Event, Listener

__all__ = ["backoff_delay", "with_retries"]

T = TypeVar("T")


def backoff_delay(attempt: int, *, base: float, cap: float, retry_after: float | None = None,
                  rand: Callable[[], float] = random.random) -> float:
    """Exponential backoff with full jitter; a registry's ``Retry-After`` is a floor."""
    delay: float = rand() * min(cap, base * (2.0 ** attempt))
    if retry_after is not None:
        delay = max(delay, min(retry_after, cap * 6))
    return delay


MAX_ATTEMPTS_FACTOR = 10


async def with_retries(attempt: Callable[[], Awaitable[T]], *, retries: int, base: float, cap: float,
                       emit: Listener, what: str, digest: str = "",
                       progress: Callable[[], int] | None = None) -> T:
    """Run ``attempt`` until it succeeds, fails with a non-retryable error, or retries run out.

    ``retries`` counts failures in a row without progress: an attempt that moved bytes before it
    failed (``progress()`` grew) resets the count, so a long transfer over a flaky link is not
    given up while it advances. The total is still capped at ``(retries + 1) * 10`` attempts.
    """
    n = total = 0
    seen = progress() if progress else 0
    while True:
        try:
            return await attempt()
        except BlobflowError as e:
            total += 1
            if progress is not None and (now := progress()) > seen:
                seen, n = now, 0
            if not e.retryable or n >= retries or total >= (retries + 1) * MAX_ATTEMPTS_FACTOR:
                raise
            delay = backoff_delay(n, base=base, cap=cap, retry_after=getattr(e, "retry_after", None))
            emit(Event("retry", digest, target=what, detail=str(e), delay=delay))
            n += 1
            await asyncio.sleep(delay)

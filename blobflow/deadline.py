"""Deadline tracking against registry upload windows.

The engine talks to this module through two calls only, so the policy can grow here without
touching the transfer code:

- ``ticket = await tracker.admit(registry, digest, size)`` before an upload session is created
  (waits while admitting it would make a running upload miss its window), and
  ``tracker.release(ticket)`` when the blob is done or failed;
- ``ticket.session_started()`` right after the POST that opens a session (the window starts),
  ``await ticket.pace(n)`` before sending ``n`` more bytes (may wait to give bandwidth to the
  upload closest to its deadline, or raise :class:`DeadlineError` when the upload cannot finish
  in time), and ``ticket.chunk_limit`` for registries whose window applies per request.

This first version admits everything and never waits: it is the seam, not the policy.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from .config import EngineConfig
from .progress import Listener
from .types import Digest

__all__ = ["DeadlineTracker", "UploadTicket"]


@dataclass(eq=False)
class UploadTicket:
    registry: str
    digest: Digest
    size: int
    window: float | None
    clock: Callable[[], float] = field(default=time.monotonic, repr=False)
    started: float | None = None
    sent: int = 0

    def session_started(self) -> None:
        self.started = self.clock()
        self.sent = 0

    async def pace(self, n: int) -> None:
        self.sent += n

    @property
    def chunk_limit(self) -> int | None:
        return None


class DeadlineTracker:
    def __init__(self, config: EngineConfig, *, emit: Listener | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.emit = emit
        self.clock = clock

    async def admit(self, registry: str, digest: Digest, size: int) -> UploadTicket:
        window = self.config.limits(registry).upload_window
        return UploadTicket(registry, digest, size, window, self.clock)

    def release(self, ticket: UploadTicket) -> None:
        pass

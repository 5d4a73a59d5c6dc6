"""Streaming sha256: parts may arrive in any order, the hash always sees bytes in order."""

from __future__ import annotations

import asyncio
import heapq
from collections.abc import Callable

from .errors import DigestMismatchError
from .types import Digest

__all__ = ["InOrderHasher"]

_READ_BACK = 8 * 1024 * 1024


class InOrderHasher:
    """Hashes a blob written at offsets, in offset order.

    Callers write bytes to storage first, then call :meth:`add`. Bytes that arrive exactly at the
    hashed frontier are hashed from the buffer; bytes that arrive ahead of it are remembered as a
    range and read back (``read_at``) once the frontier reaches them: the reorder buffer is the
    file, so memory does not grow with the blob.
    """

    def __init__(self, digest: Digest, size: int, read_at: Callable[[int, int], bytes]) -> None:
        self.digest = digest
        self.size = size
        self._read_at = read_at
        self._h = digest.hasher()
        self._frontier = 0
        self._ahead: list[tuple[int, int]] = []
        self._busy = False

    @property
    def frontier(self) -> int:
        return self._frontier

    async def add(self, offset: int, data: bytes) -> None:
        end = offset + len(data)
        if end > self.size:
            raise DigestMismatchError(f"blob {self.digest.short}: more bytes than its size {self.size}")
        if self._busy or offset != self._frontier:
            heapq.heappush(self._ahead, (offset, end))
            if not self._busy:
                await self._drain()
            return
        # in the loop's thread: hashlib lets go of the GIL for large buffers anyway, and a
        # worker-thread hop per chunk cost more than the loop waiting the ~0.7 ms a MiB takes
        self._h.update(data)
        self._frontier = end
        await self._drain()

    async def put(self, offset: int, data: bytes, write_at: Callable[[int, bytes], None]) -> None:
        """Write ``data`` at ``offset`` with ``write_at`` and hash it: one worker-thread hop for both
        when the bytes are at the frontier (the common case), else write now and hash on read-back."""
        end = offset + len(data)
        if end > self.size:
            raise DigestMismatchError(f"blob {self.digest.short}: more bytes than its size {self.size}")
        if self._busy or offset != self._frontier:
            await asyncio.to_thread(write_at, offset, data)
            heapq.heappush(self._ahead, (offset, end))
        else:
            self._busy = True
            try:
                await asyncio.to_thread(self._write_and_hash, write_at, offset, data)
                self._frontier = end
            finally:
                self._busy = False
        await self._drain()

    def _write_and_hash(self, write_at: Callable[[int, bytes], None], offset: int, data: bytes) -> None:
        write_at(offset, data)
        self._h.update(data)

    async def _drain(self) -> None:
        if self._busy:
            return
        self._busy = True
        try:
            while self._ahead and self._ahead[0][0] <= self._frontier:
                _, end = heapq.heappop(self._ahead)
                while self._frontier < end:
                    n = min(_READ_BACK, end - self._frontier)
                    await asyncio.to_thread(self._read_back, self._frontier, n)
                    self._frontier += n
        finally:
            self._busy = False

    def _read_back(self, offset: int, n: int) -> None:
        data = self._read_at(offset, n)
        if len(data) != n:
            raise DigestMismatchError(f"blob {self.digest.short}: short read-back at {offset}")
        self._h.update(data)

    def mark_written(self, start: int, end: int) -> None:
        """Bytes ``[start, end)`` are already in storage (a resumed download): hash them on read-back."""
        heapq.heappush(self._ahead, (start, end))

    def rewind(self) -> None:
        """Start over (the server ignored a Range and sent the blob from byte 0)."""
        self._h = self.digest.hasher()
        self._frontier = 0
        self._ahead.clear()

    async def verify(self) -> Digest:
        """Finish: every byte hashed, and the digest matches. Raises :class:`DigestMismatchError`."""
        await self._drain()
        if self._frontier != self.size:
            raise DigestMismatchError(
                f"blob {self.digest.short}: got {self._frontier} contiguous bytes of {self.size}")
        actual = Digest(self.digest.algorithm, self._h.hexdigest())
        if actual != self.digest:
            raise DigestMismatchError(f"blob {self.digest.short}: bytes received have digest {actual.short}")
        return actual

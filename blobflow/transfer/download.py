"""Registry -> local file: parallel byte ranges written at their offsets, hashed in order.

A :class:`Download` keeps what it has across attempts and across runs: a retry fetches only the
ranges that are not complete yet (``Range`` from the last byte written); the ranges written are
journalled with an xxh3 each, so a later run re-checks them on disk and fetches only the rest.
The blob is committed (fsync, rename) only when the in-order sha256 and the size match.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import xxhash

from ..errors import DigestMismatchError, TransferError
from ..journal import range_checksum
from ..plan import ByteRange, missing_ranges, split_ranges
from ..progress import Event
from ..registry import BlobStream
from ..types import Descriptor
from ..verify import InOrderHasher
from .base import Context
from .ends import LocalEnd, RegistryEnd

__all__ = ["Download"]

# journal the ranges at least this often (bytes, seconds): what a kill can cost at most
_JOURNAL_BYTES = 16 * 1024 * 1024
_JOURNAL_SECONDS = 0.5


class Download:
    def __init__(self, ctx: Context, src: RegistryEnd, dst: LocalEnd, desc: Descriptor) -> None:
        self.ctx, self.src, self.dst, self.desc = ctx, src, dst, desc
        self.writer = dst.blob_writer(desc)
        self.hasher = InOrderHasher(desc.digest, desc.size, self.writer.read_at)
        self.done: dict[ByteRange, str] = {}           # complete ranges and their xxh3
        self._active: dict[int, tuple[int, Any]] = {}  # part start -> (bytes so far, running xxh3)
        self._ranged = True
        self._unsaved = 0
        self._saved_at = time.monotonic()
        self.record = (ctx.journal.download(self.writer.final, desc.digest, desc.size, self.writer.temp)
                       if self.writer.resumable else None)
        self._resume_checked = self.record is None

    async def run(self) -> None:
        if not self._resume_checked:
            await self._resume()
        cfg = self.ctx.config
        todo = missing_ranges(self.desc.size, list(self.done))
        if todo and self._ranged:
            parts: list[ByteRange] = []
            if self.desc.size >= cfg.range_threshold:
                for r in todo:
                    parts += split_ranges(r.end, cfg.part_size, start=r.start)
            else:
                parts = todo
            stream = await self.src.client.get_blob(self.src.repository, self.desc.digest,
                                                    start=parts[0].start, end=parts[0].end - 1)
            async with stream:
                if stream.status == 200 and (parts[0].start or parts[0].end != self.desc.size):
                    # the server ignored Range: take the whole body from byte 0 on one stream
                    self._ranged = False
                    self._restart()
                    self.ctx.emit(Event("info", self.desc.digest.short, detail=(
                        f"{self.src.client.registry} ignored Range; downloading "
                        f"{self.desc.digest.short} on one stream")))
                    await self._consume(stream, ByteRange(0, self.desc.size))
                    return await self._finish()
                if stream.start != parts[0].start:
                    raise TransferError(f"{stream.what}: registry answered range from {stream.start}, "
                                        f"asked {parts[0].start}")
                first_part = self._consume(stream, parts[0])
                if len(parts) == 1:
                    await first_part
                else:
                    factories: list[Callable[[], Awaitable[None]]] = [lambda: first_part]
                    factories += [self._part_factory(p) for p in parts[1:]]
                    await self.ctx.scheduler.parallel(factories, limit=cfg.parts_per_blob, cancel_on_error=False)
        elif todo:
            async with await self.src.client.get_blob(self.src.repository, self.desc.digest) as stream:
                self._restart()
                await self._consume(stream, ByteRange(0, self.desc.size))
        await self._finish()

    async def _resume(self) -> None:
        """Trust journalled ranges only after their xxh3 matches the bytes on disk."""
        self._resume_checked = True
        record = self.record
        assert record is not None
        if record.warning:
            self.ctx.emit(Event("info", self.desc.digest.short, detail=record.warning))
        if not self.writer.reused or not record.ranges:
            return
        good = 0
        for start, end, checksum in record.ranges:
            actual = await asyncio.to_thread(range_checksum, self.writer.read_at, start, end)
            if actual == checksum:
                self.done[ByteRange(start, end)] = checksum
                self.hasher.mark_written(start, end)
                good += end - start
        self.ctx.emit(Event("info", self.desc.digest.short, n=good, detail=(
            f"resuming {self.desc.digest.short}: {good:,} of {self.desc.size:,} bytes on disk verified "
            f"({len(self.done)} of {len(record.ranges)} ranges)")))

    @property
    def progress(self) -> int:
        """Bytes known good so far (grows as the transfer advances)."""
        return sum(r.length for r in self.done) + sum(pos - s for s, (pos, _) in self._active.items())

    def _restart(self) -> None:
        self.done.clear()
        self._active.clear()
        self.hasher.rewind()

    def _part_factory(self, part: ByteRange) -> Callable[[], Awaitable[None]]:
        async def fetch() -> None:
            stream = await self.src.client.get_blob(self.src.repository, self.desc.digest,
                                                    start=part.start, end=part.end - 1)
            async with stream:
                if stream.status != 206 or stream.start != part.start:
                    raise TransferError(f"{stream.what}: registry did not honour Range {part.start}-")
                await self._consume(stream, part)
        return fetch

    async def _consume(self, stream: BlobStream, part: ByteRange) -> None:
        pos = part.start
        xh = xxhash.xxh3_64()
        digest = self.desc.digest.short
        try:
            async for chunk in stream.chunks(self.ctx.config.read_size):
                if pos + len(chunk) > part.end:
                    raise DigestMismatchError(f"{stream.what}: more bytes than the descriptor's size "
                                              f"{self.desc.size}")
                await self.hasher.put(pos, chunk, self.writer.write_at)
                xh.update(chunk)
                pos += len(chunk)
                self._active[part.start] = (pos, xh)
                self.ctx.emit(Event("bytes", digest, n=len(chunk)))
                self._unsaved += len(chunk)
                if self._unsaved >= _JOURNAL_BYTES or time.monotonic() - self._saved_at >= _JOURNAL_SECONDS:
                    self._save()
        finally:
            self._active.pop(part.start, None)
            if pos > part.start:
                self.done[ByteRange(part.start, pos)] = xh.hexdigest()
            self._save()
        if pos != part.end:
            raise TransferError(f"{stream.what}: body ended at byte {pos}, expected {part.end}", retryable=True)

    def _save(self) -> None:
        self._unsaved = 0
        self._saved_at = time.monotonic()
        if self.record is None:
            return
        ranges = [(r.start, r.end, x) for r, x in self.done.items()]
        ranges += [(start, pos, xh.hexdigest()) for start, (pos, xh) in self._active.items() if pos > start]
        self.record.ranges = sorted(ranges)
        if not self.record.save():  # the state dir keeps nothing: a partial file would be found without it
            self.record = None

    async def _finish(self) -> None:
        try:
            verified = await self.hasher.verify()
        except DigestMismatchError as e:
            # nothing is committed; which part was bad is unknown, so the next attempt starts over
            self._restart()
            if self.record is not None:
                self.record.discard()
            raise DigestMismatchError(str(e), retryable=True) from None
        await asyncio.to_thread(self.writer.commit, verified)
        if self.record is not None:
            self.record.discard()

    def close(self) -> None:
        """Release the file. A partial file stays for the next run only when a record describes it."""
        self.writer.abort(keep=self.record is not None and bool(self.done) and not self.writer.committed)

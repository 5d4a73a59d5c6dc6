"""Registry -> local file: parallel byte ranges written at their offsets, hashed in order.

A :class:`Download` keeps what it has across attempts: a retry fetches only the ranges that are
not complete yet (``Range`` from the last byte written), and the blob is committed (fsync, rename)
only when the in-order sha256 and the size match.
"""

from __future__ import annotations

import asyncio

from ..errors import DigestMismatchError, TransferError
from ..plan import ByteRange, missing_ranges, split_ranges
from ..progress import Event
from ..types import Descriptor
from ..verify import InOrderHasher
from .base import Context
from .ends import LocalEnd, RegistryEnd

__all__ = ["Download"]


class Download:
    def __init__(self, ctx: Context, src: RegistryEnd, dst: LocalEnd, desc: Descriptor) -> None:
        self.ctx, self.src, self.dst, self.desc = ctx, src, dst, desc
        self.writer = dst.blob_writer(desc)
        self.hasher = InOrderHasher(desc.digest, desc.size, self.writer.read_at)
        self.done: list[ByteRange] = []
        self._ranged = True

    async def run(self) -> None:
        cfg = self.ctx.config
        todo = missing_ranges(self.desc.size, self.done)
        if todo and self._ranged:
            first, rest = todo[0], todo[1:]
            parts: list[ByteRange] = []
            if self.desc.size >= cfg.range_threshold:
                parts = split_ranges(first.end, cfg.part_size, start=first.start)
                for r in rest:
                    parts += split_ranges(r.end, cfg.part_size, start=r.start)
            else:
                parts = todo
            stream = await self.src.client.get_blob(self.src.repository, self.desc.digest,
                                                    start=parts[0].start, end=parts[0].end - 1)
            async with stream:
                if stream.status == 200 and (parts[0].start or parts[0].end != self.desc.size):
                    # the server ignored Range: take the whole body from byte 0 on one stream
                    self._ranged = False
                    self.done.clear()
                    self.hasher.rewind()
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
                    others = [self._part_factory(p) for p in parts[1:]]
                    await self.ctx.scheduler.parallel(
                        [lambda: first_part, *others], limit=cfg.parts_per_blob)
        elif todo:
            async with await self.src.client.get_blob(self.src.repository, self.desc.digest) as stream:
                self.done.clear()
                self.hasher.rewind()
                await self._consume(stream, ByteRange(0, self.desc.size))
        await self._finish()

    def _part_factory(self, part: ByteRange):  # type: ignore[no-untyped-def]
        async def fetch() -> None:
            stream = await self.src.client.get_blob(self.src.repository, self.desc.digest,
                                                    start=part.start, end=part.end - 1)
            async with stream:
                if stream.status != 206 or stream.start != part.start:
                    raise TransferError(f"{stream.what}: registry did not honour Range {part.start}-")
                await self._consume(stream, part)
        return fetch

    async def _consume(self, stream, part: ByteRange) -> None:  # type: ignore[no-untyped-def]
        pos = part.start
        digest = self.desc.digest.short
        try:
            async for chunk in stream.chunks(self.ctx.config.read_size):
                if pos + len(chunk) > part.end:
                    raise DigestMismatchError(f"{stream.what}: more bytes than the descriptor's size "
                                              f"{self.desc.size}")
                await self.hasher.put(pos, chunk, self.writer.write_at)
                pos += len(chunk)
                self.ctx.emit(Event("bytes", digest, n=len(chunk)))
        finally:
            if pos > part.start:
                self.done.append(ByteRange(part.start, pos))
        if pos != part.end:
            raise TransferError(f"{stream.what}: body ended at byte {pos}, expected {part.end}", retryable=True)

    async def _finish(self) -> None:
        try:
            verified = await self.hasher.verify()
        except DigestMismatchError as e:
            # nothing is committed; which part was bad is unknown, so the next attempt starts over
            self.done.clear()
            self.hasher.rewind()
            raise DigestMismatchError(str(e), retryable=True) from None
        await asyncio.to_thread(self.writer.commit, verified)

    def close(self) -> None:
        self.writer.abort()

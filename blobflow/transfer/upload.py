"""Bytes -> registry: monolithic PUT, one streamed PATCH, or chunked PATCHes, hashed as they go out.

The bytes come from an *opener*: ``opener(offset)`` yields the blob from ``offset`` on (a file,
or another registry for a copy). A :class:`Push` keeps its upload session across attempts: after
a failure it asks the registry for the offset it has and continues from there; the final PUT,
which carries the digest, is sent only when the sha256 of every byte sent matches.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from ..deadline import UploadTicket
from ..errors import BlobflowError, DigestMismatchError, NotFoundError, RegistryError, TransferError
from ..plan import Strategy, choose_upload
from ..progress import Event
from ..registry import Upload
from ..types import Descriptor
from ..verify import update_hash
from .base import Context
from .ends import RegistryEnd

__all__ = ["Opener", "Push", "file_opener"]

Opener = Callable[[int], AsyncIterator[bytes]]
_SESSION_LOST = frozenset({"BLOB_UPLOAD_UNKNOWN", "BLOB_UPLOAD_INVALID"})


def file_opener(path: Path, read_size: int) -> Opener:
    async def chunks(offset: int) -> AsyncIterator[bytes]:
        fd = await asyncio.to_thread(os.open, path, os.O_RDONLY)
        try:
            while True:
                data = await asyncio.to_thread(os.pread, fd, read_size, offset)
                if not data:
                    return
                offset += len(data)
                yield data
        finally:
            os.close(fd)
    return chunks


class Push:
    def __init__(self, ctx: Context, dst: RegistryEnd, desc: Descriptor, opener: Opener) -> None:
        self.ctx, self.dst, self.desc, self.opener = ctx, dst, desc, opener
        self.limits = ctx.config.limits(dst.client.registry)
        self.session: Upload | None = None
        self.ticket: UploadTicket | None = None
        # hash state at read boundaries, so a resume from the registry's offset keeps one sha256
        self.snapshots: dict[int, Any] = {}

    async def run(self) -> None:
        client, desc = self.dst.client, self.desc
        if self.session is not None:
            try:
                await client.upload_status(self.session)
            except RegistryError as e:
                if not isinstance(e, NotFoundError) and e.code not in _SESSION_LOST:
                    raise
                self.session = None  # the session is gone: start a new one
        if self.ticket is None:
            assert self.ctx.deadlines is not None
            self.ticket = await self.ctx.deadlines.admit(self.dst.client.registry, desc.digest, desc.size)
        if self.session is None:
            self.session = await client.start_upload(self.dst.repository)
            self.ticket.session_started()
            self.snapshots = {0: desc.digest.hasher()}
        up = self.session
        chunk_size = self.ctx.config.chunk_size
        if self.ticket.chunk_limit is not None:
            chunk_size = min(chunk_size or self.ticket.chunk_limit, self.ticket.chunk_limit)
        plan = choose_upload(desc.size, self.limits, chunk_size=chunk_size,
                             monolithic_threshold=self.ctx.config.monolithic_threshold,
                             min_chunk=up.min_chunk)
        out = _Outgoing(self, up.offset)
        try:
            if plan.strategy is Strategy.MONOLITHIC and up.offset == 0:
                body = b"".join([c async for c in out.body(desc.size)])
                out.check()
                await client.finish_upload(up, desc.digest, body)
            elif plan.strategy is Strategy.CHUNKED:
                while up.offset < desc.size:
                    n = min(plan.chunk_size, desc.size - up.offset)
                    await client.upload_chunk(up, out.body(n), n)
                out.check()
                await client.finish_upload(up, desc.digest)
            else:
                if desc.size > up.offset:
                    await client.upload_chunk(up, out.body(desc.size - up.offset), desc.size - up.offset,
                                              content_range=False)
                out.check()
                await client.finish_upload(up, desc.digest)
        except DigestMismatchError:
            with contextlib.suppress(BlobflowError):
                await client.cancel_upload(up)
            self.session = None
            raise
        except RegistryError as e:
            if e.code not in _SESSION_LOST:
                raise
            # Distribution forgets a session whose PATCH was cut ("upload resumed at wrong
            # offset"): start a new session on the next attempt
            self.session = None
            raise TransferError(f"{e}; starting a new upload session", retryable=True) from None
        finally:
            await out.aclose()
        self.session = None

    def close(self) -> None:
        self.snapshots.clear()
        if self.ticket is not None and self.ctx.deadlines is not None:
            self.ctx.deadlines.release(self.ticket)
            self.ticket = None


class _Outgoing:
    """The blob's bytes from ``offset`` on, hashed in order as they are read from the source.

    Resuming at an offset the registry confirmed, it starts from the last hash snapshot at or
    before that offset and hashes (without sending) the bytes in between.
    """

    def __init__(self, push: Push, offset: int) -> None:
        self.push = push
        at = max((o for o in push.snapshots if o <= offset), default=0)
        self.h = (push.snapshots.get(at) or push.desc.digest.hasher()).copy()
        push.snapshots = {o: s for o, s in push.snapshots.items() if o >= at}
        self.read_pos = at
        self.sent = at
        self.skip = offset - at
        self.chunks = push.opener(at)
        self.tail = b""

    async def _next(self) -> bytes | None:
        if self.tail:
            chunk, self.tail = self.tail, b""
            return chunk
        size, digest = self.push.desc.size, self.push.desc.digest.short
        while True:
            try:
                chunk = await anext(self.chunks)
            except StopAsyncIteration:
                return None
            if self.read_pos + len(chunk) > size:
                raise DigestMismatchError(f"blob {digest}: source has more bytes than its size {size}",
                                          retryable=True)
            await update_hash(self.h, chunk)
            self.read_pos += len(chunk)
            self.push.snapshots[self.read_pos] = self.h.copy()
            if self.skip:
                drop = min(self.skip, len(chunk))
                self.skip -= drop
                self.sent += drop
                chunk = chunk[drop:]
            if chunk:
                return chunk

    async def body(self, n: int) -> AsyncIterator[bytes]:
        """The next ``n`` bytes (fewer if the source ends early)."""
        digest = self.push.desc.digest.short
        while n > 0:
            chunk = await self._next()
            if chunk is None:
                return
            if len(chunk) > n:
                chunk, self.tail = chunk[:n], chunk[n:]
            if self.push.ticket is not None:
                await self.push.ticket.pace(len(chunk))
            n -= len(chunk)
            self.sent += len(chunk)
            self.push.ctx.emit(Event("bytes", digest, n=len(chunk)))
            yield chunk

    def check(self) -> None:
        desc = self.push.desc
        if self.sent != desc.size or self.read_pos != desc.size:
            raise TransferError(f"blob {desc.digest.short}: source ended after {self.read_pos} of "
                                f"{desc.size} bytes", retryable=True)
        if self.h.hexdigest() != desc.digest.hex:
            raise DigestMismatchError(
                f"blob {desc.digest.short}: source bytes do not match the digest; not committed",
                retryable=True)

    async def aclose(self) -> None:
        await self.chunks.aclose()  # type: ignore[attr-defined]

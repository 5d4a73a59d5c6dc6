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
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from ..config import RegistryLimits
from ..deadline import UploadTicket
from ..errors import BlobflowError, DigestMismatchError, NotFoundError, RegistryError, TransferError
from ..layout import name_os_errors
from ..plan import Strategy, UploadPlan, choose_upload, refused_body_limit
from ..progress import Event
from ..registry import Upload
from ..retry import MAX_ATTEMPTS_FACTOR, backoff_delay
from ..types import Descriptor
from .base import Context
from .ends import RegistryEnd

__all__ = ["Opener", "Push", "file_opener"]

Opener = Callable[[int], AsyncIterator[bytes]]
_SESSION_LOST = frozenset({"BLOB_UPLOAD_UNKNOWN", "BLOB_UPLOAD_INVALID"})
_MIN_LEARNED = 64 * 1024  # a registry refusing bodies smaller than this is refusing something else


def file_opener(path: Path, read_size: int) -> Opener:
    async def chunks(offset: int) -> AsyncIterator[bytes]:
        fd = await asyncio.to_thread(os.open, path, os.O_RDONLY)
        try:
            while True:
                with name_os_errors(path):
                    data = await asyncio.to_thread(os.pread, fd, read_size, offset)
                if not data:
                    return
                offset += len(data)
                yield data
        finally:
            os.close(fd)
    return chunks


class Push:
    def __init__(self, ctx: Context, dst: RegistryEnd, desc: Descriptor, opener: Opener, *,
                 local: bool = False, session: Upload | None = None) -> None:
        """``local``: the bytes come from a file, so a digest mismatch means the file is corrupt
        (retrying cannot help); from another registry, a mismatch may be a transient corruption.
        ``session``: one the registry opened already (declining a mount), used for this upload
        unless a session of an earlier run goes on instead."""
        self.ctx, self.dst, self.desc, self.opener = ctx, dst, desc, opener
        self.local = local
        self.offered = session
        self.session: Upload | None = None
        self.ticket: UploadTicket | None = None
        self._sent_total = 0  # bytes sent, over every attempt
        # the furthest byte of the blob any attempt sent: what progress (``bytes`` events, the
        # job's byte count and rate) counts, so an attempt sending bytes again does not count them twice
        self.reported = 0
        self._moved = 0  # of those, the ones sent by attempts that a flaky link ended (see progress)
        # a blob that goes in one PUT has nothing to resume (if a cap learned later makes it go in
        # chunks after all, those are not resumable by a later run: a few MiB at most)
        self.record = ctx.journal.upload(dst.client.registry, dst.repository, desc.digest, desc.size,
                                         resumable=desc.size > ctx.config.monolithic_threshold)
        if self.record.warning:
            ctx.emit(Event("info", desc.digest.short, detail=self.record.warning))
        if self.record.location:  # a session from an earlier run: ask the registry where it stands
            self.session = Upload(dst.repository, self.record.location, self.record.offset)
        # hash state at read boundaries, so a resume from the registry's offset keeps one sha256
        self.snapshots: dict[int, Any] = {}

    async def run(self) -> None:
        sent_before = self._sent_total
        try:
            await self._run()
        except BlobflowError as e:
            if not (isinstance(e, RegistryError) and e.status == 500):  # see progress
                self._moved += self._sent_total - sent_before
            raise

    async def _run(self) -> None:
        client, desc = self.dst.client, self.desc
        offered, self.offered = self.offered, None
        if offered is not None and self.session is not None:  # an earlier run's session goes on
            with contextlib.suppress(BlobflowError):
                await client.cancel_upload(offered)
            offered = None
        if self.session is not None:
            try:
                await client.upload_status(self.session)
                if self.session.offset and not self.snapshots:
                    self.ctx.emit(Event("info", desc.digest.short, n=self.session.offset, detail=(
                        f"resuming upload of {desc.digest.short} at byte {self.session.offset:,}")))
            except RegistryError as e:
                if not isinstance(e, NotFoundError) and e.code not in _SESSION_LOST:
                    raise
                self.session = None  # the session is gone: start a new one
                self.ctx.emit(Event("info", desc.digest.short, detail=(
                    f"the registry no longer has the upload session of {desc.digest.short} ({e.code or e.status}); "
                    "starting it again")))
        if self.ticket is None:
            assert self.ctx.deadlines is not None
            self.ticket = await self.ctx.deadlines.admit(self.dst.client.registry, desc.digest, desc.size)
            if self.session is not None and self.record.opened_at:
                self.ticket.session_resumed(time.time() - self.record.opened_at, self.session.offset)
        if self.session is None:
            self.session = offered or await client.start_upload(self.dst.repository)
            self.record.opened_at = time.time()
            self.ticket.session_started()
            self.snapshots = {0: desc.digest.hasher()}
        up = self.session
        self._save()
        try:
            # a refusal as too large teaches a limit: continue from the offset the registry confirms
            while not await self._send(up):
                await client.upload_status(up)
                self._save()
        except DigestMismatchError:
            with contextlib.suppress(BlobflowError):
                await client.cancel_upload(up)
            self.session = None
            self.record.discard()
            raise
        except RegistryError as e:
            if e.code not in _SESSION_LOST:
                raise
            # Distribution forgets a session whose PATCH was cut ("upload resumed at wrong
            # offset"): start a new session on the next attempt
            self.session = None
            self.record.discard()
            raise TransferError(f"{e}; starting a new upload session", retryable=True) from None
        self.session = None
        self.record.discard()

    async def _send(self, up: Upload) -> bool:
        """Send the rest of the blob from ``up.offset`` and commit it. False when the registry
        refused a request as too large: the limit is learned (in the job's Context) and nothing is
        committed; the caller asks the registry for its offset and calls again."""
        client, desc = self.dst.client, self.desc
        plan = self._plan(up)
        out = _Outgoing(self, up.offset)
        body, ranged = 0, False  # the request in flight: its body size, whether it has Content-Range
        try:
            if plan.strategy is Strategy.MONOLITHIC:
                body = desc.size
                data = b"".join([c async for c in out.body(desc.size)])
                out.check()
                await client.finish_upload(up, desc.digest, data)
                return True
            ranged = plan.strategy is Strategy.CHUNKED
            while up.offset < desc.size:
                # a per-request window sizes each chunk from the rate measured so far: read once, the
                # first (a 256 KiB probe, no rate yet) stayed the size of every chunk of the blob
                body = min((self._plan(up) if ranged else plan).chunk_size, desc.size - up.offset)
                await client.upload_chunk(up, out.body(body), body, content_range=ranged)
                self._save()
            body, ranged = 0, False
            await out.drain()
            out.check()
            await client.finish_upload(up, desc.digest)
            return True
        except RegistryError as e:
            message = str(e).partition(f": {e.status} ")[2]  # the registry's words, not our request's
            cap = refused_body_limit(e.status, message, body)
            why = f"{e.status} for {body:,} bytes in one {'chunk' if ranged else 'request'}"
            # a 416 refuses Content-Range chunks (streams may still pass); a 413 refuses any body
            if cap is None or cap < _MIN_LEARNED or not self.ctx.learn_limit(
                    client.registry, cap, ranged=ranged and e.status == 416, why=why):
                raise
            return False
        finally:
            await out.aclose()

    def _plan(self, up: Upload) -> UploadPlan:
        chunk_size = self.ctx.config.chunk_size
        if self.ticket is not None and (limit := self.ticket.chunk_limit) is not None:
            chunk_size = min(chunk_size or limit, limit)
        return choose_upload(self.desc.size, self.limits, chunk_size=chunk_size,
                             monolithic_threshold=self.ctx.config.monolithic_threshold,
                             min_chunk=up.min_chunk, offset=up.offset)

    @property
    def limits(self) -> RegistryLimits:
        """The destination's limits as known now (lowered by refusals earlier in the job)."""
        return self.ctx.limits(self.dst.client.registry)

    @property
    def progress(self) -> int:
        """Bytes sent by attempts that a flaky link ended (a broken connection, a timeout, a
        throttle or a gateway's 502-504): one that lets each attempt move some bytes is not given
        up while it does. An attempt the registry itself failed with 500 is no progress however
        many bytes it sent: a registry that fails every upload (a full disk, a bug) is tried
        ``retries`` times more, not up to the hard cap of (retries + 1) * 10 (every PUT answered
        500: the blob sent 30 times with --retries 2). (Counting only attempts that got further
        than any before gave up on flaky links too soon: a blob cut at random points seldom beats
        its best attempt, and still lands a few attempts later.)"""
        return self._moved

    def _save(self) -> None:
        """Journal the session and the offset the registry confirmed, for a later run."""
        if self.session is not None:
            self.record.location, self.record.offset = self.session.location, self.session.offset
            self.record.save()

    def close(self) -> None:
        self.snapshots.clear()
        self.record.release()
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
        push.reported = max(push.reported, offset)  # what the registry holds (an earlier run's too) is not this run's
        self.skip = offset - at
        self.chunks = push.opener(at)
        self.tail = b""
        self.source_failures = 0  # in a row, without a byte read between them
        self.source_breaks = 0
        self.failed_at = at
        # aiohttp reads a request body in a task of its own that may still be inside _next when
        # the request has already failed: closing the source waits for it to step out
        self._idle = asyncio.Event()
        self._idle.set()

    async def _next(self) -> bytes | None:
        self._idle.clear()
        try:
            return await self._read()
        finally:
            self._idle.set()

    async def _read(self) -> bytes | None:
        if self.tail:
            chunk, self.tail = self.tail, b""
            return chunk
        size = self.push.desc.size
        while True:
            try:
                chunk = await anext(self.chunks)
            except StopAsyncIteration:
                return None
            except BlobflowError as e:
                # the source broke (a copy's GET was cut): reopen it where it stopped and keep the
                # destination request going, so neither side starts over
                await self._reopen(e)
                continue
            if self.read_pos + len(chunk) > size:
                raise self._wrong_source(f"more bytes than the blob's size {size:,}")
            # hashed in the loop's thread (hashlib lets go of the GIL for large buffers): a
            # worker-thread hop per chunk cost more CPU than it saved (copy of 1 GiB: -0.4 CPU-s)
            self.h.update(chunk)
            self.read_pos += len(chunk)
            self.source_failures = 0  # the source advanced: its retries count failures in a row
            self.push.snapshots[self.read_pos] = self.h.copy()
            if self.skip:
                drop = min(self.skip, len(chunk))
                self.skip -= drop
                self.sent += drop
                chunk = chunk[drop:]
            if chunk:
                return chunk

    async def _reopen(self, error: BlobflowError) -> None:
        cfg = self.push.ctx.config
        if self.read_pos > self.failed_at:  # it moved on since it last broke: a flaky link, not a dead source
            self.failed_at, self.source_failures = self.read_pos, 0
        self.source_breaks += 1
        if not error.retryable:
            raise error
        if self.source_failures >= cfg.retries or self.source_breaks >= (cfg.retries + 1) * MAX_ATTEMPTS_FACTOR:
            # the source had its retries here; the destination's retry layer must not start them
            # over (each of its attempts did: (retries + 1)² GETs of a blob the source cannot serve)
            error.retryable = False
            raise error
        delay = backoff_delay(self.source_failures, base=cfg.backoff_base, cap=cfg.backoff_cap,
                              retry_after=getattr(error, "retry_after", None))
        self.source_failures += 1
        self.push.ctx.emit(Event("retry", self.push.desc.digest.short, target="source", detail=str(error),
                                 delay=delay))
        await asyncio.sleep(delay)
        with contextlib.suppress(BlobflowError):
            await self.chunks.aclose()  # type: ignore[attr-defined]
        self.chunks = self.push.opener(self.read_pos)

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
            self.push._sent_total += len(chunk)
            if self.sent > self.push.reported:  # bytes an earlier attempt sent already are not new progress
                self.push.ctx.emit(Event("bytes", digest, n=self.sent - self.push.reported))
                self.push.reported = self.sent
            yield chunk

    async def drain(self) -> None:
        """Read (hash, not send) what is left of the bytes the registry holds already: all of the
        blob when a run stopped between its last byte and its commit, and this one resumed there."""
        while self.read_pos < self.push.desc.size and await self._next() is not None:
            pass

    def check(self) -> None:
        desc = self.push.desc
        if self.sent != desc.size or self.read_pos != desc.size:
            if self.push.local:  # a file that ends early stays so: a retry reads the same bytes
                raise self._wrong_source(f"it ends after {self.read_pos:,} of the blob's {desc.size:,} bytes")
            raise TransferError(f"blob {desc.digest.short}: source ended after {self.read_pos} of "
                                f"{desc.size} bytes", retryable=True)
        if self.h.hexdigest() != desc.digest.hex:
            raise self._wrong_source("")

    def _wrong_source(self, detail: str) -> DigestMismatchError:
        """The source's bytes are not the blob (``detail``: how, when not just by their digest).
        From a file, it is corrupt and no retry helps; from a registry, they may have been
        corrupted on the way."""
        desc, local = self.push.desc, self.push.local
        if local:
            what = f"the local file is corrupt ({detail})" if detail else "the local file is corrupt"
        else:
            what = f"the source sent {detail or 'bytes that do not match the digest'}"
        return DigestMismatchError(f"blob {desc.digest}: {what}; not committed", retryable=not local)

    async def aclose(self) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), 10.0)
        with contextlib.suppress(RuntimeError):  # still running: the loop's finaliser closes it
            await self.chunks.aclose()  # type: ignore[attr-defined]

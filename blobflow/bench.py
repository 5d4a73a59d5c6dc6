"""``blobflow bench``: what a registry sustains, measured through the engine users run.

Each *cell* (op x blob size x concurrency) runs *samples*; a sample is one job exactly as a
command runs it (its own connections, auth, scheduler with ``concurrency`` slots, retry policy)
moving a fresh set of unique blobs through :func:`blobflow.transfer.ensure_blob`: a push is the
engine's :class:`~blobflow.transfer.upload.Push` fed by a synthetic opener, a pull its
:class:`~blobflow.transfer.download.Download` into a sink that keeps nothing but still checks
the sha256 in order, a copy the registry-to-registry stream. The registry client of each job is
instrumented (a timing wrapper per endpoint) for the per-phase times.

Synthetic blobs: unique and incompressible, made while they are sent, never held whole. Every
1 MiB piece is a slice of a 16 MiB random pool at an offset drawn from the blob's seed, with the
piece's first 64 bytes replaced by a hash of (blob seed, piece index): no stream compressor finds
a repeat (its window is far below the pool), every blob and piece is different, and generating
costs one memcpy per byte (random generators run at 150-450 MB/s in Python, under what a local
registry takes). Deduplicating storage at block level could find repeats across pieces; registries
store blobs whole by digest. The digest is computed in a first pass (untimed), then the same bytes
are generated again as they are sent.

Memory bound: the pool (16 MiB) plus what the engine itself holds
(:class:`~blobflow.config.EngineConfig`). The pull sink writes to an unlinked-on-commit sparse temp
file (page cache) so ranges arriving out of order can be read back for the in-order sha256.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import os
import platform
import random
import secrets
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from . import __version__
from .api import Client
from .config import EngineConfig, positive_finite
from .errors import BadInputError, BlobflowError, DigestMismatchError, RegistryError
from .layout import BlobWriter
from .progress import Event
from .registry import Credentials, RegistryClient
from .transfer import Context, FileEnd, RegistryEnd, StreamEnd, ensure_blob, retrying
from .types import Descriptor, Digest, Reference

__all__ = ["OPS", "BenchParams", "run_bench"]

OPS = ("push", "pull", "copy")
_PIECE = 1 << 20
_POOL = 16 << 20
_HEADER = 64
_BLOB_TYPE = "application/octet-stream"


@dataclass(frozen=True, slots=True, kw_only=True)
class BenchParams:
    """A sweep: every op x size x concurrency is a cell of ``repeat`` samples (or as many as fit in
    ``duration`` seconds); a sample moves ``blobs`` blobs (default ``max(4, 2 * concurrency)``)."""

    target: str
    sizes: tuple[int, ...]
    concurrency: tuple[int, ...]
    ops: tuple[str, ...] = ("push", "pull")
    repeat: int = 3
    duration: float | None = None
    blobs: int | None = None
    copy_to: str | None = None
    cleanup: bool = True

    def __post_init__(self) -> None:
        if not self.sizes or any(s < 1 for s in self.sizes):
            raise BadInputError("bench: --sizes needs sizes of at least 1 byte")
        if not self.concurrency or any(c < 1 for c in self.concurrency):
            raise BadInputError("bench: --concurrency needs levels of at least 1")
        unknown = [op for op in self.ops if op not in OPS]
        if not self.ops or unknown:
            raise BadInputError(f"bench: unknown op {', '.join(unknown) or '(none)'}; choose from {', '.join(OPS)}")
        if "copy" in self.ops and not self.copy_to:
            raise BadInputError("bench: the copy op needs a second target: --copy-to REGISTRY/REPO")
        if self.repeat < 1 or (self.duration is not None and not positive_finite(self.duration)):
            raise BadInputError("bench: --repeat and --duration must be positive")
        if self.blobs is not None and self.blobs < 1:
            raise BadInputError("bench: --blobs must be at least 1")

    def blobs_for(self, concurrency: int) -> int:
        return self.blobs or max(4, 2 * concurrency)


# -- synthetic blobs -------------------------------------------------------------------------------

class Synth:
    """Deterministic unique incompressible blobs (see the module docstring)."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.pool = memoryview(random.Random(seed).randbytes(_POOL))

    def piece(self, blob_seed: bytes, index: int, length: int) -> bytes:
        header = hashlib.sha512(blob_seed + index.to_bytes(8, "big")).digest()
        at = int.from_bytes(header[:8], "big") % (_POOL - _PIECE)
        if length <= _HEADER:
            return header[:length]
        return header + self.pool[at + _HEADER: at + length].tobytes()

    def pieces(self, blob_seed: bytes, size: int, offset: int = 0) -> AsyncIterator[bytes]:
        async def gen() -> AsyncIterator[bytes]:
            index = offset // _PIECE
            skip = offset - index * _PIECE
            while index * _PIECE < size:
                data = self.piece(blob_seed, index, min(_PIECE, size - index * _PIECE))
                yield data[skip:] if skip else data
                skip = 0
                index += 1
                await asyncio.sleep(0)  # generating is CPU: let the loop breathe between pieces
        return gen()

    def digest(self, blob_seed: bytes, size: int) -> Digest:
        h = hashlib.sha256()
        for index in range(0, (size + _PIECE - 1) // _PIECE):
            h.update(self.piece(blob_seed, index, min(_PIECE, size - index * _PIECE)))
        return Digest("sha256", h.hexdigest())


@dataclass(frozen=True, slots=True)
class _Blob:
    seed: bytes
    desc: Descriptor


class _Blobs:
    """Blobs made for this run, by digest, so a push source can regenerate them."""

    def __init__(self, synth: Synth, run_id: str) -> None:
        self.synth, self.run_id = synth, run_id
        self.by_digest: dict[Digest, _Blob] = {}
        self._count = 0

    async def make(self, size: int, n: int) -> list[_Blob]:
        out = []
        for _ in range(n):
            seed = hashlib.sha256(f"{self.run_id}/{self._count}".encode()).digest()
            self._count += 1
            digest = await asyncio.to_thread(self.synth.digest, seed, size)
            blob = _Blob(seed, Descriptor(_BLOB_TYPE, digest, size))
            self.by_digest[digest] = blob
            out.append(blob)
        return out

    def end(self) -> StreamEnd:
        def open_blob(desc: Descriptor) -> Callable[[int], AsyncIterator[bytes]]:
            blob = self.by_digest[desc.digest]
            return lambda offset: self.synth.pieces(blob.seed, desc.size, offset)
        return StreamEnd(f"bench-{self.run_id}", open_blob)


# -- the pull sink -------------------------------------------------------------------------------

class _DiscardWriter(BlobWriter):
    """A BlobWriter whose commit checks the digest and throws the bytes away (no fsync, no rename)."""

    def commit(self, verified: Digest) -> None:
        if verified != self.digest:
            self.abort()
            raise DigestMismatchError(f"blob {self.digest.short}: received bytes have digest {verified.short}")
        os.close(self.fd)
        self.fd = -1
        self.temp.unlink(missing_ok=True)
        self.committed = True


class _DiscardEnd(FileEnd):
    def __init__(self, directory: Path) -> None:
        super().__init__(directory)

    @property
    def key(self) -> str:
        return f"discard:{self.path}"

    def __str__(self) -> str:
        return "discard"

    def blob_writer(self, desc: Descriptor) -> BlobWriter:
        return _DiscardWriter(self.path / desc.digest.hex, desc.digest, desc.size)


# -- instrumentation ---------------------------------------------------------------------------

@dataclass
class _Recorder:
    """Per sample: phase times, each blob's first request and first byte, retries and failures."""

    phases: dict[str, list[float]] = dataclasses.field(default_factory=dict)
    first_request: dict[str, float] = dataclasses.field(default_factory=dict)
    first_byte: dict[str, float] = dataclasses.field(default_factory=dict)
    retries: int = 0
    failures: int = 0

    def listen(self, ev: Event) -> None:
        if ev.kind == "bytes" and ev.digest not in self.first_byte:
            self.first_byte[ev.digest] = ev.time
        elif ev.kind == "retry":
            self.retries += 1
        elif ev.kind == "failed":
            self.failures += 1

    def instrument(self, client: RegistryClient) -> None:
        """Wrap the endpoints of this job's client with timers (the client lives for one job)."""
        for name, phase, digest_at in (("head_blob", "HEAD", 1), ("mount_blob", "POST mount", 1),
                                       ("start_upload", "POST session", None), ("upload_chunk", "PATCH", None),
                                       ("finish_upload", "PUT commit", None), ("get_blob", "GET headers", 1)):
            self._wrap(client, name, phase, digest_at)
        self._wrap(client.auth, "authorization", "auth", None)

    def _wrap(self, obj: Any, name: str, phase: str, digest_at: int | None) -> None:
        original: Callable[..., Awaitable[Any]] = getattr(obj, name)

        async def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.monotonic()
            if digest_at is not None and len(args) > digest_at:
                self.first_request.setdefault(args[digest_at].short, started)
            try:
                return await original(*args, **kwargs)
            finally:
                self.phases.setdefault(phase, []).append(time.monotonic() - started)
        setattr(obj, name, timed)


# -- the run -----------------------------------------------------------------------------------

def _machine() -> dict[str, Any]:
    memory = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return {"os": platform.platform(), "python": platform.python_version(), "arch": platform.machine(),
            "cpus": os.cpu_count(), "memory_bytes": memory}


class _Bench:
    def __init__(self, params: BenchParams, config: EngineConfig, credentials: Mapping[str, Credentials],
                 log: Callable[[str], None]) -> None:
        self.params, self.config, self.credentials, self.log = params, config, dict(credentials), log
        self.run_id = f"{datetime.now(UTC):%Y%m%d-%H%M%S}-{secrets.token_hex(3)}"
        self.ref = _bench_ref(params.target, self.run_id)
        self.copy_ref = _bench_ref(params.copy_to, self.run_id) if params.copy_to else None
        self.blobs = _Blobs(Synth(int.from_bytes(hashlib.sha256(self.run_id.encode()).digest()[:8], "big")),
                            self.run_id)
        self.written: dict[tuple[str, str], list[Digest]] = {}  # (registry, repository) -> blobs sent there
        self.stock: dict[int, list[list[_Blob]]] = {}  # size -> blob sets at the target, for pulls and copies
        self.notes: list[str] = []
        self.workdir = Path(tempfile.mkdtemp(prefix="blobflow-bench-"))

    def _client(self, concurrency: int, rec: _Recorder | None) -> Client:
        cfg = dataclasses.replace(self.config, concurrency=concurrency, state_dir=str(self.workdir / "state"))
        return Client(cfg, listener=rec.listen if rec else None, credentials=self.credentials)

    @staticmethod
    def _end(ctx: Context, ref: Reference, rec: _Recorder | None) -> RegistryEnd:
        client = ctx.pool.client(ref.registry, ref.endpoint, loopback=ref.is_loopback)
        if rec is not None and not getattr(client, "_bench_timed", False):
            rec.instrument(client)
            client._bench_timed = True  # type: ignore[attr-defined]
        return RegistryEnd(client, ref.repository)

    async def run(self) -> dict[str, Any]:
        p = self.params
        report: dict[str, Any] = {
            "schema": "blobflow-bench/1", "run_id": self.run_id, "started": datetime.now(UTC).isoformat(),
            "blobflow_version": __version__, "machine": _machine(),
            "registry": {"target": p.target, "registry": self.ref.registry, "repository": self.ref.repository,
                         "copy_to": str(self.copy_ref.registry + "/" + self.copy_ref.repository)
                         if self.copy_ref else None},
            "parameters": {"sizes": list(p.sizes), "concurrency": list(p.concurrency), "ops": list(p.ops),
                           "repeat": p.repeat, "duration": p.duration, "blobs": p.blobs,
                           "chunk_size": self.config.chunk_size},
            "cells": [], "notes": self.notes, "extra": {}}
        try:
            await self._reachable()
            for op in [o for o in OPS if o in p.ops]:
                for size in p.sizes:
                    for conc in p.concurrency:
                        report["cells"].append(await self._cell(op, size, conc))
        finally:
            try:
                report["registry"]["cleanup"] = await self._cleanup() if p.cleanup else {
                    "deleted": 0, "failed": 0, "note": "kept (--keep)"}
            finally:
                shutil.rmtree(self.workdir, ignore_errors=True)
        return report

    async def _reachable(self) -> None:
        """The target, and the copy's destination, answer at all: a sweep against a registry that
        is not there spent every sample's retries (35 s for the smallest one) and printed a table
        of zeros with exit 0."""
        for ref in [self.ref, *([self.copy_ref] if self.copy_ref else [])]:
            async with self._client(1, None)._job() as ctx:
                end = self._end(ctx, ref, None)
                await retrying(ctx, str(end), end.client.ping)

    async def _cell(self, op: str, size: int, conc: int) -> dict[str, Any]:
        p = self.params
        samples: list[dict[str, Any]] = []
        started = time.monotonic()
        while True:
            n = len(samples)
            if p.duration is not None and n and time.monotonic() - started >= p.duration:
                break
            if p.duration is None and n >= p.repeat:
                break
            samples.append(await self._sample(op, size, conc, n))
        last = samples[-1]
        self.log(f"{op} {size:>11,} B x{conc:<3} {len(samples)} samples, last "
                 f"{last['bytes'] / max(last['seconds'], 1e-9) / 1e6:8.1f} MB/s")
        return {"op": op, "size": size, "concurrency": conc, "samples": samples}

    async def _blob_set(self, op: str, size: int, conc: int, index: int) -> list[_Blob]:
        """Fresh blobs for a push; blobs already at the target for a pull or a copy (pushed untimed
        when the run did not push a set of that size)."""
        n = self.params.blobs_for(conc)
        if op == "push":
            blobs = await self.blobs.make(size, n)
            self.stock.setdefault(size, []).append(blobs)
            return blobs
        sets = [s for s in self.stock.get(size, []) if len(s) >= n]
        if sets:
            return sets[index % len(sets)][:n]
        blobs = await self.blobs.make(size, n)
        await self._push(blobs, conc, None)
        self.stock.setdefault(size, []).append(blobs)
        return blobs

    async def _push(self, blobs: list[_Blob], conc: int, rec: _Recorder | None) -> None:
        async with self._client(conc, rec)._job() as ctx:
            dst = self._end(ctx, self.ref, rec)
            src = self.blobs.end()
            await asyncio.gather(*(ensure_blob(ctx, src, dst, b.desc) for b in blobs))
        self.written.setdefault((self.ref.registry, self.ref.repository), []).extend(b.desc.digest for b in blobs)

    async def _sample(self, op: str, size: int, conc: int, index: int) -> dict[str, Any]:
        blobs = await self._blob_set(op, size, conc, index)
        rec = _Recorder()
        done: dict[Digest, float] = {}
        errors: dict[Digest, str] = {}
        outcomes: dict[Digest, str] = {}
        sink = self.workdir / "sink"
        sink.mkdir(exist_ok=True)
        async with self._client(conc, rec)._job() as ctx:
            if op == "push":
                src: Any = self.blobs.end()
                dst: Any = self._end(ctx, self.ref, rec)
            elif op == "pull":
                src, dst = self._end(ctx, self.ref, rec), _DiscardEnd(sink)
            else:
                assert self.copy_ref is not None
                src, dst = self._end(ctx, self.ref, rec), self._end(ctx, self.copy_ref, rec)
            clients = [e.client for e in (src, dst) if isinstance(e, RegistryEnd)]
            requests0 = sum(c.requests for c in clients)
            throttles0 = sum(c.gate.throttles for c in clients)

            async def one(blob: _Blob) -> None:
                try:
                    outcomes[blob.desc.digest] = await ensure_blob(ctx, src, dst, blob.desc)
                except BlobflowError as e:
                    errors[blob.desc.digest] = str(e)
                finally:
                    done[blob.desc.digest] = time.monotonic()

            started = time.monotonic()
            await asyncio.gather(*(one(b) for b in blobs))
            seconds = time.monotonic() - started
            requests = sum(c.requests for c in clients) - requests0
            throttled = sum(c.gate.throttles for c in clients) - throttles0
        if op in ("push", "copy"):
            ref = self.ref if op == "push" else self.copy_ref
            assert ref is not None
            self.written.setdefault((ref.registry, ref.repository), []).extend(
                d for d in outcomes if outcomes[d] in ("moved", "mounted"))
        detail = []
        for b in blobs:
            d = b.desc.digest
            first = rec.first_request.get(d.short, started)
            fb = rec.first_byte.get(d.short)
            detail.append({"digest": str(d), "size": b.desc.size, "latency": done[d] - first,
                           "ttfb": fb - first if fb is not None else None,
                           "outcome": outcomes.get(d, "failed"), "error": errors.get(d)})
        return {"seconds": seconds, "bytes": sum(b.desc.size for b in blobs if outcomes.get(b.desc.digest) == "moved"),
                "requests": requests, "retries": rec.retries, "throttled": throttled,
                "errors": len(errors), "blobs": detail, "phases": rec.phases}

    async def _cleanup(self) -> dict[str, Any]:
        """DELETE every blob this run wrote (and say so when the registry does not allow it)."""
        deleted = failed = 0
        reasons: set[str] = set()
        async with self._client(8, None)._job() as ctx:
            sem = asyncio.Semaphore(8)
            for (registry, repository), digests in self.written.items():
                ref = self.ref if registry == self.ref.registry else self.copy_ref
                assert ref is not None
                client = ctx.pool.client(ref.registry, ref.endpoint, loopback=ref.is_loopback)

                async def delete(digest: Digest, client: RegistryClient = client, repo: str = repository) -> None:
                    nonlocal deleted, failed
                    async with sem:
                        try:
                            await client.delete_blob(repo, digest)
                            deleted += 1
                        except BlobflowError as e:
                            failed += 1
                            reasons.add(_deletion_refused(e))
                await asyncio.gather(*(delete(d) for d in dict.fromkeys(digests)))
        note = "all blobs deleted" if not failed else "; ".join(sorted(reasons))
        if failed:
            self.notes.append(f"cleanup: {failed} blobs could not be deleted: {note}")
        return {"deleted": deleted, "failed": failed, "note": note}


def _deletion_refused(e: BlobflowError) -> str:
    if isinstance(e, RegistryError) and (e.status == 405 or e.code == "UNSUPPORTED"):
        return ("the registry does not allow deletion (405; Distribution needs storage.delete.enabled); "
                "the blobs stay until its garbage collection")
    return str(e)


def _bench_ref(target: str | None, run_id: str) -> Reference:
    assert target is not None
    text = target.strip().rstrip("/")
    if not text or "@" in text or (":" in text.rsplit("/", 1)[-1] and "/" in text):
        raise BadInputError(f"bench target {target!r}: give a registry or repository (host/repo), "
                            "without tag or digest")
    return Reference.parse(f"{text}/blobflow-bench-{run_id}", default_tag=None)


async def run_bench(params: BenchParams, *, config: EngineConfig | None = None,
                    credentials: Mapping[str, Credentials] | None = None,
                    log: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    """Run the sweep; the report follows the ``blobflow-bench/1`` schema (:mod:`blobflow.benchreport`)."""
    return await _Bench(params, config or EngineConfig(), credentials or {}, log).run()

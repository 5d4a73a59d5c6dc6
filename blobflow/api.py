"""The Python API: pull, push, copy, blob_get, blob_put, tags, inspect.

Every operation walks an image the same way, whatever its ends are: read the source manifest
(and an index's children), make every blob present at the destination through the scheduler,
then write manifests children first, the tagged root last, so nothing references a missing blob.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import shutil
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from .config import EngineConfig
from .errors import BadInputError, BlobflowError, LimitExceededError, ManifestError, NotFoundError
from .layout import Layout
from .progress import Event, Listener, Stats
from .registry import Credentials, RegistryPool
from .retry import with_retries
from .scheduler import Scheduler
from .transfer import Context, FileEnd, ImageEnd, LayoutEnd, RawManifest, RegistryEnd, ensure_blob
from .types import Descriptor, Digest, Reference

__all__ = ["Client", "ImageResult", "Platform", "Result"]

T = TypeVar("T")
GHCR_DESCRIPTION_MAX = 512
GHCR_LICENSES_MAX = 256


@dataclass(frozen=True, slots=True)
class Platform:
    os: str
    architecture: str
    variant: str | None = None

    @classmethod
    def parse(cls, text: str) -> Platform:
        parts = text.split("/")
        if len(parts) not in (2, 3) or not all(parts):
            raise BadInputError(f"invalid platform {text!r}: expected os/arch[/variant], e.g. linux/arm64")
        return cls(parts[0], parts[1], parts[2] if len(parts) == 3 else None)

    def matches(self, spec: Mapping[str, Any] | None) -> bool:
        spec = spec or {}
        return (spec.get("os") == self.os and spec.get("architecture") == self.architecture
                and (self.variant is None or spec.get("variant") == self.variant))

    def __str__(self) -> str:
        return "/".join(p for p in (self.os, self.architecture, self.variant) if p)


@dataclass(frozen=True, slots=True)
class ImageResult:
    source: str
    destination: str
    digest: str
    manifests: int
    blobs: int


@dataclass(frozen=True, slots=True)
class Result:
    """What an operation did."""

    operation: str
    images: list[ImageResult]
    blobs: int
    bytes: int
    seconds: float
    skipped: int
    mounted: int
    retries: int
    manifests: int
    notes: list[str] = field(default_factory=list)

    @property
    def rate(self) -> float:
        """Bytes per second."""
        return self.bytes / self.seconds if self.seconds > 0 else 0.0

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["mb_per_s"] = round(self.rate / 1e6, 2)
        return out


class Client:
    """Async entry point. Every method runs one job with its own scheduler and connections."""

    def __init__(self, config: EngineConfig | None = None, *, listener: Listener | None = None,
                 credentials: Mapping[str, Credentials] | None = None) -> None:
        self.config = config or EngineConfig()
        self.listener = listener
        self._credentials = dict(credentials or {})

    @contextlib.asynccontextmanager
    async def _job(self) -> AsyncIterator[Context]:
        cfg = self.config
        pool = RegistryPool(connections_per_host=cfg.connections_per_host,
                            connect_timeout=cfg.connect_timeout, read_timeout=cfg.read_timeout,
                            plain_http=cfg.plain_http, ca_file=cfg.ca_file, insecure=cfg.insecure,
                            credentials=self._credentials)
        async with pool, Scheduler(cfg.concurrency) as sched:
            yield Context(cfg, pool, sched, self.listener, Stats())

    def _registry_end(self, ctx: Context, ref: Reference) -> RegistryEnd:
        client = ctx.pool.client(ref.registry, ref.endpoint, loopback=ref.is_loopback)
        return RegistryEnd(client, ref.repository)

    @staticmethod
    def _result(op: str, ctx: Context, started: float, images: list[ImageResult]) -> Result:
        s = ctx.stats
        return Result(op, images, s.blobs, s.bytes, time.monotonic() - started, s.skipped, s.mounted,
                      s.retries, s.manifests, list(s.notes))

    # -- images ----------------------------------------------------------------------------
    async def pull(self, image: str, directory: str | Path, *, platform: str | None = None) -> Result:
        ref = Reference.parse(image)
        plat = Platform.parse(platform) if platform else None
        started = time.monotonic()
        created = not os.path.exists(directory)  # noqa: ASYNC240 - one stat, before any I/O starts
        try:
            async with self._job() as ctx:
                src = self._registry_end(ctx, ref)
                dst = LayoutEnd(Layout.create(directory))
                img = await _transfer_image(ctx, src, ref, dst, ref.tag, platform=plat)
        except BaseException:
            if created:  # leave nothing that looks like a layout behind
                shutil.rmtree(directory, ignore_errors=True)
            raise
        return self._result("pull", ctx, started, [img])

    async def push(self, directory: str | Path, image: str, *, tag: str | None = None,
                   annotations: Mapping[str, str] | None = None, platform: str | None = None) -> Result:
        ref = Reference.parse(image)
        if ref.digest is not None:
            raise BadInputError(f"{image}: push to a tag, not a digest")
        _check_annotations(ref, annotations)
        plat = Platform.parse(platform) if platform else None
        started = time.monotonic()
        layout = Layout.open(directory)
        async with self._job() as ctx:
            src = LayoutEnd(layout)
            dst = self._registry_end(ctx, ref)
            img = await _transfer_image(ctx, src, tag, dst, ref.tag, platform=plat, annotations=annotations)
        return self._result("push", ctx, started, [img])

    async def copy(self, source: str, destination: str, *, platform: str | None = None,
                   annotations: Mapping[str, str] | None = None) -> Result:
        sref, dref = Reference.parse(source), Reference.parse(destination)
        if dref.digest is not None and dref.tag is None:
            dref = dref.with_tag(sref.tag or "latest")
        _check_annotations(dref, annotations)
        plat = Platform.parse(platform) if platform else None
        started = time.monotonic()
        async with self._job() as ctx:
            img = await _transfer_image(ctx, self._registry_end(ctx, sref), sref,
                                        self._registry_end(ctx, dref), dref.tag, platform=plat,
                                        annotations=annotations)
        return self._result("copy", ctx, started, [img])

    # -- single blobs ----------------------------------------------------------------------
    async def blob_get(self, image: str, file: str | Path) -> Result:
        ref = Reference.parse(image)
        if ref.digest is None:
            raise BadInputError(f"{image}: blob get needs IMAGE@sha256:<digest>")
        started = time.monotonic()
        async with self._job() as ctx:
            src = self._registry_end(ctx, ref)
            size = await src.client.head_blob(ref.repository, ref.digest)
            if size is None:
                raise NotFoundError(f"{ref.registry}/{ref.repository}: blob {ref.digest} not found", status=404)
            desc = Descriptor("application/octet-stream", ref.digest, size)
            await ensure_blob(ctx, src, FileEnd(Path(file)), desc)
        return self._result("blob get", ctx, started, [])

    async def blob_put(self, file: str | Path, repository: str) -> tuple[Result, Descriptor]:
        path = Path(file)
        ref = Reference.parse(repository)
        try:
            digest, size = await asyncio.to_thread(_hash_file, path)
        except OSError as e:
            raise BadInputError(f"cannot read {path}: {e.strerror}") from None
        desc = Descriptor("application/octet-stream", digest, size)
        _preflight_sizes(self.config, ref.registry, [desc])
        started = time.monotonic()
        async with self._job() as ctx:
            await ensure_blob(ctx, FileEnd(path), self._registry_end(ctx, ref), desc)
        return self._result("blob put", ctx, started, []), desc

    # -- metadata --------------------------------------------------------------------------
    async def tags(self, repository: str, *, page_size: int | None = None) -> list[str]:
        ref = Reference.parse(repository)
        async with self._job() as ctx:
            return await self._registry_end(ctx, ref).client.list_tags(ref.repository, page_size=page_size)

    async def inspect(self, image: str) -> RawManifest:
        ref = Reference.parse(image)
        async with self._job() as ctx:
            return await _fetch_root(self._registry_end(ctx, ref), ref)


def _hash_file(path: Path) -> tuple[Digest, int]:
    h, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(4 * 1024 * 1024):
            h.update(chunk)
            size += len(chunk)
    return Digest("sha256", h.hexdigest()), size


async def _fetch_root(src: ImageEnd, ref: Reference | str | None) -> RawManifest:
    if isinstance(src, LayoutEnd):
        return await src.fetch_manifest(ref if isinstance(ref, str) or ref is None else ref.tag)
    assert isinstance(src, RegistryEnd) and isinstance(ref, Reference)
    try:
        return await src.fetch_manifest(ref.reference)
    except NotFoundError as e:
        if ref.digest is None and ref.tag == "latest":
            tags: list[str] = []
            with contextlib.suppress(BlobflowError):
                tags = await src.client.list_tags(src.repository, page_size=20)
            hint = f"; tags that exist: {', '.join(tags[:8])}" if tags else ""
            raise NotFoundError(f"{ref}: tag 'latest' does not exist{hint}", status=404,
                                code=e.code) from None
        raise


async def _collect(src: ImageEnd, root: RawManifest, platform: Platform | None, depth: int = 0,
                   ) -> tuple[RawManifest, list[RawManifest]]:
    """The root to write (a single platform's manifest when one is chosen) and its image manifests."""
    if not root.is_index:
        return root, [root]
    if depth > 1:
        raise ManifestError(f"index {root.digest.short} nests indexes too deeply")
    children = root.children()
    if platform is not None:
        match = [c for c in children if platform.matches(c.platform)]
        if not match:
            have = ", ".join(f"{(c.platform or {}).get('os')}/{(c.platform or {}).get('architecture')}"
                             for c in children if c.platform)
            raise NotFoundError(f"no {platform} image in index {root.digest.short} (has: {have or 'none'})")
        return await _collect(src, await src.fetch_child(match[0]), platform, depth + 1)
    images: list[RawManifest] = []
    for c in children:
        child = await src.fetch_child(c)
        if child.is_index:
            images.extend((await _collect(src, child, None, depth + 1))[1])
            images.append(child)
        else:
            images.append(child)
    return root, images


async def _transfer_image(ctx: Context, src: ImageEnd, src_ref: Reference | str | None, dst: ImageEnd,
                          tag: str | None, *, platform: Platform | None,
                          annotations: Mapping[str, str] | None = None) -> ImageResult:
    root = await _retrying(ctx, str(src), lambda: _fetch_root(src, src_ref))
    root, manifests = await _retrying(ctx, str(src), lambda: _collect(src, root, platform))
    if annotations:
        root = _annotate(root, annotations)
    blobs: dict[Digest, Descriptor] = {}
    for m in manifests:
        if not m.is_index:
            for d in m.blobs():
                blobs.setdefault(d.digest, d)
    if isinstance(dst, RegistryEnd):
        _preflight_sizes(ctx.config, dst.client.registry, list(blobs.values()))
    tasks = [ctx.scheduler.spawn(ensure_blob(ctx, src, dst, d)) for d in blobs.values()]
    if tasks:
        await asyncio.wait(tasks)
        errors = [t.exception() for t in tasks if not t.cancelled() and t.exception() is not None]
        if errors:
            raise errors[0]  # type: ignore[misc]
    written = 0
    for m in manifests:
        if m is not root:
            await _retrying(ctx, str(dst), lambda m=m: dst.store_manifest(m, None))  # type: ignore[misc]
            written += 1
    await _retrying(ctx, str(dst), lambda: dst.store_manifest(root, tag))
    if isinstance(dst, LayoutEnd):
        dst.set_tag(tag, root)
    ctx.emit(Event("manifest", root.digest.short, size=len(root.data), target=f"{dst}:{tag or root.digest}"))
    return ImageResult(str(src_ref or src), f"{dst}:{tag}" if tag else str(dst), str(root.digest),
                       written + 1, len(blobs))


async def _retrying(ctx: Context, what: str, attempt: Callable[[], Awaitable[T]]) -> T:
    cfg = ctx.config
    return await with_retries(attempt, retries=cfg.retries, base=cfg.backoff_base, cap=cfg.backoff_cap,
                              emit=ctx.emit, what=what)


def _annotate(raw: RawManifest, annotations: Mapping[str, str]) -> RawManifest:
    doc = raw.doc
    doc["annotations"] = {**(doc.get("annotations") or {}), **annotations}
    data = json.dumps(doc, indent=2).encode()
    return RawManifest.parse_bytes(data, raw.media_type)


def _check_annotations(ref: Reference, annotations: Mapping[str, str] | None) -> None:
    """GHCR's documented limits on the package description and licenses annotations."""
    if not annotations or ref.registry != "ghcr.io":
        return
    desc = annotations.get("org.opencontainers.image.description", "")
    if len(desc) > GHCR_DESCRIPTION_MAX:
        raise BadInputError(f"ghcr.io allows at most {GHCR_DESCRIPTION_MAX} characters in "
                            f"org.opencontainers.image.description; this one has {len(desc)}")
    lic = annotations.get("org.opencontainers.image.licenses", "")
    if len(lic) > GHCR_LICENSES_MAX:
        raise BadInputError(f"ghcr.io allows at most {GHCR_LICENSES_MAX} characters in "
                            f"org.opencontainers.image.licenses; this one has {len(lic)}")


def _preflight_sizes(config: EngineConfig, registry: str, blobs: list[Descriptor]) -> None:
    """Refuse, before any byte is sent, a layer over the destination's size limit."""
    limit = config.limits(registry).max_layer_size
    if limit is None:
        return
    for d in blobs:
        if d.size > limit:
            raise LimitExceededError(f"layer {d.digest} is {d.size:,} bytes, over {registry}'s limit of "
                                     f"{limit:,} bytes per layer; nothing was sent")

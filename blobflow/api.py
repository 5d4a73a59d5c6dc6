"""The Python API: pull, push, copy, mirror, blob_get, blob_put, tags, inspect.

Each method is one job: its own connections, scheduler and events. The image walk itself lives in
:mod:`blobflow.images`, mirror plans in :mod:`blobflow.mirror`.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import os
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable, Collection, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

from .codec import Codec
from .config import EngineConfig, parse_size
from .errors import BadInputError, NotFoundError
from .images import (
    ImageOutcome,
    Platform,
    check_annotations,
    collect,
    fetch_root,
    holds_image,
    preflight_sizes,
    transfer_image,
)
from .layout import Layout, writable_file
from .mirror import MirrorPlan, MirrorResult, load_plan, run_mirror, valid_shard
from .progress import Event, Listener, Stats
from .registry import Credentials, RegistryPool
from .scheduler import Scheduler
from .transfer import Context, FileEnd, LayoutEnd, RawManifest, RegistryEnd, ensure_blob, retrying
from .types import Descriptor, Digest, Reference

__all__ = ["Client", "ImageResult", "Platform", "Result"]

ImageResult = ImageOutcome
_SPOOL_READ = 4 * 1024 * 1024
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Result:
    """What an operation did."""

    operation: str
    images: list[ImageOutcome]
    blobs: int
    bytes: int
    seconds: float
    skipped: int
    mounted: int
    retries: int
    manifests: int
    notes: list[str] = field(default_factory=list)
    min_slack: float | None = None  # seconds: the least window left when an upload against one finished

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
        wrong = sorted(r for r, c in self._credentials.items() if not isinstance(c, Credentials))
        if wrong:  # a ("user", "password") tuple was dropped without a word: "none are configured"
            raise BadInputError(f"credentials for {', '.join(wrong)}: give blobflow.Credentials(username=..., "
                                "password=...) per registry")

    async def __aenter__(self) -> Client:
        """``async with Client() as client``: nothing to open or close (each call runs its own job
        with its own connections), so a client is just as good without it."""
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None

    @contextlib.asynccontextmanager
    async def _job(self, *, rate_hosts: Collection[str] | None = None) -> AsyncIterator[Context]:
        cfg = self.config
        pool = RegistryPool(connections_per_host=cfg.connections_per_host,
                            connect_timeout=cfg.connect_timeout, read_timeout=cfg.read_timeout,
                            plain_http=cfg.plain_http, ca_file=cfg.ca_file, insecure=cfg.insecure,
                            credentials=self._credentials, rate=cfg.rate, rate_hosts=rate_hosts)
        async with pool, Scheduler(cfg.concurrency) as sched:
            yield Context(cfg, pool, sched, self.listener, Stats())

    def _registry_end(self, ctx: Context, ref: Reference) -> RegistryEnd:
        client = ctx.pool.client(ref.registry, ref.endpoint, loopback=ref.is_loopback)
        return RegistryEnd(client, ref.repository)

    @staticmethod
    def _result(op: str, ctx: Context, started: float, images: list[ImageOutcome]) -> Result:
        s = ctx.stats
        return Result(op, images, s.blobs, s.bytes, time.monotonic() - started, s.skipped, s.mounted,
                      s.retries, s.manifests, list(s.notes), min_slack=s.min_slack)

    # -- images ----------------------------------------------------------------------------
    async def pull(self, image: str | Reference, directory: str | Path, *, platform: str | None = None) -> Result:
        ref = Reference.parse(image)
        if not str(directory):  # "" is the current directory to the OS: a layout strewn among its files
            raise BadInputError("pull: the layout directory is an empty string; give a path")
        plat = Platform.parse(platform) if platform else None
        started = time.monotonic()
        created = not os.path.exists(directory)  # noqa: ASYNC240 - one stat, before any I/O starts
        job: Context | None = None
        try:
            async with self._job() as job:
                src = self._registry_end(job, ref)
                dst = LayoutEnd(Layout.create(directory))
                img = await transfer_image(job, src, ref, dst, ref.tag, platform=plat)
        except BaseException:
            # a layout this pull created is removed while it holds nothing: once blob bytes land,
            # the journal resumes from them when the same command runs again (after Ctrl-C too),
            # and another pull into the same new directory may have filled it meanwhile
            if created:
                Layout(Path(directory)).discard_if_empty()
            raise
        return self._result("pull", job, started, [img])

    async def push(self, directory: str | Path, image: str | Reference, *, tag: str | None = None,
                   annotations: Mapping[str, str] | None = None, platform: str | None = None,
                   compress: str | None = None) -> Result:
        """``compress``: ``zstd[:LEVEL]`` or ``gzip[:LEVEL]``: tar layers not already so are
        compressed while they stream (verified against the config's diff_ids). ``image`` with a
        digest (``REPO@sha256:...``) is written as that digest or not at all, as ``copy`` does."""
        codec = Codec.parse(compress) if compress else None
        ref = Reference.parse(image)
        check_annotations(ref, annotations)
        plat = Platform.parse(platform) if platform else None
        started = time.monotonic()
        layout = Layout.open(directory)
        async with self._job() as ctx:
            src = LayoutEnd(layout)
            dst = self._registry_end(ctx, ref)
            img = None
            if codec is not None and plat is None and not annotations:
                made_from = await src.manifest_digest(tag)
                img = await _converted_earlier(ctx, made_from, f"{src}:{tag}" if tag else str(src), dst, ref, codec,
                                               "push")
            if img is None:
                img = await transfer_image(ctx, src, tag, dst, ref.tag, platform=plat, annotations=annotations,
                                           convert=codec, expect=ref.digest)
        return self._result("push", ctx, started, [img])

    async def copy(self, source: str | Reference, destination: str | Reference, *, platform: str | None = None,
                   annotations: Mapping[str, str] | None = None, recompress: str | None = None) -> Result:
        """``recompress``: ``zstd[:LEVEL]`` (or ``gzip[:LEVEL]``): layers are decompressed and
        recompressed in one streaming pipeline, source digests and diff_ids verified."""
        codec = Codec.parse(recompress) if recompress else None
        sref, dref = Reference.parse(source), Reference.parse(destination)
        check_annotations(dref, annotations)
        plat = Platform.parse(platform) if platform else None
        started = time.monotonic()
        async with self._job() as ctx:
            src, dst = self._registry_end(ctx, sref), self._registry_end(ctx, dref)
            img = None
            if codec is not None and plat is None and not annotations:
                made_from = await retrying(ctx, str(src), lambda: src.manifest_digest(sref.reference))
                img = await _converted_earlier(ctx, made_from, str(sref), dst, dref, codec, "copy")
            if img is None:
                img = await transfer_image(ctx, src, sref, dst, dref.tag, platform=plat,
                                            annotations=annotations, convert=codec, expect=dref.digest)
        return self._result("copy", ctx, started, [img])

    async def mirror(self, plan: MirrorPlan | str | Path, *, shard: tuple[int, int] = (0, 1),
                     dry_run: bool = False, recompress: str | None = None) -> MirrorResult:
        """Every image of a mirror plan (or of this shard of it) in one job. One image failing does
        not stop the others: see ``MirrorResult.failed``."""
        if not valid_shard(shard):  # (2, 2), (-1, 2): a shard no image is in, mirrored "successfully"
            raise BadInputError(f"invalid shard {shard!r}: expected (I, N) with 0 <= I < N, e.g. (0, 4)")
        if not isinstance(plan, MirrorPlan):
            plan = load_plan(plan)
        # config.rate limits the plan's sources only, not the destinations the mirror writes to
        async with self._job(rate_hosts={e.source.registry for e in plan.entries}) as ctx:
            return await run_mirror(ctx, plan, self._registry_end, shard=shard, dry_run=dry_run,
                                    convert=Codec.parse(recompress) if recompress else None)

    async def bench(self, target: str, *, sizes: Sequence[int | str] = ("1MiB", "16MiB"),
                    concurrency: Sequence[int] = (1, 4), ops: Sequence[str] = ("push", "pull"), repeat: int = 3,
                    duration: float | None = None, blobs: int | None = None, copy_to: str | None = None,
                    cleanup: bool = True, log: Callable[[str], None] | None = None) -> dict[str, Any]:
        """``blobflow bench TARGET``: synthetic blobs of each size pushed and pulled (or copied to
        ``copy_to``) at each concurrency, ``repeat`` samples a cell (or as many as fit in
        ``duration`` seconds). The report follows the ``blobflow-bench/1`` schema
        (:mod:`blobflow.benchreport`: ``save_report``, ``format_table``, ``compare``); ``log``
        gets a line per cell as it runs. What the run wrote is deleted unless ``cleanup=False``."""
        from .bench import BenchParams, run_bench

        params = BenchParams(target=target, sizes=tuple(parse_size(s) if isinstance(s, str) else s for s in sizes),
                             concurrency=tuple(concurrency), ops=tuple(ops), repeat=repeat, duration=duration,
                             blobs=blobs, copy_to=copy_to, cleanup=cleanup)
        return await run_bench(params, config=self.config, credentials=self._credentials,
                               log=log or (lambda _: None))

    # -- single blobs ----------------------------------------------------------------------
    async def blob_get(self, image: str | Reference, file: str | os.PathLike[str] | BinaryIO) -> Result:
        """Download one blob into ``file``: a path (written under a temporary name, verified,
        then renamed; an interrupted download resumes), or an open binary file such as
        ``sys.stdout.buffer``. An open file gets the blob only once every byte of it is verified:
        it is spooled to a temporary file under ``$TMPDIR`` first, which a later run does not
        resume from."""
        ref = Reference.parse(image)
        if ref.digest is None:
            raise BadInputError(f"{image}: blob get needs IMAGE@sha256:<digest>")
        if isinstance(file, str | os.PathLike):
            return await self._blob_get(ref, FileEnd(writable_file(Path(file))))
        with tempfile.TemporaryDirectory(prefix="blobflow-") as tmp:
            spool = Path(tmp) / "blob"
            result = await self._blob_get(ref, FileEnd(spool, resumable=False))
            await _in_own_thread(lambda: _copy_out(spool, file))
        return result

    async def _blob_get(self, ref: Reference, dst: FileEnd) -> Result:
        assert ref.digest is not None
        digest = ref.digest
        started = time.monotonic()
        async with self._job() as ctx:
            src = self._registry_end(ctx, ref)
            size = await retrying(ctx, str(src), lambda: src.client.head_blob(ref.repository, digest))
            if size is None:
                # a manifest's digest is no blob there (Distribution links manifests apart)
                manifest = await retrying(ctx, str(src), lambda: src.client.head_manifest(ref.repository, str(digest)))
                if manifest is not None:
                    raise BadInputError(f"{ref}: {digest.short} is a manifest of {ref.repository}, not a blob; "
                                        f"`blobflow inspect --raw {ref}` prints its bytes")
                raise NotFoundError(f"{ref.registry}/{ref.repository}: blob {digest} not found", status=404)
            await ensure_blob(ctx, src, dst, Descriptor("application/octet-stream", digest, size))
        return self._result("blob get", ctx, started, [])

    async def blob_put(self, file: str | os.PathLike[str] | BinaryIO, repository: str
                       ) -> tuple[Result, Descriptor]:
        """Upload ``file`` (a path, or an open binary file such as ``sys.stdin.buffer``, read to
        its end into a temporary file under ``$TMPDIR`` first: the digest goes before the bytes).
        ``repository`` takes no tag (a blob has none); a digest there is what the file must hash to."""
        ref = Reference.parse(repository, default_tag=None)
        if ref.tag is not None:
            raise BadInputError(f"{repository}: blob put takes a repository; a blob has no tag")
        if isinstance(file, str | os.PathLike):
            path = Path(file)
            try:
                digest, size = await asyncio.to_thread(_hash_file, path)
            except OSError as e:
                raise BadInputError(f"cannot read {path}: {e.strerror}") from None
            return await self._blob_put(path, ref, Descriptor("application/octet-stream", digest, size))
        with tempfile.TemporaryDirectory(prefix="blobflow-") as tmp:
            spool = Path(tmp) / "blob"
            digest, size = await _in_own_thread(lambda: _spool(file, spool))
            return await self._blob_put(spool, ref, Descriptor("application/octet-stream", digest, size))

    async def _blob_put(self, path: Path, ref: Reference, desc: Descriptor) -> tuple[Result, Descriptor]:
        if ref.digest is not None and ref.digest != desc.digest:
            raise BadInputError(f"{ref}: the blob to upload is {desc.digest}, not the {ref.digest} named there; "
                                "nothing sent")
        preflight_sizes(self.config, ref.registry, [desc])
        started = time.monotonic()
        async with self._job() as ctx:
            await ensure_blob(ctx, FileEnd(path), self._registry_end(ctx, ref), desc)
        return self._result("blob put", ctx, started, []), desc

    # -- metadata --------------------------------------------------------------------------
    async def tags(self, repository: str | Reference, *, page_size: int | None = None) -> list[str]:
        ref = Reference.parse(repository)
        async with self._job() as ctx:
            end = self._registry_end(ctx, ref)
            return await retrying(ctx, str(end), lambda: end.client.list_tags(ref.repository, page_size=page_size))

    async def inspect(self, image: str | Reference, *, platform: str | None = None) -> RawManifest:
        """The image's manifest; with ``platform``, that platform's manifest from an index (a
        single image's own manifest when it is of that platform)."""
        ref = Reference.parse(image)
        plat = Platform.parse(platform) if platform else None
        async with self._job() as ctx:
            end = self._registry_end(ctx, ref)
            root = await retrying(ctx, str(end), lambda: fetch_root(end, ref))
            if plat is None:
                return root
            return (await retrying(ctx, str(end), lambda: collect(end, root, plat)))[0]


async def _converted_earlier(ctx: Context, source: Digest | None, what: str, dst: RegistryEnd,
                             dref: Reference, codec: Codec, op: str) -> ImageOutcome | None:
    """What a recompressing copy or push of ``source`` (named ``what``) has left to do when an
    earlier one already did it: nothing. One HEAD at the destination, and a GET of its root only
    when it is there."""
    where = f"{dst}:{dref.tag}" if dref.tag else str(dst)
    current = await retrying(ctx, str(dst), lambda: dst.manifest_digest(dref.reference))
    if source is None or current is None or current == source:
        return None
    if not await retrying(ctx, str(dst), lambda: holds_image(dst, dref.reference, source, convert=codec)):
        return None
    ctx.emit(Event("info", target=where, detail=(
        f"{where} already holds {what} ({source.short}) converted to {codec}: nothing to {op}")))
    return ImageOutcome(what, where, str(current), 0, 0)


def _hash_file(path: Path) -> tuple[Digest, int]:
    with open(path, "rb") as f:
        return _hash_stream(f)


def _hash_stream(src: BinaryIO, copy_to: BinaryIO | None = None) -> tuple[Digest, int]:
    """sha256 and size of what ``src`` holds to its end, written on to ``copy_to`` as it is read."""
    h, size = hashlib.sha256(), 0
    while chunk := src.read(_SPOOL_READ):
        h.update(chunk)
        size += len(chunk)
        if copy_to is not None:
            copy_to.write(chunk)
    return Digest("sha256", h.hexdigest()), size


def _spool(src: BinaryIO, path: Path) -> tuple[Digest, int]:
    with open(path, "xb") as out:
        return _hash_stream(src, out)


def _sent_whole(src: BinaryIO, out: BinaryIO) -> bool:
    """``src`` sent into ``out``'s descriptor by ``sendfile``; False when ``out`` has no descriptor
    or the kernel takes no ``sendfile`` into it (before any byte went)."""
    try:
        fd = out.fileno()
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is an OSError
        return False
    out.flush()
    size, offset = os.fstat(src.fileno()).st_size, 0
    while offset < size:
        try:
            n = os.sendfile(fd, src.fileno(), offset, min(size - offset, 1 << 30))
        except OSError as e:
            if offset == 0 and e.errno in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                return False
            raise
        if n == 0:
            raise OSError(errno.EIO, "the output took no bytes")
        offset += n
    return True


async def _in_own_thread(fn: Callable[[], T]) -> T:
    """``fn`` (reading a caller's stream, or writing one) in a daemon thread of its own, not the
    loop's executor: executor threads are joined when the loop closes, so one blocked on a pipe
    that never ends or is never read kept Ctrl-C and SIGTERM from ending the command. Cancelled,
    the caller goes on at once; the thread is left to its read or write."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[T] = loop.create_future()

    def settle(result: T | None, error: BaseException | None) -> None:
        if not done.done():
            if error is not None:
                done.set_exception(error)
            else:
                done.set_result(result)  # type: ignore[arg-type]

    def run() -> None:
        try:
            result, error = fn(), None
        except BaseException as e:  # handed to the awaiting task
            result, error = None, e
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is waiting
            loop.call_soon_threadsafe(settle, result, error)

    threading.Thread(target=run, name="blobflow-stdio", daemon=True).start()
    return await done


def _copy_out(path: Path, out: BinaryIO) -> None:
    """``shutil.copyfileobj`` without its trust in ``write``: a write into a pipe whose reader left,
    or one a signal cut short, takes part of the buffer and returns its count without raising.
    Into a file descriptor (stdout) with ``sendfile``, which spares the copies through Python:
    512 MB into ``| cat`` took 1.2 s more than the download, written in 4 MiB pieces."""
    with open(path, "rb") as f:
        if _sent_whole(f, out):
            return
        while chunk := f.read(_SPOOL_READ):
            view = memoryview(chunk)
            while view:
                n = out.write(view)
                if not n:
                    raise OSError(errno.EIO, "the output took no bytes")
                view = view[n:]
    out.flush()

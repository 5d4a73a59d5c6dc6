"""Converting layers while they move: source bytes -> decompress -> compress -> registry, one pass.

One layer is read once (from a layout file or another registry), its source sha256 checked as it
streams, decompressed, the uncompressed tar hashed against the config's ``diff_id``, compressed
with the target codec and sent in ONE streamed PATCH of unknown length (chunked transfer
encoding, which Distribution accepts). The digest of the output is only known at the end, so the
final PUT carries it, and is sent only when the source digest and the diff_id both matched;
otherwise the upload session is cancelled and nothing is committed.

Memory per layer in flight: one source chunk (``read_size``) + the :class:`~blobflow.codec.Recoder`'s
bound (``PIECE`` + compressor state, see :mod:`blobflow.codec`) + the piece aiohttp is writing;
with the default 1 MiB read size and zstd level 3 about ``concurrency x 30 MiB``.

Not done here, by design: a HEAD before sending (the converted digest is unknown until the
layer has been converted), resuming a cut upload (the compressor's state cannot be restored: a
retry converts the layer again from its first byte) and upload-window admission (the output
size is unknown up front).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Sequence

from ..codec import DOCKER_TO_OCI, Codec, CorruptStreamError, Recoder, compression_of
from ..errors import BlobflowError, DigestMismatchError, ManifestError, TransferError
from ..progress import Event
from ..types import Descriptor, Digest
from .base import Context, Outcome, failure, retrying
from .copy import registry_opener
from .ends import ImageEnd, LayoutEnd, RawManifest, RegistryEnd
from .upload import Opener, file_opener

__all__ = ["Conversion", "convert_layer", "plan_conversion", "rewrite_manifests"]

MAX_CONFIG = 16 * 1024 * 1024
Conversion = dict[Digest, tuple[Descriptor, Digest]]  # source layer digest -> (its descriptor, diff_id)


async def fetch_config(src: ImageEnd, desc: Descriptor) -> bytes:
    """An image config's bytes, verified against its descriptor."""
    if isinstance(src, LayoutEnd):
        return src.layout.read_blob(desc, limit=MAX_CONFIG)
    if desc.size > MAX_CONFIG:
        raise ManifestError(f"config {desc.digest.short} is {desc.size:,} bytes, over {MAX_CONFIG:,}")
    stream = await src.client.get_blob(src.repository, desc.digest)
    parts: list[bytes] = []
    async with stream:
        async for chunk in stream.chunks(1 << 20):
            parts.append(chunk)
            if sum(map(len, parts)) > desc.size:
                break
    data = b"".join(parts)
    if len(data) != desc.size or Digest.of(data) != desc.digest:
        raise DigestMismatchError(f"{src}: config {desc.digest.short} does not match its digest", retryable=True)
    return data


async def plan_conversion(src: ImageEnd, manifests: Sequence[RawManifest], codec: Codec) -> Conversion:
    """The layers of ``manifests`` to convert, each with the diff_id its config gives it."""
    plan: Conversion = {}
    for m in manifests:
        if m.is_index:
            continue
        config, *layers = m.blobs()
        if not any(codec.wants(d) for d in layers):
            continue
        try:
            doc = json.loads(await fetch_config(src, config))
            diff_ids = [Digest.parse(d) for d in doc["rootfs"]["diff_ids"]]
        except (ValueError, KeyError, TypeError):
            raise ManifestError(f"manifest {m.digest.short}: its config has no valid rootfs.diff_ids, so "
                                "converted layers could not be verified; nothing was sent") from None
        if len(diff_ids) != len(layers):
            raise ManifestError(f"manifest {m.digest.short} has {len(layers)} layers but its config "
                                f"{len(diff_ids)} diff_ids; nothing was sent")
        for d, diff in zip(layers, diff_ids, strict=True):
            if codec.wants(d):
                plan.setdefault(d.digest, (d, diff))
    return plan


async def convert_layer(ctx: Context, src: ImageEnd, dst: RegistryEnd, desc: Descriptor, diff_id: Digest,
                        codec: Codec) -> tuple[Descriptor, Outcome]:
    """Convert ``desc`` to ``codec`` at ``dst``: the new descriptor (media type of an OCI manifest),
    and "moved", or "shared" when another image of the job converted it.

    Once per destination registry, codec and source digest in a job, under the scheduler's
    concurrency: another repository of the registry mounts the converted layer from the one it
    was sent to (each converted and sent it again, though identical blobs move once in a job).
    """
    from . import ensure_blob

    async def convert_here() -> tuple[Descriptor, str]:
        return await _convert(ctx, src, dst, desc, diff_id, codec), dst.location

    (new, landed), ran = await ctx.scheduler.submit_first(_job_key(dst, desc, codec), desc.size, convert_here)
    if landed != dst.location:
        await ensure_blob(ctx, RegistryEnd(dst.client, landed), dst, new)
    return new, "moved" if ran else "shared"


async def predict_conversion(ctx: Context, dst: RegistryEnd, desc: Descriptor,
                             codec: Codec) -> tuple[Descriptor, Outcome]:
    """What :func:`convert_layer` would do in a dry run: move the layer (its converted digest is
    known only once it is converted), or share it when another image of the job converts it."""
    async def would() -> tuple[Descriptor, str]:
        return desc, dst.location

    _, ran = await ctx.scheduler.submit_first(_job_key(dst, desc, codec), 0, would)
    return desc, "moved" if ran else "shared"


def _job_key(dst: RegistryEnd, desc: Descriptor, codec: Codec) -> tuple[str, str, str, Digest]:
    """One conversion of a layer per destination registry and codec in a job: the run's and the
    dry run's prediction must share it, or the prediction counts differently."""
    return dst.key, "convert", str(codec), desc.digest


async def _convert(ctx: Context, src: ImageEnd, dst: RegistryEnd, desc: Descriptor, diff_id: Digest,
                   codec: Codec) -> Descriptor:
    short = desc.digest.short
    source = compression_of(desc.media_type)
    assert source is not None
    done = 0

    async def attempt() -> Descriptor:
        nonlocal done
        rec = Recoder(source, codec)
        ctx.emit(Event("blob_start", short, size=desc.size, target=str(dst), detail=f"{source} -> {codec}"))
        try:
            out = await _send(ctx, dst, desc, diff_id, rec, _opener(ctx, src, desc), local=isinstance(src, LayoutEnd),
                              counted=done)
        finally:
            done = max(done, rec.source_size)
        ctx.emit(Event("blob_done", short, size=desc.size, target=str(dst)))
        ctx.emit(Event("info", short, target=str(dst), detail=(
            f"layer {short}: {source} {desc.size:,} bytes -> {codec} {out.digest.short} {out.size:,} bytes")))
        return out

    try:
        new = await retrying(ctx, str(dst), attempt, digest=short, progress=lambda: done)
    except BaseException as e:
        ctx.emit(Event("failed", short, size=desc.size, target=str(dst), detail=failure(e)))
        raise
    ctx.remember(dst.client.registry, new.digest, dst.repository)
    return new


def _opener(ctx: Context, src: ImageEnd, desc: Descriptor) -> Opener:
    if isinstance(src, LayoutEnd):
        return file_opener(src.source_path(desc), ctx.config.read_size)
    return registry_opener(ctx, src, desc)


async def _send(ctx: Context, dst: RegistryEnd, desc: Descriptor, diff_id: Digest, rec: Recoder,
                opener: Opener, *, local: bool, counted: int = 0) -> Descriptor:
    """One attempt: a new session, one streamed PATCH, checks, then the PUT (or a cancel).
    ``counted``: source bytes earlier attempts reported as moved, not reported again."""
    client, short = dst.client, desc.digest.short
    failure: list[BlobflowError] = []

    async def body() -> AsyncIterator[bytes]:
        # errors end the body early instead of breaking the request: the checks below report them
        chunks = opener(0)
        try:
            async for chunk in chunks:
                if rec.source_size + len(chunk) > desc.size:
                    raise DigestMismatchError(f"layer {short}: source has more bytes than its size {desc.size:,}",
                                              retryable=not local)
                if (new := rec.source_size + len(chunk) - max(counted, rec.source_size)) > 0:
                    ctx.emit(Event("bytes", short, n=new))
                steps = rec.feed(chunk)
                while (piece := await asyncio.to_thread(next, steps, None)) is not None:
                    if piece:
                        yield piece
            if rec.source_size == desc.size:
                tail = await asyncio.to_thread(lambda: b"".join(rec.finish()))
                if tail:
                    yield tail
        except CorruptStreamError as e:
            failure.append(CorruptStreamError(f"layer {desc.digest}: {e}; the image was not written"))
        except BlobflowError as e:
            failure.append(e)
        finally:
            with contextlib.suppress(BlobflowError, RuntimeError):
                await chunks.aclose()  # type: ignore[attr-defined]

    up = await client.start_upload(dst.repository)
    try:
        await client.upload_chunk(up, body(), None, content_range=False)
        if failure:
            raise failure[0]
        if rec.source_size != desc.size or rec.source_digest != desc.digest:
            where = "the local file is corrupt" if local else "source bytes do not match the digest"
            raise DigestMismatchError(f"layer {desc.digest}: {where} ({rec.source_size:,} of {desc.size:,} bytes "
                                      "read); not committed", retryable=not local)
        if rec.diff_id != diff_id:
            raise DigestMismatchError(
                f"layer {desc.digest}: its uncompressed content has {rec.diff_id} but the config's diff_id "
                f"is {diff_id}; the image is inconsistent, so nothing of it was committed")
        if up.offset and up.offset != rec.out_size:
            raise TransferError(f"layer {short}: the registry has {up.offset:,} bytes of the "
                                f"{rec.out_size:,} sent", retryable=True)
        await client.finish_upload(up, rec.digest)
    except BlobflowError:
        with contextlib.suppress(BlobflowError):
            await client.cancel_upload(up)
        raise
    return Descriptor(rec.media_type, rec.digest, rec.out_size, desc.annotations, None, desc.extra)


def rewrite_manifests(root: RawManifest, manifests: Sequence[RawManifest], converted: dict[Digest, Descriptor],
                      codec: Codec) -> tuple[RawManifest, list[RawManifest]]:
    """``root`` and ``manifests`` (children first) with converted layers' new media types, digests
    and sizes, and indexes pointing at their rewritten children. Unchanged ones keep their bytes.
    An attestation of a rewritten image (buildx's SBOM and provenance) is pointed at the image it
    became: left naming the old digest, no tool would find it (the statements inside still name
    the original manifest, whose files, uncompressed, are the same)."""
    new: dict[Digest, RawManifest] = {}

    def one(m: RawManifest) -> RawManifest:
        if m.digest in new:
            return new[m.digest]
        doc = m.doc
        media_type = codec.manifest_type(m.media_type)
        if m.is_index:
            kids = [Digest.parse(c["digest"]) for c in doc["manifests"]]
            if not any(k in new and new[k].digest != k for k in kids):
                return m
            for c, k in zip(doc["manifests"], kids, strict=True):
                if k in new:
                    c.update(mediaType=new[k].media_type, digest=str(new[k].digest), size=len(new[k].data))
                of = Descriptor.from_json(c).attests
                if of is not None and of in new:
                    c["annotations"]["vnd.docker.reference.digest"] = str(new[of].digest)
        else:
            if not any(Digest.parse(x["digest"]) in converted for x in doc["layers"]):
                return m
            for x in doc["layers"]:
                d = converted.get(Digest.parse(x["digest"]))
                if d is not None:
                    x.update(mediaType=codec.media_type(media_type), digest=str(d.digest), size=d.size)
                elif media_type != m.media_type:
                    x["mediaType"] = DOCKER_TO_OCI.get(x.get("mediaType", ""), x.get("mediaType"))
            if media_type != m.media_type:
                doc["config"]["mediaType"] = DOCKER_TO_OCI.get(doc["config"].get("mediaType", ""),
                                                               doc["config"].get("mediaType"))
        if "mediaType" in doc or media_type != m.media_type:
            doc["mediaType"] = media_type
        return RawManifest.parse_bytes(json.dumps(doc, indent=2).encode(), media_type)

    out = []
    for m in manifests:
        new[m.digest] = one(m)
        out.append(new[m.digest])
    return one(root), out

"""Moving whole images: every operation walks an image the same way, whatever its ends are.

Read the source manifest (and an index's children), make every blob present at the destination
through the scheduler, then write manifests children first and the tagged root last, so nothing
ever references a missing blob.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .codec import MEDIA_DOCKER_CONFIG, MEDIA_OCI_CONFIG, Codec, foreign
from .config import EngineConfig
from .errors import (
    AuthError,
    BadInputError,
    BlobflowError,
    LimitExceededError,
    ManifestError,
    NotFoundError,
    RegistryError,
)
from .progress import Event
from .transfer import Context, ImageEnd, LayoutEnd, Outcome, RawManifest, RegistryEnd, ensure_blob, retrying
from .transfer.convert import (
    Conversion,
    convert_layer,
    fetch_config,
    plan_conversion,
    predict_conversion,
    rewrite_manifests,
)
from .types import Descriptor, Digest, Reference

__all__ = ["CONVERTED_FROM", "CONVERTED_TO", "PLATFORMS", "PLATFORMS_FROM", "ImageOutcome", "Platform",
           "check_annotations", "collect", "fetch_root", "holds_image", "preflight_sizes",
           "transfer_image"]

GHCR_DESCRIPTION_MAX = 512
GHCR_LICENSES_MAX = 256
# a root that recompression or a platform selection made differs from the source's; it records
# what it was made from and how, so a later run can see that the destination is up to date
CONVERTED_FROM = "dev.blobflow.converted.from"  # the source root manifest's digest
CONVERTED_TO = "dev.blobflow.converted.to"  # the codec, e.g. zstd:3
PLATFORMS_FROM = "dev.blobflow.platforms.from"  # the source root manifest's digest
PLATFORMS = "dev.blobflow.platforms"  # the platforms kept, sorted: linux/amd64,linux/arm64
MADE_KEYS = (CONVERTED_FROM, CONVERTED_TO, PLATFORMS_FROM, PLATFORMS)


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
        """An index entry's (or a config's) platform is this one: same os and architecture, and the
        same variant when one is asked, where an architecture's default variant and none are one
        (linux/arm64/v8 is linux/arm64, as docker and containerd match it)."""
        spec = spec or {}
        arch = _ARCH_ALIASES.get(self.architecture, self.architecture)
        theirs = _ARCH_ALIASES.get(str(spec.get("architecture")), spec.get("architecture"))
        return (spec.get("os") == self.os and theirs == arch
                and (self.variant is None or _variant(arch, spec.get("variant")) == _variant(arch, self.variant)))

    def __str__(self) -> str:
        return "/".join(p for p in (self.os, self.architecture, self.variant) if p)



_ARCH_ALIASES = {"aarch64": "arm64", "x86_64": "amd64", "x86-64": "amd64"}
_DEFAULT_VARIANT = {"arm64": "v8", "arm": "v7", "amd64": "v1"}


def _variant(arch: str, variant: Any) -> str | None:
    return (str(variant) if variant else None) or _DEFAULT_VARIANT.get(arch)


async def _not_a_blob(src: RegistryEnd, ref: Reference, e: RegistryError) -> None:
    """A digest copied from a manifest's layers or config, where an image's was meant: Distribution
    answers 500 (it parses the blob as a manifest), others 404. Say so, not "unknown error" after
    every retry."""
    assert ref.digest is not None
    size = None
    with contextlib.suppress(BlobflowError):
        size = await src.client.head_blob(src.repository, ref.digest)
    if size is not None:
        said = "" if isinstance(e, NotFoundError) else f" (the registry answered {e.status} for it as one)"
        raise BadInputError(f"{ref}: {ref.digest.short} is a blob of {src.repository} ({size:,} bytes), "
                            f"a layer or a config, not a manifest{said}; `blobflow blob get {ref} FILE` "
                            "fetches it") from None


async def fetch_root(src: ImageEnd, ref: Reference | str | None) -> RawManifest:
    if isinstance(src, LayoutEnd):
        return await src.fetch_manifest(ref if isinstance(ref, str) or ref is None else ref.tag)
    assert isinstance(src, RegistryEnd) and isinstance(ref, Reference)
    try:
        return await src.fetch_manifest(ref.reference)
    except RegistryError as e:
        if ref.digest is not None and (isinstance(e, NotFoundError) or e.status == 500):
            await _not_a_blob(src, ref, e)
        if not isinstance(e, NotFoundError):
            raise
        if ref.digest is None and ref.tag == "latest":
            tags: list[str] = []
            with contextlib.suppress(BlobflowError):
                tags = await src.client.list_tags(src.repository, page_size=20)
            hint = f"; tags that exist: {', '.join(tags[:8])}" if tags else ""
            raise NotFoundError(f"{ref}: tag 'latest' does not exist{hint}", status=404,
                                code=e.code) from None
        raise


async def _check_platform(src: ImageEnd, image: RawManifest, platforms: Sequence[Platform]) -> None:
    """The platform its config names (os, architecture, variant) must be one of ``platforms``: an
    image for another platform is not taken silently. An artifact (another config type, or one
    naming no platform) passes, its config not fetched."""
    desc = Descriptor.from_json(image.doc.get("config"))
    if desc.media_type not in (MEDIA_OCI_CONFIG, MEDIA_DOCKER_CONFIG):
        return
    try:
        config = json.loads(await fetch_config(src, desc))
    except ValueError:
        return
    if not isinstance(config, dict) or not config.get("os") or not config.get("architecture"):
        return
    if not any(p.matches(config) for p in platforms):
        its = Platform(str(config["os"]), str(config["architecture"]), config.get("variant") or None)
        raise NotFoundError(f"no {', '.join(map(str, platforms))} image: {image.digest.short} is one image "
                            f"(no index), for {its}")


async def collect(src: ImageEnd, root: RawManifest, platform: Platform | None, depth: int = 0, *,
                  platforms: Sequence[Platform] | None = None) -> tuple[RawManifest, list[RawManifest]]:
    """The root to write and the manifests below it.

    With ``platform``, the root becomes that platform's manifest (as skopeo and crane do). With
    ``platforms``, an index keeps only the children of those platforms: when that is all of them
    the index is kept as it is (same digest), else a new index of the chosen children is written.
    A single image asked for by ``platform`` must be of it, as ``docker pull --platform`` checks;
    with ``platforms`` (a mirror plan's), of one of them, as an index must hold one.
    """
    if not root.is_index:
        if depth == 0 and (platform is not None or platforms is not None):
            await _check_platform(src, root, [platform] if platform is not None else platforms or [])
        return root, [root]
    if depth > 1:
        raise ManifestError(f"index {root.digest.short} nests indexes too deeply")
    children = root.children()
    if platforms is not None:
        chosen = {c.digest for c in children if any(p.matches(c.platform) for p in platforms)}
        # an attestation (buildx's SBOM and provenance, platform unknown/unknown) goes with the image it is of
        keep = [c for c in children if c.digest in chosen or c.attests in chosen]
        if not keep:
            raise NotFoundError(f"index {root.digest.short} has none of the platforms "
                                f"{', '.join(map(str, platforms))}")
        if len(keep) != len(children):
            doc = root.doc
            doc["manifests"] = [c.to_json() for c in keep]
            root = RawManifest.parse_bytes(json.dumps(doc, indent=2).encode(), root.media_type)
            children = keep
    if platform is not None:
        match = [c for c in children if platform.matches(c.platform)]
        if not match:
            have = ", ".join(f"{(c.platform or {}).get('os')}/{(c.platform or {}).get('architecture')}"
                             for c in children if c.platform and c.attests is None)
            raise NotFoundError(f"no {platform} image in index {root.digest.short} (has: {have or 'none'})")
        return await collect(src, await src.fetch_child(match[0]), platform, depth + 1)
    images: list[RawManifest] = []
    for c in children:
        child = await src.fetch_child(c)
        if child.is_index:
            images.extend((await collect(src, child, None, depth + 1))[1])
            images.append(child)
        else:
            images.append(child)
    return root, images


@dataclass(frozen=True, slots=True)
class ImageOutcome:
    """What moving one image did."""

    source: str
    destination: str
    digest: str
    manifests: int
    blobs: int
    moved: int = 0
    skipped: int = 0
    mounted: int = 0
    shared: int = 0
    bytes: int = 0
    converted: int = 0  # layers recompressed on the way (``convert``)
    source_digest: str = ""  # the source's root as fetched (``digest`` differs when options rewrote it)


async def transfer_image(ctx: Context, src: ImageEnd, src_ref: Reference | str | None, dst: ImageEnd,
                         tag: str | None, *, platform: Platform | None = None,
                         platforms: Sequence[str] | None = None, annotations: Mapping[str, str] | None = None,
                         dry_run: bool = False, convert: Codec | None = None,
                         expect: Digest | None = None) -> ImageOutcome:
    """Make the image at ``src`` present at ``dst`` under ``tag``: blobs first, then manifests,
    children before the root. With ``dry_run`` nothing is written: the outcome says what the blobs
    would do (moved, skipped, mounted, shared), a blob the job needs twice counted once, as a run would.

    With ``convert``, distributable tar layers not already in that codec are recompressed while
    they stream (:mod:`blobflow.transfer.convert`), verified against the config's diff_ids; the
    manifests (and an index) are rewritten with the new layers; the config is moved unchanged. A
    Docker schema 2 manifest that gets zstd layers becomes an OCI manifest (Docker has no zstd
    media type). Any failure aborts the image before a manifest is written.

    ``expect``: the digest the destination names (``copy SRC DST@sha256:...``); an image that
    comes out otherwise is refused, before any blob moves unless layers are converted (the digest
    is known only once they are)."""
    wanted = [Platform.parse(p) for p in platforms] if platforms is not None else None
    where = f"{dst}:{tag}" if tag else str(dst)
    root = await retrying(ctx, str(src), lambda: fetch_root(src, src_ref))
    source_digest = root.digest
    root, manifests = await retrying(ctx, str(src), lambda: collect(src, root, platform, platforms=wanted))
    # written before the root (an index's children); a lone image is its own manifest, written once
    # as the root, whatever annotations or conversion make of it
    below = [m for m in manifests if m is not root]
    if annotations:
        root = annotate(root, annotations)
    if convert is None:
        root = _stamped(root, source_digest, None, wanted, expect, where)
    blobs: dict[Digest, Descriptor] = {}
    # foreign layers stay at their URLs: asked of the source registry, which need not hold them, they were a 404
    left: set[Digest] = set()
    for m in manifests:
        if not m.is_index:
            for d in m.blobs():
                if foreign(d):
                    left.add(d.digest)
                else:
                    blobs.setdefault(d.digest, d)
    if left:
        ctx.emit(Event("info", target=where, n=len(left), detail=(
            f"{src_ref or src!s}: {len(left)} foreign layer(s) left at their URLs, not copied (as docker, "
            "skopeo and crane do)")))
    conversion: Conversion = {}
    predicted: list[asyncio.Future[tuple[Descriptor, Outcome]]] = []
    if convert is not None and not isinstance(dst, RegistryEnd):
        raise BadInputError("layers are recompressed only on the way to a registry")
    if convert is not None and not dry_run:
        conversion = await retrying(ctx, str(src), lambda: plan_conversion(src, manifests, convert))
        for dg in conversion:
            blobs.pop(dg, None)
    elif convert is not None:  # a dry run: HEADs of the source's digests say nothing of converted ones
        for d in [d for d in blobs.values() if convert.wants(d)]:
            del blobs[d.digest]
            predicted.append(ctx.scheduler.spawn(predict_conversion(ctx, dst, d, convert)))  # type: ignore[arg-type]
    if isinstance(dst, RegistryEnd):
        preflight_sizes(ctx.config, dst.client.registry, list(blobs.values()))
    futures = [ctx.scheduler.spawn(ensure_blob(ctx, src, dst, d, dry_run=dry_run)) for d in blobs.values()]
    converting = {dg: ctx.scheduler.spawn(convert_layer(ctx, src, dst, d, diff, convert))  # type: ignore[arg-type]
                  for dg, (d, diff) in conversion.items()}
    outcomes: Counter[str] = Counter()
    moved_bytes = 0
    if futures or converting or predicted:
        pending: list[asyncio.Future[Any]] = [*converting.values(), *futures, *predicted]
        await asyncio.wait(pending)
        errors = [f.exception() for f in pending if not f.cancelled() and f.exception() is not None]
        if errors:
            raise errors[0]  # type: ignore[misc]
        done = [(d, f.result()) for d, f in zip(blobs.values(), futures, strict=True)]
        done += [(conversion[dg][0], f.result()[1]) for dg, f in converting.items()]
        done += [f.result() for f in predicted]
        for d, outcome in done:  # a converted layer counts with its source size, as its progress did
            outcomes[outcome] += 1
            moved_bytes += d.size if outcome == "moved" else 0

    def result(root: RawManifest) -> ImageOutcome:
        return ImageOutcome(str(src_ref or src), where, str(root.digest), len(below) + 1,
                            len(blobs) + len(conversion), moved=outcomes["moved"], skipped=outcomes["skipped"],
                            mounted=outcomes["mounted"], shared=outcomes["shared"], bytes=moved_bytes,
                            converted=len(conversion), source_digest=str(source_digest))

    if dry_run:  # what the blobs would do, each counted once in the job, as the run would
        return result(root)
    if convert is not None:
        converted = {dg: f.result()[0] for dg, f in converting.items()}
        kept = {d.digest for m in manifests if not m.is_index for d in m.blobs()[1:]} - set(converted)
        root, below = rewrite_manifests(root, below, converted, convert)
        ctx.emit(Event("info", target=str(dst), n=len(converted), detail=(
            f"{src_ref or src!s}: {len(converted)} layer(s) converted to {convert}, "
            f"{len(kept)} copied as they are")))
        # one platform of an index, converted: stamped as that platform, or a later conversion of
        # the whole index took it for done and left the tag with that one platform
        root = _stamped(root, source_digest, convert, wanted or ([platform] if platform else None), expect, where)
    try:
        for m in below:
            await retrying(ctx, str(dst), functools.partial(dst.store_manifest, m, None))
        await retrying(ctx, str(dst), lambda: dst.store_manifest(root, tag))
    except RegistryError as e:
        if not left or isinstance(e, AuthError):
            raise
        # Distribution answers "500 UNKNOWN: unknown error" (its log says "invalid URL on layer")
        raise RegistryError(f"{e}; the manifest names {len(left)} foreign layer(s) at URLs, which a registry may "
                            "refuse (Distribution does unless its validation.manifests.urls.allow matches them)",
                            status=e.status, code=e.code) from None
    if isinstance(dst, LayoutEnd):
        dst.set_tag(tag, root)
    ctx.emit(Event("manifest", root.digest.short, size=len(root.data), target=where if tag else f"{dst}@{root.digest}"))
    return result(root)


def _stamped(root: RawManifest, source: Digest, convert: Codec | None, platforms: Sequence[Platform] | None,
             expect: Digest | None, where: str) -> RawManifest:
    """The root as written: one that is not its source says what it was made from (so a re-run
    can tell it is up to date), and it must be the digest the destination names, if it names one.
    What the source says it was made from goes: a mirror of a mirror that converted or selected
    platforms itself would never match this run's record, and so never be up to date."""
    if root.digest != source:
        made = made_of(source, convert, platforms)
        if made:
            root = annotate(root, made, drop=MADE_KEYS)
    if expect is not None and root.digest != expect:
        raise BadInputError(f"{where}@{expect.short}: the image to write there is {root.digest}, not the "
                            f"{expect} the destination names (drop the digest to write it by tag)")
    return root


def made_of(source: Digest, convert: Codec | None, platforms: Sequence[Platform] | None) -> dict[str, str]:
    """The annotations of a root made from ``source`` with these options (none without options)."""
    made: dict[str, str] = {}
    if convert is not None:
        made |= {CONVERTED_FROM: str(source), CONVERTED_TO: str(convert)}
    if platforms is not None:
        made |= {PLATFORMS_FROM: str(source), PLATFORMS: ",".join(sorted({str(p) for p in platforms}))}
    return made


async def holds_image(dst: RegistryEnd, reference: str, source: Digest, *, convert: Codec | None = None,
                      platforms: Sequence[str] | None = None) -> bool:
    """``dst``'s ``reference`` is what ``transfer_image`` makes of ``source`` with these options,
    read from ``dst`` alone: the source's own root when the options leave it as it is (layers in
    the codec already or not convertible, every platform kept), else a root whose annotations
    record this source and these options and no others. A converted or selected image never has
    its source's digest, so without this every run would fetch the source and convert again."""
    root = await dst.fetch_manifest(reference)
    wanted = [Platform.parse(p) for p in platforms] if platforms is not None else None
    if root.digest == source:
        try:
            kept, manifests = await collect(dst, root, None, platforms=wanted)
        except NotFoundError:
            return False
        layers = (d for m in manifests if not m.is_index for d in m.blobs()[1:])
        return kept.digest == root.digest and (convert is None or not any(convert.wants(d) for d in layers))
    want = made_of(source, convert, wanted)
    notes = root.doc.get("annotations")
    have = {k: notes.get(k) for k in MADE_KEYS if k in notes} if isinstance(notes, dict) else {}
    return bool(want) and have == want


def annotate(raw: RawManifest, annotations: Mapping[str, str], *, drop: Sequence[str] = ()) -> RawManifest:
    doc = raw.doc
    kept = {k: v for k, v in (doc.get("annotations") or {}).items() if k not in drop}
    doc["annotations"] = {**kept, **annotations}
    data = json.dumps(doc, indent=2).encode()
    return RawManifest.parse_bytes(data, raw.media_type)


def check_annotations(ref: Reference, annotations: Mapping[str, str] | None) -> None:
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


def preflight_sizes(config: EngineConfig, registry: str, blobs: list[Descriptor]) -> None:
    """Refuse, before any byte is sent, a layer over the destination's size limit."""
    limit = config.limits(registry).max_layer_size
    if limit is None:
        return
    for d in blobs:
        if d.size > limit:
            raise LimitExceededError(f"layer {d.digest} is {d.size:,} bytes, over {registry}'s limit of "
                                     f"{limit:,} bytes per layer; nothing was sent")

"""Moving one blob between two ends: skip, mount, or transfer, under the one retry layer."""

from __future__ import annotations

from collections.abc import Awaitable

from ..errors import BadInputError
from ..progress import Event
from ..retry import with_retries
from ..types import Descriptor
from .base import Context, Outcome
from .copy import registry_opener
from .download import Download
from .ends import End, FileEnd, ImageEnd, LayoutEnd, RawManifest, RegistryEnd, StreamEnd
from .upload import Push, file_opener

__all__ = [
    "Context",
    "End",
    "FileEnd",
    "ImageEnd",
    "LayoutEnd",
    "Outcome",
    "RawManifest",
    "RegistryEnd",
    "StreamEnd",
    "ensure_blob",
    "make_transfer",
]


def make_transfer(ctx: Context, src: End, dst: End, desc: Descriptor) -> Download | Push:
    """The mover for a pair of ends (regclient's scheme pairing)."""
    if isinstance(src, RegistryEnd) and isinstance(dst, LayoutEnd | FileEnd):
        return Download(ctx, src, dst, desc)
    if isinstance(dst, RegistryEnd):
        if isinstance(src, RegistryEnd):
            return Push(ctx, dst, desc, registry_opener(ctx, src, desc))
        if isinstance(src, StreamEnd):
            return Push(ctx, dst, desc, src.open_blob(desc), local=True)
        return Push(ctx, dst, desc, file_opener(src.source_path(desc), ctx.config.file_read_size), local=True)
    raise BadInputError(f"cannot move blobs from {src} to {dst}: one end must be a registry")


async def ensure_blob(ctx: Context, src: End, dst: End, desc: Descriptor, *, dry_run: bool = False) -> Outcome:
    """Make ``desc`` present at ``dst``; say how: moved, skipped (already there), mounted, or
    shared (another image of the job moved it).

    One transfer per destination and digest (single flight): when several repositories of one
    registry need the same blob, the first moves it and the others mount it from there.
    With ``dry_run`` nothing is written: the outcome is what the run would do, decided by the
    same single flight from HEADs alone, so a job's "would move" counts each blob once.
    """
    def place() -> Awaitable[tuple[str, Outcome]]:
        return _predict(ctx, src, dst, desc) if dry_run else _place(ctx, src, dst, desc)

    (landed, outcome), ran = await ctx.scheduler.submit_first((dst.key, desc.digest), desc.size, place)
    if landed != dst.location:
        # another repository of this registry has it: a mount, so a round trip (the small lane)
        (landed, outcome), ran = await ctx.scheduler.submit_first((dst.key, dst.location, desc.digest), 0, place)
    return outcome if ran else "shared"


async def _place(ctx: Context, src: End, dst: End, desc: Descriptor) -> tuple[str, Outcome]:
    mover: Download | Push | None = None
    digest = desc.digest.short
    outcome: Outcome = "moved"

    async def attempt() -> None:
        nonlocal mover, outcome
        if mover is None:  # a resumed attempt has state and must not ask again
            if await dst.has_blob(desc):
                ctx.emit(Event("skipped", digest, size=desc.size, target=str(dst)))
                outcome = "skipped"
                return
            if isinstance(dst, RegistryEnd) and await _mount(ctx, src, dst, desc):
                outcome = "mounted"
                return
            mover = make_transfer(ctx, src, dst, desc)
            ctx.emit(Event("blob_start", digest, size=desc.size, target=str(dst)))
        await mover.run()
        ctx.emit(Event("blob_done", digest, size=desc.size, target=str(dst)))

    cfg = ctx.config
    try:
        await with_retries(attempt, retries=cfg.retries, base=cfg.backoff_base, cap=cfg.backoff_cap,
                           emit=ctx.emit, what=str(dst), digest=digest,
                           progress=lambda: mover.progress if mover is not None else 0)
    except BaseException:
        ctx.emit(Event("failed", digest, size=desc.size, target=str(dst)))
        raise
    finally:
        if mover is not None:
            mover.close()
    if isinstance(dst, RegistryEnd):
        ctx.remember(dst.client.registry, desc.digest, dst.repository)
    return dst.location, outcome


async def _predict(ctx: Context, src: End, dst: End, desc: Descriptor) -> tuple[str, Outcome]:
    """What :func:`_place` would do, from a HEAD: skip, mount (another repository of the registry
    holds it or will), or move."""
    cfg = ctx.config
    present = await with_retries(lambda: dst.has_blob(desc), retries=cfg.retries, base=cfg.backoff_base,
                                 cap=cfg.backoff_cap, emit=ctx.emit, what=str(dst), digest=desc.digest.short)
    outcome: Outcome = "skipped" if present else "moved"
    if isinstance(dst, RegistryEnd):
        if not present and _mount_sources(ctx, src, dst, desc):
            outcome = "mounted"
        ctx.remember(dst.client.registry, desc.digest, dst.repository)
    return dst.location, outcome


def _mount_sources(ctx: Context, src: End, dst: RegistryEnd, desc: Descriptor) -> list[str]:
    """The other repositories of ``dst``'s registry known to hold ``desc``: this job's, the source's."""
    registry = dst.client.registry
    candidates = list(ctx.locations.get((registry, desc.digest), []))
    if isinstance(src, RegistryEnd) and src.client.registry == registry:
        candidates.append(src.repository)
    return [repo for repo in dict.fromkeys(candidates) if repo != dst.repository]


async def _mount(ctx: Context, src: End, dst: RegistryEnd, desc: Descriptor) -> bool:
    for repo in _mount_sources(ctx, src, dst, desc):
        if await dst.client.mount_blob(dst.repository, desc.digest, repo):
            ctx.emit(Event("mounted", desc.digest.short, size=desc.size, target=str(dst), detail=repo))
            return True
    return False

"""Moving one blob between two ends: skip, mount, or transfer, under the one retry layer."""

from __future__ import annotations

from collections.abc import Awaitable

from ..errors import BadInputError, BlobflowError
from ..progress import Event
from ..registry import Upload
from ..types import Descriptor
from .base import Context, Outcome, failure, retrying
from .copy import registry_opener
from .download import Download
from .ends import End, FileEnd, ImageEnd, LayoutEnd, RawManifest, RegistryEnd, StreamEnd
from .upload import Push, file_opener

__all__ = [
    "HINT_MISSES",
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
    "retrying",
]


def make_transfer(ctx: Context, src: End, dst: End, desc: Descriptor, *,
                  session: Upload | None = None) -> Download | Push:
    """The mover for a pair of ends (regclient's scheme pairing); ``session``: an upload session
    the destination already opened (for a mount it declined)."""
    if isinstance(src, RegistryEnd) and isinstance(dst, LayoutEnd | FileEnd):
        return Download(ctx, src, dst, desc)
    if isinstance(dst, RegistryEnd):
        if isinstance(src, RegistryEnd):
            opener = registry_opener(ctx, src, desc)
            return Push(ctx, dst, desc, opener, session=session)
        if isinstance(src, StreamEnd):
            return Push(ctx, dst, desc, src.open_blob(desc), local=True, session=session)
        opener = file_opener(src.source_path(desc), ctx.config.file_read_size)
        return Push(ctx, dst, desc, opener, local=True, session=session)
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
            mount = await _mount(ctx, src, dst, desc) if isinstance(dst, RegistryEnd) else False
            if mount is True:
                outcome = "mounted"
                return
            mover = make_transfer(ctx, src, dst, desc, session=mount or None)
            ctx.emit(Event("blob_start", digest, size=desc.size, target=str(dst)))
        await mover.run()
        ctx.emit(Event("blob_done", digest, size=desc.size, target=str(dst)))

    try:
        await retrying(ctx, str(dst), attempt, digest=digest,
                       progress=lambda: mover.progress if mover is not None else 0)
    except BaseException as e:
        ctx.emit(Event("failed", digest, size=desc.size, target=str(dst), detail=failure(e)))
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
    present = await retrying(ctx, str(dst), lambda: dst.has_blob(desc), digest=desc.digest.short)
    outcome: Outcome = "skipped" if present else "moved"
    if isinstance(dst, RegistryEnd):
        if not present and any(_mount_sources(ctx, src, dst, desc)):
            outcome = "mounted"
        ctx.remember(dst.client.registry, desc.digest, dst.repository, written=False)
    return dst.location, outcome


HINTS_TRIED = 2  # remembered repositories tried per blob: a stale one costs a declined mount
HINT_MISSES = 4  # declined hint mounts in a row after which a job stops trying a registry's hints


def _mount_sources(ctx: Context, src: End, dst: RegistryEnd, desc: Descriptor) -> tuple[list[str], list[str]]:
    """The other repositories of ``dst``'s registry to mount ``desc`` from: those known to hold it
    (this job put it there, or the source is there), and hints that earlier jobs left in the state dir."""
    registry = dst.client.registry
    known = list(ctx.locations.get((registry, desc.digest), []))
    if isinstance(src, RegistryEnd) and src.client.registry == registry:
        known.append(src.repository)
    known = [repo for repo in dict.fromkeys(known) if repo != dst.repository]
    hints: list[str] = []
    if ctx.hint_misses.get(registry, 0) < HINT_MISSES:
        hints = [repo for repo in ctx.journal.locations.get(registry, desc.digest)
                 if repo != dst.repository and repo not in known][:HINTS_TRIED]
    return known, hints


async def _mount(ctx: Context, src: End, dst: RegistryEnd, desc: Descriptor) -> bool | Upload:
    """True when a repository of ``dst``'s registry mounted the blob. When the last one tried
    declines, the upload session it opened instead is returned for the transfer, so a declined
    mount costs no DELETE and no second POST; not where uploads have a window, which must not
    start before the upload is admitted."""
    known, hints = _mount_sources(ctx, src, dst, desc)
    registry = dst.client.registry
    tries = known + hints
    keep = ctx.limits(registry).upload_window is None
    for i, repo in enumerate(tries):
        try:
            mounted = await dst.client.mount_blob(dst.repository, desc.digest, repo, keep=keep and i == len(tries) - 1)
        except BlobflowError:
            if repo in known:
                raise
            mounted = False  # a remembered repository that is gone, or that these credentials cannot read
        if repo in hints:
            ctx.hint_misses[registry] = 0 if mounted is True else ctx.hint_misses.get(registry, 0) + 1
        if mounted is True:
            ctx.emit(Event("mounted", desc.digest.short, size=desc.size, target=str(dst), detail=repo))
            return True
        if mounted:
            return mounted  # the session of the last decline
    return False

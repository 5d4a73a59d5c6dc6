"""Mirror plans: many copies in one job, sharded deterministically, each image isolated.

A plan is a TOML file (stdlib ``tomllib``: no new dependency, and unlike YAML it never turns a
tag such as ``1.10`` into the number 1.1)::

    [defaults]
    platforms = "all"              # or ["linux/amd64", "linux/arm64"]
    concurrency = 16               # blob transfers over 1 MiB at once, as many small ones (the CLI flag wins)
    rate = 20                      # requests per second per source host (0: unlimited)
    recompress = "zstd:3"          # convert tar layers while they stream (or leave them as they are)

    [[mirror]]
    source = "docker.io/library/alpine"
    destination = "registry.example.com/mirror/alpine"
    tags = ["3.19", "3.20"]        # an explicit list, or select from all tags:
    # include = ['^3\\.\\d+$']     # regexes a tag must match (any of them)
    # exclude = ['-rc']            # regexes that drop a tag
    # newest = 5                   # then keep the newest N by version order

Everything here but :func:`run_mirror` is pure.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from .codec import Codec
from .config import positive_finite
from .errors import BadInputError, BlobflowError
from .images import ImageOutcome, holds_image, transfer_image
from .transfer import Context, RegistryEnd, retrying
from .types import Reference

if TYPE_CHECKING:
    from .registry.client import Quota

__all__ = ["MirrorEntry", "MirrorItem", "MirrorPlan", "load_plan", "run_mirror", "select_tags", "shard_of"]

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class MirrorEntry:
    source: Reference
    destination: Reference
    tags: tuple[str, ...] | None = None
    include: tuple[re.Pattern[str], ...] = ()
    exclude: tuple[re.Pattern[str], ...] = ()
    newest: int | None = None
    platforms: tuple[str, ...] | None = None  # None: every platform, the index as it is


@dataclass(frozen=True, slots=True)
class MirrorPlan:
    entries: tuple[MirrorEntry, ...]
    concurrency: int | None = None
    rate: float | None = None
    recompress: Codec | None = None


@dataclass(frozen=True, slots=True)
class MirrorItem:
    """One image to mirror: source and destination references with their tags."""

    source: Reference
    destination: Reference
    platforms: tuple[str, ...] | None = None


@dataclass
class ImageReport:
    source: str
    destination: str
    status: str  # "copied", "up to date", "failed", "would copy"
    source_digest: str = ""
    destination_digest: str = ""
    bytes: int = 0
    seconds: float = 0.0
    blobs: int = 0
    skipped: int = 0
    mounted: int = 0
    shared: int = 0  # blobs another image of this job moved to the same registry
    error: str = ""


@dataclass
class MirrorResult:
    images: list[ImageReport] = field(default_factory=list)
    requests: dict[str, int] = field(default_factory=dict)
    throttled: dict[str, int] = field(default_factory=dict)  # 429/503 answers per host
    quota: dict[str, Quota] = field(default_factory=dict)  # pull quota left, where a host says
    seconds: float = 0.0
    shard: str = "0/1"
    # blob bytes the job moved: also those of images that failed after some of their blobs
    # landed (an image's own ``bytes`` counts only when it was copied whole)
    bytes: int = 0

    @property
    def failed(self) -> list[ImageReport]:
        return [i for i in self.images if i.status == "failed"]


def _patterns(values: Any, what: str) -> tuple[re.Pattern[str], ...]:
    if values is None:
        return ()
    if isinstance(values, str):
        values = [values]
    if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
        raise BadInputError(f"{what} must be a regex or a list of regexes")
    try:
        return tuple(re.compile(v) for v in values)
    except re.error as e:
        raise BadInputError(f"{what}: invalid regex {e.pattern!r}: {e}") from None


def _platforms(value: Any, what: str) -> tuple[str, ...] | None:
    if value is None or value == "all":
        return None
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value or not all(isinstance(v, str) and v.count("/") in (1, 2)
                                                           for v in value):
        raise BadInputError(f'{what} must be "all" or a list like ["linux/amd64", "linux/arm64"]')
    return tuple(value)


def parse_plan(data: dict[str, Any], *, origin: str = "plan") -> MirrorPlan:
    defaults = data.get("defaults", {})
    if not isinstance(defaults, dict):
        raise BadInputError(f"{origin}: [defaults] must be a table")
    entries_raw = data.get("mirror")
    if not isinstance(entries_raw, list) or not entries_raw:
        raise BadInputError(f"{origin}: no [[mirror]] entries")
    unknown = set(data) - {"defaults", "mirror"}
    if unknown:
        raise BadInputError(f"{origin}: unknown section(s) {', '.join(sorted(unknown))}")
    unknown = set(defaults) - {"platforms", "concurrency", "rate", "recompress"}
    if unknown:  # a typo there (platform, rates) silently mirrored every platform with no limit
        raise BadInputError(f"{origin}: [defaults]: unknown key(s) {', '.join(sorted(unknown))} "
                            "(known: platforms, concurrency, rate, recompress)")
    entries = []
    for i, raw in enumerate(entries_raw, 1):
        what = f"{origin}: mirror entry {i}"
        if not isinstance(raw, dict):
            raise BadInputError(f"{what} must be a table")
        extra = set(raw) - {"source", "destination", "tags", "include", "exclude", "newest", "platforms"}
        if extra:
            raise BadInputError(f"{what}: unknown key(s) {', '.join(sorted(extra))}")
        try:
            source = Reference.parse(str(raw["source"]), default_tag=None)
            destination = Reference.parse(str(raw["destination"]), default_tag=None)
        except KeyError as e:
            raise BadInputError(f"{what} lacks {e.args[0]!r}") from None
        except BadInputError as e:
            raise BadInputError(f"{what}: {e}") from None
        if source.digest or destination.digest:
            raise BadInputError(f"{what}: mirror repositories or tags, not digests")
        tags = raw.get("tags")
        if source.tag:
            if tags is not None:
                raise BadInputError(f"{what}: give the tag in source or in tags, not both")
            tags = [source.tag]
        if tags is not None and (not isinstance(tags, list) or not all(isinstance(t, str) for t in tags)):
            raise BadInputError(f"{what}: tags must be a list of strings")
        newest = raw.get("newest")
        if newest is not None and (not isinstance(newest, int) or isinstance(newest, bool) or newest < 1):
            raise BadInputError(f"{what}: newest must be a whole number of at least 1")
        filters = [k for k in ("include", "exclude", "newest") if raw.get(k) is not None]
        if tags is not None and filters:  # they were ignored: the tags listed were mirrored whatever they said
            raise BadInputError(f"{what}: {', '.join(filters)} select among a repository's tags; with tags "
                                f"(or a tag in source) the tags are given: use one or the other")
        entries.append(MirrorEntry(
            source.with_tag(None), destination.with_tag(None), tuple(tags) if tags is not None else None,
            _patterns(raw.get("include"), f"{what}: include"), _patterns(raw.get("exclude"), f"{what}: exclude"),
            newest, _platforms(raw.get("platforms", defaults.get("platforms")), f"{what}: platforms")))
    _check_overlaps(entries, origin)
    concurrency = defaults.get("concurrency")
    rate = defaults.get("rate")
    if concurrency is not None and (not isinstance(concurrency, int) or concurrency < 1):
        raise BadInputError(f"{origin}: defaults.concurrency must be a whole number of at least 1")
    if rate is not None and (not isinstance(rate, int | float) or isinstance(rate, bool)
                             or not (rate == 0 or positive_finite(rate))):
        raise BadInputError(f"{origin}: defaults.rate must be a number of requests per second")
    recompress = defaults.get("recompress")
    if recompress is not None and not isinstance(recompress, str):
        raise BadInputError(f'{origin}: defaults.recompress must be a string like "zstd:3"')
    try:
        codec = Codec.parse(recompress) if recompress else None
    except BadInputError as e:
        raise BadInputError(f"{origin}: defaults.recompress: {e}") from None
    return MirrorPlan(tuple(entries), concurrency, float(rate) if rate is not None else None, codec)


def _check_overlaps(entries: Sequence[MirrorEntry], origin: str) -> None:
    """Two entries that may write one destination tag: each run, the last to finish wins, so the
    tag flips between two images and every run reports both done (found with two sources into one
    destination). Entries that name their tags may share a repository when no tag is in both."""
    for i, a in enumerate(entries, 1):
        for j, b in enumerate(entries[i:], i + 1):
            if str(a.destination) != str(b.destination):
                continue
            both = None if a.tags is None or b.tags is None else sorted(set(a.tags) & set(b.tags))
            if both is None or both:
                raise BadInputError(f"{origin}: mirror entries {i} and {j} both write {a.destination}"
                                    + (f" (tags {', '.join(both)})" if both else "")
                                    + "; each run would overwrite the other's images")


def load_plan(path: Path | str) -> MirrorPlan:
    import tomllib  # only mirror jobs pay its import (~20 ms of every start otherwise)

    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise BadInputError(f"plan {path} does not exist") from None
    except OSError as e:
        raise BadInputError(f"cannot read plan {path}: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise BadInputError(f"plan {path} is not UTF-8 text") from None
    except tomllib.TOMLDecodeError as e:
        if path.suffix in (".yaml", ".yml"):  # PRODUCT.md names both; blobflow reads TOML (README: mirror)
            raise BadInputError(f"plan {path}: plans are TOML ([[mirror]] tables, see the README), "
                                f"not YAML ({e})") from None
        raise BadInputError(f"plan {path} is not valid TOML: {e}") from None
    return parse_plan(data, origin=str(path))


_PRE_RELEASE = re.compile(r"[-._~]*(alpha|beta|rc|pre|preview|dev|snapshot|nightly|canary)[-._~]*", re.IGNORECASE)


def _version_key(tag: str) -> tuple[tuple[int, int | str], ...]:
    """Version order: numbers compare as numbers (1.9 < 1.10, 3.20 > 3.9); a pre-release comes
    before its release (1.10.0-rc1 < 1.10.0, 1.22rc1 < 1.22.0) and a variant after it (3.20 <
    3.20-alpine < 3.20.1); trailing zero parts are none (2.0 is 2.0.0, so 2.0.0-beta1 < 2.0);
    a leading ``v`` is no text (v2.0 > 1.10); a tag that does not start
    with a number (latest, bookworm) is no version and comes before every one, so ``newest``
    picks versions. The tag itself breaks ties (1.0 against v1.0)."""
    body = tag[1:] if re.match(r"v\d", tag) else tag
    if core := re.match(r"\d+(?:\.\d+)*", body):  # 2.0 is 2.0.0: trailing zero parts say nothing
        body = re.sub(r"(?:\.0+)+$", "", core.group()) + body[core.end():]
    key: list[tuple[int, int | str]] = [(1 if body[:1].isdigit() else 0, "")]
    for part in re.findall(r"\d+|\D+", body):
        if part.isdigit():
            key.append((3, int(part)))
        else:
            key.append((0 if _PRE_RELEASE.fullmatch(part) else 4, part))
    key += [(2, ""), (5, tag)]  # the end: after a pre-release, before a variant
    return tuple(key)


def select_tags(available: Sequence[str], entry: MirrorEntry) -> list[str]:
    """The tags of ``entry`` to mirror, in version order."""
    if entry.tags is not None:
        return list(entry.tags)
    tags = [t for t in available
            if (not entry.include or any(p.search(t) for p in entry.include))
            and not any(p.search(t) for p in entry.exclude)]
    tags.sort(key=_version_key)
    if entry.newest is not None:
        tags = tags[-entry.newest:]
    return tags


def shard_of(source: str, shards: int) -> int:
    """Which of ``shards`` shards mirrors ``source`` (stable across machines and runs)."""
    return int.from_bytes(hashlib.sha256(source.encode()).digest()[:8], "big") % shards


def parse_shard(text: str) -> tuple[int, int]:
    m = re.fullmatch(r"(\d+)/(\d+)", text)
    shard = (int(m.group(1)), int(m.group(2))) if m else None
    if shard is None or not valid_shard(shard):
        raise BadInputError(f"invalid --shard {text!r}: expected I/N with 0 <= I < N, e.g. 0/4")
    return shard


def valid_shard(shard: Any) -> bool:
    """``(I, N)`` with 0 <= I < N: a Kubernetes Indexed Job's completion index counts from 0."""
    return (isinstance(shard, tuple) and len(shard) == 2 and all(type(n) is int for n in shard)
            and 0 <= shard[0] < shard[1])


async def expand(ctx: Context, entry: MirrorEntry, end: Any) -> list[MirrorItem]:
    """The images of one entry (listing the source repository when it selects by pattern)."""
    available: list[str] = []
    if entry.tags is None:
        src = end(ctx, entry.source)
        available = await retrying(ctx, str(src), lambda: src.client.list_tags(src.repository))
    return [MirrorItem(entry.source.with_tag(tag), entry.destination.with_tag(tag), entry.platforms)
            for tag in select_tags(available, entry)]


async def _mirror_one(ctx: Context, item: MirrorItem, end: Any, *, dry_run: bool,
                      convert: Codec | None = None) -> ImageReport:
    report = ImageReport(str(item.source), str(item.destination), "failed")
    started = time.monotonic()
    src: RegistryEnd = end(ctx, item.source)
    dst: RegistryEnd = end(ctx, item.destination)
    try:
        # the destination first: when it lacks the tag, the source's manifest is fetched at once,
        # without a HEAD for its digest first (a request and a round trip to the source per new image)
        dest_digest = await retrying(ctx, str(dst), lambda: dst.manifest_digest(item.destination.reference))
        source_digest = None
        if dest_digest is not None:
            source_digest = await retrying(ctx, str(src), lambda: src.manifest_digest(item.source.reference))
            report.source_digest = str(source_digest or "")
        if source_digest is not None and dest_digest is not None:
            # recompressed or some platforms only, the destination's root says what it was made
            # from; the source as it is counts only when those options would leave it so (a plan
            # that gains recompress converts what it mirrored before, as copy --recompress does)
            current = (dest_digest == source_digest if convert is None and item.platforms is None
                       else await retrying(ctx, str(dst), lambda: holds_image(
                           dst, item.destination.reference, source_digest, convert=convert, platforms=item.platforms)))
            if current:
                report.status, report.destination_digest = "up to date", str(dest_digest)
                return report
        outcome: ImageOutcome = await transfer_image(ctx, src, item.source, dst, item.destination.tag,
                                                     platforms=item.platforms, dry_run=dry_run, convert=convert)
        report.status = "would copy" if dry_run else "copied"
        report.source_digest, report.destination_digest = outcome.source_digest, outcome.digest
        report.bytes, report.blobs = outcome.bytes, outcome.moved
        report.skipped, report.mounted, report.shared = outcome.skipped, outcome.mounted, outcome.shared
    except BlobflowError as e:
        report.error = str(e)
    finally:
        report.seconds = round(time.monotonic() - started, 3)
    return report


async def _settled(futures: Sequence[asyncio.Future[T]]) -> list[T]:
    """The futures' results in order, leaving out the ones cancelled under us. When this task is
    the one being cancelled (Ctrl-C, SIGTERM), that goes on up: swallowing it kept an interrupted
    mirror running to its end, then failing with an internal error instead of exiting 130."""
    results = []
    for fut in futures:
        try:
            results.append(await fut)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise
    return results


async def run_mirror(ctx: Context, plan: MirrorPlan, end: Any, *, shard: tuple[int, int] = (0, 1),
                     dry_run: bool = False, convert: Codec | None = None) -> MirrorResult:
    """Mirror every item of this shard in one job: one scheduler, so shared blobs move once."""
    started = time.monotonic()
    index, shards = shard
    result = MirrorResult(shard=f"{index}/{shards}")
    convert = convert or plan.recompress

    async def mirror_entry(entry: MirrorEntry) -> list[ImageReport]:
        # every entry lists its tags at once and starts its images as soon as it knows them:
        # against a remote source, listing one repository after another costs a round trip each
        try:
            items = await expand(ctx, entry, end)
        except BlobflowError as e:  # this entry fails; the rest of the plan goes on
            return [ImageReport(str(entry.source), str(entry.destination), "failed", error=f"listing tags: {e}")]
        return await _settled([ctx.scheduler.spawn(_mirror_one(ctx, item, end, dry_run=dry_run, convert=convert))
                               for item in items if shard_of(str(item.source), shards) == index])

    for reports in await _settled([ctx.scheduler.spawn(mirror_entry(entry)) for entry in plan.entries]):
        result.images += reports
    result.requests = {name: c.requests for name, c in ctx.pool.clients.items()}
    result.throttled = {name: c.gate.throttles for name, c in ctx.pool.clients.items()}
    result.quota = {name: c.quota for name, c in ctx.pool.clients.items() if c.quota is not None}
    result.bytes = ctx.stats.bytes
    result.seconds = round(time.monotonic() - started, 3)
    return result

"""Pure planning: how a blob of a given size is cut into ranges and chunks, and how it is sent."""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum

from .config import RegistryLimits, parse_size
from .errors import BadInputError

__all__ = ["ByteRange", "Strategy", "UploadPlan", "choose_upload", "refused_body_limit", "split_ranges",
           "stated_limit"]


@dataclass(frozen=True, slots=True, order=True)
class ByteRange:
    """``[start, end)``."""

    start: int
    end: int

    @property
    def length(self) -> int:
        return self.end - self.start


def split_ranges(size: int, part_size: int, *, start: int = 0) -> list[ByteRange]:
    """Cut ``[start, size)`` into consecutive ranges of at most ``part_size`` bytes."""
    if part_size < 1:
        raise ValueError("part_size must be positive")
    return [ByteRange(s, min(s + part_size, size)) for s in range(start, size, part_size)]


def missing_ranges(size: int, done: list[ByteRange]) -> list[ByteRange]:
    """The parts of ``[0, size)`` not covered by ``done``."""
    out, pos = [], 0
    for r in sorted(done):
        if r.start > pos:
            out.append(ByteRange(pos, r.start))
        pos = max(pos, r.end)
    if pos < size:
        out.append(ByteRange(pos, size))
    return out


class Strategy(Enum):
    MONOLITHIC = "monolithic"  # POST, then PUT with the whole body
    STREAM = "stream"          # POST, one PATCH without Content-Range (after a cut, the rest), PUT
    CHUNKED = "chunked"        # POST, PATCH with Content-Range per chunk, PUT


@dataclass(frozen=True, slots=True)
class UploadPlan:
    """``chunk_size``: the most bytes one request carries (for STREAM, one PATCH's body)."""

    strategy: Strategy
    chunk_size: int


DEFAULT_CHUNK = 64 * 1024 * 1024


def choose_upload(size: int, limits: RegistryLimits, *, chunk_size: int | None, monolithic_threshold: int,
                  min_chunk: int = 0, offset: int = 0) -> UploadPlan:
    """Pick how one blob is uploaded, from ``offset`` (the bytes the registry confirmed) on.

    Fewest requests first, as each costs a round trip:

    - a small blob, from its start, goes in one PUT (unless the registry's body cap is smaller);
    - else, where the registry accepts a streamed PATCH and no body cap (``max_body``) is in the
      way, the rest goes in one PATCH without ``Content-Range``. ``max_chunk`` does not apply: it
      caps PATCHes *with* ``Content-Range`` (GHCR refuses those over 4 MiB but streams whole layers);
    - else in ``Content-Range`` chunks no larger than ``max_chunk`` and ``max_body`` (and no smaller
      than the registry's ``OCI-Chunk-Min-Length``).

    An explicit ``chunk_size`` asks for chunked PATCHes. Whatever the strategy, a cut request costs
    only what follows the offset the registry confirms: the upload continues from there.
    """
    body_cap = limits.max_body
    if offset == 0 and size <= monolithic_threshold and (not body_cap or size <= body_cap):
        return UploadPlan(Strategy.MONOLITHIC, size)
    if chunk_size is None and limits.streamed_patch and (not body_cap or size <= body_cap):
        return UploadPlan(Strategy.STREAM, max(1, size - offset))
    caps = [c for c in (limits.max_chunk, body_cap) if c]
    chunk = min([chunk_size or DEFAULT_CHUNK, *caps])
    return UploadPlan(Strategy.CHUNKED, max(chunk, min_chunk, 1))


# "exceeds the maximum permissible limit of 4.00MiB" (GHCR), "max body size is 100MB", ...
_STATED = re.compile(r"\b(?:limit|maximum|max)\b\D{0,40}?(\d+(?:\.\d+)?)\s*(bytes?|[kmgt]i?b|b)\b", re.IGNORECASE)
_TOO_LARGE = re.compile(r"too large|exceed|limit|maximum", re.IGNORECASE)


def stated_limit(message: str) -> int | None:
    """The size a registry's error message names as its limit (``4.00MiB`` -> 4194304), if any."""
    m = _STATED.search(message)
    if m is None:
        return None
    unit = "b" if m.group(2).lower().startswith("byte") else m.group(2)
    try:
        return parse_size(m.group(1) + unit) or None
    except BadInputError:
        return None


def refused_body_limit(status: int, message: str, refused: int) -> int | None:
    """The body cap to learn when a request carrying ``refused`` bytes got ``status`` with ``message``.

    A 413, or a 416 whose message says the body is too large (GHCR's chunk cap), is a size refusal:
    the cap is the limit the message states when it is below ``refused``, else half of ``refused``.
    Any other answer (a 416 about a wrong offset, say) is not about size: None.
    """
    if refused < 2 or status not in (413, 416):
        return None
    if status == 416 and not _TOO_LARGE.search(message):
        return None
    stated = stated_limit(message)
    if stated is not None and stated < refused:
        return stated
    return refused // 2

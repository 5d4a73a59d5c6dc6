"""Pure planning: how a blob of a given size is cut into ranges and chunks, and how it is sent."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from .config import RegistryLimits

__all__ = ["ByteRange", "Strategy", "UploadPlan", "choose_upload", "split_ranges"]


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
    STREAM = "stream"          # POST, one PATCH without Content-Range, PUT
    CHUNKED = "chunked"        # POST, PATCH with Content-Range per chunk, PUT


@dataclass(frozen=True, slots=True)
class UploadPlan:
    strategy: Strategy
    chunk_size: int


def choose_upload(size: int, limits: RegistryLimits, *, chunk_size: int | None, monolithic_threshold: int,
                  min_chunk: int = 0) -> UploadPlan:
    """Pick how one blob is uploaded.

    Small blobs go in one PUT. Larger ones stream in one PATCH where the registry accepts that and
    no body cap is in the way, else in chunks no larger than the registry's caps (and no smaller
    than its ``OCI-Chunk-Min-Length``). An explicit ``chunk_size`` asks for chunked PATCHes.
    """
    caps = [c for c in (limits.max_chunk, limits.max_body) if c]
    if size <= monolithic_threshold and (not limits.max_body or size <= limits.max_body):
        return UploadPlan(Strategy.MONOLITHIC, size)
    if chunk_size is None and limits.streamed_patch and (not limits.max_body or size <= limits.max_body):
        return UploadPlan(Strategy.STREAM, size)
    chunk = chunk_size or 64 * 1024 * 1024
    if caps:
        chunk = min(chunk, *caps)
    chunk = max(chunk, min_chunk, 1)
    return UploadPlan(Strategy.CHUNKED, chunk)

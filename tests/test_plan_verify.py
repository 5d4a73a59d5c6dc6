"""Pure planning (ranges, upload strategy) and the in-order sha256 over parts that arrive in any order."""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from blobflow.config import KNOWN_LIMITS, RegistryLimits
from blobflow.errors import DigestMismatchError
from blobflow.plan import ByteRange, Strategy, choose_upload, missing_ranges, split_ranges
from blobflow.types import Digest
from blobflow.verify import InOrderHasher

MiB = 1024 * 1024


# -- split_ranges / missing_ranges ---------------------------------------------------------------

@given(st.integers(0, 10**12), st.integers(1, 10**12), st.data())
def test_split_ranges_cover_exactly(size: int, part_size: int, data: st.DataObject) -> None:
    part_size = max(part_size, -(-size // 4000))  # at most 4000 parts, to keep the lists short
    start = data.draw(st.integers(0, size))
    parts = split_ranges(size, part_size, start=start)
    if start == size:
        assert parts == []
        return
    assert parts[0].start == start
    assert parts[-1].end == size
    for a, b in itertools.pairwise(parts):
        assert a.end == b.start  # contiguous, no overlap
    assert all(0 < p.length <= part_size for p in parts)
    assert all(p.length == part_size for p in parts[:-1])  # only the last is short
    assert sum(p.length for p in parts) == size - start


def test_split_ranges_examples() -> None:
    assert split_ranges(10, 4) == [ByteRange(0, 4), ByteRange(4, 8), ByteRange(8, 10)]
    assert split_ranges(10, 5, start=3) == [ByteRange(3, 8), ByteRange(8, 10)]
    assert split_ranges(0, 4) == []
    with pytest.raises(ValueError):
        split_ranges(10, 0)


@st.composite
def size_and_done(draw: st.DrawFn) -> tuple[int, list[ByteRange]]:
    """A size and the ranges already written: inside ``[0, size)``, in any order, overlapping or not."""
    size = draw(st.integers(0, 300))
    bound = st.integers(0, size)
    done = draw(st.lists(st.tuples(bound, bound).map(lambda t: ByteRange(min(t), max(t))), max_size=12))
    return size, done


@given(size_and_done())
def test_missing_ranges_is_the_complement(case: tuple[int, list[ByteRange]]) -> None:
    size, done = case
    missing = missing_ranges(size, done)
    covered = [False] * size
    for r in done:
        for i in range(r.start, min(r.end, size)):
            covered[i] = True
    gaps = [False] * size
    for r in missing:
        assert 0 <= r.start < r.end <= size
        for i in range(r.start, r.end):
            assert not gaps[i], "missing ranges overlap"
            gaps[i] = True
    assert gaps == [not c for c in covered]
    assert missing == sorted(missing)


def test_missing_ranges_examples() -> None:
    assert missing_ranges(10, []) == [ByteRange(0, 10)]
    assert missing_ranges(10, [ByteRange(0, 10)]) == []
    assert missing_ranges(10, [ByteRange(6, 8), ByteRange(0, 3)]) == [ByteRange(3, 6), ByteRange(8, 10)]
    assert missing_ranges(10, [ByteRange(0, 4), ByteRange(2, 7)]) == [ByteRange(7, 10)]


# -- choose_upload -------------------------------------------------------------------------------

def test_small_blob_is_monolithic() -> None:
    plan = choose_upload(1000, RegistryLimits(), chunk_size=None, monolithic_threshold=4 * MiB)
    assert (plan.strategy, plan.chunk_size) == (Strategy.MONOLITHIC, 1000)
    assert choose_upload(4 * MiB, RegistryLimits(), chunk_size=None,
                         monolithic_threshold=4 * MiB).strategy is Strategy.MONOLITHIC


def test_large_blob_streams() -> None:
    plan = choose_upload(4 * MiB + 1, RegistryLimits(), chunk_size=None, monolithic_threshold=4 * MiB)
    assert plan.strategy is Strategy.STREAM
    # ghcr.io accepts a streamed PATCH: its 4 MiB cap is on Content-Range chunks
    assert choose_upload(1 << 30, KNOWN_LIMITS["ghcr.io"], chunk_size=None,
                         monolithic_threshold=4 * MiB).strategy is Strategy.STREAM


def test_explicit_chunk_size_is_chunked() -> None:
    plan = choose_upload(100 * MiB, RegistryLimits(), chunk_size=8 * MiB, monolithic_threshold=4 * MiB)
    assert (plan.strategy, plan.chunk_size) == (Strategy.CHUNKED, 8 * MiB)
    capped = choose_upload(100 * MiB, KNOWN_LIMITS["ghcr.io"], chunk_size=10 * MiB, monolithic_threshold=4 * MiB)
    assert (capped.strategy, capped.chunk_size) == (Strategy.CHUNKED, 4 * MiB)
    floored = choose_upload(100 * MiB, RegistryLimits(), chunk_size=1000, monolithic_threshold=4 * MiB,
                            min_chunk=5 * MiB)
    assert (floored.strategy, floored.chunk_size) == (Strategy.CHUNKED, 5 * MiB)


def test_no_streamed_patch_is_chunked_within_caps() -> None:
    limits = RegistryLimits(streamed_patch=False, max_chunk=16 * MiB)
    plan = choose_upload(100 * MiB, limits, chunk_size=None, monolithic_threshold=4 * MiB, min_chunk=1 * MiB)
    assert plan.strategy is Strategy.CHUNKED
    assert 1 * MiB <= plan.chunk_size <= 16 * MiB


def test_body_cap_forbids_monolithic_and_stream() -> None:
    limits = RegistryLimits(max_body=1000)
    plan = choose_upload(3000, limits, chunk_size=None, monolithic_threshold=4 * MiB)
    assert (plan.strategy, plan.chunk_size) == (Strategy.CHUNKED, 1000)


@given(
    size=st.integers(0, 1 << 40),
    max_chunk=st.none() | st.integers(1, 1 << 30),
    max_body=st.none() | st.integers(1, 1 << 30),
    streamed_patch=st.booleans(),
    chunk_size=st.none() | st.integers(1, 1 << 30),
    threshold=st.integers(0, 1 << 26),
    min_chunk=st.integers(0, 1 << 30),
)
def test_choose_upload_respects_limits(size: int, max_chunk: int | None, max_body: int | None, streamed_patch: bool,
                                       chunk_size: int | None, threshold: int, min_chunk: int) -> None:
    caps = [c for c in (max_chunk, max_body) if c is not None]
    min_chunk = min([min_chunk, *caps])  # a registry's minimum never exceeds its own caps
    limits = RegistryLimits(max_chunk=max_chunk, max_body=max_body, streamed_patch=streamed_patch)
    plan = choose_upload(size, limits, chunk_size=chunk_size, monolithic_threshold=threshold, min_chunk=min_chunk)
    body_ok = max_body is None or size <= max_body
    if size <= threshold and body_ok:
        assert plan == type(plan)(Strategy.MONOLITHIC, size)
    elif plan.strategy is Strategy.MONOLITHIC:
        pytest.fail(f"monolithic PUT of {size} bytes over the threshold or body cap")
    elif chunk_size is None and streamed_patch and body_ok:
        assert plan.strategy is Strategy.STREAM
    else:
        assert plan.strategy is Strategy.CHUNKED
        assert plan.chunk_size >= max(1, min_chunk)
        assert all(plan.chunk_size <= c for c in caps)
        if chunk_size is not None:
            assert plan.chunk_size <= max(chunk_size, min_chunk)


# -- InOrderHasher -------------------------------------------------------------------------------

@st.composite
def cut_blob(draw: st.DrawFn, *, min_size: int = 0) -> tuple[bytes, list[ByteRange], list[int]]:
    """Random data (up to 256 KiB), cut into parts at random points, and an arrival order."""
    size = draw(st.integers(min_size, 256 * 1024))
    data = random.Random(draw(st.integers(0, 2**32))).randbytes(size)
    cuts = draw(st.lists(st.integers(1, max(1, size - 1)), max_size=12, unique=True)) if size > 1 else []
    bounds = [0, *sorted(cuts), size]
    parts = [ByteRange(a, b) for a, b in itertools.pairwise(bounds) if a < b or size == 0]
    order = draw(st.permutations(range(len(parts))))
    return data, parts, list(order)


class FileOfParts:
    """A bytearray standing in for the partial file: parts are written at their offsets first."""

    def __init__(self, size: int) -> None:
        self.buf = bytearray(size)
        self.reads = 0

    def write_at(self, offset: int, data: bytes) -> None:
        self.buf[offset : offset + len(data)] = data

    def read_at(self, offset: int, length: int) -> bytes:
        self.reads += 1
        return bytes(self.buf[offset : offset + length])


async def feed(data: bytes, parts: list[ByteRange], order: list[int], *, digest: Digest | None = None,
               concurrent: bool = False, skip: int | None = None, via_put: bool = False,
               ) -> tuple[InOrderHasher, FileOfParts]:
    """Deliver ``parts`` of ``data`` in ``order``, one after the other or all at once.

    Each part is written into the file first and then given to :meth:`InOrderHasher.add`, or, with
    ``via_put``, written and hashed by :meth:`InOrderHasher.put` (what a download does).
    """
    file = FileOfParts(len(data))
    hasher = InOrderHasher(digest or Digest.of(data), len(data), file.read_at)

    async def deliver(i: int, delay: int) -> None:
        for _ in range(delay):
            await asyncio.sleep(0)
        p = parts[i]
        chunk = data[p.start : p.end]
        if via_put:
            await hasher.put(p.start, chunk, file.write_at)
        else:
            file.write_at(p.start, chunk)
            await hasher.add(p.start, chunk)

    todo = [i for i in order if i != skip]
    if concurrent:
        await asyncio.gather(*(deliver(i, n % 3) for n, i in enumerate(todo)))
    else:
        for i in todo:
            await deliver(i, 0)
    return hasher, file


HASH_SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@HASH_SETTINGS
@given(cut_blob(), st.booleans(), st.booleans())
def test_any_arrival_order_gives_the_sha256(blob: tuple[bytes, list[ByteRange], list[int]], concurrent: bool,
                                            via_put: bool) -> None:
    data, parts, order = blob

    async def run() -> None:
        hasher, file = await feed(data, parts, order, concurrent=concurrent, via_put=via_put)
        verified = await hasher.verify()
        assert verified == Digest("sha256", hashlib.sha256(data).hexdigest())
        assert hasher.frontier == len(data)
        if order == sorted(order) and not concurrent:
            assert file.reads == 0  # parts arriving in order are hashed from the buffer, never read back

    asyncio.run(run())


@HASH_SETTINGS
@given(cut_blob(min_size=1), st.data(), st.booleans())
def test_flipped_byte_raises(blob: tuple[bytes, list[ByteRange], list[int]], data_: st.DataObject,
                             via_put: bool) -> None:
    data, parts, order = blob
    at = data_.draw(st.integers(0, len(data) - 1))
    corrupt = bytearray(data)
    corrupt[at] ^= data_.draw(st.integers(1, 255))

    async def run() -> None:
        hasher, _ = await feed(bytes(corrupt), parts, order, digest=Digest.of(data), via_put=via_put)
        with pytest.raises(DigestMismatchError):
            await hasher.verify()

    asyncio.run(run())


@HASH_SETTINGS
@given(cut_blob(min_size=1), st.data(), st.booleans(), st.booleans())
def test_missing_part_raises(blob: tuple[bytes, list[ByteRange], list[int]], data_: st.DataObject,
                             concurrent: bool, via_put: bool) -> None:
    data, parts, order = blob
    skip = data_.draw(st.sampled_from(range(len(parts))))

    async def run() -> None:
        hasher, _ = await feed(data, parts, order, concurrent=concurrent, skip=skip, via_put=via_put)
        assert hasher.frontier <= parts[skip].start
        with pytest.raises(DigestMismatchError):
            await hasher.verify()

    asyncio.run(run())


async def test_more_bytes_than_size_raises() -> None:
    data = b"x" * 100
    hasher = InOrderHasher(Digest.of(data), len(data), FileOfParts(100).read_at)
    with pytest.raises(DigestMismatchError):
        await hasher.add(50, b"y" * 51)


async def test_rewind_starts_over() -> None:
    data = random.Random(7).randbytes(3000)
    file = FileOfParts(len(data))
    hasher = InOrderHasher(Digest.of(data), len(data), file.read_at)
    file.write_at(0, b"\0" * 1000)
    await hasher.add(0, b"\0" * 1000)  # garbage from a first try
    hasher.rewind()
    assert hasher.frontier == 0
    file.write_at(0, data)
    await hasher.add(0, data)
    assert await hasher.verify() == Digest.of(data)

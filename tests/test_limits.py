"""Registry request limits, pure parts: reading a refusal's limit, the upload strategy, and what a
job learns (the Context keeps it per registry and reports it once in the summary)."""

from __future__ import annotations

from pathlib import Path

import pytest

from blobflow.config import KNOWN_LIMITS, EngineConfig, RegistryLimits
from blobflow.plan import Strategy, UploadPlan, choose_upload, refused_body_limit, stated_limit
from blobflow.progress import Event
from blobflow.registry import RegistryPool
from blobflow.scheduler import Scheduler
from blobflow.transfer.base import Context

MiB = 1 << 20
GHCR_416 = ("REQUESTED_RANGE_NOT_SATISFIABLE: the request body is too large and exceeds the maximum "
            "permissible limit of 4.00MiB")


# -- reading a refusal ---------------------------------------------------------------------------

@pytest.mark.parametrize(("message", "limit"), [
    (GHCR_416, 4 * MiB),
    ("request body exceeds the limit of 100MB", 100_000_000),
    ("max body size is 512 KiB", 512 * 1024),
    ("payload over the maximum of 1048576 bytes", 1 << 20),
    ("Request Entity Too Large", None),
    ("", None),
    ("upload resumed at wrong offset 4194304", None),  # a number, but not named as a limit
])
def test_stated_limit(message: str, limit: int | None) -> None:
    assert stated_limit(message) == limit


def test_ghcr_416_teaches_its_stated_cap() -> None:
    assert refused_body_limit(416, GHCR_416, 32 * MiB) == 4 * MiB
    # a stated limit no lower than the refused body cannot be right: halve instead
    assert refused_body_limit(416, GHCR_416, 4 * MiB) == 2 * MiB


def test_413_without_a_message_halves_the_refused_body() -> None:
    assert refused_body_limit(413, "", 256 * MiB) == 128 * MiB
    assert refused_body_limit(413, "Request Entity Too Large", 3) == 1
    assert refused_body_limit(413, "limit of 100MB", 256 * MiB) == 100_000_000


@pytest.mark.parametrize(("status", "message", "refused"), [
    (416, "BLOB_UPLOAD_INVALID: upload resumed at wrong offset", 8 * MiB),  # an offset error, not a size
    (416, "", 8 * MiB),
    (400, GHCR_416, 8 * MiB),
    (500, "", 8 * MiB),
    (413, "", 1),  # nothing left to halve
    (413, "", 0),
])
def test_other_refusals_are_not_limits(status: int, message: str, refused: int) -> None:
    assert refused_body_limit(status, message, refused) is None


# -- strategy --------------------------------------------------------------------------------------

GHCR = KNOWN_LIMITS["ghcr.io"]


def _plan(size: int, limits: RegistryLimits, *, chunk_size: int | None = None, offset: int = 0,
          min_chunk: int = 0) -> UploadPlan:
    return choose_upload(size, limits, chunk_size=chunk_size, monolithic_threshold=4 * MiB,
                         min_chunk=min_chunk, offset=offset)


def test_ghcr_layers_stream_in_one_patch_not_4mib_chunks() -> None:
    assert _plan(3 * MiB, GHCR) == UploadPlan(Strategy.MONOLITHIC, 3 * MiB)
    assert _plan(10**9, GHCR) == UploadPlan(Strategy.STREAM, 10**9)
    # resuming after a cut: the rest, in one more streamed PATCH
    assert _plan(10**9, GHCR, offset=600_000_000) == UploadPlan(Strategy.STREAM, 400_000_000)


def test_a_small_blob_resumed_mid_way_is_not_sent_whole_again() -> None:
    assert _plan(3 * MiB, RegistryLimits(), offset=MiB) == UploadPlan(Strategy.STREAM, 2 * MiB)


def test_chunks_respect_the_learned_caps() -> None:
    # chunks asked for, over GHCR's cap
    assert _plan(100 * MiB, GHCR, chunk_size=16 * MiB) == UploadPlan(Strategy.CHUNKED, 4 * MiB)
    # a 413 taught a 32 MiB body cap: a larger blob goes in chunks of that size
    assert _plan(256 * MiB, RegistryLimits(max_body=32 * MiB)) == UploadPlan(Strategy.CHUNKED, 32 * MiB)
    # ... and a small blob over that cap is not sent in one PUT
    assert _plan(3 * MiB, RegistryLimits(max_body=MiB)) == UploadPlan(Strategy.CHUNKED, MiB)
    # no streamed PATCH and a chunk cap: chunks of that cap, never below the registry's minimum
    assert _plan(100 * MiB, RegistryLimits(streamed_patch=False, max_chunk=4 * MiB), min_chunk=5 * MiB) \
        == UploadPlan(Strategy.CHUNKED, 5 * MiB)


@pytest.mark.parametrize("size", [0, 1, 4 * MiB, 4 * MiB + 1, 33 * MiB, 10**10])
@pytest.mark.parametrize("limits", [
    RegistryLimits(), GHCR, RegistryLimits(max_body=100 * 10**6), RegistryLimits(streamed_patch=False),
    RegistryLimits(streamed_patch=False, max_chunk=4 * MiB, max_body=100 * 10**6),
])
@pytest.mark.parametrize("offset_share", [0.0, 0.5])
def test_every_plan_fits_the_limits_and_needs_few_requests(size: int, limits: RegistryLimits,
                                                           offset_share: float) -> None:
    offset = int(size * offset_share)
    plan = _plan(size, limits, offset=offset)
    left = size - offset
    if plan.strategy is Strategy.MONOLITHIC:
        assert offset == 0 and size <= 4 * MiB
    if plan.strategy is Strategy.CHUNKED:
        assert all(plan.chunk_size <= c for c in (limits.max_chunk, limits.max_body) if c)
    if plan.strategy is not Strategy.CHUNKED:
        assert limits.max_body is None or max(left, 1) <= limits.max_body
    if limits.streamed_patch and (limits.max_body is None or size <= limits.max_body):
        assert plan.strategy is not Strategy.CHUNKED  # one request when the registry allows it


# -- what a job learns -----------------------------------------------------------------------------

def _context(tmp_path: Path, events: list[Event]) -> Context:
    pool = RegistryPool(connections_per_host=1, connect_timeout=1.0, read_timeout=1.0)
    return Context(EngineConfig(state_dir=str(tmp_path)), pool, Scheduler(1), events.append)


def test_learned_limits_last_the_job_per_registry_and_show_once_in_the_summary(tmp_path: Path) -> None:
    events: list[Event] = []
    ctx = _context(tmp_path, events)
    assert ctx.limits("ghcr.io") == GHCR
    assert ctx.learn_limit("r.example", 128 * MiB, ranged=False, why="413")
    assert ctx.learn_limit("r.example", 64 * MiB, ranged=False, why="413")
    assert not ctx.learn_limit("r.example", 64 * MiB, ranged=False, why="413")  # not lower: nothing learned
    assert ctx.learn_limit("r.example", 4 * MiB, ranged=True, why="416")
    assert ctx.limits("r.example") == RegistryLimits(max_body=64 * MiB, max_chunk=4 * MiB)
    assert ctx.limits("other.example") == RegistryLimits()
    # GHCR's built-in entry keeps its other limits when one is learned
    assert ctx.learn_limit("ghcr.io", 2 * MiB, ranged=True, why="416")
    assert ctx.limits("ghcr.io").max_chunk == 2 * MiB and ctx.limits("ghcr.io").max_layer_size == GHCR.max_layer_size
    infos = [e for e in events if e.kind == "info"]
    assert [e.n for e in infos] == [128 * MiB, 64 * MiB, 4 * MiB, 2 * MiB]
    assert ctx.stats.notes == [
        "r.example: learned a request body limit of 64.00 MiB (413); later uploads of this job stay within it",
        "r.example: learned a chunk (PATCH with Content-Range) limit of 4.00 MiB (416); later uploads of this "
        "job stay within it",
        "ghcr.io: learned a chunk (PATCH with Content-Range) limit of 2.00 MiB (416); later uploads of this job "
        "stay within it",
    ]

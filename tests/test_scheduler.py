"""The scheduler: the order policy as a pure function, and the task owner around it.

Jobs are coordinated with events, never with sleeps: a factory signals that it started and waits
for the test to let it finish, so "how many run at once" is observed, not guessed.
"""

from __future__ import annotations

import asyncio
import itertools
import random
from collections.abc import Awaitable, Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from blobflow.errors import DigestMismatchError, TransferError
from blobflow.scheduler import SMALL, JobQueue, JobSpec, Scheduler, pick

MiB = 1024 * 1024
GiB = 1024 * MiB


def spec(key: str, size: int, seq: int) -> JobSpec:
    return JobSpec(key, size, seq)


def lanes(jobs: list[JobSpec]) -> tuple[list[JobSpec], list[JobSpec]]:
    return [j for j in jobs if j.small], [j for j in jobs if not j.small]


def rank_small(j: JobSpec) -> int:
    """The documented priority of the small lane: submission order."""
    return j.seq


def rank_large(j: JobSpec) -> tuple[int, int]:
    """... and of the large lane: larger before smaller, then submission order."""
    return (-j.size, j.seq)


# -- pick: the pure policy -----------------------------------------------------------------------

def test_pick_largest_first() -> None:
    pending = [spec("a", 10 * MiB, 0), spec("b", 3 * GiB, 1), spec("c", 200 * MiB, 2)]
    assert [j.key for j in pick(pending, [], 2)] == ["b", "c"]
    assert [j.key for j in pick(pending, [], 5)] == ["b", "c", "a"]


def test_pick_small_and_large_jobs_have_lanes_of_their_own() -> None:
    pending = [spec("layer", 3 * GiB, 0), spec("config", 2_000, 1), spec("tiny", 500 * 1024, 2),
               spec("layer2", 2 * GiB, 3), spec("layer3", GiB, 4), spec("config2", 1_000, 5)]
    # two slots in each lane: the small ones in submission order, the large ones largest first
    assert [j.key for j in pick(pending, [], 2)] == ["config", "tiny", "layer", "layer2"]


def test_pick_ties_keep_submission_order() -> None:
    pending = [spec(k, 50 * MiB, seq) for seq, k in [(3, "d"), (0, "a"), (2, "c"), (1, "b")]]
    assert [j.key for j in pick(pending, [], 3)] == ["a", "b", "c"]
    smalls = [spec(k, 100, seq) for seq, k in [(1, "y"), (0, "x"), (2, "z")]]
    assert [j.key for j in pick(smalls, [], 2)] == ["x", "y"]


def test_pick_respects_concurrency() -> None:
    pending = [spec(str(i), 100 * MiB, i) for i in range(5)]
    running = [spec("r1", GiB, 10), spec("r2", GiB, 11)]
    assert [j.key for j in pick(pending, running, 3)] == ["0"]
    assert pick(pending, running, 2) == []
    assert pick(pending, [*running, spec("r3", GiB, 12)], 2) == []


def test_pick_small_jobs_start_while_large_ones_hold_every_slot() -> None:
    running = [spec("big1", GiB, 0), spec("big2", GiB, 1)]
    pending = [spec("big3", GiB, 2), spec("cfg1", 1_000, 3), spec("cfg2", 2_000, 4), spec("cfg3", 10, 5)]
    assert [j.key for j in pick(pending, running, 2)] == ["cfg1", "cfg2"]
    # the small lane has its own limit ...
    assert pick(pending[3:], [*running, spec("cfg1", 1_000, 3), spec("cfg2", 2_000, 4)], 2) == []
    # ... and small ones running never keep a large one from a free large slot
    smalls = [spec("cfg1", 1_000, 3), spec("cfg2", 2_000, 4)]
    assert [j.key for j in pick([spec("big3", GiB, 2)], [running[0], *smalls], 2)] == ["big3"]


_counter = itertools.count()


def _job_specs(sizes: st.SearchStrategy[int]) -> st.SearchStrategy[JobSpec]:
    """Specs with unique keys and increasing submission numbers."""
    return st.builds(lambda size: JobSpec(f"j{next(_counter)}", size, next(_counter)), sizes)


small_specs = _job_specs(st.integers(0, SMALL) | st.sampled_from([0, SMALL]))
large_specs = _job_specs(st.integers(SMALL + 1, 8 * GiB) | st.sampled_from([SMALL + 1, 7 * MiB]))
job_specs = small_specs | large_specs


@st.composite
def queue_state(draw: st.DrawFn) -> tuple[list[JobSpec], list[JobSpec], int]:
    """A reachable state: each lane running within the limit."""
    concurrency = draw(st.integers(1, 6))
    pending = draw(st.lists(job_specs, max_size=12))
    running = [*draw(st.lists(small_specs, max_size=concurrency)),
               *draw(st.lists(large_specs, max_size=concurrency))]
    return pending, draw(st.permutations(running)), concurrency


@given(queue_state())
def test_pick_policy_property(state: tuple[list[JobSpec], list[JobSpec], int]) -> None:
    pending, running, concurrency = state
    chosen = pick(pending, running, concurrency)
    keys = [j.key for j in chosen]
    assert len(set(keys)) == len(keys)
    assert all(j in pending for j in chosen)
    for lane_pending, lane_running, lane_chosen, rank in zip(
            lanes(pending), lanes(running), lanes(chosen), (rank_small, rank_large), strict=True):
        free = concurrency - len(lane_running)
        # never more than the lane's limit, whatever the other lane does
        assert len(lane_chosen) <= free
        # work-conserving: a lane's free slots are filled while its jobs wait
        assert len(lane_chosen) == min(free, len(lane_pending))
        # the chosen are the best of the lane's queue, in order
        assert lane_chosen == sorted(lane_pending, key=rank)[: len(lane_chosen)]


@given(st.lists(job_specs, min_size=1, max_size=25), st.integers(1, 4), st.randoms(use_true_random=False))
def test_pick_drains_every_queue(jobs: list[JobSpec], concurrency: int, rnd: random.Random) -> None:
    """Simulate the scheduler: jobs finish in random order; all of them run, each lane within the limit."""
    pending, running, started = list(jobs), [], []
    for _ in range(2 * len(jobs) + 1):
        for j in pick(pending, running, concurrency):
            pending.remove(j)
            running.append(j)
            started.append(j)
        assert all(len(lane) <= concurrency for lane in lanes(running))
        if not running:
            break
        running.remove(rnd.choice(running))
    assert not pending and not running
    assert sorted(j.key for j in started) == sorted(j.key for j in jobs)


@given(st.lists(st.tuples(st.lists(job_specs, max_size=6), st.integers(0, 3)), min_size=1, max_size=12),
       st.integers(1, 4), st.randoms(use_true_random=False))
def test_job_queue_kept_incrementally_starts_what_pick_would(
        steps: list[tuple[list[JobSpec], int]], concurrency: int, rnd: random.Random) -> None:
    """The scheduler keeps its queue between starts (pushes at submit, takes at each start and
    finish); at every step it must choose exactly what :func:`pick` chooses from scratch."""
    queue, pending, running = JobQueue(), [], []
    for submitted, finishing in steps:
        for job in submitted:
            queue.push(job)
            pending.append(job)
        for _ in range(min(finishing, len(running))):
            running.remove(rnd.choice(running))
        expected = pick(pending, running, concurrency)
        assert queue.take(running, concurrency) == expected
        for job in expected:
            pending.remove(job)
            running.append(job)
        assert len(queue) == len(pending)


# -- Scheduler -----------------------------------------------------------------------------------

class Gate:
    """Factories that report when they start and finish only when released; counts the peak."""

    def __init__(self) -> None:
        self.running = 0
        self.peak = 0
        self.calls = 0
        self.release = asyncio.Event()
        self.started = asyncio.Condition()
        self.cancelled: list[str] = []

    def job(self, name: str, result: object = None, *, fail: BaseException | None = None
            ) -> Callable[[], Awaitable[object]]:
        async def run() -> object:
            self.calls += 1
            self.running += 1
            self.peak = max(self.peak, self.running)
            async with self.started:
                self.started.notify_all()
            try:
                await self.release.wait()
                if fail is not None:
                    raise fail
                return result if result is not None else name
            except asyncio.CancelledError:
                self.cancelled.append(name)
                raise
            finally:
                self.running -= 1
        return run

    async def wait_running(self, n: int) -> None:
        async with asyncio.timeout(2), self.started:
            await self.started.wait_for(lambda: self.running >= n)


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_single_flight() -> None:
    gate = Gate()
    async with Scheduler(4) as sched:
        f1 = sched.submit("layer", 10 * MiB, gate.job("first", "result"))
        f2 = sched.submit("layer", 10 * MiB, gate.job("second", "other"))
        await gate.wait_running(1)
        await settle()
        gate.release.set()
        assert await asyncio.gather(f1, f2) == ["result", "result"]
        # a key that already succeeded is not moved again
        assert await sched.submit("layer", 10 * MiB, gate.job("third")) == "result"
    assert gate.calls == 1


async def test_submit_first_tells_the_job_that_ran_from_those_that_shared_it() -> None:
    gate = Gate()
    async with Scheduler(4) as sched:
        first = asyncio.ensure_future(sched.submit_first("layer", 10 * MiB, gate.job("first", "result")))
        second = asyncio.ensure_future(sched.submit_first("layer", 10 * MiB, gate.job("second", "other")))
        await gate.wait_running(1)
        gate.release.set()
        assert await asyncio.gather(first, second) == [("result", True), ("result", False)]
        assert await sched.submit_first("layer", 10 * MiB, gate.job("later")) == ("result", False)
        assert await sched.submit_first("other", 1, gate.job("new", "fresh")) == ("fresh", True)
    assert gate.calls == 2


async def test_single_flight_while_pending() -> None:
    gate = Gate()
    async with Scheduler(1) as sched:
        blocker = sched.submit("blocker", 10 * MiB, gate.job("blocker"))
        await gate.wait_running(1)
        f1 = sched.submit("k", 10 * MiB, gate.job("k1"))
        f2 = sched.submit("k", 10 * MiB, gate.job("k2"))
        gate.release.set()
        assert await asyncio.gather(blocker, f1, f2) == ["blocker", "k1", "k1"]
    assert gate.calls == 2


async def test_failed_job_runs_again_when_resubmitted() -> None:
    gate = Gate()
    gate.release.set()
    async with Scheduler(2) as sched:
        with pytest.raises(TransferError):
            await sched.submit("k", 10, gate.job("a", fail=TransferError("boom")))
        assert await sched.submit("k", 10, gate.job("b")) == "b"
    assert gate.calls == 2


@pytest.mark.parametrize("concurrency", [1, 3])
async def test_concurrency_limit(concurrency: int) -> None:
    gate = Gate()
    async with Scheduler(concurrency) as sched:
        futures = [sched.submit(f"large{i}", 100 * MiB + i, gate.job(f"large{i}")) for i in range(8)]
        await gate.wait_running(concurrency)
        await settle()
        assert gate.running == concurrency  # the rest wait in the queue
        gate.release.set()
        assert sorted(await asyncio.gather(*futures)) == sorted(f"large{i}" for i in range(8))
    assert gate.peak == concurrency
    assert gate.calls == 8


async def test_small_job_is_not_starved_behind_large_ones() -> None:
    gate = Gate()
    small_done = asyncio.Event()
    async with Scheduler(2) as sched:
        larges = [sched.submit(f"L{i}", GiB, gate.job(f"L{i}")) for i in range(4)]
        await gate.wait_running(2)

        async def config() -> str:
            small_done.set()
            return "config"

        small = sched.submit("config", 1_000, config)
        async with asyncio.timeout(2):
            await small_done.wait()  # starts while both slots are still held by large layers
        assert await small == "config"
        assert gate.running == 2
        gate.release.set()
        await asyncio.gather(*larges)
    assert gate.peak == 2


async def test_lanes_run_side_by_side_each_within_its_limit() -> None:
    """Small jobs queued first do not hold the large ones back, and neither lane exceeds the limit."""
    small_gate, large_gate = Gate(), Gate()
    async with Scheduler(2) as sched:
        smalls = [sched.submit(f"cfg{i}", 1_000 + i, small_gate.job(f"cfg{i}")) for i in range(5)]
        larges = [sched.submit(f"L{i}", GiB + i, large_gate.job(f"L{i}")) for i in range(3)]
        await small_gate.wait_running(2)
        await large_gate.wait_running(2)  # while both small slots are still taken
        await settle()
        assert (small_gate.running, large_gate.running) == (2, 2)
        small_gate.release.set()
        large_gate.release.set()
        await asyncio.gather(*smalls, *larges)
    assert (small_gate.peak, large_gate.peak) == (2, 2)
    assert (small_gate.calls, large_gate.calls) == (5, 3)


async def test_failing_job_does_not_cancel_others() -> None:
    gate = Gate()
    async with Scheduler(4) as sched:
        bad = sched.submit("bad", 10 * MiB, gate.job("bad", fail=DigestMismatchError("flipped")))
        good = [sched.submit(f"good{i}", 10 * MiB, gate.job(f"good{i}")) for i in range(3)]
        await gate.wait_running(4)
        gate.release.set()
        with pytest.raises(DigestMismatchError, match="flipped"):
            await bad
        assert await asyncio.gather(*good) == ["good0", "good1", "good2"]
    assert gate.cancelled == []


async def test_spawn_failure_does_not_cancel_siblings() -> None:
    gate = Gate()
    async with Scheduler(4) as sched:
        sibling = sched.spawn(gate.job("sibling")())
        job = sched.submit("blob", 10 * MiB, gate.job("blob"))
        await gate.wait_running(2)

        async def broken() -> None:
            raise TransferError("image 2 failed")

        failed = sched.spawn(broken())
        with pytest.raises(TransferError, match="image 2 failed"):
            await failed
        await settle()
        assert not sibling.done() and not job.done()
        gate.release.set()
        assert await sibling == "sibling"
        assert await job == "blob"
    assert gate.cancelled == []


async def test_a_spawned_future_cancelled_by_its_waiter_cancels_its_work() -> None:
    """A task awaiting a spawned future and cancelled meanwhile (Ctrl-C reaching a mirror entry
    that waits for its images) cancels that future. The work behind it stops, and when the block
    ends nothing tries to set the cancelled future's result (which failed the whole job)."""
    gate = Gate()
    async with Scheduler(2) as sched:
        fut = sched.spawn(gate.job("image")())

        async def wait() -> object:
            return await fut

        waiter = asyncio.create_task(wait())
        await gate.wait_running(1)
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        assert fut.cancelled()
        await settle()
        gate.release.set()
    assert gate.cancelled == ["image"]


async def test_parallel_runs_within_limit_and_keeps_order() -> None:
    gate = Gate()
    async with Scheduler(1) as sched:
        task = asyncio.ensure_future(sched.parallel([gate.job(f"p{i}") for i in range(7)], limit=3))
        await gate.wait_running(3)
        await settle()
        assert gate.running == 3
        gate.release.set()
        assert await task == [f"p{i}" for i in range(7)]
    assert gate.peak == 3


async def test_parallel_first_failure_cancels_the_rest() -> None:
    gate = Gate()
    later_started: list[int] = []

    async def fail_when_others_run() -> None:
        await gate.wait_running(3)
        raise TransferError("part 0 cut", retryable=True)

    def later(i: int) -> Callable[[], Awaitable[object]]:
        async def run() -> None:
            later_started.append(i)
        return run

    parts = [fail_when_others_run, gate.job("p1"), gate.job("p2"), gate.job("p3"), later(4), later(5)]
    async with Scheduler(1) as sched:
        with pytest.raises(TransferError, match="part 0 cut"):
            await sched.parallel(parts, limit=4)
    assert sorted(gate.cancelled) == ["p1", "p2", "p3"]
    assert gate.running == 0
    assert later_started == []  # queued parts never start


async def test_parallel_raises_the_parts_own_error() -> None:
    """Not an ExceptionGroup: the retry layer around a download only classifies BlobflowErrors."""

    async def cut() -> None:
        raise TransferError("part cut", retryable=True)

    async def fine() -> None:
        await asyncio.sleep(0)

    async with Scheduler(1) as sched:
        with pytest.raises(TransferError, match="part cut") as info:
            await sched.parallel([fine, cut, fine], limit=3)
    assert info.value.retryable


async def test_parallel_without_cancel_on_error_finishes_the_other_parts() -> None:
    finished: list[int] = []

    def part(i: int) -> Callable[[], Awaitable[object]]:
        async def run() -> int:
            await asyncio.sleep(0)
            if i == 1:
                raise DigestMismatchError("part 1 corrupt")
            finished.append(i)
            return i
        return run

    async with Scheduler(1) as sched:
        with pytest.raises(DigestMismatchError, match="part 1 corrupt"):
            await sched.parallel([part(i) for i in range(6)], limit=2, cancel_on_error=False)
    assert sorted(finished) == [0, 2, 3, 4, 5]


async def test_cancelling_the_job_leaves_no_tasks() -> None:
    gate = Gate()
    before = asyncio.all_tasks()
    entered = asyncio.Event()

    async def whole_job() -> None:
        async with Scheduler(2) as sched:
            futures = [sched.submit(f"L{i}", GiB, gate.job(f"L{i}")) for i in range(3)]
            futures.append(sched.submit("cfg", 100, gate.job("cfg")))
            sched.spawn(gate.job("image")())
            parts = asyncio.ensure_future(sched.parallel([gate.job(f"part{i}") for i in range(3)], limit=2))
            entered.set()
            await asyncio.gather(parts, *futures)

    outer = asyncio.create_task(whole_job())
    await entered.wait()
    await gate.wait_running(6)  # L0, L1, cfg, image, part0, part1
    outer.cancel()
    with pytest.raises(asyncio.CancelledError):
        await outer
    await settle()
    assert asyncio.all_tasks() - before == set()
    assert gate.running == 0
    assert sorted(gate.cancelled) == ["L0", "L1", "cfg", "image", "part0", "part1"]
    assert gate.calls == 6  # the queued L2 and part2 never started


async def test_cancelling_while_awaiting_one_future_leaves_no_tasks() -> None:
    gate = Gate()
    before = asyncio.all_tasks()

    async def whole_job() -> None:
        async with Scheduler(1) as sched:
            first = sched.submit("L0", GiB, gate.job("L0"))
            sched.submit("L1", GiB, gate.job("L1"))
            await first

    outer = asyncio.create_task(whole_job())
    await gate.wait_running(1)
    outer.cancel()
    with pytest.raises(asyncio.CancelledError):
        await outer
    await settle()
    assert asyncio.all_tasks() - before == set()
    assert gate.cancelled == ["L0"] and gate.calls == 1


async def test_body_error_is_raised_unwrapped_and_cancels_jobs() -> None:
    gate = Gate()
    with pytest.raises(KeyError):
        async with Scheduler(2) as sched:
            sched.submit("L0", GiB, gate.job("L0"))
            await gate.wait_running(1)
            raise KeyError("body failed")
    assert gate.cancelled == ["L0"]


async def test_cancelled_waiter_does_not_break_the_job() -> None:
    gate = Gate()
    async with Scheduler(2) as sched:
        shared = sched.submit("layer", 10 * MiB, gate.job("layer"))
        again = sched.submit("layer", 10 * MiB, gate.job("layer-again"))

        async def image_a() -> object:
            return await shared

        waiter = asyncio.ensure_future(image_a())
        await gate.wait_running(1)
        waiter.cancel()  # one image of the job is cancelled ...
        await settle()
        gate.release.set()
        await settle()
        assert await sched.submit("config", 100, gate.job("config")) == "config"  # ... the job goes on
        assert await again == "layer"  # ... and the other image still gets the shared layer


async def test_jobs_queued_by_spawned_work_finish_when_the_block_exits() -> None:
    gate = Gate()

    async def image(sched: Scheduler) -> list[object]:
        return await asyncio.gather(sched.submit("a", 10 * MiB, gate.job("a")),
                                    sched.submit("b", 10 * MiB, gate.job("b")))

    async with asyncio.timeout(0.5):
        async with Scheduler(1) as sched:
            result = sched.spawn(image(sched))
            await gate.wait_running(1)  # "a" holds the one slot, "b" is queued
            asyncio.get_running_loop().call_soon(gate.release.set)  # "a" finishes once the block exits
    assert result.result() == ["a", "b"]

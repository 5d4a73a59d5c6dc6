"""The scheduler: owns every task of a job.

Blob jobs are queued and started by a pure policy (:func:`pick`, kept incrementally by
:class:`JobQueue`), ``concurrency`` at once in each of two lanes (large blobs, small ones); one
job runs per key (single flight: two images sharing a layer move it once); a blob's parallel
parts run through :meth:`Scheduler.parallel`, image-level work through :meth:`Scheduler.spawn`.
Nothing else in blobflow creates tasks.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import Awaitable, Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

__all__ = ["JobQueue", "JobSpec", "Scheduler", "pick"]

T = TypeVar("T")
SMALL = 1024 * 1024


@dataclass(frozen=True, slots=True)
class JobSpec:
    key: Hashable
    size: int
    seq: int = 0

    @property
    def small(self) -> bool:
        return self.size <= SMALL


def rank(job: JobSpec) -> tuple[int, ...]:
    """A job's place in its lane's queue, lowest first: small jobs in submission order, large
    ones largest first (ties in submission order)."""
    return (job.seq,) if job.small else (-job.size, job.seq)


def pick(pending: Sequence[JobSpec], running: Sequence[JobSpec], concurrency: int) -> list[JobSpec]:
    """Which pending jobs to start now: two lanes of ``concurrency`` slots each.

    Large jobs (over :data:`SMALL`) take their bandwidth-bound lane largest first, so the long
    transfers begin early and the tail is made of short ones. Small jobs (configs, tiny layers)
    cost round trips rather than bandwidth: they have a lane of their own, in submission order,
    so they never wait behind multi-GB layers and never keep one from starting. (With one lane,
    a mirror's hundred configs and tiny layers went first and its large layers started half-way
    through the run, on a link the small ones left mostly idle.)
    """
    queue = JobQueue()
    for job in pending:
        queue.push(job)
    return queue.take(running, concurrency)


class JobQueue:
    """The pending jobs of :func:`pick`'s two lanes, each a heap in :func:`rank` order, so the
    scheduler pays O(log n) per job where re-sorting every pending job at each start and finish
    cost O(n log n): a mirror of a few thousand images queues thousands of blobs."""

    def __init__(self) -> None:
        self._lanes: tuple[list[tuple[tuple[int, ...], int, JobSpec]], ...] = ([], [])
        self._count = itertools.count()  # equal ranks leave in the order they came

    def __len__(self) -> int:
        return len(self._lanes[0]) + len(self._lanes[1])

    def push(self, job: JobSpec) -> None:
        heapq.heappush(self._lanes[0 if job.small else 1], (rank(job), next(self._count), job))

    def take(self, running: Sequence[JobSpec], concurrency: int) -> list[JobSpec]:
        """Remove and return the jobs to start beside ``running``: small ones, then large ones."""
        busy = (sum(1 for j in running if j.small), sum(1 for j in running if not j.small))
        chosen = []
        for lane, used in zip(self._lanes, busy, strict=True):
            for _ in range(min(len(lane), concurrency - used)):
                chosen.append(heapq.heappop(lane)[2])
        return chosen

    def clear(self) -> None:
        for lane in self._lanes:
            lane.clear()


@dataclass(slots=True)
class _Job:
    spec: JobSpec
    factory: Callable[[], Awaitable[Any]]
    future: asyncio.Future[Any]
    waiters: int = 1


@dataclass
class Scheduler:
    concurrency: int
    _tg: asyncio.TaskGroup | None = None
    _pending: dict[Hashable, _Job] = field(default_factory=dict)
    _queue: JobQueue = field(default_factory=JobQueue)  # the specs of _pending, in start order
    _running: dict[Hashable, _Job] = field(default_factory=dict)
    _done: dict[Hashable, asyncio.Future[Any]] = field(default_factory=dict)
    _seq: itertools.count[int] = field(default_factory=itertools.count)

    async def __aenter__(self) -> Scheduler:
        self._tg = asyncio.TaskGroup()
        await self._tg.__aenter__()
        return self

    async def __aexit__(self, et: Any, exc: Any, tb: Any) -> None:
        assert self._tg is not None
        tg = self._tg
        try:
            # _tg stays set while tasks finish: a job ending now still starts the queued ones
            await tg.__aexit__(et, exc, tb)
        except BaseExceptionGroup as group:
            # our tasks never fail (results and errors go to futures), so a group holds only the
            # error of the body, or a cancellation: raise it as it was, not wrapped
            if exc is not None and exc in group.exceptions:
                raise exc from None
            raise
        finally:
            self._tg = None

    def submit(self, key: Hashable, size: int, factory: Callable[[], Awaitable[T]]) -> asyncio.Future[T]:
        """Queue a job; a second submit with the same key shares the first one's result."""
        for table in (self._running, self._pending):
            if key in table:
                table[key].waiters += 1
                return asyncio.shield(table[key].future)
        if key in self._done:
            return asyncio.shield(self._done[key])
        fut: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        job = _Job(JobSpec(key, size, next(self._seq)), factory, fut)
        self._pending[key] = job
        self._queue.push(job.spec)
        self._dispatch()
        # each waiter gets its own view: one waiter cancelled does not cancel the job for the others
        return asyncio.shield(fut)

    async def submit_first(self, key: Hashable, size: int, factory: Callable[[], Awaitable[T]]) -> tuple[T, bool]:
        """``submit``'s result, and whether this call's ``factory`` made it (True) or the call
        shared the job of an earlier submit with the same key (False)."""
        ran = False

        def run() -> Awaitable[T]:
            nonlocal ran
            ran = True
            return factory()

        result = await self.submit(key, size, run)
        return result, ran

    def _dispatch(self) -> None:
        assert self._tg is not None, "Scheduler used outside 'async with'"
        for spec in self._queue.take([j.spec for j in self._running.values()], self.concurrency):
            job = self._pending.pop(spec.key)
            coro = self._run(job)
            try:
                self._tg.create_task(coro)
            except RuntimeError:  # the job is being torn down (cancelled or failed): start nothing
                coro.close()
                job.future.cancel()
                for rest in self._pending.values():
                    rest.future.cancel()
                self._pending.clear()
                self._queue.clear()
                return
            self._running[spec.key] = job

    async def _run(self, job: _Job) -> None:
        try:
            result = await job.factory()
        except asyncio.CancelledError:
            job.future.cancel()
            raise
        except BaseException as e:  # delivered to every waiter; the task itself never fails
            job.future.set_exception(e)
            job.future.exception()  # retrieved here: a job nobody waits for any more logs nothing
        else:
            job.future.set_result(result)
        finally:
            del self._running[job.spec.key]
            if not job.future.cancelled() and job.future.exception() is None:
                self._done[job.spec.key] = job.future
            if self._tg is not None:
                self._dispatch()

    def spawn(self, coro: Awaitable[T]) -> asyncio.Future[T]:
        """Run other work of this job (one image of a mirror) as a task; its outcome goes to the future,
        so one failure does not cancel the rest of the job. Cancelling the future (as a waiter
        does when it is cancelled while awaiting it) cancels the work."""
        assert self._tg is not None, "Scheduler used outside 'async with'"
        fut: asyncio.Future[T] = asyncio.get_running_loop().create_future()

        async def run() -> None:
            try:
                result = await coro
            except asyncio.CancelledError:
                fut.cancel()
                raise
            except BaseException as e:
                if not fut.done():
                    fut.set_exception(e)
            else:
                if not fut.done():
                    fut.set_result(result)

        task = self._tg.create_task(run())
        fut.add_done_callback(lambda f: task.cancel() if f.cancelled() else None)
        return fut

    async def parallel(self, factories: Sequence[Callable[[], Awaitable[T]]], *, limit: int,
                       cancel_on_error: bool = True) -> list[T]:
        """Run a blob's parts, at most ``limit`` at once.

        By default the first failure cancels the rest. With ``cancel_on_error=False`` a failed lane
        stops and the others finish their parts (what they fetched is kept, not thrown away with
        the bytes in flight), then the first failure is raised.
        """
        it = iter(enumerate(factories))
        results: list[Any] = [None] * len(factories)
        errors: list[BaseException] = []

        async def lane() -> None:
            for i, f in it:
                if cancel_on_error:
                    results[i] = await f()
                    continue
                try:
                    results[i] = await f()
                except Exception as e:
                    errors.append(e)
                    return

        try:
            async with asyncio.TaskGroup() as tg:
                for _ in range(min(limit, len(factories))):
                    tg.create_task(lane())
        except BaseExceptionGroup as group:
            # the first real failure, as itself: callers classify errors, not groups of them
            first = next((e for e in group.exceptions if not isinstance(e, asyncio.CancelledError)),
                         group.exceptions[0])
            raise first from None
        if errors:
            raise errors[0]
        return results

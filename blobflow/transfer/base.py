"""What every transfer of a job shares: settings, connections, scheduler, events."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import Literal, TypeVar

from ..config import EngineConfig, RegistryLimits
from ..deadline import DeadlineTracker
from ..journal import Journal
from ..progress import Event, Listener, Stats
from ..registry import RegistryPool
from ..retry import with_retries
from ..scheduler import Scheduler
from ..types import Digest

__all__ = ["Context", "Outcome", "failure", "retrying"]

T = TypeVar("T")

# how a blob came to be at its destination: sent, already there, mounted from another repository
# of the registry, or moved by another image of the job
Outcome = Literal["moved", "skipped", "mounted", "shared"]


@dataclass
class Context:
    config: EngineConfig
    pool: RegistryPool
    scheduler: Scheduler
    listener: Listener | None = None
    stats: Stats = field(default_factory=Stats)
    deadlines: DeadlineTracker | None = None
    journal: Journal = field(init=False)
    # repositories of each registry known to hold a blob: the sources of cross-repository mounts
    locations: dict[tuple[str, Digest], list[str]] = field(default_factory=dict)
    # mounts from an earlier job's hints that the registry declined since one last worked: past a
    # few (a registry wiped since, a repository deleted) the job stops trying them
    hint_misses: dict[str, int] = field(default_factory=dict)
    # limits a registry taught this job by refusing a request as too large (413, GHCR's 416)
    learned: dict[str, RegistryLimits] = field(default_factory=dict)
    _limit_notes: dict[tuple[str, bool], str] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.deadlines is None:
            self.deadlines = DeadlineTracker(self.config, emit=self.emit)
        self.journal = Journal(self.config.state_dir, warn=lambda text: self.emit(Event("info", detail=text)))

    def emit(self, ev: Event) -> None:
        self.stats.observe(ev)
        if self.listener is not None:
            self.listener(ev)

    def limits(self, registry: str) -> RegistryLimits:
        """The configured limits of ``registry``, lowered by what it refused earlier in this job."""
        return self.learned.get(registry) or self.config.limits(registry)

    def learn_limit(self, registry: str, cap: int, *, ranged: bool, why: str) -> bool:
        """Lower ``registry``'s chunk cap (``ranged``: it refused a ``Content-Range`` PATCH) or its
        body cap (any request) to ``cap`` bytes for the rest of the job, and say so in the summary.
        False when that is no lower than what is known: nothing learned.
        """
        limits = self.limits(registry)
        known = limits.max_chunk if ranged else limits.max_body
        if known is not None and known <= cap:
            return False
        self.learned[registry] = replace(limits, max_chunk=cap) if ranged else replace(limits, max_body=cap)
        what = "chunk (PATCH with Content-Range)" if ranged else "request body"
        note = (f"{registry}: learned a {what} limit of {_size(cap)} ({why}); "
                "later uploads of this job stay within it")
        self.emit(Event("info", target=registry, n=cap, detail=note))
        # the summary keeps the latest limit learned per registry and kind, not every step down
        earlier = self._limit_notes.get((registry, ranged))
        if earlier is not None and earlier in self.stats.notes:
            self.stats.notes.remove(earlier)
        self._limit_notes[registry, ranged] = note
        return True

    def remember(self, registry: str, digest: Digest, repository: str, *, written: bool = True) -> None:
        """``repository`` of ``registry`` holds ``digest``: a mount source for the rest of the job,
        and, ``written`` (not a dry run's guess), for later jobs through the state dir."""
        repos = self.locations.setdefault((registry, digest), [])
        if repository not in repos:
            repos.append(repository)
        if written:
            self.journal.locations.add(registry, digest, repository)


def failure(e: BaseException) -> str:
    """What a blob's failed event says, for a --json reader or a listener: the error, or
    "cancelled" when another failure ended the job."""
    return "cancelled" if isinstance(e, asyncio.CancelledError) else str(e) or type(e).__name__


def _size(n: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} bytes"


async def retrying(ctx: Context, what: str, attempt: Callable[[], Awaitable[T]], *, digest: str = "",
                   progress: Callable[[], int] | None = None) -> T:
    """``attempt`` under the job's retry policy (``retries``, backoff base and cap), its retries
    reported to the job's listener; ``progress`` as for :func:`~blobflow.retry.with_retries`."""
    cfg = ctx.config
    return await with_retries(attempt, retries=cfg.retries, base=cfg.backoff_base, cap=cfg.backoff_cap,
                              emit=ctx.emit, what=what, digest=digest, progress=progress)

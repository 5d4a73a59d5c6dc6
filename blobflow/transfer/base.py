"""What every transfer of a job shares: settings, connections, scheduler, events."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..config import EngineConfig
from ..deadline import DeadlineTracker
from ..journal import Journal
from ..progress import Event, Listener, Stats
from ..registry import RegistryPool
from ..scheduler import Scheduler
from ..types import Digest

__all__ = ["Context"]


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

    def __post_init__(self) -> None:
        if self.deadlines is None:
            self.deadlines = DeadlineTracker(self.config, emit=self.emit)
        self.journal = Journal(self.config.state_dir)

    def emit(self, ev: Event) -> None:
        self.stats.observe(ev)
        if self.listener is not None:
            self.listener(ev)

    def remember(self, registry: str, digest: Digest, repository: str) -> None:
        repos = self.locations.setdefault((registry, digest), [])
        if repository not in repos:
            repos.append(repository)

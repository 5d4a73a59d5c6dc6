"""Events the engine emits while it works; renderers (rich, JSON lines) live with the CLI."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

__all__ = ["Event", "EventKind", "Listener", "Stats"]

EventKind = Literal[
    "blob_start",   # a blob transfer begins (size = its size)
    "bytes",        # n more bytes of a blob moved
    "blob_done",    # a blob is committed at the destination
    "skipped",      # already at the destination
    "mounted",      # mounted from another repository of the same registry
    "retry",        # an attempt failed and will be retried (detail = why, delay = seconds)
    "manifest",     # a manifest was written (detail = reference)
    "failed",       # a blob or image failed for good (detail = why)
    "info",         # something worth telling (a learned limit, a fallback)
    "deadline",     # an upload against a window: window_left, projected_finish, slack (seconds)
    "deadline_met",  # such an upload is done: slack = what was left of its window
]


@dataclass(frozen=True, slots=True)
class Event:
    kind: EventKind
    digest: str = ""
    size: int = 0
    n: int = 0
    target: str = ""
    detail: str = ""
    delay: float = 0.0
    time: float = field(default_factory=time.monotonic)
    # deadline events: seconds left in the upload's window, seconds until its projected finish,
    # and the slack between the two (None: not known yet, e.g. before any rate is measured)
    window_left: float | None = None
    projected_finish: float | None = None
    slack: float | None = None

    def to_json(self) -> dict[str, Any]:
        out = {k: v for k, v in asdict(self).items()
               if v is not None and (v not in ("", 0, 0.0) or k == "kind" or k in _DEADLINE_FIELDS)}
        out.pop("time", None)
        return out


Listener = Callable[[Event], None]
_DEADLINE_FIELDS = frozenset({"window_left", "projected_finish", "slack"})


@dataclass(slots=True)
class Stats:
    """What a job did, accumulated from its events."""

    blobs: int = 0
    bytes: int = 0
    skipped: int = 0
    mounted: int = 0
    retries: int = 0
    manifests: int = 0
    failed: int = 0
    notes: list[str] = field(default_factory=list)
    min_slack: float | None = None  # seconds: the least window left by any upload against a window

    def observe(self, ev: Event) -> None:
        if ev.kind == "bytes":
            self.bytes += ev.n
        elif ev.kind == "blob_done":
            self.blobs += 1
        elif ev.kind == "skipped":
            self.skipped += 1
        elif ev.kind == "mounted":
            self.mounted += 1
        elif ev.kind == "retry":
            self.retries += 1
        elif ev.kind == "manifest":
            self.manifests += 1
        elif ev.kind == "failed":
            self.failed += 1
        elif ev.kind == "info":
            self.notes.append(ev.detail)
        elif ev.kind == "deadline_met" and ev.slack is not None:
            self.min_slack = ev.slack if self.min_slack is None else min(self.min_slack, ev.slack)

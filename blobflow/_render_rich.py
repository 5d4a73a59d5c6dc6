"""Live rich bars on a terminal: imported only when there is one (rich costs start-up time)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, TextIO

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    ProgressColumn,
    Task,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.text import Text

from ._render import LogRenderer, format_seconds
from .progress import Event

if TYPE_CHECKING:
    from .api import Result

__all__ = ["RichRenderer", "WindowColumn"]


class WindowColumn(ProgressColumn):
    """For an upload against a registry's window: the time left in it, and the projected slack."""

    def render(self, task: Task) -> Text:
        deadline = task.fields.get("deadline")
        if deadline is None:
            return Text("")
        left = deadline - time.monotonic()
        text = f"window {format_seconds(left)} left"
        slack = task.fields.get("slack")
        if slack is not None:
            text += f", slack {format_seconds(slack)}"
        urgent = left <= 0 or (slack is not None and slack < 0)
        return Text(text, style="red" if urgent else "cyan")


class RichRenderer(LogRenderer):
    """Live bars per blob and overall (bytes, rate, ETA, and for uploads the window left) on a terminal."""

    def __init__(self, *, verbose: bool, quiet: bool, out: TextIO | None = None) -> None:
        super().__init__(verbose=verbose, quiet=quiet, out=out)
        self.console = Console(stderr=True)
        self.progress = Progress(
            TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
            TimeRemainingColumn(), WindowColumn(), console=self.console, transient=True)
        self._tasks: dict[str, TaskID] = {}
        self._slack: dict[str, float] = {}
        self._overall: TaskID | None = None

    def __enter__(self) -> RichRenderer:
        self.progress.start()
        self._overall = self.progress.add_task("total", total=0)
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def result(self, result: Result, extra: dict[str, Any] | None = None) -> None:
        # the bars (transient) go first: the summary printed under a live display was written into
        # the region the next refresh redraws, or beside its last bar
        self.progress.stop()
        super().result(result, extra)

    def __call__(self, ev: Event) -> None:
        assert self._overall is not None
        p = self.progress
        if ev.kind == "blob_start":
            self._tasks[ev.digest] = p.add_task(ev.digest.removeprefix("sha256:"), total=ev.size)
            total = p.tasks[self._overall].total or 0
            p.update(self._overall, total=total + ev.size)
        elif ev.kind == "bytes":
            if ev.digest in self._tasks:
                p.advance(self._tasks[ev.digest], ev.n)
            p.advance(self._overall, ev.n)
        elif ev.kind == "deadline":
            task = self._tasks.get(ev.digest)
            if task is not None and ev.window_left is not None:
                if ev.slack is not None:
                    self._slack[ev.digest] = ev.slack
                p.update(task, deadline=ev.time + ev.window_left, slack=self._slack.get(ev.digest))
            if self.verbose:
                self.console.log(f"{ev.kind}: {ev.digest} {ev.detail}".rstrip())
        elif ev.kind in ("blob_done", "failed"):
            task = self._tasks.pop(ev.digest, None)
            if task is not None:
                p.remove_task(task)
        elif ev.kind in ("retry", "info") or self.verbose:
            self.console.log(f"{ev.kind}: {ev.digest} {ev.detail}".rstrip())

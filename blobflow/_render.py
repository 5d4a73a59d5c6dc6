"""How the CLI shows a job: rich bars on a terminal, JSON lines with --json, log lines with -v."""

from __future__ import annotations

import json
import sys
import time
from typing import Any, TextIO

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

from .api import Result
from .progress import Event

__all__ = ["JsonRenderer", "LogRenderer", "Renderer", "RichRenderer", "WindowColumn", "format_bytes",
           "format_seconds", "summary_line"]


def format_bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def format_seconds(seconds: float) -> str:
    """``42 s``, ``9:41``, ``1:02:03``; negative values keep their sign."""
    sign, s = ("-" if seconds < 0 else ""), round(abs(seconds))
    if s < 60:
        return f"{sign}{s} s"
    h, rest = divmod(s, 3600)
    return f"{sign}{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{sign}{rest // 60}:{rest % 60:02d}"


def summary_line(result: Result) -> str:
    verb = {"pull": "pulled", "push": "pushed", "copy": "copied", "blob get": "downloaded",
            "blob put": "uploaded"}.get(result.operation, result.operation)
    rate = f" ({format_bytes(result.rate)}/s)" if result.bytes else ""
    parts = [f"{verb} {result.blobs} blob{'s' * (result.blobs != 1)}, {format_bytes(result.bytes)} "
             f"in {result.seconds:.2f} s{rate}",
             f"{result.skipped} skipped", f"{result.mounted} mounted"]
    if result.retries:
        parts.append(f"{result.retries} retried")
    if result.min_slack is not None:
        parts.append(f"smallest slack {format_seconds(result.min_slack)} of an upload window")
    return "; ".join(parts)


class Renderer:
    """Receives engine events; prints what a person or a program wants to see."""

    def __call__(self, ev: Event) -> None:
        pass

    def __enter__(self) -> Renderer:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def result(self, result: Result, extra: dict[str, Any] | None = None) -> None:
        pass

    def error(self, message: str, code: int) -> None:
        print(f"blobflow: {message}", file=sys.stderr)


class LogRenderer(Renderer):
    """Plain lines: nothing but the summary, or with ``verbose`` one line per blob event."""

    def __init__(self, *, verbose: bool, quiet: bool, out: TextIO | None = None) -> None:
        self.verbose, self.quiet = verbose, quiet
        self.out = out or sys.stdout
        self._t0 = time.monotonic()

    def __call__(self, ev: Event) -> None:
        if not self.verbose or ev.kind == "bytes":
            return
        t = ev.time - self._t0
        text = f"[{t:7.2f}s] {ev.kind:<10} {ev.digest}"
        if ev.size:
            text += f" {format_bytes(ev.size)}"
        if ev.target:
            text += f" -> {ev.target}"
        if ev.detail:
            text += f" ({ev.detail})"
        if ev.delay:
            text += f" retry in {ev.delay:.1f} s"
        print(text, file=sys.stderr)

    def result(self, result: Result, extra: dict[str, Any] | None = None) -> None:
        if not self.quiet:
            print(summary_line(result), file=self.out)
            for note in result.notes:
                print(f"note: {note}", file=self.out)


class JsonRenderer(Renderer):
    """``--json``: one JSON object per line on stdout; the last one is the summary."""

    def __call__(self, ev: Event) -> None:
        if ev.kind == "bytes":
            return
        self._write({"event": ev.kind, **{k: v for k, v in ev.to_json().items() if k != "kind"}})

    def result(self, result: Result, extra: dict[str, Any] | None = None) -> None:
        self._write({"event": "summary", **result.to_json(), **(extra or {})})

    def error(self, message: str, code: int) -> None:
        self._write({"event": "error", "message": message, "exit_code": code})
        super().error(message, code)

    @staticmethod
    def _write(obj: dict[str, Any]) -> None:
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()


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

    def __init__(self, *, verbose: bool, quiet: bool) -> None:
        super().__init__(verbose=verbose, quiet=quiet)
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

"""How the CLI shows a job: JSON lines with --json, log lines with -v (rich bars: ``_render_rich``)."""

from __future__ import annotations

import json
import sys
import time
from typing import TYPE_CHECKING, Any, TextIO

from .progress import Event

if TYPE_CHECKING:
    from .api import Result

__all__ = ["JsonRenderer", "LogRenderer", "Renderer", "format_bytes",
           "format_seconds", "summary_line"]


def format_bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def format_seconds(seconds: float) -> str:
    """``0.4 s``, ``42 s``, ``9:41``, ``1:02:03``; negative values keep their sign."""
    if abs(seconds) < 9.95:
        return f"{round(seconds, 1) + 0.0:.1f} s"  # + 0.0: no "-0.0"
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
    if result.min_slack is not None and result.min_slack < 0:
        parts.append(f"an upload finished {format_seconds(-result.min_slack)} after its window ended")
    elif result.min_slack is not None:
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

"""Bench results: the maths, the JSON schema, the tables and the plot. Pure: no I/O but files.

Units and methods (what every number of a bench report means):

- **MB/s** is 10^6 bytes per second of *goodput*: the sizes of the blobs a sample committed (or
  verified, for a pull) divided by the sample's wall time, from the first blob submitted to the
  last one done. Bytes re-sent by a retry are not counted twice.
- **Percentiles** use linear interpolation between closest ranks (Hyndman & Fan's type 7, the
  default of NumPy and of R's ``quantile``): for sorted ``x[0..n-1]`` and ``q`` in [0, 100],
  ``h = (n - 1) * q / 100`` and ``P(q) = x[⌊h⌋] + (h - ⌊h⌋) * (x[⌊h⌋ + 1] - x[⌊h⌋])``.
  The median is ``P(50)``.
- **Spread** of a cell's throughput over its samples: ``(max - min) / median``, in percent.

JSON schema ``blobflow-bench/1`` (one object; every raw sample is kept, summaries are derived and
recomputed by :func:`summarize_cell` on load, so a file edited by hand cannot disagree with itself)::

    {"schema": "blobflow-bench/1", "run_id": str, "started": ISO-8601 UTC, "blobflow_version": str,
     "machine": {"os", "python", "arch", "cpus", "memory_bytes"},
     "registry": {"target", "registry", "repository", "copy_to", "cleanup": {"deleted", "failed", "note"}},
     "parameters": {"sizes": [bytes], "concurrency": [int], "ops": [str], "repeat", "duration",
                    "blobs", "chunk_size"},
     "cells": [{"op", "size", "concurrency",
                "samples": [{"seconds", "bytes", "requests", "retries", "throttled", "errors",
                             "blobs": [{"digest", "size", "latency", "ttfb", "outcome", "error"}],
                             "phases": {"HEAD": [seconds], "POST session": [...], ...}}],
                "summary": {...}}],
     "notes": [str], "extra": {...}}

``latency`` is one blob's time from its first request (HEAD for a push, GET for a pull) to its
commit; ``ttfb`` the time from that request to its first byte moved; both in seconds.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from .errors import BadInputError

__all__ = [
    "SCHEMA",
    "compare",
    "format_compare",
    "format_table",
    "load_report",
    "median",
    "percentile",
    "plot_report",
    "save_report",
    "spread_pct",
    "summarize",
    "summarize_cell",
]

SCHEMA = "blobflow-bench/1"
PERCENTILES = (50, 95, 99)
_CELL_KEYS = ("op", "size", "concurrency", "samples")


def percentile(values: Iterable[float], q: float) -> float | None:
    """The ``q``-th percentile (type 7, see the module docstring); None for no values."""
    xs = sorted(values)
    if not xs:
        return None
    if not 0 <= q <= 100:
        raise ValueError(f"percentile {q} is outside [0, 100]")
    h = (len(xs) - 1) * q / 100
    lo = math.floor(h)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (h - lo) * (xs[hi] - xs[lo])


def median(values: Iterable[float]) -> float | None:
    return percentile(values, 50)


def spread_pct(values: Sequence[float]) -> float | None:
    """``(max - min) / median`` in percent; None without values or with a zero median."""
    mid = median(values)
    if not values or not mid:
        return None
    return 100.0 * (max(values) - min(values)) / mid


def summarize(values: Sequence[float]) -> dict[str, Any]:
    """Count, min, max, median, spread and the percentiles of some values."""
    out: dict[str, Any] = {"n": len(values), "min": min(values, default=None), "max": max(values, default=None),
                           "median": median(values), "spread_pct": spread_pct(values)}
    for q in PERCENTILES:
        out[f"p{q}"] = percentile(values, q)
    return out


def mb_per_s(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / 1e6 if seconds > 0 else 0.0


def summarize_cell(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """A cell's summary from its raw samples: throughput over samples, latency over all blobs."""
    rates = [mb_per_s(s["bytes"], s["seconds"]) for s in samples]
    blobs = [b for s in samples for b in s["blobs"] if b.get("error") is None]
    latencies = [b["latency"] for b in blobs if b.get("latency") is not None]
    ttfbs = [b["ttfb"] for b in blobs if b.get("ttfb") is not None]
    phases: dict[str, list[float]] = {}
    for s in samples:
        for name, times in s.get("phases", {}).items():
            phases.setdefault(name, []).extend(times)
    return {
        "samples": len(samples),
        "mb_per_s": summarize(rates),
        "latency_s": summarize(latencies),
        "ttfb_s": summarize(ttfbs),
        "phases": {name: {"count": len(t), "total_s": sum(t), "median_s": median(t), "p95_s": percentile(t, 95)}
                   for name, t in sorted(phases.items())},
        "requests": sum(s["requests"] for s in samples),
        "retries": sum(s["retries"] for s in samples),
        "throttled": sum(s["throttled"] for s in samples),
        "errors": sum(s["errors"] for s in samples),
    }


# -- files -------------------------------------------------------------------------------------

def save_report(report: dict[str, Any], path: str | Path) -> None:
    for cell in report["cells"]:
        cell["summary"] = summarize_cell(cell["samples"])
    Path(path).write_text(json.dumps(report, indent=1) + "\n")


def load_report(path: str | Path) -> dict[str, Any]:
    """A bench report, checked against the schema; summaries recomputed from the raw samples."""
    try:
        doc = json.loads(Path(path).read_text())
    except OSError as e:
        raise BadInputError(f"cannot read {path}: {e.strerror}") from None
    except ValueError:
        raise BadInputError(f"{path}: not JSON") from None
    if not isinstance(doc, dict) or doc.get("schema") != SCHEMA:
        raise BadInputError(f"{path}: not a blobflow bench report (schema {SCHEMA!r} expected)")
    cells = doc.get("cells")
    if not isinstance(cells, list) or not all(isinstance(c, dict) and all(k in c for k in _CELL_KEYS)
                                              for c in cells):
        raise BadInputError(f"{path}: cells must be a list of objects with {', '.join(_CELL_KEYS)}")
    try:
        for cell in cells:
            cell["summary"] = summarize_cell(cell["samples"])
    except (KeyError, TypeError) as e:
        raise BadInputError(f"{path}: a sample lacks {e}") from None
    return doc


# -- tables --------------------------------------------------------------------------------------

def _size(n: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale and n % scale == 0:
            return f"{n // scale}{unit}"
    return f"{n}B"


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v * 1000:.1f}"


def _num(v: float | None, fmt: str = ".1f") -> str:
    return "-" if v is None else format(v, fmt)


def _render(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(header, widths, strict=True))]
    lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(lines)


def format_table(report: dict[str, Any]) -> str:
    """One line per cell: throughput, latency percentiles, TTFB, the busiest phases, counts."""
    header = ["op", "size", "conc", "MB/s", "spread%", "p50 ms", "p95 ms", "p99 ms", "ttfb ms",
              "reqs", "retries", "429/503", "errors", "phases (median ms)"]
    rows = []
    for cell in report["cells"]:
        s = cell.get("summary") or summarize_cell(cell["samples"])
        lat = s["latency_s"]
        phases = ", ".join(f"{name} {_ms(p['median_s'])}" for name, p in s["phases"].items() if name != "auth")
        rows.append([cell["op"], _size(cell["size"]), str(cell["concurrency"]), _num(s["mb_per_s"]["median"]),
                     _num(s["mb_per_s"]["spread_pct"], ".0f"), _ms(lat["p50"]), _ms(lat["p95"]), _ms(lat["p99"]),
                     _ms(s["ttfb_s"]["median"]), str(s["requests"]), str(s["retries"]), str(s["throttled"]),
                     str(s["errors"]), phases])
    return _render(header, rows)


def _cell_key(cell: dict[str, Any]) -> tuple[str, int, int]:
    return cell["op"], int(cell["size"]), int(cell["concurrency"])


def compare(a: dict[str, Any], b: dict[str, Any]) -> list[dict[str, Any]]:
    """Cells present in both runs: B's median throughput and latency over A's (ratio > 1: B is higher)."""
    cells_b = {_cell_key(c): c for c in b["cells"]}
    rows = []
    for cell in a["cells"]:
        other = cells_b.get(_cell_key(cell))
        if other is None:
            continue
        sa = cell.get("summary") or summarize_cell(cell["samples"])
        sb = other.get("summary") or summarize_cell(other["samples"])
        row: dict[str, Any] = {"op": cell["op"], "size": cell["size"], "concurrency": cell["concurrency"]}
        for name, ka, kb in (("mb_per_s", sa["mb_per_s"]["median"], sb["mb_per_s"]["median"]),
                             ("p50_s", sa["latency_s"]["p50"], sb["latency_s"]["p50"]),
                             ("p99_s", sa["latency_s"]["p99"], sb["latency_s"]["p99"])):
            row[f"a_{name}"], row[f"b_{name}"] = ka, kb
            row[f"ratio_{name}"] = kb / ka if ka and kb is not None else None
        rows.append(row)
    return rows


def format_compare(rows: Sequence[dict[str, Any]], a_name: str = "A", b_name: str = "B") -> str:
    header = ["op", "size", "conc", f"{a_name} MB/s", f"{b_name} MB/s", "B/A",
              "A p50 ms", "B p50 ms", "B/A", "A p99 ms", "B p99 ms", "B/A"]
    out = [[r["op"], _size(r["size"]), str(r["concurrency"]),
            _num(r["a_mb_per_s"]), _num(r["b_mb_per_s"]), _num(r["ratio_mb_per_s"], ".2f"),
            _ms(r["a_p50_s"]), _ms(r["b_p50_s"]), _num(r["ratio_p50_s"], ".2f"),
            _ms(r["a_p99_s"]), _ms(r["b_p99_s"]), _num(r["ratio_p99_s"], ".2f")] for r in rows]
    if not out:
        return "no cells in common (same op, size and concurrency)"
    return f"A = {a_name}\nB = {b_name}\n" + _render(header, out)


# -- plot ----------------------------------------------------------------------------------------

PLOT_MISSING = ("--plot needs matplotlib, an optional extra: pip install 'blobflow[plot]' "
                "(or pip install matplotlib)")


def plot_report(report: dict[str, Any], path: str | Path) -> None:
    """Throughput vs concurrency and p50/p99 latency vs concurrency: one line per op and blob size."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise BadInputError(PLOT_MISSING) from None
    fig, (ax_tp, ax_lat) = plt.subplots(1, 2, figsize=(12, 4.8))
    series: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for cell in report["cells"]:
        series.setdefault((cell["op"], cell["size"]), []).append(cell)
    styles = {"push": "-", "pull": "--", "copy": ":"}
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    sizes = sorted({size for _, size in series})
    concs: set[int] = set()
    for (op, size), cells in sorted(series.items()):
        cells.sort(key=lambda c: c["concurrency"])
        xs = [c["concurrency"] for c in cells]
        concs.update(xs)
        sums = [c.get("summary") or summarize_cell(c["samples"]) for c in cells]
        color = colors[sizes.index(size) % len(colors)]
        label = f"{op} {_size(size)}"
        tp = [s["mb_per_s"]["median"] or 0.0 for s in sums]
        lo = [t - (s["mb_per_s"]["min"] or t) for t, s in zip(tp, sums, strict=True)]
        hi = [(s["mb_per_s"]["max"] or t) - t for t, s in zip(tp, sums, strict=True)]
        ax_tp.errorbar(xs, tp, yerr=[lo, hi], fmt="o" + styles.get(op, "-"), color=color, capsize=3, label=label)
        p50 = [(s["latency_s"]["p50"] or 0.0) * 1000 for s in sums]
        p99 = [(s["latency_s"]["p99"] or 0.0) * 1000 for s in sums]
        ax_lat.plot(xs, p50, "o" + styles.get(op, "-"), color=color, label=f"{label} p50")
        ax_lat.plot(xs, p99, "^" + styles.get(op, "-"), color=color, alpha=0.5, label=f"{label} p99")
    reg = report.get("registry", {}).get("registry", "")
    for ax in (ax_tp, ax_lat):
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted(concs), [str(c) for c in sorted(concs)])
        ax.set_xlabel("concurrency (blobs in flight)")
        ax.grid(True, alpha=0.3)
    ax_tp.set_ylabel("throughput (MB/s, median; bars: min-max)")
    ax_tp.set_ylim(bottom=0)
    ax_tp.set_title(f"throughput by blob size — {reg}")
    ax_tp.legend(fontsize=8)
    ax_lat.set_yscale("log")
    ax_lat.set_ylabel("per-blob latency (ms, log scale)")
    ax_lat.set_title("latency p50 (o) and p99 (^)")
    ax_lat.legend(fontsize=7, ncol=2)
    fig.suptitle(f"blobflow bench {report.get('run_id', '')} (blobflow {report.get('blobflow_version', '?')})",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(str(path), dpi=110)
    plt.close(fig)

"""blobflow bench: the maths against hand-computed values, the report schema, compare, a tiny real run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from conftest import Cli

import blobflow
from blobflow.bench import BenchParams, Synth, _bench_ref, run_bench
from blobflow.benchreport import (
    SCHEMA,
    compare,
    format_compare,
    load_report,
    median,
    percentile,
    save_report,
    spread_pct,
    summarize_cell,
)
from blobflow.config import EngineConfig
from blobflow.errors import BadInputError
from blobflow.localreg import LocalRegistry

# -- maths -----------------------------------------------------------------------------------------

def test_percentiles_interpolate_between_closest_ranks() -> None:
    xs = [15.0, 20.0, 35.0, 40.0, 50.0]
    # h = (n - 1) * q / 100 = 4q/100: P50 at h=2 -> 35; P95 at h=3.8 -> 40 + 0.8*10 = 48;
    # P99 at h=3.96 -> 40 + 0.96*10 = 49.6; P25 at h=1 -> 20; P40 at h=1.6 -> 20 + 0.6*15 = 29
    assert percentile(xs, 50) == 35.0
    assert percentile(reversed(xs), 95) == pytest.approx(48.0)
    assert percentile(xs, 99) == pytest.approx(49.6)
    assert percentile(xs, 25) == 20.0
    assert percentile(xs, 40) == pytest.approx(29.0)
    assert percentile(xs, 0) == 15.0 and percentile(xs, 100) == 50.0
    assert median([1.0, 2.0, 3.0, 4.0]) == 2.5
    assert percentile([7.0], 99) == 7.0
    assert percentile([], 50) is None
    with pytest.raises(ValueError):
        percentile(xs, 101)


def test_spread_is_range_over_median() -> None:
    assert spread_pct([90.0, 100.0, 120.0]) == pytest.approx(30.0)
    assert spread_pct([]) is None


def sample(nbytes: int, seconds: float, latencies: list[float], **counts: int) -> dict[str, Any]:
    return {"seconds": seconds, "bytes": nbytes, "requests": counts.get("requests", 3),
            "retries": counts.get("retries", 0), "throttled": counts.get("throttled", 0),
            "errors": counts.get("errors", 0),
            "blobs": [{"digest": f"sha256:{i}", "size": 1, "latency": lat, "ttfb": lat / 10, "outcome": "moved",
                       "error": None} for i, lat in enumerate(latencies)],
            "phases": {"HEAD": [0.01, 0.03], "PATCH": [0.5]}}


def test_cell_summary_by_hand() -> None:
    samples = [sample(10_000_000, 1.0, [0.1, 0.2], retries=1),
               sample(20_000_000, 1.0, [0.3], throttled=2),
               sample(30_000_000, 2.0, [0.4, 0.5], errors=1)]
    s = summarize_cell(samples)
    # MB/s per sample: 10, 20, 15 -> median 15, spread (20 - 10) / 15
    assert s["mb_per_s"]["median"] == 15.0
    assert s["mb_per_s"]["min"] == 10.0 and s["mb_per_s"]["max"] == 20.0
    assert s["mb_per_s"]["spread_pct"] == pytest.approx(100 * 10 / 15)
    # latencies 0.1..0.5 over all blobs: p50 0.3, p95 at h=3.8 -> 0.4 + 0.8*0.1 = 0.48
    assert s["latency_s"]["p50"] == pytest.approx(0.3)
    assert s["latency_s"]["p95"] == pytest.approx(0.48)
    assert s["ttfb_s"]["median"] == pytest.approx(0.03)
    assert s["phases"]["HEAD"] == {"count": 6, "total_s": pytest.approx(0.12), "median_s": pytest.approx(0.02),
                                   "p95_s": pytest.approx(0.03)}
    assert (s["requests"], s["retries"], s["throttled"], s["errors"]) == (9, 1, 2, 1)


# -- schema and compare ----------------------------------------------------------------------------

def report(rate_scale: float) -> dict[str, Any]:
    return {"schema": SCHEMA, "run_id": "r", "started": "2026-01-01T00:00:00+00:00", "blobflow_version": "0.1.0",
            "machine": {"os": "linux"}, "registry": {"target": "x/y", "registry": "x", "repository": "y"},
            "parameters": {"sizes": [1024], "concurrency": [1, 2]}, "notes": [], "extra": {},
            "cells": [{"op": "push", "size": 1024, "concurrency": c,
                       "samples": [sample(int(1_000_000 * rate_scale * c), 1.0, [0.2 / rate_scale])]}
                      for c in (1, 2)]}


def test_report_round_trips_and_is_checked(tmp_path: Path) -> None:
    original = report(1.0)
    save_report(original, tmp_path / "a.json")
    loaded = load_report(tmp_path / "a.json")
    assert loaded == json.loads(json.dumps(original))
    assert loaded["cells"][1]["summary"]["mb_per_s"]["median"] == 2.0
    (tmp_path / "bad.json").write_text(json.dumps({"schema": "other"}))
    with pytest.raises(BadInputError, match="not a blobflow bench report"):
        load_report(tmp_path / "bad.json")
    (tmp_path / "bad2.json").write_text(json.dumps({"schema": SCHEMA, "cells": [{"op": "push"}]}))
    with pytest.raises(BadInputError, match="cells must be"):
        load_report(tmp_path / "bad2.json")


def test_compare_gives_b_over_a() -> None:
    rows = compare(report(1.0), report(2.0))
    assert [(r["concurrency"], r["ratio_mb_per_s"], r["ratio_p50_s"]) for r in rows] == [(1, 2.0, 0.5), (2, 2.0, 0.5)]
    table = format_compare(rows, "a.json", "b.json")
    assert "2.00" in table and "0.50" in table


async def test_bench_compare_cli(cli: Cli, tmp_path: Path) -> None:
    save_report(report(1.0), tmp_path / "a.json")
    save_report(report(1.25), tmp_path / "b.json")
    result = await cli("bench", "compare", str(tmp_path / "a.json"), str(tmp_path / "b.json"))
    assert result.returncode == 0, result.stderr
    assert "1.25" in result.stdout and "push" in result.stdout
    bad = await cli("bench", "compare", str(tmp_path / "a.json"))
    assert bad.returncode == 2


# -- synthetic data and a real run -----------------------------------------------------------------

@pytest.mark.parametrize("target", ["", "  ", "/", "reg.example/app:1.0", "reg.example/app@sha256:" + "a" * 64])
def test_a_bench_target_that_is_no_registry_or_repository_is_named(target: str) -> None:
    """Named as the user gave it, not as the repository the run would have made of it."""
    with pytest.raises(BadInputError, match=f"bench target {target!r}: give a registry or repository"):
        _bench_ref(target, "run1")


def test_synthetic_blobs_resume_at_any_offset() -> None:
    synth = Synth(1)

    async def collect(offset: int) -> bytes:
        return b"".join([p async for p in synth.pieces(b"seed", 3 * (1 << 20) + 5, offset)])

    import asyncio
    whole = asyncio.run(collect(0))
    assert len(whole) == 3 * (1 << 20) + 5
    assert asyncio.run(collect(1_500_000)) == whole[1_500_000:]
    assert synth.digest(b"seed", len(whole)).hex == __import__("hashlib").sha256(whole).hexdigest()
    assert synth.piece(b"seed", 0, 1 << 20) != synth.piece(b"other", 0, 1 << 20)


@pytest.mark.parametrize("duration", [0.0, -1.0, float("nan"), float("inf")])
def test_a_duration_that_is_no_duration_is_bad_input(duration: float) -> None:
    """--duration nan ran its first cell for ever: no elapsed time is >= nan."""
    with pytest.raises(BadInputError, match="--duration must be positive"):
        BenchParams(target="127.0.0.1:9", sizes=(1024,), concurrency=(1,), duration=duration)


async def test_a_registry_that_is_not_there_ends_the_bench_before_its_sweep(cli: Cli) -> None:
    """One refused connection, said as such (exit 1), not a sweep of samples that each spend
    their retries and then a table of zeros with exit 0."""
    result = await cli("bench", "127.0.0.1:9", "--retries", "0", "--sizes", "1MiB", "--concurrency", "1")
    assert result.returncode == 1, result.output
    assert "cannot connect to 127.0.0.1:9" in result.stderr
    assert "MB/s" not in result.output


async def test_tiny_bench_against_the_registry(registry: LocalRegistry, tmp_path: Path) -> None:
    params = BenchParams(target=f"{registry.host}/bench", sizes=(4096, 70_000), concurrency=(1, 2),
                         ops=("push", "pull"), repeat=2, blobs=3)
    result = await run_bench(params, config=EngineConfig(plain_http=True))
    save_report(result, tmp_path / "run.json")
    loaded = load_report(tmp_path / "run.json")
    assert [(c["op"], c["size"], c["concurrency"]) for c in loaded["cells"]] == [
        (op, size, conc) for op in ("push", "pull") for size in (4096, 70_000) for conc in (1, 2)]
    for cell in loaded["cells"]:
        s = cell["summary"]
        assert s["samples"] == 2 and s["errors"] == 0 and s["mb_per_s"]["median"] > 0
        assert all(b["outcome"] == "moved" and b["latency"] > 0 for smp in cell["samples"] for b in smp["blobs"])
        assert ("HEAD" in s["phases"] and "PUT commit" in s["phases"]) if cell["op"] == "push" \
            else "GET headers" in s["phases"]
    assert loaded["registry"]["repository"].startswith("bench/blobflow-bench-")
    # pushes wrote 2 sizes x 2 levels x 2 samples x 3 blobs; pulls read those back
    assert loaded["registry"]["cleanup"] == {"deleted": 24, "failed": 0, "note": "all blobs deleted"}


async def test_the_client_benches_as_the_cli_does(registry: LocalRegistry) -> None:
    """PRODUCT.md lists bench among the Client's operations; it was only ``run_bench(BenchParams)``,
    exported nowhere."""
    lines: list[str] = []
    async with blobflow.Client(EngineConfig(plain_http=True)) as client:
        report = await client.bench(f"{registry.host}/bench", sizes=["4KiB", 70_000], concurrency=[2], repeat=1,
                                    blobs=2, log=lines.append)
    assert [(c["op"], c["size"], c["concurrency"]) for c in report["cells"]] == [
        (op, size, 2) for op in ("push", "pull") for size in (4096, 70_000)]
    assert report["registry"]["cleanup"]["deleted"] == 4 and lines
    with pytest.raises(blobflow.BadInputError, match="unknown op"):
        await blobflow.Client().bench(f"{registry.host}/bench", ops=["delete"])

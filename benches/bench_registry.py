"""`make bench-registry`: a small `blobflow bench` sweep against a throwaway local Distribution registry.

Writes docs/bench-registry.json and docs/bench-registry.png, then checks the bench against the engine
as users run it: it times `Client.push` of an image whose layers match one bench cell (same blob size,
count and concurrency) and says whether the two throughputs agree within 20%.
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
import time
from pathlib import Path

from blobflow import Client, EngineConfig
from blobflow.bench import BenchParams, run_bench
from blobflow.benchreport import format_table, plot_report, save_report, summarize_cell
from blobflow.localreg import LocalRegistry
from blobflow.synth import build_image

MiB = 1 << 20
DOCS = Path(__file__).resolve().parent.parent / "docs"
CHECK_SIZE, CHECK_CONCURRENCY, CHECK_BLOBS = 16 * MiB, 4, 8


async def push_rate(host: str, layout: Path, repeat: int) -> list[float]:
    rates = []
    for i in range(repeat):
        client = Client(EngineConfig(concurrency=CHECK_CONCURRENCY, plain_http=True))
        result = await client.push(layout, f"{host}/pushcheck-{i}:v1")
        rates.append(result.bytes / result.seconds / 1e6)
    return rates


def main() -> int:
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp, LocalRegistry(Path(tmp) / "registry") as registry:
        params = BenchParams(target=f"{registry.host}/bench", sizes=(MiB, 16 * MiB, 64 * MiB),
                             concurrency=(1, 2, 4), ops=("push", "pull"), repeat=3)
        report = asyncio.run(run_bench(params, config=EngineConfig(plain_http=True),
                                       log=lambda m: print(m, file=sys.stderr, flush=True)))
        # the cross-check: `blobflow push` of an image of CHECK_BLOBS layers of CHECK_SIZE at CHECK_CONCURRENCY
        layout = Path(tmp) / "layout"
        build_image(layout, "v1", [CHECK_SIZE] * CHECK_BLOBS, seed=7)
        rates = sorted(asyncio.run(push_rate(registry.host, layout, 3)))
        push_median = rates[len(rates) // 2]
        cell = next(c for c in report["cells"] if c["op"] == "push" and c["size"] == CHECK_SIZE
                    and c["concurrency"] == CHECK_CONCURRENCY)
        bench_median = summarize_cell(cell["samples"])["mb_per_s"]["median"]
        ratio = bench_median / push_median
        report["extra"]["push_crosscheck"] = {
            "size": CHECK_SIZE, "concurrency": CHECK_CONCURRENCY, "blobs": CHECK_BLOBS,
            "bench_push_mb_per_s": bench_median, "blobflow_push_mb_per_s": push_median,
            "blobflow_push_samples_mb_per_s": rates, "ratio": ratio, "agrees_within_20pct": abs(ratio - 1) <= 0.2}
    DOCS.mkdir(exist_ok=True)
    save_report(report, DOCS / "bench-registry.json")
    plot_report(report, DOCS / "bench-registry.png")
    print(format_table(report))
    print(f"\npush {CHECK_BLOBS} x 16MiB at concurrency {CHECK_CONCURRENCY}: bench {bench_median:.1f} MB/s, "
          f"`blobflow push` of an image of those layers {push_median:.1f} MB/s (ratio {ratio:.2f})")
    elapsed = time.monotonic() - started
    print(f"wrote {DOCS / 'bench-registry.json'} and {DOCS / 'bench-registry.png'} in {elapsed:.0f} s")
    return 0 if abs(ratio - 1) <= 0.2 else 1


if __name__ == "__main__":
    sys.exit(main())

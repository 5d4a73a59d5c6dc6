"""blobflow copy vs skopeo copy through the test suite's fault proxy (cut bodies, 429/503).

    .venv/bin/python benches/bench_faults.py [--trials 3]

A ~100 MB image of five gzip layers is pushed to a local Distribution registry; each tool then
copies it to a fresh registry through a FaultProxy that cuts 30% of blob response bodies, or
answers 10% of requests with 429/503 (Retry-After: 1), or both. Prints successes, the median
time and how many source bytes were read per image byte. Everything runs on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from faultproxy import FaultProxy, Faults  # noqa: E402

import blobflow  # noqa: E402
from blobflow.localreg import LocalRegistry  # noqa: E402
from blobflow.synth import build_image  # noqa: E402

MiB = 1 << 20
SCENARIOS = [
    ("30% of blob bodies cut", lambda seed: Faults(cut_response=0.3, seed=seed)),
    ("10% 429/503 (Retry-After: 1)", lambda seed: Faults(status={429: 0.05, 503: 0.05}, retry_after="1", seed=seed)),
    ("both", lambda seed: Faults(cut_response=0.3, status={429: 0.05, 503: 0.05}, retry_after="1", seed=seed)),
]


async def run(trials: int) -> None:
    work = Path(tempfile.mkdtemp(prefix="blobflow-faults-"))
    try:
        build_image(work / "img", "v1", [48 * MiB, 24 * MiB, 16 * MiB, 8 * MiB, 4 * MiB], seed=11)
        size = sum(p.stat().st_size for p in (work / "img" / "blobs" / "sha256").iterdir())
        print(f"image: {size / 1e6:.0f} MB; {trials} trials per cell; blobflow {blobflow.__version__}")
        print(f"{'fault':30} {'tool':8} {'ok':>5} {'median s':>9} {'source bytes':>13}  first error")
        with LocalRegistry(work / "src") as src:
            await blobflow.Client().push(work / "img", f"{src.host}/x/y:v1")
            for n, (name, faults) in enumerate(SCENARIOS):
                for tool in ("skopeo", "blobflow"):
                    ok, secs, ratio, errors = 0, [], [], []
                    for trial in range(trials):
                        tag = f"{n}-{tool}-{trial}"
                        with LocalRegistry(work / f"dst-{tag}") as dst:
                            async with FaultProxy(src.url, faults(100 + trial)) as proxy:
                                env = dict(os.environ)
                                if tool == "skopeo":  # a blob-info cache of its own: no mounts between runs
                                    env |= {"XDG_DATA_HOME": str(work / f"cache-{tag}"),
                                            "_CONTAINERS_ROOTLESS_UID": "65534"}
                                    cmd = ["skopeo", "copy", "-q", "--retry-times", "5", "--src-tls-verify=false",
                                           "--dest-tls-verify=false", f"docker://{proxy.host}/x/y:v1",
                                           f"docker://{dst.host}/x/y:v1"]
                                else:
                                    cmd = [str(ROOT / ".venv" / "bin" / "blobflow"), "copy", "-q", "--retries", "5",
                                           "--state-dir", str(work / f"state-{tag}"), f"{proxy.host}/x/y:v1",
                                           f"{dst.host}/x/y:v1"]
                                started = time.monotonic()
                                proc = await asyncio.create_subprocess_exec(*cmd, stderr=asyncio.subprocess.PIPE,
                                                                            env=env)
                                _, err = await proc.communicate()
                                secs.append(time.monotonic() - started)
                                ratio.append(proxy.counters["bytes_to_client"] / size)
                                if proc.returncode == 0:
                                    ok += 1
                                elif err:
                                    errors.append(err.decode().strip().splitlines()[-1][:100])
                    mid = sorted(secs)[len(secs) // 2]
                    print(f"{name:30} {tool:8} {ok:>3}/{trials} {mid:>9.1f} {sorted(ratio)[len(ratio) // 2]:>12.2f}x"
                          f"  {errors[0] if errors else ''}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=3)
    asyncio.run(run(parser.parse_args().trials))


if __name__ == "__main__":
    main()

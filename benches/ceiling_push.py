"""The registry's own push ceiling: raw parallel uploads with curl, next to blobflow push.

    .venv/bin/python benches/ceiling_push.py [LAYOUT] [--repeat 3]

LAYOUT defaults to the 1 GiB image bench_engine.py caches under .bench/. Each run pushes every
blob of the image to a fresh local Distribution registry: curl does one POST, one streamed
PATCH streaming the whole file (-T) and one PUT per blob, 8 at once, with no hashing or checking at all,
which is as fast as this registry can take the bytes. Alternating with it, `blobflow push`
(start-up included). Prints each time and the medians; blobflow/ceiling near 1.0 means the
registry, not the client, is the limit.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import shutil
import statistics
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

from blobflow.localreg import LocalRegistry

ROOT = Path(__file__).resolve().parent.parent


def _blobs(layout: Path) -> list[dict[str, object]]:
    index = json.loads((layout / "index.json").read_text())
    manifest = json.loads((layout / "blobs" / "sha256" / index["manifests"][0]["digest"][7:]).read_text())
    return [manifest["config"], *manifest["layers"]]


def _curl_push(layout: Path, host: str) -> None:
    def one(blob: dict[str, object]) -> None:
        digest = str(blob["digest"])
        start = urllib.request.Request(f"http://{host}/v2/ceiling/img/blobs/uploads/", method="POST")
        with urllib.request.urlopen(start) as resp:
            location = resp.headers["Location"]
        head = subprocess.run(["curl", "-sS", "-f", "-X", "PATCH", "-D", "-", "-o", "/dev/null",
                               "-H", "Content-Type: application/octet-stream",
                               "-T", str(layout / "blobs" / "sha256" / digest[7:]), location],
                              capture_output=True, text=True, check=True).stdout
        location = next(line.split(": ", 1)[1].strip() for line in head.splitlines()
                        if line.lower().startswith("location:"))
        sep = "&" if "?" in location else "?"
        subprocess.run(["curl", "-sS", "-f", "-X", "PUT", "-o", "/dev/null", f"{location}{sep}digest={digest}"],
                       check=True)

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        list(pool.map(one, _blobs(layout)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cached = sorted((ROOT / ".bench").glob("images/full-*"))
    parser.add_argument("layout", nargs="?", type=Path, default=cached[0] if cached else None)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    if args.layout is None or not (args.layout / "index.json").exists():
        raise SystemExit("no layout: pass one, or run `make bench` once to build .bench/images/full-*")
    work = Path(tempfile.mkdtemp(prefix="blobflow-ceiling-"))
    times: dict[str, list[float]] = {"curl": [], "blobflow": []}
    try:
        for rep in range(args.repeat):
            for tool in times:
                with LocalRegistry(work / f"reg-{rep}-{tool}") as reg:
                    started = time.monotonic()
                    if tool == "curl":
                        _curl_push(args.layout, reg.host)
                    else:
                        subprocess.run([str(ROOT / ".venv" / "bin" / "blobflow"), "push", "-q", "--state-dir",
                                        str(work / f"state-{rep}"), str(args.layout), f"{reg.host}/bench/img:v1"],
                                       check=True)
                    times[tool].append(time.monotonic() - started)
                    print(f"  {tool:8} #{rep + 1}: {times[tool][-1]:.2f} s", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    ceiling, ours = statistics.median(times["curl"]), statistics.median(times["blobflow"])
    print(f"push of {args.layout.name}: curl ceiling {ceiling:.2f} s, blobflow {ours:.2f} s (medians); "
          f"ceiling/blobflow = {ceiling / ours:.2f}")


if __name__ == "__main__":
    main()

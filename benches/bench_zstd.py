"""copy --recompress zstd against skopeo copy --dest-compress-format zstd, on one image.

    .venv/bin/python benches/bench_zstd.py [LAYOUT] [--repeat 1]

LAYOUT defaults to the 1 GiB image bench_engine.py caches under .bench/ (8 gzip layers of random
data). The image is pushed once to a local registry; each tool then copies it to a fresh
registry converting every layer to zstd (level 3 for both). Prints wall time, CPU seconds of the
tool, and the size of the layers before and after; checks that each tool's result decompresses
to the config's diff_ids (via skopeo --dest-decompress) on the last run.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from blobflow.localreg import LocalRegistry

ROOT = Path(__file__).resolve().parent.parent


def _timed(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, float]:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.monotonic()
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    return time.monotonic() - started, cpu


def _layer_bytes(host: str, work: Path, name: str) -> tuple[int, list[str]]:
    """Total compressed layer size at the destination, and the sha256 of each decompressed layer."""
    out = work / f"dir-{name}"
    subprocess.run(["skopeo", "copy", "-q", "--src-tls-verify=false", f"docker://{host}/z/img:v1", f"dir:{out}"],
                   check=True)
    manifest = json.loads((out / "manifest.json").read_text())
    size = sum(layer["size"] for layer in manifest["layers"])
    raw = work / f"raw-{name}"
    subprocess.run(["skopeo", "copy", "-q", "--dest-decompress", "--src-tls-verify=false",
                    f"docker://{host}/z/img:v1", f"dir:{raw}"], check=True)
    rmanifest = json.loads((raw / "manifest.json").read_text())
    diffs = []
    for layer in rmanifest["layers"]:
        h = hashlib.sha256()
        with open(raw / layer["digest"][7:], "rb") as f:
            while chunk := f.read(1 << 22):
                h.update(chunk)
        diffs.append("sha256:" + h.hexdigest())
    config = json.loads((raw / rmanifest["config"]["digest"][7:]).read_text())
    if diffs != config["rootfs"]["diff_ids"]:
        raise SystemExit(f"{name}: decompressed layers do not match the config's diff_ids")
    return size, diffs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cached = sorted((ROOT / ".bench").glob("images/full-*"))
    parser.add_argument("layout", nargs="?", type=Path, default=cached[0] if cached else None)
    parser.add_argument("--repeat", type=int, default=1)
    args = parser.parse_args()
    if args.layout is None or not (args.layout / "index.json").exists():
        raise SystemExit("no layout: pass one, or run `make bench` once to build .bench/images/full-*")
    work = Path(tempfile.mkdtemp(prefix="blobflow-zstd-"))
    try:
        with LocalRegistry(work / "src") as src:
            subprocess.run([str(ROOT / ".venv" / "bin" / "blobflow"), "push", "-q", "--state-dir",
                            str(work / "st"), str(args.layout), f"{src.host}/z/img:v1"], check=True)
            gz_size, _ = _layer_bytes(src.host, work, "source")
            print(f"source: {args.layout.name}, gzip layers {gz_size / 1e6:.1f} MB")
            for rep in range(args.repeat):
                for tool in ("blobflow", "skopeo"):
                    with LocalRegistry(work / f"dst-{tool}-{rep}") as dst:
                        env = dict(os.environ)
                        if tool == "blobflow":
                            cmd = [str(ROOT / ".venv" / "bin" / "blobflow"), "copy", "-q", "--recompress", "zstd:3",
                                   "--state-dir", str(work / f"st-{rep}"), f"{src.host}/z/img:v1",
                                   f"{dst.host}/z/img:v1"]
                        else:
                            env |= {"XDG_DATA_HOME": str(work / f"cache-{rep}"), "_CONTAINERS_ROOTLESS_UID": "65534"}
                            cmd = ["skopeo", "copy", "-q", "--src-tls-verify=false", "--dest-tls-verify=false",
                                   "--dest-compress-format", "zstd", "--dest-compress-level", "3",
                                   f"docker://{src.host}/z/img:v1", f"docker://{dst.host}/z/img:v1"]
                        seconds, cpu = _timed(cmd, env)
                        size, _ = _layer_bytes(dst.host, work, f"{tool}-{rep}")
                        rate = gz_size / seconds / 1e6
                        print(f"  {tool:8} #{rep + 1}: {seconds:6.2f} s  {rate:6.1f} MB/s of gzip input"
                              f"  cpu {cpu:6.2f} s  zstd layers {size / 1e6:.1f} MB  (diff_ids verified)", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

"""`make demo`: the main job on a throwaway local registry.

Starts two Distribution registries on loopback, generates a multi-layer image, pushes it with
blobflow, copies it to another registry, pulls it back into an OCI layout, checks every digest,
prints what moved and how fast, and stops the registries.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .localreg import LocalRegistry
from .synth import build_image

LAYERS = [128 << 20, 64 << 20, 32 << 20, 16 << 20, 4 << 20, 1 << 20]


def _blobflow(*args: str) -> None:
    cmd = [sys.executable, "-m", "blobflow", *args]
    print(f"$ blobflow {' '.join(args)}", flush=True)
    subprocess.run(cmd, check=True)


def _verify_layout(root: Path) -> int:
    """Every blob's sha256 equals its name; every manifest's blobs are present. Returns blob count."""
    count = 0
    for path in (root / "blobs" / "sha256").iterdir():
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(1 << 22):
                h.update(chunk)
        if h.hexdigest() != path.name:
            raise SystemExit(f"demo: {path} does not match its digest")
        count += 1
    index = json.loads((root / "index.json").read_text())
    for entry in index["manifests"]:
        manifest = json.loads((root / "blobs" / "sha256" / entry["digest"].split(":")[1]).read_text())
        for d in [manifest["config"], *manifest["layers"]]:
            if not (root / "blobs" / "sha256" / d["digest"].split(":")[1]).exists():
                raise SystemExit(f"demo: {d['digest']} is missing from the pulled layout")
    return count


def main() -> int:
    work = Path(tempfile.mkdtemp(prefix="blobflow-demo-"))
    try:
        total = sum(LAYERS)
        print(f"generating an image of {len(LAYERS)} random layers ({total / 1e6:.0f} MB) ...", flush=True)
        t = time.monotonic()
        build_image(work / "image", "v1", LAYERS, seed=7)
        print(f"  done in {time.monotonic() - t:.1f} s", flush=True)
        with LocalRegistry(work / "reg-a") as a, LocalRegistry(work / "reg-b") as b:
            print(f"registries: {a.host} and {b.host}", flush=True)
            _blobflow("push", str(work / "image"), f"{a.host}/demo/app:v1")
            _blobflow("copy", f"{a.host}/demo/app:v1", f"{b.host}/mirror/app:v1")
            _blobflow("copy", f"{b.host}/mirror/app:v1", f"{b.host}/other/app:v1")
            _blobflow("pull", f"{b.host}/mirror/app:v1", str(work / "pulled"))
            _blobflow("push", str(work / "image"), f"{a.host}/demo/app:v1")
        blobs = _verify_layout(work / "pulled")
        src = json.loads((work / "image" / "index.json").read_text())["manifests"][0]["digest"]
        got = json.loads((work / "pulled" / "index.json").read_text())["manifests"][0]["digest"]
        if src != got:
            raise SystemExit(f"demo: pulled manifest {got} differs from pushed {src}")
        print(f"verified: {blobs} blobs in the pulled layout match their digests; manifest {got[:19]} "
              "is identical end to end")
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""blobflow vs skopeo: pull, push and copy of a 1 GiB image between throwaway local registries.

Run from the repository's venv (``make bench``, ``make bench-quick``)::

    .venv/bin/python benches/bench_engine.py [--quick] [--repeat N] [--json FILE] [--ops pull,push,copy]

What is measured, and how it is kept fair:

* The image (8 gzip layers of random bytes, 1 GiB; ``--quick``: 128 MiB) is built once with
  :func:`blobflow.synth.build_image` from a fixed seed and cached under ``.bench/images/``.
* One source registry (for pull and copy) is filled once, by skopeo, so neither tool wrote it.
* Every timed run gets a fresh, empty destination: a new Distribution registry for push and copy,
  a new empty directory for pull. skopeo gets a fresh blob-info cache for every run (its cache
  directory is moved to an empty temp dir through the environment, and the bench checks that the
  system cache was not touched), so it never mounts or skips from memory of an earlier run.
  blobflow gets a fresh ``--state-dir`` for every run, so no resume journal can skip work.
* Both tools run under the same wrapper (``/usr/bin/time`` when present, else ``os.wait4``), which
  gives peak RSS and CPU seconds; wall time is measured around the whole process, so it includes
  start-up. The tools alternate which goes first in each repeat. Page cache: the source layouts and
  the source registry's storage are read once before the timed runs, and dirty pages are flushed
  (``sync``) before every timed run, so no run inherits another's writeback.
* Correctness is checked after the last repeat of each op for both tools: every blob of a pulled
  layout hashes to its name and the tag points at the source manifest; a destination registry
  serves the source manifest digest and every blob hashes to its digest.
* A raw ceiling per op, run as a third "tool" in the same rotation, fresh destination each time:
  a bash script of plain curl requests, every blob at once, no hashing and no checks (pull: GET
  into files, then fsync each; push: POST + one monolithic PUT per blob; copy: POST + a PUT whose
  body is piped from the source GET; then the manifest). Issue #4 counts an op as meeting its
  target at >= 90% of this ceiling where the registry or the disk is the limit, and the report
  says per op whether it does. Also for pull: the registry to /dev/null (one stream per layer,
  and 32 MiB ranges on 16 streams), what it can serve without a disk.
* Copy RSS scaling: blobflow's peak RSS copying the image, and an image whose largest layer is
  doubled (skipped with ``--quick``); PRODUCT.md promises memory that does not grow with blob size.

Everything talks to 127.0.0.1 only; registries, child processes and temp dirs are cleaned up on
failure and on Ctrl-C / SIGTERM.
"""

from __future__ import annotations

import argparse
import compileall
import contextlib
import hashlib
import json
import os
import platform
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import blobflow
from blobflow.localreg import LocalRegistry
from blobflow.synth import build_image

REPO_ROOT = Path(__file__).resolve().parent.parent
BENCH_DIR = REPO_ROOT / ".bench"
MiB = 1 << 20
MB = 1_000_000
SEED = 20240611
TAG = "v1"
REPO = "bench/img"
BIG_REPO = "bench/big"
FULL_LAYERS_MIB = (512, 256, 128, 64, 32, 16, 8, 8)
QUICK_LAYERS_MIB = (64, 32, 16, 8, 4, 2, 1, 1)
OPS = ("pull", "push", "copy")
TOOLS = ("blobflow", "skopeo")
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
RAW = "curl"  # the raw ceiling: plain curl requests, run like a third tool (see raw_script)
TARGETS = {"pull": 2.0, "push": 1.5, "copy": 1.5}  # issue #4: skopeo/blobflow time ratio
CEILING_TARGET = 0.90  # ... or blobflow at >= 90% of the raw ceiling where the registry or disk is the limit
RUN_TIMEOUT = 1800.0
QUIET_SHARE = 0.15  # "quiet": the machine's CPUs less than 15% busy over a one-second window
CEILING_PART = 32 * MiB
CEILING_RANGE_STREAMS = 16
GNU_TIME = "/usr/bin/time"
SYSTEM_SKOPEO_CACHE = Path("/var/lib/containers/cache/blob-info-cache-v1.boltdb")
PROXY_VARS = ("http_proxy", "https_proxy", "all_proxy", "no_proxy")
MANIFEST_ACCEPT = ", ".join([
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
])
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback only, never a proxy


class BenchError(Exception):
    """A run failed, timed out or produced a wrong result: the bench stops with this message."""


# ---------------------------------------------------------------------------------------------
# records


@dataclass
class Sample:
    op: str
    tool: str
    repeat: int
    seconds: float
    peak_rss_kib: int
    user_s: float
    sys_s: float
    registry_cpu_s: float
    other_cpu_s: float  # CPU used on the machine by anything else during the run (shared-machine noise)
    settle_wait_s: float  # how long the bench waited for the machine to be quiet before the run
    argv: list[str]


@dataclass
class Measured:
    seconds: float
    peak_rss_kib: int
    user_s: float
    sys_s: float
    registry_cpu_s: float
    machine_cpu_s: float

    @property
    def other_cpu_s(self) -> float:
        return max(0.0, self.machine_cpu_s - self.user_s - self.sys_s - self.registry_cpu_s)


@dataclass
class Image:
    name: str
    layout: Path
    layer_sizes: list[int]
    manifest_digest: str
    manifest_size: int
    blobs: list[dict[str, Any]]  # config and layers: {"digest", "size", "mediaType"}

    @property
    def total_bytes(self) -> int:
        return self.manifest_size + sum(int(b["size"]) for b in self.blobs)

    @property
    def layers(self) -> list[dict[str, Any]]:
        return self.blobs[1:]


@dataclass
class Results:
    argv: list[str]
    machine: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    image: dict[str, Any] = field(default_factory=dict)
    samples: list[Sample] = field(default_factory=list)
    ceiling: dict[str, list[float]] = field(default_factory=dict)
    rss_scaling: dict[str, Any] = field(default_factory=dict)
    startup: dict[str, list[float]] = field(default_factory=dict)
    sha256_mb_s: float | None = None
    notes: list[str] = field(default_factory=list)
    error: str | None = None

    def of(self, op: str, tool: str) -> list[Sample]:
        return [s for s in self.samples if s.op == op and s.tool == tool]


# ---------------------------------------------------------------------------------------------
# small helpers


def log(msg: str) -> None:
    print(msg, flush=True)


def child_env(**extra: str) -> dict[str, str]:
    """The environment for tools: no proxy settings (everything is on 127.0.0.1), plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if k.lower() not in PROXY_VARS}
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
    env.update(extra)
    return env


def blobflow_cmd() -> list[str]:
    script = Path(sys.executable).parent / "blobflow"
    return [str(script)] if script.exists() else [sys.executable, "-m", "blobflow"]


def byte_compile_blobflow() -> str:
    """Write blobflow's bytecode before any timed run, as ``pip install`` does for an installed copy.
    An editable checkout run with ``PYTHONDONTWRITEBYTECODE`` (or edited since its last run) would
    otherwise compile its stale modules in memory at every start: 0.1-0.2 s of every blobflow
    timing that no user's install pays. Returns what it did, for the log."""
    package = Path(blobflow.__file__).parent
    if not compileall.compile_dir(package, quiet=1):
        raise BenchError(f"could not byte-compile {package}")
    return f"blobflow byte-compiled in {package}"


def command_output(argv: Sequence[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=60, env=child_env())
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"unavailable ({e})"
    return (out.stdout or out.stderr).strip().splitlines()[0] if (out.stdout or out.stderr).strip() else "?"


def process_cpu_seconds(pid: int | None) -> float:
    """utime + stime of a running process, from /proc (0 when unknown)."""
    if pid is None:
        return 0.0
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_busy_seconds() -> float:
    """CPU seconds spent not idle by all CPUs since boot, from /proc/stat."""
    try:
        first = Path("/proc/stat").read_text().splitlines()[0].split()
    except OSError:
        return 0.0
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in first[1:9])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def read_files(paths: Sequence[Path]) -> int:
    """Read every regular file under ``paths`` once (page-cache warm-up); returns bytes read."""
    total = 0
    for root in paths:
        for dirpath, _dirs, files in os.walk(root):
            for name in files:
                with open(os.path.join(dirpath, name), "rb") as f:
                    while chunk := f.read(4 * MiB):
                        total += len(chunk)
    return total


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(4 * MiB):
            h.update(chunk)
    return h.hexdigest()


def fmt_s(values: Sequence[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def line(r: Sequence[str]) -> str:
        return " | ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()

    return "\n".join([line(header), "-+-".join("-" * w for w in widths), *(line(r) for r in rows)])


# ---------------------------------------------------------------------------------------------
# running a tool


class Runner:
    """Runs one command, timed, with peak RSS and CPU; kills its whole process group on abort."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.count = 0
        self.gnu_time = GNU_TIME if os.access(GNU_TIME, os.X_OK) else None

    @property
    def rss_method(self) -> str:
        return f"{self.gnu_time} -f %M" if self.gnu_time else "os.wait4 ru_maxrss"

    def run(self, argv: Sequence[str], *, env: dict[str, str], label: str,
            registry_pids: Sequence[int | None] = ()) -> Measured:
        """Wall time, peak RSS and CPU of one run; raises BenchError on failure or timeout."""
        self.count += 1
        stem = self.logs / f"{self.count:03d}-{label}"
        time_file = stem.with_suffix(".time")
        full = list(argv)
        if self.gnu_time:
            full = [self.gnu_time, "-f", "%M %U %S", "-o", str(time_file), *full]
        reg_before = sum(process_cpu_seconds(p) for p in registry_pids)
        busy_before = machine_busy_seconds()
        with open(stem.with_suffix(".out"), "wb") as out, open(stem.with_suffix(".err"), "wb") as err:
            start = time.perf_counter()
            proc = subprocess.Popen(full, stdin=subprocess.DEVNULL, stdout=out, stderr=err, env=env,
                                    start_new_session=True)
            timed_out = threading.Event()

            def on_timeout() -> None:
                timed_out.set()
                _kill_group(proc)

            watchdog = threading.Timer(RUN_TIMEOUT, on_timeout)
            watchdog.start()
            try:
                if self.gnu_time:
                    code = proc.wait()
                    rusage = None
                else:
                    _pid, status, rusage = os.wait4(proc.pid, 0)
                    code = os.waitstatus_to_exitcode(status)
                    proc.returncode = code
                elapsed = time.perf_counter() - start
            except BaseException:
                _kill_group(proc)
                with contextlib.suppress(ChildProcessError):
                    proc.wait()
                raise
            finally:
                watchdog.cancel()
        reg_cpu = sum(process_cpu_seconds(p) for p in registry_pids) - reg_before
        busy = machine_busy_seconds() - busy_before
        if timed_out.is_set() or code != 0:
            stderr = stem.with_suffix(".err").read_text(errors="replace")[-6000:]
            stdout = stem.with_suffix(".out").read_text(errors="replace")[-2000:]
            why = f"timed out after {RUN_TIMEOUT:.0f} s" if timed_out.is_set() else f"exited with code {code}"
            raise BenchError(f"{label}: `{shlex.join(argv)}` {why}\n--- stderr ---\n{stderr.rstrip()}"
                             + (f"\n--- stdout ---\n{stdout.rstrip()}" if stdout.strip() else ""))
        if rusage is not None:
            return Measured(elapsed, rusage.ru_maxrss, rusage.ru_utime, rusage.ru_stime, reg_cpu, busy)
        rss, user, sys_s = time_file.read_text().strip().splitlines()[-1].split()
        return Measured(elapsed, int(rss), float(user), float(sys_s), reg_cpu, busy)


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL the process group this bench created for ``proc`` (its own session)."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)


# ---------------------------------------------------------------------------------------------
# images and registries


def cached_image(name: str, layers_mib: Sequence[int]) -> Image:
    """The image in ``.bench/images/NAME``, built (once) into a temp dir and renamed into place."""
    images = BENCH_DIR / "images"
    images.mkdir(parents=True, exist_ok=True)
    key = f"{name}-{'-'.join(map(str, layers_mib))}-seed{SEED}"
    root = images / key
    if not (root / "bench-complete").exists():
        shutil.rmtree(root, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=images))
        try:
            log(f"building {key} ({sum(layers_mib)} MiB of gzip layers, seed {SEED}) ...")
            t = time.monotonic()
            build_image(tmp, TAG, [m * MiB for m in layers_mib], seed=SEED)
            (tmp / "bench-complete").write_text("built by benches/bench_engine.py\n")
            os.replace(tmp, root)
            log(f"  built in {time.monotonic() - t:.1f} s -> {root.relative_to(REPO_ROOT)}")
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    index = json.loads((root / "index.json").read_text())
    entry = next(m for m in index["manifests"] if m.get("annotations", {}).get(
        "org.opencontainers.image.ref.name") == TAG)
    manifest = json.loads((root / "blobs" / "sha256" / entry["digest"].split(":", 1)[1]).read_bytes())
    blobs = [manifest["config"], *manifest["layers"]]
    return Image(key, root, [m * MiB for m in layers_mib], entry["digest"], entry["size"],
                 [{"digest": b["digest"], "size": b["size"], "mediaType": b["mediaType"]} for b in blobs])


def http_get(url: str, *, accept: str | None = None) -> Any:
    req = urllib.request.Request(url, headers={"Accept": accept} if accept else {})
    return _OPENER.open(req, timeout=120)


def registry_manifest(host: str, repo: str, ref: str) -> tuple[str, bytes, str | None]:
    """(sha256 digest of the manifest body, body, Docker-Content-Digest header)."""
    with http_get(f"http://{host}/v2/{repo}/manifests/{ref}", accept=MANIFEST_ACCEPT) as r:
        body = r.read()
        header = r.headers.get("Docker-Content-Digest")
    return "sha256:" + hashlib.sha256(body).hexdigest(), body, header


def verify_registry(host: str, repo: str, image: Image, what: str) -> None:
    """The destination serves the source manifest digest and every blob hashes to its digest."""
    try:
        digest, body, header = registry_manifest(host, repo, TAG)
    except OSError as e:
        raise BenchError(f"verify {what}: cannot read {host}/{repo}:{TAG}: {e}") from None
    if digest != image.manifest_digest or (header and header != image.manifest_digest):
        raise BenchError(f"verify {what}: manifest {digest} (header {header}) != source {image.manifest_digest}")
    manifest = json.loads(body)
    for blob in [manifest["config"], *manifest["layers"]]:
        verify_served_blob(host, repo, blob, what)


def verify_served_blob(host: str, repo: str, blob: dict[str, Any], what: str) -> None:
    """The registry serves ``blob`` with its size and a sha256 equal to its digest."""
    h, size = hashlib.sha256(), 0
    with http_get(f"http://{host}/v2/{repo}/blobs/{blob['digest']}") as r:
        while chunk := r.read(4 * MiB):
            h.update(chunk)
            size += len(chunk)
    if "sha256:" + h.hexdigest() != blob["digest"] or size != blob["size"]:
        raise BenchError(f"verify {what}: {repo} blob {blob['digest']} served {size} bytes hashing to "
                         f"sha256:{h.hexdigest()}")


def verify_files(root: Path, image: Image, what: str) -> None:
    """The raw pull wrote every blob to a file named by its digest; each must hash to it."""
    for blob in image.blobs:
        path = root / blob["digest"]
        if not path.is_file() or sha256_file(path) != blob["digest"].split(":", 1)[1]:
            raise BenchError(f"verify {what}: {path.name} missing or does not hash to its name")


def verify_layout(root: Path, image: Image, what: str) -> list[str]:
    """Every blob hashes to its name, the tag points at the source manifest, all its blobs are there.

    Returns warnings (files in blobs/sha256 that are not named by a digest, e.g. temp leftovers).
    """
    warnings = []
    try:
        index = json.loads((root / "index.json").read_text())
        layout_file = json.loads((root / "oci-layout").read_text())
    except (OSError, ValueError) as e:
        raise BenchError(f"verify {what}: not an OCI layout: {e}") from None
    if layout_file.get("imageLayoutVersion") != "1.0.0":
        raise BenchError(f"verify {what}: oci-layout is {layout_file}")
    tagged = [m for m in index.get("manifests", [])
              if m.get("annotations", {}).get("org.opencontainers.image.ref.name") == TAG]
    if [m["digest"] for m in tagged] != [image.manifest_digest]:
        raise BenchError(f"verify {what}: tag {TAG} -> {[m['digest'] for m in tagged]}, "
                         f"expected {image.manifest_digest}")
    blobs = root / "blobs" / "sha256"
    for path in sorted(blobs.iterdir()):
        if not re.fullmatch(r"[0-9a-f]{64}", path.name):
            warnings.append(f"{what}: stray file in blobs/sha256: {path.name}")
            continue
        if sha256_file(path) != path.name:
            raise BenchError(f"verify {what}: {path} does not hash to its name")
    manifest = json.loads((blobs / image.manifest_digest.split(":", 1)[1]).read_bytes())
    for blob in [manifest["config"], *manifest["layers"]]:
        path = blobs / blob["digest"].split(":", 1)[1]
        if not path.is_file() or path.stat().st_size != blob["size"]:
            raise BenchError(f"verify {what}: {blob['digest']} missing or of the wrong size")
    return warnings


# ---------------------------------------------------------------------------------------------
# the bench


class Bench:
    def __init__(self, args: argparse.Namespace, stack: contextlib.ExitStack, results: Results) -> None:
        self.args = args
        self.stack = stack
        self.results = results
        BENCH_DIR.mkdir(exist_ok=True)
        self.work = Path(tempfile.mkdtemp(prefix="run-", dir=BENCH_DIR))
        stack.callback(shutil.rmtree, self.work, ignore_errors=True)
        (self.work / "logs").mkdir()
        (self.work / "tmp").mkdir()
        self.runner = Runner(self.work / "logs")
        self.blobflow = blobflow_cmd()
        self.n = 0
        self.src: LocalRegistry | None = None

    # -- fresh things per run

    def fresh_dir(self, label: str) -> Path:
        self.n += 1
        path = self.work / f"{self.n:03d}-{label}"
        path.mkdir()
        return path

    def tool_env(self, tool: str, scratch: Path) -> dict[str, str]:
        env = child_env(TMPDIR=str(self.work / "tmp"))
        if tool == "skopeo":
            # containers/image keeps its blob-info cache in /var/lib/containers/cache for euid 0 and in
            # $XDG_DATA_HOME/containers/cache otherwise; _CONTAINERS_ROOTLESS_UID makes root use the latter.
            env["XDG_DATA_HOME"] = str(scratch / "xdg-data")
            if os.geteuid() == 0:
                env["_CONTAINERS_ROOTLESS_UID"] = "65534"
        return env

    def tool_argv(self, tool: str, op: str, *, scratch: Path, src: str = "", dst: str = "",
                  layout: Path | None = None, out_dir: Path | None = None, repo: str = REPO) -> list[str]:
        if tool == "blobflow":
            common = ["-q", "--plain-http", "--state-dir", str(scratch / "state")]
            if op == "pull":
                return [*self.blobflow, "pull", *common, f"{src}/{repo}:{TAG}", str(out_dir)]
            if op == "push":
                return [*self.blobflow, "push", *common, str(layout), f"{dst}/{repo}:{TAG}"]
            return [*self.blobflow, "copy", *common, f"{src}/{repo}:{TAG}", f"{dst}/{repo}:{TAG}"]
        if op == "pull":
            return ["skopeo", "copy", "--src-tls-verify=false", f"docker://{src}/{repo}:{TAG}",
                    f"oci:{out_dir}:{TAG}"]
        if op == "push":
            return ["skopeo", "copy", "--dest-tls-verify=false", f"oci:{layout}:{TAG}",
                    f"docker://{dst}/{repo}:{TAG}"]
        return ["skopeo", "copy", "--src-tls-verify=false", "--dest-tls-verify=false",
                f"docker://{src}/{repo}:{TAG}", f"docker://{dst}/{repo}:{TAG}"]

    def check_skopeo_cache(self, scratch: Path) -> None:
        """skopeo must have kept its blob-info cache in this run's own dir (so it started empty).

        The system cache's mtime proves nothing on a shared machine (other skopeo users touch it);
        a cache file in the per-run dir proves this run used that one, which was empty.
        """
        cache_dir = scratch / "xdg-data" / "containers" / "cache"
        if not cache_dir.is_dir() or not any(cache_dir.iterdir()):
            raise BenchError(f"skopeo did not write its blob-info cache under {cache_dir}: the per-run cache "
                             f"redirection failed (it may have used {SYSTEM_SKOPEO_CACHE.parent}), so skopeo "
                             "runs might mount or skip blobs they remember")

    def note_once(self, text: str) -> None:
        if text not in self.results.notes:
            self.results.notes.append(text)
            log(f"  note: {text}")

    # -- setup

    def start_registry(self, label: str) -> LocalRegistry:
        reg = LocalRegistry(self.fresh_dir(label))
        reg.start()
        return reg

    def setup_source(self, images: Sequence[tuple[Image, str]]) -> LocalRegistry:
        """One long-lived source registry, filled by skopeo from the cached layouts."""
        src = self.start_registry("src-registry")
        self.stack.callback(src.stop)
        self.src = src
        for image, repo in images:
            scratch = self.fresh_dir("seed")
            argv = self.tool_argv("skopeo", "push", scratch=scratch, layout=image.layout, dst=src.host, repo=repo)
            self.runner.run(argv, env=self.tool_env("skopeo", scratch), label="seed-source")
            digest, _body, _hdr = registry_manifest(src.host, repo, TAG)
            if digest != image.manifest_digest:
                raise BenchError(f"skopeo stored {repo}:{TAG} as {digest}, the layout has {image.manifest_digest}")
            shutil.rmtree(scratch, ignore_errors=True)
        return src

    def settle(self) -> float:
        """Wait (up to --settle seconds) for a one-second window with the machine's CPUs nearly idle.

        On a shared box other jobs (test suites, other benches) steal CPU from the tools and from
        the registry; waiting for a lull keeps them out of most runs, and ``other_cpu_s`` records
        whatever still overlapped. Returns the seconds waited.
        """
        if self.args.settle <= 0:
            return 0.0
        nproc = len(os.sched_getaffinity(0))
        start = time.monotonic()
        while True:
            before = machine_busy_seconds()
            time.sleep(1.0)
            if machine_busy_seconds() - before < QUIET_SHARE * nproc:
                return time.monotonic() - start
            if time.monotonic() - start >= self.args.settle:
                self.note_once(f"the machine was busy with other work; some runs started after waiting "
                               f"{self.args.settle:.0f} s (--settle) without a quiet second")
                return time.monotonic() - start

    # -- one timed run

    def run_once(self, op: str, tool: str, repeat: int, image: Image, *, verify: bool,
                 repo: str = REPO) -> Sample:
        assert self.src is not None
        scratch = self.fresh_dir(f"{op}-{tool}-{repeat}")
        env = self.tool_env(tool, scratch)
        dst: LocalRegistry | None = None
        try:
            out_dir = None
            if op == "pull":
                out_dir = scratch / "layout"
                out_dir.mkdir()
                argv = self.tool_argv(tool, op, scratch=scratch, src=self.src.host, out_dir=out_dir, repo=repo)
            else:
                dst = self.start_registry(f"dst-{op}-{tool}-{repeat}")
                argv = self.tool_argv(tool, op, scratch=scratch, src=self.src.host, dst=dst.host,
                                      layout=image.layout, repo=repo)
            if tool == RAW:
                argv = self.raw_argv(op, scratch=scratch, image=image, src=self.src.host,
                                     dst=dst.host if dst else "", out_dir=out_dir, repo=repo)
            dst_pid = dst.pid if dst else None
            pids = [self.src.pid] if op == "pull" else [dst_pid] if op == "push" else [self.src.pid, dst_pid]
            os.sync()  # start with no dirty pages from earlier runs
            waited = self.settle()
            try:
                m = self.runner.run(argv, env=env, label=f"{op}-{tool}", registry_pids=pids)
            except BenchError as e:
                if dst is not None and dst.log_tail().strip():
                    raise BenchError(f"{e}\n--- destination registry log ---\n{dst.log_tail(2000)}") from None
                raise
            if tool == "skopeo":
                self.check_skopeo_cache(scratch)
            if verify:
                what = f"{op} by {tool}"
                if op == "pull" and tool == RAW:
                    assert out_dir is not None
                    verify_files(out_dir, image, what)
                elif op == "pull":
                    assert out_dir is not None
                    for w in verify_layout(out_dir, image, what):
                        self.note_once(w)
                else:
                    assert dst is not None
                    verify_registry(dst.host, repo, image, what)
                log(f"  verified {what}: manifest {image.manifest_digest[:19]}..., "
                    f"{len(image.blobs)} blobs hash to their digests")
        finally:
            if dst is not None:
                dst.stop()
                shutil.rmtree(dst.root, ignore_errors=True)
            shutil.rmtree(scratch, ignore_errors=True)
        return Sample(op, tool, repeat, m.seconds, m.peak_rss_kib, m.user_s, m.sys_s, m.registry_cpu_s,
                      m.other_cpu_s, waited, argv)

    # -- the raw ceiling: plain curl, run like a third tool

    def raw_argv(self, op: str, *, scratch: Path, image: Image, src: str, dst: str, out_dir: Path | None,
                 repo: str) -> list[str]:
        """A bash script of plain curl requests doing the op's work as directly as the registry allows.

        No hashing, no checks beyond HTTP status, every blob at once: what the registry and the disk
        can do, which a client can only approach. pull: one GET per blob into a file, then every file
        fsync'ed (``sync FILE...``), the durability both tools give. push: per blob one POST and one
        monolithic PUT of the file. copy: per blob one POST and one PUT whose body is the source GET,
        piped (chunked encoding, no disk). push and copy end with the manifest PUT.
        """
        blobs = image.blobs
        manifest_path = image.layout / "blobs" / "sha256" / image.manifest_digest.split(":", 1)[1]
        media_type = json.loads(manifest_path.read_bytes()).get("mediaType", OCI_MANIFEST)
        curl = "curl -sSf --noproxy '*' -H 'Expect:'"
        q = shlex.quote
        lines = ["set -euo pipefail"]
        if op == "pull":
            assert out_dir is not None
            config = scratch / "curl.cfg"
            config.write_text("\nnext\n".join(
                f'url = "http://{src}/v2/{repo}/blobs/{b["digest"]}"\noutput = "{out_dir / b["digest"]}"'
                for b in blobs) + "\n")
            lines += [f"curl -sSf --noproxy '*' --parallel --parallel-immediate --parallel-max {len(blobs)} "
                      f"--config {q(str(config))}",
                      f"curl -sSf --noproxy '*' -o {q(str(out_dir / 'manifest.json'))} "
                      f"-H {q('Accept: ' + media_type)} http://{src}/v2/{repo}/manifests/{TAG}",
                      f"sync -- {q(str(out_dir))}/*"]
        else:
            body = {"push": '-T "$2"', "copy": '-T -'}[op]
            feed = {"push": "", "copy": f'{curl} "http://{src}/v2/{repo}/blobs/$1" | '}[op]
            lines += ["up() {",
                      f"  loc=$({curl} -X POST -o /dev/null -w '%header{{location}}' "
                      f"http://{dst}/v2/{repo}/blobs/uploads/)",
                      '  case "$loc" in http*) ;; *) loc="http://' + dst + '$loc" ;; esac',
                      r'  case "$loc" in *\?*) sep="&" ;; *) sep="?" ;; esac',
                      f"  {feed}{curl} -o /dev/null -H 'Content-Type: application/octet-stream' {body} "
                      '"$loc${sep}digest=$1"',
                      "}", "pids=()"]
            for b in blobs:
                path = image.layout / "blobs" / "sha256" / b["digest"].split(":", 1)[1]
                lines.append(f"up {q(b['digest'])} {q(str(path))} & pids+=($!)")
            lines.append('for p in "${pids[@]}"; do wait "$p"; done')
            manifest = q(str(manifest_path))
            if op == "copy":
                manifest = q(str(scratch / "manifest.json"))
                lines.append(f"{curl} -o {manifest} -H {q('Accept: ' + media_type)} "
                             f"http://{src}/v2/{repo}/manifests/{TAG}")
            lines.append(f"{curl} -o /dev/null -X PUT -H {q('Content-Type: ' + media_type)} "
                         f"--data-binary @{manifest} http://{dst}/v2/{repo}/manifests/{TAG}")
        script = scratch / f"raw-{op}.sh"
        script.write_text("\n".join(lines) + "\n")
        return ["bash", str(script)]

    # -- the raw ceiling for pull without a disk

    def ceiling(self, image: Image, repeat: int) -> dict[str, list[float]]:
        assert self.src is not None
        curl = shutil.which("curl")
        if curl is None:
            self.note_once("curl not installed: the raw pull ceiling uses Python threads with urllib")
            return {"python threads, one stream per layer": [self._ceiling_threads(image) for _ in range(repeat)]}
        base = f"http://{self.src.host}/v2/{REPO}/blobs/"
        per_layer: list[tuple[str, tuple[int, int] | None]] = [(base + b["digest"], None) for b in image.layers]
        ranged: list[tuple[str, tuple[int, int] | None]] = []
        for b in image.layers:
            for start in range(0, b["size"], CEILING_PART):
                ranged.append((base + b["digest"], (start, min(start + CEILING_PART, b["size"]) - 1)))
        variants: dict[str, tuple[list[tuple[str, tuple[int, int] | None]], int]] = {
            f"curl, one stream per layer ({len(per_layer)} parallel)": (per_layer, len(per_layer)),
            f"curl, {CEILING_PART // MiB} MiB ranges on {CEILING_RANGE_STREAMS} streams":
                (ranged, CEILING_RANGE_STREAMS),
        }
        out: dict[str, list[float]] = {}
        for name, (requests, streams) in variants.items():
            out[name] = [self._ceiling_curl(curl, requests, streams, image) for _ in range(repeat)]
        return out

    def _ceiling_curl(self, curl: str, requests: list[tuple[str, tuple[int, int] | None]], streams: int,
                      image: Image) -> float:
        config = self.work / "curl.cfg"
        blocks = []
        for url, rng in requests:
            lines = [f'url = "{url}"', 'output = "/dev/null"', 'write-out = "%{http_code} %{size_download}\\n"',
                     "fail", "silent", "show-error", 'noproxy = "*"']
            if rng:
                lines.append(f'range = "{rng[0]}-{rng[1]}"')
            blocks.append("\n".join(lines))
        config.write_text("\nnext\n".join(blocks) + "\n")
        argv = [curl, "--parallel", "--parallel-immediate", "--parallel-max", str(streams), "--config", str(config)]
        os.sync()
        self.settle()
        start = time.perf_counter()
        proc = subprocess.run(argv, capture_output=True, text=True, env=child_env(), timeout=RUN_TIMEOUT)
        elapsed = time.perf_counter() - start
        got = [line.split() for line in proc.stdout.splitlines() if line.strip()]
        total = sum(int(n) for _code, n in got)
        want = sum(b["size"] for b in image.layers)
        if proc.returncode != 0 or total != want or len(got) != len(requests):
            raise BenchError(f"ceiling: curl exited {proc.returncode}, {len(got)}/{len(requests)} transfers, "
                             f"{total}/{want} bytes\n{proc.stderr[-3000:]}")
        return elapsed

    def _ceiling_threads(self, image: Image) -> float:
        assert self.src is not None
        host = self.src.host
        errors: list[BaseException] = []

        def fetch(digest: str) -> None:
            try:
                with http_get(f"http://{host}/v2/{REPO}/blobs/{digest}") as r:
                    while r.read(4 * MiB):
                        pass
            except BaseException as e:  # reported below
                errors.append(e)

        threads = [threading.Thread(target=fetch, args=(b["digest"],)) for b in image.layers]
        start = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise BenchError(f"ceiling: {errors[0]}")
        return time.perf_counter() - start


# ---------------------------------------------------------------------------------------------
# reporting


def machine_info() -> dict[str, Any]:
    model = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem = "?"
    with contextlib.suppress(OSError, ValueError, IndexError):
        kib = int(Path("/proc/meminfo").read_text().split("MemTotal:", 1)[1].split()[0])
        mem = f"{kib / 1024 / 1024:.1f} GiB"
    load = "?"
    with contextlib.suppress(OSError):
        load = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    return {"nproc": len(os.sched_getaffinity(0)), "cpu_count": os.cpu_count(), "cpu_model": model,
            "memory": mem, "kernel": platform.release(), "python": platform.python_version(),
            "loadavg_at_start": load}


def versions() -> dict[str, str]:
    git = command_output(["git", "-C", str(REPO_ROOT), "describe", "--always", "--dirty"])
    return {
        "blobflow": command_output([*blobflow_cmd(), "--version"]) + f" (git {git})",
        "skopeo": command_output(["skopeo", "--version"]),
        "docker-registry": command_output(["docker-registry", "--version"]),
        "curl": command_output(["curl", "--version"]) if shutil.which("curl") else "not installed",
    }


STARTUP_BLOBFLOW = "blobflow inspect"  # the key of blobflow's start-up in Results.startup


def startup_times(repeat: int, src: str) -> dict[str, list[float]]:
    """Each tool's time to start, load what a transfer loads and do one request: ``inspect`` of the
    bench image at ``src`` (a manifest GET). ``blobflow --version`` would not do: it answers
    without importing the engine (aiohttp and its TLS contexts are most of a start)."""
    out: dict[str, list[float]] = {}
    image = f"{src}/{REPO}:{TAG}"
    for name, argv in ((STARTUP_BLOBFLOW, [*blobflow_cmd(), "inspect", "--plain-http", image]),
                       ("skopeo inspect", ["skopeo", "inspect", "--raw", "--tls-verify=false", f"docker://{image}"])):
        samples = []
        for _ in range(max(3, repeat)):
            t = time.perf_counter()
            subprocess.run(argv, capture_output=True, check=True, env=child_env())
            samples.append(time.perf_counter() - t)
        out[name] = samples
    return out


def sha256_speed() -> float:
    buf = os.urandom(64 * MiB)
    h = hashlib.sha256()
    t = time.perf_counter()
    for _ in range(4):
        h.update(buf)
    return 4 * len(buf) / MB / (time.perf_counter() - t)


def report(res: Results, ops: Sequence[str], image: Image) -> str:
    mb = image.total_bytes / MB
    rows, verdicts = [], []
    for op in ops:
        bf, sk, raw = res.of(op, "blobflow"), res.of(op, "skopeo"), res.of(op, RAW)
        if not bf or not sk:
            continue
        bf_med, sk_med = statistics.median(s.seconds for s in bf), statistics.median(s.seconds for s in sk)
        ratio = sk_med / bf_med
        share = statistics.median(s.seconds for s in raw) / bf_med if raw else None
        rows.append([op, fmt_s([s.seconds for s in bf]), fmt_s([s.seconds for s in sk]),
                     fmt_s([s.seconds for s in raw]) if raw else "-", f"{ratio:.2f}",
                     f"{share:.2f}" if share is not None else "-", f"{mb / bf_med:.0f}",
                     f"{max(s.peak_rss_kib for s in bf) / 1024:.0f}", f"{max(s.peak_rss_kib for s in sk) / 1024:.0f}"])
        met = ratio >= TARGETS[op] or (share is not None and share >= CEILING_TARGET)
        verdicts.append(f"  {op}: skopeo/blobflow {ratio:.2f} (target {TARGETS[op]:.1f}), "
                        f"raw/blobflow {share:.2f} (target {CEILING_TARGET:.2f})  -> "
                        f"{'met' if met else 'NOT met'}" if share is not None else
                        f"  {op}: skopeo/blobflow {ratio:.2f} (target {TARGETS[op]:.1f}), no raw run")
    parts = [f"image: {image.name}: {len(image.layers)} gzip layers, {image.total_bytes / MiB:.0f} MiB "
             f"({mb:.0f} MB) incl. config and manifest",
             "",
             table(["op", "blobflow s median (min-max)", "skopeo s median (min-max)", "raw curl s median (min-max)",
                    "skopeo/blobflow", "raw/blobflow", "blobflow MB/s", "blobflow peak RSS MiB",
                    "skopeo peak RSS MiB"], rows),
             "",
             "targets (issue #4): skopeo/blobflow >= 2.0 pull, 1.5 push, 1.5 copy; or, where the registry or the "
             f"disk is the limit, blobflow at >= {CEILING_TARGET:.0%} of the raw ceiling (raw/blobflow):",
             *verdicts,
             "raw = plain curl, every blob at once, no hashing or checks (pull: GET to files + fsync each; push: "
             "POST + monolithic PUT; copy: POST + PUT piped from the source GET); start-up included for all"]
    cpu_rows = []
    for op in ops:
        row = [op]
        for tool in (*TOOLS, RAW):
            ss = res.of(op, tool)
            row += [f"{statistics.median(s.user_s + s.sys_s for s in ss):.2f}" if ss else "-",
                    f"{statistics.median(s.registry_cpu_s for s in ss):.2f}" if ss else "-"]
        cpu_rows.append(row)
    parts += ["", "CPU seconds per run (median; user+sys; 'registries' = the Distribution process(es) involved):",
              table(["op", "blobflow", "registries", "skopeo", "registries", "raw curl", "registries"], cpu_rows)]
    if res.ceiling:
        parts += ["", "pull without a disk (registry -> /dev/null, all layer blobs, no hashing):"]
        best = min(statistics.median(v) for v in res.ceiling.values())
        layer_mb = sum(b["size"] for b in image.layers) / MB
        for name, values in res.ceiling.items():
            parts.append(f"  {name}: {fmt_s(values)} s, {layer_mb / statistics.median(values):.0f} MB/s")
        bf = res.of("pull", "blobflow")
        if bf:
            bf_med = statistics.median(s.seconds for s in bf)
            parts.append(f"  blobflow pull vs the best ceiling: ceiling/blobflow = {best:.2f}/{bf_med:.2f} = "
                         f"{best / bf_med:.2f}  (1.00 = as fast as raw GETs to /dev/null)")
    if res.rss_scaling:
        rs = res.rss_scaling
        parts += ["", "copy RSS scaling (blobflow peak RSS):"]
        parts.append(f"  {rs['base']['image']} (largest layer {rs['base']['largest_mib']} MiB): "
                     f"{rs['base']['peak_rss_kib'] / 1024:.0f} MiB")
        if rs.get("doubled"):
            d = rs["doubled"]
            parts.append(f"  {d['image']} (largest layer {d['largest_mib']} MiB): {d['peak_rss_kib'] / 1024:.0f} MiB "
                         f"(x{d['peak_rss_kib'] / rs['base']['peak_rss_kib']:.2f}; copy took {d['seconds']:.2f} s)")
        else:
            parts.append(f"  doubled-layer image: skipped ({rs.get('skipped', '--quick')})")
    if res.startup:
        parts += ["", "process start-up, loading and one manifest GET (included in every timing): "
                  + "; ".join(f"{k}: {statistics.median(v):.2f} s" for k, v in res.startup.items())]
        parts += _without_startup(res, ops)
    if res.sha256_mb_s:
        parts.append(f"sha256 in this Python, one core: {res.sha256_mb_s:.0f} MB/s")
    parts += load_lines(res.machine, res.samples, lambda s: f"{s.op} {s.tool} #{s.repeat + 1}", res.notes)
    return "\n".join(parts)


def _without_startup(res: Results, ops: Sequence[str]) -> list[str]:
    """raw/blobflow once blobflow's start-up (``blobflow inspect``, same run) is taken off its
    time: how the transfer itself compares with curl. For information; the verdict above keeps it."""
    startup = res.startup.get(STARTUP_BLOBFLOW)
    shares = []
    for op in ops:
        bf, raw = res.of(op, "blobflow"), res.of(op, RAW)
        if not startup or not bf or not raw:
            continue
        rest = statistics.median(s.seconds for s in bf) - statistics.median(startup)
        if rest > 0:
            shares.append(f"{op} {statistics.median(s.seconds for s in raw) / rest:.2f}")
    if not shares:
        return []
    return [f"raw/blobflow with blobflow's start-up taken off its median (information, not the verdict): "
            f"{', '.join(shares)}"]


def load_lines(machine: dict[str, Any], samples: Sequence[Any], label: Callable[[Any], str],
               notes: Sequence[str]) -> list[str]:
    """How busy the machine was during the timed runs (samples carry seconds and other_cpu_s), and notes."""
    out: list[str] = []
    nproc = machine.get("nproc") or 1
    timed = [s for s in samples if s.seconds > 0]
    shares = [s.other_cpu_s / (s.seconds * nproc) for s in timed]
    if shares:
        worst = max(timed, key=lambda s: s.other_cpu_s / (s.seconds * nproc))
        out.append(f"other load on the machine during timed runs: median {statistics.median(shares):.0%} of "
                   f"{nproc} CPUs, worst {max(shares):.0%} ({label(worst)})"
                   + ("  <-- the machine was not quiet; timings are noisy" if max(shares) > 0.10 else ""))
    if notes:
        out += ["", "notes:", *(f"  - {n}" for n in notes)]
    return out


def header(res: Any, runner_rss: str, *, skip: Sequence[str] = ()) -> str:
    m, v = res.machine, res.versions
    return "\n".join([
        f"machine: nproc {m['nproc']} (cpu_count {m['cpu_count']}), {m['cpu_model']}, {m['memory']} RAM, "
        f"Linux {m['kernel']}, Python {m['python']}, load average at start {m['loadavg_at_start']}",
        *(f"{k}: {val}" for k, val in v.items() if k not in skip),
        f"peak RSS via: {runner_rss}",
        f"command: {shlex.join(res.argv)}  (cwd {Path.cwd()})",
    ])


def write_json(path: Path, res: Any) -> None:
    data = asdict(res)
    path.write_text(json.dumps(data, indent=2) + "\n")
    log(f"raw samples written to {path}")


# ---------------------------------------------------------------------------------------------
# main


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="128 MiB image, one repeat, no doubled-layer RSS run")
    p.add_argument("--repeat", type=int, metavar="N", help="timed runs per op and tool (default 3; --quick: 1)")
    p.add_argument("--json", type=Path, metavar="FILE", help="write every raw sample to FILE")
    p.add_argument("--ops", default=",".join(OPS), help="comma-separated subset of pull,push,copy (default: all)")
    p.add_argument("--settle", type=float, default=30.0, metavar="SECONDS",
                   help="before each timed run, wait up to SECONDS for a quiet second on the machine "
                        "(default 30; 0: don't wait)")
    args = p.parse_args(argv)
    args.ops = [o.strip() for o in args.ops.split(",") if o.strip()]
    bad = [o for o in args.ops if o not in OPS]
    if bad or not args.ops:
        p.error(f"--ops takes a comma-separated subset of {','.join(OPS)}; got {bad or 'nothing'}")
    if args.repeat is None:
        args.repeat = 1 if args.quick else 3
    if args.repeat < 1:
        p.error("--repeat must be at least 1")
    return args


@contextlib.contextmanager
def signals_as_interrupts() -> Iterator[None]:
    """SIGTERM and SIGHUP unwind like Ctrl-C, so every cleanup runs."""
    def raise_interrupt(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    old = {s: signal.signal(s, raise_interrupt) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


def run(args: argparse.Namespace, res: Results) -> None:
    for tool in ("skopeo", "docker-registry"):
        if shutil.which(tool) is None:
            raise BenchError(f"{tool} not found: `make setup` installs it")
    with contextlib.ExitStack() as stack:
        bench = Bench(args, stack, res)
        res.machine, res.versions = machine_info(), versions()
        log(header(res, bench.runner.rss_method))
        log("")

        layers = QUICK_LAYERS_MIB if args.quick else FULL_LAYERS_MIB
        image = cached_image("quick" if args.quick else "full", layers)
        big = None
        if "copy" in args.ops and not args.quick:
            big = cached_image("doubled", (layers[0] * 2, *layers[1:]))
        res.image = {"name": image.name, "manifest_digest": image.manifest_digest, "total_bytes": image.total_bytes,
                     "layer_sizes": image.layer_sizes, "blobs": image.blobs}
        if big:
            res.image["doubled"] = {"name": big.name, "manifest_digest": big.manifest_digest,
                                    "total_bytes": big.total_bytes}

        log("seeding the source registry with skopeo ...")
        src = bench.setup_source([(image, REPO), *([(big, BIG_REPO)] if big else [])])
        warmed = read_files([image.layout, *([big.layout] if big else []), src.storage])
        log(f"source registry {src.host}; page cache warmed ({warmed / MiB:.0f} MiB read)")
        log(f"blobflow runs as: {shlex.join(bench.blobflow)}; {byte_compile_blobflow()}")

        res.startup = startup_times(args.repeat, src.host)
        res.sha256_mb_s = sha256_speed()

        for op in args.ops:
            log(f"\n== {op} ({args.repeat} x 3 runs: blobflow, skopeo, raw curl)")
            everyone = (*TOOLS, RAW)
            for r in range(args.repeat):
                order = everyone[r % 3:] + everyone[:r % 3]  # each goes first once in three repeats
                for tool in order:
                    s = bench.run_once(op, tool, r, image, verify=(r == args.repeat - 1))
                    res.samples.append(s)
                    rate = image.total_bytes / MB / s.seconds
                    log(f"  {op:4} {tool:8} #{r + 1}: {s.seconds:7.2f} s  {rate:6.0f} MB/s"
                        f"  peak RSS {s.peak_rss_kib / 1024:5.0f} MiB  cpu {s.user_s + s.sys_s:5.2f} s"
                        f"  registries cpu {s.registry_cpu_s:5.2f} s  other cpu {s.other_cpu_s:5.2f} s"
                        + (f"  (waited {s.settle_wait_s:.0f} s for a quiet machine)" if s.settle_wait_s > 1.5 else ""))
            if op == "pull":
                log("  measuring the raw pull ceiling with parallel GETs ...")
                res.ceiling = bench.ceiling(image, args.repeat)
                for name, values in res.ceiling.items():
                    log(f"  ceiling {name}: {fmt_s(values)} s")
            if op == "copy":
                base = max(res.of("copy", "blobflow"), key=lambda s: s.peak_rss_kib)
                res.rss_scaling = {"base": {"image": image.name, "largest_mib": max(image.layer_sizes) // MiB,
                                            "peak_rss_kib": base.peak_rss_kib}}
                if big is None:
                    res.rss_scaling["skipped"] = "--quick: the doubled-layer image is not built"
                    log("  copy RSS scaling: doubled-layer image skipped (--quick)")
                else:
                    s = bench.run_once("copy", "blobflow", 0, big, verify=True, repo=BIG_REPO)
                    res.rss_scaling["doubled"] = {"image": big.name, "largest_mib": max(big.layer_sizes) // MiB,
                                                  "peak_rss_kib": s.peak_rss_kib, "seconds": s.seconds,
                                                  "sample": asdict(s)}
                    log(f"  copy RSS scaling: {big.name}: peak RSS {s.peak_rss_kib / 1024:.0f} MiB "
                        f"in {s.seconds:.2f} s")

        log("\n" + "=" * 100)
        log(header(res, bench.runner.rss_method))
        log("")
        log(report(res, args.ops, image))


def run_guarded(run_bench: Callable[[argparse.Namespace, Any], None], args: argparse.Namespace, res: Any) -> int:
    """Run a bench: exit 1 with the reason when it aborts, 130 when interrupted (cleanup has run),
    and write the raw samples with ``--json`` either way."""
    code = 0
    try:
        with signals_as_interrupts():
            run_bench(args, res)
    except BenchError as e:
        res.error = str(e)
        print(f"\nbench aborted: {e}", file=sys.stderr, flush=True)
        code = 1
    except KeyboardInterrupt:
        res.error = "interrupted"
        print("\nbench interrupted; registries and temp dirs cleaned up", file=sys.stderr, flush=True)
        code = 130
    if args.json:
        write_json(args.json, res)
    return code


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    res = Results(argv=[sys.executable, *sys.argv] if argv is None else ["bench_engine.py", *argv])
    return run_guarded(run, args, res)


if __name__ == "__main__":
    sys.exit(main())

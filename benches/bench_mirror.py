#!/usr/bin/env python3
"""blobflow mirror vs skopeo sync: many small images sharing base layers, plus a few large ones.

Run from the repository's venv (``make bench-mirror``)::

    .venv/bin/python benches/bench_mirror.py [--quick] [--repeat N] [--json FILE] [--skopeo-modes yaml,per-repo]

What is measured, and how it is kept fair (the conventions of ``bench_engine.py``, whose helpers this
bench imports):

* The source registry is built once and cached under ``.bench/mirror/``: 8 repositories x 6 tags of
  small images (one base layer of 8-16 MiB, shared by the two repositories built on the same base, and
  1-2 unique layers of 64 KiB-2 MiB) plus 2 large images of 128 MiB in repositories of their own;
  ``--quick``: 4 x 3 small images and one 32 MiB image. Images come from
  :func:`blobflow.synth.build_image` with fixed seeds and are pushed into the source registry by
  ``skopeo copy``; the registry's storage directory is kept and reused by later runs.
* The plan is the same for both tools: every repository ``bench/NAME`` of the source goes to
  ``mirror/NAME`` of the destination, all tags. blobflow runs ``blobflow mirror --plain-http PLAN``
  (a TOML plan with one ``[[mirror]]`` entry per repository and no tag list, so it lists tags as
  skopeo does). skopeo runs ``skopeo sync --src docker|yaml --dest docker`` in one or both of two modes:
  ``yaml``: one process, a YAML source file naming every repository and tag; ``per-repo``: one
  ``skopeo sync --src docker SRC/bench/NAME DST/mirror`` per repository, in sequence (one timed shell).
  The table reports both and takes the faster as "skopeo" for the ratio.
* Every timed "cold" run gets a fresh, empty destination registry. The "nothing changed" run follows
  on the same destination with the same plan. skopeo gets a fresh blob-info cache for every timed run
  (moved to a per-run directory through the environment, and checked afterwards), shared by all the
  invocations of that run; blobflow gets a fresh ``--state-dir`` for every run (no resume journal).
* Both tools run under the same wrapper (``/usr/bin/time``), wall time around the whole process(es),
  start-up included; the order of the tools rotates in each repeat; dirty pages are flushed and the
  bench waits for a quiet second (``--settle``) before each timed run, and records the CPU other
  work used meanwhile (the machine may be shared).
* Requests are counted at the registries themselves (their access logs, enabled for this bench):
  per run, requests to the source and to the destination, blob GETs and bytes served by the source,
  and blob upload sessions and mounts at the destination.
* Correctness after every run: every destination manifest (by tag) has the source's digest; after
  the last repeat's cold run, every blob of every destination manifest hashes to its digest.

Everything talks to 127.0.0.1 only; registries, child processes and temp dirs are cleaned up on
failure and on Ctrl-C / SIGTERM.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import random
import re
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench_engine import (
    BENCH_DIR,
    MANIFEST_ACCEPT,
    REPO_ROOT,
    Bench,
    BenchError,
    Runner,
    fmt_s,
    header,
    http_get,
    load_lines,
    log,
    machine_info,
    read_files,
    run_guarded,
    table,
    verify_served_blob,
    versions,
)

from blobflow.localreg import LocalRegistry
from blobflow.synth import build_image

MiB = 1 << 20
KiB = 1 << 10
MB = 1_000_000
SEED = 20240612
SRC_NS = "bench"
DST_NS = "mirror"
TOOLS = ("blobflow", "skopeo-yaml", "skopeo-per-repo")
SKOPEO_MODES = ("yaml", "per-repo")
PHASES = ("cold", "nothing changed")
ACCESS_RE = re.compile(r'"(GET|HEAD|PUT|POST|PATCH|DELETE) (\S+) HTTP/[\d.]+" (\d{3}) (\d+|-)')


@dataclass(frozen=True)
class Shape:
    """What the source registry holds."""

    repos: int
    tags: int
    base_mib: tuple[int, ...]  # base layer sizes; repository i is built on base i % len(base_mib)
    unique_kib: tuple[int, int]  # unique layers are between these sizes
    large_layers_mib: tuple[tuple[int, ...], ...]  # one large image per entry

    @property
    def key(self) -> str:
        large = "_".join("-".join(map(str, ls)) for ls in self.large_layers_mib)
        return (f"r{self.repos}x{self.tags}-base{'-'.join(map(str, self.base_mib))}-"
                f"u{self.unique_kib[0]}-{self.unique_kib[1]}k-large{large}-seed{SEED}")


FULL = Shape(8, 6, (8, 10, 12, 16), (64, 2048), ((64, 32, 16, 8, 8), (48, 40, 24, 8, 8)))
QUICK = Shape(4, 3, (4, 6), (64, 1024), ((16, 8, 8),))


@dataclass
class Source:
    shape: Shape
    storage_root: Path
    images: list[dict[str, Any]]  # {"repo", "tag", "digest", "bytes"}

    @property
    def repos(self) -> list[str]:
        return sorted({i["repo"] for i in self.images})

    def tags(self, repo: str) -> list[str]:
        return [i["tag"] for i in self.images if i["repo"] == repo]

    @property
    def unique_bytes(self) -> int:
        return sum(self.blobs().values())

    def blobs(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for i in self.images:
            out.update(i["blobs"])
        return out


@dataclass
class Sample:
    tool: str
    phase: str
    repeat: int
    seconds: float
    peak_rss_kib: int
    user_s: float
    sys_s: float
    registry_cpu_s: float
    other_cpu_s: float
    settle_wait_s: float
    requests: dict[str, Any]
    argv: list[str]


@dataclass
class Results:
    argv: list[str]
    machine: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    source: dict[str, Any] = field(default_factory=dict)
    samples: list[Sample] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    error: str | None = None

    def of(self, tool: str, phase: str) -> list[Sample]:
        return [s for s in self.samples if s.tool == tool and s.phase == phase]


# ---------------------------------------------------------------------------------------------
# registries that log every request


class LoggingRegistry(LocalRegistry):
    """A LocalRegistry with Distribution's access log on, so the bench can count requests."""

    def _config(self, port: int) -> dict[str, Any]:
        config = super()._config(port)
        config["log"]["accesslog"] = {"disabled": False}
        return config

    def log_offset(self) -> int:
        try:
            return self.log_path.stat().st_size
        except FileNotFoundError:
            return 0

    def requests_since(self, offset: int) -> list[tuple[str, str, int, int]]:
        """(method, path, status, bytes) of each request logged after byte ``offset`` of the log."""
        with open(self.log_path, "rb") as f:
            f.seek(offset)
            text = f.read().decode("utf-8", "replace")
        out = []
        for m in ACCESS_RE.finditer(text):
            out.append((m.group(1), m.group(2), int(m.group(3)), int(m.group(4)) if m.group(4) != "-" else 0))
        return out


def count_requests(src: list[tuple[str, str, int, int]], dst: list[tuple[str, str, int, int]]) -> dict[str, Any]:
    def blob_get(method: str, path: str) -> bool:
        return method == "GET" and "/blobs/sha256:" in path

    return {
        "src": len(src),
        "src_by_method": dict(Counter(m for m, *_ in src)),
        "src_blob_gets": sum(blob_get(m, p) for m, p, *_ in src),
        "src_blob_bytes": sum(n for m, p, _s, n in src if blob_get(m, p)),
        "dst": len(dst),
        "dst_by_method": dict(Counter(m for m, *_ in dst)),
        "dst_uploads": sum(m == "POST" and "/blobs/uploads/" in p and "mount=" not in p for m, p, *_ in dst),
        "dst_mount_attempts": sum(m == "POST" and "mount=" in p for m, p, *_ in dst),
        "dst_mounts": sum(m == "POST" and "mount=" in p and s == 201 for m, p, s, _ in dst),
        "dst_manifest_puts": sum(m == "PUT" and "/manifests/" in p for m, p, *_ in dst),
    }


# ---------------------------------------------------------------------------------------------
# the source registry, built once


def layer_plan(shape: Shape) -> list[dict[str, Any]]:
    """Every image of the shape: repo, tag, base, unique layer sizes (deterministic)."""
    rng = random.Random(SEED)
    images = []
    for r in range(shape.repos):
        base = r % len(shape.base_mib)
        for t in range(shape.tags):
            n = rng.choice((1, 2))
            sizes = [rng.randint(shape.unique_kib[0], shape.unique_kib[1]) * KiB for _ in range(n)]
            images.append({"repo": f"{SRC_NS}/app{r}", "tag": f"1.{t}", "base": base, "sizes": sizes,
                           "seed": SEED + 1000 * r + t})
    for i, layers in enumerate(shape.large_layers_mib):
        images.append({"repo": f"{SRC_NS}/large{i}", "tag": "1.0", "base": None,
                       "sizes": [m * MiB for m in layers], "seed": SEED + 100_000 + i})
    return images


def cached_source(bench: MirrorBench, shape: Shape) -> Source:
    """``.bench/mirror/KEY/registry``: a Distribution storage dir holding every image; built once."""
    top = BENCH_DIR / "mirror"
    top.mkdir(parents=True, exist_ok=True)
    root = top / shape.key
    meta = root / "images.json"
    if not meta.exists():
        shutil.rmtree(root, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{shape.key}-", dir=top))
        try:
            build_source(bench, shape, tmp)
            os.replace(tmp, root)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    images = json.loads(meta.read_text())
    return Source(shape, root / "registry", images)


def build_source(bench: MirrorBench, shape: Shape, tmp: Path) -> None:
    plan = layer_plan(shape)
    log(f"building the source: {len(plan)} images in {len({p['repo'] for p in plan})} repositories ...")
    t = time.monotonic()
    layouts = tmp / "layouts"
    for p in plan:
        layout = layouts / p["repo"].replace("/", "_")
        if p["base"] is None:
            build_image(layout, p["tag"], p["sizes"], seed=p["seed"])
        else:
            build_image(layout, p["tag"], p["sizes"], seed=p["seed"],
                        base_layers=[shape.base_mib[p["base"]] * MiB], base_seed=SEED + 7 * (p["base"] + 1))
    log(f"  layouts built in {time.monotonic() - t:.1f} s; pushing them with skopeo copy ...")
    reg = LoggingRegistry(tmp / "registry")
    reg.start()
    try:
        scratch = bench.fresh_dir("seed")
        env = bench.tool_env("skopeo", scratch)
        images = []
        for p in plan:
            layout = layouts / p["repo"].replace("/", "_")
            argv = ["skopeo", "copy", "--dest-tls-verify=false", f"oci:{layout}:{p['tag']}",
                    f"docker://{reg.host}/{p['repo']}:{p['tag']}"]
            bench.runner.run(argv, env=env, label="seed-source")
            digest, body = registry_manifest(reg.host, p["repo"], p["tag"])
            index = json.loads((layout / "index.json").read_text())
            want = [m["digest"] for m in index["manifests"]
                    if m.get("annotations", {}).get("org.opencontainers.image.ref.name") == p["tag"]]
            if want != [digest]:
                raise BenchError(f"skopeo stored {p['repo']}:{p['tag']} as {digest}, the layout has {want}")
            manifest = json.loads(body)
            blobs = {b["digest"]: b["size"] for b in [manifest["config"], *manifest["layers"]]}
            images.append({"repo": p["repo"], "tag": p["tag"], "digest": digest, "manifest_size": len(body),
                           "blobs": blobs, "bytes": len(body) + sum(blobs.values())})
    finally:
        reg.stop()
    shutil.rmtree(layouts)
    (tmp / "images.json").write_text(json.dumps(images, indent=1) + "\n")
    log(f"  source built in {time.monotonic() - t:.1f} s")


def registry_manifest(host: str, repo: str, ref: str) -> tuple[str, bytes]:
    with http_get(f"http://{host}/v2/{repo}/manifests/{ref}", accept=MANIFEST_ACCEPT) as r:
        body = r.read()
    return "sha256:" + hashlib.sha256(body).hexdigest(), body


# ---------------------------------------------------------------------------------------------
# the bench


def dst_repo(src_repo: str) -> str:
    return f"{DST_NS}/{src_repo.rsplit('/', 1)[1]}"


class MirrorBench(Bench):
    """bench_engine's Bench (fresh dirs, per-run skopeo cache, settle, notes) with mirror runs."""

    src: LoggingRegistry | None
    runner: Runner

    def start_logging_registry(self, root: Path) -> LoggingRegistry:
        reg = LoggingRegistry(root)
        reg.start()
        return reg

    def write_plan(self, source: Source, dst: str, scratch: Path) -> Path:
        assert self.src is not None
        lines = ["# blobflow mirror plan written by benches/bench_mirror.py: every repository, all tags", ""]
        for repo in source.repos:
            lines += ["[[mirror]]", f'source = "{self.src.host}/{repo}"', f'destination = "{dst}/{dst_repo(repo)}"', ""]
        path = scratch / "plan.toml"
        path.write_text("\n".join(lines))
        return path

    def write_yaml(self, source: Source, scratch: Path) -> Path:
        assert self.src is not None
        lines = [f'"{self.src.host}":', "  tls-verify: false", "  images:"]
        for repo in source.repos:
            lines.append(f"    {repo}: [{', '.join(json.dumps(t) for t in source.tags(repo))}]")
        path = scratch / "sync.yaml"
        path.write_text("\n".join(lines) + "\n")
        return path

    def argv_for(self, tool: str, source: Source, dst: str, scratch: Path) -> list[str]:
        assert self.src is not None
        if tool == "blobflow":
            return [*self.blobflow, "mirror", "-q", "--plain-http", "--state-dir", str(scratch / "state"),
                    "--report", str(scratch / "report.json"), str(self.write_plan(source, dst, scratch))]
        common = ["skopeo", "sync", "--dest", "docker", "--src-tls-verify=false", "--dest-tls-verify=false"]
        if tool == "skopeo-yaml":
            return [*common, "--src", "yaml", str(self.write_yaml(source, scratch)), f"{dst}/{DST_NS}"]
        script = "\n".join(shlex.join([*common, "--src", "docker", f"{self.src.host}/{repo}", f"{dst}/{DST_NS}"])
                           for repo in source.repos)
        return ["sh", "-ec", script]

    def run_tool(self, tool: str, phase: str, repeat: int, source: Source, dst: LoggingRegistry,
                 *, verify_blobs: bool) -> Sample:
        assert self.src is not None
        scratch = self.fresh_dir(f"{tool}-{phase.replace(' ', '-')}-{repeat}")
        try:
            env = self.tool_env("skopeo" if tool.startswith("skopeo") else tool, scratch)
            argv = self.argv_for(tool, source, dst.host, scratch)
            os.sync()
            waited = self.settle()
            src_off, dst_off = self.src.log_offset(), dst.log_offset()
            try:
                m = self.runner.run(argv, env=env, label=f"{tool}-{phase.replace(' ', '-')}",
                                    registry_pids=[self.src.pid, dst.pid])
            except BenchError as e:
                raise BenchError(f"{e}\n--- destination registry log ---\n{dst.log_tail(2000)}") from None
            time.sleep(0.05)  # let the registries' access log lines land
            reqs = count_requests(self.src.requests_since(src_off), dst.requests_since(dst_off))
            if tool == "blobflow":
                report = json.loads((scratch / "report.json").read_text())
                reqs["blobflow_reported"] = report.get("requests_per_host", {})
                statuses = Counter(i["status"] for i in report.get("images", []))
                reqs["blobflow_statuses"] = dict(statuses)
            elif phase == "cold":
                self.check_skopeo_cache(scratch)
            # a "nothing changed" skopeo run only reads its (empty, per-run) cache, and skopeo creates the
            # cache file only when it records something: the cold run's check proves the redirection works
            verify_destination(dst.host, source, f"{phase} run by {tool}", blobs=verify_blobs)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        return Sample(tool, phase, repeat, m.seconds, m.peak_rss_kib, m.user_s, m.sys_s, m.registry_cpu_s,
                      m.other_cpu_s, waited, reqs, argv)


def verify_destination(host: str, source: Source, what: str, *, blobs: bool) -> None:
    """Every tag at the destination has the source's manifest digest; with ``blobs``, every blob hashes."""
    seen: set[str] = set()
    for image in source.images:
        repo = dst_repo(image["repo"])
        try:
            digest, body = registry_manifest(host, repo, image["tag"])
        except OSError as e:
            raise BenchError(f"verify {what}: cannot read {host}/{repo}:{image['tag']}: {e}") from None
        if digest != image["digest"]:
            raise BenchError(f"verify {what}: {repo}:{image['tag']} is {digest}, the source has {image['digest']}")
        if not blobs:
            continue
        manifest = json.loads(body)
        for blob in [manifest["config"], *manifest["layers"]]:
            if blob["digest"] in seen:
                continue
            verify_served_blob(host, repo, blob, what)
            seen.add(blob["digest"])
    log(f"  verified {what}: {len(source.images)} manifests match the source"
        + (f", {len(seen)} distinct blobs hash to their digests" if blobs else ""))


# ---------------------------------------------------------------------------------------------
# reporting


def med(samples: Sequence[Sample], attr: str = "seconds") -> float:
    return statistics.median(getattr(s, attr) for s in samples)


def med_req(samples: Sequence[Sample], key: str) -> str:
    values = [s.requests.get(key, 0) for s in samples]
    return f"{statistics.median(values):.0f}" if values else "-"


def report(res: Results, tools: Sequence[str], source: Source) -> str:
    n_img = len(source.images)
    parts = [f"source: {n_img} tags in {len(source.repos)} repositories, {source.unique_bytes / MiB:.0f} MiB of "
             f"distinct blobs ({sum(i['bytes'] for i in source.images) / MiB:.0f} MiB summed over tags); "
             f"{source.shape.key}", ""]
    rows, ratios = [], []
    for phase in PHASES:
        bf = res.of("blobflow", phase)
        if not bf:
            continue
        bf_med = med(bf)
        for tool in tools:
            ss = res.of(tool, phase)
            if not ss:
                continue
            rows.append([phase, tool, fmt_s([s.seconds for s in ss]), f"{med(ss) / bf_med:.2f}",
                         f"{statistics.median(s.user_s + s.sys_s for s in ss):.2f}",
                         f"{max(s.peak_rss_kib for s in ss) / 1024:.0f}",
                         med_req(ss, "src"), med_req(ss, "src_blob_gets"),
                         f"{statistics.median(s.requests['src_blob_bytes'] for s in ss) / MB:.1f}",
                         med_req(ss, "dst"), med_req(ss, "dst_uploads"), med_req(ss, "dst_mounts"),
                         med_req(ss, "dst_manifest_puts")])
        skopeos = {t: med(res.of(t, phase)) for t in tools if t != "blobflow" and res.of(t, phase)}
        if skopeos:
            best = min(skopeos, key=lambda t: skopeos[t])
            ratios.append(f"{phase}: skopeo/blobflow = {skopeos[best]:.2f}/{bf_med:.2f} s = "
                          f"{skopeos[best] / bf_med:.2f}  (fastest skopeo mode: {best})")
    parts.append(table(["run", "tool", "seconds median (min-max)", "ratio tool/blobflow", "cpu s", "peak RSS MiB",
                        "src reqs", "src blob GETs", "src blob MB", "dst reqs", "dst uploads", "dst mounts",
                        "manifest PUTs"], rows))
    parts += ["", *ratios]
    parts += load_lines(res.machine, res.samples, lambda s: f"{s.tool} {s.phase} #{s.repeat + 1}", res.notes)
    return "\n".join(parts)


# ---------------------------------------------------------------------------------------------
# main


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n", 1)[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="4 x 3 small images and one 32 MiB image, one repeat")
    p.add_argument("--repeat", type=int, metavar="N", help="timed runs per tool and phase (default 3; --quick: 1)")
    p.add_argument("--json", type=Path, metavar="FILE", help="write every raw sample to FILE")
    p.add_argument("--skopeo-modes", default=",".join(SKOPEO_MODES),
                   help="comma-separated subset of yaml,per-repo (default: both)")
    p.add_argument("--settle", type=float, default=30.0, metavar="SECONDS",
                   help="before each timed run, wait up to SECONDS for a quiet second (default 30; 0: don't)")
    args = p.parse_args(argv)
    modes = [m.strip() for m in args.skopeo_modes.split(",") if m.strip()]
    if not modes or any(m not in SKOPEO_MODES for m in modes):
        p.error(f"--skopeo-modes takes a comma-separated subset of {','.join(SKOPEO_MODES)}")
    args.tools = ["blobflow", *(f"skopeo-{m}" for m in modes)]
    if args.repeat is None:
        args.repeat = 1 if args.quick else 3
    if args.repeat < 1:
        p.error("--repeat must be at least 1")
    return args


def run(args: argparse.Namespace, res: Results) -> None:
    for tool in ("skopeo", "docker-registry"):
        if shutil.which(tool) is None:
            raise BenchError(f"{tool} not found: `make setup` installs it")
    with contextlib.ExitStack() as stack:
        bench = MirrorBench(args, stack, res)
        res.machine, res.versions = machine_info(), versions()
        log(header(res, bench.runner.rss_method, skip=("curl",)))
        log("")
        source = cached_source(bench, QUICK if args.quick else FULL)
        res.source = {"key": source.shape.key, "images": source.images}
        src = LoggingRegistry(source.storage_root)
        src.start()
        stack.callback(src.stop)
        bench.src = src
        for image in source.images:  # the cached storage still serves what was recorded
            digest, _ = registry_manifest(src.host, image["repo"], image["tag"])
            if digest != image["digest"]:
                raise BenchError(f"cached source {source.storage_root}: {image['repo']}:{image['tag']} is {digest}, "
                                 f"recorded {image['digest']}; remove {source.storage_root.parent}")
        warmed = read_files([src.storage])
        log(f"source registry {src.host} ({source.storage_root.relative_to(REPO_ROOT)}): {len(source.images)} tags, "
            f"{source.unique_bytes / MiB:.0f} MiB distinct; page cache warmed ({warmed / MiB:.0f} MiB read)")
        log(f"blobflow runs as: {shlex.join(bench.blobflow)}")

        tools = args.tools
        for r in range(args.repeat):
            order = tools[r % len(tools):] + tools[:r % len(tools)]
            log(f"\n== repeat {r + 1}/{args.repeat}: {', '.join(order)}")
            for tool in order:
                dst = bench.start_logging_registry(bench.fresh_dir(f"dst-{tool}-{r}"))
                try:
                    for phase in PHASES:
                        s = bench.run_tool(tool, phase, r, source, dst,
                                           verify_blobs=(phase == "cold" and r == args.repeat - 1))
                        res.samples.append(s)
                        q = s.requests
                        log(f"  {tool:15} {phase:15} #{r + 1}: {s.seconds:7.2f} s  cpu {s.user_s + s.sys_s:5.2f} s"
                            f"  peak RSS {s.peak_rss_kib / 1024:4.0f} MiB  src {q['src']} reqs"
                            f" ({q['src_blob_gets']} blob GETs, {q['src_blob_bytes'] / MB:.1f} MB)"
                            f"  dst {q['dst']} reqs ({q['dst_uploads']} uploads, {q['dst_mounts']} mounts)"
                            f"  other cpu {s.other_cpu_s:5.2f} s"
                            + (f"  (waited {s.settle_wait_s:.0f} s for quiet)" if s.settle_wait_s > 1.5 else ""))
                finally:
                    dst.stop()
                    shutil.rmtree(dst.root, ignore_errors=True)

        log("\n" + "=" * 100)
        log(header(res, bench.runner.rss_method, skip=("curl",)))
        log("")
        log(report(res, tools, source))


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    res = Results(argv=[sys.executable, *sys.argv] if argv is None else ["bench_mirror.py", *argv])
    return run_guarded(run, args, res)


if __name__ == "__main__":
    sys.exit(main())

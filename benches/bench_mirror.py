#!/usr/bin/env python3
"""blobflow mirror vs skopeo sync: many small images sharing base layers, plus a few large ones.

Run from the repository's venv (``make bench-mirror``)::

    .venv/bin/python benches/bench_mirror.py [--quick | --scale] [--repeat N] [--json FILE]
                                             [--skopeo-modes yaml,per-repo] [--source-latency MS[+connect][,...]]

What is measured, and how it is kept fair (the conventions of ``bench_engine.py``, whose helpers this
bench imports):

* The source registry is built once and cached under ``.bench/mirror/``: 8 repositories x 6 tags of
  small images (one base layer of 8-16 MiB, shared by the two repositories built on the same base, and
  1-2 unique layers of 64 KiB-2 MiB) plus 2 large images of 128 MiB in repositories of their own;
  ``--quick``: 4 x 3 small images and one 32 MiB image; ``--scale``: 20 x 50 small images (1000 tags,
  base layers of 4-8 MiB each shared by five repositories, unique layers of 8-64 KiB) and no large
  one, to see what a plan of a thousand tags costs per image. Images come from
  :func:`blobflow.synth.build_image` with fixed seeds and are pushed into the source registry by
  ``skopeo copy``; the registry's storage directory is kept and reused by later runs.
* The plan is the same for both tools: every repository ``bench/NAME`` of the source goes to
  ``mirror/NAME`` of the destination, all tags. blobflow runs ``blobflow mirror --plain-http PLAN``
  (a TOML plan with one ``[[mirror]]`` entry per repository and no tag list, so it lists tags as
  skopeo does). skopeo runs ``skopeo sync --src docker|yaml --dest docker`` in one or both of two modes:
  ``yaml``: one process, a YAML source file naming every repository and tag; ``per-repo``: one
  ``skopeo sync --src docker SRC/bench/NAME DST/mirror`` per repository, in sequence (one timed shell).
  The table reports both and takes the faster as "skopeo" for the ratio.
* Network conditions (``--source-latency``, default ``0,40,40+connect``; one table each). The users this is for
  mirror FROM a remote registry (Docker Hub, GHCR: 20-100 ms round trip) into a registry near them. On
  loopback a request costs well under a millisecond, so a tool that sends its requests one after
  another, image after image, as ``skopeo sync`` does, loses little; over a real round trip that
  design is what makes it slow (skopeo#1021, "Sync is very, very slow"). Condition ``0`` is direct,
  both registries on loopback as before. Condition ``MS`` puts a delaying reverse proxy in front of
  the source: ``tests/faultproxy.py``'s FaultProxy with ``Faults(latency=MS/1000)`` and no other
  fault, run by ``benches/latency_proxy.py`` in a process of its own (not in the bench's, whose GIL it
  would share), listening on 127.0.0.1 only (checked on the bound sockets). Both tools read the source
  through that one proxy (one process per condition, kept for the whole bench); the destination stays
  direct (a registry near the mirror). The proxy sleeps MS ms before it forwards each request, HEAD,
  manifest GET and blob GET alike (checked at start: each must take at least MS ms), and concurrent
  requests sleep concurrently, as round trips do. Condition ``MS+connect`` adds what a new connection
  to a remote registry costs: the first request of each new client connection waits MS ms more, the
  round trip of a TCP handshake (checked at start: a request on a new connection takes at least 2 x MS
  ms). A tool that keeps its connections pays it a few times; one that opens a connection per
  request or two pays it on each. The proxy counts the connections each run opened ("src conns").
  Bodies stream through in 64 KiB chunks (memory stays bounded, no blob is buffered whole), but every
  body byte passes through Python in the proxy: about 3 CPU seconds per GB and a few ms per request on
  the 2-CPU machine this was written on (one curl stream: 140 MB/s through it, 300 direct), recorded
  per run ("proxy cpu s"); both tools pay it, and on few cores it competes with them. Not modelled:
  TLS (one or two more round trips per new connection, and its CPU), connection set-up in the plain
  ``MS`` condition, token fetches, redirects of blob GETs to a CDN, and limited bandwidth (which would
  slow the large images for both tools). Each proxied run checks that the proxy forwarded exactly the
  requests the source registry logged.
* Every timed "cold" run gets a fresh, empty destination registry. The "nothing changed" run follows
  on the same destination with the same plan. skopeo gets a fresh blob-info cache for every timed run
  (moved to a per-run directory through the environment, and checked afterwards), shared by all the
  invocations of that run; blobflow gets a fresh ``--state-dir`` for every run (no resume journal).
* Both tools run under the same wrapper (``/usr/bin/time``), wall time around the whole process(es),
  start-up included; the order of the tools rotates in each repeat; dirty pages are flushed and the
  bench waits for a quiet second (``--settle``) before each timed run, and records the CPU other
  work used meanwhile (the machine may be shared). Conditions are interleaved: each repeat runs every
  condition in turn.
* Requests are counted at the registries themselves (their access logs, enabled for this bench):
  per run, requests to the source and to the destination, blob GETs and bytes served by the source,
  and blob upload sessions and mounts at the destination. Behind the proxy the source registry still
  logs every request (the proxy adds none and drops none).
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
import urllib.request
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
    byte_compile_blobflow,
    child_env,
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
from latency_proxy import LatencyProxy

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
DEFAULT_CONDITIONS = "0,40,40+connect"  # --source-latency
LOG_LAG_S = 2.0  # how long a run's last access log lines may take to land
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never an environment proxy
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
SCALE = Shape(20, 50, (4, 5, 6, 8), (8, 64), ())


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
class Condition:
    """How the tools reach the source: directly, or through a proxy that delays every request."""

    source_latency_ms: float
    source_host: str  # what the tools are given as the source: the registry's host, or the proxy's
    proxy: LatencyProxy | None = None
    connect: bool = False  # a new connection's first request waits one more round trip
    probe_s: dict[str, float] = field(default_factory=dict)  # seconds of single requests through the proxy

    @property
    def name(self) -> str:
        if self.proxy is None:
            return "direct"
        return f"source +{self.source_latency_ms:g} ms" + (" +connect" if self.connect else "")

    @property
    def title(self) -> str:
        if self.proxy is None:
            return "direct: source and destination registries on loopback, no proxy"
        per_connection = (f", and {self.source_latency_ms:g} ms more before the first request of each new "
                          "connection (a TCP handshake)" if self.connect else "")
        return (f"remote source: {self.source_latency_ms:g} ms added before each source request{per_connection} "
                f"(delaying proxy {self.source_host} in front of the source, both tools through it); "
                "destination direct")

    def describe(self) -> dict[str, Any]:
        """The condition as recorded in --json."""
        seconds = f"{self.source_latency_ms / 1000:g}"
        faults = f"latency={seconds}" + (f", connect_latency={seconds}" if self.connect else "")
        return {"name": self.name, "title": self.title, "source_latency_ms": self.source_latency_ms,
                "connect": self.connect, "source_host": self.source_host, "probe_s": self.probe_s,
                "proxy": None if self.proxy is None else
                f"tests/faultproxy.py FaultProxy, Faults({faults}) in its own process (benches/latency_proxy.py)"}


@dataclass
class Sample:
    tool: str
    phase: str
    condition: str  # Condition.name
    source_latency_ms: float  # 0: direct
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
    proxy: dict[str, Any] | None  # what the delaying proxy did during the run: requests, bytes, cpu_s


@dataclass
class Results:
    argv: list[str]
    machine: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    source: dict[str, Any] = field(default_factory=dict)
    conditions: list[dict[str, Any]] = field(default_factory=list)
    samples: list[Sample] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    error: str | None = None

    def of(self, tool: str, phase: str, condition: str) -> list[Sample]:
        return [s for s in self.samples if s.tool == tool and s.phase == phase and s.condition == condition]


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

    def write_plan(self, source: Source, src: str, dst: str, scratch: Path) -> Path:
        lines = ["# blobflow mirror plan written by benches/bench_mirror.py: every repository, all tags", ""]
        for repo in source.repos:
            lines += ["[[mirror]]", f'source = "{src}/{repo}"', f'destination = "{dst}/{dst_repo(repo)}"', ""]
        path = scratch / "plan.toml"
        path.write_text("\n".join(lines))
        return path

    def write_yaml(self, source: Source, src: str, scratch: Path) -> Path:
        lines = [f'"{src}":', "  tls-verify: false", "  images:"]
        for repo in source.repos:
            lines.append(f"    {repo}: [{', '.join(json.dumps(t) for t in source.tags(repo))}]")
        path = scratch / "sync.yaml"
        path.write_text("\n".join(lines) + "\n")
        return path

    def argv_for(self, tool: str, source: Source, src: str, dst: str, scratch: Path) -> list[str]:
        """The command for ``tool``, reading the source at host ``src`` (the registry, or the proxy before it)."""
        if tool == "blobflow":
            return [*self.blobflow, "mirror", "-q", "--plain-http", "--state-dir", str(scratch / "state"),
                    "--report", str(scratch / "report.json"), str(self.write_plan(source, src, dst, scratch))]
        common = ["skopeo", "sync", "--dest", "docker", "--src-tls-verify=false", "--dest-tls-verify=false"]
        if tool == "skopeo-yaml":
            return [*common, "--src", "yaml", str(self.write_yaml(source, src, scratch)), f"{dst}/{DST_NS}"]
        script = "\n".join(shlex.join([*common, "--src", "docker", f"{src}/{repo}", f"{dst}/{DST_NS}"])
                           for repo in source.repos)
        return ["sh", "-ec", script]

    def run_tool(self, tool: str, phase: str, repeat: int, source: Source, dst: LoggingRegistry, cond: Condition,
                 *, verify_blobs: bool) -> Sample:
        assert self.src is not None
        label = f"{tool}-{phase.replace(' ', '-')}-{cond.name.replace(' ', '')}"
        scratch = self.fresh_dir(f"{label}-{repeat}")
        try:
            env = self.tool_env("skopeo" if tool.startswith("skopeo") else tool, scratch)
            argv = self.argv_for(tool, source, cond.source_host, dst.host, scratch)
            os.sync()
            waited = self.settle()
            src_off, dst_off = self.src.log_offset(), dst.log_offset()
            proxy_before = cond.proxy.stats() if cond.proxy else None
            try:
                m = self.runner.run(argv, env=env, label=label, registry_pids=[self.src.pid, dst.pid])
            except BenchError as e:
                raise BenchError(f"{e}\n--- destination registry log ---\n{dst.log_tail(2000)}") from None
            proxied = None
            if cond.proxy is not None and proxy_before is not None:
                proxied = proxy_delta(proxy_before, cond.proxy.stats())
            time.sleep(0.05)  # let the registries' access log lines land
            src_reqs = self.src.requests_since(src_off)
            if proxied is not None:
                src_reqs = self.check_proxied(proxied, src_off, src_reqs, f"{phase} run by {tool}, {cond.name}")
            reqs = count_requests(src_reqs, dst.requests_since(dst_off))
            if tool == "blobflow":
                report = json.loads((scratch / "report.json").read_text())
                reqs["blobflow_reported"] = report.get("requests_per_host", {})
                statuses = Counter(i["status"] for i in report.get("images", []))
                reqs["blobflow_statuses"] = dict(statuses)
            elif phase == "cold":
                self.check_skopeo_cache(scratch)
            # a "nothing changed" skopeo run only reads its (empty, per-run) cache, and skopeo creates the
            # cache file only when it records something: the cold run's check proves the redirection works
            verify_destination(dst.host, source, f"{phase} run by {tool}, {cond.name}", blobs=verify_blobs)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        return Sample(tool, phase, cond.name, cond.source_latency_ms, repeat, m.seconds, m.peak_rss_kib, m.user_s,
                      m.sys_s, m.registry_cpu_s, m.other_cpu_s, waited, reqs, argv, proxied)

    def check_proxied(self, proxied: dict[str, Any], src_off: int, src_reqs: list[tuple[str, str, int, int]],
                      what: str) -> list[tuple[str, str, int, int]]:
        """The proxy forwarded exactly the requests the source registry logged, and none failed in the proxy.

        Fewer logged than forwarded: the last lines may still be on their way (waits ``LOG_LAG_S``).
        More logged: something reached the source without the proxy, and the run was not the condition.
        """
        assert self.src is not None
        deadline = time.monotonic() + LOG_LAG_S
        while len(src_reqs) < proxied["requests"] and time.monotonic() < deadline:
            time.sleep(0.1)
            src_reqs = self.src.requests_since(src_off)
        if len(src_reqs) != proxied["requests"]:
            raise BenchError(f"{what}: the proxy forwarded {proxied['requests']} requests, the source registry "
                             f"logged {len(src_reqs)}: some requests did not go through the proxy")
        if proxied["upstream_error"]:
            raise BenchError(f"{what}: the proxy failed to reach the source {proxied['upstream_error']} times")
        return src_reqs


def proxy_delta(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """What the proxy did between two ``LatencyProxy.stats()``: requests, bytes each way, errors, CPU."""
    keys = ("requests", "requests:GET", "requests:HEAD", "blob_get", "connections", "bytes_to_client",
            "upstream_error", "stream_error")
    out: dict[str, Any] = {k: after.get(k, 0) - before.get(k, 0) for k in keys}
    out["cpu_s"] = round(after["cpu_s"] - before["cpu_s"], 3)
    return out


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


def report(res: Results, tools: Sequence[str], source: Source, conditions: Sequence[Condition]) -> str:
    n_img = len(source.images)
    parts = [f"source: {n_img} tags in {len(source.repos)} repositories, {source.unique_bytes / MiB:.0f} MiB of "
             f"distinct blobs ({sum(i['bytes'] for i in source.images) / MiB:.0f} MiB summed over tags); "
             f"{source.shape.key}"]
    summary = []
    for cond in conditions:
        table_text, ratios = condition_table(res, tools, cond)
        if not table_text:
            continue
        parts += ["", f"== {cond.title}", table_text, *ratios]
        summary += [f"  {cond.name:24} {r}" for r in ratios]
    if len(conditions) > 1 and summary:
        parts += ["", "skopeo/blobflow by condition:", *summary]
    parts += load_lines(res.machine, res.samples, lambda s: f"{s.tool} {s.phase} {s.condition} #{s.repeat + 1}",
                        res.notes)
    return "\n".join(parts)


def condition_table(res: Results, tools: Sequence[str], cond: Condition) -> tuple[str, list[str]]:
    """The table of one condition (cold and "nothing changed", every tool), and its ratio lines."""
    rows, ratios = [], []
    for phase in PHASES:
        bf = res.of("blobflow", phase, cond.name)
        if not bf:
            continue
        bf_med = med(bf)
        for tool in tools:
            ss = res.of(tool, phase, cond.name)
            if not ss:
                continue
            row = [phase, tool, fmt_s([s.seconds for s in ss]), f"{med(ss) / bf_med:.2f}",
                   f"{statistics.median(s.user_s + s.sys_s for s in ss):.2f}",
                   f"{max(s.peak_rss_kib for s in ss) / 1024:.0f}",
                   med_req(ss, "src"), med_req(ss, "src_blob_gets"),
                   f"{statistics.median(s.requests['src_blob_bytes'] for s in ss) / MB:.1f}",
                   med_req(ss, "dst"), med_req(ss, "dst_uploads"), med_req(ss, "dst_mounts"),
                   med_req(ss, "dst_manifest_puts")]
            if cond.proxy is not None:
                row.append(f"{statistics.median(s.proxy['connections'] if s.proxy else 0 for s in ss):.0f}")
                row.append(f"{statistics.median(s.proxy['cpu_s'] if s.proxy else 0.0 for s in ss):.2f}")
            rows.append(row)
        skopeos = {t: med(ss) for t in tools if t != "blobflow" and (ss := res.of(t, phase, cond.name))}
        if skopeos:
            best = min(skopeos, key=lambda t: skopeos[t])
            ratios.append(f"{phase}: skopeo/blobflow = {skopeos[best]:.2f}/{bf_med:.2f} s = "
                          f"{skopeos[best] / bf_med:.2f}  (fastest skopeo mode: {best})")
    if not rows:
        return "", []
    columns = ["run", "tool", "seconds median (min-max)", "ratio tool/blobflow", "cpu s", "peak RSS MiB",
               "src reqs", "src blob GETs", "src blob MB", "dst reqs", "dst uploads", "dst mounts", "manifest PUTs"]
    if cond.proxy is not None:
        columns += ["src conns", "proxy cpu s"]
    return table(columns, rows), ratios


# ---------------------------------------------------------------------------------------------
# main


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n", 1)[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="4 x 3 small images and one 32 MiB image, one repeat")
    size.add_argument("--scale", action="store_true",
                      help="20 x 50 small images (1000 tags), no large ones; one repeat, direct, skopeo yaml mode "
                           "unless --repeat, --source-latency, --skopeo-modes say otherwise")
    p.add_argument("--repeat", type=int, metavar="N",
                   help="timed runs per tool and phase (default 3; --quick, --scale: 1)")
    p.add_argument("--json", type=Path, metavar="FILE", help="write every raw sample to FILE")
    p.add_argument("--skopeo-modes",
                   help="comma-separated subset of yaml,per-repo (default: both; --scale: yaml)")
    p.add_argument("--settle", type=float, default=30.0, metavar="SECONDS",
                   help="before each timed run, wait up to SECONDS for a quiet second (default 30; 0: don't)")
    p.add_argument("--source-latency", action="append", metavar="MS[+connect][,...]",
                   help="network conditions, one table each: milliseconds a proxy in front of the source adds "
                        "before each request, 0 = direct, no proxy; MS+connect: as much again before the first "
                        "request of each new connection (repeatable or comma list; default: "
                        f"{DEFAULT_CONDITIONS}; --scale: 0)")
    args = p.parse_args(argv)
    conditions: list[tuple[float, bool]] = []
    for text in args.source_latency or ["0" if args.scale else DEFAULT_CONDITIONS]:
        for item in (t.strip() for t in text.split(",")):
            number, plus, word = item.partition("+")
            try:
                ms = float(number)
            except ValueError:
                ms = -1.0
            if ms < 0 or (plus and word != "connect") or (plus and ms == 0):
                p.error(f"--source-latency takes milliseconds, each maybe with +connect (e.g. 0,40,40+connect); "
                        f"got {item!r}")
            if ms > 10_000:
                p.error(f"--source-latency: {number} ms is outside 0-10000")
            if (ms, bool(plus)) not in conditions:
                conditions.append((ms, bool(plus)))
    args.source_latency = conditions
    modes_text = args.skopeo_modes or ("yaml" if args.scale else ",".join(SKOPEO_MODES))
    modes = [m.strip() for m in modes_text.split(",") if m.strip()]
    if not modes or any(m not in SKOPEO_MODES for m in modes):
        p.error(f"--skopeo-modes takes a comma-separated subset of {','.join(SKOPEO_MODES)}")
    args.tools = ["blobflow", *(f"skopeo-{m}" for m in modes)]
    if args.repeat is None:
        args.repeat = 1 if args.quick or args.scale else 3
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
        source = cached_source(bench, QUICK if args.quick else SCALE if args.scale else FULL)
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
        log(f"blobflow runs as: {shlex.join(bench.blobflow)}; {byte_compile_blobflow()}")

        conditions = [start_condition(bench, src, source, ms, connect=connect) for ms, connect in args.source_latency]
        res.conditions = [c.describe() for c in conditions]

        tools = args.tools
        for r in range(args.repeat):
            order = tools[r % len(tools):] + tools[:r % len(tools)]
            for cond in conditions:
                log(f"\n== repeat {r + 1}/{args.repeat}, {cond.title}: {', '.join(order)}")
                for tool in order:
                    dst = bench.start_logging_registry(bench.fresh_dir(f"dst-{tool}-{r}"))
                    try:
                        for phase in PHASES:
                            s = bench.run_tool(tool, phase, r, source, dst, cond,
                                               verify_blobs=(phase == "cold" and r == args.repeat - 1))
                            res.samples.append(s)
                            log_sample(s)
                    finally:
                        dst.stop()
                        shutil.rmtree(dst.root, ignore_errors=True)

        log("\n" + "=" * 100)
        log(header(res, bench.runner.rss_method, skip=("curl",)))
        log("")
        log(report(res, tools, source, conditions))


def log_sample(s: Sample) -> None:
    q = s.requests
    log(f"  {s.tool:15} {s.phase:15} #{s.repeat + 1}: {s.seconds:7.2f} s  cpu {s.user_s + s.sys_s:5.2f} s"
        f"  peak RSS {s.peak_rss_kib / 1024:4.0f} MiB  src {q['src']} reqs"
        f" ({q['src_blob_gets']} blob GETs, {q['src_blob_bytes'] / MB:.1f} MB)"
        f"  dst {q['dst']} reqs ({q['dst_uploads']} uploads, {q['dst_mounts']} mounts)"
        + (f"  src conns {s.proxy['connections']}  proxy cpu {s.proxy['cpu_s']:5.2f} s" if s.proxy else "")
        + f"  other cpu {s.other_cpu_s:5.2f} s"
        + (f"  (waited {s.settle_wait_s:.0f} s for quiet)" if s.settle_wait_s > 1.5 else ""))


def start_condition(bench: MirrorBench, src: LoggingRegistry, source: Source, latency_ms: float, *,
                    connect: bool = False) -> Condition:
    """Direct for 0; else a delaying proxy in its own process before ``src``, checked, stopped on exit."""
    if latency_ms == 0:
        return Condition(0.0, src.host)
    log_name = f"proxy-{latency_ms:g}ms{'-connect' if connect else ''}.log"
    proxy = LatencyProxy(src.url, latency_ms, log_path=bench.work / "logs" / log_name, env=child_env(),
                         connect=connect)
    bench.stack.callback(proxy.stop)
    try:
        proxy.start()
    except RuntimeError as e:
        raise BenchError(str(e)) from None
    cond = Condition(latency_ms, proxy.host, proxy, connect)
    cond.probe_s = probe_latency(cond, source)
    log(f"{cond.name}: proxy {proxy.host} (pid {proxy.pid}) in front of {src.host}; single requests through it: "
        + ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in cond.probe_s.items()))
    return cond


def probe_latency(cond: Condition, source: Source) -> dict[str, float]:
    """HEAD and GET of a manifest and GET of a blob through the proxy: each takes at least the latency, and
    twice that with +connect (urllib opens a new connection for each request)."""
    image = source.images[0]
    blob = next(iter(image["blobs"]))
    base = f"http://{cond.source_host}/v2/{image['repo']}"
    probes = {"manifest HEAD": ("HEAD", f"{base}/manifests/{image['tag']}", image["digest"]),
              "manifest GET": ("GET", f"{base}/manifests/{image['tag']}", image["digest"]),
              "blob GET": ("GET", f"{base}/blobs/{blob}", blob)}
    out = {}
    for name, (method, url, digest) in probes.items():
        req = urllib.request.Request(url, method=method, headers={"Accept": MANIFEST_ACCEPT})
        start = time.perf_counter()
        with _DIRECT.open(req, timeout=30) as r:
            body = r.read()
        out[name] = time.perf_counter() - start
        if method == "HEAD":
            got = r.headers.get("Docker-Content-Digest")
        else:
            got = "sha256:" + hashlib.sha256(body).hexdigest()
        if got != digest:
            raise BenchError(f"{cond.name}: {method} {url} through the proxy gave {got}, expected {digest}")
        least_ms = cond.source_latency_ms * (2 if cond.connect else 1)
        if out[name] < least_ms / 1000:
            raise BenchError(f"{cond.name}: {method} {url} took {out[name] * 1000:.1f} ms through the proxy, "
                             f"less than the {least_ms:g} ms it must add")
    return out


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    res = Results(argv=[sys.executable, *sys.argv] if argv is None else ["bench_mirror.py", *argv])
    return run_guarded(run, args, res)


if __name__ == "__main__":
    sys.exit(main())

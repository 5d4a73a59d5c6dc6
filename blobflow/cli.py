"""The command line: argv -> one API call -> rendered result -> exit code (PRODUCT.md)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import errno
import getpass
import json
import os
import signal
import sys
import traceback
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, NoReturn

from . import __version__
from ._render import JsonRenderer, LogRenderer, Renderer
from .codec import Codec, layer_compression
from .config import EngineConfig, load_registry_limits, parse_size, positive_finite
from .errors import BadInputError, BlobflowError
from .types import Reference

if TYPE_CHECKING:  # the engine (and aiohttp with it) is imported once a command runs, not for --help
    from .api import Client
    from .registry import Credentials

__all__ = ["entry", "main"]

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_PARTIAL, EXIT_INTERRUPTED = 0, 1, 2, 3, 130


class _Parser(argparse.ArgumentParser):
    """argparse that exits 2 with one line, like the rest of blobflow's bad-input errors."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: {message}\n(see `{self.prog} --help`)\n")


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except BadInputError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _codec(text: str) -> str:
    try:
        Codec.parse(text)
    except BadInputError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def _rate(text: str) -> float:
    """Requests per second: a finite number, 0 for no limit (as a plan's defaults.rate)."""
    try:
        rate = float(text)
    except ValueError:
        rate = -1.0
    if not (rate == 0 or positive_finite(rate)):
        raise argparse.ArgumentTypeError(f"invalid rate {text!r}: expected requests per second, 0 for no limit")
    return rate


def _size_list(text: str) -> tuple[int, ...]:
    return tuple(_size(t.strip()) for t in text.split(",") if t.strip())


def _int_list(text: str) -> tuple[int, ...]:
    return tuple(_positive_int(t.strip()) for t in text.split(",") if t.strip())


def _common(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("transfer options")
    g.add_argument("--concurrency", type=_positive_int, metavar="N",
                   help="blobs over 1 MiB moved at once (default 8); as many small ones move beside them")
    g.add_argument("--chunk-size", type=_size, metavar="SIZE",
                   help="upload in PATCH chunks of SIZE (default: one streamed PATCH per blob)")
    g.add_argument("--part-size", type=_size, metavar="SIZE", help="download range size (default 32MiB)")
    g.add_argument("--retries", type=int, metavar="N", help="retries per blob (default 5)")
    g.add_argument("--upload-window", type=float, metavar="SECONDS",
                   help="the destination's upload time limit (ghcr.io: 600)")
    g.add_argument("--max-layer-size", type=_size, metavar="SIZE",
                   help="refuse layers larger than SIZE before sending (ghcr.io: 10GB)")
    g.add_argument("--window-scope", choices=("session", "request"),
                   help="whether the upload window limits each upload session or each HTTP request "
                        "(ghcr.io: session)")
    g.add_argument("--registry-limits", metavar="FILE",
                   help='per-registry limits in TOML: [registries."HOST"] upload_window = 600, '
                        'window_scope = "session", max_layer_size = "10GB"')
    g.add_argument("--no-deadline-tracking", action="store_true",
                   help="send every upload at once, ignoring upload windows (no admission, pacing or early failure)")
    g.add_argument("--state-dir", metavar="DIR", help="where resume journals are kept")
    _connection_and_output(p)


def _connection_and_output(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("connection options")
    g.add_argument("--plain-http", action="store_true", help="use HTTP, not HTTPS, for every registry")
    g.add_argument("--ca-file", metavar="FILE", help="trust this CA bundle for TLS, besides the system's")
    g.add_argument("--insecure", action="store_true", help="do not verify TLS certificates (unsafe)")
    _output(p)


def _output(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("output options")
    g.add_argument("--json", action="store_true", help="JSON lines on stdout: events and a final summary")
    g.add_argument("-q", "--quiet", action="store_true", help="print nothing but errors")
    g.add_argument("-v", "--verbose", action="store_true", help="one line per blob event; tracebacks")


def _image_options(p: argparse.ArgumentParser) -> None:
    """What push and copy both take about the image they write."""
    p.add_argument("--platform", metavar="OS/ARCH[/VARIANT]", help="only this platform of an index")
    p.add_argument("--annotation", action="append", default=[], metavar="KEY=VALUE",
                   help="set a manifest annotation (repeatable)")


def _command(sub: Any, name: str, help_: str, example: str) -> argparse.ArgumentParser:
    p: argparse.ArgumentParser = sub.add_parser(
        name, help=help_, description=help_, epilog=f"example:\n  {example}",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="blobflow", description="Fast, verified, resumable transfers of OCI images and blobs.",
                     epilog="example:\n  blobflow copy docker.io/library/alpine:3.20 localhost:5000/alpine:3.20",
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"blobflow {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)

    p = _command(sub, "pull", "pull an image into an OCI image layout",
                 "blobflow pull ghcr.io/org/app:1.0 ./app-layout --platform linux/amd64")
    p.add_argument("image", metavar="IMAGE")
    p.add_argument("directory", metavar="DIR")
    p.add_argument("--platform", metavar="OS/ARCH[/VARIANT]", help="only this platform of an index")
    _common(p)

    p = _command(sub, "push", "push an image from an OCI image layout",
                 "blobflow push ./app-layout localhost:5000/app:1.0 --annotation "
                 "org.opencontainers.image.source=https://github.com/org/app")
    p.add_argument("directory", metavar="DIR")
    p.add_argument("image", metavar="IMAGE")
    p.add_argument("--tag", help="the layout's image to push, when it holds several")
    _image_options(p)
    p.add_argument("--compress", metavar="zstd[:LEVEL]|gzip[:LEVEL]", type=_codec,
                   help="compress tar layers (that are not already so) while they stream; verified "
                        "against the config's diff_ids")
    _common(p)

    p = _command(sub, "copy", "copy an image between registries, streamed (never touches the disk)",
                 "blobflow copy ghcr.io/org/app:1.0 registry.example.com/app:1.0")
    p.add_argument("source", metavar="SRC")
    p.add_argument("destination", metavar="DST")
    _image_options(p)
    p.add_argument("--recompress", metavar="zstd[:LEVEL]", type=_codec,
                   help="recompress tar layers while they stream (one pass, never on disk); source "
                        "digests and the config's diff_ids verified")
    _common(p)

    p = _command(sub, "mirror", "mirror the images of a plan file (TOML), skipping what is up to date",
                 "blobflow mirror plan.toml --shard 0/4 --report report.json")
    p.add_argument("plan", metavar="PLAN")
    p.add_argument("--dry-run", action="store_true", help="print what would move; write nothing")
    p.add_argument("--shard", metavar="I/N", default="0/1",
                   help="take a deterministic share of the plan (for N machines; 0 <= I < N)")
    p.add_argument("--report", metavar="FILE", help="write a JSON report of every image")
    p.add_argument("--rate", type=_rate, metavar="N",
                   help="at most N requests per second to each source registry host (0: no limit)")
    p.add_argument("--recompress", metavar="zstd[:LEVEL]", type=_codec,
                   help="recompress tar layers while they stream (overrides the plan's defaults.recompress)")
    _common(p)

    blob = _command(sub, "blob", "move a single blob", "blobflow blob get ghcr.io/org/app@sha256:... layer.tgz")
    bsub = blob.add_subparsers(dest="blob_command", required=True, metavar="get|put", parser_class=_Parser)
    p = _command(bsub, "get", "download one blob to a file, verified",
                 "blobflow blob get localhost:5000/app@sha256:<64 hex> ./layer.tar.gz")
    p.add_argument("image", metavar="IMAGE@DIGEST")
    p.add_argument("file", metavar="FILE", help="- for standard output: written once the whole blob is verified "
                   "(spooled under $TMPDIR first; not resumed)")
    _common(p)
    p = _command(bsub, "put", "upload one file as a blob; prints its digest",
                 "blobflow blob put ./layer.tar.gz localhost:5000/app")
    p.add_argument("file", metavar="FILE", help="- for standard input (read to its end under $TMPDIR first)")
    p.add_argument("repository", metavar="REPO")
    _common(p)

    p = _command(sub, "tags", "list a repository's tags (all pages)", "blobflow tags localhost:5000/app")
    p.add_argument("repository", metavar="REPO")
    _common(p)

    p = _command(sub, "inspect", "print an image's manifest", "blobflow inspect localhost:5000/app:1.0")
    p.add_argument("image", metavar="IMAGE")
    p.add_argument("--raw", action="store_true", help="the manifest's exact bytes")
    p.add_argument("--platform", metavar="OS/ARCH[/VARIANT]", help="this platform's manifest, from an index")
    _common(p)

    p = _command(sub, "login", "check credentials with a registry, then store them where docker keeps them "
                 "(its credential helper if one is configured, else $DOCKER_CONFIG/config.json)",
                 'blobflow login ghcr.io -u octocat --password-stdin < token.txt')
    p.add_argument("registry", metavar="REGISTRY", help="host[:port], e.g. ghcr.io or localhost:5000")
    p.add_argument("-u", "--username", help="user name (asked for on a terminal when missing)")
    p.add_argument("--password-stdin", action="store_true",
                   help="read the password or token from standard input (asked for on a terminal otherwise)")
    _connection_and_output(p)

    p = _command(sub, "logout", "forget a registry's credentials where docker keeps them (its credential "
                 "helper, and $DOCKER_CONFIG/config.json)", "blobflow logout ghcr.io")
    p.add_argument("registry", metavar="REGISTRY", help="host[:port], e.g. ghcr.io or localhost:5000")
    _output(p)  # it talks to no registry
    p.set_defaults(plain_http=False, insecure=False, ca_file=None)

    bench_help = ("benchmark a registry with synthetic blobs: push, pull or copy over a sweep of blob "
                  "sizes and concurrency levels; a table, --json FILE (schema in blobflow.benchreport) and --plot.\n"
                  "Runs in TARGET/blobflow-bench-<run id> and deletes what it wrote where the registry allows.\n"
                  "`blobflow bench compare A.json B.json` prints the ratios between two runs.")
    bench_example = ("blobflow bench localhost:5000/bench --sizes 1MiB,64MiB --concurrency 1,4 --ops push,pull "
                     "--repeat 3 --json run.json --plot run.png")
    # resolve: bench's --concurrency (a list) and --json (a file) replace the common flags of those names
    p = sub.add_parser("bench", help=bench_help.split(";")[0], description=bench_help,
                       epilog=f"example:\n  {bench_example}", formatter_class=argparse.RawDescriptionHelpFormatter,
                       conflict_handler="resolve")
    p.add_argument("target", metavar="TARGET|compare", help="REGISTRY[/REPO] to measure, or `compare`")
    p.add_argument("reports", nargs="*", metavar="A.json B.json", help="with compare: two bench reports")
    p.add_argument("--sizes", type=_size_list, default=_size_list("1MiB,16MiB"), metavar="SIZE,...",
                   help="blob sizes (default 1MiB,16MiB)")
    p.add_argument("--ops", default="push,pull", metavar="OP,...", help="push, pull, copy (default push,pull)")
    p.add_argument("--repeat", type=_positive_int, default=3, metavar="N", help="samples per cell (default 3)")
    p.add_argument("--duration", type=float, metavar="SECONDS",
                   help="instead of --repeat: run samples in each cell until SECONDS have passed")
    p.add_argument("--blobs", type=_positive_int, metavar="N",
                   help="blobs per sample (default max(4, 2 x concurrency))")
    p.add_argument("--copy-to", metavar="TARGET2", help="the destination registry[/repo] of the copy op")
    p.add_argument("--plot", metavar="FILE.png|svg", help="throughput and latency charts (needs blobflow[plot])")
    p.add_argument("--keep", action="store_true", help="do not delete the blobs the run wrote")
    _common(p)
    p.add_argument("--concurrency", dest="bench_concurrency", type=_int_list, default=_int_list("1,4"),
                   metavar="N,...", help="concurrency levels to sweep (default 1,4)")
    p.add_argument("--json", dest="json_file", metavar="FILE", help="write the full report (every raw sample)")
    return parser


def _check_state_dir(directory: str) -> None:
    """A ``--state-dir`` given by hand must take records: bad input otherwise. (The default one
    only costs resume when it cannot: the job warns and goes on.)"""
    try:
        Path(directory).mkdir(parents=True, exist_ok=True)
        writable = os.access(directory, os.W_OK | os.X_OK)
    except OSError as e:
        raise BadInputError(f"--state-dir {directory}: {e.strerror or e}") from None
    if not writable:
        raise BadInputError(f"--state-dir {directory}: not writable")


def _config(args: argparse.Namespace) -> EngineConfig:
    opts: dict[str, Any] = {}
    for name in ("concurrency", "chunk_size", "part_size", "retries", "upload_window", "max_layer_size",
                 "state_dir"):
        value = getattr(args, name, None)
        if value is not None:
            opts[name] = value
    if "part_size" in opts:
        opts["range_threshold"] = opts["part_size"] + 1
    if getattr(args, "window_scope", None):
        opts["window_scope"] = args.window_scope
    if getattr(args, "registry_limits", None):
        opts["extra_limits"] = load_registry_limits(args.registry_limits)
    if getattr(args, "no_deadline_tracking", False):
        opts["deadline_tracking"] = False
    if "state_dir" in opts:
        _check_state_dir(opts["state_dir"])
    return EngineConfig(plain_http=args.plain_http, insecure=args.insecure, ca_file=args.ca_file, **opts)


def _annotations(items: Sequence[str]) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise BadInputError(f"invalid --annotation {item!r}: expected KEY=VALUE")
        out[key] = value
    return out


async def _run(args: argparse.Namespace, client: Client, render: Renderer) -> int:
    cmd = args.command
    if cmd == "pull":
        result = await client.pull(args.image, args.directory, platform=args.platform)
    elif cmd == "push":
        result = await client.push(args.directory, args.image, tag=args.tag, platform=args.platform,
                                   annotations=_annotations(args.annotation), compress=args.compress)
    elif cmd == "copy":
        result = await client.copy(args.source, args.destination, platform=args.platform,
                                   annotations=_annotations(args.annotation), recompress=args.recompress)
    elif cmd == "mirror":
        return await _mirror(args, client, render)
    elif cmd == "blob" and args.blob_command == "get":
        result = await client.blob_get(args.image, _raw_stdout() if args.file == "-" else args.file)
    elif cmd == "blob":
        result, desc = await client.blob_put(sys.stdin.buffer if args.file == "-" else args.file, args.repository)
        if not args.json:
            print(desc.digest)
        render.result(result, {"digest": str(desc.digest), "size": desc.size})
        return EXIT_OK
    elif cmd == "tags":
        tags = await client.tags(args.repository)
        if args.json:
            print(json.dumps({"event": "tags", "repository": args.repository, "tags": tags}))
            print(json.dumps({"event": "summary", "operation": "tags", "count": len(tags)}))
        elif tags:
            print("\n".join(tags))
        return EXIT_OK
    elif cmd == "login":
        return await _login(args, client.config)
    elif cmd == "logout":
        return await _logout(args)
    elif cmd == "bench":
        return await _bench(args, client.config)
    elif cmd == "inspect":
        raw = await client.inspect(args.image, platform=args.platform)
        if args.raw:
            sys.stdout.buffer.write(raw.data)
            sys.stdout.flush()
        elif args.json:
            print(json.dumps({"event": "manifest", "digest": str(raw.digest), "mediaType": raw.media_type,
                              "manifest": raw.doc, **_layer_compression(raw.doc)}))
            print(json.dumps({"event": "summary", "operation": "inspect", "digest": str(raw.digest)}))
        else:
            print(json.dumps({"digest": str(raw.digest), "mediaType": raw.media_type, "manifest": raw.doc,
                              **_layer_compression(raw.doc)}, indent=2))
        return EXIT_OK
    else:  # pragma: no cover - argparse refuses unknown commands
        raise BadInputError(f"unknown command {cmd}")
    render.result(result)
    return EXIT_OK


def _layer_compression(doc: dict[str, Any]) -> dict[str, Any]:
    """An image manifest's layers with their compression (none, gzip, zstd; null: not a tar layer)."""
    layers = doc.get("layers")
    if not isinstance(layers, list):
        return {}
    return {"layers": [{"digest": x.get("digest"), "size": x.get("size"), "mediaType": x.get("mediaType"),
                        "compression": layer_compression(str(x.get("mediaType", "")))}
                       for x in layers if isinstance(x, dict)]}


def _login_input(args: argparse.Namespace) -> Credentials:
    """User and password from the flags, standard input or the terminal, never from argv."""
    user = args.username
    if not user and sys.stdin.isatty() and not args.password_stdin:
        with contextlib.suppress(EOFError):  # Ctrl-D at the prompt: no name given
            user = input("Username: ").strip()
    if not user:
        raise BadInputError("login needs a user name: -u USER")
    if args.password_stdin:
        password = sys.stdin.read().removesuffix("\n").removesuffix("\r")
    elif sys.stdin.isatty():
        password = ""
        with contextlib.suppress(EOFError):
            password = getpass.getpass("Password: ")
    else:
        raise BadInputError("login reads the password from standard input: add --password-stdin")
    if not password:
        raise BadInputError("login needs a password or token, and none was given")
    from .registry import Credentials

    return Credentials(user, password)


def _login_registry(text: str) -> Reference:
    """``ghcr.io``, ``https://ghcr.io/``, ``localhost:5000``, ``https://index.docker.io/v1/``."""
    host = text.split("://", 1)[-1].split("/", 1)[0]
    if host in ("docker.io", "index.docker.io", "registry-1.docker.io"):
        return Reference.parse("docker.io/library/x")
    if not ("." in host or ":" in host or host == "localhost"):
        raise BadInputError(f"invalid registry {text!r}: expected a host such as ghcr.io or localhost:5000")
    try:
        return Reference.parse(f"{host}/x")
    except BadInputError:
        raise BadInputError(f"invalid registry {text!r}: expected a host such as ghcr.io or localhost:5000"
                            ) from None


async def _login(args: argparse.Namespace, config: EngineConfig) -> int:
    """Credentials are stored only after the registry (or its token service) accepted them."""
    from .registry import RegistryPool, store_credentials

    ref, creds = args.login
    pool = RegistryPool(connections_per_host=config.connections_per_host, connect_timeout=config.connect_timeout,
                        read_timeout=config.read_timeout, plain_http=config.plain_http, ca_file=config.ca_file,
                        insecure=config.insecure, credentials={ref.registry: creds})
    async with pool:
        await pool.client(ref.registry, ref.endpoint, loopback=ref.is_loopback).ping()
    where = await asyncio.to_thread(store_credentials, ref.registry, creds)
    if args.json:
        print(json.dumps({"event": "login", "registry": ref.registry, "username": creds.username,
                          "stored_in": where}))
    elif not args.quiet:
        print(f"Login Succeeded: {creds.username} at {ref.registry}, stored in {where}")
    return EXIT_OK


async def _logout(args: argparse.Namespace) -> int:
    """As docker logout: nothing stored for the registry is no error (a script may log out twice)."""
    from .registry import erase_credentials

    registry = _login_registry(args.registry).registry
    removed = await asyncio.to_thread(erase_credentials, registry)
    if args.json:
        print(json.dumps({"event": "logout", "registry": registry, "removed_from": removed}))
    elif not args.quiet:
        print(f"Removed the credentials for {registry} from {' and '.join(removed)}" if removed
              else f"Not logged in to {registry}: nothing stored for it")
    return EXIT_OK


async def _bench(args: argparse.Namespace, config: EngineConfig) -> int:
    from . import benchreport
    from .bench import BenchParams, run_bench
    from .layout import writable_file

    if args.target == "compare":
        if len(args.reports) != 2:
            raise BadInputError("bench compare needs two reports: blobflow bench compare A.json B.json")
        a, b = (benchreport.load_report(r) for r in args.reports)
        print(benchreport.format_compare(benchreport.compare(a, b), *args.reports))
        return EXIT_OK
    if args.reports:
        raise BadInputError(f"bench takes one TARGET, got also {' '.join(args.reports)}")
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise BadInputError(benchreport.PLOT_MISSING) from None
    for flag, path in (("--json", args.json_file), ("--plot", args.plot)):
        if path:  # written at the end of the run: found out now
            writable_file(Path(path), f"{flag} {path}")
    params = BenchParams(target=args.target, sizes=args.sizes, concurrency=args.bench_concurrency,
                         ops=tuple(o.strip() for o in args.ops.split(",") if o.strip()), repeat=args.repeat,
                         duration=args.duration, blobs=args.blobs, copy_to=args.copy_to, cleanup=not args.keep)

    def log(line: str) -> None:
        if not args.quiet:
            print(line, file=sys.stderr, flush=True)

    report = await run_bench(params, config=config, log=log)
    if args.json_file:
        benchreport.save_report(report, args.json_file)
    else:
        for cell in report["cells"]:
            cell["summary"] = benchreport.summarize_cell(cell["samples"])
    if args.plot:
        benchreport.plot_report(report, args.plot)
    if not args.quiet:
        print(benchreport.format_table(report))
        cleanup = report["registry"].get("cleanup", {})
        print(f"run {report['run_id']} in {report['registry']['registry']}/{report['registry']['repository']}; "
              f"cleanup: {cleanup.get('deleted', 0)} blobs deleted"
              + (f", {cleanup['failed']} not: {cleanup['note']}" if cleanup.get("failed") else ""))
    errors = sum(c["summary"]["errors"] for c in report["cells"])
    return EXIT_FAILED if errors else EXIT_OK


async def _mirror(args: argparse.Namespace, client: Client, render: Renderer) -> int:
    from .layout import atomic_write, writable_file
    from .mirror import load_plan, parse_shard

    plan = load_plan(args.plan)
    shard = parse_shard(args.shard)
    if args.report:  # found out now, not after an hour of mirroring
        writable_file(Path(args.report), f"--report {args.report}")
    if plan.concurrency and args.concurrency is None:
        client.config = dataclasses.replace(client.config, concurrency=plan.concurrency)
    rate = args.rate if args.rate is not None else plan.rate
    if rate:
        client.config = dataclasses.replace(client.config, rate=rate)
    result = await client.mirror(plan, shard=shard, dry_run=args.dry_run, recompress=args.recompress)
    images = [dataclasses.asdict(i) for i in result.images]
    report: dict[str, Any] = {"shard": result.shard, "seconds": result.seconds, "bytes": result.bytes,
                              "requests_per_host": result.requests, "throttled_per_host": result.throttled,
                              "quota_per_host": {h: q.to_json() for h, q in result.quota.items()},
                              "images": images}
    failed = result.failed
    if args.json:
        for image in images:
            print(json.dumps({"event": "image", **image}))
        print(json.dumps({"event": "summary", "operation": "mirror", **{k: v for k, v in report.items()
                                                                          if k != "images"},
                          "images": len(result.images), "failed": len(failed)}))
    else:
        for i in result.images:
            if i.status == "failed":  # on standard error, -q or not: `2>errors.log` keeps them
                print(f"blobflow: failed: {i.source} -> {i.destination}: {i.error}", file=sys.stderr)
            elif not args.quiet:
                line = f"{i.status:>10}  {i.source} -> {i.destination}"
                if i.status in ("copied", "would copy"):
                    line += (f"  ({i.blobs} blobs, {i.bytes / 1e6:.1f} MB, {i.skipped} skipped, {i.mounted} mounted"
                             + (f", {i.shared} shared)" if i.shared else ")"))
                print(line)
        if not args.quiet:
            moved = sum(i.bytes for i in result.images) if args.dry_run else result.bytes
            verb = "would move" if args.dry_run else "moved"
            print(f"mirror shard {result.shard}: {len(result.images)} image{'s' * (len(result.images) != 1)}, "
                  f"{sum(i.status == 'up to date' for i in result.images)} up to date, {len(failed)} failed; "
                  f"{verb} {moved / 1e6:.1f} MB in {result.seconds:.2f} s; requests: "
                  + ", ".join(f"{h} {n}" for h, n in sorted(result.requests.items()))
                  + "".join(f"; pull quota left at {h}: {q}" for h, q in sorted(result.quota.items())))
    if args.report:  # after the summary: a disk that fills now still leaves the user the figures
        atomic_write(Path(args.report), (json.dumps(report, indent=2) + "\n").encode())
    if failed:
        return EXIT_PARTIAL if len(failed) < len(result.images) else EXIT_FAILED
    return EXIT_OK


def _renderer(args: argparse.Namespace) -> Renderer:
    if getattr(args, "json", False):
        return JsonRenderer()
    quiet, verbose = getattr(args, "quiet", False), getattr(args, "verbose", False)
    # the summary line; standard output carries the blob of `blob get IMAGE -`, the digest of
    # `blob put` (DIGEST=$(blobflow blob put FILE REPO) must get that alone)
    out = sys.stderr if _blob_to_stdout(args) or (args.command == "blob" and args.blob_command == "put") else None
    if sys.stderr.isatty() and not quiet and args.command in ("pull", "push", "copy", "blob", "mirror"):
        from ._render_rich import RichRenderer  # only on a terminal: rich is slow to import

        return RichRenderer(verbose=verbose, quiet=quiet, out=out)
    return LogRenderer(verbose=verbose, quiet=quiet, out=out)


_REFERENCE_ARGS = {  # command -> (its image arguments, its path argument that must exist, its usage)
    "pull": (("image",), None, "blobflow pull IMAGE DIR"),
    "push": (("image",), "directory", "blobflow push DIR IMAGE"),
    "copy": (("source", "destination"), None, "blobflow copy SRC-IMAGE DST-IMAGE"),
    "blob get": (("image",), None, "blobflow blob get IMAGE@DIGEST FILE"),
    "blob put": (("repository",), "file", "blobflow blob put FILE REPO"),
}


def _check_reference_args(args: argparse.Namespace) -> None:
    """A path where an image belongs (`push IMAGE DIR`, the arguments swapped) was "invalid
    reference './lay': bad registry host '.'", or "cannot read 127.0.0.1:5000/app": say it is a
    path and how the command is ordered, before anything else is tried."""
    command = " ".join(filter(None, (args.command, getattr(args, "blob_command", None))))
    names, source, usage = _REFERENCE_ARGS.get(command, ((), None, ""))
    for name in names:
        text = getattr(args, name)
        try:
            Reference.parse(text)
        except BadInputError as e:
            if text.startswith(("/", "./", "../", "~")) or os.path.exists(text):
                raise BadInputError(f"{e}; {text!r} is a path: {usage}") from None
            raise
        if source and getattr(args, source) != "-" and not os.path.exists(getattr(args, source)) \
                and os.path.exists(text):
            raise BadInputError(f"{getattr(args, source)!r} does not exist, and {text!r} is a path: {usage}")


def _blob_via_stdio(args: argparse.Namespace) -> bool:
    return bool(args.command == "blob" and args.file == "-")


def _blob_to_stdout(args: argparse.Namespace) -> bool:
    return _blob_via_stdio(args) and args.blob_command == "get"


def _raw_stdout() -> BinaryIO:
    """Standard output without sys.stdout's buffer: a write blocked on a pipe nobody reads must not
    hold that buffer's lock, which the exit after Ctrl-C or SIGTERM takes to flush it."""
    return open(sys.stdout.fileno(), "wb", buffering=0, closefd=False)


def _check_stdio(args: argparse.Namespace) -> None:
    """``blob get IMAGE -`` and ``blob put - REPO``: standard output or input carries the blob."""
    if _blob_to_stdout(args):
        if args.json:
            raise BadInputError("blob get -: standard output carries the blob, so it cannot carry --json too; "
                                "give a FILE")
        if sys.stdout.isatty():
            raise BadInputError("blob get -: standard output is a terminal; redirect it, or give a FILE")
    if _blob_via_stdio(args) and args.blob_command == "put" and sys.stdin.isatty():
        raise BadInputError("blob put -: standard input is a terminal; pipe the blob in, or give a FILE")


def _event_loop_runner() -> Callable[[Coroutine[Any, Any, int]], int]:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency where it builds
        return asyncio.run
    return lambda coro: uvloop.run(coro)


async def _stoppable(job: Coroutine[Any, Any, int]) -> int:
    """SIGTERM (Kubernetes, CI cancellation) stops a job like Ctrl-C: the job is cancelled where it
    awaits, so state is saved, and the CLI exits 130. The event loop delivers the signal: raising
    from a Python signal handler could land inside a transport callback and be lost there."""
    task = asyncio.current_task()
    assert task is not None
    loop = asyncio.get_running_loop()
    stopped: list[int] = []

    def stop() -> None:
        stopped.append(signal.SIGTERM)
        task.cancel()

    loop.add_signal_handler(signal.SIGTERM, stop)
    try:
        return await job
    except asyncio.CancelledError:
        if stopped:
            raise KeyboardInterrupt from None
        raise
    finally:
        loop.remove_signal_handler(signal.SIGTERM)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    render = _renderer(args)
    if getattr(args, "insecure", False):
        print("blobflow: warning: --insecure: TLS certificates are not verified; anyone on the network path "
              "can read and change what is sent, credentials included", file=sys.stderr)
    try:
        _check_stdio(args)
        _check_reference_args(args)
        config = _config(args)
        if args.command == "login":
            # asked before the event loop starts: Ctrl-C at the prompt ends the command at once
            # (a prompt in a worker thread held the loop's shutdown until a line came), and
            # getpass gets to restore the terminal's echo
            args.login = (_login_registry(args.registry), _login_input(args))
        from .api import Client

        client = Client(config, listener=render)
        with render:
            return _event_loop_runner()(_stoppable(_run(args, client, render)))
    except KeyboardInterrupt:
        if _blob_via_stdio(args):
            render.error("interrupted; a blob through standard input or output is not resumed", EXIT_INTERRUPTED)
        else:
            render.error("interrupted; run the same command again to resume", EXIT_INTERRUPTED)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        return EXIT_FAILED
    except Exception as e:
        message, code = _failure(e)
        render.error(message, code)
        if getattr(args, "verbose", False):
            traceback.print_exc()
        return code


def _failure(e: Exception) -> tuple[str, int]:
    """What to say about the error that ended a command, and its exit code."""
    if isinstance(e, BlobflowError):
        return str(e), e.exit_code
    if isinstance(e, OSError):  # the local disk: full, read-only, a path gone from under the job
        text = f"{e.filename}: {e.strerror or e}" if e.filename else str(e.strerror or e)
        if e.errno in (errno.ENOSPC, errno.EDQUOT):  # what was written and journalled is kept
            text += "; make room and run the same command again to resume"
        return text, EXIT_FAILED
    return f"internal error: {type(e).__name__}: {e} (run with -v for details)", EXIT_FAILED


def entry() -> NoReturn:
    """The ``blobflow`` command: :func:`main`, then leave without tearing the interpreter down.

    Interpreter shutdown (collecting every module of aiohttp, asyncio, attrs ...) took 0.12-0.17 s
    on the 2-core machines here, a tenth of a small job and a quarter of a "nothing changed"
    mirror. By then the job is over: blobs, layouts and journal records are written, fsynced
    where they must be, and closed; the event loop is closed; only output buffers remain.
    """
    code = main()
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except BrokenPipeError:  # the reader went away (`blobflow tags R | head -1`)
        code = code or EXIT_FAILED
    os._exit(code)


if __name__ == "__main__":  # pragma: no cover
    entry()

"""The command line: argv -> one API call -> rendered result -> exit code (PRODUCT.md)."""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import traceback
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from . import __version__
from ._render import JsonRenderer, LogRenderer, Renderer, RichRenderer
from .api import Client
from .config import EngineConfig, parse_size
from .errors import BadInputError, BlobflowError

__all__ = ["main"]

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_PARTIAL, EXIT_INTERRUPTED = 0, 1, 2, 3, 130


class _Parser(argparse.ArgumentParser):
    """argparse that exits 2 with one line, like the rest of blobflow's bad-input errors."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_BAD_INPUT, f"blobflow {self.prog.split(' ', 1)[-1]}: {message}\n"
                                  f"(see `{self.prog} --help`)\n")


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


def _common(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("transfer options")
    g.add_argument("--concurrency", type=_positive_int, metavar="N", help="blobs moved at once (default 8)")
    g.add_argument("--chunk-size", type=_size, metavar="SIZE",
                   help="upload in PATCH chunks of SIZE (default: one streamed PATCH per blob)")
    g.add_argument("--part-size", type=_size, metavar="SIZE", help="download range size (default 32MiB)")
    g.add_argument("--retries", type=int, metavar="N", help="retries per blob (default 5)")
    g.add_argument("--upload-window", type=float, metavar="SECONDS",
                   help="the destination's upload time limit (ghcr.io: 600)")
    g.add_argument("--max-layer-size", type=_size, metavar="SIZE",
                   help="refuse layers larger than SIZE before sending (ghcr.io: 10GB)")
    g.add_argument("--state-dir", metavar="DIR", help="where resume journals are kept")
    g = p.add_argument_group("connection options")
    g.add_argument("--plain-http", action="store_true", help="use HTTP, not HTTPS, for every registry")
    g.add_argument("--ca-file", metavar="FILE", help="trust this CA bundle for TLS")
    g.add_argument("--insecure", action="store_true", help="do not verify TLS certificates (unsafe)")
    g = p.add_argument_group("output options")
    g.add_argument("--json", action="store_true", help="JSON lines on stdout: events and a final summary")
    g.add_argument("-q", "--quiet", action="store_true", help="print nothing but errors")
    g.add_argument("-v", "--verbose", action="store_true", help="one line per blob event; tracebacks")


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
    p.add_argument("--platform", metavar="OS/ARCH[/VARIANT]", help="only this platform of an index")
    p.add_argument("--annotation", action="append", default=[], metavar="KEY=VALUE",
                   help="set a manifest annotation (repeatable)")
    _common(p)

    p = _command(sub, "copy", "copy an image between registries, streamed (never touches the disk)",
                 "blobflow copy ghcr.io/org/app:1.0 registry.example.com/app:1.0")
    p.add_argument("source", metavar="SRC")
    p.add_argument("destination", metavar="DST")
    p.add_argument("--platform", metavar="OS/ARCH[/VARIANT]", help="only this platform of an index")
    p.add_argument("--annotation", action="append", default=[], metavar="KEY=VALUE",
                   help="set a manifest annotation (repeatable)")
    _common(p)

    blob = _command(sub, "blob", "move a single blob", "blobflow blob get ghcr.io/org/app@sha256:... layer.tgz")
    bsub = blob.add_subparsers(dest="blob_command", required=True, metavar="get|put", parser_class=_Parser)
    p = _command(bsub, "get", "download one blob to a file, verified",
                 "blobflow blob get localhost:5000/app@sha256:<64 hex> ./layer.tar.gz")
    p.add_argument("image", metavar="IMAGE@DIGEST")
    p.add_argument("file", metavar="FILE")
    _common(p)
    p = _command(bsub, "put", "upload one file as a blob; prints its digest",
                 "blobflow blob put ./layer.tar.gz localhost:5000/app")
    p.add_argument("file", metavar="FILE")
    p.add_argument("repository", metavar="REPO")
    _common(p)

    p = _command(sub, "tags", "list a repository's tags (all pages)", "blobflow tags localhost:5000/app")
    p.add_argument("repository", metavar="REPO")
    _common(p)

    p = _command(sub, "inspect", "print an image's manifest", "blobflow inspect localhost:5000/app:1.0")
    p.add_argument("image", metavar="IMAGE")
    p.add_argument("--raw", action="store_true", help="the manifest's exact bytes")
    _common(p)
    return parser


def _config(args: argparse.Namespace) -> EngineConfig:
    opts: dict[str, Any] = {}
    for name in ("concurrency", "chunk_size", "part_size", "retries", "upload_window", "max_layer_size",
                 "state_dir"):
        value = getattr(args, name, None)
        if value is not None:
            opts[name] = value
    if "part_size" in opts:
        opts["range_threshold"] = opts["part_size"] + 1
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
                                   annotations=_annotations(args.annotation))
    elif cmd == "copy":
        result = await client.copy(args.source, args.destination, platform=args.platform,
                                   annotations=_annotations(args.annotation))
    elif cmd == "blob" and args.blob_command == "get":
        result = await client.blob_get(args.image, args.file)
    elif cmd == "blob":
        result, desc = await client.blob_put(args.file, args.repository)
        if not args.json:
            print(desc.digest)
        render.result(result, {"digest": str(desc.digest), "size": desc.size})
        return EXIT_OK
    elif cmd == "tags":
        tags = await client.tags(args.repository)
        print(json.dumps(tags) if args.json else "\n".join(tags))
        return EXIT_OK
    elif cmd == "inspect":
        raw = await client.inspect(args.image)
        if args.raw:
            sys.stdout.buffer.write(raw.data)
            sys.stdout.flush()
        else:
            print(json.dumps({"digest": str(raw.digest), "mediaType": raw.media_type, "manifest": raw.doc},
                             indent=2))
        return EXIT_OK
    else:  # pragma: no cover - argparse refuses unknown commands
        raise BadInputError(f"unknown command {cmd}")
    render.result(result)
    return EXIT_OK


def _renderer(args: argparse.Namespace) -> Renderer:
    if getattr(args, "json", False):
        return JsonRenderer()
    quiet, verbose = getattr(args, "quiet", False), getattr(args, "verbose", False)
    if sys.stderr.isatty() and not quiet and args.command in ("pull", "push", "copy", "blob"):
        return RichRenderer(verbose=verbose, quiet=quiet)
    return LogRenderer(verbose=verbose, quiet=quiet)


def _event_loop_runner() -> Callable[[Coroutine[Any, Any, int]], int]:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency where it builds
        return asyncio.run
    return lambda coro: uvloop.run(coro)


def main(argv: Sequence[str] | None = None) -> int:
    # SIGTERM (Kubernetes, CI cancellation) stops a job like Ctrl-C: state is saved, exit 130
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    parser = build_parser()
    args = parser.parse_args(argv)
    render = _renderer(args)
    try:
        config = _config(args)
        client = Client(config, listener=render)
        with render:
            return _event_loop_runner()(_run(args, client, render))
    except BlobflowError as e:
        render.error(str(e), e.exit_code)
        if getattr(args, "verbose", False):
            traceback.print_exc()
        return e.exit_code
    except KeyboardInterrupt:
        render.error("interrupted; run the same command again to resume", EXIT_INTERRUPTED)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        return EXIT_FAILED
    except Exception as e:
        render.error(f"internal error: {type(e).__name__}: {e} (run with -v for details)", EXIT_FAILED)
        if getattr(args, "verbose", False):
            traceback.print_exc()
        return EXIT_FAILED


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

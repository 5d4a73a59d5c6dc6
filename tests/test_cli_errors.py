"""The CLI facing bad input, bad registries and bad bytes: exit codes, one clear line, nothing half-written.

PRODUCT.md: exit 2 is bad input (unparsable reference, unreadable layout, missing credential), exit 1
a transfer that failed after its retries; a layout only ever references complete, verified blobs.
Misbehaving registries are scripted with a small aiohttp server (``fake_registry``) or a fault proxy
in front of the real registry.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import json
import os
import re
import resource
import socket
import sys
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from conftest import CheckLayout, Cli, CliResult, MakeFakeRegistry, MakeProxy
from faultproxy import Faults

import blobflow
from blobflow.localreg import LocalRegistry
from blobflow.synth import build_image

KiB, MiB = 1024, 1024 * 1024
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
HELP_HINT = re.compile(r"\(see `blobflow [a-z ]+ --help`\)")


def assert_one_line_error(result: CliResult, code: int) -> str:
    """The command failed with ``code`` and said why in one line on stderr, with no traceback."""
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr + result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got {lines}"
    assert lines[0].startswith("blobflow"), lines[0]
    return lines[0]


async def run_table(cli: Cli, cases: dict[str, list[str]]) -> dict[str, CliResult]:
    """Run independent commands side by side (each is a fresh interpreter: about 0.6 s of CPU)."""
    results = await asyncio.gather(*(cli(*args) for args in cases.values()))
    return dict(zip(cases, results, strict=True))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def blob_file(layout: Path, digest: str) -> Path:
    return layout / "blobs" / "sha256" / digest.removeprefix("sha256:")


def image_blobs(layout: Path, manifest_digest: str) -> list[str]:
    doc = json.loads(blob_file(layout, manifest_digest).read_bytes())
    return [doc["config"]["digest"], *(layer["digest"] for layer in doc["layers"])]


# -- unparsable input ---------------------------------------------------------------------------

BAD_REFERENCES = ["UPPER/x", "a b", "host:99999/x", "x@sha256:123"]


async def test_unparsable_reference(cli: Cli, tmp_path: Path) -> None:
    """Each bad reference, in ``pull`` and in every other command that takes one: exit 2, one line."""
    src = tmp_path / "src"
    build_image(src, "v1", [16 * KiB], seed=1)
    good, bad = "127.0.0.1:9/repo:v1", BAD_REFERENCES[0]
    cases = {f"pull {ref}": ["pull", ref, str(tmp_path / "out")] for ref in BAD_REFERENCES}
    cases |= {
        "push": ["push", str(src), bad], "copy": ["copy", good, bad],
        "inspect": ["inspect", bad], "tags": ["tags", bad],
        "blob get": ["blob", "get", bad + "@sha256:" + "0" * 64, str(tmp_path / "blob")],
        "blob put": ["blob", "put", str(src / "oci-layout"), bad],
    }

    results = await run_table(cli, cases)

    for case, result in results.items():
        line = assert_one_line_error(result, 2)
        reference = case.removeprefix("pull ") if case.startswith("pull ") else bad
        assert reference in line, (case, line)
    assert not (tmp_path / "out").exists()
    assert not (tmp_path / "blob").exists()


async def test_bad_option_value(registry: LocalRegistry, cli: Cli, tmp_path: Path) -> None:
    src = tmp_path / "src"
    build_image(src, "v1", [16 * KiB], seed=2)
    options = {"platform-no-arch": ["--platform", "linux"], "annotation-no-value": ["--annotation", "no-equals"]}

    results = await run_table(cli, {case: ["push", str(src), f"{registry.host}/r:v1", *args]
                                    for case, args in options.items()})

    for case, result in results.items():
        line = assert_one_line_error(result, 2)
        assert options[case][1] in line, (case, line)
    assert registry.storage_bytes() == 0


async def test_bad_flag_value_named_without_traceback(cli: Cli, tmp_path: Path) -> None:
    """argparse's own errors: exit 2, the flag named on the first line, then only the --help hint."""
    result = await cli("pull", "127.0.0.1:9/r:v1", str(tmp_path / "out"), "--chunk-size", "12parsecs")

    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    first, *rest = result.stderr.strip().splitlines()
    assert first.startswith("blobflow pull: ") and "--chunk-size" in first and "12parsecs" in first
    assert all(HELP_HINT.fullmatch(line) for line in rest), rest
    assert not (tmp_path / "out").exists()


async def test_unknown_command(cli: Cli) -> None:
    result = await cli("frobnicate")

    assert result.returncode == 2
    first = result.stderr.splitlines()[0]
    assert first.startswith("blobflow: ") and "frobnicate" in first, first


# -- unreadable layouts ---------------------------------------------------------------------------

NOT_LAYOUTS = ["missing-dir", "empty-dir", "index-not-json", "manifest-missing", "manifest-corrupt"]


def make_not_a_layout(case: str, root: Path) -> Path:
    root.mkdir()
    if case == "missing-dir":
        return root / "nowhere"
    if case == "empty-dir":
        (root / "empty").mkdir()
        return root / "empty"
    layout = root / "layout"
    desc = build_image(layout, "v1", [16 * KiB], seed=3)
    if case == "index-not-json":
        (layout / "index.json").write_text("{not json")
    elif case == "manifest-missing":
        blob_file(layout, str(desc.digest)).unlink()
    elif case == "manifest-corrupt":
        blob_file(layout, str(desc.digest)).write_bytes(b"{}")
    return layout


async def test_push_from_a_directory_that_is_not_a_layout(registry: LocalRegistry, cli: Cli,
                                                          tmp_path: Path) -> None:
    directories = {case: make_not_a_layout(case, tmp_path / case) for case in NOT_LAYOUTS}

    results = await run_table(cli, {case: ["push", str(d), f"{registry.host}/r:v1"]
                                    for case, d in directories.items()})

    for case, result in results.items():
        line = assert_one_line_error(result, 2)
        assert str(directories[case]) in line, (case, line)
    assert registry.storage_bytes() == 0  # nothing was sent


async def test_push_layout_missing_a_layer(registry: LocalRegistry, cli: Cli, tmp_path: Path) -> None:
    layout = tmp_path / "layout"
    desc = build_image(layout, "v1", [16 * KiB, 32 * KiB], seed=4)
    missing = image_blobs(layout, str(desc.digest))[-1]
    blob_file(layout, missing).unlink()

    result = await cli("push", str(layout), f"{registry.host}/r:v1")

    # checked before the exit code: whatever the code, the manifest must not reach the registry
    tags_dir = registry.storage / "docker/registry/v2/repositories/r/_manifests/tags"
    assert not tags_dir.exists()
    line = assert_one_line_error(result, 2)
    assert missing in line


async def test_local_paths_that_cannot_be_written_say_so_without_internal_error(
        registry: LocalRegistry, cli: Cli, tmp_path: Path) -> None:
    """A destination under a regular file (the disk's errors look alike: full, read-only, gone)."""
    layout = tmp_path / "layout"
    desc = build_image(layout, "v1", [4 * KiB], seed=6)
    config = image_blobs(layout, str(desc.digest))[0]
    pushed = await cli("push", str(layout), f"{registry.host}/r:v1")
    assert pushed.returncode == 0, pushed.stderr
    afile = tmp_path / "afile"
    afile.write_text("not a directory")
    results = await run_table(cli, {
        "pull": ["pull", f"{registry.host}/r:v1", str(afile / "out")],
        "blob get": ["blob", "get", f"{registry.host}/r@{config}", str(afile / "config.json")],
    })
    line = assert_one_line_error(results["pull"], 2)
    assert f"cannot create an OCI image layout at {afile / 'out'}: Not a directory" in line
    line = assert_one_line_error(results["blob get"], 2)  # found before the download, as for pull
    assert "internal error" not in line and f"{afile} is not a directory" in line


async def test_a_blob_the_disk_refuses_is_named_and_the_same_command_then_finishes(
        registry: LocalRegistry, tmp_path: Path, check_layout: CheckLayout) -> None:
    """A write the filesystem refuses mid-pull (here a file-size limit, RLIMIT_FSIZE: a full disk
    cannot be made without privileges) names the file: ``pwrite`` errors carry no name of their
    own, and the line was a bare "File too large" / "No space left on device"."""
    src = tmp_path / "src"
    build_image(src, "v1", [2 * MiB, 8 * KiB], seed=7)
    await blobflow.Client(blobflow.EngineConfig(plain_http=True)).push(src, f"{registry.host}/r:v1")
    out = tmp_path / "out"
    argv = [sys.executable, "-m", "blobflow", "pull", f"{registry.host}/r:v1", str(out)]

    def limit_file_size() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 * MiB, resource.RLIM_INFINITY))

    proc = await asyncio.create_subprocess_exec(*argv, preexec_fn=limit_file_size, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE)
    stdout, stderr = await proc.communicate()
    line = assert_one_line_error(CliResult(proc.returncode or 0, stdout.decode(), stderr.decode()), 1)
    assert "internal error" not in line and line.endswith(".partial: File too large"), line
    assert str(out / "blobs" / "sha256") in line
    tags = json.loads((out / "index.json").read_text())["manifests"] if (out / "index.json").exists() else []
    assert tags == [], "a tag was written for an image whose layer never landed"

    again = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    _, stderr = await again.communicate()
    assert again.returncode == 0, stderr.decode()
    check_layout(out)


async def test_a_layer_file_that_cannot_be_read_is_named(registry: LocalRegistry, cli: Cli, tmp_path: Path) -> None:
    """Reads of a layer go through ``pread`` on a descriptor, whose errors name no file."""
    layout = tmp_path / "layout"
    build_image(layout, "v1", [300 * KiB], seed=8)
    layer = max((layout / "blobs" / "sha256").iterdir(), key=lambda f: f.stat().st_size)
    layer.unlink()
    layer.mkdir()  # opens, then every read fails (EISDIR), as a failing disk's EIO would
    line = assert_one_line_error(await cli("push", str(layout), f"{registry.host}/r:v1"), 1)
    assert line == f"blobflow: {layer}: Is a directory"


async def test_a_state_dir_that_cannot_be_written_costs_resume_not_the_transfer(
        registry: LocalRegistry, cli: Cli, tmp_path: Path, check_layout: CheckLayout) -> None:
    """The default state dir unusable (here under a regular file; in a container, a read-only root
    filesystem): pull and a chunked push still finish, with one note that resume is off. Before,
    both failed with the bare OSError of the first resume record. A ``--state-dir`` given by hand
    that cannot be used is bad input, said before anything moves."""
    src = tmp_path / "src"
    build_image(src, "v1", [5 * MiB], seed=9)  # over the 4 MiB a blob may go in one PUT: a resumable upload
    blocker = tmp_path / "home-is-a-file"
    blocker.write_text("")
    env = {"XDG_STATE_HOME": str(blocker / "state")}
    results = {
        "push": await cli("push", str(src), f"{registry.host}/r:v1", "--chunk-size", "512KiB", env=env),
        "pull": await cli("pull", f"{registry.host}/r:v1", str(tmp_path / "out"), "--part-size", "512KiB", env=env),
    }
    for name, result in results.items():
        assert result.returncode == 0, (name, result.stderr)
        notes = [line for line in result.output.splitlines() if "cannot keep resume records" in line]
        assert "cannot read resume record" not in result.output  # a state dir that is not there holds none
        assert len(notes) == 1 and "Not a directory" in notes[0] and "will start over" in notes[0], (name, result)
    check_layout(tmp_path / "out")

    line = assert_one_line_error(await cli("pull", f"{registry.host}/r:v1", str(tmp_path / "out2"),
                                           "--state-dir", str(blocker / "state")), 2)
    assert line == f"blobflow: --state-dir {blocker / 'state'}: Not a directory"
    assert not (tmp_path / "out2").exists()


def test_a_full_disk_says_where_and_that_the_same_command_resumes() -> None:
    from blobflow.cli import _failure

    full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/data/out/blobs/sha256/.abc.partial")
    assert _failure(full) == ("/data/out/blobs/sha256/.abc.partial: No space left on device; make room and run "
                              "the same command again to resume", 1)
    too_large = OSError(errno.EFBIG, os.strerror(errno.EFBIG), "/mnt/fat32/x")
    assert _failure(too_large) == ("/mnt/fat32/x: File too large", 1)  # making room would not help


# -- digests that are not algorithm:hex of the right length ---------------------------------------

BAD_DIGESTS = {
    "63-hex": "sha256:" + "a" * 63, "uppercase": "sha256:" + "A" * 64,
    "path-traversal": "sha256:../../../../tmp/x" + "a" * 40,
}


async def test_blob_get_bad_digest(fake_registry: MakeFakeRegistry, cli: Cli, tmp_path: Path) -> None:
    requests: list[str] = []

    async def handler(request: web.Request) -> web.StreamResponse:
        requests.append(request.path)
        return web.Response(status=404)

    host = await fake_registry(handler)
    out = tmp_path / "out"
    out.mkdir()

    results = await run_table(cli, {case: ["blob", "get", f"{host}/r@{digest}", str(out / case), "--plain-http"]
                                    for case, digest in BAD_DIGESTS.items()})

    for case, result in results.items():
        line = assert_one_line_error(result, 2)
        assert "digest" in line, (case, line)
    assert list(out.iterdir()) == []  # no file, no temporary file
    assert requests == []  # refused before asking the registry for anything


async def test_blob_get_corrupt_bytes_leave_no_file(registry: LocalRegistry, proxy: MakeProxy, cli: Cli,
                                                    tmp_path: Path) -> None:
    src = tmp_path / "src"
    desc = build_image(src, "v1", [64 * KiB], seed=10)
    layer = image_blobs(src, str(desc.digest))[-1]
    await blobflow.Client().push(src, f"{registry.host}/r:v1")
    fault_proxy = await proxy(registry, Faults(wrong_bytes=1.0, seed=1))
    out = tmp_path / "out"
    out.mkdir()

    result = await cli("blob", "get", f"{fault_proxy.host}/r@{layer}", str(out / "layer"), "--retries", "1")

    assert_one_line_error(result, 1)
    assert fault_proxy.counters["wrong_bytes"] == 2
    assert list(out.iterdir()) == []


async def test_blob_get_into_a_directory_or_a_missing_one_is_bad_input(registry: LocalRegistry, cli: Cli,
                                                                         tmp_path: Path) -> None:
    """Found before the download, not at the rename after it, which left the verified blob in a
    ``.partial`` file beside the directory (and a resume record pointing at it)."""
    blob = tmp_path / "blob"
    blob.write_bytes(b"x" * 5000)
    _, desc = await blobflow.Client().blob_put(blob, f"{registry.host}/r")
    out = tmp_path / "out"
    out.mkdir()
    image = f"{registry.host}/r@{desc.digest}"

    results = await run_table(cli, {"directory": ["blob", "get", image, str(out)],
                                    "missing": ["blob", "get", image, str(out / "no" / "f")]})

    assert "is a directory" in assert_one_line_error(results["directory"], 2)
    assert f"{out / 'no'} does not exist" in assert_one_line_error(results["missing"], 2)
    assert [n for n in os.listdir(tmp_path) if n.endswith(".partial")] == [] and list(out.iterdir()) == []


# -- manifests the registry should not have sent --------------------------------------------------

def valid_manifest(size: int) -> bytes:
    """An OCI image manifest padded with an annotation to exactly ``size`` bytes."""
    doc: dict[str, Any] = {
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": "sha256:" + "a" * 64,
                   "size": 2},
        "layers": [], "annotations": {"pad": ""},
    }
    doc["annotations"]["pad"] = "x" * (size - len(json.dumps(doc)))
    body = json.dumps(doc).encode()
    assert len(body) == size
    return body


def serve_manifest(body: bytes, *, chunked: bool = False) -> Any:
    """A handler answering every manifest request with ``body`` as an OCI manifest."""

    async def handler(request: web.Request) -> web.StreamResponse:
        if "/manifests/" not in request.path:
            return web.json_response({"errors": [{"code": "BLOB_UNKNOWN", "message": "no"}]}, status=404)
        headers = {"Content-Type": OCI_MANIFEST,
                   "Docker-Content-Digest": "sha256:" + hashlib.sha256(body).hexdigest()}
        if not chunked:
            return web.Response(body=body, headers=headers)
        response = web.StreamResponse(headers=headers)
        response.enable_chunked_encoding()
        await response.prepare(request)
        try:
            for start in range(0, len(body), 64 * KiB):
                await response.write(body[start:start + 64 * KiB])
            await response.write_eof()
        except ConnectionResetError:
            pass  # the client stopped reading: what a client should do past the limit
        return response

    return handler


BAD_MANIFESTS = {  # repository name -> what its manifest request answers
    "not-json": b"<html>this is not a manifest</html>",
    "json-array": b'[{"schemaVersion": 2}]',
    "bad-config-digest": json.dumps({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": "sha256:../../../../../escaped", "size": 2}, "layers": []}).encode(),
    "over-4mib": valid_manifest(4 * MiB + 1),
    "size-over-int64": json.dumps({  # was a raw OverflowError
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": "sha256:" + "a" * 64, "size": 10 ** 30}, "layers": []}).encode(),
}


async def test_bad_manifest_is_bad_input(fake_registry: MakeFakeRegistry, cli: Cli, tmp_path: Path) -> None:
    handlers = {case: serve_manifest(body) for case, body in BAD_MANIFESTS.items()}

    async def by_repository(request: web.Request) -> web.StreamResponse:
        return await handlers[request.path.split("/")[2]](request)

    host = await fake_registry(by_repository)

    results = await run_table(cli, {case: ["pull", f"{host}/{case}:v1", str(tmp_path / case), "--plain-http"]
                                    for case in BAD_MANIFESTS})

    for case, result in results.items():
        line = assert_one_line_error(result, 2)
        if case == "over-4mib":
            assert "4 MiB" in line, line
        if case == "size-over-int64":
            assert "invalid size" in line, line
        assert not (tmp_path / case).exists(), case
    assert not (tmp_path / "escaped").exists()


async def test_a_blob_digest_given_for_an_image_and_the_other_way_round(
    registry: LocalRegistry, cli: Cli, tmp_path: Path
) -> None:
    """A layer's or the config's digest, copied from `inspect`: Distribution answers 500 "unknown
    error" for it, and blobflow retried that for 6 s before repeating it (exit 1)."""
    build_image(tmp_path / "src", "v1", [70_000], seed=14)
    await blobflow.Client(PLAIN_HTTP).push(tmp_path / "src", f"{registry.host}/blobby/app:v1")
    manifest = json.loads((await cli("inspect", f"{registry.host}/blobby/app:v1")).stdout)["manifest"]
    layer, config = manifest["layers"][0], manifest["config"]
    repo = f"{registry.host}/blobby/app"
    results = await run_table(cli, {
        "inspect layer": ["inspect", f"{repo}@{layer['digest']}", "--retries", "8"],
        "inspect config": ["inspect", f"{repo}@{config['digest']}", "--retries", "8"],
        "pull layer": ["pull", f"{repo}@{layer['digest']}", str(tmp_path / "out"), "--retries", "8"],
    })
    for case, result in results.items():
        line = assert_one_line_error(result, 2)
        blob = layer if "layer" in case else config
        assert f"{blob['digest'][:19]} is a blob of blobby/app ({blob['size']:,} bytes)" in line, line
        assert f"blobflow blob get {repo}@{blob['digest']} FILE" in line, line
    assert not (tmp_path / "out").exists()
    # the other way round: an image's digest to `blob get` was "blob ... not found", exit 1
    image = json.loads((await cli("inspect", f"{repo}:v1")).stdout)["digest"]
    line = assert_one_line_error(await cli("blob", "get", f"{repo}@{image}", str(tmp_path / "m.json")), 2)
    assert f"{image[:19]} is a manifest of blobby/app, not a blob; `blobflow inspect --raw {repo}@{image}`" in line
    assert not (tmp_path / "m.json").exists()
    missing = "sha256:" + "ab" * 32  # neither: not found, as before
    line = assert_one_line_error(await cli("inspect", f"{repo}@{missing}"), 1)
    assert "404 MANIFEST_UNKNOWN" in line, line
    line = assert_one_line_error(await cli("blob", "get", f"{repo}@{missing}", str(tmp_path / "m.json")), 1)
    assert line.endswith(f"blob {missing} not found"), line


async def test_blob_put_takes_a_repository_and_checks_a_digest_given_with_it(
    registry: LocalRegistry, proxy: MakeProxy, cli: Cli, tmp_path: Path
) -> None:
    """`blob put FILE REPO:tag` and `REPO@sha256:<other>` were taken as REPO, the tag or digest
    dropped without a word. A tag is bad input; a digest is what the file must hash to (checked
    before a byte is sent, from a file or standard input)."""
    blob = tmp_path / "blob"
    blob.write_bytes(b"y" * 3000)
    digest = "sha256:" + hashlib.sha256(b"y" * 3000).hexdigest()
    wrong = "sha256:" + "ab" * 32
    p = await proxy(registry)
    repo = f"{p.host}/put/here"
    results = await run_table(cli, {
        "tag": ["blob", "put", str(blob), f"{repo}:v1"],
        "wrong": ["blob", "put", str(blob), f"{repo}@{wrong}"],
    })
    line = assert_one_line_error(results["tag"], 2)
    assert line.endswith(f"{repo}:v1: blob put takes a repository; a blob has no tag"), line
    line = assert_one_line_error(results["wrong"], 2)
    assert f"the blob to upload is {digest}, not the {wrong} named there; nothing sent" in line, line
    line = assert_one_line_error(await cli("blob", "put", "-", f"{repo}@{wrong}", stdin=b"y" * 3000), 2)
    assert f"the blob to upload is {digest}" in line, line
    assert p.log == []  # nothing asked of the registry
    right = await cli("blob", "put", str(blob), f"{repo}@{digest}")
    assert right.returncode == 0, right.output
    assert right.stdout == f"{digest}\n"  # DIGEST=$(blobflow blob put ...) gets the digest alone


PLAIN_HTTP = blobflow.EngineConfig(plain_http=True)


async def test_chunked_manifest_over_4mib(fake_registry: MakeFakeRegistry) -> None:
    """No Content-Length to refuse early: the limit must hold on the bytes read."""
    host = await fake_registry(serve_manifest(valid_manifest(4 * MiB + 1), chunked=True))

    with pytest.raises(blobflow.ManifestError, match="4 MiB"):
        await blobflow.Client(PLAIN_HTTP).inspect(f"{host}/r:v1")


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
async def test_large_valid_manifest_is_accepted(chunked: bool, fake_registry: MakeFakeRegistry) -> None:
    """The counterpart of the 4 MiB refusal: a manifest just under the limit is read whole."""
    body = valid_manifest(4 * MiB - 1)
    host = await fake_registry(serve_manifest(body, chunked=chunked))

    raw = await blobflow.Client(PLAIN_HTTP).inspect(f"{host}/r:v1")

    assert raw.data == body
    assert str(raw.digest) == "sha256:" + hashlib.sha256(body).hexdigest()


# -- registries that are not there ----------------------------------------------------------------

async def test_registry_not_listening(cli: Cli, tmp_path: Path) -> None:
    host = f"127.0.0.1:{free_port()}"

    result = await cli("pull", f"{host}/r:v1", str(tmp_path / "out"), "--retries", "1")

    line = assert_one_line_error(result, 1)
    assert host in line and "connect" in line
    assert not (tmp_path / "out").exists()


# -- help ------------------------------------------------------------------------------------------

COMMANDS = ["pull", "push", "copy", "blob", "blob get", "blob put", "tags", "inspect"]


def example_of(result: CliResult) -> str | None:
    match = re.search(r"^example:\n  (blobflow .+)$", result.stdout, re.MULTILINE)
    return match[1] if match else None


async def test_help_shows_an_example(cli: Cli) -> None:
    results = await run_table(cli, {command: [*command.split(), "--help"] for command in ["", *COMMANDS]})

    for command, result in results.items():
        assert result.returncode == 0 and result.stderr == "", (command, result.stderr)
        example = example_of(result)
        assert example is not None, (command, result.stdout)
        assert example.startswith(f"blobflow {command.split(' ')[0]}".rstrip()), (command, example)
        if command:
            assert "--json" in result.stdout or command == "blob", command


async def test_help_and_version_do_not_load_the_engine() -> None:
    """aiohttp's import is most of a process start: --help and --version answer without it (the
    API still finds blobflow.Client, imported on first use)."""
    for args in (["--version"], ["--help"], ["copy", "--help"], ["mirror", "--help"]):
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-X", "importtime", "-m", "blobflow", *args,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await proc.communicate()
        assert proc.returncode == 0 and out, args
        imported = {line.rsplit("|", 1)[-1].strip() for line in err.decode().splitlines() if "|" in line}
        assert "blobflow.cli" in imported and not {"aiohttp", "blobflow.api", "uvloop"} & imported, args
    check = "import blobflow; print(blobflow.Client.__name__, blobflow.Engine is blobflow.Client)"
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", check, stdout=asyncio.subprocess.PIPE)
    out, _ = await proc.communicate()
    assert out.decode().split() == ["Client", "True"]


async def test_help_of_contract_commands(cli: Cli) -> None:
    results = await run_table(cli, {command: [command, "--help"] for command in ["mirror", "login", "bench"]})

    missing = [c for c, r in results.items()
               if r.returncode != 0 or not (example_of(r) or "").startswith(f"blobflow {c} ")]
    assert missing == []


# -- --json ----------------------------------------------------------------------------------------

def json_lines(result: CliResult) -> list[dict[str, Any]]:
    """stdout as JSON lines: one object per line."""
    objects = [json.loads(line) for line in result.stdout.splitlines()]
    assert objects and all(isinstance(o, dict) for o in objects), result.stdout
    return objects


async def test_json_output_is_json_lines_ending_with_a_summary(registry: LocalRegistry, registry2: LocalRegistry,
                                                               cli: Cli, tmp_path: Path) -> None:
    src = tmp_path / "src"
    desc = build_image(src, "v1", [16 * KiB, 64 * KiB], seed=5)
    layer = image_blobs(src, str(desc.digest))[-1]
    image = f"{registry.host}/r:v1"
    stages = [  # each stage needs the one before; commands within a stage run side by side
        {"push": ["push", str(src), image]},
        {"pull": ["pull", image, str(tmp_path / "pulled")], "copy": ["copy", image, f"{registry2.host}/r:v1"],
         "blob get": ["blob", "get", f"{image}@{layer}", str(tmp_path / "layer")]},
        {"blob put": ["blob", "put", str(tmp_path / "layer"), f"{registry.host}/other"]},
    ]
    for stage in stages:
        results = await run_table(cli, {name: [*args, "--json"] for name, args in stage.items()})
        for name, result in results.items():
            assert result.returncode == 0, (name, result.stderr)
            objects = json_lines(result)
            summary = objects[-1]
            assert summary["event"] == "summary", (name, summary)
            assert all(o["event"] != "summary" for o in objects[:-1]), name
            if name in ("push", "pull", "copy"):
                assert summary["bytes"] > 0 and summary["images"][0]["digest"] == str(desc.digest), name
                assert {"blob_start", "blob_done"} <= {o["event"] for o in objects}, name
            if name == "blob get":
                assert summary["bytes"] == (tmp_path / "layer").stat().st_size, name
            if name == "blob put":  # the push put it in r of this registry, and left that in the state dir
                assert (summary["bytes"], summary["mounted"]) == (0, 1), name
    assert summary["digest"] == layer


async def test_json_error_is_the_last_line(cli: Cli, tmp_path: Path) -> None:
    result = await cli("pull", "UPPER/x", str(tmp_path / "out"), "--json")

    assert_one_line_error(result, 2)
    objects = json_lines(result)
    assert objects[-1]["event"] == "error" and objects[-1]["exit_code"] == 2
    assert "UPPER/x" in objects[-1]["message"]


@pytest.mark.parametrize("command", ["tags", "inspect"])
async def test_json_output_of_metadata_commands(command: str, registry: LocalRegistry, cli: Cli,
                                                tmp_path: Path) -> None:
    src = tmp_path / "src"
    build_image(src, "v1", [16 * KiB], seed=6)
    await blobflow.Client().push(src, f"{registry.host}/r:v1")

    result = await cli(command, f"{registry.host}/r" + (":v1" if command == "inspect" else ""), "--json")

    assert result.returncode == 0, result.stderr
    assert json_lines(result)[-1]["event"] == "summary"


# -- bytes that do not match their digest -----------------------------------------------------------

@pytest.mark.parametrize("existing", [False, True], ids=["new-dir", "existing-layout"])
async def test_corrupt_blob_never_lands_in_the_layout(existing: bool, registry: LocalRegistry, proxy: MakeProxy,
                                                      cli: Cli, check_layout: CheckLayout, tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "pulled"
    desc = build_image(src, "v1", [16 * KiB, 256 * KiB], seed=7)
    blobs = image_blobs(src, str(desc.digest))
    await blobflow.Client().push(src, f"{registry.host}/r:v1")
    if existing:
        other = build_image(dst, "other", [32 * KiB], seed=8)
        index_before = (dst / "index.json").read_bytes()
    fault_proxy = await proxy(registry, Faults(wrong_bytes=1.0, seed=1))

    result = await cli("pull", f"{fault_proxy.host}/r:v1", str(dst), "--retries", "1")

    line = assert_one_line_error(result, 1)
    assert "digest" in line
    assert fault_proxy.counters["wrong_bytes"] >= 2
    if existing:
        contents = check_layout(dst)  # every file verifies; no temporary or partial files
        assert (dst / "index.json").read_bytes() == index_before
        assert contents.tags == {"other": str(other.digest)}
    elif dst.exists():
        check_layout(dst)
    for digest in blobs:
        assert not blob_file(dst, digest).exists()


async def test_pull_recovers_from_some_corrupt_responses(registry: LocalRegistry, proxy: MakeProxy, cli: Cli,
                                                         check_layout: CheckLayout, tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "pulled"
    desc = build_image(src, "v1", [16 * KiB, 64 * KiB, 256 * KiB, 1 * MiB], seed=9)
    await blobflow.Client().push(src, f"{registry.host}/r:v1")
    # seed 4: the first roll is under 0.3, so at least one response is corrupted
    fault_proxy = await proxy(registry, Faults(wrong_bytes=0.3, seed=4))

    result = await cli("pull", f"{fault_proxy.host}/r:v1", str(dst))

    assert result.returncode == 0, result.stderr
    assert fault_proxy.counters["wrong_bytes"] >= 1
    assert "retried" in result.stdout
    contents = check_layout(dst)
    assert contents.tags == {"v1": str(desc.digest)}
    assert contents.files == {str(desc.digest), *image_blobs(src, str(desc.digest))}
    for digest in contents.files:
        assert blob_file(dst, digest).read_bytes() == blob_file(src, digest).read_bytes()


async def test_a_reader_that_went_away_ends_the_command_quietly(registry: LocalRegistry, tmp_path: Path) -> None:
    """`blobflow tags R | head -0`: stdout is a pipe nobody reads. The command exits non-zero
    without a traceback or an 'Exception ignored' line at shutdown."""
    src = tmp_path / "src"
    build_image(src, "v1", [16 * KiB], seed=6)
    await blobflow.Client().push(src, f"{registry.host}/r:v1")
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "blobflow", "tags", f"{registry.host}/r",
            stdin=asyncio.subprocess.DEVNULL, stdout=write_end, stderr=asyncio.subprocess.PIPE)
    finally:
        os.close(write_end)
    _, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 1
    assert "Traceback" not in err.decode() and "Exception ignored" not in err.decode(), err.decode()


async def test_bench_outputs_that_could_not_be_written_are_refused_before_the_run(cli: Cli, tmp_path: Path) -> None:
    """A bench writes --json and --plot at its end, a mirror its --report: a wrong path used to
    cost the whole run."""
    with socket.socket() as s:  # nothing listens there: a run that started would fail with exit 1
        s.bind(("127.0.0.1", 0))
        target = f"127.0.0.1:{s.getsockname()[1]}/bench"
    missing = tmp_path / "no-such-dir" / "report.json"
    line = assert_one_line_error(await cli("bench", "--plain-http", target, "--json", str(missing)), 2)
    assert line == f"blobflow: --json {missing}: {missing.parent} does not exist"
    plan = tmp_path / "plan.toml"
    plan.write_text(f'[[mirror]]\nsource = "{target}"\ndestination = "{target}-copy"\ntags = ["v1"]\n')
    line = assert_one_line_error(await cli("mirror", str(plan), "--plain-http", "--report", str(tmp_path)), 2)
    assert line == f"blobflow: --report {tmp_path}: is a directory; give a file name"


# -- registries that take no pushes -------------------------------------------------------------

async def test_push_to_a_registry_that_takes_no_pushes_says_so(registry: LocalRegistry, cli: Cli,
                                                              tmp_path: Path) -> None:
    """Distribution read-only (405 with Allow) and as a pull-through cache (405 UNSUPPORTED): one
    line that says why, not just "405 Method Not Allowed"."""
    src = tmp_path / "src"
    build_image(src, "v1", [64 * KiB], seed=12)
    read_only = LocalRegistry(tmp_path / "ro", read_only=True)
    cache = LocalRegistry(tmp_path / "cache", pull_through=registry.url)
    read_only.start()
    cache.start()
    try:
        results = await run_table(cli, {"read-only": ["push", str(src), f"{read_only.host}/r:v1"],
                                        "pull-through": ["push", str(src), f"{cache.host}/r:v1"]})
    finally:
        read_only.stop()
        cache.stop()

    line = assert_one_line_error(results["read-only"], 1)
    assert "takes no POST here (it allows GET, HEAD)" in line and "read-only" in line, line
    line = assert_one_line_error(results["pull-through"], 1)
    assert "UNSUPPORTED" in line and "takes no POST here: it may be read-only, or a pull-through cache" in line, line


async def test_a_path_where_an_image_belongs_says_how_the_command_is_ordered(
        cli: Cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`push IMAGE DIR`, arguments swapped, said only "invalid reference './lay': bad registry
    host '.'". And a YAML plan (PRODUCT.md names YAML and TOML) said only that it is no TOML."""
    (tmp_path / "lay").mkdir()
    (tmp_path / "layer.tgz").write_bytes(b"x")
    (tmp_path / "plan.yaml").write_text("mirror:\n  - source: a\n    destination: b\n")
    monkeypatch.chdir(tmp_path)
    results = await run_table(cli, {
        "push": ["push", "127.0.0.1:9/app:1.0", "./lay"],
        "pull": ["pull", "./lay", "127.0.0.1:9/app:1.0"],
        "blob put": ["blob", "put", "127.0.0.1:9/app", "layer.tgz"],
        "copy": ["copy", str(tmp_path / "lay"), "127.0.0.1:9/app:1.0"],
        "yaml": ["mirror", "plan.yaml"],
    })
    usage = {"push": "blobflow push DIR IMAGE", "pull": "blobflow pull IMAGE DIR",
             "blob put": "blobflow blob put FILE REPO", "copy": "blobflow copy SRC-IMAGE DST-IMAGE"}
    for name, result in results.items():
        line = assert_one_line_error(result, 2)
        if name == "yaml":
            assert "plans are TOML ([[mirror]] tables, see the README), not YAML" in line, line
        else:
            assert line.endswith(f"is a path: {usage[name]}"), (name, line)

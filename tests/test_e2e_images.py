"""End to end: whole images through blobflow's API and CLI against real Distribution registries.

Every test builds a small synthetic image (``blobflow.synth``), moves it, and checks the result with
tools other than blobflow's own code: the layout files and their sha256, the registry's answers to
plain HTTP requests, the fault proxy's request log and ``skopeo``.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import gzip
import hashlib
import json
import math
import os
import re
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from conftest import AUTH_PASSWORD, AUTH_USER, CheckLayout, Cli, CliResult, FakeHandler, MakeFakeRegistry, MakeProxy

import blobflow
from blobflow.journal import Journal
from blobflow.localreg import LocalRegistry
from blobflow.synth import build_image
from blobflow.transfer import HINT_MISSES
from blobflow.types import Digest

KiB, MiB = 1024, 1024 * 1024
ACCEPT = ", ".join([
    "application/vnd.oci.image.manifest.v1+json", "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
])
PLATFORMS = ["linux/amd64", "linux/arm64"]


# -- reading the source layout and the registry without blobflow --------------------------------

def gzip_bytes(data: bytes) -> bytes:
    return gzip.compress(data, mtime=0)


def blob_path(layout: Path, digest: str) -> Path:
    return layout / "blobs" / "sha256" / digest.removeprefix("sha256:")


def read_json(layout: Path, digest: str) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(blob_path(layout, digest).read_bytes())
    return doc


def image_blobs(layout: Path, manifest_digest: str) -> list[str]:
    """The config and layer digests of one image manifest."""
    doc = read_json(layout, manifest_digest)
    return [doc["config"]["digest"], *(layer["digest"] for layer in doc["layers"])]


def platform_manifests(layout: Path, index_digest: str) -> dict[str, str]:
    """``os/arch`` -> manifest digest, from an index."""
    return {f"{m['platform']['os']}/{m['platform']['architecture']}": m["digest"]
            for m in read_json(layout, index_digest)["manifests"]}


def registry_head(registry: LocalRegistry, path: str) -> tuple[int, dict[str, str]]:
    """HEAD ``/v2/<path>`` on a real registry (never one served by this test's event loop)."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    request = urllib.request.Request(f"{registry.url}/v2/{path}", method="HEAD", headers={"Accept": ACCEPT})
    try:
        with opener.open(request, timeout=10) as response:
            return response.status, dict(response.headers)
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers)


def manifest_digest_at(registry: LocalRegistry, repo: str, reference: str) -> str:
    status, headers = registry_head(registry, f"{repo}/manifests/{reference}")
    assert status == 200, f"{repo}:{reference} is not at {registry.host} (HEAD answered {status})"
    return headers["Docker-Content-Digest"]


def blob_status(registry: LocalRegistry, repo: str, digest: str) -> int:
    return registry_head(registry, f"{repo}/blobs/{digest}")[0]


def committed_blobs(log: list[tuple[str, str, int]]) -> collections.Counter[str]:
    """How many times each digest was committed (``PUT .../blobs/uploads/...?digest=``), from a proxy log."""
    commits: collections.Counter[str] = collections.Counter()
    for method, path, status in log:
        match = re.search(r"digest=(sha256:[0-9a-f]{64})", urllib.parse.unquote(path))
        if method == "PUT" and "/blobs/uploads/" in path and status == 201 and match:
            commits[match[1]] += 1
    return commits


def skopeo_raw(image: str) -> bytes:
    proc = subprocess.run(["skopeo", "inspect", "--raw", "--tls-verify=false", f"docker://{image}"],
                          capture_output=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr.decode()
    return proc.stdout


def assert_one_line_error(result: CliResult, code: int) -> str:
    """The command failed with ``code`` and said why in one line on stderr, without a traceback."""
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr + result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got {lines}"
    return lines[0]


# -- push and pull -----------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["defaults", "chunked-ranged"])
async def test_push_pull_round_trip(mode: str, registry: LocalRegistry, proxy: MakeProxy, cli: Cli,
                                    check_layout: CheckLayout, repo_name: str, tmp_path: Path) -> None:
    """CLI push then pull: same manifest digest, every blob byte for byte, whatever the request shapes."""
    src, dst = tmp_path / "src", tmp_path / "pulled"
    desc = build_image(src, "v1", [16 * KiB, 1 * MiB, 5 * MiB], seed=11)
    blobs = image_blobs(src, str(desc.digest))
    big_layer = blobs[-1]
    fault_proxy = await proxy(registry)  # no faults: it only records the requests
    image = f"{fault_proxy.host}/{repo_name}:v1"
    chunked = mode == "chunked-ranged"

    pushed = await cli("push", str(src), image, *(["--chunk-size", "1MiB"] if chunked else []))
    assert pushed.returncode == 0, pushed.stderr
    assert pushed.stderr == ""
    assert pushed.stdout.startswith("pushed 4 blobs"), pushed.stdout
    patches = sum(method == "PATCH" for method, _, _ in fault_proxy.log)
    assert committed_blobs(fault_proxy.log) == dict.fromkeys(blobs, 1)
    if chunked:  # the 5 MiB layer goes in PATCHes of at most 1 MiB
        assert patches >= math.ceil(blob_path(src, big_layer).stat().st_size / MiB)
    else:  # at most one PATCH per blob
        assert patches <= len(blobs)
    assert manifest_digest_at(registry, repo_name, "v1") == str(desc.digest)

    fault_proxy.log.clear()
    pulled = await cli("pull", image, str(dst), *(["--part-size", "1MiB"] if chunked else []))
    assert pulled.returncode == 0, pulled.stderr
    assert pulled.stderr == ""
    assert pulled.stdout.startswith("pulled 4 blobs"), pulled.stdout
    big_gets = sum(method == "GET" and path.endswith(big_layer) for method, path, _ in fault_proxy.log)
    if chunked:  # 1 MiB ranges, fetched in parallel
        assert big_gets >= 5
    else:
        assert big_gets == 1

    contents = check_layout(dst)
    assert contents.tags == {"v1": str(desc.digest)}
    assert contents.files == contents.reachable == {str(desc.digest), *blobs}
    for digest in [str(desc.digest), *blobs]:
        assert blob_path(dst, digest).read_bytes() == blob_path(src, digest).read_bytes()


async def test_pull_into_layout_holding_another_image(registry: LocalRegistry, check_layout: CheckLayout,
                                                      repo_name: str, tmp_path: Path) -> None:
    """The layout keeps its image and gains the pulled one; a layer they share is not fetched again."""
    src, dst = tmp_path / "src", tmp_path / "layout"
    # the same seed and base layer size: both images start with the same base layer blob
    pushed = build_image(src, "v1", [64 * KiB, 32 * KiB], seed=5, base_layers=[128 * KiB])
    existing = build_image(dst, "other", [48 * KiB], seed=5, base_layers=[128 * KiB])
    shared = set(image_blobs(src, str(pushed.digest))) & set(image_blobs(dst, str(existing.digest)))
    assert len(shared) == 1
    before = {p.name: p.read_bytes() for p in (dst / "blobs" / "sha256").iterdir()}

    client = blobflow.Client()
    await client.push(src, f"{registry.host}/{repo_name}:v1")
    result = await client.pull(f"{registry.host}/{repo_name}:v1", dst)

    assert result.skipped == 1 and result.blobs == 3
    contents = check_layout(dst)
    assert contents.tags == {"other": str(existing.digest), "v1": str(pushed.digest)}
    assert contents.files == contents.reachable
    assert {str(existing.digest), *image_blobs(dst, str(existing.digest))} <= contents.reachable
    for name, data in before.items():  # the old image's blobs are untouched
        assert (dst / "blobs" / "sha256" / name).read_bytes() == data


async def test_parallel_pulls_into_one_new_layout(registry: LocalRegistry, cli: Cli, check_layout: CheckLayout,
                                                  repo_name: str, tmp_path: Path) -> None:
    """``for t in a b c d; do blobflow pull REPO:$t DIR & done``: four processes create the layout,
    fetch a base layer they share, and tag their image at once. Every one succeeds and the layout
    ends with all four tags (a tag lost to a concurrent index.json write is a lost image)."""
    src, dst = tmp_path / "src", tmp_path / "layout"
    tags = ["a", "b", "c", "d"]
    pushed = {}
    client = blobflow.Client()
    for i, tag in enumerate(tags):
        pushed[tag] = str(build_image(src, tag, [16 * KiB], seed=20 + i, base_layers=[256 * KiB]).digest)
        await client.push(src, f"{registry.host}/{repo_name}:{tag}", tag=tag)

    results = await asyncio.gather(*(cli("pull", f"{registry.host}/{repo_name}:{tag}", str(dst)) for tag in tags))

    assert [r.returncode for r in results] == [0] * len(tags), [r.stderr for r in results]
    contents = check_layout(dst)
    assert contents.tags == pushed
    assert contents.files == contents.reachable


async def test_a_failed_pull_leaves_what_another_pull_wrote_into_the_same_new_directory(
        registry: LocalRegistry, fake_registry: MakeFakeRegistry, check_layout: CheckLayout, repo_name: str,
        tmp_path: Path) -> None:
    """Two pulls into one new directory, and the one that created it fails after the other has
    tagged its image there. A failed pull removes the layout it created, but only while it holds
    nothing: it removed the directory with the other pull's image in it."""
    src, dst = tmp_path / "src", tmp_path / "layout"
    pushed = build_image(src, "v1", [32 * KiB], seed=61)
    await blobflow.Client().push(src, f"{registry.host}/{repo_name}:v1")
    asked, answer = asyncio.Event(), asyncio.Event()

    async def missing_late(request: web.Request) -> web.StreamResponse:
        asked.set()  # the failing pull has made the layout by now
        await answer.wait()
        return web.json_response({"errors": [{"code": "MANIFEST_UNKNOWN", "message": "manifest unknown"}]},
                                 status=404)

    failing = asyncio.ensure_future(blobflow.Client().pull(f"{await fake_registry(missing_late)}/app:v1", dst))
    await asked.wait()
    assert (dst / "oci-layout").exists()
    await blobflow.Client().pull(f"{registry.host}/{repo_name}:v1", dst)
    answer.set()
    with pytest.raises(blobflow.NotFoundError):
        await failing

    assert check_layout(dst).tags == {"v1": str(pushed.digest)}


async def test_the_api_takes_reference_objects_and_refuses_credentials_it_cannot_use(
        registry: LocalRegistry, check_layout: CheckLayout, repo_name: str, tmp_path: Path) -> None:
    """blobflow.Reference is exported, yet pull(Reference) was "TypeError: 'Reference' object is
    not iterable"; credentials given as ("user", "password") were dropped without a word, and the
    registry's 401 then said none were configured."""
    src = tmp_path / "src"
    desc = build_image(src, "v1", [16 * KiB], seed=65)
    ref = blobflow.Reference.parse(f"{registry.host}/{repo_name}:v1")
    async with blobflow.Client() as client:
        await client.push(src, ref)
        await client.pull(ref, tmp_path / "out")
        assert (await client.inspect(ref)).digest == desc.digest
        with pytest.raises(blobflow.BadInputError, match="empty string"):  # was a layout in the current directory
            await client.pull(ref, "")
    assert check_layout(tmp_path / "out").tags == {"v1": str(desc.digest)}
    with pytest.raises(blobflow.BadInputError, match=f"credentials for {registry.host}: give blobflow.Credentials"):
        blobflow.Client(credentials={registry.host: ("alice", "pw")})  # type: ignore[dict-item]


async def test_push_chooses_the_image_by_tag(registry: LocalRegistry, repo_name: str, tmp_path: Path) -> None:
    """A layout holding two images pushes the one named by ``tag``, and refuses to guess."""
    layout = tmp_path / "layout"
    first = build_image(layout, "first", [16 * KiB], seed=6)
    second = build_image(layout, "second", [24 * KiB], seed=7)
    client = blobflow.Client()

    with pytest.raises(blobflow.BadInputError, match="first, second"):
        await client.push(layout, f"{registry.host}/{repo_name}:v1")
    with pytest.raises(blobflow.BadInputError, match="third"):
        await client.push(layout, f"{registry.host}/{repo_name}:v1", tag="third")
    assert registry.storage_bytes() == 0
    result = await client.push(layout, f"{registry.host}/{repo_name}:v1", tag="second")

    assert result.images[0].digest == str(second.digest)
    assert manifest_digest_at(registry, repo_name, "v1") == str(second.digest)
    assert blob_status(registry, repo_name, image_blobs(layout, str(first.digest))[-1]) == 404


# -- copy --------------------------------------------------------------------------------------

async def test_copy_between_registries(registry: LocalRegistry, registry2: LocalRegistry,
                                       repo_name: str, tmp_path: Path) -> None:
    src = tmp_path / "src"
    desc = build_image(src, "v1", [16 * KiB, 256 * KiB, 5 * MiB], seed=21)  # 5 MiB: one streamed PATCH
    blobs = image_blobs(src, str(desc.digest))
    client = blobflow.Client()
    await client.push(src, f"{registry.host}/{repo_name}:v1")

    first = await client.copy(f"{registry.host}/{repo_name}:v1", f"{registry2.host}/{repo_name}:copied")

    size = sum(blob_path(src, d).stat().st_size for d in blobs)
    assert (first.blobs, first.bytes, first.skipped, first.mounted) == (4, size, 0, 0)
    inspected = await client.inspect(f"{registry2.host}/{repo_name}:copied")
    assert str(inspected.digest) == str(desc.digest)
    assert inspected.data == blob_path(src, str(desc.digest)).read_bytes()
    assert manifest_digest_at(registry2, repo_name, "copied") == str(desc.digest)
    assert all(blob_status(registry2, repo_name, d) == 200 for d in blobs)

    second = await client.copy(f"{registry.host}/{repo_name}:v1", f"{registry2.host}/{repo_name}:copied")

    assert (second.blobs, second.bytes, second.skipped, second.mounted) == (0, 0, 4, 0)
    assert manifest_digest_at(registry2, repo_name, "copied") == str(desc.digest)


async def test_copy_or_push_to_a_digest_writes_that_digest_or_nothing(registry: LocalRegistry, registry2: LocalRegistry,
                                                               cli: Cli, repo_name: str, tmp_path: Path) -> None:
    """`copy SRC DST@sha256:...` ignored the digest: it wrote whatever SRC was under SRC's tag.
    Now the image must come out as that digest, as skopeo checks; without a tag it is written by
    digest alone, and a wrong digest is refused before any blob moves."""
    src = tmp_path / "src"
    desc = build_image(src, "v1", [16 * KiB, 64 * KiB], seed=22)
    await blobflow.Client().push(src, f"{registry.host}/{repo_name}:v1")
    wrong = "sha256:" + "ab" * 32
    source = f"{registry.host}/{repo_name}:v1"

    refused = await cli("copy", source, f"{registry2.host}/{repo_name}:v2@{wrong}")
    line = assert_one_line_error(refused, 2)
    assert f"the image to write there is {desc.digest}, not the {wrong} the destination names" in line, line
    assert all(blob_status(registry2, repo_name, d) == 404 for d in image_blobs(src, str(desc.digest)))

    pinned = await cli("copy", f"{registry.host}/{repo_name}@{desc.digest}",
                       f"{registry2.host}/{repo_name}@{desc.digest}")
    assert pinned.returncode == 0, pinned.output
    assert manifest_digest_at(registry2, repo_name, str(desc.digest)) == str(desc.digest)
    assert registry_head(registry2, f"{repo_name}/manifests/latest")[0] == 404  # no tag made up
    assert registry_head(registry2, f"{repo_name}/manifests/v1")[0] == 404
    tagged = await cli("copy", source, f"{registry2.host}/{repo_name}:v2@{desc.digest}")
    assert tagged.returncode == 0, tagged.output
    assert manifest_digest_at(registry2, repo_name, "v2") == str(desc.digest)

    # push the same way (it refused any digest: "push to a tag, not a digest")
    line = assert_one_line_error(await cli("push", str(src), f"{registry2.host}/pushed@{wrong}"), 2)
    assert f"the image to write there is {desc.digest}, not the {wrong}" in line, line
    pushed = await cli("push", str(src), f"{registry2.host}/pushed@{desc.digest}")
    assert pushed.returncode == 0, pushed.output
    assert manifest_digest_at(registry2, "pushed", str(desc.digest)) == str(desc.digest)
    assert registry_head(registry2, "pushed/manifests/latest")[0] == 404


async def test_foreign_layers_stay_at_their_urls(proxy: MakeProxy, cli: Cli, tmp_path: Path) -> None:
    """An image with a foreign layer (old Windows base images): its bytes live at its URLs and the
    registry does not hold them. pull and copy asked the registry for it, got 404 and failed;
    docker, skopeo and crane leave such a layer where it is, and so does blobflow now."""
    allow = r"^http://127\.0\.0\.1:9/"  # Distribution takes no foreign URL by default
    with LocalRegistry(tmp_path / "r1", foreign_urls=allow) as registry, \
            LocalRegistry(tmp_path / "r2", foreign_urls=allow) as registry2, \
            LocalRegistry(tmp_path / "r3") as refusing:
        await _foreign_layers(registry, registry2, refusing, proxy, cli, tmp_path)


async def _foreign_layers(registry: LocalRegistry, registry2: LocalRegistry, refusing: LocalRegistry,
                          proxy: MakeProxy, cli: Cli, tmp_path: Path) -> None:
    client = blobflow.Client()
    (tmp_path / "config").write_bytes(b'{"architecture": "amd64", "os": "windows", "rootfs": {"type": "layers"}}')
    (tmp_path / "layer").write_bytes(gzip_bytes(os.urandom(30_000)))
    _, config = await client.blob_put(tmp_path / "config", f"{registry.host}/win/app")
    _, layer = await client.blob_put(tmp_path / "layer", f"{registry.host}/win/app")
    foreign = {"mediaType": "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
               "digest": "sha256:" + "f0" * 32, "size": 123_456_789,
               "urls": ["http://127.0.0.1:9/never-fetched/layer.tar.gz"]}  # nothing listens there
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
        "config": {"mediaType": "application/vnd.docker.container.image.v1+json", "digest": str(config.digest),
                   "size": config.size},
        "layers": [foreign, {"mediaType": "application/vnd.docker.image.rootfs.diff.tar.gzip",
                             "digest": str(layer.digest), "size": layer.size}]}, indent=3).encode()
    put_manifest(registry, "win/app", "ltsc", manifest, "application/vnd.docker.distribution.manifest.v2+json")
    counted = await proxy(registry)
    src = f"{counted.host}/win/app:ltsc"

    pulled, copied = await asyncio.gather(cli("pull", src, str(tmp_path / "out")),
                                          cli("copy", src, f"{registry2.host}/win/app:ltsc", "-v"))
    for result in (pulled, copied):
        assert result.returncode == 0, result.output
    assert "1 foreign layer(s) left at their URLs, not copied" in copied.stderr
    assert not [path for _, path, _ in counted.log if foreign["digest"] in path]  # never asked for
    assert blob_path(tmp_path / "out", str(Digest.of(manifest))).read_bytes() == manifest
    assert not blob_path(tmp_path / "out", foreign["digest"]).exists()
    assert blob_path(tmp_path / "out", str(layer.digest)).exists()
    assert manifest_digest_at(registry2, "win/app", "ltsc") == str(Digest.of(manifest))
    pushed = await cli("push", str(tmp_path / "out"), f"{registry2.host}/win/pushed:ltsc")  # the layout lacks it
    assert pushed.returncode == 0, pushed.output
    assert manifest_digest_at(registry2, "win/pushed", "ltsc") == str(Digest.of(manifest))

    # a registry that takes no foreign URLs: Distribution's "500 UNKNOWN: unknown error", explained
    line = assert_one_line_error(await cli("copy", src, f"{refusing.host}/win/app:ltsc", "--retries", "0"), 1)
    assert line.endswith("500 UNKNOWN: unknown error; the manifest names 1 foreign layer(s) at URLs, which a "
                         "registry may refuse (Distribution does unless its validation.manifests.urls.allow "
                         "matches them)"), line


# -- multi-platform indexes --------------------------------------------------------------------

def build_index(root: Path) -> tuple[str, dict[str, str]]:
    """A two-platform index sharing one base layer; its digest and platform -> manifest digest."""
    desc = build_image(root, "v1", [64 * KiB, 32 * KiB], seed=31, platforms=PLATFORMS,
                       base_layers=[256 * KiB])
    return str(desc.digest), platform_manifests(root, str(desc.digest))


async def test_index_push_and_pull_all_platforms(registry: LocalRegistry, proxy: MakeProxy,
                                                 check_layout: CheckLayout, repo_name: str, tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "pulled"
    index, children = build_index(src)
    blobs = {b for m in children.values() for b in image_blobs(src, m)}
    everything = {index, *children.values(), *blobs}
    client = blobflow.Client()

    pushed = await client.push(src, f"{registry.host}/{repo_name}:v1")
    assert pushed.images[0].digest == index
    assert manifest_digest_at(registry, repo_name, "v1") == index
    for manifest in children.values():
        assert manifest_digest_at(registry, repo_name, manifest) == manifest

    fault_proxy = await proxy(registry)
    await client.pull(f"{fault_proxy.host}/{repo_name}:v1", dst)

    contents = check_layout(dst)
    assert contents.tags == {"v1": index}
    assert contents.files == contents.reachable == everything
    gets = collections.Counter(path.rsplit("/", 1)[1] for method, path, _ in fault_proxy.log
                               if method == "GET" and "/blobs/" in path)
    assert gets == dict.fromkeys(blobs, 1)  # the shared base layer too: fetched once
    for digest in everything:
        assert blob_path(dst, digest).read_bytes() == blob_path(src, digest).read_bytes()


async def test_index_pull_one_platform(registry: LocalRegistry, cli: Cli, check_layout: CheckLayout,
                                       repo_name: str, tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "pulled"
    _, children = build_index(src)
    await blobflow.Client().push(src, f"{registry.host}/{repo_name}:v1")

    pulled = await cli("pull", f"{registry.host}/{repo_name}:v1", str(dst), "--platform", "linux/arm64")

    assert pulled.returncode == 0, pulled.stderr
    contents = check_layout(dst)
    arm64 = children["linux/arm64"]
    assert contents.tags == {"v1": arm64}
    assert contents.entries[0]["mediaType"] == "application/vnd.oci.image.manifest.v1+json"
    assert contents.files == contents.reachable == {arm64, *image_blobs(src, arm64)}


async def test_index_copy_one_platform(registry: LocalRegistry, registry2: LocalRegistry,
                                       repo_name: str, tmp_path: Path) -> None:
    src = tmp_path / "src"
    _, children = build_index(src)
    client = blobflow.Client()
    await client.push(src, f"{registry.host}/{repo_name}:v1")

    result = await client.copy(f"{registry.host}/{repo_name}:v1", f"{registry2.host}/{repo_name}:arm64",
                               platform="linux/arm64")

    arm64, amd64 = children["linux/arm64"], children["linux/amd64"]
    assert result.images[0].digest == arm64
    assert manifest_digest_at(registry2, repo_name, "arm64") == arm64
    arm64_blobs = image_blobs(src, arm64)
    assert result.blobs == len(arm64_blobs)
    assert all(blob_status(registry2, repo_name, d) == 200 for d in arm64_blobs)
    for digest in set(image_blobs(src, amd64)) - set(arm64_blobs):  # the other platform stays behind
        assert blob_status(registry2, repo_name, digest) == 404


# -- tags ---------------------------------------------------------------------------------------

def put_manifest(registry: LocalRegistry, repo: str, reference: str, body: bytes, media_type: str) -> None:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    request = urllib.request.Request(f"{registry.url}/v2/{repo}/manifests/{reference}", data=body,
                                     method="PUT", headers={"Content-Type": media_type})
    with opener.open(request, timeout=10) as response:
        assert response.status == 201


async def test_tags_of_real_registry(registry: LocalRegistry, cli: Cli, repo_name: str, tmp_path: Path) -> None:
    """25 tags at a real registry: the API (asking for pages of 10) and the CLI list them all."""
    src = tmp_path / "src"
    desc = build_image(src, "v1", [16 * KiB], seed=41)
    expected = [f"t{i:02d}" for i in range(25)]
    client = blobflow.Client()
    await client.push(src, f"{registry.host}/{repo_name}:{expected[0]}")
    for tag in expected[1:]:  # the same manifest under more tags, without 24 more jobs
        put_manifest(registry, repo_name, tag, blob_path(src, str(desc.digest)).read_bytes(), desc.media_type)

    tags = await client.tags(f"{registry.host}/{repo_name}", page_size=10)

    assert sorted(tags) == expected
    listed = await cli("tags", f"{registry.host}/{repo_name}")
    assert listed.returncode == 0, listed.stderr
    assert sorted(listed.stdout.split()) == expected


def paginating_tags(tags: list[str], *, default_page: int, absolute_links: bool) -> tuple[FakeHandler, list[str]]:
    """A tags/list endpoint that pages as the distribution spec says (``n``, ``last``, ``Link``).

    Distribution 2.8, the registry the other tests run, ignores ``n`` and always answers one page;
    Docker Hub, GHCR and Distribution 3 page. Returns the handler and the query strings it served.
    """
    served: list[str] = []

    async def handler(request: web.Request) -> web.StreamResponse:
        match = re.fullmatch(r"/v2/(.+)/tags/list", request.path)
        if match is None or request.method != "GET":
            return web.json_response({"errors": [{"code": "UNSUPPORTED", "message": "not here"}]}, status=404)
        served.append(request.query_string)
        size = int(request.query.get("n", default_page))
        last = request.query.get("last")
        rest = [t for t in sorted(tags) if last is None or t > last]
        page, headers = rest[:size], {}
        if len(rest) > size:
            link = f"/v2/{match[1]}/tags/list?n={size}&last={page[-1]}"
            if absolute_links:
                link = f"http://{request.host}{link}"
            headers["Link"] = f'<{link}>; rel="next"'
        return web.json_response({"name": match[1], "tags": page}, headers=headers)

    return handler, served


@pytest.mark.parametrize("absolute_links", [False, True], ids=["relative-link", "absolute-link"])
@pytest.mark.parametrize("page_size", [1, 10, 25])
async def test_tags_follow_pagination(page_size: int, absolute_links: bool,
                                      fake_registry: MakeFakeRegistry) -> None:
    expected = [f"t{i:02d}" for i in range(25)]
    handler, served = paginating_tags(expected, default_page=10, absolute_links=absolute_links)
    host = await fake_registry(handler)

    tags = await blobflow.Client().tags(f"{host}/some/repo", page_size=page_size)

    assert tags == expected  # each tag once, in the registry's order, none lost at a page boundary
    assert len(served) == math.ceil(25 / page_size)
    assert served[0] == f"n={page_size}"


async def test_cli_tags_follow_pagination(fake_registry: MakeFakeRegistry, cli: Cli) -> None:
    expected = [f"t{i:02d}" for i in range(25)]
    handler, served = paginating_tags(expected, default_page=10, absolute_links=False)
    host = await fake_registry(handler)

    listed = await cli("tags", f"{host}/some/repo", "--plain-http")  # the registry's page size: 10

    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.split() == expected
    assert len(served) == 3


async def test_tags_one_large_page(fake_registry: MakeFakeRegistry) -> None:
    """A registry that answers 20,000 tags (about 250 kB of JSON) in one page."""
    expected = [f"tag-{i:05d}" for i in range(20_000)]
    handler, served = paginating_tags(expected, default_page=len(expected), absolute_links=False)
    host = await fake_registry(handler)

    tags = await blobflow.Client().tags(f"{host}/some/repo")

    assert tags == expected
    assert served == [""]


# -- auth --------------------------------------------------------------------------------------

async def test_basic_auth_push_and_pull(auth_registry: LocalRegistry, docker_config: Path, cli: Cli,
                                        check_layout: CheckLayout, repo_name: str, tmp_path: Path) -> None:
    """Credentials come from DOCKER_CONFIG; they never show in output, even with -v."""
    src, dst = tmp_path / "src", tmp_path / "pulled"
    desc = build_image(src, "v1", [32 * KiB, 64 * KiB], seed=51)
    image = f"{auth_registry.host}/{repo_name}:v1"

    pushed = await blobflow.Client().push(src, image)
    assert pushed.images[0].digest == str(desc.digest)
    pulled = await cli("pull", image, str(dst), "-v")
    assert pulled.returncode == 0, pulled.stderr

    contents = check_layout(dst)
    assert contents.tags == {"v1": str(desc.digest)}
    assert contents.files == contents.reachable == {str(desc.digest), *image_blobs(src, str(desc.digest))}
    token = base64.b64encode(f"{AUTH_USER}:{AUTH_PASSWORD}".encode()).decode()
    assert "blob_done" in pulled.stderr  # -v: one line per blob event
    for output in (pulled.stdout, pulled.stderr):
        assert AUTH_PASSWORD not in output and token not in output


@pytest.mark.parametrize(("command", "password"), [
    ("pull", None), ("push", None), ("pull", "not-the-password-7f3a"),
], ids=["pull-no-credentials", "push-no-credentials", "pull-wrong-password"])
async def test_auth_refused_is_bad_input(command: str, password: str | None, auth_registry: LocalRegistry,
                                         cli: Cli, repo_name: str, tmp_path: Path) -> None:
    """Missing or wrong credentials: exit 2, one line naming the registry, no secret in it."""
    config_dir = tmp_path / "docker-config"
    config_dir.mkdir()
    secrets = [AUTH_PASSWORD]
    if password is not None:
        token = base64.b64encode(f"{AUTH_USER}:{password}".encode()).decode()
        (config_dir / "config.json").write_text(json.dumps({"auths": {auth_registry.host: {"auth": token}}}))
        secrets += [password, token]
    src = tmp_path / "src"
    build_image(src, "v1", [16 * KiB], seed=52)
    image = f"{auth_registry.host}/{repo_name}:v1"
    args = ["pull", image, str(tmp_path / "pulled")] if command == "pull" else ["push", str(src), image]

    result = await cli(*args, env={"DOCKER_CONFIG": str(config_dir)})

    line = assert_one_line_error(result, 2)
    assert auth_registry.host in line
    assert not any(secret in result.stderr + result.stdout for secret in secrets)
    assert not (tmp_path / "pulled").exists()


# -- annotations -------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["manifest", "index"])
async def test_push_annotations(kind: str, registry: LocalRegistry, cli: Cli, repo_name: str,
                                tmp_path: Path) -> None:
    src = tmp_path / "src"
    if kind == "index":
        desc = build_image(src, "v1", [16 * KiB], seed=61, platforms=PLATFORMS)
    else:
        desc = build_image(src, "v1", [16 * KiB], seed=61)
    annotations = {"org.opencontainers.image.source": "https://example.com/x",
                   "org.opencontainers.image.description": "hi"}
    image = f"{registry.host}/{repo_name}:v1"

    pushed = await cli("push", str(src), image,
                       *(arg for key, value in annotations.items() for arg in ("--annotation", f"{key}={value}")))

    assert pushed.returncode == 0, pushed.stderr
    raw = skopeo_raw(image)
    doc = json.loads(raw)
    assert doc["annotations"] == annotations
    assert doc["mediaType"] == desc.media_type
    assert "sha256:" + hashlib.sha256(raw).hexdigest() == manifest_digest_at(registry, repo_name, "v1")
    source = read_json(src, str(desc.digest))
    if kind == "index":  # on the index itself; the platform manifests are the source's, untouched
        assert doc["manifests"] == source["manifests"]
        for child in doc["manifests"]:
            assert "annotations" not in json.loads(skopeo_raw(f"{registry.host}/{repo_name}@{child['digest']}"))
    else:
        assert (doc["config"], doc["layers"]) == (source["config"], source["layers"])


async def test_a_platform_asked_of_a_single_image_must_be_its_own(registry: LocalRegistry, proxy: MakeProxy, cli: Cli,
                                                                  repo_name: str, tmp_path: Path) -> None:
    """`pull --platform linux/arm64` of an image that is no index pulled it whatever its platform:
    a layout of amd64 bytes tagged for an arm64 machine, exit 0. Now its config must say so (as
    docker pull --platform checks); the same for copy and inspect."""
    src = tmp_path / "src"
    build_image(src, "v1", [4 * KiB], seed=73)  # one linux/amd64 image
    image = f"{registry.host}/{repo_name}:v1"
    await blobflow.Client().push(src, image)

    pulled, copied, inspected, own = await asyncio.gather(
        cli("pull", image, str(tmp_path / "arm64"), "--platform", "linux/arm64"),
        cli("copy", image, f"{registry.host}/{repo_name}-copy:v1", "--platform", "linux/arm64"),
        cli("inspect", image, "--platform", "linux/arm64/v8"),
        cli("pull", image, str(tmp_path / "amd64"), "--platform", "linux/amd64"))

    for result in (pulled, copied, inspected):
        assert result.returncode == 1, result.output
        assert "is one image (no index), for linux/amd64" in result.stderr and "no linux/arm64" in result.stderr
    assert not (tmp_path / "arm64").exists()
    assert (await cli("tags", f"{registry.host}/{repo_name}-copy")).returncode == 1  # nothing was written
    assert own.returncode == 0, own.output

    # an artifact (a Helm chart's config names no platform) is what it is: no config fetched to check
    client = blobflow.Client()
    (tmp_path / "config").write_bytes(b'{"name": "chart", "version": "1.0.0"}')
    (tmp_path / "chart").write_bytes(b"chart bytes")
    _, config = await client.blob_put(tmp_path / "config", f"{registry.host}/{repo_name}-chart")
    _, chart = await client.blob_put(tmp_path / "chart", f"{registry.host}/{repo_name}-chart")
    manifest = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                           "config": {"mediaType": "application/vnd.cncf.helm.config.v1+json",
                                      "digest": str(config.digest), "size": config.size},
                           "layers": [{"mediaType": "application/vnd.cncf.helm.chart.content.v1.tar+gzip",
                                       "digest": str(chart.digest), "size": chart.size}]}).encode()
    put_manifest(registry, f"{repo_name}-chart", "1.0.0", manifest, "application/vnd.oci.image.manifest.v1+json")
    chart_proxy = await proxy(registry)
    shown = await cli("inspect", f"{chart_proxy.host}/{repo_name}-chart:1.0.0", "--platform", "linux/arm64", "--raw")
    assert shown.returncode == 0, shown.output
    assert shown.stdout_bytes == manifest
    assert not [path for method, path, _ in chart_proxy.log if "/blobs/" in path]


async def test_inspect_a_platform_of_an_index(registry: LocalRegistry, cli: Cli, repo_name: str,
                                              tmp_path: Path) -> None:
    """``inspect --platform`` prints that platform's manifest, as crane and regctl do; a platform
    the index lacks is named with the ones it has (its attestations are no platform)."""
    src = tmp_path / "src"
    desc = build_image(src, "v1", [4 * KiB], seed=72, platforms=["linux/amd64", "linux/arm64"], attestations=True)
    arm64 = platform_manifests(src, str(desc.digest))["linux/arm64"]
    image = f"{registry.host}/{repo_name}:v1"
    await blobflow.Client().push(src, image)

    raw, missing, bad = await asyncio.gather(
        cli("inspect", image, "--platform", "linux/arm64", "--raw"),
        cli("inspect", image, "--platform", "linux/s390x"),
        cli("inspect", image, "--platform", "linux"))

    assert raw.returncode == 0, raw.stderr
    assert raw.stdout_bytes == blob_path(src, arm64).read_bytes()
    assert missing.returncode == 1
    assert "no linux/s390x image" in missing.stderr and "(has: linux/amd64, linux/arm64)" in missing.stderr
    assert bad.returncode == 2 and "invalid platform" in bad.stderr


# -- shared blobs move once --------------------------------------------------------------------

async def test_shared_layer_uploaded_once(registry: LocalRegistry, proxy: MakeProxy, repo_name: str,
                                          tmp_path: Path) -> None:
    """An index whose platforms share a base layer sends that layer's bytes once."""
    src = tmp_path / "src"
    desc = build_image(src, "v1", [32 * KiB], seed=71, platforms=["linux/amd64", "linux/arm64", "linux/s390x"],
                       base_layers=[5 * MiB])
    children = platform_manifests(src, str(desc.digest))
    distinct = {b for m in children.values() for b in image_blobs(src, m)}
    base = read_json(src, children["linux/amd64"])["layers"][0]["digest"]
    fault_proxy = await proxy(registry)

    result = await blobflow.Client().push(src, f"{fault_proxy.host}/{repo_name}:v1")

    assert result.blobs == len(distinct) == 7
    commits = committed_blobs(fault_proxy.log)
    assert commits == dict.fromkeys(distinct, 1)
    assert commits[base] == 1
    assert fault_proxy.counters["uploads_started"] == len(distinct)
    manifests = [str(desc.digest), *children.values()]
    sent = sum(blob_path(src, d).stat().st_size for d in [*distinct, *manifests])
    assert fault_proxy.counters["bytes_to_upstream"] == sent


async def test_copy_within_registry_mounts(registry: LocalRegistry, repo_name: str, tmp_path: Path) -> None:
    src = tmp_path / "src"
    desc = build_image(src, "v1", [64 * KiB, 128 * KiB], seed=81)
    blobs = image_blobs(src, str(desc.digest))
    client = blobflow.Client()
    await client.push(src, f"{registry.host}/{repo_name}/a:v1")

    result = await client.copy(f"{registry.host}/{repo_name}/a:v1", f"{registry.host}/{repo_name}/b:v1")

    assert (result.mounted, result.bytes, result.skipped) == (len(blobs), 0, 0)
    assert manifest_digest_at(registry, f"{repo_name}/b", "v1") == str(desc.digest)
    assert all(blob_status(registry, f"{repo_name}/b", d) == 200 for d in blobs)


async def test_a_later_job_mounts_what_an_earlier_one_pushed(registry: LocalRegistry, proxy: MakeProxy,
                                                             cli: Cli, repo_name: str, tmp_path: Path) -> None:
    """Two pushes, one process each, of images sharing a base layer into two repositories: the
    second mounts the base from the first's repository (a hint the first left in the state dir)
    instead of sending it again. The same holds for the re-run of a killed mirror."""
    src = tmp_path / "src"
    first = build_image(src, "a", [32 * KiB], seed=91, base_layers=[2 * MiB], base_seed=9)
    second = build_image(src, "b", [48 * KiB], seed=92, base_layers=[2 * MiB], base_seed=9)
    base = image_blobs(src, str(first.digest))[1]
    assert base == image_blobs(src, str(second.digest))[1]
    p = await proxy(registry)
    push = ("push", "--plain-http", "--state-dir", str(tmp_path / "state"), "--tag")
    pushed = await cli(*push, "a", str(src), f"{p.host}/{repo_name}/a:v1")
    assert pushed.returncode == 0, pushed.stderr
    before = len(p.log)

    pushed = await cli(*push, "b", str(src), f"{p.host}/{repo_name}/b:v1")

    assert pushed.returncode == 0, pushed.stderr
    assert "1 mounted" in pushed.stdout
    second_run = p.log[before:]
    assert ("POST", f"/v2/{repo_name}/b/blobs/uploads/?mount={base}&from={repo_name}/a", 201) in second_run
    assert base not in committed_blobs(second_run)
    assert manifest_digest_at(registry, f"{repo_name}/b", "v1") == str(second.digest)


@pytest.mark.parametrize("window", [False, True])
async def test_stale_mount_hints_cost_a_few_declined_mounts_and_the_blobs_are_sent(
        registry: LocalRegistry, proxy: MakeProxy, cli: Cli, repo_name: str, tmp_path: Path, window: bool) -> None:
    """Hints naming a repository that does not hold the blobs (a registry wiped since, a repository
    deleted): each mount tried is declined and the blob is uploaded; after HINT_MISSES declines in
    a row the job stops trying hints, and the push succeeds. The session a declined mount opens
    carries the upload, except where uploads have a window: it would start before admission."""
    src = tmp_path / "src"
    desc = build_image(src, "v1", [8 * KiB + i for i in range(8)], seed=93)
    blobs = image_blobs(src, str(desc.digest))
    p = await proxy(registry)
    state = tmp_path / "state"
    for blob in blobs:
        Journal(state).locations.add(p.host, Digest.parse(blob), f"{repo_name}/gone")

    # one blob at a time, so the count of mounts tried is exact
    pushed = await cli("push", "--plain-http", "--concurrency", "1", "--state-dir", str(state), str(src),
                       f"{p.host}/{repo_name}/x:v1", *(["--upload-window", "600"] if window else []))

    assert pushed.returncode == 0, pushed.stderr
    mounts = [(path, status) for method, path, status in p.log if method == "POST" and "mount=" in path]
    assert len(mounts) == HINT_MISSES < len(blobs)
    assert all(f"&from={repo_name}/gone" in path and status == 202 for path, status in mounts)
    # a declined mount's session carries the upload (one POST a blob, none deleted), but not
    # against a window: then it is deleted and the upload opens its own after admission
    declined = HINT_MISSES if window else 0
    assert (p.counters["requests:POST"], p.counters["requests:DELETE"]) == (len(blobs) + declined, declined)
    assert committed_blobs(p.log) == dict.fromkeys(blobs, 1)
    assert manifest_digest_at(registry, f"{repo_name}/x", "v1") == str(desc.digest)


async def test_a_declined_mount_gives_way_to_the_session_an_earlier_run_left(
        registry: LocalRegistry, proxy: MakeProxy, repo_name: str, tmp_path: Path) -> None:
    """The upload resumes the earlier run's session, from its offset; the session the declined
    mount opened is deleted, not left open on the registry."""
    data = os.urandom(6 * MiB)
    blob = tmp_path / "blob"
    blob.write_bytes(data)
    digest, repo = Digest.of(data), f"{repo_name}/x"
    p = await proxy(registry)
    state = tmp_path / "state"
    config = blobflow.EngineConfig(plain_http=True, state_dir=str(state))
    async with blobflow.registry.RegistryPool(connections_per_host=4, connect_timeout=5, read_timeout=30,
                                              plain_http=True) as pool:  # an earlier run, cut after 2 MiB
        client = pool.client(p.host, p.host, loopback=True)
        up = await client.start_upload(repo)
        await client.upload_chunk(up, data[:2 * MiB], 2 * MiB)
    record = Journal(state).upload(p.host, repo, digest, len(data))
    record.location, record.offset, record.opened_at = up.location, up.offset, time.time()
    record.save()
    record.release()
    Journal(state).locations.add(p.host, digest, f"{repo_name}/gone")  # a stale hint: the mount is declined
    before = len(p.log)

    await blobflow.Client(config).blob_put(blob, f"{p.host}/{repo}")

    run = p.log[before:]
    assert [m for m, path, status in run if m == "POST"] == ["POST"]  # the mount, declined; no new session
    assert [status for m, path, status in run if m == "DELETE"] == [204]  # its session, closed
    assert sum(1 for m, path, status in run if m == "PATCH") == 1
    assert p.counters["bytes_to_upstream"] == len(data)  # 2 MiB before, 4 MiB now: nothing twice
    assert committed_blobs(run) == {str(digest): 1}


async def test_blob_up_to_the_monolithic_threshold_goes_whole_in_one_put(
        registry: LocalRegistry, proxy: MakeProxy, repo_name: str, tmp_path: Path) -> None:
    """3 MiB: one POST and one PUT carrying every byte (and no warning from aiohttp, which the
    test settings turn into an error, about a large raw-bytes body)."""
    p = await proxy(registry)
    data = os.urandom(3 * 1024 * 1024)
    blob = tmp_path / "blob"
    blob.write_bytes(data)
    client = blobflow.Client(blobflow.EngineConfig(plain_http=True, state_dir=str(tmp_path / "state")))
    _, desc = await client.blob_put(blob, f"{p.host}/{repo_name}")
    assert (p.counters["requests:POST"], p.counters["requests:PUT"], p.counters["requests:PATCH"]) == (1, 1, 0)
    assert p.counters["bytes_to_upstream"] == len(data)
    out = tmp_path / "back"
    await client.blob_get(f"{registry.host}/{repo_name}@{desc.digest}", out)
    assert out.read_bytes() == data

"""The transfer engine against a real Distribution registry, with faults injected by a proxy in front of it.

Every test checks that its fault actually happened (the proxy's counters), so a test cannot pass
because the fault was never exercised.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from conftest import MakeProxy
from faultproxy import Faults

import blobflow
from blobflow.layout import Layout
from blobflow.localreg import LocalRegistry
from blobflow.synth import build_image
from blobflow.types import Descriptor

MiB = 1 << 20
LAYER = 6 * MiB
SMALL_LAYER = 64 << 10


def ranged_config(**overrides: object) -> blobflow.EngineConfig:
    """1 MiB parts for blobs of 2 MiB and more; fast backoff so retries do not dominate the runtime."""
    options: dict[str, object] = dict(part_size=MiB, range_threshold=2 * MiB, plain_http=True, backoff_base=0.01,
                                      backoff_cap=0.05)
    options.update(overrides)
    return blobflow.EngineConfig(**options)  # type: ignore[arg-type]


def image_blobs(root: Path, tag: str) -> tuple[Descriptor, list[Descriptor]]:
    """(config, layers) of the image tagged ``tag`` in the layout at ``root``."""
    layout = Layout.open(root)
    manifest = json.loads(layout.read_blob(layout.resolve(tag), limit=MiB))
    return (Descriptor.from_json(manifest["config"]), [Descriptor.from_json(x) for x in manifest["layers"]])


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(MiB):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


def blob_file(root: Path, desc: Descriptor) -> Path:
    return root / "blobs" / desc.digest.algorithm / desc.digest.hex


@pytest.fixture(autouse=True)
def state_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Resume journals go under the test's own directory, never the user's ~/.local/state."""
    state = tmp_path / "state"
    monkeypatch.setenv("XDG_STATE_HOME", str(state))
    return state


@pytest.fixture
async def pushed(registry: LocalRegistry, repo_name: str, tmp_path: Path) -> tuple[str, Descriptor]:
    """An image with a 6 MiB and a 64 KiB layer, pushed straight to the registry as ``<repo>:v1``.

    Returns (repository, the 6 MiB layer's descriptor).
    """
    src = tmp_path / "src"
    build_image(src, "v1", [LAYER, SMALL_LAYER], seed=1)
    await blobflow.Client().push(src, f"{registry.host}/{repo_name}:v1")
    _, layers = image_blobs(src, "v1")
    big = max(layers, key=lambda d: d.size)
    assert big.size > LAYER  # tar and gzip framing around the random bytes
    return repo_name, big


def blob_gets(log: list[tuple[str, str, int]], repo: str, desc: Descriptor) -> list[int]:
    """Statuses of the GETs of one blob, in the order the proxy saw them."""
    path = f"/v2/{repo}/blobs/{desc.digest}"
    return [status for method, path_qs, status in log if method == "GET" and path_qs == path]


def assert_pulled(root: Path, tag: str, layer: Descriptor) -> None:
    _, layers = image_blobs(root, tag)
    assert layer in layers
    for desc in layers:
        path = blob_file(root, desc)
        assert path.stat().st_size == desc.size
        assert sha256_file(path) == str(desc.digest)
    assert not leftovers(root)


def leftovers(root: Path) -> list[str]:
    return [name for name in os.listdir(root / "blobs" / "sha256") if name.endswith(".partial")]


async def test_pull_from_server_that_ignores_range(
    registry: LocalRegistry, proxy: MakeProxy, pushed: tuple[str, Descriptor], tmp_path: Path
) -> None:
    repo, layer = pushed
    front = await proxy(registry, Faults(ignore_range=True))
    dest = tmp_path / "pulled"
    result = await blobflow.Client(ranged_config()).pull(f"{front.host}/{repo}:v1", dest)
    assert front.counters["ignore_range"] >= 1  # a Range was asked for and stripped
    assert_pulled(dest, "v1", layer)
    assert result.images[0].blobs == 3
    # the layer came on one 200 stream, not fetched again part by part
    assert blob_gets(front.log, repo, layer) == [200]


@pytest.mark.parametrize("faulty_part", ["every_blob_get", "one_part_of_the_layer"])
async def test_digest_mismatch_commits_nothing(
    registry: LocalRegistry, proxy: MakeProxy, pushed: tuple[str, Descriptor], tmp_path: Path, faulty_part: str
) -> None:
    repo, layer = pushed
    third_part = f"bytes={2 * MiB}-{3 * MiB - 1}"
    if faulty_part == "every_blob_get":
        faults = Faults(wrong_bytes=1.0, match=lambda r: "blobs/sha256" in r.path and r.method == "GET")
    else:
        faults = Faults(wrong_bytes=1.0, match=lambda r: r.method == "GET" and r.headers.get("Range") == third_part)
    front = await proxy(registry, faults)
    dest = tmp_path / "pulled"
    Layout.create(dest)  # an existing layout: it stays, so what the failed pull left in it can be checked
    with pytest.raises(blobflow.DigestMismatchError):
        await blobflow.Client(ranged_config(retries=0)).pull(f"{front.host}/{repo}:v1", dest)
    assert front.counters["wrong_bytes"] >= 1
    assert not blob_file(dest, layer).exists()
    assert leftovers(dest) == []
    assert Layout.open(dest).images() == []  # no tag points at a half-pulled image
    if faulty_part == "every_blob_get":
        assert os.listdir(dest / "blobs" / "sha256") == []


async def test_ranged_download_uses_several_range_requests(
    registry: LocalRegistry, proxy: MakeProxy, pushed: tuple[str, Descriptor], tmp_path: Path
) -> None:
    repo, layer = pushed
    front = await proxy(registry)
    dest = tmp_path / "pulled"
    await blobflow.Client(ranged_config(parts_per_blob=4)).pull(f"{front.host}/{repo}:v1", dest)
    statuses = blob_gets(front.log, repo, layer)
    assert len(statuses) >= 3
    assert statuses == [206] * len(statuses)
    assert len(statuses) == -(-layer.size // MiB)  # one GET per 1 MiB part, none repeated
    assert_pulled(dest, "v1", layer)


async def test_copy_survives_cut_source_responses(
    registry: LocalRegistry, registry2: LocalRegistry, proxy: MakeProxy, pushed: tuple[str, Descriptor]
) -> None:
    repo, layer = pushed
    front = await proxy(registry, Faults(cut_response=0.5, seed=3))
    client = blobflow.Client(ranged_config(retries=12))
    result = await client.copy(f"{front.host}/{repo}:v1", f"{registry2.host}/copied:v2")
    assert front.counters["cut_response"] >= 1
    assert result.retries >= 1
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{registry2.url}/v2/copied/blobs/{layer.digest}") as resp:
            assert resp.status == 200
            body = await resp.read()
        assert len(body) == layer.size
        assert "sha256:" + hashlib.sha256(body).hexdigest() == str(layer.digest)
        async with session.head(f"{registry2.url}/v2/copied/manifests/v2",
                                headers={"Accept": "application/vnd.oci.image.manifest.v1+json"}) as resp:
            assert resp.status == 200
            assert resp.headers["Docker-Content-Digest"] == result.images[0].digest


async def test_ranged_pull_survives_cut_responses(
    registry: LocalRegistry, proxy: MakeProxy, pushed: tuple[str, Descriptor], tmp_path: Path
) -> None:
    repo, layer = pushed
    # only the layer's ranged GETs are cut (seed 3 cuts the first one drawn)
    faults = Faults(cut_response=0.5, seed=3, match=lambda r: r.method == "GET" and r.path.endswith(str(layer.digest)))
    front = await proxy(registry, faults)
    dest = tmp_path / "pulled"
    result = await blobflow.Client(ranged_config(retries=12)).pull(f"{front.host}/{repo}:v1", dest)
    assert front.counters["cut_response"] >= 1
    assert result.retries >= 1
    assert_pulled(dest, "v1", layer)
    statuses = blob_gets(front.log, repo, layer)
    assert set(statuses) <= {206, 0}  # every request for the layer was ranged, the retries too


async def test_push_survives_unavailable_commit(
    registry: LocalRegistry, proxy: MakeProxy, repo_name: str, tmp_path: Path
) -> None:
    src = tmp_path / "src"
    build_image(src, "v1", [SMALL_LAYER], seed=2)
    _, [layer] = image_blobs(src, "v1")
    failed: list[str] = []

    def first_commit_of_layer(request: web.Request) -> bool:
        """The monolithic PUT of the layer, the first time only: the registry still holds 0 bytes."""
        if request.method == "PUT" and request.query.get("digest") == str(layer.digest) and not failed:
            failed.append(request.path)
            return True
        return False

    front = await proxy(registry, Faults(status={503: 1.0}, match=first_commit_of_layer))
    client = blobflow.Client(ranged_config(concurrency=1))
    await client.push(src, f"{front.host}/{repo_name}:v1")
    assert front.counters["status:503"] == 1
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{registry.url}/v2/{repo_name}/blobs/{layer.digest}") as resp:
            assert resp.status == 200
            assert "sha256:" + hashlib.sha256(await resp.read()).hexdigest() == str(layer.digest)


async def test_a_source_blob_that_always_fails_is_asked_retries_plus_one_times(
    registry: LocalRegistry, registry2: LocalRegistry, proxy: MakeProxy, pushed: tuple[str, Descriptor]
) -> None:
    """A copy retries its source inside the destination's attempt (the upload goes on where the
    source broke). When those retries ran out, the destination's retry layer started them all
    over: (retries + 1)² GETs, 36 with the default 5, 26 s before the exit."""
    repo, layer = pushed
    front = await proxy(registry, Faults(status={500: 1.0}, match=lambda r: r.method == "GET"
                                         and r.path.endswith(str(layer.digest))))
    events: list[blobflow.Event] = []
    with pytest.raises(blobflow.RegistryError, match="500"):
        await blobflow.Client(ranged_config(retries=2), listener=events.append).copy(
            f"{front.host}/{repo}:v1", f"{registry2.host}/copied:v1")
    assert blob_gets(front.log, repo, layer) == [500] * 3
    # the failed event says why (its detail was empty)
    failed = [e.detail for e in events if e.kind == "failed" and e.digest == layer.digest.short]
    assert len(failed) == 1 and "500" in failed[0], failed


@pytest.mark.parametrize("mode", ["push", "copy"])
async def test_a_session_holding_every_byte_is_committed_by_the_next_run(
    mode: str, registry: LocalRegistry, registry2: LocalRegistry, proxy: MakeProxy, repo_name: str,
    tmp_path: Path
) -> None:
    """A run stopped after the blob's last byte reached the registry and before its commit (Ctrl-C
    there, or a commit answered 503 until the retries ran out) leaves a session holding the whole
    blob. The next run skipped the bytes the registry held without reading them, found none hashed
    and failed: "source ended after 0 of N bytes" (push: "the local file is corrupt"), every run
    after it too. It must hash them and send the commit alone."""
    src = tmp_path / "src"
    build_image(src, "v1", [6 * MiB], seed=63)
    _, [layer] = image_blobs(src, "v1")
    source = str(src)
    if mode == "copy":
        await blobflow.Client(ranged_config()).push(src, f"{registry.host}/{repo_name}:v1")
        source = f"{registry.host}/{repo_name}:v1"
    front = await proxy(registry2, Faults(status={503: 1.0}, match=lambda r: r.method == "PUT"
                                          and r.query.get("digest") == str(layer.digest)))
    client = blobflow.Client(ranged_config(retries=1, state_dir=str(tmp_path / "state")))
    run = client.push if mode == "push" else client.copy

    with pytest.raises(blobflow.RegistryError, match="503"):
        await run(source, f"{front.host}/{repo_name}:v1")
    sent = sum(method == "PATCH" for method, _, _ in front.log)
    assert sent >= 1
    front.faults.status = {}
    await run(source, f"{front.host}/{repo_name}:v1")

    assert sum(method == "PATCH" for method, _, _ in front.log) == sent  # no byte of it sent again
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{registry2.url}/v2/{repo_name}/blobs/{layer.digest}") as resp:
            assert resp.status == 200
            assert "sha256:" + hashlib.sha256(await resp.read()).hexdigest() == str(layer.digest)


@pytest.mark.parametrize("compress", [None, "zstd"], ids=["push", "push-zstd"])
async def test_bytes_sent_again_by_a_retry_are_not_counted_again(
    compress: str | None, registry: LocalRegistry, proxy: MakeProxy, repo_name: str, tmp_path: Path
) -> None:
    """Cut uploads are sent again. Each attempt's bytes were counted: Result.bytes (and the rate
    and final line with it) over the image's own figure, one blob's progress events at 400 % of
    its size. Progress is the furthest byte reached, so they add up to the blob."""
    src = tmp_path / "src"
    build_image(src, "v1", [3 * MiB, 6 * MiB], seed=64, compression="gzip")
    events: list[blobflow.Event] = []
    front = await proxy(registry, Faults(cut_request=0.4, seed=3, match=lambda r: r.method in ("PATCH", "PUT")))
    client = blobflow.Client(ranged_config(retries=12), listener=events.append)

    result = await client.push(src, f"{front.host}/{repo_name}:v1", compress=compress)

    assert front.counters["cut_request"] >= 1 and result.retries >= 1
    per_blob: collections.Counter[str] = collections.Counter()
    for e in events:
        if e.kind == "bytes":
            per_blob[e.digest] += e.n
    sizes = {e.digest: e.size for e in events if e.kind == "blob_start"}
    assert per_blob == sizes
    assert result.bytes == sum(sizes.values())

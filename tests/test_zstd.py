"""zstd layers: compress on push, recompress on copy, verified against the config's diff_ids.

Against the real Distribution registry; skopeo (containers/image, a tool nobody here wrote)
decompresses what blobflow pushed.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import subprocess
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import zstandard
from conftest import Cli, CliResult, MakeProxy
from faultproxy import FaultProxy

import blobflow
from blobflow.codec import Codec, CorruptStreamError, Recoder, layer_compression
from blobflow.layout import Layout
from blobflow.localreg import LocalRegistry
from blobflow.mirror import parse_plan
from blobflow.synth import build_image
from blobflow.transfer import RawManifest
from blobflow.transfer.convert import rewrite_manifests
from blobflow.types import Descriptor, Digest

KiB = 1024
ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
ACCEPT = ",".join(["application/vnd.oci.image.manifest.v1+json", "application/vnd.oci.image.index.v1+json",
                   "application/vnd.docker.distribution.manifest.v2+json"])


def skopeo(*args: str) -> None:
    proc = subprocess.run(["skopeo", *args], capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, f"skopeo {' '.join(args)} failed: {proc.stderr}"


def fetch(registry: LocalRegistry, path: str, method: str = "GET") -> tuple[int, bytes]:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    request = urllib.request.Request(f"{registry.url}/v2/{path}", method=method, headers={"Accept": ACCEPT})
    try:
        with opener.open(request, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        return e.code, b""


def fetch_json(registry: LocalRegistry, path: str) -> dict[str, Any]:
    status, body = fetch(registry, path)
    assert status == 200, path
    doc: dict[str, Any] = json.loads(body)
    return doc


def diff_ids(registry: LocalRegistry, repo: str, manifest: dict[str, Any]) -> list[str]:
    config = fetch_json(registry, f"{repo}/blobs/{manifest['config']['digest']}")
    return list(config["rootfs"]["diff_ids"])


def read_layout_json(root: Path, digest: str) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads((root / "blobs" / "sha256" / digest.removeprefix("sha256:")).read_bytes())
    return doc


def rewrite_image(root: Path, tag: str, *, layer: bytes | None = None, diff_id: str | None = None) -> None:
    """Replace the first layer's bytes (the descriptor follows them, so its digest is consistent)
    or the config's first diff_id; the manifest and the tag are rewritten to match."""
    layout = Layout.open(root)
    desc = layout.resolve(tag)
    manifest = read_layout_json(root, str(desc.digest))
    if layer is not None:
        manifest["layers"][0].update(digest=str(layout.write_blob(layer)), size=len(layer))
    if diff_id is not None:
        config = read_layout_json(root, manifest["config"]["digest"])
        config["rootfs"]["diff_ids"][0] = diff_id
        data = json.dumps(config).encode()
        manifest["config"].update(digest=str(layout.write_blob(data)), size=len(data))
    data = json.dumps(manifest, indent=2).encode()
    layout.set_tag(tag, Descriptor(desc.media_type, layout.write_blob(data), len(data)))


def test_recoder_round_trips_and_rejects_a_corrupt_gzip() -> None:
    tar = os.urandom(300 * KiB) + bytes(2 << 20)
    for source, blob in (("none", tar), ("gzip", gzip.compress(tar))):
        rec = Recoder(source, Codec.parse("zstd:5"))  # type: ignore[arg-type]
        out = b"".join(p for i in range(0, len(blob), 70_000) for p in rec.feed(blob[i:i + 70_000]))
        out += b"".join(rec.finish())
        assert zstandard.ZstdDecompressor().decompressobj().decompress(out) == tar
        assert rec.diff_id == Digest.of(tar) and rec.digest == Digest.of(out) and rec.out_size == len(out)
    broken = bytearray(gzip.compress(tar))
    broken[len(broken) // 2] ^= 0x40
    rec = Recoder("gzip", Codec.parse("zstd"))
    with pytest.raises(CorruptStreamError):
        for _ in rec.feed(bytes(broken)):
            pass
        list(rec.finish())
    assert layer_compression("application/vnd.docker.image.rootfs.diff.tar.gzip") == "gzip"
    assert layer_compression(ZSTD) == "zstd"
    with pytest.raises(blobflow.BadInputError):
        Codec.parse("zstd:99")


def test_docker_manifest_becomes_oci_with_zstd_layers() -> None:
    """Docker schema 2 has no zstd media type: the rewritten manifest is OCI (as skopeo does)."""
    layer = Descriptor("application/vnd.docker.image.rootfs.diff.tar.gzip", Digest.of(b"a"), 1)
    foreign = {"mediaType": "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
               "digest": str(Digest.of(b"f")), "size": 1, "urls": ["https://example.com/f"]}
    doc = {"schemaVersion": 2, "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
           "config": {"mediaType": "application/vnd.docker.container.image.v1+json",
                      "digest": str(Digest.of(b"c")), "size": 1},
           "layers": [layer.to_json(), foreign]}
    raw = RawManifest.parse_bytes(json.dumps(doc).encode())
    new = Descriptor(ZSTD, Digest.of(b"z"), 2)
    root, manifests = rewrite_manifests(raw, [raw], {layer.digest: new}, Codec.parse("zstd"))
    assert manifests == [root]
    out = root.doc
    assert root.media_type == out["mediaType"] == "application/vnd.oci.image.manifest.v1+json"
    assert out["config"]["mediaType"] == "application/vnd.oci.image.config.v1+json"
    assert out["layers"][0] == {"mediaType": ZSTD, "digest": str(new.digest), "size": 2}
    assert out["layers"][1]["mediaType"] == "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
    assert out["layers"][1]["urls"] == ["https://example.com/f"]
    # gzip keeps a Docker manifest Docker
    root, _ = rewrite_manifests(raw, [raw], {layer.digest: new}, Codec.parse("gzip"))
    assert root.media_type == doc["mediaType"]
    assert root.doc["layers"][0]["mediaType"] == "application/vnd.docker.image.rootfs.diff.tar.gzip"


async def test_push_compress_zstd_decompresses_to_the_diff_ids(registry: LocalRegistry, cli: Cli, repo_name: str,
                                                               tmp_path: Path) -> None:
    src, out = tmp_path / "src", tmp_path / "skopeo-dir"
    build_image(src, "v1", [64 * KiB, 700 * KiB], seed=7, base_layers=[3 * KiB], compression="none")
    image = f"{registry.host}/{repo_name}:v1"

    pushed = await cli("push", str(src), image, "--compress", "zstd", "--json")
    assert pushed.returncode == 0, pushed.stderr
    assert "3 layer(s) converted to zstd:3" in pushed.stdout

    manifest = fetch_json(registry, f"{repo_name}/manifests/v1")
    assert [x["mediaType"] for x in manifest["layers"]] == [ZSTD] * 3
    ids = diff_ids(registry, repo_name, manifest)
    skopeo("copy", "-q", "--src-tls-verify=false", "--dest-decompress", f"docker://{image}", f"dir:{out}")
    for diff in ids:
        data = (out / diff.removeprefix("sha256:")).read_bytes()
        assert Digest.of(data) == Digest.parse(diff)

    inspected = await cli("inspect", image)
    assert [x["compression"] for x in json.loads(inspected.stdout)["layers"]] == ["zstd"] * 3


async def test_copy_recompress_zstd_of_an_index(registry: LocalRegistry, registry2: LocalRegistry, cli: Cli,
                                                repo_name: str, tmp_path: Path) -> None:
    src = tmp_path / "src"
    build_image(src, "v1", [96 * KiB], seed=8, platforms=["linux/amd64", "linux/arm64"], base_layers=[40 * KiB])
    await blobflow.Client().push(src, f"{registry.host}/{repo_name}:v1")

    copied = await cli("copy", f"{registry.host}/{repo_name}:v1", f"{registry2.host}/{repo_name}:v1",
                       "--recompress", "zstd:6", "--json")
    assert copied.returncode == 0, copied.stderr
    assert "3 layer(s) converted to zstd:6" in copied.stdout  # the shared base layer once

    index = fetch_json(registry2, f"{repo_name}/manifests/v1")
    assert len(index["manifests"]) == 2
    for child in index["manifests"]:
        manifest = fetch_json(registry2, f"{repo_name}/manifests/{child['digest']}")
        assert child["size"] == len(json.dumps(manifest, indent=2).encode())
        assert [x["mediaType"] for x in manifest["layers"]] == [ZSTD, ZSTD]
        for layer, diff in zip(manifest["layers"], diff_ids(registry2, repo_name, manifest), strict=True):
            status, blob = fetch(registry2, f"{repo_name}/blobs/{layer['digest']}")
            assert status == 200 and len(blob) == layer["size"]
            tar = zstandard.ZstdDecompressor().decompressobj().decompress(blob)
            assert "sha256:" + hashlib.sha256(tar).hexdigest() == diff


async def test_one_platform_converted_is_not_taken_for_the_whole_index_converted(
        registry: LocalRegistry, registry2: LocalRegistry, repo_name: str, tmp_path: Path) -> None:
    """copy --recompress --platform linux/amd64, then copy --recompress of the whole index: the
    first root was stamped only "converted from the index", as a whole conversion is, so the
    second said "nothing to copy" and the tag kept one platform (found by a helper)."""
    src = tmp_path / "src"
    build_image(src, "v1", [32 * KiB], seed=68, platforms=["linux/amd64", "linux/arm64"])
    await blobflow.Client().push(src, f"{registry.host}/{repo_name}:v1")
    source, dest = f"{registry.host}/{repo_name}:v1", f"{registry2.host}/{repo_name}:v1"
    client = blobflow.Client()
    await client.copy(source, dest, platform="linux/amd64", recompress="zstd")
    assert not (await client.inspect(dest)).is_index

    await client.copy(source, dest, recompress="zstd")

    index = await client.inspect(dest)
    assert index.is_index and sorted(c.platform["architecture"] for c in index.children() if c.platform) == [
        "amd64", "arm64"]


async def test_recompressed_attestations_stay_attached_to_their_images(
    registry: LocalRegistry, registry2: LocalRegistry, repo_name: str, tmp_path: Path
) -> None:
    """buildx's SBOM and provenance name their image by digest (``vnd.docker.reference.digest``):
    converting the image changes that digest, and the attestations named images that were no
    longer in the index, where no tool would find them."""
    src = tmp_path / "src"
    build_image(src, "v1", [64 * KiB], seed=9, platforms=["linux/amd64", "linux/arm64"], attestations=True)
    client = blobflow.Client()
    await client.push(src, f"{registry.host}/{repo_name}:v1")
    await client.copy(f"{registry.host}/{repo_name}:v1", f"{registry2.host}/{repo_name}:v1", recompress="zstd")
    await client.push(src, f"{registry2.host}/{repo_name}:pushed", compress="zstd")
    source = fetch_json(registry, f"{repo_name}/manifests/v1")["manifests"]
    for tag in ("v1", "pushed"):
        children = fetch_json(registry2, f"{repo_name}/manifests/{tag}")["manifests"]
        images = {c["digest"]: c["platform"] for c in children if "annotations" not in c}
        attached = [images[c["annotations"]["vnd.docker.reference.digest"]] for c in children if "annotations" in c]
        assert sorted(map(str, attached)) == sorted(map(str, images.values())) and len(attached) == 2, children
        assert not set(images) & {c["digest"] for c in source}  # the images were converted: new digests


async def test_copy_recompress_again_finds_the_conversion_and_moves_nothing(
        registry: LocalRegistry, registry2: LocalRegistry, cli: Cli, proxy: MakeProxy, repo_name: str,
        tmp_path: Path) -> None:
    src = tmp_path / "src"
    build_image(src, "v1", [96 * KiB, 48 * KiB], seed=12)
    await blobflow.Client().push(src, f"{registry.host}/{repo_name}:v1")
    counted = await proxy(registry)
    source, dest = f"{counted.host}/{repo_name}:v1", f"{registry2.host}/{repo_name}:v1"

    first = await cli("copy", source, dest, "--recompress", "zstd:3")
    assert first.returncode == 0, first.stderr
    converted = fetch(registry2, f"{repo_name}/manifests/v1")[1]
    gets = counted.counters["blob_get"]
    assert gets >= 3  # the config and both layers, at least

    again = await cli("copy", source, dest, "--recompress", "zstd:3")
    assert again.returncode == 0, again.stderr
    assert "converted to zstd:3: nothing to copy" in again.output
    assert counted.counters["blob_get"] == gets  # not one blob read again
    assert fetch(registry2, f"{repo_name}/manifests/v1")[1] == converted

    other = await cli("copy", source, dest, "--recompress", "zstd:5")  # another level: another conversion
    assert other.returncode == 0, other.stderr
    assert counted.counters["blob_get"] > gets
    assert fetch(registry2, f"{repo_name}/manifests/v1")[1] != converted


async def test_push_compress_again_finds_the_conversion_and_uploads_nothing(
        registry: LocalRegistry, cli: Cli, proxy: MakeProxy, repo_name: str, tmp_path: Path) -> None:
    src = tmp_path / "src"
    build_image(src, "v1", [96 * KiB, 48 * KiB], seed=13)
    counted = await proxy(registry)
    dest = f"{counted.host}/{repo_name}:v1"
    first = await cli("push", str(src), dest, "--compress", "zstd:3")
    assert first.returncode == 0, first.stderr
    converted = fetch(registry, f"{repo_name}/manifests/v1")[1]
    uploads = counted.counters["uploads_started"]
    assert uploads >= 2  # both layers, converted

    again = await cli("push", str(src), dest, "--compress", "zstd:3")
    assert again.returncode == 0, again.stderr
    assert "converted to zstd:3: nothing to push" in again.output
    assert counted.counters["uploads_started"] == uploads  # nothing compressed or sent again
    assert fetch(registry, f"{repo_name}/manifests/v1")[1] == converted

    other = await cli("push", str(src), dest, "--compress", "zstd:5")  # another level: another conversion
    assert other.returncode == 0, other.stderr
    assert counted.counters["uploads_started"] > uploads
    assert fetch(registry, f"{repo_name}/manifests/v1")[1] != converted


async def test_a_rewritten_root_is_written_once_with_no_orphan_of_the_source_manifest(
        registry: LocalRegistry, registry2: LocalRegistry, cli: Cli, proxy: MakeProxy, repo_name: str,
        tmp_path: Path) -> None:
    """Converted layers or added annotations make a new root: the destination gets that one
    manifest, by tag, not also the source's (or a half-rewritten one) by digest."""
    src = tmp_path / "src"
    build_image(src, "v1", [64 * KiB], seed=31)
    await blobflow.Client().push(src, f"{registry.host}/{repo_name}:v1")
    counted = await proxy(registry2)
    for tag, extra in (("zstd", ["--recompress", "zstd:3"]), ("noted", ["--annotation", "org.example.note=hi"]),
                       ("both", ["--recompress", "zstd:3", "--annotation", "org.example.note=hi"])):
        before = len(counted.log)
        done = await cli("copy", f"{registry.host}/{repo_name}:v1", f"{counted.host}/{repo_name}:{tag}", *extra)
        assert done.returncode == 0, done.stderr
        puts = [path for method, path, _ in counted.log[before:] if method == "PUT" and "/manifests/" in path]
        assert puts == [f"/v2/{repo_name}/manifests/{tag}"], (tag, puts)


async def test_corrupt_gzip_source_aborts_before_any_manifest(registry: LocalRegistry, registry2: LocalRegistry,
                                                              cli: Cli, repo_name: str, tmp_path: Path) -> None:
    """A source layer whose digest is right but whose gzip stream is broken (the registry accepted it)."""
    src = tmp_path / "src"
    desc = build_image(src, "v1", [200 * KiB, 50 * KiB], seed=9)
    first = read_layout_json(src, str(desc.digest))["layers"][0]["digest"]
    broken = bytearray((src / "blobs" / "sha256" / first.removeprefix("sha256:")).read_bytes())
    broken[len(broken) // 2] ^= 0x01
    rewrite_image(src, "v1", layer=bytes(broken))
    await blobflow.Client().push(src, f"{registry.host}/{repo_name}:v1")  # moved as it is: digests hold

    copied = await cli("copy", f"{registry.host}/{repo_name}:v1", f"{registry2.host}/{repo_name}:v1",
                       "--recompress", "zstd")
    assert copied.returncode == 1, copied.stderr
    assert "gzip stream is corrupt" in copied.stderr
    assert fetch(registry2, f"{repo_name}/manifests/v1", "HEAD")[0] == 404


async def test_wrong_diff_id_aborts_the_push(registry: LocalRegistry, cli: Cli, repo_name: str,
                                             tmp_path: Path) -> None:
    src = tmp_path / "src"
    build_image(src, "v1", [80 * KiB], seed=10, compression="none")
    rewrite_image(src, "v1", diff_id="sha256:" + "0" * 64)

    pushed = await cli("push", str(src), f"{registry.host}/{repo_name}:v1", "--compress", "zstd")
    assert pushed.returncode == 1, pushed.stderr
    assert "diff_id" in pushed.stderr and "nothing of it was committed" in pushed.stderr
    assert fetch(registry, f"{repo_name}/manifests/v1", "HEAD")[0] == 404


async def test_a_layer_converted_for_two_repositories_of_a_registry_is_sent_once(
        registry: LocalRegistry, registry2: LocalRegistry, proxy: MakeProxy, tmp_path: Path) -> None:
    """Identical blobs move once in a job: without conversion the second repository mounts them.
    Converted, each repository had the layer converted and sent again (found by a helper)."""
    build_image(tmp_path / "src", "1.0", [64 * KiB, 48 * KiB], seed=70)
    await blobflow.Client().push(tmp_path / "src", f"{registry.host}/lib/twice:1.0")
    dest = await proxy(registry2)
    plan = parse_plan({"defaults": {"recompress": "zstd"}, "mirror": [
        {"source": f"{registry.host}/lib/twice", "destination": f"{dest.host}/a/twice", "tags": ["1.0"]},
        {"source": f"{registry.host}/lib/twice", "destination": f"{dest.host}/b/twice", "tags": ["1.0"]}]})

    result = await blobflow.Client().mirror(plan)

    assert not result.failed
    assert dest.counters["requests:PATCH"] == 2  # the two converted layers, once each
    mounts = [path for method, path, _ in dest.log if method == "POST" and "mount=" in path]
    assert len(mounts) >= 2
    a = await blobflow.Client().inspect(f"{dest.host}/a/twice:1.0")
    b = await blobflow.Client().inspect(f"{dest.host}/b/twice:1.0")
    assert a.digest == b.digest and [d.media_type for d in a.blobs()[1:]] == [ZSTD, ZSTD]


async def test_a_dry_run_with_recompress_says_what_the_run_does(
        registry: LocalRegistry, registry2: LocalRegistry, tmp_path: Path) -> None:
    """The dry run judged the source's gzip digests by HEAD: with the image already in another
    repository of the destination it said 0 blobs moved, 2 mounted, 0 bytes, where the run then
    converted and sent the layers (found by a helper)."""
    build_image(tmp_path / "src", "1.0", [64 * KiB, 48 * KiB], seed=71)
    await blobflow.Client().push(tmp_path / "src", f"{registry.host}/lib/dry:1.0")
    await blobflow.Client().push(tmp_path / "src", f"{registry2.host}/plain/dry:1.0")  # gzip, as it is
    plan = parse_plan({"defaults": {"recompress": "zstd"}, "mirror": [
        {"source": f"{registry.host}/lib/dry", "destination": f"{registry2.host}/z/dry", "tags": ["1.0"]}]})
    client = blobflow.Client()

    dry = (await client.mirror(plan, dry_run=True)).images[0]
    run = (await client.mirror(plan)).images[0]

    assert (dry.status, run.status) == ("would copy", "copied")
    assert (dry.blobs, dry.bytes, dry.skipped, dry.mounted) == (run.blobs, run.bytes, run.skipped, run.mounted)
    assert run.bytes >= (64 + 48) * KiB and run.mounted == 1  # the layers converted and sent, the config mounted


def statuses(mirror_output: str) -> list[str]:
    """Each image line's status: '  up to date  SRC -> DST' / '    copied  SRC -> DST  (...)'."""
    return [line.split("  ")[0].strip() or line.split()[0] for line in mirror_output.splitlines() if " -> " in line]


async def test_mirror_recompress_converts_every_image_of_the_plan(registry: LocalRegistry, registry2: LocalRegistry,
                                                                  cli: Cli, proxy: MakeProxy, tmp_path: Path) -> None:
    for t in range(2):
        build_image(tmp_path / f"img{t}", f"1.{t}", [64 * KiB], seed=20 + t, base_layers=[32 * KiB], base_seed=1)
        await blobflow.Client().push(tmp_path / f"img{t}", f"{registry.host}/lib/app:1.{t}")
    plan = tmp_path / "plan.toml"
    plan.write_text(f'[defaults]\nrecompress = "zstd:3"\n\n[[mirror]]\nsource = "{registry.host}/lib/app"\n'
                    f'destination = "{registry2.host}/mirror/app"\ntags = ["1.0", "1.1"]\n')
    report = tmp_path / "report.json"
    result = await cli("mirror", "--plain-http", str(plan), "--state-dir", str(tmp_path / "state"),
                       "--report", str(report))
    assert result.returncode == 0, result.output
    # converted layers count as moved, with their source sizes; the shared base layer once in the job
    sources = [fetch_json(registry, f"lib/app/manifests/1.{t}") for t in range(2)]
    distinct = {d["digest"]: d["size"] for m in sources for d in [m["config"], *m["layers"]]}
    images = json.loads(report.read_text())["images"]
    # blobs moved: the base layer with one image, shared by the other
    assert sorted((i["blobs"], i["shared"]) for i in images) == [(2, 1), (3, 0)]
    assert sum(i["bytes"] for i in images) == sum(distinct.values())
    for t in range(2):
        manifest = fetch_json(registry2, f"mirror/app/manifests/1.{t}")
        assert [x["mediaType"] for x in manifest["layers"]] == [ZSTD, ZSTD]
        for layer, diff in zip(manifest["layers"], diff_ids(registry2, "mirror/app", manifest), strict=True):
            status, blob = fetch(registry2, f"mirror/app/blobs/{layer['digest']}")
            assert status == 200
            tar = zstandard.ZstdDecompressor().decompressobj().decompress(blob)
            assert Digest.of(tar) == Digest.parse(diff)
        source = str(Digest.of(fetch(registry, f"lib/app/manifests/1.{t}")[1]))
        assert manifest["annotations"] == {"dev.blobflow.converted.from": source, "dev.blobflow.converted.to": "zstd:3"}

    # the next run finds both images up to date from their roots' annotations: no blob moves
    counted = await proxy(registry)
    plan.write_text(plan.read_text().replace(registry.host, counted.host))
    again = await cli("mirror", "--plain-http", str(plan), "--state-dir", str(tmp_path / "state"))
    assert again.returncode == 0, again.output
    assert statuses(again.stdout) == ["up to date", "up to date"] and counted.counters["blob_get"] == 0
    # another level is another conversion
    plan.write_text(plan.read_text().replace("zstd:3", "zstd:5"))
    other = await cli("mirror", "--plain-http", str(plan), "--state-dir", str(tmp_path / "state"))
    assert other.returncode == 0, other.output
    assert statuses(other.stdout) == ["copied", "copied"] and counted.counters["blob_get"] > 0

    bad = tmp_path / "bad.toml"
    bad.write_text(plan.read_text().replace("zstd:5", "brotli"))
    refused = await cli("mirror", "--plain-http", str(bad))
    assert refused.returncode == 2 and "recompress" in refused.stderr


async def _mirror_twice(cli: Cli, tmp_path: Path, source: str, destination: str, counted: FaultProxy,
                        entry: str = "") -> tuple[CliResult, CliResult, int]:
    """A recompressing plan of ``source``'s tag 1.0 run twice; both runs, and the GETs the second
    sent to the source (through ``counted``)."""
    plan = tmp_path / "plan.toml"
    plan.write_text(f'[defaults]\nrecompress = "zstd:3"\n\n[[mirror]]\nsource = "{source}"\n'
                    f'destination = "{destination}"\ntags = ["1.0"]\n{entry}\n')
    first = await cli("mirror", "--plain-http", str(plan), "--state-dir", str(tmp_path / "state"))
    assert first.returncode == 0, first.output
    gets = counted.counters["requests:GET"]
    again = await cli("mirror", "--plain-http", str(plan), "--state-dir", str(tmp_path / "state"))
    assert again.returncode == 0, again.output
    return first, again, counted.counters["requests:GET"] - gets


async def test_mirror_recompress_of_a_source_already_in_the_codec_is_up_to_date_next_time(
        registry: LocalRegistry, registry2: LocalRegistry, cli: Cli, proxy: MakeProxy, tmp_path: Path) -> None:
    """Nothing to convert: the destination gets the source as it is, and the next run finds it
    current from the destination alone, as it would without recompress (no GET at the source)."""
    build_image(tmp_path / "img", "1.0", [64 * KiB], seed=32)
    pushed = await cli("push", str(tmp_path / "img"), f"{registry.host}/lib/z:1.0", "--compress", "zstd:3")
    assert pushed.returncode == 0, pushed.stderr
    counted = await proxy(registry)
    first, again, gets = await _mirror_twice(cli, tmp_path, f"{counted.host}/lib/z", f"{registry2.host}/mirror/z",
                                             counted)
    assert statuses(first.stdout) == ["copied"]
    assert fetch(registry2, "mirror/z/manifests/1.0")[1] == fetch(registry, "lib/z/manifests/1.0")[1]
    assert statuses(again.stdout) == ["up to date"] and gets == 0


async def test_mirror_recompress_of_some_platforms_is_up_to_date_next_time(
        registry: LocalRegistry, registry2: LocalRegistry, cli: Cli, proxy: MakeProxy, tmp_path: Path) -> None:
    build_image(tmp_path / "img", "1.0", [48 * KiB], seed=33, platforms=["linux/amd64", "linux/arm64"])
    await blobflow.Client().push(tmp_path / "img", f"{registry.host}/lib/two:1.0")
    source = str(Digest.of(fetch(registry, "lib/two/manifests/1.0")[1]))
    counted = await proxy(registry)
    _, again, gets = await _mirror_twice(cli, tmp_path, f"{counted.host}/lib/two", f"{registry2.host}/mirror/two",
                                         counted, 'platforms = ["linux/arm64"]')
    index = fetch_json(registry2, "mirror/two/manifests/1.0")
    assert len(index["manifests"]) == 1
    assert index["annotations"] == {"dev.blobflow.converted.from": source, "dev.blobflow.converted.to": "zstd:3",
                                    "dev.blobflow.platforms.from": source, "dev.blobflow.platforms": "linux/arm64"}
    assert statuses(again.stdout) == ["up to date"] and gets == 0


async def test_a_mirror_of_a_converted_mirror_is_up_to_date_next_time(
        registry: LocalRegistry, registry2: LocalRegistry, cli: Cli, tmp_path: Path) -> None:
    """Site B mirrors site A's zstd mirror, one platform of it. The source's index carries A's
    record (converted from, converted to); B's copy carried it on beside its own (platforms from),
    so it never matched B's record, and every run copied again, never up to date."""
    build_image(tmp_path / "img", "1.0", [48 * KiB], seed=34, platforms=["linux/amd64", "linux/arm64"])
    await blobflow.Client().push(tmp_path / "img", f"{registry.host}/upstream/two:1.0", compress="zstd")
    a = fetch_json(registry, "upstream/two/manifests/1.0")
    assert "dev.blobflow.converted.to" in a["annotations"]  # site A's record
    source = str(Digest.of(fetch(registry, "upstream/two/manifests/1.0")[1]))
    plan = tmp_path / "plan.toml"
    plan.write_text(f'[[mirror]]\nsource = "{registry.host}/upstream/two"\n'
                    f'destination = "{registry2.host}/site-b/two"\ntags = ["1.0"]\nplatforms = ["linux/arm64"]\n')
    runs = [await cli("mirror", "--plain-http", str(plan), "--state-dir", str(tmp_path / "state")) for _ in range(2)]
    assert [r.returncode for r in runs] == [0, 0], runs[1].output
    assert statuses(runs[0].stdout) == ["copied"] and statuses(runs[1].stdout) == ["up to date"]
    index = fetch_json(registry2, "site-b/two/manifests/1.0")
    assert index["annotations"] == {"dev.blobflow.platforms.from": source, "dev.blobflow.platforms": "linux/arm64"}


async def test_a_plan_that_gains_recompress_converts_what_it_mirrored_as_it_was(
        registry: LocalRegistry, registry2: LocalRegistry, cli: Cli, tmp_path: Path) -> None:
    """The destination holds the source's own digest: current for a plain mirror, not for a plan
    that asks for zstd (``copy --recompress`` converts in the same case)."""
    build_image(tmp_path / "img", "1.0", [64 * KiB], seed=30)
    await blobflow.Client().push(tmp_path / "img", f"{registry.host}/lib/tool:1.0")
    plan = tmp_path / "plan.toml"
    plan.write_text(f'[[mirror]]\nsource = "{registry.host}/lib/tool"\ndestination = "{registry2.host}/mirror/tool"\n')
    plain = await cli("mirror", "--plain-http", str(plan), "--state-dir", str(tmp_path / "state"))
    assert plain.returncode == 0, plain.output
    assert statuses(plain.stdout) == ["copied"]
    assert fetch(registry2, "mirror/tool/manifests/1.0")[1] == fetch(registry, "lib/tool/manifests/1.0")[1]

    plan.write_text('[defaults]\nrecompress = "zstd:3"\n\n' + plan.read_text())
    gained = await cli("mirror", "--plain-http", str(plan), "--state-dir", str(tmp_path / "state"))
    assert gained.returncode == 0, gained.output
    assert statuses(gained.stdout) == ["copied"]
    manifest = fetch_json(registry2, "mirror/tool/manifests/1.0")
    assert [x["mediaType"] for x in manifest["layers"]] == [ZSTD]
    assert manifest["annotations"]["dev.blobflow.converted.to"] == "zstd:3"

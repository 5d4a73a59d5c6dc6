"""Interoperability with skopeo (containers/image): each tool reads what the other wrote.

skopeo talks to the same real Distribution registry; ``--tls-verify=false`` lets it use plain HTTP.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
from conftest import CheckLayout, Cli

import blobflow
from blobflow.localreg import LocalRegistry
from blobflow.synth import build_image

KiB = 1024
PLATFORMS = ["linux/amd64", "linux/arm64"]
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"


def skopeo(*args: str) -> str:
    proc = subprocess.run(["skopeo", *args], capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, f"skopeo {' '.join(args)} failed: {proc.stderr}"
    return proc.stdout


def read_json(layout: Path, digest: str) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads((layout / "blobs" / "sha256" / digest.removeprefix("sha256:")).read_bytes())
    return doc


def layer_digests(layout: Path, manifest_digest: str) -> list[str]:
    return [layer["digest"] for layer in read_json(layout, manifest_digest)["layers"]]


def all_layers(layout: Path, digest: str) -> set[str]:
    """Layer digests of a manifest, or of every manifest of an index."""
    doc = read_json(layout, digest)
    if "manifests" in doc:
        return {d for m in doc["manifests"] for d in layer_digests(layout, m["digest"])}
    return set(layer_digests(layout, digest))


@pytest.mark.parametrize("kind", ["manifest", "index"])
async def test_skopeo_reads_blobflow_push(kind: str, registry: LocalRegistry, check_layout: CheckLayout,
                                          repo_name: str, tmp_path: Path) -> None:
    src, copied = tmp_path / "src", tmp_path / "skopeo-layout"
    platforms = PLATFORMS if kind == "index" else []
    desc = build_image(src, "v1", [16 * KiB, 96 * KiB], seed=101, platforms=platforms, base_layers=[48 * KiB])
    image = f"{registry.host}/{repo_name}:v1"

    await blobflow.Client().push(src, image)

    inspected = json.loads(skopeo("inspect", "--tls-verify=false", f"docker://{image}"))
    assert inspected["Digest"] == str(desc.digest)
    amd64 = desc.digest if kind == "manifest" else next(
        m["digest"] for m in read_json(src, str(desc.digest))["manifests"]
        if m["platform"]["architecture"] == "amd64")
    assert (inspected["Os"], inspected["Architecture"]) == ("linux", "amd64")
    assert inspected["Layers"] == layer_digests(src, str(amd64))

    skopeo("copy", "-q", "--all", "--src-tls-verify=false", f"docker://{image}", f"oci:{copied}:v1")

    contents = check_layout(copied)
    assert contents.tags == {"v1": str(desc.digest)}  # skopeo kept blobflow's manifest bytes
    assert all_layers(copied, str(desc.digest)) == all_layers(src, str(desc.digest))


@pytest.mark.parametrize("variant", ["oci", "docker-v2s2", "oci-index"])
async def test_blobflow_pulls_skopeo_push(variant: str, registry: LocalRegistry, registry2: LocalRegistry,
                                          cli: Cli, check_layout: CheckLayout, repo_name: str,
                                          tmp_path: Path) -> None:
    """skopeo pushes (as OCI, or converted to Docker schema 2); blobflow pulls it and copies it on."""
    src, pulled = tmp_path / "src", tmp_path / "pulled"
    platforms = PLATFORMS if variant == "oci-index" else []
    desc = build_image(src, "v1", [32 * KiB, 128 * KiB], seed=111, platforms=platforms)
    image = f"{registry.host}/{repo_name}:v1"
    flags = {"oci": [], "docker-v2s2": ["--format", "v2s2"], "oci-index": ["--all"]}[variant]
    skopeo("copy", "-q", *flags, "--dest-tls-verify=false", f"oci:{src}:v1", f"docker://{image}")
    pushed = json.loads(skopeo("inspect", "--tls-verify=false", f"docker://{image}"))["Digest"]
    if variant != "docker-v2s2":
        assert pushed == str(desc.digest)
    raw = await blobflow.Client().inspect(image)
    assert raw.data.decode() == skopeo("inspect", "--raw", "--tls-verify=false", f"docker://{image}")
    assert str(raw.digest) == pushed

    result = await cli("pull", image, str(pulled))

    assert result.returncode == 0, result.stderr
    contents = check_layout(pulled)  # every blob's sha256 is its name, everything referenced is there
    assert contents.tags == {"v1": pushed}
    assert contents.files == contents.reachable
    assert all_layers(pulled, pushed) == all_layers(src, str(desc.digest))
    if variant == "docker-v2s2":
        assert contents.entries[0]["mediaType"] == DOCKER_MANIFEST
        assert read_json(pulled, pushed)["mediaType"] == DOCKER_MANIFEST

    copied = await blobflow.Client().copy(image, f"{registry2.host}/{repo_name}:v1")
    assert copied.images[0].digest == pushed
    assert json.loads(skopeo("inspect", "--tls-verify=false", f"docker://{registry2.host}/{repo_name}:v1"))[
        "Digest"] == pushed

"""Synthetic images: random, incompressible layers in an OCI layout (for demo, benches and tests).

Each layer is a real gzip'd tar holding one file of random bytes (gzip at level 0, so building a
1 GiB image is fast and the bytes stay incompressible); the config's ``diff_ids`` are the sha256
of the uncompressed tars, so the image is valid for any tool. Memory stays at one 4 MiB piece.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import secrets
import tarfile
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

from .layout import Layout
from .types import ATTESTATION, MEDIA_OCI_INDEX, MEDIA_OCI_MANIFEST, Descriptor, Digest

__all__ = ["MEDIA_LAYER_GZIP", "build_image", "random_blob"]

MEDIA_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
MEDIA_LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
MEDIA_CONFIG = "application/vnd.oci.image.config.v1+json"
_PIECE = 4 * 1024 * 1024


def _random_pieces(rng: random.Random, size: int) -> Iterator[bytes]:
    while size > 0:
        n = min(_PIECE, size)
        yield rng.randbytes(n)
        size -= n


def _write_layer(layout: Layout, rng: random.Random, size: int, name: str, *,
                 compression: Literal["none", "gzip"] = "gzip") -> tuple[Descriptor, Digest]:
    """A gzip'd (or plain) tar with one random file of ``size`` bytes; its descriptor and diff_id."""
    blobs = layout.root / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)
    tmp = blobs / f".synth-{secrets.token_hex(6)}.tmp"
    gz_hash, tar_hash = hashlib.sha256(), hashlib.sha256()
    comp: Any = zlib.compressobj(0, zlib.DEFLATED, 31) if compression == "gzip" else _Identity()  # wbits 31: gzip
    with open(tmp, "wb") as out:
        def emit(tar_bytes: bytes) -> None:
            tar_hash.update(tar_bytes)
            data = comp.compress(tar_bytes)
            gz_hash.update(data)
            out.write(data)

        info = tarfile.TarInfo(name)
        info.size, info.mode, info.mtime = size, 0o644, 0
        emit(info.tobuf(format=tarfile.PAX_FORMAT))
        for piece in _random_pieces(rng, size):
            emit(piece)
        pad = (-size) % tarfile.BLOCKSIZE
        emit(b"\0" * pad + b"\0" * (2 * tarfile.BLOCKSIZE))
        tail = comp.flush()
        gz_hash.update(tail)
        out.write(tail)
        out.flush()
        os.fsync(out.fileno())
        length = out.tell()
    digest = Digest("sha256", gz_hash.hexdigest())
    os.replace(tmp, layout.blob_path(digest))
    media_type = MEDIA_LAYER_GZIP if compression == "gzip" else MEDIA_LAYER_TAR
    return Descriptor(media_type, digest, length), Digest("sha256", tar_hash.hexdigest())


class _Identity:
    def compress(self, data: bytes) -> bytes:
        return data

    def flush(self) -> bytes:
        return b""


def random_blob(path: Path, size: int, *, seed: int | None = None) -> Digest:
    """A file of ``size`` random bytes; returns its digest."""
    rng = random.Random(seed if seed is not None else secrets.randbits(64))
    h = hashlib.sha256()
    with open(path, "wb") as f:
        for piece in _random_pieces(rng, size):
            h.update(piece)
            f.write(piece)
    return Digest("sha256", h.hexdigest())


def _image(layout: Layout, rng: random.Random, layer_sizes: Sequence[int], platform: tuple[str, str],
           base: list[tuple[Descriptor, Digest]], compression: Literal["none", "gzip"] = "gzip") -> Descriptor:
    layers = list(base)
    for i, size in enumerate(layer_sizes):
        layers.append(_write_layer(layout, rng, size, f"data/layer-{len(layers)}-{i}.bin", compression=compression))
    config = {
        "architecture": platform[1], "os": platform[0],
        "created": "2026-01-01T00:00:00Z",
        "config": {"Env": ["PATH=/usr/local/bin:/usr/bin:/bin"]},
        "rootfs": {"type": "layers", "diff_ids": [str(diff) for _, diff in layers]},
        "history": [{"created_by": "blobflow synth"} for _ in layers],
    }
    config_bytes = json.dumps(config, indent=2).encode()
    config_digest = layout.write_blob(config_bytes)
    manifest = {
        "schemaVersion": 2,
        "mediaType": MEDIA_OCI_MANIFEST,
        "config": {"mediaType": MEDIA_CONFIG, "digest": str(config_digest), "size": len(config_bytes)},
        "layers": [d.to_json() for d, _ in layers],
    }
    data = json.dumps(manifest, indent=2).encode()
    return Descriptor(MEDIA_OCI_MANIFEST, layout.write_blob(data), len(data),
                      platform={"os": platform[0], "architecture": platform[1]})


def _attestation(layout: Layout, subject: Descriptor) -> Descriptor:
    """An attestation manifest of ``subject`` as buildx writes one beside each platform's image
    (an in-toto statement layer; the index lists it as platform unknown/unknown)."""
    statement = json.dumps({"_type": "https://in-toto.io/Statement/v0.1",
                            "predicateType": "https://slsa.dev/provenance/v0.2",
                            "subject": [{"name": "synth", "digest": {"sha256": subject.digest.hex}}],
                            "predicate": {"builder": {"id": "blobflow synth"}}}).encode()
    config = json.dumps({"architecture": "unknown", "os": "unknown", "config": {},
                         "rootfs": {"type": "layers", "diff_ids": [str(Digest.of(statement))]}}).encode()
    manifest = {
        "schemaVersion": 2, "mediaType": MEDIA_OCI_MANIFEST,
        "config": {"mediaType": MEDIA_CONFIG, "digest": str(layout.write_blob(config)), "size": len(config)},
        "layers": [{"mediaType": "application/vnd.in-toto+json", "digest": str(layout.write_blob(statement)),
                    "size": len(statement),
                    "annotations": {"in-toto.io/predicate-type": "https://slsa.dev/provenance/v0.2"}}],
    }
    data = json.dumps(manifest, indent=2).encode()
    return Descriptor(MEDIA_OCI_MANIFEST, layout.write_blob(data), len(data),
                      annotations={"vnd.docker.reference.digest": str(subject.digest),
                                   "vnd.docker.reference.type": ATTESTATION},
                      platform={"os": "unknown", "architecture": "unknown"})


def build_image(root: Path | str, tag: str, layer_sizes: Sequence[int], *, seed: int | None = None,
                platforms: Sequence[str] = (), base_layers: Sequence[int] = (),
                base_seed: int | None = None, compression: Literal["none", "gzip"] = "gzip",
                attestations: bool = False) -> Descriptor:
    """Write an image tagged ``tag`` into the layout at ``root`` (created when missing).

    Without ``platforms`` the image is one linux/amd64 manifest. With platforms (``os/arch``) it
    is an index with one manifest per platform; ``base_layers`` are shared by all of them and
    ``layer_sizes`` are made anew for each. With ``base_seed`` the base layers come from their own
    generator, so images built with different seeds share them (as images on one base image do).
    ``compression="none"``: the layers are plain tars (``application/vnd.oci.image.layer.v1.tar``).
    ``attestations``: the index also lists an attestation manifest of each platform's image after
    the images, as buildx does.
    """
    layout = Layout.create(root)
    rng = random.Random(seed if seed is not None else secrets.randbits(64))
    base_rng = random.Random(base_seed) if base_seed is not None else rng
    base = [_write_layer(layout, base_rng, size, f"base/layer-{i}.bin", compression=compression)
            for i, size in enumerate(base_layers)]
    if not platforms:
        desc = _image(layout, rng, layer_sizes, ("linux", "amd64"), base, compression)
        desc = Descriptor(desc.media_type, desc.digest, desc.size)
    else:
        children = []
        for p in platforms:
            os_name, _, arch = p.partition("/")
            children.append(_image(layout, rng, layer_sizes, (os_name, arch), base, compression))
        if attestations:
            children += [_attestation(layout, c) for c in list(children)]
        index = {"schemaVersion": 2, "mediaType": MEDIA_OCI_INDEX, "manifests": [c.to_json() for c in children]}
        data = json.dumps(index, indent=2).encode()
        desc = Descriptor(MEDIA_OCI_INDEX, layout.write_blob(data), len(data))
    layout.set_tag(tag, desc)
    return desc

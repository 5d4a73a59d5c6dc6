"""The two ends of a transfer, behind one small interface: a registry repository or local files.

As in regclient's schemes, a registry and an OCI layout are interchangeable ends of one pipe;
:func:`blobflow.transfer.make_transfer` picks the blob mover for a pair of ends.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import LayoutError, ManifestError
from ..layout import BlobWriter, Layout
from ..registry import MAX_MANIFEST, RegistryClient
from ..types import ALL_MANIFEST_TYPES, INDEX_TYPES, MEDIA_OCI_MANIFEST, Descriptor, Digest

__all__ = ["FileEnd", "LayoutEnd", "RawManifest", "RegistryEnd", "StreamEnd"]


@dataclass(frozen=True, slots=True)
class RawManifest:
    """A manifest's exact bytes (its digest is over these bytes) and what they say."""

    data: bytes
    media_type: str
    digest: Digest

    @classmethod
    def parse_bytes(cls, data: bytes, media_type: str = "", digest: Digest | None = None) -> RawManifest:
        if len(data) > MAX_MANIFEST:
            raise ManifestError(f"manifest is {len(data)} bytes, over the 4 MiB limit")
        try:
            doc = json.loads(data)
        except (ValueError, UnicodeDecodeError):
            raise ManifestError("manifest is not valid JSON") from None
        if not isinstance(doc, dict):
            raise ManifestError("manifest is not a JSON object")
        declared = doc.get("mediaType")
        if not media_type or media_type not in ALL_MANIFEST_TYPES:
            if isinstance(declared, str) and declared in ALL_MANIFEST_TYPES:
                media_type = declared
            elif "manifests" in doc:
                media_type = "application/vnd.oci.image.index.v1+json"
            elif "layers" in doc and "config" in doc:
                media_type = MEDIA_OCI_MANIFEST
            else:
                raise ManifestError(f"unsupported manifest media type {media_type or declared!r}")
        return cls(data, media_type, digest or Digest.of(data))

    @property
    def doc(self) -> dict[str, Any]:
        out: dict[str, Any] = json.loads(self.data)
        return out

    @property
    def is_index(self) -> bool:
        return self.media_type in INDEX_TYPES

    def children(self) -> list[Descriptor]:
        """An index's manifests."""
        items = self.doc.get("manifests")
        if not isinstance(items, list):
            raise ManifestError(f"index {self.digest.short} has no manifests list")
        return [Descriptor.from_json(m) for m in items]

    def blobs(self) -> list[Descriptor]:
        """An image manifest's config and layers."""
        doc = self.doc
        layers = doc.get("layers")
        if "config" not in doc or not isinstance(layers, list):
            raise ManifestError(f"manifest {self.digest.short} lacks config or layers")
        return [Descriptor.from_json(doc["config"]), *(Descriptor.from_json(x) for x in layers)]

    def descriptor(self, **extra: Any) -> Descriptor:
        return Descriptor(self.media_type, self.digest, len(self.data), **extra)


class RegistryEnd:
    """A repository at a registry."""

    def __init__(self, client: RegistryClient, repository: str) -> None:
        self.client = client
        self.repository = repository

    @property
    def key(self) -> str:
        return f"registry:{self.client.registry}"

    @property
    def location(self) -> str:
        return self.repository

    def __str__(self) -> str:
        return f"{self.client.registry}/{self.repository}"

    async def fetch_manifest(self, reference: str) -> RawManifest:
        data, media_type, digest = await self.client.get_manifest(self.repository, reference)
        return RawManifest.parse_bytes(data, media_type, digest)

    async def fetch_child(self, desc: Descriptor) -> RawManifest:
        return await self.fetch_manifest(str(desc.digest))

    async def manifest_digest(self, reference: str) -> Digest | None:
        desc = await self.client.head_manifest(self.repository, reference)
        return desc.digest if desc else None

    async def has_blob(self, desc: Descriptor) -> bool:
        size = await self.client.head_blob(self.repository, desc.digest)
        return size is not None and (size == desc.size or size == 0)

    async def store_manifest(self, raw: RawManifest, tag: str | None) -> None:
        await self.client.put_manifest(self.repository, tag or str(raw.digest), raw.data, raw.media_type)


class LayoutEnd:
    """An OCI image layout on disk."""

    def __init__(self, layout: Layout) -> None:
        self.layout = layout

    @property
    def key(self) -> str:
        return f"layout:{self.layout.root.resolve()}"

    @property
    def location(self) -> str:
        return str(self.layout.root)

    def __str__(self) -> str:
        return f"oci:{self.layout.root}"

    async def fetch_manifest(self, reference: str | None) -> RawManifest:
        desc = self.layout.resolve(reference)
        return await self.fetch_child(desc)

    async def fetch_child(self, desc: Descriptor) -> RawManifest:
        data = self.layout.read_blob(desc, limit=MAX_MANIFEST)
        return RawManifest.parse_bytes(data, desc.media_type, desc.digest)

    async def manifest_digest(self, reference: str | None) -> Digest | None:
        try:
            return self.layout.resolve(reference).digest
        except Exception:
            return None

    async def has_blob(self, desc: Descriptor) -> bool:
        return self.layout.has_blob(desc)

    def source_path(self, desc: Descriptor) -> Path:
        path = self.layout.blob_path(desc.digest)
        if not path.exists():
            raise LayoutError(f"{self.layout.root}: blob {desc.digest} is missing from the layout")
        return path

    def blob_writer(self, desc: Descriptor) -> BlobWriter:
        return self.layout.blob_writer(desc)

    async def store_manifest(self, raw: RawManifest, tag: str | None) -> None:
        self.layout.write_blob(raw.data, raw.digest)

    def set_tag(self, tag: str | None, raw: RawManifest, *, annotations: dict[str, str] | None = None) -> None:
        self.layout.set_tag(tag, raw.descriptor(annotations=annotations))


class FileEnd:
    """A single blob as a plain file (``blob get`` / ``blob put``). Not ``resumable`` (a temporary
    spool file): a download into it keeps no record, leaves no partial file for a later run, and
    is not synced to the disk."""

    def __init__(self, path: Path, *, resumable: bool = True) -> None:
        self.path = path
        self.resumable = resumable

    @property
    def key(self) -> str:
        return f"file:{self.path.resolve()}"

    @property
    def location(self) -> str:
        return str(self.path)

    def __str__(self) -> str:
        return str(self.path)

    async def has_blob(self, desc: Descriptor) -> bool:
        return False

    def source_path(self, desc: Descriptor) -> Path:
        return self.path

    def blob_writer(self, desc: Descriptor) -> BlobWriter:
        return BlobWriter(self.path, desc.digest, desc.size, resumable=self.resumable, durable=self.resumable)


class StreamEnd:
    """A source of blobs made on the fly (the bench's synthetic data): ``open_blob(desc)`` gives an
    opener, ``opener(offset)`` the blob's bytes from ``offset`` on. A source only."""

    def __init__(self, name: str, open_blob: Callable[[Descriptor], Callable[[int], AsyncIterator[bytes]]]) -> None:
        self.name = name
        self.open_blob = open_blob

    @property
    def key(self) -> str:
        return f"stream:{self.name}"

    @property
    def location(self) -> str:
        return self.name

    def __str__(self) -> str:
        return f"stream:{self.name}"

    async def has_blob(self, desc: Descriptor) -> bool:
        return False


End = RegistryEnd | LayoutEnd | FileEnd | StreamEnd
ImageEnd = RegistryEnd | LayoutEnd
LocalEnd = LayoutEnd | FileEnd

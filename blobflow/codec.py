"""Layer compression: which codec, which media type, and streaming (de)compression. No I/O.

A :class:`Recoder` turns one layer's source bytes (uncompressed, gzip or zstd) into the target
codec's bytes piece by piece, hashing as it goes: the source (checked against the layer's digest),
the uncompressed tar (checked against the config's ``diff_id``) and the output (the new digest).

Memory per recoder, at most: ``PIECE`` of decompressed data in flight + the compressor's state
(gzip: ~256 KiB; zstd level <= 19 with ``ZSTD_THREADS`` workers: about
``(ZSTD_THREADS + 1) x job size + window``, job size = 4 x window, window <= 8 MiB: ~ 100 MiB
at the highest levels, ~ 26 MiB at the default level 3) + one source chunk.
A gzip source's output is drawn ``PIECE`` at a time, so a gzip bomb cannot inflate memory. A zstd
source (only read when converting zstd to gzip) is fed in ``ZSTD_FEED`` slices, and python-zstandard
has no output cap: one slice's output is ``ZSTD_FEED x`` the stream's ratio (a few MiB for real
layers; a crafted bomb could make it far more; not bounded, a known gap).
"""

from __future__ import annotations

import hashlib
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from .errors import BadInputError, TransferError
from .types import MEDIA_DOCKER_LIST, MEDIA_DOCKER_MANIFEST, MEDIA_OCI_INDEX, MEDIA_OCI_MANIFEST, Descriptor, Digest

__all__ = [
    "DOCKER_TO_OCI",
    "MEDIA_DOCKER_LAYER_GZIP",
    "MEDIA_LAYER_GZIP",
    "MEDIA_LAYER_TAR",
    "MEDIA_LAYER_ZSTD",
    "Codec",
    "CorruptStreamError",
    "Recoder",
    "compression_of",
    "convertible",
    "layer_compression",
]

Compression = Literal["none", "gzip", "zstd"]

MEDIA_LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
MEDIA_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
MEDIA_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
MEDIA_DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
MEDIA_DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
MEDIA_OCI_CONFIG = "application/vnd.oci.image.config.v1+json"

# distributable tar layers, by compression; everything else (foreign, non-distributable, non-tar)
# is copied as it is
_LAYER_COMPRESSION: dict[str, Compression] = {
    MEDIA_LAYER_TAR: "none",
    MEDIA_LAYER_GZIP: "gzip",
    MEDIA_LAYER_ZSTD: "zstd",
    MEDIA_DOCKER_LAYER_GZIP: "gzip",
}
# a Docker schema 2 manifest that gets zstd layers becomes an OCI manifest (Docker has no zstd type)
DOCKER_TO_OCI = {
    MEDIA_DOCKER_MANIFEST: MEDIA_OCI_MANIFEST,
    MEDIA_DOCKER_LIST: MEDIA_OCI_INDEX,
    MEDIA_DOCKER_CONFIG: MEDIA_OCI_CONFIG,
    MEDIA_DOCKER_LAYER_GZIP: MEDIA_LAYER_GZIP,
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip":
        "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
}

PIECE = 1 << 20          # decompressed bytes handed to the compressor at a time
ZSTD_FEED = 128 << 10    # zstd source bytes decoded at a time
ZSTD_THREADS = 2         # zstd compression workers per layer (0: compress in the calling thread)
_LEVELS = {"gzip": (1, 9, 6), "zstd": (1, 22, 3)}  # min, max, default


class CorruptStreamError(TransferError):
    """A layer's compressed stream cannot be decoded (never retryable: the bytes are wrong)."""


def compression_of(media_type: str) -> Compression | None:
    """The compression of a distributable tar layer; None for any other media type."""
    return _LAYER_COMPRESSION.get(media_type)


def layer_compression(media_type: str) -> str | None:
    """What a layer media type says of its compression, foreign and non-distributable layers
    included (``inspect``); None for what is not a tar layer."""
    if media_type.endswith(("+gzip", ".gzip")):
        return "gzip"
    if media_type.endswith(("+zstd", ".zstd")):
        return "zstd"
    return "none" if media_type.endswith(".tar") else None


def foreign(desc: Descriptor) -> bool:
    """A layer whose bytes live at its ``urls`` (Docker's foreign layers, OCI's non-distributable
    ones: old Windows base layers, licensed content): a registry need not hold it, and docker,
    skopeo and crane leave it where it is rather than copy it."""
    return bool((desc.extra or {}).get("urls")) and ("foreign" in desc.media_type
                                                     or "nondistributable" in desc.media_type)


def convertible(desc: Descriptor) -> bool:
    """A layer we may recompress: a distributable tar layer, not one fetched from other URLs."""
    return compression_of(desc.media_type) is not None and not (desc.extra or {}).get("urls")


@dataclass(frozen=True, slots=True)
class Codec:
    """A target compression: ``zstd[:LEVEL]`` or ``gzip[:LEVEL]``."""

    name: Literal["gzip", "zstd"]
    level: int

    def __post_init__(self) -> None:
        lo, hi, _ = _LEVELS[self.name]
        if not lo <= self.level <= hi:
            raise BadInputError(f"{self.name} level must be {lo}..{hi}, not {self.level}")

    @classmethod
    def parse(cls, text: str) -> Codec:
        name, sep, level = text.strip().lower().partition(":")
        if name not in _LEVELS:
            raise BadInputError(f"unknown compression {text!r}: expected zstd[:LEVEL] or gzip[:LEVEL]")
        if sep and not level.isdigit():
            raise BadInputError(f"invalid compression level in {text!r}: expected a whole number")
        return cls(name, int(level) if sep else _LEVELS[name][2])  # type: ignore[arg-type]

    def __str__(self) -> str:
        return f"{self.name}:{self.level}"

    def media_type(self, manifest_media_type: str) -> str:
        """The converted layer's media type in a manifest of ``manifest_media_type`` (after any
        Docker -> OCI change: see :meth:`manifest_type`)."""
        if self.name == "gzip" and manifest_media_type == MEDIA_DOCKER_MANIFEST:
            return MEDIA_DOCKER_LAYER_GZIP
        return MEDIA_LAYER_GZIP if self.name == "gzip" else MEDIA_LAYER_ZSTD

    def manifest_type(self, media_type: str) -> str:
        """The rewritten manifest's (or index's) type: Docker types become OCI ones for zstd."""
        return DOCKER_TO_OCI.get(media_type, media_type) if self.name == "zstd" else media_type

    def wants(self, desc: Descriptor) -> bool:
        """Whether the layer should be converted: convertible and not already in this codec."""
        return convertible(desc) and compression_of(desc.media_type) != self.name


class _Decoder(Protocol):
    def feed(self, data: bytes) -> Iterator[bytes]: ...
    def finish(self) -> None: ...


class _Plain:
    def feed(self, data: bytes) -> Iterator[bytes]:
        for i in range(0, len(data), PIECE):
            yield data[i:i + PIECE]

    def finish(self) -> None:
        pass


class _Gzip:
    """gzip, multi-member as Go's gzip reader, output drawn at most ``PIECE`` at a time."""

    def __init__(self) -> None:
        self._d: Any = zlib.decompressobj(31)
        self._started = False
        self._pending = False  # the last call filled PIECE: more output may be waiting

    def feed(self, data: bytes) -> Iterator[bytes]:
        try:
            while data or self._pending:
                if self._d.eof:
                    self._d = zlib.decompressobj(31)
                out = self._d.decompress(data, PIECE)
                self._started = True
                self._pending = len(out) == PIECE
                data = self._d.unused_data if self._d.eof else self._d.unconsumed_tail
                if out:
                    yield out
        except zlib.error as e:
            raise CorruptStreamError(f"gzip stream is corrupt ({e})") from None

    def finish(self) -> None:
        if not self._started or not self._d.eof:
            raise CorruptStreamError("gzip stream is truncated")


class _Zstd:
    def __init__(self) -> None:
        import zstandard  # imported when a job converts: every start would pay its 12 ms

        self._error = zstandard.ZstdError
        self._dctx = zstandard.ZstdDecompressor()
        self._d: Any = self._dctx.decompressobj()
        self._started = False

    def feed(self, data: bytes) -> Iterator[bytes]:
        try:
            for i in range(0, len(data), ZSTD_FEED):
                part = data[i:i + ZSTD_FEED]
                while part:
                    if self._d.eof:
                        self._d = self._dctx.decompressobj()
                    out = self._d.decompress(part)
                    self._started = True
                    part = self._d.unused_data if self._d.eof else b""
                    if out:
                        yield out
        except self._error as e:
            raise CorruptStreamError(f"zstd stream is corrupt ({e})") from None

    def finish(self) -> None:
        if not self._started or not self._d.eof:
            raise CorruptStreamError("zstd stream is truncated")


class _Encoder(Protocol):
    def compress(self, data: bytes) -> bytes: ...
    def flush(self) -> bytes: ...


def _encoder(codec: Codec) -> _Encoder:
    if codec.name == "gzip":
        enc: _Encoder = zlib.compressobj(codec.level, zlib.DEFLATED, 31)
        return enc
    import zstandard

    return zstandard.ZstdCompressor(level=codec.level, threads=ZSTD_THREADS).compressobj()


def _decoder(compression: Compression) -> _Decoder:
    if compression == "gzip":
        return _Gzip()
    return _Zstd() if compression == "zstd" else _Plain()


class Recoder:
    """One layer, source compression -> ``codec``, hashing the three streams as they pass.

    ``feed(chunk)`` yields output pieces (possibly empty: a compressor may hold bytes back), each
    the work of at most ``PIECE`` decompressed bytes, so a caller can run each step in a thread;
    ``finish()`` yields the tail and checks the source stream ended cleanly.
    """

    def __init__(self, source: Compression, codec: Codec) -> None:
        self._decoder = _decoder(source)
        self._encoder = _encoder(codec)
        self.media_type = codec.media_type("")  # of the output, in an OCI manifest
        self.source_hash, self.tar_hash, self.out_hash = hashlib.sha256(), hashlib.sha256(), hashlib.sha256()
        self.source_size = self.tar_size = self.out_size = 0

    def feed(self, chunk: bytes) -> Iterator[bytes]:
        self.source_hash.update(chunk)
        self.source_size += len(chunk)
        for piece in self._decoder.feed(chunk):
            self.tar_hash.update(piece)
            self.tar_size += len(piece)
            yield self._out(self._encoder.compress(piece))

    def finish(self) -> Iterator[bytes]:
        self._decoder.finish()
        yield self._out(self._encoder.flush())

    def _out(self, data: bytes) -> bytes:
        self.out_hash.update(data)
        self.out_size += len(data)
        return data

    @property
    def source_digest(self) -> Digest:
        return Digest("sha256", self.source_hash.hexdigest())

    @property
    def diff_id(self) -> Digest:
        return Digest("sha256", self.tar_hash.hexdigest())

    @property
    def digest(self) -> Digest:
        return Digest("sha256", self.out_hash.hexdigest())

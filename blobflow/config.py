"""Frozen settings: engine tuning and the per-registry limits table."""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from typing import Literal

from .errors import BadInputError

__all__ = ["KNOWN_LIMITS", "EngineConfig", "RegistryLimits", "limits_for", "parse_size"]

KiB, MiB, GiB = 1024, 1024**2, 1024**3
KB, MB, GB = 1000, 1000**2, 1000**3

_UNITS = {
    "": 1, "b": 1,
    "k": KB, "kb": KB, "kib": KiB,
    "m": MB, "mb": MB, "mib": MiB,
    "g": GB, "gb": GB, "gib": GiB,
    "t": 1000 * GB, "tb": 1000 * GB, "tib": 1024 * GiB,
}
_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*")


def parse_size(text: str) -> int:
    """``10GB`` -> 10_000_000_000, ``512MiB`` -> 536_870_912, ``4096`` -> 4096."""
    m = _SIZE.fullmatch(text)
    unit = _UNITS.get(m.group(2).lower()) if m else None
    if m is None or unit is None:
        raise BadInputError(f"invalid size {text!r}: use a number with an optional unit like 10GB or 512MiB")
    return int(float(m.group(1)) * unit)


@dataclass(frozen=True, slots=True)
class RegistryLimits:
    """What a registry refuses. ``None`` means no known limit."""

    max_layer_size: int | None = None
    upload_window: float | None = None
    window_scope: Literal["session", "request"] = "session"
    max_chunk: int | None = None
    streamed_patch: bool = True
    max_body: int | None = None
    token_lifetime: float | None = None
    source: str = ""


# One table, each entry with where it comes from (PRODUCT.md, "Registry limits known today").
KNOWN_LIMITS: dict[str, RegistryLimits] = {
    "ghcr.io": RegistryLimits(
        max_layer_size=10 * GB,
        upload_window=600.0,
        window_scope="session",
        max_chunk=4 * MiB,
        streamed_patch=True,
        token_lifetime=300.0,
        source=(
            "GitHub docs, 'Working with the Container registry': 10 GB per layer, 10 minute upload "
            "timeout; 4 MiB Content-Range chunk cap reported by ocx-sh/ocx#237 and rust-oci-client#37"
        ),
    ),
}


def limits_for(registry: str, *, max_layer_size: int | None = None,
               upload_window: float | None = None) -> RegistryLimits:
    """The built-in limits for ``registry``, with flag overrides applied."""
    base = KNOWN_LIMITS.get(registry, RegistryLimits())
    if max_layer_size is not None:
        base = replace(base, max_layer_size=max_layer_size)
    if upload_window is not None:
        base = replace(base, upload_window=upload_window)
    return base


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """Tuning of the transfer engine.

    Memory bound: blob bytes are never held whole. At most ``concurrency`` blobs move at once;
    a download holds up to ``parts_per_blob`` reads of ``read_size`` bytes, an upload or copy
    holds ``copy_buffer`` chunks of ``read_size`` bytes plus one ``read_size`` in flight, so
    blob data in memory stays below about
    ``concurrency * max(parts_per_blob, copy_buffer + 1) * read_size`` (8 * 9 * 1 MiB = 72 MiB
    with the defaults) whatever the blob sizes are.
    """

    concurrency: int = 8
    connections_per_host: int = 16
    part_size: int = 32 * MiB
    range_threshold: int = 48 * MiB
    parts_per_blob: int = 4
    chunk_size: int | None = None
    monolithic_threshold: int = 4 * MiB
    read_size: int = 1 * MiB
    copy_buffer: int = 8
    retries: int = 5
    backoff_base: float = 0.25
    backoff_cap: float = 20.0
    connect_timeout: float = 15.0
    read_timeout: float = 120.0
    plain_http: bool = False
    insecure: bool = False
    ca_file: str | None = None
    max_layer_size: int | None = None
    upload_window: float | None = None
    state_dir: str | None = None
    extra_limits: dict[str, RegistryLimits] = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        for name in ("concurrency", "connections_per_host", "part_size", "parts_per_blob", "read_size",
                     "copy_buffer"):
            if getattr(self, name) < 1:
                raise BadInputError(f"{name.replace('_', '-')} must be at least 1")
        if self.retries < 0:
            raise BadInputError("retries must be 0 or more")
        if self.chunk_size is not None and self.chunk_size < 1:
            raise BadInputError("chunk-size must be at least 1 byte")
        if self.upload_window is not None and self.upload_window <= 0:
            raise BadInputError("upload-window must be positive")

    def limits(self, registry: str) -> RegistryLimits:
        if registry in self.extra_limits:
            return self.extra_limits[registry]
        return limits_for(registry, max_layer_size=self.max_layer_size, upload_window=self.upload_window)

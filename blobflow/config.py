"""Frozen settings: engine tuning and the per-registry limits table."""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal

from .errors import BadInputError

__all__ = ["KNOWN_LIMITS", "NO_HOME", "EngineConfig", "RegistryLimits", "home_dir", "limits_for",
           "load_registry_limits", "parse_size"]

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
    if m is None or unit is None or len(m.group(1)) > 30:
        raise BadInputError(f"invalid size {text!r}: use a number with an optional unit like 10GB or 512MiB")
    whole, _, frac = m.group(1).partition(".")
    # exact integer arithmetic: no float rounding for byte counts, no overflow on long input
    return (int(whole) * unit) + (int(frac) * unit // 10 ** len(frac) if frac else 0)


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
               upload_window: float | None = None,
               window_scope: Literal["session", "request"] | None = None,
               table: dict[str, RegistryLimits] | None = None) -> RegistryLimits:
    """The limits for ``registry`` (from ``table``, else the built-in one), with flag overrides applied."""
    base = (table or {}).get(registry) or KNOWN_LIMITS.get(registry, RegistryLimits())
    if max_layer_size is not None:
        base = replace(base, max_layer_size=max_layer_size)
    if upload_window is not None:
        base = replace(base, upload_window=upload_window)
    if window_scope is not None:
        base = replace(base, window_scope=window_scope)
    return base


_SIZE_FIELDS = ("max_layer_size", "max_chunk", "max_body")
_SECONDS_FIELDS = ("upload_window", "token_lifetime")


def load_registry_limits(path: str | Path) -> dict[str, RegistryLimits]:
    """Per-registry overrides from a TOML file; each entry starts from the built-in table's::

        [registries."ghcr.io"]
        upload_window = 600          # seconds
        window_scope = "session"     # or "request"
        max_layer_size = "10GB"
        max_chunk = "4MiB"

    Flags (``--upload-window``, ``--max-layer-size``) still win over the file.
    """
    import tomllib  # only jobs given a limits file pay its import

    try:
        with open(path, "rb") as f:
            doc = tomllib.load(f)
    except OSError as e:
        raise BadInputError(f"cannot read registry limits {path}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise BadInputError(f"registry limits {path}: not valid TOML ({e})") from None
    registries = doc.get("registries", {})
    if not isinstance(registries, dict) or set(doc) - {"registries"}:
        raise BadInputError(f"registry limits {path}: expected only [registries.\"<host>\"] tables")
    known = {f.name for f in fields(RegistryLimits)} - {"source"}
    out: dict[str, RegistryLimits] = {}
    for host, entry in registries.items():
        if not isinstance(entry, dict):
            raise BadInputError(f"registry limits {path}: [registries.\"{host}\"] must be a table")
        unknown = set(entry) - known
        if unknown:
            raise BadInputError(f"registry limits {path}: unknown setting {sorted(unknown)[0]!r} for {host} "
                                f"(known: {', '.join(sorted(known))})")
        values: dict[str, Any] = {}
        for key, value in entry.items():
            values[key] = _limit_value(path, host, key, value)
        base = KNOWN_LIMITS.get(host, RegistryLimits())
        out[host] = replace(base, **values, source=f"{path}" + (f"; {base.source}" if base.source else ""))
    return out


def positive_finite(value: float) -> bool:
    """A count of seconds or of requests per second that means one: not 0, negative, nan or inf
    (``nan <= 0`` is false, so a plain sign check let nan through, and a deadline or a bench of
    nan seconds never came)."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def _limit_value(path: str | Path, host: str, key: str, value: Any) -> Any:
    where = f"registry limits {path}: {host} {key}"
    if key in _SIZE_FIELDS:
        if isinstance(value, bool) or not isinstance(value, int | str):
            raise BadInputError(f"{where}: expected a size like 10GB")
        try:
            size = parse_size(value) if isinstance(value, str) else value
        except BadInputError as e:  # "invalid size 'ten'" said neither the file nor the host
            raise BadInputError(f"{where}: {e}") from None
        if size < 1:
            raise BadInputError(f"{where}: must be positive")
        return size
    if key in _SECONDS_FIELDS:
        if isinstance(value, bool) or not isinstance(value, int | float) or not positive_finite(value):
            raise BadInputError(f"{where}: expected a positive number of seconds")
        return float(value)
    if key == "window_scope":
        if value not in ("session", "request"):
            raise BadInputError(f"{where}: expected \"session\" or \"request\"")
        return value
    if not isinstance(value, bool):  # streamed_patch
        raise BadInputError(f"{where}: expected true or false")
    return value


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """Tuning of the transfer engine.

    Memory bound: blob bytes are never held whole. At most ``concurrency`` blobs over 1 MiB move
    at once; a download holds up to ``parts_per_blob`` reads of ``read_size`` bytes, an upload or
    copy holds ``copy_buffer`` chunks of ``read_size`` bytes plus one ``read_size`` in flight, so
    blob data in memory stays below about
    ``concurrency * max(parts_per_blob, copy_buffer + 1) * read_size`` (8 * 9 * 1 MiB = 72 MiB
    with the defaults) whatever the blob sizes are, plus the small blobs (1 MiB at most) moving
    beside them in a lane of their own (``concurrency`` MiB). Mounts of a blob another repository
    of the registry already has go through that lane too; when a registry refuses one, the blob is
    moved from there, so in the worst case (every mount refused) the bound doubles. An upload from
    a file holds one read of ``file_read_size`` plus at most one more queued for the socket
    (8 * 2 * 4 MiB = 64 MiB): a file never makes the upload wait, so larger reads only save
    per-chunk work (thread hops, hash calls, socket writes); 1 GiB pushed went from 63 to 112 MiB
    peak RSS and ~0.3 s faster.
    """

    concurrency: int = 8
    connections_per_host: int = 16
    part_size: int = 32 * MiB
    range_threshold: int = 48 * MiB
    parts_per_blob: int = 4
    chunk_size: int | None = None
    monolithic_threshold: int = 4 * MiB
    read_size: int = 1 * MiB
    file_read_size: int = 4 * MiB
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
    rate: float | None = None  # requests per second per host (None: unlimited)
    extra_limits: dict[str, RegistryLimits] = field(default_factory=dict, compare=False, hash=False)
    # windowed destinations: admit, pace and fail uploads against their windows (blobflow.deadline);
    # False sends everything at once, as if no registry had a window
    deadline_tracking: bool = True
    window_scope: Literal["session", "request"] | None = None  # overrides every registry's, like upload_window
    # bytes the OS may hold unsent per connection (Linux's default tcp_wmem maximum): deadline
    # projections count that many of an upload's last bytes, plus one read, as not on the wire yet
    socket_buffer: int = 4 * MiB

    def __post_init__(self) -> None:
        # checked here, not only by the CLI's parsers: from the API, concurrency=1.5 broke the
        # scheduler mid-job, read_timeout=-5 timed out every request, max_layer_size="10GB" was a
        # TypeError at the first upload
        for name in ("concurrency", "connections_per_host", "part_size", "parts_per_blob", "read_size",
                     "file_read_size", "copy_buffer", "range_threshold", "monolithic_threshold", "retries",
                     "socket_buffer", "chunk_size", "max_layer_size"):
            value = getattr(self, name)
            least = 0 if name in ("retries", "socket_buffer", "range_threshold", "monolithic_threshold") else 1
            if value is None and name in ("chunk_size", "max_layer_size"):
                continue
            if type(value) is not int or value < least:
                raise BadInputError(f"{name.replace('_', '-')} must be a whole number of at least {least}, "
                                    f"not {value!r}")
        for name in ("connect_timeout", "read_timeout", "backoff_cap"):
            if not positive_finite(getattr(self, name)):
                raise BadInputError(f"{name.replace('_', '-')} must be a positive number of seconds")
        if not positive_finite(self.backoff_base) and self.backoff_base != 0:
            raise BadInputError("backoff-base must be 0 or a positive number of seconds")
        if self.state_dir is not None and not isinstance(self.state_dir, str | os.PathLike):
            raise BadInputError(f"state-dir must be a path, not {self.state_dir!r}")
        if self.upload_window is not None and not positive_finite(self.upload_window):
            raise BadInputError("upload-window must be a positive number of seconds")
        if self.rate is not None and not positive_finite(self.rate):
            raise BadInputError("rate must be a positive number of requests per second (None: no limit)")
        if self.window_scope not in (None, "session", "request"):
            raise BadInputError("window-scope must be 'session' or 'request'")

    def limits(self, registry: str) -> RegistryLimits:
        """``extra_limits`` (a limits file) over the built-in table, flags over both."""
        return limits_for(registry, max_layer_size=self.max_layer_size, upload_window=self.upload_window,
                          window_scope=self.window_scope, table=self.extra_limits)


NO_HOME = "no home directory ($HOME is not set and the user has no passwd entry)"


def home_dir() -> Path | None:
    """The user's home directory; None without ``$HOME`` and a passwd entry (a container run as a
    uid its image does not know), where ``Path.home()`` raises."""
    try:
        return Path.home()
    except RuntimeError:
        return None

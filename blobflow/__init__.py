"""blobflow: fast, verified, resumable transfers of container-image blobs to and from OCI registries.

    import asyncio, blobflow

    async def main() -> None:
        client = blobflow.Client(blobflow.EngineConfig(concurrency=8))
        result = await client.copy("ghcr.io/org/app:1.0", "registry.example.com/app:1.0")
        print(result.bytes, result.seconds, result.skipped, result.mounted)

    asyncio.run(main())
"""

from typing import TYPE_CHECKING, Any

from .config import EngineConfig, RegistryLimits, parse_size
from .errors import (
    AuthError,
    BadInputError,
    BlobflowError,
    ConnectError,
    DeadlineError,
    DigestMismatchError,
    InvalidDigestError,
    InvalidReferenceError,
    LayoutError,
    LimitExceededError,
    ManifestError,
    NotFoundError,
    RegistryError,
    TransferError,
)
from .progress import Event, Stats
from .types import Descriptor, Digest, Reference

if TYPE_CHECKING:
    from .api import Client, ImageResult, Platform, Result
    from .mirror import ImageReport, MirrorPlan, MirrorResult
    from .registry import Credentials

    Engine = Client

_LAZY = {"Client": ("api", "Client"), "Engine": ("api", "Client"), "ImageResult": ("api", "ImageResult"),
         "Platform": ("api", "Platform"), "Result": ("api", "Result"), "Credentials": ("registry", "Credentials"),
         "MirrorPlan": ("mirror", "MirrorPlan"), "MirrorResult": ("mirror", "MirrorResult"),
         "ImageReport": ("mirror", "ImageReport")}


def __getattr__(name: str) -> Any:
    """The client, its inputs and its results, imported on first use: they bring in aiohttp, which
    costs most of a process start, and ``blobflow --help`` or ``--version`` never needs it."""
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(f".{module}", __name__), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = [
    "AuthError",
    "BadInputError",
    "BlobflowError",
    "Client",
    "ConnectError",
    "Credentials",
    "DeadlineError",
    "Descriptor",
    "Digest",
    "DigestMismatchError",
    "Engine",
    "EngineConfig",
    "Event",
    "ImageReport",
    "ImageResult",
    "InvalidDigestError",
    "InvalidReferenceError",
    "LayoutError",
    "LimitExceededError",
    "ManifestError",
    "MirrorPlan",
    "MirrorResult",
    "NotFoundError",
    "Platform",
    "Reference",
    "RegistryError",
    "RegistryLimits",
    "Result",
    "Stats",
    "TransferError",
    "parse_size",
]

__version__ = "0.1.0"

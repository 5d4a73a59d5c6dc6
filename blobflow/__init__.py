"""blobflow: fast, verified, resumable transfers of container-image blobs to and from OCI registries.

    import asyncio, blobflow

    async def main() -> None:
        client = blobflow.Client(blobflow.EngineConfig(concurrency=8))
        result = await client.copy("ghcr.io/org/app:1.0", "registry.example.com/app:1.0")
        print(result.bytes, result.seconds, result.skipped, result.mounted)

    asyncio.run(main())
"""

from .api import Client, ImageResult, Platform, Result
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

Engine = Client

__all__ = [
    "AuthError",
    "BadInputError",
    "BlobflowError",
    "Client",
    "ConnectError",
    "DeadlineError",
    "Descriptor",
    "Digest",
    "DigestMismatchError",
    "Engine",
    "EngineConfig",
    "Event",
    "ImageResult",
    "InvalidDigestError",
    "InvalidReferenceError",
    "LayoutError",
    "LimitExceededError",
    "ManifestError",
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

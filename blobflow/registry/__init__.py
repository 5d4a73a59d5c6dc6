"""Talking to registries: the only package that imports aiohttp."""

from .auth import Challenge, parse_challenges
from .client import MAX_MANIFEST, BlobStream, RegistryClient, RegistryPool, Upload, open_session
from .credentials import Credentials, erase_credentials, load_credentials, store_credentials

__all__ = [
    "MAX_MANIFEST",
    "BlobStream",
    "Challenge",
    "Credentials",
    "RegistryClient",
    "RegistryPool",
    "Upload",
    "erase_credentials",
    "load_credentials",
    "open_session",
    "parse_challenges",
    "store_credentials",
]

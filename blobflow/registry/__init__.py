"""Talking to registries: the only package that imports aiohttp."""

from .auth import Challenge, Credentials, load_credentials, parse_challenges
from .client import MAX_MANIFEST, BlobStream, RegistryClient, RegistryPool, Upload, open_session

__all__ = [
    "MAX_MANIFEST",
    "BlobStream",
    "Challenge",
    "Credentials",
    "RegistryClient",
    "RegistryPool",
    "Upload",
    "load_credentials",
    "open_session",
    "parse_challenges",
]

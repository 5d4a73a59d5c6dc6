"""The exception tree.

Everything blobflow raises on purpose derives from :class:`BlobflowError`::

    BlobflowError
    ├── BadInputError            exit 2: unparsable reference or digest, unreadable layout, bad flag
    │   ├── InvalidReferenceError
    │   ├── InvalidDigestError
    │   ├── LayoutError
    │   ├── ManifestError        not JSON, too large, unknown media type
    │   └── LimitExceededError   a layer over the destination's size limit (refused before sending)
    ├── AuthError                exit 2: missing or rejected credentials, missing permission
    ├── NotFoundError            exit 1: manifest or blob unknown at the registry (also a LookupError)
    ├── RegistryError            exit 1: the registry answered with an error (code, message, status)
    └── TransferError            exit 1: a transfer failed after its retries
        ├── ConnectError         the registry could not be reached (also an OSError)
        ├── DigestMismatchError  bytes did not match their digest or size
        └── DeadlineError        an upload cannot finish inside its registry's window (never retried)

Library errors also inherit the stdlib type where one fits, so ordinary ``except`` clauses keep
working (as aiohttp does). No aiohttp exception escapes ``blobflow.registry``.
"""

from __future__ import annotations

import json

__all__ = [
    "AuthError",
    "BadInputError",
    "BlobflowError",
    "ConnectError",
    "DeadlineError",
    "DigestMismatchError",
    "InvalidDigestError",
    "InvalidReferenceError",
    "LayoutError",
    "LimitExceededError",
    "ManifestError",
    "NotFoundError",
    "RegistryError",
    "TransferError",
    "unreadable",
]


class BlobflowError(Exception):
    """Root of every error blobflow raises on purpose."""

    exit_code = 1
    retryable = False


class BadInputError(BlobflowError, ValueError):
    exit_code = 2


class InvalidReferenceError(BadInputError):
    pass


class InvalidDigestError(BadInputError):
    pass


class LayoutError(BadInputError):
    pass


class ManifestError(BadInputError):
    pass


class LimitExceededError(BadInputError):
    pass


class RegistryError(BlobflowError):
    """The registry answered with an error.

    ``code`` and ``message`` come from the distribution-spec error body (``{"errors": [...]}``)
    when there is one; ``status`` is the HTTP status.
    """

    def __init__(self, message: str, *, status: int = 0, code: str = "", detail: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.detail = detail

        self.retryable = status in RETRYABLE_STATUS
        self.retry_after: float | None = None


RETRYABLE_STATUS = frozenset({408, 429, 500, 502, 503, 504})


class AuthError(RegistryError, PermissionError):
    exit_code = 2


class NotFoundError(RegistryError, LookupError):
    pass


class TransferError(BlobflowError):
    """A transfer failed. ``retryable`` says whether trying again may help (resets, timeouts)."""

    def __init__(self, message: str, *, retryable: bool = False) -> None:
        super().__init__(message)
        self.retryable = retryable


class ConnectError(TransferError, OSError):
    pass


class DigestMismatchError(TransferError):
    pass


class DeadlineError(TransferError):
    """An upload cannot finish inside its registry's upload window, so it was stopped early.

    ``rate`` is the measured throughput to the registry and ``required`` the rate the upload would
    need (bytes per second; ``rate`` is 0.0 when none was measured yet). Never retryable by
    default: a new attempt would open a new session and run out of time the same way.
    """

    def __init__(self, message: str, *, retryable: bool = False, digest: str = "", size: int = 0,
                 rate: float = 0.0, required: float = 0.0) -> None:
        super().__init__(message, retryable=retryable)
        self.digest = digest
        self.size = size
        self.rate = rate
        self.required = required


def unreadable(e: OSError | ValueError) -> str:
    """Why a JSON file of the user's (a layout's, docker's config) could not be read, in words:
    where its JSON breaks, or the OS's reason. Never its content: it may hold secrets."""
    if isinstance(e, json.JSONDecodeError):
        return f"is not valid JSON ({e.msg} at line {e.lineno} column {e.colno})"
    if isinstance(e, UnicodeDecodeError):
        return "is not UTF-8 text"
    if isinstance(e, OSError):
        return f"is unreadable: {e.strerror or type(e).__name__}"
    return f"is unreadable: {type(e).__name__}"

"""Values that flow through blobflow: digests, descriptors, image references."""

from __future__ import annotations

import hashlib
import ipaddress
import re
from dataclasses import dataclass, field
from typing import Any

from .errors import InvalidDigestError, InvalidReferenceError, ManifestError

__all__ = [
    "MEDIA_DOCKER_LIST",
    "MEDIA_DOCKER_MANIFEST",
    "MEDIA_OCI_INDEX",
    "MEDIA_OCI_MANIFEST",
    "Descriptor",
    "Digest",
    "Reference",
]

MEDIA_OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_OCI_INDEX = "application/vnd.oci.image.index.v1+json"
MEDIA_DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
MEDIA_DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
INDEX_TYPES = frozenset({MEDIA_OCI_INDEX, MEDIA_DOCKER_LIST})
MANIFEST_TYPES = frozenset({MEDIA_OCI_MANIFEST, MEDIA_DOCKER_MANIFEST})
ALL_MANIFEST_TYPES = INDEX_TYPES | MANIFEST_TYPES

_HEX_LEN = {"sha256": 64, "sha512": 128}


@dataclass(frozen=True, slots=True)
class Digest:
    """``algorithm:hex``, validated so that no path is ever built from a bad string."""

    algorithm: str
    hex: str

    def __post_init__(self) -> None:
        want = _HEX_LEN.get(self.algorithm)
        if want is None:
            raise InvalidDigestError(f"unsupported digest algorithm {self.algorithm!r}")
        if len(self.hex) != want or not all(c in "0123456789abcdef" for c in self.hex):
            raise InvalidDigestError(f"invalid {self.algorithm} digest: expected {want} lowercase hex digits")

    @classmethod
    def parse(cls, text: str) -> Digest:
        if not isinstance(text, str) or ":" not in text:
            raise InvalidDigestError(f"invalid digest {str(text)[:80]!r}: expected algorithm:hex")
        algorithm, _, hexpart = text.partition(":")
        try:
            return cls(algorithm, hexpart)
        except InvalidDigestError as e:
            raise InvalidDigestError(f"invalid digest {text[:80]!r}: {e}") from None

    @classmethod
    def of(cls, data: bytes) -> Digest:
        return cls("sha256", hashlib.sha256(data).hexdigest())

    def hasher(self) -> Any:
        return hashlib.new(self.algorithm)

    def __str__(self) -> str:
        return f"{self.algorithm}:{self.hex}"

    @property
    def short(self) -> str:
        return f"{self.algorithm}:{self.hex[:12]}"


ATTESTATION = "attestation-manifest"


@dataclass(frozen=True, slots=True)
class Descriptor:
    """An OCI content descriptor: what a manifest says about one blob or manifest."""

    media_type: str
    digest: Digest
    size: int
    annotations: dict[str, str] | None = field(default=None, compare=False, hash=False)
    platform: dict[str, Any] | None = field(default=None, compare=False, hash=False)
    extra: dict[str, Any] | None = field(default=None, compare=False, hash=False)

    @classmethod
    def from_json(cls, obj: Any) -> Descriptor:
        if not isinstance(obj, dict):
            raise ManifestError("descriptor is not a JSON object")
        try:
            media_type = obj.get("mediaType", "")
            size = obj["size"]
            digest = Digest.parse(obj["digest"])
        except KeyError as e:
            raise ManifestError(f"descriptor lacks {e.args[0]!r}") from None
        if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size < 1 << 63:  # the spec's int64
            raise ManifestError(f"descriptor of {digest.short} has an invalid size {size!r}")
        if not isinstance(media_type, str):
            raise ManifestError("descriptor mediaType is not a string")
        known = {"mediaType", "size", "digest", "annotations", "platform"}
        extra = {k: v for k, v in obj.items() if k not in known} or None
        return cls(media_type, digest, size, obj.get("annotations"), obj.get("platform"), extra)

    @property
    def attests(self) -> Digest | None:
        """The image an index's entry is an attestation of (buildx's SBOM and provenance manifests,
        ``vnd.docker.reference.*`` annotations), or None when it is not one."""
        notes = self.annotations if isinstance(self.annotations, dict) else {}
        if notes.get("vnd.docker.reference.type") != ATTESTATION:
            return None
        try:
            return Digest.parse(notes.get("vnd.docker.reference.digest", ""))
        except InvalidDigestError:
            return None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"mediaType": self.media_type, "digest": str(self.digest), "size": self.size}
        if self.extra:
            out.update(self.extra)
        if self.annotations:
            out["annotations"] = self.annotations
        if self.platform:
            out["platform"] = self.platform
        return out


DEFAULT_REGISTRY = "docker.io"
_DOCKER_HUB_ENDPOINT = "registry-1.docker.io"
_MAX_NAME = 255  # docker's limit on registry/repository
_REPO_COMPONENT = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*")
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
_HOST = re.compile(r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?\.)*[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?")


def is_repository(name: str) -> bool:
    """``name`` is a repository path (``library/alpine``) as references spell it."""
    return bool(name) and len(name) <= _MAX_NAME and all(_REPO_COMPONENT.fullmatch(p) for p in name.split("/"))


@dataclass(frozen=True, slots=True)
class Reference:
    """``[registry[:port]/]repo[:tag][@digest]``, normalised as docker does."""

    registry: str
    repository: str
    tag: str | None = None
    digest: Digest | None = None

    @classmethod
    def parse(cls, text: str | Reference, *, default_tag: str | None = "latest") -> Reference:
        if isinstance(text, Reference):
            text = str(text)
        elif not isinstance(text, str):
            raise InvalidReferenceError(f"an image reference is a string like registry/repo:tag, "
                                        f"not a {type(text).__name__}")
        orig = text
        if not text or any(c.isspace() for c in text):
            raise InvalidReferenceError(f"invalid reference {orig!r}: empty or contains whitespace")
        digest: Digest | None = None
        if "@" in text:
            text, _, dig = text.partition("@")
            if "/" in dig and "/" not in text and not dig.startswith(("sha256:", "sha512:")):
                # user:password@host/repo, as in a URL: never say the password back
                raise InvalidReferenceError(f"invalid reference '***@{dig}': an image reference has no "
                                            "user or password; log in first: blobflow login REGISTRY")
            try:
                digest = Digest.parse(dig)
            except InvalidDigestError as e:
                raise InvalidReferenceError(f"invalid reference {orig!r}: {e}") from None
        registry, rest = DEFAULT_REGISTRY, text
        first, sep, remainder = text.partition("/")
        if sep and ("." in first or ":" in first or first == "localhost" or first.startswith("[")):
            registry, rest = first, remainder
        tag: str | None = None
        name = rest
        if ":" in rest.rsplit("/", 1)[-1]:
            name, _, tag = rest.rpartition(":")
            if not _TAG.fullmatch(tag):
                raise InvalidReferenceError(f"invalid reference {orig!r}: bad tag {tag!r}")
        if len(registry) + 1 + len(name) > _MAX_NAME:
            raise InvalidReferenceError(f"invalid reference {orig[:80]!r}...: name longer than {_MAX_NAME} characters")
        if not name or not all(_REPO_COMPONENT.fullmatch(p) for p in name.split("/")):
            raise InvalidReferenceError(
                f"invalid reference {orig!r}: repository must be lowercase letters, digits and separators"
            )
        _check_registry(registry, orig)
        if registry in ("docker.io", "index.docker.io", _DOCKER_HUB_ENDPOINT):
            registry = DEFAULT_REGISTRY
            if "/" not in name:
                name = f"library/{name}"
        if tag is None and digest is None:
            tag = default_tag
        return cls(registry, name, tag, digest)

    @property
    def endpoint(self) -> str:
        """The host[:port] to talk to (docker.io is served by registry-1.docker.io)."""
        return _DOCKER_HUB_ENDPOINT if self.registry == DEFAULT_REGISTRY else self.registry

    @property
    def is_loopback(self) -> bool:
        host = self.registry
        if host.startswith("["):
            host = host[1 : host.index("]")]
        else:
            host = host.rsplit(":", 1)[0]
        if host == "localhost":
            return True
        try:
            return ipaddress.ip_address(host).is_loopback
        except ValueError:
            return False

    @property
    def reference(self) -> str:
        """What goes after ``/manifests/``: the digest when pinned, else the tag."""
        if self.digest is not None:
            return str(self.digest)
        assert self.tag is not None
        return self.tag

    def with_tag(self, tag: str | None) -> Reference:
        return Reference(self.registry, self.repository, tag, None)

    def with_digest(self, digest: Digest) -> Reference:
        return Reference(self.registry, self.repository, self.tag, digest)

    def with_repository(self, repository: str) -> Reference:
        return Reference(self.registry, repository, self.tag, self.digest)

    def __str__(self) -> str:
        out = f"{self.registry}/{self.repository}"
        if self.tag:
            out += f":{self.tag}"
        if self.digest:
            out += f"@{self.digest}"
        return out


def _check_registry(registry: str, orig: str) -> None:
    host, port = registry, ""
    if registry.startswith("["):
        end = registry.find("]")
        if end < 0:
            raise InvalidReferenceError(f"invalid reference {orig!r}: bad IPv6 registry")
        try:
            ipaddress.IPv6Address(registry[1:end])
        except ValueError:
            raise InvalidReferenceError(f"invalid reference {orig!r}: bad IPv6 registry") from None
        port = registry[end + 1 :]
        if port == ":" or (port and not port.startswith(":")):
            raise InvalidReferenceError(f"invalid reference {orig!r}: bad registry port after {registry[:end + 1]}")
        port = port.removeprefix(":")
    elif ":" in registry:
        host, _, port = registry.partition(":")
        if not port:
            raise InvalidReferenceError(f"invalid reference {orig!r}: empty registry port")
    if not registry.startswith("[") and not _HOST.fullmatch(host):
        raise InvalidReferenceError(f"invalid reference {orig!r}: bad registry host {host!r}")
    if port and (not port.isdigit() or not 0 < int(port) < 65536):
        raise InvalidReferenceError(f"invalid reference {orig!r}: bad registry port {port!r}")

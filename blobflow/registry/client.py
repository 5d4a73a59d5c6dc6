"""OCI distribution-spec endpoints over aiohttp.

This package is the only place that imports aiohttp; every aiohttp exception is translated to
blobflow's own tree at this boundary (:func:`_mapped`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import warnings
from collections.abc import AsyncIterator, Collection
from dataclasses import dataclass
from typing import Any
from urllib.parse import urljoin, urlsplit

import aiohttp
from yarl import URL

from ..errors import (
    AuthError,
    BadInputError,
    BlobflowError,
    DigestMismatchError,
    ManifestError,
    RegistryError,
)
from ..types import ALL_MANIFEST_TYPES, Descriptor, Digest
from ._http import mapped as _mapped
from ._http import open_session, proxy_for, raise_for, read_body, retry_after
from .auth import Authenticator
from .credentials import CredentialLookup, Credentials, find_credentials
from .gate import HostGate

__all__ = ["MAX_MANIFEST", "BlobStream", "Quota", "RegistryClient", "RegistryPool", "Upload", "open_session"]

MAX_MANIFEST = 4 * 1024 * 1024
_MAX_TAG_LIST = 64 * 1024 * 1024  # one page of a repository with very many tags
_ACCEPT = ", ".join(sorted(ALL_MANIFEST_TYPES))
_REDIRECTS = (301, 302, 303, 307, 308)


@dataclass(slots=True)
class Upload:
    """An upload session: where to send the next bytes, and how many the registry has."""

    repository: str
    location: str
    offset: int = 0
    min_chunk: int = 0
    started: float = 0.0


def _bytes_payload(data: bytes) -> aiohttp.BytesPayload:
    """``data`` for the socket in one write, and sent again as it is after a redirect or a 401.

    aiohttp warns about raw bytes over 1 MiB ("might lock the event loop": it does not, the
    transport keeps what the socket cannot take yet) and suggests BytesIO, which costs a copy of
    the body (``getbuffer`` unshares it) and a write per 64 KiB.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        return aiohttp.BytesPayload(data)


class BlobStream:
    """A blob GET in flight. Iterate :meth:`chunks`; always used as an async context manager."""

    def __init__(self, resp: aiohttp.ClientResponse, what: str) -> None:
        self._resp = resp
        self.what = what
        self.status = resp.status
        self.length = resp.content_length
        start = 0
        if resp.status == 206:
            cr = resp.headers.get("Content-Range", "")
            with contextlib.suppress(ValueError, IndexError):
                start = int(cr.split(" ", 1)[1].split("-", 1)[0])
        self.start = start

    async def chunks(self, size: int) -> AsyncIterator[bytes]:
        """Chunks of about ``size`` bytes (the last may be shorter)."""
        pieces: list[bytes] = []
        have = 0
        try:
            with _mapped(self.what):
                # iter_chunks hands over aiohttp's buffered pieces as they are (iter_any joins them
                # first): one copy fewer per byte on the hottest path
                async for piece, _ in self._resp.content.iter_chunks():
                    pieces.append(piece)
                    have += len(piece)
                    if have >= size:
                        yield b"".join(pieces)
                        pieces.clear()
                        have = 0
        except BlobflowError:
            # the bytes that arrived before the break are good: hand them over (the caller keeps
            # and resumes after them, and a retry counts them as progress), then fail
            if pieces:
                yield b"".join(pieces)
            raise
        if pieces:
            yield b"".join(pieces)

    async def __aenter__(self) -> BlobStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._resp.release() if exc[0] is None else self._resp.close()


@dataclass(frozen=True, slots=True)
class Quota:
    """What a registry says is left of its pull quota (Docker Hub's ``RateLimit-Remaining`` and
    ``RateLimit-Limit``, e.g. ``76;w=21600``: 76 of 100 pulls left in a window of 6 hours)."""

    remaining: int
    limit: int
    window: int  # seconds; 0 when not given

    @classmethod
    def of(cls, headers: Any) -> Quota | None:
        remaining, limit = headers.get("RateLimit-Remaining"), headers.get("RateLimit-Limit")
        if not remaining or not limit:
            return None
        try:
            left, _, rest = remaining.partition(";")
            most = limit.partition(";")[0]
            window = next((int(p.strip()[2:]) for p in rest.split(";") if p.strip().startswith("w=")), 0)
            return cls(int(left), int(most), window)
        except ValueError:
            return None

    @property
    def per(self) -> str:
        if not self.window:
            return ""
        return f" per {self.window / 3600:g} h" if self.window >= 3600 else f" per {self.window} s"

    def __str__(self) -> str:
        return f"{self.remaining} of {self.limit}{self.per}"

    def to_json(self) -> dict[str, int]:
        return {"remaining": self.remaining, "limit": self.limit, "window_seconds": self.window}


class RegistryClient:
    """Endpoints of one registry, with its auth state."""

    def __init__(self, session: aiohttp.ClientSession, registry: str, endpoint: str, *,
                 credentials: Credentials | CredentialLookup | None = None, plain_http: bool = False,
                 loopback: bool = False, rate: float | None = None) -> None:
        self.session = session
        self.gate = HostGate(rate)
        self.registry = registry
        self.endpoint = endpoint
        self.auth = Authenticator(session, registry, credentials or Credentials())
        self._plain_http = plain_http
        self._loopback = loopback
        self._base: str | None = None
        self._base_lock = asyncio.Lock()
        self.requests = 0
        self.quota: Quota | None = None  # the latest a response of its own host told

    def __repr__(self) -> str:
        return f"<RegistryClient {self.registry} via {self.endpoint}>"

    @property
    def credentials(self) -> Credentials:
        return self.auth.credentials

    # -- connection and auth -------------------------------------------------------------
    async def base(self) -> str:
        if self._base is not None:
            return self._base
        async with self._base_lock:
            if self._base is None:
                self._base = await self._probe()
        return self._base

    async def _probe(self) -> str:
        """HTTPS first; plain HTTP only when forced or when a loopback registry does not speak TLS."""
        if self._plain_http:
            return f"http://{self.endpoint}"
        https = f"https://{self.endpoint}"
        if not self._loopback:
            return https
        try:
            async with self.session.get(f"{https}/v2/", allow_redirects=False) as resp:
                resp.release()
            return https
        except aiohttp.ClientConnectorCertificateError:
            return https  # it speaks TLS: verify, never downgrade
        except (aiohttp.ClientSSLError, aiohttp.ServerDisconnectedError, aiohttp.ClientOSError,
                aiohttp.ClientResponseError):
            return f"http://{self.endpoint}"
        except aiohttp.ClientConnectorError:
            return f"http://{self.endpoint}"
        except (TimeoutError, aiohttp.ClientError):
            return f"http://{self.endpoint}"

    async def _fail(self, resp: aiohttp.ClientResponse, what: str) -> None:
        """Raise the registry's error, with any secret it might echo redacted. A 429 that says the
        pull quota is spent (Docker Hub's) is not retried: it refills over hours, not seconds."""
        try:
            await raise_for(resp, what, redact=self.auth.redact)
        except RegistryError as e:
            quota = Quota.of(resp.headers)
            if e.status == 429 and quota is not None and quota.remaining <= 0:
                e.retryable = False
                e.args = (f"{e}; the pull quota of {self.registry} is spent ({quota}): wait for it to refill, "
                          "or log in for a larger one",)
            raise

    async def _send(self, method: str, url: str, *, scope: str, what: str,
                    headers: dict[str, str] | None = None, data: Any = None,
                    replayable: bool = True, allow_redirects: bool = True) -> aiohttp.ClientResponse:
        """One request with auth; on 401 authenticate and retry once.

        Authorization goes only to the registry's own host. A body that cannot be replayed (a
        streamed PATCH) is not sent again after a 401: the error is retryable, and the upload
        resumes from the offset the registry has, with the new token.
        """
        own_host = urlsplit(url).netloc == urlsplit(await self.base()).netloc
        for attempt in (0, 1):
            hdrs = dict(headers or {})
            auth = await self.auth.authorization(scope, what) if own_host else None
            if auth:
                hdrs["Authorization"] = auth
            self.requests += 1
            body = _bytes_payload(data) if isinstance(data, bytes) else data
            if own_host:
                await self.gate.enter()
            with _mapped(what):
                resp = await self.session.request(method, url, headers=hdrs, data=body,
                                                  allow_redirects=allow_redirects, proxy=proxy_for(url))
            if own_host:
                self.quota = Quota.of(resp.headers) or self.quota
                if resp.status in (429, 503):
                    self.gate.throttled(retry_after(resp.headers.get("Retry-After")))
                else:
                    self.gate.ok()
            if resp.status != 401:
                return resp
            challenge = resp.headers.get("WWW-Authenticate", "")
            if not challenge or not own_host:
                await self._fail(resp, what)
            resp.release()
            if attempt == 1:
                raise self.auth.denied(challenge, scope, auth, what)
            await self.auth.unauthorized(challenge, scope, auth, what)
            if not replayable:
                if auth is not None and self.auth.lacks_scope(challenge):
                    raise self.auth.denied(challenge, scope, auth, what)
                err = AuthError(f"{what}: the registry answered 401 (token missing, expired or revoked); "
                                "sending again with a new one", status=401)
                err.retryable = True
                raise err
        raise AssertionError("unreachable")

    async def _url(self, path: str) -> str:
        return f"{await self.base()}{path}"

    # -- endpoints ------------------------------------------------------------------------
    async def ping(self) -> None:
        what = f"{self.registry}: ping"
        resp = await self._send("GET", await self._url("/v2/"), scope="", what=what)
        async with resp:
            if resp.status >= 400:
                await self._fail(resp, what)

    async def get_manifest(self, repo: str, reference: str) -> tuple[bytes, str, Digest]:
        """The manifest's bytes, media type and digest (verified against a digest reference)."""
        what = f"{self.registry}/{repo}: manifest {reference}"
        resp = await self._send("GET", await self._url(f"/v2/{repo}/manifests/{reference}"),
                                scope=f"repository:{repo}:pull", what=what, headers={"Accept": _ACCEPT})
        async with resp:
            if resp.status >= 400:
                await self._fail(resp, what)
            if (resp.content_length or 0) > MAX_MANIFEST:
                raise ManifestError(f"{what}: manifest is {resp.content_length} bytes, over the 4 MiB limit")
            with _mapped(what):
                body = await read_body(resp, MAX_MANIFEST)
            if len(body) > MAX_MANIFEST:
                raise ManifestError(f"{what}: manifest exceeds the 4 MiB limit")
            media_type = resp.headers.get("Content-Type", "").split(";")[0].strip()
        digest = Digest.of(body)
        if reference.startswith("sha") and ":" in reference and Digest.parse(reference) != digest:
            raise DigestMismatchError(f"{what}: registry returned a manifest with digest {digest}")
        return body, media_type, digest

    async def head_manifest(self, repo: str, reference: str) -> Descriptor | None:
        what = f"{self.registry}/{repo}: manifest {reference}"
        resp = await self._send("HEAD", await self._url(f"/v2/{repo}/manifests/{reference}"),
                                scope=f"repository:{repo}:pull", what=what, headers={"Accept": _ACCEPT})
        async with resp:
            if resp.status == 404:
                return None
            if resp.status >= 400:
                await self._fail(resp, what)
            dig = resp.headers.get("Docker-Content-Digest")
            if not dig:
                return None
            media_type = resp.headers.get("Content-Type", "").split(";")[0].strip()
            return Descriptor(media_type, Digest.parse(dig), resp.content_length or 0)

    async def put_manifest(self, repo: str, reference: str, body: bytes, media_type: str,
                           *, scope: str | None = None) -> Digest:
        what = f"{self.registry}/{repo}: put manifest {reference}"
        resp = await self._send("PUT", await self._url(f"/v2/{repo}/manifests/{reference}"),
                                scope=scope or f"repository:{repo}:pull,push", what=what,
                                headers={"Content-Type": media_type}, data=body)
        async with resp:
            if resp.status >= 400:
                await self._fail(resp, what)
        return Digest.of(body)

    async def head_blob(self, repo: str, digest: Digest) -> int | None:
        what = f"{self.registry}/{repo}: blob {digest.short}"
        resp = await self._send("HEAD", await self._url(f"/v2/{repo}/blobs/{digest}"),
                                scope=f"repository:{repo}:pull", what=what)
        async with resp:
            if resp.status == 404:
                return None
            if resp.status >= 400:
                await self._fail(resp, what)
            return resp.content_length

    async def get_blob(self, repo: str, digest: Digest, *, start: int = 0, end: int | None = None,
                       ) -> BlobStream:
        """Open a blob body, from ``start`` to ``end`` inclusive when given.

        Redirects are followed by hand so Authorization never reaches another host.
        """
        what = f"{self.registry}/{repo}: blob {digest.short}"
        headers = {}
        if start or end is not None:
            headers["Range"] = f"bytes={start}-{'' if end is None else end}"
        url = await self._url(f"/v2/{repo}/blobs/{digest}")
        resp = await self._send("GET", url, scope=f"repository:{repo}:pull", what=what,
                                headers=headers, allow_redirects=False)
        origin = urlsplit(url).netloc
        for _ in range(6):
            if resp.status not in _REDIRECTS:
                break
            location = resp.headers.get("Location", "")
            resp.release()
            if not location:
                raise RegistryError(f"{what}: redirect without Location", status=resp.status)
            url = urljoin(url, location)
            hdrs = dict(headers)
            if urlsplit(url).netloc == origin:  # storage hosts get the signed URL, never our token
                auth = await self.auth.authorization(f"repository:{repo}:pull", what)
                if auth:
                    hdrs["Authorization"] = auth
            with _mapped(what):
                resp = await self.session.get(URL(url, encoded=True), headers=hdrs, allow_redirects=False,
                                              proxy=proxy_for(url))
        if resp.status >= 400:
            await self._fail(resp, what)
        if resp.status not in (200, 206):
            resp.release()
            raise RegistryError(f"{what}: unexpected status {resp.status}", status=resp.status)
        return BlobStream(resp, what)

    async def mount_blob(self, repo: str, digest: Digest, from_repo: str, *, keep: bool = False) -> bool | Upload:
        """Cross-repository mount. True when mounted; False when the registry declined. A registry
        that declines opens an upload session instead (202): with ``keep`` that session is
        returned, for the upload that follows (one request instead of a DELETE and a POST),
        else it is closed."""
        what = f"{self.registry}/{repo}: mount {digest.short} from {from_repo}"
        url = await self._url(f"/v2/{repo}/blobs/uploads/?mount={digest}&from={from_repo}")
        resp = await self._send("POST", url, what=what,
                                scope=f"repository:{repo}:pull,push repository:{from_repo}:pull")
        async with resp:
            if resp.status == 201:
                return True
            if resp.status == 202:
                location = resp.headers.get("Location")
                if not location:
                    return False
                up = Upload(repo, urljoin(url, location), 0, int(resp.headers.get("OCI-Chunk-Min-Length", "0") or 0),
                            time.monotonic())
                if keep:
                    return up
                with contextlib.suppress(BlobflowError):
                    await self.cancel_upload(up)
                return False
            await self._fail(resp, what)
        return False

    async def start_upload(self, repo: str) -> Upload:
        what = f"{self.registry}/{repo}: start upload"
        url = await self._url(f"/v2/{repo}/blobs/uploads/")
        resp = await self._send("POST", url, scope=f"repository:{repo}:pull,push", what=what,
                                headers={"Content-Length": "0"})
        async with resp:
            if resp.status != 202:
                await self._fail(resp, what)
            location = resp.headers.get("Location")
            if not location:
                raise RegistryError(f"{what}: registry opened an upload without a Location", status=202)
            min_chunk = int(resp.headers.get("OCI-Chunk-Min-Length", "0") or 0)
        return Upload(repo, urljoin(url, location), 0, min_chunk, time.monotonic())

    async def upload_chunk(self, up: Upload, body: AsyncIterator[bytes] | bytes, length: int | None, *,
                           content_range: bool = True) -> None:
        """PATCH ``length`` bytes at ``up.offset``; with ``content_range=False`` a docker-style stream."""
        what = f"{self.registry}/{up.repository}: upload at {up.offset}"
        headers = {"Content-Type": "application/octet-stream"}
        if length is not None:
            headers["Content-Length"] = str(length)
            if content_range and length:
                headers["Content-Range"] = f"{up.offset}-{up.offset + length - 1}"
        resp = await self._send("PATCH", up.location, scope=f"repository:{up.repository}:pull,push",
                                what=what, headers=headers, data=body, replayable=isinstance(body, bytes))
        async with resp:
            if resp.status != 202:
                await self._fail(resp, what)
            self._advance(up, resp, at_least=up.offset + (length or 0))

    def _advance(self, up: Upload, resp: aiohttp.ClientResponse, *, at_least: int = 0) -> None:
        """Take the session's new Location and the offset from ``Range: 0-<last byte>``.

        ``0-0`` is ambiguous (Distribution sends it for an empty session and for one holding one
        byte): read as 0 unless the caller knows more (``at_least``: the bytes a PATCH just sent).
        """
        location = resp.headers.get("Location")
        if location:
            up.location = urljoin(up.location, location)
        rng = resp.headers.get("Range")
        if rng and "-" in rng:
            with contextlib.suppress(ValueError):
                last = int(rng.rsplit("-", 1)[1])
                up.offset = max(last + 1 if last > 0 else 0, at_least)

    async def finish_upload(self, up: Upload, digest: Digest, body: bytes = b"") -> None:
        what = f"{self.registry}/{up.repository}: commit blob {digest.short}"
        url = URL(up.location).update_query(digest=str(digest))
        resp = await self._send("PUT", str(url), scope=f"repository:{up.repository}:pull,push", what=what,
                                headers={"Content-Type": "application/octet-stream",
                                         "Content-Length": str(len(body))}, data=body)
        async with resp:
            if resp.status not in (201, 204):
                await self._fail(resp, what)

    async def upload_status(self, up: Upload) -> int:
        """The offset the registry has for this session (``GET`` on the upload URL)."""
        what = f"{self.registry}/{up.repository}: upload status"
        resp = await self._send("GET", up.location, scope=f"repository:{up.repository}:pull,push", what=what)
        async with resp:
            if resp.status not in (202, 204):
                await self._fail(resp, what)
            up.offset = 0
            self._advance(up, resp)
        return up.offset

    async def delete_blob(self, repo: str, digest: Digest) -> None:
        """``DELETE /v2/<repo>/blobs/<digest>``; a blob already gone (404) is not an error."""
        what = f"{self.registry}/{repo}: delete blob {digest.short}"
        resp = await self._send("DELETE", await self._url(f"/v2/{repo}/blobs/{digest}"),
                                scope=f"repository:{repo}:pull,push,delete", what=what)
        async with resp:
            if resp.status not in (202, 204, 404):
                await self._fail(resp, what)

    async def cancel_upload(self, up: Upload) -> None:
        what = f"{self.registry}/{up.repository}: cancel upload"
        resp = await self._send("DELETE", up.location, scope=f"repository:{up.repository}:pull,push",
                                what=what)
        resp.release()

    async def list_tags(self, repo: str, *, page_size: int | None = None) -> list[str]:
        """All tags, following ``Link: <...>; rel="next"`` pagination."""
        what = f"{self.registry}/{repo}: tags"
        path = f"/v2/{repo}/tags/list" + (f"?n={page_size}" if page_size else "")
        url: str | None = await self._url(path)
        tags: list[str] = []
        while url:
            resp = await self._send("GET", url, scope=f"repository:{repo}:pull", what=what)
            async with resp:
                if resp.status >= 400:
                    await self._fail(resp, what)
                with _mapped(what):
                    try:
                        body = await read_body(resp, _MAX_TAG_LIST)
                        if len(body) > _MAX_TAG_LIST:
                            raise RegistryError(f"{what}: a tag list page over {_MAX_TAG_LIST >> 20} MiB")
                        data = json.loads(body)
                        if not isinstance(data, dict):
                            raise ValueError("not an object")
                    except ValueError:
                        raise RegistryError(f"{what}: tag list is not JSON") from None
                tags.extend(t for t in (data.get("tags") or []) if isinstance(t, str))
                url = _next_link(resp.headers.get("Link", ""), url)
        return tags


def _next_link(header: str, current: str) -> str | None:
    for part in header.split(","):
        if 'rel="next"' in part or "rel=next" in part:
            start, end = part.find("<"), part.find(">")
            if 0 <= start < end:
                return urljoin(current, part[start + 1 : end])
    return None


class RegistryPool:
    """One HTTP session for a job and one :class:`RegistryClient` per registry."""

    def __init__(self, *, connections_per_host: int, connect_timeout: float, read_timeout: float,
                 plain_http: bool = False, ca_file: str | None = None, insecure: bool = False,
                 credentials: dict[str, Credentials] | None = None, rate: float | None = None,
                 rate_hosts: Collection[str] | None = None) -> None:
        """``rate``: requests per second to each registry, or to each of ``rate_hosts`` only (a
        mirror's sources: politeness is owed to them, not to one's own destination)."""
        self._rate = rate
        self._rate_hosts = rate_hosts
        self._opts = dict(connections_per_host=connections_per_host, connect_timeout=connect_timeout,
                          read_timeout=read_timeout, ca_file=ca_file, insecure=insecure)
        self._plain_http = plain_http
        self._session: aiohttp.ClientSession | None = None
        self._clients: dict[str, RegistryClient] = {}
        self._credentials = credentials or {}

    async def __aenter__(self) -> RegistryPool:
        try:
            self._session = open_session(**self._opts)  # type: ignore[arg-type]
        except OSError as e:
            raise BadInputError(f"cannot set up connections: {e.strerror or type(e).__name__}") from None
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def client(self, registry: str, endpoint: str, *, loopback: bool) -> RegistryClient:
        if registry not in self._clients:
            assert self._session is not None, "RegistryPool used outside 'async with'"
            given = self._credentials.get(registry)
            creds = find_credentials(registry) if given is None else given
            self._clients[registry] = RegistryClient(self._session, registry, endpoint, credentials=creds,
                                                     plain_http=self._plain_http, loopback=loopback,
                                                     rate=self._rate if self._rate_hosts is None
                                                     or registry in self._rate_hosts else None)
        return self._clients[registry]

    @property
    def clients(self) -> dict[str, RegistryClient]:
        return dict(self._clients)

"""OCI distribution-spec endpoints over aiohttp.

This package is the only place that imports aiohttp; every aiohttp exception is translated to
blobflow's own tree at this boundary (:func:`_mapped`).
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import io
import json
import ssl
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urljoin, urlsplit

import aiohttp
from yarl import URL

from ..errors import (
    AuthError,
    BadInputError,
    BlobflowError,
    ConnectError,
    DigestMismatchError,
    ManifestError,
    NotFoundError,
    RegistryError,
    TransferError,
)
from ..types import ALL_MANIFEST_TYPES, Descriptor, Digest
from .auth import Challenge, Credentials, _Token, load_credentials, parse_challenges

__all__ = ["MAX_MANIFEST", "BlobStream", "RegistryClient", "RegistryPool", "Upload", "open_session"]

MAX_MANIFEST = 4 * 1024 * 1024
_MAX_ERROR_BODY = 64 * 1024
_ACCEPT = ", ".join(sorted(ALL_MANIFEST_TYPES))


def open_session(*, connections_per_host: int, connect_timeout: float, read_timeout: float,
                 ca_file: str | None = None, insecure: bool = False) -> aiohttp.ClientSession:
    """One HTTP session for a whole job. No total timeout: multi-GB bodies must not be killed."""
    ctx: ssl.SSLContext | bool
    if insecure:
        ctx = False
    else:
        ctx = ssl.create_default_context(cafile=ca_file)
    connector = aiohttp.TCPConnector(limit=0, limit_per_host=connections_per_host, ssl=ctx,
                                     enable_cleanup_closed=False)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=connect_timeout, sock_read=read_timeout)
    return aiohttp.ClientSession(connector=connector, timeout=timeout, auto_decompress=False,
                                 headers={"User-Agent": "blobflow/0.1"})


@contextlib.contextmanager
def _mapped(what: str) -> Iterator[None]:
    """Translate aiohttp and socket errors into blobflow errors."""
    try:
        yield
    except BlobflowError:
        raise
    except aiohttp.ClientConnectorCertificateError as e:
        raise TransferError(f"{what}: TLS certificate verification failed ({e.certificate_error}); "
                            "use --ca-file to trust its CA") from None
    except aiohttp.ClientConnectorSSLError as e:
        raise TransferError(f"{what}: TLS handshake failed ({e.os_error})") from None
    except aiohttp.ClientConnectorError as e:
        raise ConnectError(f"{what}: cannot connect to {e.host}:{e.port} ({e.os_error.strerror or e.os_error})",
                           retryable=True) from None
    except (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError, aiohttp.ClientOSError,
            ConnectionError) as e:
        raise TransferError(f"{what}: connection broken ({type(e).__name__}: {e})", retryable=True) from None
    except (TimeoutError, aiohttp.ServerTimeoutError):
        raise TransferError(f"{what}: timed out", retryable=True) from None
    except aiohttp.InvalidURL as e:
        raise RegistryError(f"{what}: registry sent an invalid URL ({e})") from None
    except aiohttp.ClientResponseError as e:
        raise RegistryError(f"{what}: {e.message}", status=e.status) from None
    except aiohttp.ClientError as e:
        raise TransferError(f"{what}: {type(e).__name__}: {e}", retryable=True) from None


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


async def _raise_for(resp: aiohttp.ClientResponse, what: str) -> None:
    """Raise a typed error carrying the registry's code and message."""
    body = b""
    with contextlib.suppress(aiohttp.ClientError, TimeoutError):
        body = await resp.content.read(_MAX_ERROR_BODY)
    code, message, detail = "", "", ""
    try:
        errors = json.loads(body).get("errors") or []
        if errors:
            code = str(errors[0].get("code", ""))
            message = str(errors[0].get("message", ""))
            d = errors[0].get("detail")
            detail = json.dumps(d)[:300] if d else ""
    except (ValueError, AttributeError, TypeError):
        pass
    text = f"{what}: {resp.status} {code or resp.reason}" + (f": {message}" if message else "")
    if detail and detail not in ("null", '""', "{}"):
        text += f" ({detail})"
    cls = RegistryError
    if resp.status in (401, 403):
        cls = AuthError
    elif resp.status == 404:
        cls = NotFoundError
    err = cls(text, status=resp.status, code=code, detail=detail)
    err.retry_after = _retry_after(resp.headers.get("Retry-After"))
    resp.release()
    raise err


@dataclass(slots=True)
class Upload:
    """An upload session: where to send the next bytes, and how many the registry has."""

    repository: str
    location: str
    offset: int = 0
    min_chunk: int = 0
    started: float = 0.0


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
        with _mapped(self.what):
            async for piece in self._resp.content.iter_any():
                pieces.append(piece)
                have += len(piece)
                if have >= size:
                    yield b"".join(pieces)
                    pieces.clear()
                    have = 0
        if pieces:
            yield b"".join(pieces)

    async def __aenter__(self) -> BlobStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._resp.release() if exc[0] is None else self._resp.close()


class RegistryClient:
    """Endpoints of one registry, with its auth state."""

    def __init__(self, session: aiohttp.ClientSession, registry: str, endpoint: str, *,
                 credentials: Credentials | None = None, plain_http: bool = False,
                 loopback: bool = False) -> None:
        self.session = session
        self.registry = registry
        self.endpoint = endpoint
        self.credentials = credentials or Credentials()
        self._plain_http = plain_http
        self._loopback = loopback
        self._base: str | None = None
        self._base_lock = asyncio.Lock()
        self._challenge: Challenge | None = None
        self._tokens: dict[str, _Token] = {}
        self._token_lock = asyncio.Lock()
        self.requests = 0

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

    def _auth_header(self, scope: str) -> str | None:
        ch = self._challenge
        if ch is None:
            return None
        if ch.scheme == "basic":
            return self.credentials.basic if self.credentials else None
        tok = self._tokens.get(scope)
        return f"Bearer {tok.value}" if tok and tok.fresh else None

    async def _authenticate(self, header: str, scope: str, what: str) -> None:
        try:
            challenges = parse_challenges(header)
        except AuthError:
            raise AuthError(f"{what}: the registry sent a malformed WWW-Authenticate challenge",
                            status=401) from None
        pick = next((c for c in challenges if c.scheme == "bearer"), None) or next(
            (c for c in challenges if c.scheme == "basic"), None)
        if pick is None:
            raise AuthError(f"{what}: unsupported authentication scheme(s) "
                            f"{', '.join(c.scheme for c in challenges) or '(none)'}", status=401)
        self._challenge = pick
        if pick.scheme == "basic":
            if not self.credentials:
                raise AuthError(f"{what}: {self.registry} requires credentials and none are configured "
                                f"(run `blobflow login {self.registry}`)", status=401)
            return
        async with self._token_lock:
            tok = self._tokens.get(scope)
            if tok is None or not tok.fresh:
                self._tokens[scope] = await self._fetch_token(pick, scope, what)

    async def _fetch_token(self, ch: Challenge, scope: str, what: str) -> _Token:
        realm = ch.params.get("realm")
        if not realm or urlsplit(realm).scheme not in ("http", "https"):
            raise AuthError(f"{what}: bearer challenge without a usable realm", status=401)
        params = {"service": ch.params.get("service", "")}
        if scope:
            params["scope"] = scope
        headers = {}
        creds = self.credentials
        try:
            with _mapped(f"token request to {urlsplit(realm).netloc}"):
                if creds.identity_token:
                    form = {"grant_type": "refresh_token", "refresh_token": creds.identity_token,
                            "service": params["service"], "client_id": "blobflow"}
                    if scope:
                        form["scope"] = scope
                    req = self.session.post(realm, data=form)
                else:
                    if creds:
                        headers["Authorization"] = creds.basic
                    req = self.session.get(realm, params=params, headers=headers)
                async with req as resp:
                    if resp.status >= 400:
                        await _raise_for(resp, f"{what}: token request")
                    data = await resp.json(content_type=None)
        except (ValueError, aiohttp.ContentTypeError):
            raise AuthError(f"{what}: token endpoint answered with something that is not JSON") from None
        value = data.get("token") or data.get("access_token") if isinstance(data, dict) else None
        if not value:
            raise AuthError(f"{what}: token endpoint answered without a token")
        expires_in = data.get("expires_in") or 60
        try:
            expires_in = max(10.0, float(expires_in))
        except (TypeError, ValueError):
            expires_in = 60.0
        return _Token(str(value), time.monotonic() + expires_in)

    async def _send(self, method: str, url: str, *, scope: str, what: str,
                    headers: dict[str, str] | None = None, data: Any = None,
                    replayable: bool = True, allow_redirects: bool = True) -> aiohttp.ClientResponse:
        """One request with auth; on 401 authenticate and retry once (only when the body can be replayed)."""
        for attempt in (0, 1):
            hdrs = dict(headers or {})
            auth = self._auth_header(scope)
            if auth:
                hdrs["Authorization"] = auth
            self.requests += 1
            body = io.BytesIO(data) if isinstance(data, bytes) and len(data) > 65536 else data
            with _mapped(what):
                resp = await self.session.request(method, url, headers=hdrs, data=body,
                                                  allow_redirects=allow_redirects)
            if resp.status != 401:
                return resp
            challenge = resp.headers.get("WWW-Authenticate", "")
            if attempt == 1 or not replayable or not challenge:
                await _raise_for(resp, what)
            resp.release()
            if auth and self._challenge and self._challenge.scheme == "basic":
                raise AuthError(f"{what}: {self.registry} rejected the credentials for "
                                f"{self.credentials.username or 'the configured user'}", status=401)
            await self._authenticate(challenge, scope, what)
        raise AssertionError("unreachable")

    async def _url(self, path: str) -> str:
        return f"{await self.base()}{path}"

    # -- endpoints ------------------------------------------------------------------------
    async def ping(self) -> None:
        what = f"{self.registry}: ping"
        resp = await self._send("GET", await self._url("/v2/"), scope="", what=what)
        async with resp:
            if resp.status >= 400:
                await _raise_for(resp, what)

    async def get_manifest(self, repo: str, reference: str) -> tuple[bytes, str, Digest]:
        """The manifest's bytes, media type and digest (verified against a digest reference)."""
        what = f"{self.registry}/{repo}: manifest {reference}"
        resp = await self._send("GET", await self._url(f"/v2/{repo}/manifests/{reference}"),
                                scope=f"repository:{repo}:pull", what=what, headers={"Accept": _ACCEPT})
        async with resp:
            if resp.status >= 400:
                await _raise_for(resp, what)
            if (resp.content_length or 0) > MAX_MANIFEST:
                raise ManifestError(f"{what}: manifest is {resp.content_length} bytes, over the 4 MiB limit")
            with _mapped(what):
                body = await resp.content.read(MAX_MANIFEST + 1)
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
                await _raise_for(resp, what)
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
                await _raise_for(resp, what)
        return Digest.of(body)

    async def head_blob(self, repo: str, digest: Digest) -> int | None:
        what = f"{self.registry}/{repo}: blob {digest.short}"
        resp = await self._send("HEAD", await self._url(f"/v2/{repo}/blobs/{digest}"),
                                scope=f"repository:{repo}:pull", what=what)
        async with resp:
            if resp.status == 404:
                return None
            if resp.status >= 400:
                await _raise_for(resp, what)
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
            if resp.status not in (301, 302, 303, 307, 308):
                break
            location = resp.headers.get("Location", "")
            resp.release()
            if not location:
                raise RegistryError(f"{what}: redirect without Location", status=resp.status)
            url = urljoin(url, location)
            hdrs = dict(headers)
            if urlsplit(url).netloc == origin:
                auth = self._auth_header(f"repository:{repo}:pull")
                if auth:
                    hdrs["Authorization"] = auth
            with _mapped(what):
                resp = await self.session.get(URL(url, encoded=True), headers=hdrs, allow_redirects=False)
        if resp.status >= 400:
            await _raise_for(resp, what)
        if resp.status not in (200, 206):
            resp.release()
            raise RegistryError(f"{what}: unexpected status {resp.status}", status=resp.status)
        return BlobStream(resp, what)

    async def mount_blob(self, repo: str, digest: Digest, from_repo: str) -> bool:
        """Cross-repository mount. True when mounted; False when the registry declined."""
        what = f"{self.registry}/{repo}: mount {digest.short} from {from_repo}"
        url = await self._url(f"/v2/{repo}/blobs/uploads/?mount={digest}&from={from_repo}")
        resp = await self._send("POST", url, what=what,
                                scope=f"repository:{repo}:pull,push repository:{from_repo}:pull")
        async with resp:
            if resp.status == 201:
                return True
            if resp.status == 202:
                location = resp.headers.get("Location")
                if location:  # the registry opened an upload session instead: close it
                    with contextlib.suppress(BlobflowError):
                        await self.cancel_upload(Upload(repo, urljoin(url, location)))
                return False
            await _raise_for(resp, what)
        return False

    async def start_upload(self, repo: str) -> Upload:
        what = f"{self.registry}/{repo}: start upload"
        url = await self._url(f"/v2/{repo}/blobs/uploads/")
        resp = await self._send("POST", url, scope=f"repository:{repo}:pull,push", what=what,
                                headers={"Content-Length": "0"})
        async with resp:
            if resp.status != 202:
                await _raise_for(resp, what)
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
                await _raise_for(resp, what)
            self._advance(up, resp)

    def _advance(self, up: Upload, resp: aiohttp.ClientResponse) -> None:
        location = resp.headers.get("Location")
        if location:
            up.location = urljoin(up.location, location)
        rng = resp.headers.get("Range")
        if rng and "-" in rng:
            with contextlib.suppress(ValueError):
                up.offset = int(rng.rsplit("-", 1)[1]) + 1

    async def finish_upload(self, up: Upload, digest: Digest, body: bytes = b"") -> None:
        what = f"{self.registry}/{up.repository}: commit blob {digest.short}"
        url = URL(up.location).update_query(digest=str(digest))
        resp = await self._send("PUT", str(url), scope=f"repository:{up.repository}:pull,push", what=what,
                                headers={"Content-Type": "application/octet-stream",
                                         "Content-Length": str(len(body))}, data=body)
        async with resp:
            if resp.status not in (201, 204):
                await _raise_for(resp, what)

    async def upload_status(self, up: Upload) -> int:
        """The offset the registry has for this session (``GET`` on the upload URL)."""
        what = f"{self.registry}/{up.repository}: upload status"
        resp = await self._send("GET", up.location, scope=f"repository:{up.repository}:pull,push", what=what)
        async with resp:
            if resp.status not in (202, 204):
                await _raise_for(resp, what)
            up.offset = 0
            self._advance(up, resp)
        return up.offset

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
                    await _raise_for(resp, what)
                with _mapped(what):
                    try:
                        data = json.loads(await resp.content.read(MAX_MANIFEST))
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
                 credentials: dict[str, Credentials] | None = None) -> None:
        self._opts = dict(connections_per_host=connections_per_host, connect_timeout=connect_timeout,
                          read_timeout=read_timeout, ca_file=ca_file, insecure=insecure)
        self._plain_http = plain_http
        self._session: aiohttp.ClientSession | None = None
        self._clients: dict[str, RegistryClient] = {}
        self._credentials = credentials or {}

    async def __aenter__(self) -> RegistryPool:
        try:
            self._session = open_session(**self._opts)  # type: ignore[arg-type]
        except (OSError, ssl.SSLError) as e:
            raise BadInputError(f"cannot load TLS settings: {e}") from None
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def client(self, registry: str, endpoint: str, *, loopback: bool) -> RegistryClient:
        if registry not in self._clients:
            assert self._session is not None, "RegistryPool used outside 'async with'"
            creds = self._credentials.get(registry)
            if creds is None:
                creds = load_credentials(registry)
            self._clients[registry] = RegistryClient(self._session, registry, endpoint, credentials=creds,
                                                     plain_http=self._plain_http, loopback=loopback)
        return self._clients[registry]

    @property
    def clients(self) -> dict[str, RegistryClient]:
        return dict(self._clients)

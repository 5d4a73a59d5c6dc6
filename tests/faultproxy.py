"""A fault-injecting reverse proxy in front of a real registry, for protocol corner-case tests.

Bodies stream both ways in chunks of at most ``CHUNK`` bytes, so memory per request is bounded by
about ``2 * CHUNK`` plus aiohttp's read buffers, whatever the blob size. Every fault is drawn from
one RNG (``Faults.seed``) and counted in ``FaultProxy.counters`` under its field name.

Host handling: the proxy forwards with ``Host`` set to its own address and drops any
``Forwarded``/``X-Forwarded-*`` headers (Distribution prefers those to ``Host``), so the upload
``Location`` URLs the registry builds already point at the proxy. A ``Location`` that still names
the upstream (a registry with ``http.host`` set) is rewritten and counted as ``location_rewritten``.
"""

from __future__ import annotations

import asyncio
import collections
import json
import random
import re
import socket
import ssl
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from types import TracebackType

import aiohttp
from aiohttp import hdrs, web
from multidict import CIMultiDict, MultiMapping
from yarl import URL

CHUNK = 64 * 1024
BLOB_PATH = re.compile(r"^/v2/.+/blobs/sha256:[0-9a-f]{64}$")
UPLOAD_START = re.compile(r"^/v2/.+/blobs/uploads/?$")
UPLOAD_SESSION = re.compile(r"^/v2/.+/blobs/uploads/([^/]+)$")  # group 1: the session's UUID
_STATE = re.compile(r"_state=[^&]*")  # Distribution's signed session state in an upload URL
HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection",
     "te", "trailer", "trailers", "transfer-encoding", "upgrade"}
)  # fmt: skip
NOT_FORWARDED = frozenset({"host", "expect", "forwarded", "x-forwarded-host", "x-forwarded-proto"})
ERROR_CODES = {401: "UNAUTHORIZED", 403: "DENIED", 404: "NAME_UNKNOWN", 429: "TOOMANYREQUESTS"}
# what ghcr.io answers for a Content-Range PATCH over its 4 MiB cap (ocx-sh/ocx#237, rust-oci-client#37)
GHCR_CHUNK_MESSAGE = "the request body is too large and exceeds the maximum permissible limit of {limit:.2f}MiB"


@dataclass
class Faults:
    """What the proxy does wrong; tests may change fields while it runs.

    Every fault, ``latency`` and ``bandwidth`` included, applies only to requests for which ``match``
    is None or returns True. Probabilities are per request.
    """

    wrong_bytes: float = 0.0  # blob GET body: flip one byte
    cut_response: float = 0.0  # blob GET body: close the connection after a random fraction
    cut_request: float = 0.0  # PATCH/PUT body: forward a random fraction, then drop both connections
    status: dict[int, float] = field(default_factory=dict)  # answer this status instead of forwarding
    retry_after: str | None = "0"  # Retry-After sent with injected 429/503
    headers: dict[str, str] = field(default_factory=dict)  # added to every answer (Docker Hub's RateLimit-*)
    ignore_range: bool = False  # blob GET: strip Range so the registry answers 200 with everything
    latency: float = 0.0  # seconds of sleep before forwarding
    # seconds more before the first request of each new client connection: the round trip of a TCP
    # handshake with a remote registry (TLS would add one or two more, not modelled). A connection
    # is known by its transport and peer address; ``counters["connections"]`` counts new ones.
    connect_latency: float = 0.0
    bandwidth: float | None = None  # bytes/second shared by all bodies, both directions
    # seconds an upload session lives after its POST (a registry's upload window): later requests
    # on it get 404 BLOB_UPLOAD_UNKNOWN, and a body still streaming when it runs out is cut
    upload_window: float | None = None
    request_window: float | None = None  # seconds a PATCH/PUT body may stream; past that it is cut
    # SO_RCVBUF of the proxy's listening socket, read at start(): a small one keeps an emulated
    # uplink's backlog at the sender, as on a real link, not in a loopback buffer of megabytes
    recv_buffer: int | None = None
    # request size limits of real registries, enforced before anything is forwarded:
    # ``chunk_cap``: a PATCH with Content-Range over this many bytes gets GHCR's 416
    # (``GHCR_CHUNK_MESSAGE``); a streamed PATCH without Content-Range passes, as on GHCR.
    # ``max_body``: any request body over this many bytes gets a bare 413 page (no registry error
    # body, as a Cloudflare-fronted registry answers)
    chunk_cap: int | None = None
    max_body: int | None = None
    # EMULATION of a registry that keeps what it received (GHCR-like). Distribution forgets a
    # session whose PATCH body was cut, so with this on a cut PATCH is not cut upstream: the proxy
    # forwards a *complete* request of the first k bytes (Content-Length k, Content-Range shortened
    # when present), Distribution commits them, and only the client's connection is dropped. The
    # client then sees a cut and the registry confirms k bytes. Counted as ``cut_request`` and
    # ``cut_kept``. PUT bodies are still cut as usual. Distribution also keeps a session's offset in
    # the ``_state`` query parameter of the Location it answers, which the client of a cut request
    # never sees; so, as a registry that tracks sessions server-side would, the proxy puts each
    # session's latest ``_state`` into later requests on it (counted as ``state_refreshed``).
    keep_received: bool = False
    match: Callable[[web.Request], bool] | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        for name in ("wrong_bytes", "cut_response", "cut_request"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be a probability in [0, 1]")
        if sum(self.status.values()) > 1.0:
            raise ValueError("status probabilities must sum to at most 1")


class _TokenBucket:
    """Callers take bytes and sleep off any deficit, one at a time; the burst is 50 ms of rate."""

    def __init__(self) -> None:
        self._lock = asyncio.Lock()
        self._tokens = 0.0
        self._stamp = time.monotonic()

    async def take(self, count: int, rate: float) -> None:
        async with self._lock:
            now = time.monotonic()
            self._tokens = min(rate * 0.05, self._tokens + (now - self._stamp) * rate) - count
            self._stamp = now
            if self._tokens < 0:
                await asyncio.sleep(-self._tokens / rate)


class _CutRequest(Exception):
    """Raised inside a request body stream to abort the upstream request part-way."""


@dataclass
class UploadSession:
    """One upload session seen through the proxy (times are the proxy's event-loop clock)."""

    started: float  # when its POST arrived
    last: float  # when its latest request arrived or ended
    bytes: int = 0  # request body bytes forwarded for it
    expired: bool = False  # its window ran out while the client still used it
    committed: bool = False  # its PUT answered 201


@dataclass
class _Body:
    """How a request body stream ended early, if it did."""

    expires_at: float | None = None
    expired: str = ""  # the counter to bump: "session_window_cuts" or "request_window_cuts"
    session: UploadSession | None = None


class FaultProxy:
    """An aiohttp reverse proxy on 127.0.0.1 that forwards to ``upstream`` and injects ``faults``."""

    def __init__(self, upstream: str, faults: Faults | None = None, *, tls: ssl.SSLContext | None = None,
                 upstream_tls: ssl.SSLContext | None = None) -> None:
        """``tls``: serve HTTPS with this server context; ``upstream_tls``: how to verify an https upstream."""
        self.upstream = upstream.rstrip("/")
        self.faults = faults if faults is not None else Faults()
        self.tls = tls
        self.upstream_tls = upstream_tls
        self.counters: collections.Counter[str] = collections.Counter()
        self.log: list[tuple[str, str, int]] = []  # (method, path_qs, status); 0 = connection dropped
        self.arrivals: list[tuple[float, int]] = []  # (monotonic time a request arrived, status answered)
        self.sessions: dict[str, UploadSession] = {}  # by UUID; only while upload_window is set
        self._states: dict[str, str] = {}  # upload UUID -> its latest "_state=..." (keep_received)
        self._connections: set[tuple[int, object]] = set()  # (id(transport), peer address) seen
        self._rng = random.Random(self.faults.seed)
        self._bucket = _TokenBucket()
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None
        self._port: int | None = None

    @property
    def host(self) -> str:
        if self._port is None:
            raise RuntimeError("FaultProxy is not started")
        return f"127.0.0.1:{self._port}"

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.host}"

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(
            auto_decompress=False,
            skip_auto_headers=(hdrs.ACCEPT, hdrs.ACCEPT_ENCODING, hdrs.USER_AGENT, hdrs.CONTENT_TYPE),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=10.0),
            connector=aiohttp.TCPConnector(limit=0, ssl=self.upstream_tls or True),
        )
        app = web.Application(handler_args={"max_line_size": 65536, "max_field_size": 65536})
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=2.0)
        await self._runner.setup()
        if self.faults.recv_buffer is None:
            await web.TCPSite(self._runner, "127.0.0.1", 0, ssl_context=self.tls).start()
        else:
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.faults.recv_buffer)
            sock.bind(("127.0.0.1", 0))
            await web.SockSite(self._runner, sock, ssl_context=self.tls).start()
        self._port = self._runner.addresses[0][1]

    async def stop(self) -> None:
        runner, self._runner = self._runner, None
        session, self._session = self._session, None
        if runner is not None:
            await runner.cleanup()
        if session is not None:
            await session.close()

    async def __aenter__(self) -> FaultProxy:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    def _first_on_connection(self, request: web.Request) -> bool:
        """Whether ``request`` is the first seen on its client connection (counted in ``connections``).

        Keyed by the transport's id and the peer's address together: a closed connection's id or
        port may come back, both at once hardly. Keys are small and kept for the proxy's life."""
        transport = request.transport
        key = (id(transport), transport.get_extra_info("peername") if transport is not None else None)
        if key in self._connections:
            return False
        self._connections.add(key)
        self.counters["connections"] += 1
        return True

    def _roll(self, probability: float) -> bool:
        return probability > 0.0 and self._rng.random() < probability

    def _draw_status(self) -> int | None:
        if not self.faults.status:
            return None
        draw, acc = self._rng.random(), 0.0
        for status, probability in self.faults.status.items():
            acc += probability
            if draw < acc:
                return status
        return None

    async def _throttle(self, count: int, faulty: bool) -> None:
        rate = self.faults.bandwidth
        if faulty and rate:
            await self._bucket.take(count, rate)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        method = request.method
        arrived = time.monotonic()
        self.counters["requests"] += 1
        self.counters[f"requests:{method}"] += 1
        blob_get = method == hdrs.METH_GET and BLOB_PATH.match(request.path) is not None
        self.counters["blob_get"] += blob_get
        upload_start = method == hdrs.METH_POST and UPLOAD_START.match(request.path) is not None
        self.counters["uploads_started"] += upload_start
        faulty = self.faults.match is None or self.faults.match(request)
        new_connection = self._first_on_connection(request)
        status = 0
        if faulty and new_connection and self.faults.connect_latency > 0:
            await asyncio.sleep(self.faults.connect_latency)
        try:
            if faulty and upload_start and self.faults.upload_window is not None:
                response, status = await self._open_session(request, blob_get=blob_get)
            else:
                response, status = await self._forward(request, faulty=faulty, blob_get=blob_get)
            return response
        finally:
            self.arrivals.append((arrived, status))
            self.log.append((method, request.path_qs, status))

    async def _open_session(self, request: web.Request, *, blob_get: bool) -> tuple[web.StreamResponse, int]:
        """Forward an upload POST and start its session's clock from the moment it arrived."""
        started = asyncio.get_running_loop().time()
        response, status = await self._forward(request, faulty=True, blob_get=blob_get)
        location = response.headers.get(hdrs.LOCATION, "")
        match = UPLOAD_SESSION.match(URL(location).path) if status == 202 else None
        if match:
            self.sessions[match.group(1)] = UploadSession(started, started)
        return response, status

    def _session_window(self, request: web.Request) -> tuple[UploadSession | None, float | None]:
        """The session a request belongs to and when its window ends (None: not windowed)."""
        window = self.faults.upload_window
        match = UPLOAD_SESSION.match(request.path) if window is not None else None
        session = self.sessions.get(match.group(1)) if match else None
        if session is None or window is None:
            return None, None
        return session, session.started + window

    def _expire(self, session: UploadSession) -> None:
        if not session.expired:
            session.expired = True
            self.counters["expired_sessions"] += 1

    async def _forward(
        self, request: web.Request, *, faulty: bool, blob_get: bool
    ) -> tuple[web.StreamResponse, int]:
        faults = self.faults
        if faulty and faults.latency > 0:
            await asyncio.sleep(faults.latency)
        injected = self._draw_status() if faulty else None
        if injected is not None:
            self.counters[f"status:{injected}"] += 1
            return self._fault_response(injected), injected
        loop = asyncio.get_running_loop()
        session, expires_at = self._session_window(request) if faulty else (None, None)
        if session is not None:
            session.last = loop.time()
            if expires_at is not None and session.last >= expires_at:
                self._expire(session)
                self.counters["expired_requests"] += 1
                error = {"code": "BLOB_UPLOAD_UNKNOWN", "message": "blob upload unknown to registry"}
                return web.json_response({"errors": [error]}, status=404), 404
        refused = self._refuse_size(request) if faulty else None
        if refused is not None:
            return refused, refused.status
        state = _Body(expires_at, session=session)
        if faulty and self.faults.request_window is not None and request.method in (hdrs.METH_PATCH, hdrs.METH_PUT):
            ends = loop.time() + self.faults.request_window
            if state.expires_at is None or ends < state.expires_at:
                state.expires_at = ends
        headers = self._upstream_headers(request)
        if faulty and blob_get and faults.ignore_range and hdrs.RANGE in headers:
            del headers[hdrs.RANGE]
            self.counters["ignore_range"] += 1
        cut_at: int | None = None
        if faulty and request.method in (hdrs.METH_PATCH, hdrs.METH_PUT) and request.body_exists:
            if self._roll(faults.cut_request):
                length = request.content_length
                cut_at = int(self._rng.random() * length) if length else self._rng.randrange(CHUNK)
        keep = cut_at is not None and faults.keep_received and request.method == hdrs.METH_PATCH
        if keep and cut_at is not None:
            if cut_at == 0 or not _shorten(headers, cut_at):  # nothing to keep: cut before forwarding
                self.counters["cut_request"] += 1
                _drop(request)
                return web.Response(status=499), 0
        body = self._request_body(request, faulty, cut_at, state, keep=keep) if request.body_exists else None
        assert self._session is not None
        raw_path = self._fresh_state(request) if faults.keep_received else request.raw_path
        target = URL(self.upstream + raw_path, encoded=True)
        try:
            upstream = await self._session.request(
                request.method, target, headers=headers, data=body, allow_redirects=False
            )
        except (aiohttp.ClientError, _CutRequest) as exc:
            if session is not None:  # the request ended here, cut or abandoned: the session was in use until now
                session.last = loop.time()
            if state.expired:
                self.counters[state.expired] += 1
                if state.session is not None and state.expired == "session_window_cuts":
                    self._expire(state.session)
                _drop(request)
                return web.Response(status=499), 0
            if cut_at is not None:
                self.counters["cut_request"] += 1
                _drop(request)
                return web.Response(status=499), 0
            self.counters["upstream_error"] += 1
            return web.Response(status=502, text=f"FaultProxy: upstream failed: {exc!r}"), 502
        if session is not None:
            session.last = loop.time()
            session.committed |= request.method == hdrs.METH_PUT and upstream.status == 201
        if faults.keep_received:
            self._remember_state(upstream.headers.get(hdrs.LOCATION, ""))
        if keep:  # the registry kept the first cut_at bytes; the client only sees its connection drop
            self.counters["cut_request"] += 1
            self.counters["cut_kept"] += 1
            upstream.release()
            _drop(request)
            return web.Response(status=499), 0
        async with upstream:
            return await self._relay(request, upstream, faulty=faulty, blob_get=blob_get), upstream.status

    async def _relay(
        self, request: web.Request, upstream: aiohttp.ClientResponse, *, faulty: bool, blob_get: bool
    ) -> web.StreamResponse:
        response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
        drop = HOP_BY_HOP | _connection_tokens(upstream.headers)
        for name, value in upstream.headers.items():
            if name.lower() in drop:
                continue
            if name.lower() == "location" and value.startswith(self.upstream):
                value = self.url + value[len(self.upstream) :]
                self.counters["location_rewritten"] += 1
            response.headers.add(name, value)
        length = upstream.content_length
        flip_at = cut_at = None
        if faulty and blob_get and upstream.status in (200, 206):
            if self._roll(self.faults.wrong_bytes) and length:
                flip_at = self._rng.randrange(length)
            if self._roll(self.faults.cut_response):
                cut_at = int(self._rng.random() * length) if length else self._rng.randrange(CHUNK)
        if faulty:
            response.headers.update(self.faults.headers)
        await response.prepare(request)
        sent, broken = 0, False
        try:
            async for data in upstream.content.iter_chunked(CHUNK):
                chunk = data if cut_at is None else data[: cut_at - sent]
                if flip_at is not None and sent <= flip_at < sent + len(chunk):
                    mutable = bytearray(chunk)
                    mutable[flip_at - sent] ^= 0xFF
                    chunk = bytes(mutable)
                    self.counters["wrong_bytes"] += 1
                await self._throttle(len(chunk), faulty)
                await response.write(chunk)
                sent += len(chunk)
                self.counters["bytes_to_client"] += len(chunk)
                if cut_at is not None and sent >= cut_at:
                    break
        except (aiohttp.ClientError, ConnectionError):
            self.counters["stream_error"] += 1  # upstream died or client left: nothing sane to send
            broken = True
        if broken or cut_at is not None:
            self.counters["cut_response"] += not broken
            upstream.close()
            _drop(request)
            return response
        await response.write_eof()
        return response

    async def _request_body(
        self, request: web.Request, faulty: bool, cut_at: int | None, state: _Body, *, keep: bool = False
    ) -> AsyncIterator[bytes]:
        """The body as it goes upstream; cut after ``cut_at`` bytes (``keep``: ended there cleanly)."""
        sent = 0
        chunks = request.content.iter_chunked(CHUNK).__aiter__()
        while True:
            chunk = b""
            try:
                async with asyncio.timeout_at(state.expires_at):  # also catches a client stalled past it
                    data = await anext(chunks)
                    chunk = data if cut_at is None else data[: cut_at - sent]
                    if chunk:
                        await self._throttle(len(chunk), faulty)
            except StopAsyncIteration:
                break
            except TimeoutError:
                pass
            if state.expires_at is not None and asyncio.get_running_loop().time() >= state.expires_at:
                state.expired = "request_window_cuts"
                if state.session is not None and self.faults.upload_window is not None:
                    if state.session.started + self.faults.upload_window <= state.expires_at:
                        state.expired = "session_window_cuts"
                raise _CutRequest(f"window ran out after {sent} bytes")
            if chunk:
                yield chunk
                sent += len(chunk)
                self.counters["bytes_to_upstream"] += len(chunk)
                if state.session is not None:
                    state.session.bytes += len(chunk)
            if cut_at is not None and sent >= cut_at:
                break
        if cut_at is not None and not keep:
            raise _CutRequest(f"cut after {sent} bytes")

    def _remember_state(self, location: str) -> None:
        match = UPLOAD_SESSION.match(URL(location).path) if location else None
        state = _STATE.search(location)
        if match and state:
            self._states[match.group(1)] = state.group(0)

    def _fresh_state(self, request: web.Request) -> str:
        """``request``'s path and query with its session's latest ``_state`` (keep_received)."""
        match = UPLOAD_SESSION.match(request.path)
        latest = self._states.get(match.group(1)) if match else None
        raw = request.raw_path
        if latest is None or latest in raw or not _STATE.search(raw):
            return raw
        self.counters["state_refreshed"] += 1
        return _STATE.sub(lambda _: latest, raw, count=1)

    def _refuse_size(self, request: web.Request) -> web.Response | None:
        """The registry's answer to a request over its size limits (``chunk_cap``, ``max_body``)."""
        if not request.body_exists:
            return None
        length = request.content_length
        span = _range_span(request.headers.get(hdrs.CONTENT_RANGE, ""))
        if length is None:
            length = span
        cap, limit = self.faults.chunk_cap, self.faults.max_body
        if cap is not None and request.method == hdrs.METH_PATCH and span is not None and (length or 0) > cap:
            self.counters["chunk_cap_refusals"] += 1
            error = {"code": "REQUESTED_RANGE_NOT_SATISFIABLE",
                     "message": GHCR_CHUNK_MESSAGE.format(limit=cap / (1 << 20)), "detail": None}
            return web.Response(status=416, text=json.dumps({"errors": [error]}), content_type="application/json")
        if limit is not None and (length or 0) > limit:
            self.counters["max_body_refusals"] += 1
            page = "<html><head><title>413 Request Entity Too Large</title></head><body>" \
                   "<center><h1>413 Request Entity Too Large</h1></center></body></html>"
            return web.Response(status=413, text=page, content_type="text/html")
        return None

    def _upstream_headers(self, request: web.Request) -> CIMultiDict[str]:
        drop = HOP_BY_HOP | NOT_FORWARDED | _connection_tokens(request.headers)
        headers = CIMultiDict((k, v) for k, v in request.headers.items() if k.lower() not in drop)
        headers[hdrs.HOST] = self.host
        return headers

    def _fault_response(self, status: int) -> web.Response:
        headers = dict(self.faults.headers)
        if status in (429, 503) and self.faults.retry_after is not None:
            headers[hdrs.RETRY_AFTER] = self.faults.retry_after
        code = "UNAVAILABLE" if status == 503 else ERROR_CODES.get(status, "UNKNOWN")
        error = {"code": code, "message": f"injected by FaultProxy (status {status})", "detail": None}
        return web.Response(
            status=status,
            text=json.dumps({"errors": [error]}),
            content_type="application/json",
            headers=headers,
        )


def _connection_tokens(headers: MultiMapping[str]) -> frozenset[str]:
    """Headers named in ``Connection`` are hop-by-hop too."""
    values = headers.getall(hdrs.CONNECTION, [])
    return frozenset(token.strip().lower() for value in values for token in value.split(","))


def _range_span(content_range: str) -> int | None:
    """Bytes named by an upload's ``Content-Range: <start>-<end>`` (None: absent or unreadable)."""
    start, _, end = content_range.removeprefix("bytes ").removeprefix("bytes=").partition("-")
    try:
        return int(end) - int(start) + 1
    except ValueError:
        return None


def _shorten(headers: CIMultiDict[str], length: int) -> bool:
    """Make a PATCH's headers describe only its first ``length`` bytes (False: cannot)."""
    headers[hdrs.CONTENT_LENGTH] = str(length)
    content_range = headers.get(hdrs.CONTENT_RANGE)
    if content_range is not None:
        start, _, _ = content_range.partition("-")
        if not start.isdigit():
            return False
        headers[hdrs.CONTENT_RANGE] = f"{int(start)}-{int(start) + length - 1}"
    return True


def _drop(request: web.Request) -> None:
    """Close the client's connection without finishing the response."""
    transport = request.transport
    if transport is not None:
        transport.close()

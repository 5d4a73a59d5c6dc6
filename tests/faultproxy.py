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
HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection",
     "te", "trailer", "trailers", "transfer-encoding", "upgrade"}
)  # fmt: skip
NOT_FORWARDED = frozenset({"host", "expect", "forwarded", "x-forwarded-host", "x-forwarded-proto"})
ERROR_CODES = {401: "UNAUTHORIZED", 403: "DENIED", 404: "NAME_UNKNOWN", 429: "TOOMANYREQUESTS"}


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
    ignore_range: bool = False  # blob GET: strip Range so the registry answers 200 with everything
    latency: float = 0.0  # seconds of sleep before forwarding
    bandwidth: float | None = None  # bytes/second shared by all bodies, both directions
    # seconds an upload session lives after its POST (a registry's upload window): later requests
    # on it get 404 BLOB_UPLOAD_UNKNOWN, and a body still streaming when it runs out is cut
    upload_window: float | None = None
    request_window: float | None = None  # seconds a PATCH/PUT body may stream; past that it is cut
    # SO_RCVBUF of the proxy's listening socket, read at start(): a small one keeps an emulated
    # uplink's backlog at the sender, as on a real link, not in a loopback buffer of megabytes
    recv_buffer: int | None = None
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
        status = 0
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
        body = self._request_body(request, faulty, cut_at, state) if request.body_exists else None
        assert self._session is not None
        target = URL(self.upstream + request.raw_path, encoded=True)
        try:
            upstream = await self._session.request(
                request.method, target, headers=headers, data=body, allow_redirects=False
            )
        except (aiohttp.ClientError, _CutRequest) as exc:
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
        self, request: web.Request, faulty: bool, cut_at: int | None, state: _Body
    ) -> AsyncIterator[bytes]:
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
        if cut_at is not None:
            raise _CutRequest(f"cut after {sent} bytes")

    def _upstream_headers(self, request: web.Request) -> CIMultiDict[str]:
        drop = HOP_BY_HOP | NOT_FORWARDED | _connection_tokens(request.headers)
        headers = CIMultiDict((k, v) for k, v in request.headers.items() if k.lower() not in drop)
        headers[hdrs.HOST] = self.host
        return headers

    def _fault_response(self, status: int) -> web.Response:
        headers = {}
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


def _drop(request: web.Request) -> None:
    """Close the client's connection without finishing the response."""
    transport = request.transport
    if transport is not None:
        transport.close()

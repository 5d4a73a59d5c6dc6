"""A forward HTTP proxy (what ``HTTP_PROXY`` names), for the tests of blobflow's proxy support.

Clients send it absolute-form requests (``GET http://registry.test:5000/v2/ HTTP/1.1``); it looks
the target host up in ``routes`` (a name the client never resolves: the proxy does, as a
corporate proxy resolves what its clients cannot) and forwards to that loopback address with the
client's ``Host``, so the registry's ``Location`` URLs keep naming the target. Bodies stream both
ways. Every request is recorded in ``seen``. ``TunnelProxy`` is the ``CONNECT`` kind, for HTTPS.
"""

from __future__ import annotations

import asyncio

import aiohttp
from aiohttp import hdrs, web
from faultproxy import CHUNK, HOP_BY_HOP
from yarl import URL


class ForwardProxy:
    def __init__(self, routes: dict[str, str]) -> None:
        """``routes``: the ``host:port`` a client asks for -> the ``host:port`` it really is."""
        self.routes = routes
        self.seen: list[tuple[str, str, str]] = []  # (method, host:port asked for, path and query)
        self.url = ""
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        app = web.Application(client_max_size=0)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}"
        self._session = aiohttp.ClientSession(auto_decompress=False)

    async def stop(self) -> None:
        if self._session is not None:
            await self._session.close()
        if self._runner is not None:
            await self._runner.cleanup()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        asked = request.headers.get(hdrs.HOST, "")
        self.seen.append((request.method, asked, request.path_qs))
        target = self.routes.get(asked)
        if target is None or not request.url.is_absolute() or request.url.scheme != "http":
            return web.Response(status=502, text=f"ForwardProxy: no route to {asked!r}")
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP | {"expect"}}
        body = request.content.iter_chunked(CHUNK) if request.body_exists else None
        assert self._session is not None
        async with self._session.request(request.method, URL(f"http://{target}{request.url.raw_path_qs}", encoded=True),
                                         headers=headers, data=body, allow_redirects=False) as upstream:
            response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
            for name, value in upstream.headers.items():
                if name.lower() not in HOP_BY_HOP:
                    response.headers.add(name, value)
            await response.prepare(request)
            async for data in upstream.content.iter_chunked(CHUNK):
                await response.write(data)
            await response.write_eof()
            return response


class TunnelProxy:
    """A ``CONNECT`` proxy (what ``HTTPS_PROXY`` names): the client asks for a tunnel to
    ``host:port``, the proxy connects to its route and then copies bytes both ways, TLS and all,
    without reading them. ``tunnels`` records each ``host:port`` asked for."""

    def __init__(self, routes: dict[str, str]) -> None:
        self.routes = routes
        self.tunnels: list[str] = []
        self.url = ""
        self._server: asyncio.Server | None = None
        self._pipes: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in self._pipes:
            task.cancel()
        await asyncio.gather(*self._pipes, return_exceptions=True)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        method, target, _ = head.split(b"\r\n", 1)[0].decode().split(" ", 2)
        route = self.routes.get(target) if method == "CONNECT" else None
        if route is None:
            writer.write(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n")
            writer.close()
            return
        self.tunnels.append(target)
        host, _, port = route.rpartition(":")
        up_reader, up_writer = await asyncio.open_connection(host, int(port))
        writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        for src, dst in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.create_task(_pipe(src, dst))
            self._pipes.add(task)
            task.add_done_callback(self._pipes.discard)


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(CHUNK):
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()

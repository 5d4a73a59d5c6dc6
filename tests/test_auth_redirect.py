"""Blob downloads redirected to a storage host (S3, a CDN): the signed URL is followed, and the
registry's token never reaches the other host.

Distribution's filesystem driver cannot redirect, so the registry here is a scripted one (the
``fake_registry`` fixture) that checks bearer tokens from the real test token service; the storage
host is a second loopback server that records every request's headers.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from aiohttp import web
from authenv import ACCOUNTS, READER, READER_PASSWORD, DockerHome, Pki, RunCli
from conftest import MakeFakeRegistry
from tokenserver import TokenServer

from blobflow.registry.auth import jwt_access

pytest_plugins = ["authenv"]

BLOB = random.Random(7).randbytes(300_000)
DIGEST = "sha256:" + hashlib.sha256(BLOB).hexdigest()
REPO = "team/app"


@dataclass
class Storage:
    """The second host: serves BLOB (with Range) at any path, and remembers each request's headers."""

    seen: list[dict[str, str]] = field(default_factory=list)
    host: str = ""

    async def handle(self, request: web.Request) -> web.Response:
        self.seen.append(dict(request.headers))
        rng = request.headers.get("Range")
        if rng:
            first, _, last = rng.removeprefix("bytes=").partition("-")
            start, end = int(first), min(int(last) if last else len(BLOB) - 1, len(BLOB) - 1)
            return web.Response(status=206, body=BLOB[start:end + 1],
                                headers={"Content-Range": f"bytes {start}-{end}/{len(BLOB)}"})
        return web.Response(body=BLOB)


@pytest.fixture
async def storage() -> AsyncIterator[Storage]:
    store = Storage()
    app = web.Application()
    app.router.add_route("GET", "/{tail:.*}", store.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    store.host = f"127.0.0.1:{runner.addresses[0][1]}"
    yield store
    await runner.cleanup()


@pytest.fixture
async def tokens(pki: Pki) -> AsyncIterator[TokenServer]:
    server = TokenServer(pki.signer, accounts=ACCOUNTS, tls=pki.server.server_context())
    await server.start()
    yield server
    await server.stop()


async def test_redirected_blob_get_sends_no_authorization_to_the_storage_host(
    fake_registry: MakeFakeRegistry, storage: Storage, tokens: TokenServer, docker_home: DockerHome,
    run_cli: RunCli, pki: Pki, tmp_path: Path,
) -> None:
    registry_auth: list[str] = []
    challenge = f'Bearer realm="{tokens.realm}",service="{tokens.service}",scope="repository:{REPO}:pull"'

    async def registry(request: web.Request) -> web.StreamResponse:
        auth = request.headers.get("Authorization", "")
        token = auth.removeprefix("Bearer ")
        if token not in tokens.values or ("repository", REPO, "pull") not in (jwt_access(token) or ()):
            return web.json_response({"errors": [{"code": "UNAUTHORIZED", "message": "authentication required"}]},
                                     status=401, headers={"WWW-Authenticate": challenge})
        registry_auth.append(auth)
        blob_path = f"/v2/{REPO}/blobs/{DIGEST}"
        if request.method == "HEAD" and request.path == blob_path:
            return web.Response(headers={"Content-Length": str(len(BLOB)), "Docker-Content-Digest": DIGEST})
        if request.path == blob_path:  # first hop: same host, relative Location
            return web.Response(status=307, headers={"Location": f"{blob_path}/signed"})
        if request.path == f"{blob_path}/signed":
            return web.Response(status=307, headers={
                "Location": f"http://{storage.host}/data/{DIGEST}?X-Amz-Signature=abc123&X-Amz-Expires=60"})
        return web.json_response({"errors": [{"code": "NAME_UNKNOWN"}]}, status=404)

    host = await fake_registry(registry)
    docker_home.login(host, READER, READER_PASSWORD)
    ca = ["--ca-file", str(pki.ca.cert_path)]
    whole = await run_cli("blob", "get", f"{host}/{REPO}@{DIGEST}", str(tmp_path / "whole"), *ca)
    assert whole.returncode == 0, whole.output
    ranged = await run_cli("blob", "get", f"{host}/{REPO}@{DIGEST}", str(tmp_path / "ranged"), "--part-size",
                           "64KiB", *ca)
    assert ranged.returncode == 0, ranged.output

    assert (tmp_path / "whole").read_bytes() == BLOB and (tmp_path / "ranged").read_bytes() == BLOB
    assert len(storage.seen) >= 1 + 4, "the ranged download did not go to storage in parts"
    assert all("Range" in h for h in storage.seen[1:])
    leaked = [h for h in storage.seen if "Authorization" in h or "authorization" in {k.lower() for k in h}]
    assert not leaked, f"Authorization reached the storage host: {leaked}"
    assert all(a.startswith("Bearer ") for a in registry_auth) and len(registry_auth) >= 2 * len(storage.seen)
    assert tokens.tokens_for(READER)

"""HTTP(S)_PROXY and NO_PROXY, read from the environment as docker, skopeo and crane read them.

Users mirror from public registries through corporate proxies; before, blobflow ignored the
variables and tried every registry directly. The end-to-end test names the registry
``registry.test``, a name only the proxy knows (``getaddrinfo`` refuses it in this process, so a
direct attempt fails at once and nothing leaves the machine).
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from authenv import ACCOUNTS, PUSHER, PUSHER_PASSWORD, Pki
from conftest import CheckLayout
from forwardproxy import ForwardProxy, TunnelProxy
from tokenserver import TokenServer

import blobflow
from blobflow.localreg import LocalRegistry, TlsFiles, TokenAuth
from blobflow.registry import Credentials
from blobflow.registry._http import proxy_for
from blobflow.synth import build_image

pytest_plugins = ["authenv"]

PROXY_VARS = ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "no_proxy", "NO_PROXY", "all_proxy",
              "ALL_PROXY", "REQUEST_METHOD")


@pytest.fixture
def clean_proxy_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in PROXY_VARS:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


@pytest.mark.parametrize(("url", "expected"), [
    ("https://ghcr.io/v2/", "http://proxy:3128"),
    ("http://ghcr.io/v2/", "http://proxy2:8080"),          # http uses HTTP_PROXY, without a scheme: http://
    ("https://mirror.internal.example/v2/", None),          # a subdomain of a NO_PROXY name
    ("https://internal.example/v2/", None),
    ("https://notinternal.example/v2/", "http://proxy:3128"),  # a suffix, not a subdomain
    ("https://x.corp/v2/", None),                           # .corp
    ("https://10.1.2.3/v2/", None),                         # 10.0.0.0/8
    ("https://11.1.2.3/v2/", "http://proxy:3128"),
    ("http://reg.example:5000/v2/", None),                  # host:port
    ("http://reg.example:5001/v2/", "http://proxy2:8080"),
    ("https://localhost:5000/v2/", None),                   # loopback never goes through a proxy
    ("http://127.0.0.1:5000/v2/", None),
    ("https://[::1]:5000/v2/", None),
])
def test_which_requests_go_through_which_proxy(url: str, expected: str | None,
                                                clean_proxy_env: pytest.MonkeyPatch) -> None:
    clean_proxy_env.setenv("HTTPS_PROXY", "http://proxy:3128")
    clean_proxy_env.setenv("http_proxy", "proxy2:8080")
    clean_proxy_env.setenv("NO_PROXY", "internal.example, .corp,10.0.0.0/8,reg.example:5000")
    assert proxy_for(url) == expected


def test_proxy_variables_follow_the_usual_rules(clean_proxy_env: pytest.MonkeyPatch) -> None:
    assert proxy_for("https://ghcr.io/v2/") is None  # none set
    clean_proxy_env.setenv("HTTPS_PROXY", "http://upper:1")
    clean_proxy_env.setenv("https_proxy", "http://lower:1")
    assert proxy_for("https://ghcr.io/v2/") == "http://lower:1"  # lowercase first, as curl and urllib
    clean_proxy_env.setenv("no_proxy", "*")
    assert proxy_for("https://ghcr.io/v2/") is None
    clean_proxy_env.delenv("no_proxy")
    clean_proxy_env.setenv("REQUEST_METHOD", "GET")  # under CGI, HTTP_PROXY may come from a request header
    clean_proxy_env.setenv("HTTP_PROXY", "http://attacker:1")
    assert proxy_for("http://ghcr.io/v2/") is None


@pytest.fixture
def unresolvable(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """``registry.test`` cannot be resolved here; the lookups tried are recorded."""
    tried: list[str] = []
    real = socket.getaddrinfo

    def getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(host, str) and host.endswith(".test"):
            tried.append(host)
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return tried


@pytest.fixture
async def forward_proxy(registry: LocalRegistry) -> AsyncIterator[ForwardProxy]:
    proxy = ForwardProxy({f"registry.test:{registry.port}": registry.host})
    await proxy.start()
    try:
        yield proxy
    finally:
        await proxy.stop()


async def test_push_and_pull_go_through_the_proxy_the_environment_names(
        forward_proxy: ForwardProxy, registry: LocalRegistry, unresolvable: list[str],
        clean_proxy_env: pytest.MonkeyPatch, tmp_path: Path, check_layout: CheckLayout) -> None:
    clean_proxy_env.setenv("HTTP_PROXY", forward_proxy.url)
    src = tmp_path / "src"
    build_image(src, "v1", [5 * 1024 * 1024, 40_000], seed=14)  # one chunked upload, one monolithic
    target = f"registry.test:{registry.port}/behind/proxy:v1"
    client = blobflow.Client(blobflow.EngineConfig(plain_http=True, chunk_size=1024 * 1024, part_size=1024 * 1024))
    pushed = await client.push(src, target)
    pulled = await client.pull(target, tmp_path / "out")
    assert pushed.blobs == pulled.blobs == 3
    check_layout(tmp_path / "out")
    assert unresolvable == [], "blobflow looked the registry up itself instead of asking the proxy"
    methods = {method for method, host, _ in forward_proxy.seen if host == f"registry.test:{registry.port}"}
    assert {"HEAD", "POST", "PATCH", "PUT", "GET"} <= methods
    assert len(forward_proxy.seen) >= 12  # every request: nothing went around the proxy

    clean_proxy_env.setenv("NO_PROXY", "registry.test")  # now direct: the name does not resolve here
    before = len(forward_proxy.seen)
    with pytest.raises(blobflow.BlobflowError, match=r"cannot connect to registry\.test"):
        await blobflow.Client(blobflow.EngineConfig(plain_http=True, retries=0)).pull(target, tmp_path / "out2")
    assert len(forward_proxy.seen) == before and unresolvable


async def test_a_proxy_that_is_not_there_is_named(registry: LocalRegistry, clean_proxy_env: pytest.MonkeyPatch,
                                                  unresolvable: list[str], tmp_path: Path) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    clean_proxy_env.setenv("HTTP_PROXY", f"http://127.0.0.1:{port}")
    with pytest.raises(blobflow.BlobflowError) as info:
        await blobflow.Client(blobflow.EngineConfig(plain_http=True, retries=0)).pull(
            f"registry.test:{registry.port}/p:v1", tmp_path / "out")
    assert f"cannot connect to the proxy 127.0.0.1:{port}" in str(info.value)
    assert "HTTP_PROXY" in str(info.value)


@pytest.fixture
async def tunnel(clean_proxy_env: pytest.MonkeyPatch) -> AsyncIterator[TunnelProxy]:
    """A CONNECT proxy named by HTTPS_PROXY; tests add its routes."""
    proxy = TunnelProxy({})
    await proxy.start()
    clean_proxy_env.setenv("HTTPS_PROXY", proxy.url)
    try:
        yield proxy
    finally:
        await proxy.stop()


@pytest.fixture
def named_tls_registry(pki: Pki, tunnel: TunnelProxy, tmp_path: Path) -> Iterator[Callable[..., LocalRegistry]]:
    """``start(cert_name, **registry_options)``: a TLS registry whose certificate names only
    ``cert_name``, routed by the tunnel as registry.test:PORT; stopped after the test."""
    started: list[LocalRegistry] = []

    def start(cert_name: str = "registry.test", **options: Any) -> LocalRegistry:
        cert = pki.ca.issue(f"cert-{len(started)}", dns_names=(cert_name,))
        registry = LocalRegistry(tmp_path / f"tls-registry-{len(started)}",
                                 tls=TlsFiles(cert.cert_path, cert.key_path), **options)
        registry.start()
        started.append(registry)
        tunnel.routes[f"registry.test:{registry.port}"] = registry.host
        return registry

    try:
        yield start
    finally:
        for registry in started:
            registry.stop()


async def test_https_goes_through_a_connect_tunnel_and_still_checks_the_registry_name(
        pki: Pki, tunnel: TunnelProxy, named_tls_registry: Callable[..., LocalRegistry], unresolvable: list[str],
        tmp_path: Path, check_layout: CheckLayout) -> None:
    """HTTPS_PROXY: the client asks the proxy for a tunnel to registry.test:PORT and speaks TLS
    through it, verifying the certificate against that name (not the proxy's address)."""
    registry = named_tls_registry()
    src = tmp_path / "src"
    build_image(src, "v1", [300_000], seed=15)
    target = f"registry.test:{registry.port}/through/tunnel:v1"
    client = blobflow.Client(blobflow.EngineConfig(ca_file=str(pki.ca.cert_path)))
    await client.push(src, target)
    await client.pull(target, tmp_path / "out")
    check_layout(tmp_path / "out")
    assert unresolvable == [] and tunnel.tunnels and set(tunnel.tunnels) == {f"registry.test:{registry.port}"}

    elsewhere = named_tls_registry("elsewhere.test")  # a certificate for another name
    with pytest.raises(blobflow.BlobflowError, match="not trusted"):
        await blobflow.Client(blobflow.EngineConfig(ca_file=str(pki.ca.cert_path), retries=0)).pull(
            f"registry.test:{elsewhere.port}/through/tunnel:v1", tmp_path / "out2")


async def test_bearer_tokens_are_fetched_through_the_proxy_too(
        pki: Pki, tunnel: TunnelProxy, named_tls_registry: Callable[..., LocalRegistry], unresolvable: list[str],
        tmp_path: Path) -> None:
    """The token service is another host behind the proxy (auth.docker.io for Docker Hub): its
    requests take the same HTTPS_PROXY as the registry's."""
    auth_cert = pki.ca.issue("auth-test", dns_names=("auth.test",))
    tokens = TokenServer(pki.signer, accounts=ACCOUNTS, tls=auth_cert.server_context(), public_name="auth.test")
    await tokens.start()
    try:
        registry = named_tls_registry(
            token_auth=TokenAuth(tokens.realm, tokens.service, tokens.issuer, pki.ca.cert_path))
        auth_at = tokens.realm.removeprefix("https://").removesuffix("/token")
        tunnel.routes[auth_at] = auth_at.replace("auth.test", "127.0.0.1")
        src = tmp_path / "src"
        build_image(src, "v1", [100_000], seed=16)
        host = f"registry.test:{registry.port}"
        client = blobflow.Client(blobflow.EngineConfig(ca_file=str(pki.ca.cert_path)),
                                 credentials={host: Credentials(PUSHER, PUSHER_PASSWORD)})
        await client.push(src, f"{host}/team/app:v1")
        assert tokens.tokens_for(PUSHER), "no token was issued"
        assert auth_at in tunnel.tunnels and host in tunnel.tunnels and unresolvable == []
    finally:
        await tokens.stop()

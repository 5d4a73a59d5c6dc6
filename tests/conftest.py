"""Shared fixtures: real Distribution registries, a fault proxy in front of them, unique repo names.

A registry starts in about 40 ms, so each test gets its own (function scope): no shared state, and
teardown stops it whether the test passed or failed. A missing ``docker-registry`` binary is an
error (LocalRegistry.start raises RuntimeError), never a skip.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import pytest
from faultproxy import FaultProxy, Faults

from blobflow.localreg import LocalRegistry, write_htpasswd

AUTH_USER = "alice"
AUTH_PASSWORD = "wonderland-s3cret"

MakeProxy = Callable[..., Awaitable[FaultProxy]]


def _run_registry(root: Path, *, htpasswd: Path | None = None) -> Iterator[LocalRegistry]:
    registry = LocalRegistry(root, htpasswd=htpasswd)
    try:
        registry.start()
        yield registry
    finally:
        registry.stop()


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[LocalRegistry]:
    """A running registry with its own storage, without auth."""
    yield from _run_registry(tmp_path / "registry")


@pytest.fixture
def registry2(tmp_path: Path) -> Iterator[LocalRegistry]:
    """A second, independent registry (for copies between registries)."""
    yield from _run_registry(tmp_path / "registry2")


@pytest.fixture
def auth_credentials() -> tuple[str, str]:
    """(user, password) accepted by ``auth_registry``."""
    return AUTH_USER, AUTH_PASSWORD


@pytest.fixture
def auth_registry(tmp_path: Path) -> Iterator[LocalRegistry]:
    """A registry behind htpasswd basic auth for ``alice`` / ``wonderland-s3cret``."""
    htpasswd = tmp_path / "htpasswd"
    write_htpasswd(htpasswd, {AUTH_USER: AUTH_PASSWORD}, rounds=4)  # cheapest cost: checked per request
    yield from _run_registry(tmp_path / "auth-registry", htpasswd=htpasswd)


@pytest.fixture
def docker_config(auth_registry: LocalRegistry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A DOCKER_CONFIG directory whose config.json holds alice's credentials for ``auth_registry``."""
    directory = tmp_path / "docker-config"
    directory.mkdir()
    token = base64.b64encode(f"{AUTH_USER}:{AUTH_PASSWORD}".encode()).decode()
    config = {"auths": {auth_registry.host: {"auth": token}}}
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    monkeypatch.setenv("DOCKER_CONFIG", str(directory))
    return directory


@pytest.fixture
async def proxy() -> AsyncIterator[MakeProxy]:
    """A factory: ``await proxy(registry, Faults(...))`` starts a FaultProxy, stopped after the test."""
    started: list[FaultProxy] = []

    async def make(upstream: LocalRegistry | str, faults: Faults | None = None) -> FaultProxy:
        url = upstream.url if isinstance(upstream, LocalRegistry) else upstream
        fault_proxy = FaultProxy(url, faults if faults is not None else Faults())
        await fault_proxy.start()
        started.append(fault_proxy)
        return fault_proxy

    try:
        yield make
    finally:
        for fault_proxy in reversed(started):
            await fault_proxy.stop()


@pytest.fixture
def repo_name(request: pytest.FixtureRequest) -> str:
    """A repository name unique to the test, valid for Distribution: ``<module>/<test>``."""
    module = Path(str(request.node.path)).stem
    parts = [_component(module), _component(request.node.name)]
    name = "/".join(parts)
    if len(name) > 120:
        digest = hashlib.sha256(request.node.nodeid.encode()).hexdigest()[:10]
        name = f"{name[:100].rstrip('/-_')}-{digest}"
    return name


def _component(text: str) -> str:
    """Lowercase alphanumerics joined by single '-', as Distribution's path-component grammar allows."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "x"

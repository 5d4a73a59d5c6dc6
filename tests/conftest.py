"""Shared fixtures: real Distribution registries, a fault proxy in front of them, unique repo names.

A registry starts in about 40 ms, so each test gets its own (function scope): no shared state, and
teardown stops it whether the test passed or failed. A missing ``docker-registry`` binary is an
error (LocalRegistry.start raises RuntimeError), never a skip.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import re
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from faultproxy import FaultProxy, Faults

from blobflow.localreg import LocalRegistry, write_htpasswd

AUTH_USER = "alice"
AUTH_PASSWORD = "wonderland-s3cret"

MakeProxy = Callable[..., Awaitable[FaultProxy]]


def sigint_as_at_a_terminal() -> None:
    """``preexec_fn`` for a CLI the test will interrupt: SIGINT at its default, as a command typed
    at a terminal has it. A suite started in the background by a non-interactive shell passes
    SIGINT on ignored, and Python then never installs its Ctrl-C handler: the command would run to
    the end and exit 0 (two interrupt tests failed so when ``.ci/run`` was started with ``&``)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _run_registry(root: Path, *, htpasswd: Path | None = None) -> Iterator[LocalRegistry]:
    registry = LocalRegistry(root, htpasswd=htpasswd)
    try:
        registry.start()
        yield registry
    finally:
        registry.stop()


@pytest.fixture(autouse=True)
def _state_home_of_its_own(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Jobs that are not given ``--state-dir`` keep their resume records and mount hints under
    ``$XDG_STATE_HOME``: each test gets its own, never the user's and never another test's (a
    registry started on a port an earlier test's registry had would meet that one's hints)."""
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path_factory.mktemp("state-home")))


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


# -- end-to-end helpers: the CLI in a subprocess, a scripted fake registry, layout checks ----------

CLI_TIMEOUT = 90.0


@dataclass(frozen=True)
class CliResult:
    """What one ``python -m blobflow ...`` run did."""

    returncode: int
    stdout: str
    stderr: str
    stdout_bytes: bytes = b""  # stdout as it came (``stdout`` is decoded)

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


Cli = Callable[..., Awaitable[CliResult]]


@pytest.fixture
def cli() -> Cli:
    """``await cli("pull", IMAGE, DIR, env={...}, stdin="...")`` runs the CLI in a subprocess.

    Asynchronous, so registries, fault proxies and fake registries served by the test's own event
    loop keep answering while the command runs. ``env`` entries are added to (None: removed from)
    the current environment, which fixtures such as ``docker_config`` have already set up.
    """

    async def run(*args: str, env: Mapping[str, str | None] | None = None,
                  stdin: str | bytes | None = None) -> CliResult:
        environ = dict(os.environ)
        for key, value in (env or {}).items():
            if value is None:
                environ.pop(key, None)
            else:
                environ[key] = value
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "blobflow", *args, env=environ,
            stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        try:
            async with asyncio.timeout(CLI_TIMEOUT):
                out, err = await proc.communicate(stdin.encode() if isinstance(stdin, str) else stdin)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise AssertionError(f"blobflow {' '.join(args)} did not finish in {CLI_TIMEOUT} s") from None
        except asyncio.CancelledError:  # a run beside it failed: leave no process behind for later tests
            proc.kill()
            await proc.wait()
            raise
        assert proc.returncode is not None
        return CliResult(proc.returncode, out.decode(errors="replace"), err.decode(errors="replace"), out)

    return run


FakeHandler = Callable[[web.Request], Awaitable[web.StreamResponse]]
MakeFakeRegistry = Callable[[FakeHandler], Awaitable[str]]


@pytest.fixture
async def fake_registry() -> AsyncIterator[MakeFakeRegistry]:
    """A factory: ``host = await fake_registry(handler)`` serves plain HTTP on 127.0.0.1.

    ``GET /v2/`` answers 200 (no auth); every other request goes to ``handler``. For registry
    misbehaviour a real Distribution cannot be made to show (bad manifests, odd headers).
    """
    runners: list[web.AppRunner] = []

    async def start(handler: FakeHandler) -> str:
        async def route(request: web.Request) -> web.StreamResponse:
            if request.path == "/v2/":
                return web.json_response({}, headers={"Docker-Distribution-API-Version": "registry/2.0"})
            return await handler(request)

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", route)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        runners.append(runner)
        return f"127.0.0.1:{runner.addresses[0][1]}"

    try:
        yield start
    finally:
        for runner in reversed(runners):
            await runner.cleanup()


@dataclass(frozen=True)
class LayoutContents:
    """An OCI layout as ``check_layout`` reads it: its tags and every blob its index reaches."""

    tags: dict[str, str]  # ref.name -> digest of the tagged manifest or index
    entries: list[dict[str, Any]]  # index.json's manifests
    reachable: set[str]  # digests of every manifest, index, config and layer referenced
    files: set[str]  # digests of every file under blobs/sha256


CheckLayout = Callable[[Path], LayoutContents]


@pytest.fixture
def check_layout() -> CheckLayout:
    """``check_layout(DIR)`` asserts DIR is a sound OCI layout and returns what it holds.

    Sound: ``oci-layout`` and ``index.json`` parse; nothing else is there but ``blobs/sha256``, whose
    files are each named by 64 hex digits and hold bytes with that sha256 (no temporary or partial
    files left); every blob reachable from ``index.json`` exists with the size its descriptor
    states. Independent of blobflow's own layout code on purpose.
    """
    return _read_layout


def _read_layout(root: Path) -> LayoutContents:
    assert json.loads((root / "oci-layout").read_text())["imageLayoutVersion"] == "1.0.0"
    index = json.loads((root / "index.json").read_text())
    blob_dir = root / "blobs" / "sha256"
    files = set()
    for path in sorted(blob_dir.iterdir()):
        assert re.fullmatch(r"[0-9a-f]{64}", path.name), f"stray file in the layout: {path.name}"
        actual = hashlib.sha256(path.read_bytes()).hexdigest()
        assert actual == path.name, f"blob {path.name} holds bytes with sha256 {actual}"
        files.add(f"sha256:{path.name}")
    leftovers = [p.name for p in blob_dir.parent.iterdir() if p.name != "sha256"]
    leftovers += [p.name for p in root.iterdir() if p.name not in ("oci-layout", "index.json", "blobs")]
    assert not leftovers, f"unexpected entries in the layout: {leftovers}"
    reachable: set[str] = set()

    def walk(desc: dict[str, Any]) -> None:
        digest = desc["digest"]
        path = blob_dir / digest.removeprefix("sha256:")
        assert path.is_file(), f"{digest} is referenced but missing"
        assert path.stat().st_size == desc["size"], f"{digest} has the wrong size"
        reachable.add(digest)
        media_type = desc.get("mediaType", "")
        if "manifest" in media_type or "index" in media_type:
            doc = json.loads(path.read_bytes())
            for child in doc.get("manifests", []):
                walk(child)
            if "config" in doc:
                walk(doc["config"])
            for layer in doc.get("layers", []):
                walk(layer)

    tags = {}
    for entry in index["manifests"]:
        walk(entry)
        name = (entry.get("annotations") or {}).get("org.opencontainers.image.ref.name")
        if name is not None:
            assert name not in tags, f"tag {name} appears twice in index.json"
            tags[name] = entry["digest"]
    return LayoutContents(tags, index["manifests"], reachable, files)

"""Fixtures for the auth and TLS tests (a pytest plugin: ``pytest_plugins = ["authenv"]``).

A CA is minted once per test session; each test gets its own token service (aiohttp, HTTPS, on
the test's event loop) and its own Distribution registry serving HTTPS with a certificate from
that CA and trusting the token service's signer (``auth: token``), as GHCR, Docker Hub and the
cloud registries are set up. ``DOCKER_CONFIG`` always points into the test's tmp dir, so the
machine's own docker credentials are never read or written.

Test modules also import names from here, before pytest loads it as a plugin, so assertion
rewriting is off for it (PYTEST_DONT_REWRITE); its few asserts are plain ones.
"""

from __future__ import annotations

import base64
import json
import os
import ssl
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from conftest import Cli, CliResult
from faultproxy import FaultProxy, Faults
from pki import CertificateAuthority, IssuedCert
from tokenserver import PULL, PUSH, Account, TokenServer

from blobflow.localreg import LocalRegistry, TlsFiles, TokenAuth
from blobflow.synth import build_image

READER, READER_PASSWORD = "reader", "reader-pw-5f3a1c"
PUSHER, PUSHER_PASSWORD = "pusher", "pusher-pw-9d2e7b"
ACCOUNTS = {READER: Account(READER_PASSWORD, {"*": PULL}), PUSHER: Account(PUSHER_PASSWORD, {"*": PUSH})}


@dataclass(frozen=True)
class Pki:
    ca: CertificateAuthority
    server: IssuedCert  # the registry's (and token service's) TLS certificate, for 127.0.0.1
    signer: IssuedCert  # signs the token service's JWTs
    other_ca: CertificateAuthority  # trusted by nobody: the "wrong CA"


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    root = tmp_path_factory.mktemp("pki")
    ca = CertificateAuthority(root / "ca")
    return Pki(ca, ca.issue("registry"), ca.issue("token-signer", server=False),
               CertificateAuthority(root / "other", "unrelated-ca"))


@dataclass
class TokenRegistry:
    """A registry with token auth over TLS, and the token service it trusts."""

    registry: LocalRegistry
    tokens: TokenServer
    ca_file: Path

    @property
    def host(self) -> str:
        return self.registry.host


MakeTokenRegistry = Callable[..., Awaitable[TokenRegistry]]


@pytest.fixture
async def make_token_registry(pki: Pki, tmp_path: Path) -> AsyncIterator[MakeTokenRegistry]:
    """``await make_token_registry(ttl=3)``: a token service and a registry trusting it, both HTTPS."""
    tokens_started: list[TokenServer] = []
    registries: list[LocalRegistry] = []

    async def make(*, ttl: float = 60.0, advertised_ttl: float | None = None,
                   accounts: Mapping[str, Account] | None = None,
                   anonymous: Mapping[str, frozenset[str]] | None = None) -> TokenRegistry:
        tokens = TokenServer(pki.signer, accounts=accounts or ACCOUNTS, anonymous=anonymous, ttl=ttl,
                             advertised_ttl=advertised_ttl, tls=pki.server.server_context())
        await tokens.start()
        tokens_started.append(tokens)
        registry = LocalRegistry(
            tmp_path / f"registry-{len(registries)}",
            tls=TlsFiles(pki.server.cert_path, pki.server.key_path),
            token_auth=TokenAuth(tokens.realm, tokens.service, tokens.issuer, pki.ca.cert_path))
        registries.append(registry)
        registry.start()
        return TokenRegistry(registry, tokens, pki.ca.cert_path)

    try:
        yield make
    finally:
        for registry in registries:
            registry.stop()
        for tokens in tokens_started:
            await tokens.stop()


@pytest.fixture
async def token_registry(make_token_registry: MakeTokenRegistry) -> TokenRegistry:
    return await make_token_registry()


MakeTlsProxy = Callable[[TokenRegistry, Faults], Awaitable[FaultProxy]]


@pytest.fixture
async def make_tls_proxy(pki: Pki) -> AsyncIterator[MakeTlsProxy]:
    """``await make_tls_proxy(reg, Faults(...))``: a FaultProxy serving HTTPS (same CA) in front of ``reg``."""
    started: list[FaultProxy] = []

    async def make(reg: TokenRegistry, faults: Faults) -> FaultProxy:
        upstream = ssl.create_default_context(cafile=str(reg.ca_file))
        front = FaultProxy(reg.registry.url, faults, tls=pki.server.server_context(), upstream_tls=upstream)
        await front.start()
        started.append(front)
        return front

    try:
        yield make
    finally:
        for front in reversed(started):
            await front.stop()


@dataclass
class DockerHome:
    """``$DOCKER_CONFIG`` for one test: what a user's ``~/.docker`` would hold."""

    directory: Path
    bin_dir: Path  # prepended to PATH: credential helpers written by the test live here
    helper_log: Path = field(init=False)

    def __post_init__(self) -> None:
        self.helper_log = self.directory / "helper-calls.log"

    @property
    def config_path(self) -> Path:
        return self.directory / "config.json"

    def write(self, config: Mapping[str, Any]) -> None:
        self.config_path.write_text(json.dumps(config, indent=2))

    def read(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(self.config_path.read_text())
        return data

    def login(self, registry: str, user: str, password: str) -> None:
        """What ``docker login`` writes without a credential helper."""
        auth = base64.b64encode(f"{user}:{password}".encode()).decode()
        self.write({"auths": {registry: {"auth": auth}}})

    def add_helper(self, name: str, store: Mapping[str, tuple[str, str]]) -> Path:
        """A ``docker-credential-<name>`` executable: ``get`` answers from ``store`` (server ->
        (user, secret)) and then from what ``store`` saved; ``store``/``erase`` keep a JSON file.
        Every call is logged (action and server, never the secret) to :attr:`helper_log`."""
        saved = self.directory / f"helper-{name}.json"
        saved.write_text(json.dumps({k: list(v) for k, v in store.items()}))
        path = self.bin_dir / f"docker-credential-{name}"
        path.write_text(f"""#!{sys.executable}
import json, sys
action = sys.argv[1]
saved_path, log_path = {str(saved)!r}, {str(self.helper_log)!r}
saved = json.load(open(saved_path))
data = sys.stdin.read()
if action == "store":
    req = json.loads(data)
    server = req["ServerURL"]
    saved[server] = [req["Username"], req["Secret"]]
    json.dump(saved, open(saved_path, "w"))
else:
    server = data.strip()
open(log_path, "a").write(action + " " + server + "\\n")
if action == "erase":
    if saved.pop(server, None) is None:
        print("credentials not found in native keychain")
        sys.exit(1)
    json.dump(saved, open(saved_path, "w"))
if action == "get":
    if server not in saved:
        print("credentials not found in native keychain")
        sys.exit(1)
    user, secret = saved[server]
    print(json.dumps({{"ServerURL": server, "Username": user, "Secret": secret}}))
""")
        path.chmod(0o755)
        return path

    def helper_saved(self, name: str) -> dict[str, list[str]]:
        data: dict[str, list[str]] = json.loads((self.directory / f"helper-{name}.json").read_text())
        return data


@pytest.fixture
def docker_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> DockerHome:
    directory = tmp_path / "docker-home"
    bin_dir = tmp_path / "bin"
    directory.mkdir()
    bin_dir.mkdir()
    monkeypatch.setenv("DOCKER_CONFIG", str(directory))
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
    return DockerHome(directory, bin_dir)


Run = CliResult
RunCli = Cli


@pytest.fixture
def run_cli(cli: Cli) -> RunCli:
    """``await run_cli("login", ..., stdin="secret\\n", env={...})``: conftest's ``cli``, under the
    name these tests use."""
    return cli


@pytest.fixture
def small_image(tmp_path: Path) -> Path:
    """An OCI layout holding ``v1``: one small image (config and two layers)."""
    root = tmp_path / "small-image"
    build_image(root, "v1", [64 * 1024, 96 * 1024], seed=11)
    return root

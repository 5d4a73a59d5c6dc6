"""A throwaway CNCF Distribution registry on 127.0.0.1, for tests, `make demo` and benches.

Stdlib only (the engine's aiohttp code never runs here), so a broken client cannot break the fixture
that tests it. The registry gets its own config file, storage and log under ``root``; it listens on
127.0.0.1 only (no debug server, no outbound health checks, no notifications), and any
``REGISTRY_*`` environment variables, which Distribution would let override the file, are dropped.
"""

from __future__ import annotations

import ctypes
import json
import os
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import weakref
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

__all__ = ["LocalRegistry", "TlsFiles", "TokenAuth", "write_htpasswd"]

_MISSING = "docker-registry not found: install the Debian package docker-registry (make setup does it)"
_ADDRESS_IN_USE = "address already in use"
_PORT_ATTEMPTS = 3
_LOG_TAIL = 4000


@dataclass(frozen=True)
class TlsFiles:
    """The registry serves HTTPS with this certificate chain and key (PEM files)."""

    certificate: Path
    key: Path


@dataclass(frozen=True)
class TokenAuth:
    """Distribution's ``auth: token``: clients get bearer tokens (JWTs) from ``realm``.

    The registry accepts a token when its ``iss`` is ``issuer``, its ``aud`` is ``service``, and its
    signing certificate (the JWT's ``x5c``) chains up to a certificate in ``rootcertbundle``.
    """

    realm: str
    service: str
    issuer: str
    rootcertbundle: Path


class LocalRegistry:
    """A throwaway CNCF Distribution registry (the `docker-registry` binary) on 127.0.0.1.

    Plain HTTP without auth by default; ``htpasswd`` adds basic auth, ``token_auth`` bearer tokens
    from a token service (the two are exclusive), ``tls`` serves HTTPS, ``read_only`` refuses
    every write (Distribution's maintenance mode), ``pull_through`` makes it a pull-through cache
    of the registry at that URL, ``foreign_urls`` (a regex) lets manifests name foreign layers at
    URLs that match it (Distribution refuses any such URL by default).
    """

    def __init__(
        self,
        root: Path,
        *,
        htpasswd: Path | None = None,
        port: int | None = None,
        binary: str = "docker-registry",
        log_level: str = "error",
        tls: TlsFiles | None = None,
        token_auth: TokenAuth | None = None,
        read_only: bool = False,
        pull_through: str | None = None,
        foreign_urls: str | None = None,
    ) -> None:
        if htpasswd is not None and token_auth is not None:
            raise ValueError("a registry has one auth method: htpasswd or token_auth, not both")
        self.root = Path(root)
        self.htpasswd = htpasswd
        self.tls = tls
        self.token_auth = token_auth
        self.read_only = read_only
        self.pull_through = pull_through
        self.foreign_urls = foreign_urls
        self.binary = binary
        self.log_level = log_level
        self.storage = self.root / "storage"
        self.config_path = self.root / "config.yml"
        self.log_path = self.root / "registry.log"
        self._requested_port = port
        self._port: int | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._finalizer: weakref.finalize[Any, LocalRegistry] | None = None

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("LocalRegistry is not started")
        return self._port

    @property
    def host(self) -> str:
        """``127.0.0.1:PORT``, the registry's name in image references and docker config."""
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.host}"

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    def start(self, timeout: float = 15.0) -> None:
        """Write the config, spawn ``docker-registry serve`` and wait until GET /v2/ answers."""
        if self._proc is not None:
            raise RuntimeError("LocalRegistry is already started")
        executable = shutil.which(self.binary)
        if executable is None:
            raise RuntimeError(_MISSING)
        needed: list[tuple[str, Path | None]] = [("htpasswd file", self.htpasswd)]
        if self.tls is not None:
            needed += [("TLS certificate", self.tls.certificate), ("TLS key", self.tls.key)]
        if self.token_auth is not None:
            needed.append(("token rootcertbundle", self.token_auth.rootcertbundle))
        for what, path in needed:
            if path is not None and not path.is_file():
                raise FileNotFoundError(f"{what} not found: {path}")
        self.storage.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + timeout
        attempts = 1 if self._requested_port is not None else _PORT_ATTEMPTS
        for attempt in range(attempts):
            port = self._requested_port or _free_port()
            self._spawn(executable, port)
            try:
                self._wait_ready(deadline)
                return
            except RuntimeError as exc:
                self.stop()
                if _ADDRESS_IN_USE not in str(exc) or attempt == attempts - 1:
                    raise

    def stop(self) -> None:
        """Terminate the registry (SIGTERM, then SIGKILL after 5 s); safe to call twice."""
        proc, self._proc = self._proc, None
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None
        if proc is not None:
            terminate(proc)

    def __enter__(self) -> LocalRegistry:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def storage_bytes(self) -> int:
        """Total size of the files under the storage directory (blobs, links, upload leftovers)."""
        total = 0
        for dirpath, _dirs, files in os.walk(self.storage):
            for name in files:
                total += os.lstat(os.path.join(dirpath, name)).st_size
        return total

    def log_tail(self, limit: int = _LOG_TAIL) -> str:
        """The end of the registry's combined stdout/stderr log."""
        try:
            data = self.log_path.read_bytes()
        except FileNotFoundError:
            return ""
        return data[-limit:].decode("utf-8", "replace")

    def _spawn(self, executable: str, port: int) -> None:
        self._port = port
        self.config_path.write_text(_render_yaml(self._config(port)))
        env = {k: v for k, v in os.environ.items() if not k.startswith("REGISTRY_")}
        with open(self.log_path, "wb") as log:
            self._proc = subprocess.Popen(
                [executable, "serve", str(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                preexec_fn=_parent_death_signal(),
            )
        self._finalizer = weakref.finalize(self, terminate, self._proc)

    def _config(self, port: int) -> dict[str, Any]:
        config: dict[str, Any] = {
            "version": "0.1",
            "log": {"level": self.log_level, "formatter": "text", "accesslog": {"disabled": True}},
            "storage": {
                "filesystem": {"rootdirectory": str(self.storage.resolve())},
                "delete": {"enabled": True},
                "maintenance": {"uploadpurging": {"enabled": False}},
            },
            "http": {"addr": f"127.0.0.1:{port}", "secret": secrets.token_hex(16)},
            "health": {"storagedriver": {"enabled": False}},
        }
        if self.read_only:  # Distribution's maintenance mode: reads only, writes get 405
            config["storage"]["maintenance"]["readonly"] = {"enabled": True}
        if self.pull_through:
            config["proxy"] = {"remoteurl": self.pull_through}
        if self.foreign_urls:
            config["validation"] = {"manifests": {"urls": {"allow": [self.foreign_urls]}}}
        if self.htpasswd is not None:
            config["auth"] = {"htpasswd": {"realm": "blobflow-test", "path": str(self.htpasswd.resolve())}}
        if self.token_auth is not None:
            t = self.token_auth
            config["auth"] = {"token": {"realm": t.realm, "service": t.service, "issuer": t.issuer,
                                        "rootcertbundle": str(t.rootcertbundle.resolve())}}
        if self.tls is not None:
            config["http"]["tls"] = {"certificate": str(self.tls.certificate.resolve()),
                                     "key": str(self.tls.key.resolve())}
        return config

    def _wait_ready(self, deadline: float) -> None:
        handlers: list[urllib.request.BaseHandler] = [urllib.request.ProxyHandler({})]  # ignore http_proxy
        if self.tls is not None:
            # the probe only asks whether our own child answers yet; clients under test verify for real
            unverified = ssl.create_default_context()
            unverified.check_hostname = False
            unverified.verify_mode = ssl.CERT_NONE
            handlers.append(urllib.request.HTTPSHandler(context=unverified))
        opener = urllib.request.build_opener(*handlers)
        probe = f"{self.url}/v2/"
        while True:
            assert self._proc is not None
            code = self._proc.poll()
            if code is not None:
                raise RuntimeError(f"docker-registry exited with code {code}:\n{self.log_tail()}")
            try:
                with opener.open(probe, timeout=1.0) as response:
                    if response.status == 200:
                        return
            except urllib.error.HTTPError as exc:
                if exc.code == 401:
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"docker-registry did not answer {probe} in time:\n{self.log_tail()}")
            time.sleep(0.01)


def write_htpasswd(path: Path, users: dict[str, str], *, rounds: int = 5) -> None:
    """Write an htpasswd file of bcrypt hashes (``user:$2y$...``), the only kind Distribution reads.

    ``rounds`` is the bcrypt cost; Distribution checks the hash on every request, so tests use 4.
    """
    import bcrypt  # a test extra, not a runtime dependency

    lines = []
    for user, password in users.items():
        if ":" in user:
            raise ValueError(f"htpasswd user names cannot contain ':': {user!r}")
        hashed = bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=rounds)).decode()
        lines.append(f"{user}:$2y${hashed[4:]}\n")  # $2b$ and $2y$ are the same algorithm
    Path(path).write_text("".join(lines))


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def terminate(proc: subprocess.Popen[Any]) -> None:
    """SIGTERM, then SIGKILL if it lingers over 5 s; returns once the process is reaped."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=5.0)
        except subprocess.TimeoutExpired:
            proc.kill()
    proc.wait()


def _parent_death_signal() -> Any:
    """On Linux, a preexec hook so the registry gets SIGTERM if this process dies without cleanup.

    Linux sends it when the *thread* that forked exits, so only the main thread may use it.
    """
    if not sys.platform.startswith("linux") or threading.current_thread() is not threading.main_thread():
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    pr_set_pdeathsig = 1

    def hook() -> None:
        prctl(pr_set_pdeathsig, signal.SIGTERM)

    return hook


def _render_yaml(value: dict[str, Any], indent: int = 0) -> str:
    """Block-style YAML for nested dicts; scalars are JSON, which YAML reads as-is."""
    lines = []
    for key, item in value.items():
        if isinstance(item, dict):
            lines.append(f"{' ' * indent}{key}:\n{_render_yaml(item, indent + 2)}")
        else:
            lines.append(f"{' ' * indent}{key}: {json.dumps(item)}\n")
    return "".join(lines)

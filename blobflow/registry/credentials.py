"""Docker's credential store: ``config.json`` (``$DOCKER_CONFIG``, else ``~/.docker``) with ``auths``,
``credsStore`` and ``credHelpers`` (``docker-credential-<name> get|store``, JSON on stdin/stdout).
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import NO_HOME, home_dir
from ..errors import AuthError, BadInputError, unreadable

__all__ = ["CredentialLookup", "Credentials", "docker_config_path", "erase_credentials", "find_credentials",
           "load_credentials", "redact_all", "store_credentials"]

DOCKER_HUB_KEY = "https://index.docker.io/v1/"
_MIN_SECRET = 4  # shorter strings are not redacted: replacing "ab" everywhere would only garble text


@dataclass(frozen=True, slots=True)
class Credentials:
    username: str = ""
    password: str = field(default="", repr=False)
    identity_token: str = field(default="", repr=False)

    @property
    def basic(self) -> str:
        raw = f"{self.username}:{self.password}".encode()
        return "Basic " + base64.b64encode(raw).decode()

    def __bool__(self) -> bool:
        return bool(self.username or self.password or self.identity_token)


def docker_config_path() -> Path | None:
    """Docker's config.json: ``$DOCKER_CONFIG/config.json``, else ``~/.docker/config.json``; None
    without either (a container run as a uid with no passwd entry and no ``$HOME``)."""
    base = os.environ.get("DOCKER_CONFIG")
    if base:
        return Path(base) / "config.json"
    home = home_dir()
    return home / ".docker" / "config.json" if home is not None else None


def _config_keys(registry: str) -> list[str]:
    keys = [registry, f"https://{registry}", f"http://{registry}"]
    if registry == "docker.io":
        keys += [DOCKER_HUB_KEY, "index.docker.io", "registry-1.docker.io"]
    return keys


def _server_url(registry: str) -> str:
    """The name docker gives a registry in ``auths`` and to credential helpers."""
    return DOCKER_HUB_KEY if registry == "docker.io" else registry


def _read_config(path: Path) -> dict[str, Any]:
    try:
        config: Any = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        raise BadInputError(f"docker config {path} {unreadable(e)}") from None
    if not isinstance(config, dict):
        raise BadInputError(f"docker config {path} is not a JSON object")
    return config


def _helper_for(config: dict[str, Any], registry: str) -> str | None:
    helpers = config.get("credHelpers") or {}
    keys = _config_keys(registry)
    helper = next((helpers[k] for k in keys if isinstance(helpers, dict) and k in helpers), None)
    return str(helper) if helper else (str(config["credsStore"]) if config.get("credsStore") else None)


@dataclass(frozen=True, slots=True)
class CredentialLookup:
    """Where docker's config keeps one registry's credentials: ``stored`` in ``auths``, and the
    credential helper to ask before them (``docker-credential-<helper> get``), if one is set."""

    registry: str
    stored: Credentials = Credentials()
    helper: str | None = None

    async def resolve(self) -> Credentials:
        """What the helper answers for the registry, else what ``auths`` stores. The helper runs
        as a child process the event loop waits on: a slow one (a cloud login, a keychain that
        asks for a passphrase) stalls nothing else, and cancelling this kills it."""
        if self.helper:
            creds = await _from_helper(self.helper, self.registry)
            if creds:
                return creds
        return self.stored


def find_credentials(registry: str, *, path: Path | None = None) -> CredentialLookup:
    """Read docker's config (``credHelpers``, ``credsStore``, ``auths``) for ``registry``; no
    helper runs yet. An unreadable config is bad input."""
    path = path or docker_config_path()
    if path is None:  # nowhere to look: anonymous, as with a config that does not exist
        return CredentialLookup(registry)
    config = _read_config(path)
    helper = _helper_for(config, registry)
    auths = config.get("auths") or {}
    entry = next((auths[k] for k in _config_keys(registry) if k in auths), None)
    if not isinstance(entry, dict):
        return CredentialLookup(registry, helper=helper)
    user, pw = entry.get("username", ""), entry.get("password", "")
    if entry.get("auth"):
        try:
            user, _, pw = base64.b64decode(entry["auth"]).decode().partition(":")
        except (ValueError, UnicodeDecodeError):
            raise BadInputError(f"docker config {path}: the auth entry for {registry} is not base64") from None
    return CredentialLookup(registry, Credentials(user, pw, entry.get("identitytoken", "")), helper)


async def load_credentials(registry: str, *, path: Path | None = None) -> Credentials:
    """Credentials for ``registry`` from docker's config: ``credHelpers``, ``credsStore``, ``auths``."""
    return await find_credentials(registry, path=path).resolve()


_NOT_FOUND = "credentials not found"
_HELPER_TIMEOUT = 30.0


def _cannot_start(prog: str, registry: str, e: OSError) -> AuthError:
    if isinstance(e, FileNotFoundError):
        return AuthError(f"credential helper {prog} configured for {registry} is not on PATH")
    return AuthError(f"credential helper {prog} configured for {registry} cannot run: "
                     f"{e.strerror or type(e).__name__}")


def _helper_said(out: bytes, err: bytes) -> tuple[bool, str]:
    """What a helper that exited non-zero said: whether it is "credentials not found" (what every
    helper built on docker-credential-helpers says when it holds none), and its first line."""
    said = (out.strip() or err.strip()).decode(errors="replace")
    return _NOT_FOUND in said.lower(), said.splitlines()[0][:200] if said else ""


async def _from_helper(helper: str, registry: str) -> Credentials:
    prog = f"docker-credential-{helper}"
    # the server's name waits in a pipe before the helper starts (a host name: far below the pipe's
    # buffer), so one that exits without reading it (a failure) is no write into a closed pipe
    stdin, feed = os.pipe()
    try:
        try:
            os.write(feed, _server_url(registry).encode())
        finally:
            os.close(feed)
        proc = await asyncio.create_subprocess_exec(prog, "get", stdin=stdin, stdout=asyncio.subprocess.PIPE,
                                                    stderr=asyncio.subprocess.PIPE)
    except OSError as e:
        raise _cannot_start(prog, registry, e) from None
    finally:
        os.close(stdin)
    try:
        async with asyncio.timeout(_HELPER_TIMEOUT):
            out, err = await proc.communicate()
    except TimeoutError:
        raise AuthError(f"credential helper {prog} did not answer within {_HELPER_TIMEOUT:.0f} s") from None
    finally:
        if proc.returncode is None:  # timed out or cancelled: it must not outlive the request
            proc.kill()
            await proc.wait()
    if proc.returncode != 0:
        not_found, said = _helper_said(out, err)
        if not_found:
            return Credentials()
        # anything else is a failure (expired cloud login, locked keychain), as docker and crane
        # take it: going on anonymously would end in a 401 that never names the helper
        raise AuthError(f"credential helper {prog} failed for {registry} (exit {proc.returncode}): "
                        f"{said or 'no output'}")
    try:
        data = json.loads(out)
        user, secret = str(data.get("Username", "")), str(data.get("Secret", ""))
    except (ValueError, AttributeError):
        raise AuthError(f"credential helper {prog} returned output that is not JSON") from None
    if user == "<token>":
        return Credentials(identity_token=secret)
    return Credentials(user, secret)


def store_credentials(registry: str, credentials: Credentials, *, path: Path | None = None) -> str:
    """Keep ``credentials`` where docker would: the registry's credential helper (``credHelpers``,
    else ``credsStore``) when one is configured, else ``auths`` in config.json (base64 ``auth``, or
    ``identitytoken``). The file is replaced atomically with mode 0600; other settings are kept.
    Returns where the credentials went, for the user to read.
    """
    path = path or docker_config_path()
    if path is None:
        raise BadInputError(f"nowhere to store credentials: {NO_HOME}; set DOCKER_CONFIG to a directory")
    config = _read_config(path)
    auths = config.get("auths")
    if not isinstance(auths, dict):
        auths = config["auths"] = {}
    for key in _config_keys(registry):  # one entry per registry, under docker's name for it
        auths.pop(key, None)
    helper = _helper_for(config, registry)
    if helper:
        _to_helper(helper, registry, credentials)
        auths[_server_url(registry)] = {}  # what docker leaves: a login happened, the secret is elsewhere
        where = f"credential helper docker-credential-{helper}"
    elif credentials.identity_token:
        auths[_server_url(registry)] = {"identitytoken": credentials.identity_token}
        where = str(path)
    else:
        raw = f"{credentials.username}:{credentials.password}".encode()
        auths[_server_url(registry)] = {"auth": base64.b64encode(raw).decode()}
        where = str(path)
    _write_private(path, json.dumps(config, indent="\t") + "\n")
    return where


def _write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` readable by its owner only: temp file (0600), fsync, rename."""
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".config.json.", dir=path.parent)  # created 0600
        try:
            with os.fdopen(fd, "w") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o600)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as e:
        raise BadInputError(f"cannot write docker config {path}: {e.strerror or type(e).__name__}") from None


def erase_credentials(registry: str, *, path: Path | None = None) -> list[str]:
    """Forget ``registry``'s credentials where docker keeps them, as ``docker logout`` does: what
    its credential helper holds (``erase``) and its entries in ``auths`` (the file replaced as
    ``store_credentials`` does, other settings kept). Returns where they were removed from: empty
    when there were none."""
    path = path or docker_config_path()
    if path is None:
        return []
    config = _read_config(path)
    removed = []
    helper = _helper_for(config, registry)
    if helper and _erase_in_helper(helper, registry):
        removed.append(f"credential helper docker-credential-{helper}")
    auths = config.get("auths")
    keys = [k for k in _config_keys(registry) if k in auths] if isinstance(auths, dict) else []
    if isinstance(auths, dict) and keys:
        for key in keys:
            del auths[key]
        _write_private(path, json.dumps(config, indent="\t") + "\n")
        removed.append(str(path))
    return removed


def _run_helper(helper: str, action: str, payload: str, registry: str) -> subprocess.CompletedProcess[bytes]:
    """``docker-credential-<helper> <action>`` with ``payload`` on its stdin, from a worker thread
    (``store`` and ``erase``, for login and logout, outside the event loop's work)."""
    prog = f"docker-credential-{helper}"
    try:
        return subprocess.run([prog, action], input=payload.encode(), capture_output=True,
                              timeout=_HELPER_TIMEOUT, check=False)
    except OSError as e:
        raise _cannot_start(prog, registry, e) from None
    except subprocess.TimeoutExpired:
        raise AuthError(f"credential helper {prog} did not answer within {_HELPER_TIMEOUT:.0f} s") from None


def _erase_in_helper(helper: str, registry: str) -> bool:
    proc = _run_helper(helper, "erase", _server_url(registry), registry)
    if proc.returncode == 0:
        return True
    not_found, said = _helper_said(proc.stdout, proc.stderr)
    if not_found:
        return False
    raise AuthError(f"credential helper docker-credential-{helper} could not erase the credentials for "
                    f"{registry}: {said or f'exit {proc.returncode}'}")


def _to_helper(helper: str, registry: str, credentials: Credentials) -> None:
    prog = f"docker-credential-{helper}"
    user, secret = credentials.username, credentials.password
    if credentials.identity_token:
        user, secret = "<token>", credentials.identity_token
    payload = json.dumps({"ServerURL": _server_url(registry), "Username": user, "Secret": secret})
    proc = _run_helper(helper, "store", payload, registry)
    if proc.returncode != 0:
        said = (proc.stderr or proc.stdout).decode(errors="replace").strip().splitlines()[:1]
        reason = redact_all(said[0][:200], (secret, credentials.basic)) if said else f"exit {proc.returncode}"
        raise AuthError(f"credential helper {prog} could not store the credentials for {registry}: {reason}")


def redact_all(text: str, secrets: tuple[str, ...]) -> str:
    for secret in secrets:
        if len(secret) >= _MIN_SECRET:
            text = text.replace(secret, "***")
    return text

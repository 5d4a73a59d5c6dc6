"""Authentication: challenges (RFC 7235), docker credentials, bearer tokens.

Secrets live only in :class:`Credentials` and :class:`_Token`; their reprs hide them and no error
message built here contains them.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import AuthError, BadInputError

__all__ = ["Challenge", "Credentials", "load_credentials", "parse_challenges"]


@dataclass(frozen=True, slots=True)
class Challenge:
    scheme: str
    params: dict[str, str]


def _skip_ws(s: str, i: int) -> int:
    while i < len(s) and s[i] in " \t":
        i += 1
    return i


_TOKEN_CHARS = frozenset("!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ/=:")


def parse_challenges(header: str) -> list[Challenge]:
    """Parse a ``WWW-Authenticate`` value into challenges.

    Handles several challenges, quoted strings with escapes, and token68 values. Raises
    :class:`AuthError` (never anything else) on malformed input.
    """
    out: list[Challenge] = []
    s, i, n = header, 0, len(header)
    while True:
        i = _skip_ws(s, i)
        while i < n and s[i] == ",":
            i = _skip_ws(s, i + 1)
        if i >= n:
            break
        start = i
        while i < n and s[i] not in " \t,=":
            i += 1
        scheme = s[start:i]
        if not scheme or any(c not in _TOKEN_CHARS for c in scheme):
            raise AuthError(f"malformed WWW-Authenticate header near position {start}")
        params: dict[str, str] = {}
        while True:
            i = _skip_ws(s, i)
            if i >= n:
                break
            # a new challenge starts with a token followed by space and not '='
            kstart = i
            while i < n and s[i] not in " \t,=":
                i += 1
            key = s[kstart:i]
            j = _skip_ws(s, i)
            if j < n and s[j] == "=" and key:
                i = _skip_ws(s, j + 1)
                if i < n and s[i] == '"':
                    i += 1
                    buf = []
                    while i < n and s[i] != '"':
                        if s[i] == "\\" and i + 1 < n:
                            i += 1
                        buf.append(s[i])
                        i += 1
                    if i >= n:
                        raise AuthError("malformed WWW-Authenticate header: unterminated quoted string")
                    i += 1
                    value = "".join(buf)
                else:
                    vstart = i
                    while i < n and s[i] not in " \t,":
                        i += 1
                    value = s[vstart:i]
                params[key.lower()] = value
                i = _skip_ws(s, i)
                if i < n and s[i] == ",":
                    i += 1
                    continue
                if i >= n:
                    break
                if not params:
                    raise AuthError("malformed WWW-Authenticate header")
                continue
            if key and not params and (j >= n or s[j] == ","):
                params[""] = key  # token68 (e.g. Basic with a token), rare
                i = j
                continue
            i = kstart  # this token begins the next challenge
            break
        out.append(Challenge(scheme.lower(), params))
    return out


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


def docker_config_path() -> Path:
    base = os.environ.get("DOCKER_CONFIG")
    return Path(base) / "config.json" if base else Path.home() / ".docker" / "config.json"


def _config_keys(registry: str) -> list[str]:
    keys = [registry, f"https://{registry}", f"http://{registry}"]
    if registry == "docker.io":
        keys += ["https://index.docker.io/v1/", "index.docker.io", "registry-1.docker.io"]
    return keys


def load_credentials(registry: str, *, path: Path | None = None) -> Credentials:
    """Credentials for ``registry`` from docker's config: ``credHelpers``, ``credsStore``, ``auths``."""
    path = path or docker_config_path()
    try:
        config: Any = json.loads(path.read_text())
    except FileNotFoundError:
        return Credentials()
    except (OSError, ValueError) as e:
        raise BadInputError(f"cannot read docker config {path}: {type(e).__name__}") from None
    if not isinstance(config, dict):
        raise BadInputError(f"docker config {path} is not a JSON object")
    keys = _config_keys(registry)
    helpers = config.get("credHelpers") or {}
    helper = next((helpers[k] for k in keys if k in helpers), None) or config.get("credsStore")
    if helper:
        creds = _from_helper(str(helper), registry)
        if creds:
            return creds
    auths = config.get("auths") or {}
    entry = next((auths[k] for k in keys if k in auths), None)
    if not isinstance(entry, dict):
        return Credentials()
    user, pw = entry.get("username", ""), entry.get("password", "")
    if entry.get("auth"):
        try:
            user, _, pw = base64.b64decode(entry["auth"]).decode().partition(":")
        except (ValueError, UnicodeDecodeError):
            raise BadInputError(f"docker config {path}: the auth entry for {registry} is not base64") from None
    return Credentials(user, pw, entry.get("identitytoken", ""))


def _from_helper(helper: str, registry: str) -> Credentials:
    prog = f"docker-credential-{helper}"
    server = "https://index.docker.io/v1/" if registry == "docker.io" else registry
    try:
        proc = subprocess.run([prog, "get"], input=server.encode(), capture_output=True, timeout=30, check=False)
    except FileNotFoundError:
        raise AuthError(f"credential helper {prog} configured for {registry} is not on PATH") from None
    except subprocess.TimeoutExpired:
        raise AuthError(f"credential helper {prog} did not answer within 30 s") from None
    if proc.returncode != 0:
        return Credentials()  # "credentials not found in native keychain"
    try:
        data = json.loads(proc.stdout)
        user, secret = str(data.get("Username", "")), str(data.get("Secret", ""))
    except (ValueError, AttributeError):
        raise AuthError(f"credential helper {prog} returned output that is not JSON") from None
    if user == "<token>":
        return Credentials(identity_token=secret)
    return Credentials(user, secret)


@dataclass(slots=True)
class _Token:
    value: str = field(repr=False)
    expires: float

    @property
    def fresh(self) -> bool:
        return time.monotonic() < self.expires - 5.0

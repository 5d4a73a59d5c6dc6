"""Authentication: challenges (RFC 7235) and bearer tokens.

Secrets live only in :class:`Credentials`, :class:`_Token` and the docker config; their reprs hide
them, and every error message that quotes a server's words goes through :meth:`Authenticator.redact`.

Bearer flow (the distribution token spec): a 401 names a token service (``realm``, ``service``);
the token is fetched with Basic credentials (``GET``), anonymously, or with an OAuth2 refresh token
(docker's ``identitytoken``, ``POST grant_type=refresh_token``), for the scope the request needs
(``repository:a:pull,push repository:b:pull``). Tokens are cached per scope and refreshed *before*
a request once they come within a margin of expiry: a streamed upload body cannot be sent twice,
so waiting for the 401 is too late.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from urllib.parse import urlsplit

import aiohttp

from ..errors import AuthError
from ._http import mapped, proxy_for, raise_for, read_error
from .credentials import CredentialLookup, Credentials, redact_all

__all__ = ["Authenticator", "Challenge", "parse_challenges", "parse_scope"]


@dataclass(frozen=True, slots=True)
class Challenge:
    scheme: str
    params: dict[str, str]


def _skip_ws(s: str, i: int) -> int:
    while i < len(s) and s[i] in " \t":
        i += 1
    return i


_TOKEN_CHARS = frozenset("!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ/=:")


_TOKEN68 = re.compile(r"[A-Za-z0-9\-._~+/]+=*")


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
            if not params:
                m = _TOKEN68.match(s, i)
                end = _skip_ws(s, m.end()) if m else i
                if m and (end >= n or s[end] == ","):  # token68 ("Negotiate abc=="), kept as sent
                    params[""] = m.group(0)
                    i = end
                    continue
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
                    while i < n and s[i] in ", \t":  # empty list elements are ignored (RFC 9110 5.6.1)
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


# -- scopes and tokens ------------------------------------------------------------------------------

Access = frozenset[tuple[str, str, str]]  # (resource type, name, action)


def parse_scope(scope: str) -> Access:
    """``repository:a:pull,push repository:b:pull`` -> {(repository, a, pull), (repository, a, push), ...}."""
    out = set()
    for item in scope.split():
        kind, _, rest = item.partition(":")
        name, _, actions = rest.rpartition(":")
        for action in actions.split(","):
            if kind and name and action:
                out.add((kind, name, action))
    return frozenset(out)


def jwt_access(token: str) -> Access | None:
    """What a JWT's ``access`` claim grants (Distribution's token format), read without verifying:
    only to explain a refusal. None when the token is not such a JWT (tokens may be opaque)."""
    parts = token.split(".")
    if len(parts) != 3:
        return None
    try:
        claims = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
    except (ValueError, binascii.Error):
        return None
    access = claims.get("access") if isinstance(claims, dict) else None
    if not isinstance(access, list):
        return None
    out = set()
    for item in access:
        if isinstance(item, dict) and isinstance(item.get("actions"), list):
            for action in item["actions"]:
                out.add((str(item.get("type", "")), str(item.get("name", "")), str(action)))
    return frozenset(out)


@dataclass(slots=True)
class _Token:
    value: str = field(repr=False)
    expires: float  # monotonic
    lifetime: float
    access: Access = frozenset()  # what was asked for (the key it serves)

    def fresh(self, now: float) -> bool:
        """Usable for a request starting now: a quarter of its life, at most 10 s, is kept in reserve
        for the request to reach the registry (and tokens of a few seconds still get used)."""
        return now < self.expires - min(10.0, self.lifetime / 4)


def _describe_missing(missing: Access) -> str:
    by_resource: dict[tuple[str, str], list[str]] = {}
    for kind, name, action in sorted(missing):
        by_resource.setdefault((kind, name), []).append(action)
    return "; ".join(f"{' and '.join(actions)} permission on {kind} {name}"
                     for (kind, name), actions in by_resource.items())


class Authenticator:
    """How one registry wants requests authorized, and the bearer tokens obtained so far."""

    def __init__(self, session: aiohttp.ClientSession, registry: str, credentials: Credentials | CredentialLookup, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.session = session
        self.registry = registry
        # a credential helper is asked at the registry's first 401, not before: one that never
        # asks never runs it (docker's credsStore applies to every registry, and Docker Desktop's,
        # a keychain's or a cloud login's helper can take a second), and it runs beside the job
        if isinstance(credentials, CredentialLookup) and credentials.helper is None:
            credentials = credentials.stored
        self._lookup = credentials if isinstance(credentials, CredentialLookup) else None
        self._lookup_lock = asyncio.Lock()
        self._lookup_failed: AuthError | None = None
        self.credentials = credentials if isinstance(credentials, Credentials) else Credentials()
        self.challenge: Challenge | None = None
        self.tokens_fetched = 0
        self._tokens: dict[str, _Token] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._clock = clock
        self._spent: collections.deque[str] = collections.deque(maxlen=64)  # refused: still secret

    def __repr__(self) -> str:
        scheme = self.challenge.scheme if self.challenge else "none"
        return f"<Authenticator {self.registry} scheme={scheme} tokens={len(self._tokens)}>"

    @property
    def _has_password(self) -> bool:
        return bool(self.credentials.username or self.credentials.password)

    @property
    def who(self) -> str:
        c = self.credentials
        if c.identity_token:
            return f"the identity token stored for {self.registry}"
        return f"user '{c.username}'" if c.username else "anonymous access"

    def redact(self, text: str) -> str:
        """``text`` with every secret this registry's auth knows replaced by ``***``."""
        c = self.credentials
        secrets = [c.password, c.identity_token, *(t.value for t in self._tokens.values()), *self._spent]
        if self._has_password:
            secrets.append(c.basic.removeprefix("Basic "))
        return redact_all(text, tuple(secrets))

    async def authorization(self, scope: str, what: str) -> str | None:
        """The ``Authorization`` value for a request that needs ``scope``, if the registry asked for
        one. A bearer token missing or close to expiry is fetched first."""
        ch = self.challenge
        if ch is None:
            return None
        if ch.scheme == "basic":
            return self.credentials.basic if self._has_password else None
        token = self._cached(scope) or await self._refresh(scope, what, refused=None)
        return f"Bearer {token.value}"

    async def _ask_helper(self) -> None:
        """Once per registry: the credentials its helper keeps (a failure stays the answer)."""
        async with self._lookup_lock:
            if self._lookup_failed is not None:
                raise AuthError(str(self._lookup_failed))
            if self._lookup is None:
                return
            try:
                self.credentials = await self._lookup.resolve()
            except AuthError as e:
                self._lookup_failed = e
                raise
            self._lookup = None

    async def unauthorized(self, header: str, scope: str, sent: str | None, what: str) -> None:
        """A 401 with ``header`` answered a request that carried ``sent``: learn the challenge and,
        for bearer auth, get a new token (unless another request already replaced the refused one)."""
        await self._ask_helper()
        try:
            challenges = parse_challenges(header)
        except AuthError:
            raise AuthError(f"{what}: the registry sent a malformed WWW-Authenticate challenge",
                            status=401) from None
        pick = next((c for c in challenges if c.scheme == "bearer"), None) or next(
            (c for c in challenges if c.scheme == "basic"), None)
        if pick is None:
            raise AuthError(f"{what}: unsupported authentication scheme(s) "
                            f"{', '.join(c.scheme for c in challenges) or '(none)'}", status=401)
        if pick.scheme == "basic":
            if sent is not None and sent.startswith("Basic "):
                raise AuthError(f"{what}: {self.registry} rejected the credentials of {self.who}", status=401)
            if not self._has_password:
                raise AuthError(f"{what}: {self.registry} requires credentials and none are configured "
                                f"(run `blobflow login {self.registry}`)", status=401)
            self.challenge = pick
            return
        self.challenge = pick
        refused = sent.removeprefix("Bearer ") if sent and sent.startswith("Bearer ") else None
        await self._refresh(scope, what, refused=refused)

    @staticmethod
    def _bearer(header: str) -> Challenge | None:
        try:
            return next((c for c in parse_challenges(header) if c.scheme == "bearer"), None)
        except AuthError:
            return None

    def lacks_scope(self, header: str) -> bool:
        """Whether a 401 says the token was valid but does not grant what the request needs."""
        bearer = self._bearer(header)
        return bearer is not None and bearer.params.get("error") == "insufficient_scope"

    def denied(self, header: str, scope: str, sent: str | None, what: str) -> AuthError:
        """The error for a request refused although its token is new: name what is missing."""
        if sent is not None and sent.startswith("Basic "):
            return AuthError(f"{what}: {self.registry} rejected the credentials of {self.who}", status=401,
                             code="UNAUTHORIZED")
        bearer = self._bearer(header)
        error = bearer.params.get("error", "") if bearer else ""
        if error == "insufficient_scope":
            needed = parse_scope(bearer.params.get("scope", "") if bearer else "") or parse_scope(scope)
            token = sent.removeprefix("Bearer ") if sent else ""
            granted = jwt_access(token) if token else None
            missing = needed - granted if granted is not None else needed
            text = f"{what}: denied: {self.who} lacks {_describe_missing(missing or needed)}"
            if not self.credentials:
                text += f" (log in with `blobflow login {self.registry}` if the repository is private)"
            elif any(action == "pull" for _, _, action in missing):
                text += " (or the repository does not exist)"
            return AuthError(text, status=401, code="DENIED")
        if error == "invalid_token":
            realm = bearer.params.get("realm", "") if bearer else ""
            source = urlsplit(realm).netloc or "its token service"
            return AuthError(f"{what}: the registry refused a new token from {source} as invalid "
                             "(issuer, audience, signature or clock do not match)", status=401, code="UNAUTHORIZED")
        return AuthError(f"{what}: {self.registry} still answers 401 after authentication as {self.who}",
                         status=401, code="UNAUTHORIZED")

    # -- the token cache -----------------------------------------------------------------------
    def _cached(self, scope: str) -> _Token | None:
        now = self._clock()
        token = self._tokens.get(scope)
        if token is not None and token.fresh(now):
            return token
        wanted = parse_scope(scope)
        return next((t for t in self._tokens.values() if wanted <= t.access and t.fresh(now)), None)

    async def _refresh(self, scope: str, what: str, *, refused: str | None) -> _Token:
        async with self._locks.setdefault(scope, asyncio.Lock()):
            if refused is not None:
                self._spent.append(refused)
                self._tokens = {k: t for k, t in self._tokens.items() if t.value != refused}
            token = self._cached(scope)
            if token is None:
                token = await self._fetch(scope, what)
                now = self._clock()
                self._tokens = {k: t for k, t in self._tokens.items() if now < t.expires}
                self._tokens[scope] = token
            return token

    async def _fetch(self, scope: str, what: str) -> _Token:
        ch = self.challenge
        realm = ch.params.get("realm", "") if ch else ""
        if urlsplit(realm).scheme not in ("http", "https") or not urlsplit(realm).netloc:
            raise AuthError(f"{what}: bearer challenge without a usable realm", status=401)
        assert ch is not None
        host = urlsplit(realm).netloc
        service, scopes, creds = ch.params.get("service", ""), scope.split(), self.credentials
        started = self._clock()
        with mapped(f"{what}: token request to {host}"):
            if creds.identity_token:  # OAuth2 refresh token
                form = {"grant_type": "refresh_token", "refresh_token": creds.identity_token,
                        "client_id": "blobflow"}
                if service:
                    form["service"] = service
                if scopes:
                    form["scope"] = " ".join(scopes)
                request = self.session.post(realm, data=form, allow_redirects=False, proxy=proxy_for(realm))
            else:  # docker's GET, one scope parameter per resource
                params = ([("service", service)] if service else []) + [("scope", s) for s in scopes]
                headers = {"Authorization": creds.basic} if self._has_password else {}
                request = self.session.get(realm, params=params, headers=headers, proxy=proxy_for(realm))
            async with request as resp:
                if resp.status in (401, 403):
                    raise await self._token_refused(resp, scope, what, host)
                if resp.status >= 400:
                    await raise_for(resp, f"{what}: token request to {host}", redact=self.redact)
                try:
                    data = await resp.json(content_type=None)
                except ValueError:
                    raise AuthError(f"{what}: token service {host} answered with something that is not "
                                    "JSON") from None
        value = (data.get("token") or data.get("access_token")) if isinstance(data, dict) else None
        if not value or not isinstance(value, str):
            raise AuthError(f"{what}: token service {host} answered without a token")
        try:
            lifetime = float(data.get("expires_in") or 60)
        except (TypeError, ValueError):
            lifetime = 60.0
        lifetime = lifetime if lifetime > 0 else 60.0
        rotated = data.get("refresh_token")
        if creds.identity_token and isinstance(rotated, str) and rotated:
            self._spent.append(creds.identity_token)
            self.credentials = replace(creds, identity_token=rotated)
        self.tokens_fetched += 1
        return _Token(value, started + lifetime, lifetime, parse_scope(scope))

    async def _token_refused(self, resp: aiohttp.ClientResponse, scope: str, what: str, host: str) -> AuthError:
        _code, message, _detail = await read_error(resp)
        said = f" ({self.redact(message)})" if message else ""
        resp.release()
        if resp.status == 401 and self.credentials:
            again = f"; run `blobflow login {self.registry}` again" if self.credentials.identity_token else ""
            return AuthError(f"{what}: token service {host} rejected the credentials of {self.who}{said}{again}",
                             status=401, code="UNAUTHORIZED")
        if resp.status == 401:
            return AuthError(f"{what}: token service {host} refused anonymous access{said}; run "
                             f"`blobflow login {self.registry}`", status=401, code="UNAUTHORIZED")
        return AuthError(f"{what}: denied: token service {host} refused {self.who} the scope "
                         f"'{scope or '(none)'}'{said}", status=403, code="DENIED")

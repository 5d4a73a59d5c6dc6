"""A Docker-style token service for tests (aiohttp), trusted by a real Distribution registry.

It speaks the two halves of the token protocol that registries' clients use:

* ``GET /token?service=S&scope=...`` with Basic credentials (or none, for anonymous access), the
  classic docker token flow; ``offline_token=true`` also returns a ``refresh_token``;
* ``POST /token`` with a form, the OAuth2 flow: ``grant_type=password`` (``access_type=offline``
  returns a refresh token) or ``grant_type=refresh_token`` (docker's ``identitytoken``).

Tokens are ES256 JWTs whose ``x5c`` carries the signer's certificate; the registry trusts them
through ``auth: token`` with ``rootcertbundle`` set to the CA that issued the signer. Each account
is granted actions per repository (fnmatch patterns); a request gets the intersection of what it
asks and what the account may do, as docker_auth and the cloud registries do, so a read-only user
asking for ``pull,push`` gets a ``pull``-only token and the *registry* refuses the push.

Expiry: Distribution accepts a token up to 60 s after its ``exp`` (clock-skew leeway), so with
``registry_leeway=60`` (the default) the JWT's ``exp`` is set that much earlier and a token really
stops working ``ttl`` seconds after it was issued. ``advertised_ttl`` makes the service lie about
``expires_in``, as a client can meet with a token revoked or a clock that drifts.

Nothing here logs; :attr:`TokenServer.issued` records who asked for what (never a password).
"""

from __future__ import annotations

import base64
import binascii
import fnmatch
import math
import secrets
import ssl
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import TracebackType

from aiohttp import web
from pki import IssuedCert

__all__ = ["Account", "Issued", "TokenServer", "parse_scopes"]

PULL, PUSH = frozenset({"pull"}), frozenset({"pull", "push"})


@dataclass(frozen=True)
class Account:
    password: str = field(repr=False)
    grants: Mapping[str, frozenset[str]] = field(default_factory=dict)  # repository pattern -> actions

    def allowed(self, repository: str) -> frozenset[str]:
        out: frozenset[str] = frozenset()
        for pattern, actions in self.grants.items():
            if fnmatch.fnmatchcase(repository, pattern):
                out |= actions
        return out


@dataclass(frozen=True)
class Issued:
    """One token the service handed out (or refused: ``status`` != 200)."""

    method: str
    grant_type: str  # "basic", "anonymous", "password", "refresh_token"
    user: str
    scopes: tuple[str, ...]
    access: tuple[tuple[str, str, tuple[str, ...]], ...]  # (type, name, actions) granted
    status: int = 200
    time: float = field(default_factory=time.monotonic)


def parse_scopes(values: list[str]) -> list[tuple[str, str, frozenset[str]]]:
    """``repository:a/b:pull,push`` (several per value, space-separated) -> (type, name, actions)."""
    out = []
    for value in values:
        for scope in value.split():
            kind, _, rest = scope.partition(":")
            name, _, actions = rest.rpartition(":")
            if kind and name:
                out.append((kind, name, frozenset(a for a in actions.split(",") if a)))
    return out


class TokenServer:
    """The token service on 127.0.0.1 (HTTPS when ``tls`` is given)."""

    def __init__(self, signer: IssuedCert, *, accounts: Mapping[str, Account],
                 anonymous: Mapping[str, frozenset[str]] | None = None, service: str = "blobflow-test-registry",
                 issuer: str = "blobflow-test-token-service", ttl: float = 60.0,
                 advertised_ttl: float | None = None, registry_leeway: float = 60.0,
                 tls: ssl.SSLContext | None = None, public_name: str = "127.0.0.1") -> None:
        """``public_name``: the host the realm names (a name only a proxy resolves, for the proxy
        tests); the service still listens on 127.0.0.1."""
        self.signer = signer
        self.public_name = public_name
        self.accounts = dict(accounts)
        self.anonymous = Account("", dict(anonymous or {}))
        self.service = service
        self.issuer = issuer
        self.ttl = ttl
        self.advertised_ttl = advertised_ttl
        self.registry_leeway = registry_leeway
        self.tls = tls
        self.issued: list[Issued] = []
        self.values: list[str] = []  # every token handed out (the secrets tests look for them)
        self.refresh_tokens: dict[str, str] = {}  # refresh token -> user
        self._runner: web.AppRunner | None = None
        self._port: int | None = None

    @property
    def realm(self) -> str:
        if self._port is None:
            raise RuntimeError("TokenServer is not started")
        return f"{'https' if self.tls else 'http'}://{self.public_name}:{self._port}/token"

    def tokens_for(self, user: str) -> list[Issued]:
        return [i for i in self.issued if i.user == user and i.status == 200]

    def mint_refresh_token(self, user: str) -> str:
        """What a login with ``access_type=offline`` would have given ``user`` (docker's identitytoken)."""
        token = secrets.token_urlsafe(24)
        self.refresh_tokens[token] = user
        return token

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("GET", "/token", self._get)
        app.router.add_route("POST", "/token", self._post)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0, ssl_context=self.tls).start()
        self._port = self._runner.addresses[0][1]

    async def stop(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    async def __aenter__(self) -> TokenServer:
        await self.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.stop()

    # -- the protocol --------------------------------------------------------------------------
    async def _get(self, request: web.Request) -> web.Response:
        scopes = request.query.getall("scope", [])
        if request.query.get("service") != self.service:
            return self._refuse(request, "basic", "", scopes, 400, "unknown service")
        header = request.headers.get("Authorization", "")
        if not header:
            return self._grant(request, "anonymous", "", scopes, offline=False)
        user, password = _basic(header)
        if user is None or not self._check(user, password):
            return self._refuse(request, "basic", user or "", scopes, 401, "incorrect username or password")
        return self._grant(request, "basic", user, scopes, offline=request.query.get("offline_token") == "true")

    async def _post(self, request: web.Request) -> web.Response:
        form = await request.post()
        grant_type, scopes = str(form.get("grant_type", "")), [str(form.get("scope", ""))]
        if form.get("service") != self.service:
            return self._refuse(request, grant_type, "", scopes, 400, "unknown service")
        if grant_type == "password":
            user = str(form.get("username", ""))
            if not self._check(user, str(form.get("password", ""))):
                return self._refuse(request, grant_type, user, scopes, 401, "incorrect username or password")
            return self._grant(request, grant_type, user, scopes, offline=form.get("access_type") == "offline")
        if grant_type == "refresh_token":
            owner = self.refresh_tokens.get(str(form.get("refresh_token", "")))
            if owner is None:
                return self._refuse(request, grant_type, "", scopes, 401, "invalid refresh token")
            return self._grant(request, grant_type, owner, scopes, offline=False)
        return self._refuse(request, grant_type, "", scopes, 400, "unsupported grant_type")

    def _check(self, user: str, password: str | None) -> bool:
        account = self.accounts.get(user)
        return account is not None and password is not None and secrets.compare_digest(
            account.password.encode(), password.encode())

    def _refuse(self, request: web.Request, grant_type: str, user: str, scopes: list[str], status: int,
                details: str) -> web.Response:
        self.issued.append(Issued(request.method, grant_type, user, tuple(scopes), (), status))
        return web.json_response({"details": details}, status=status)

    def _grant(self, request: web.Request, grant_type: str, user: str, scopes: list[str], *,
               offline: bool) -> web.Response:
        account = self.accounts[user] if user else self.anonymous
        access = []
        for kind, name, wanted in parse_scopes(scopes):
            granted = wanted & account.allowed(name) if kind == "repository" else frozenset()
            access.append((kind, name, tuple(sorted(granted))))
        now = time.time()
        claims = {
            "iss": self.issuer, "sub": user, "aud": self.service, "jti": secrets.token_hex(8),
            "iat": int(now), "nbf": int(now) - 1, "exp": math.ceil(now + self.ttl - self.registry_leeway),
            "access": [{"type": k, "name": n, "actions": list(a)} for k, n, a in access],
        }
        token = self.signer.sign_jwt({"typ": "JWT"}, claims)
        self.values.append(token)
        self.issued.append(Issued(request.method, grant_type, user, tuple(scopes), tuple(access)))
        body: dict[str, object] = {
            "token": token, "access_token": token,
            "expires_in": self.advertised_ttl if self.advertised_ttl is not None else self.ttl,
            "issued_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now)),
        }
        if offline and user:
            body["refresh_token"] = self.mint_refresh_token(user)
        return web.json_response(body)


def _basic(header: str) -> tuple[str | None, str | None]:
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "basic":
        return None, None
    try:
        user, sep, password = base64.b64decode(value.strip(), validate=True).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError):
        return None, None
    return (user, password) if sep else (None, None)

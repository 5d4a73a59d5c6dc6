"""The bearer-token client on its own: cache per scope, refresh before expiry, one fetch for many
requests, redaction; and properties of the parsers that read what servers send.

The token service is the real test one (tests/tokenserver.py), over plain HTTP on 127.0.0.1; the
clock is injected, so expiry is tested without waiting.
"""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiohttp
import pytest
from authenv import ACCOUNTS, PUSHER, PUSHER_PASSWORD, Pki
from hypothesis import given
from hypothesis import strategies as st
from tokenserver import TokenServer

from blobflow.errors import AuthError
from blobflow.registry import Challenge, Credentials, parse_challenges
from blobflow.registry.auth import Authenticator, jwt_access, parse_scope

pytest_plugins = ["authenv"]


@dataclass
class Clock:
    now: float = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Setup:
    auth: Authenticator
    tokens: TokenServer
    clock: Clock


@pytest.fixture
async def setup(pki: Pki) -> AsyncIterator[Setup]:
    tokens = TokenServer(pki.signer, accounts=ACCOUNTS, ttl=300.0)
    await tokens.start()
    clock = Clock()
    async with aiohttp.ClientSession() as session:
        auth = Authenticator(session, "registry.test", Credentials(PUSHER, PUSHER_PASSWORD), clock=clock)
        header = f'Bearer realm="{tokens.realm}",service="{tokens.service}"'
        await auth.unauthorized(header, "", None, "ping")  # what a first 401 does
        yield Setup(auth, tokens, clock)
    await tokens.stop()


async def test_concurrent_requests_of_one_scope_fetch_one_token(setup: Setup) -> None:
    scope = "repository:a:pull,push"
    values = await asyncio.gather(*(setup.auth.authorization(scope, "t") for _ in range(20)))
    assert len(set(values)) == 1
    assert [i.scopes for i in setup.tokens.issued] == [(), (scope,)]


async def test_token_for_a_wider_scope_serves_narrower_ones(setup: Setup) -> None:
    auth = setup.auth
    wide = await auth.authorization("repository:a:pull,push", "t")
    assert await auth.authorization("repository:a:pull", "t") == wide
    assert await auth.authorization("", "t") is not None
    assert await auth.authorization("repository:b:pull", "t") != wide
    assert auth.tokens_fetched == 3  # "", a:pull,push, b:pull


async def test_several_scopes_go_as_repeated_parameters(setup: Setup) -> None:
    await setup.auth.authorization("repository:b:pull,push repository:a:pull", "t")
    last = setup.tokens.issued[-1]
    assert last.scopes == ("repository:b:pull,push", "repository:a:pull")
    assert last.access == (("repository", "b", ("pull", "push")), ("repository", "a", ("pull",)))


@pytest.mark.parametrize(("ttl", "still_fresh", "refreshed"), [(300.0, 289.0, 291.0), (3.0, 2.2, 2.3)])
async def test_token_is_refreshed_before_it_expires(setup: Setup, ttl: float, still_fresh: float,
                                                    refreshed: float) -> None:
    setup.tokens.ttl = ttl
    auth, clock, scope = setup.auth, setup.clock, "repository:a:pull"
    start = clock.now
    first = await auth.authorization(scope, "t")
    clock.now = start + still_fresh
    assert await auth.authorization(scope, "t") == first
    clock.now = start + refreshed
    assert await auth.authorization(scope, "t") != first


async def test_a_refused_token_is_replaced_once_for_many_401s(setup: Setup) -> None:
    auth, scope = setup.auth, "repository:a:pull"
    sent = await auth.authorization(scope, "t")
    header = f'Bearer realm="{setup.tokens.realm}",service="{setup.tokens.service}",error="invalid_token"'
    fetched = auth.tokens_fetched
    await asyncio.gather(*(auth.unauthorized(header, scope, sent, "t") for _ in range(10)))
    assert auth.tokens_fetched == fetched + 1
    assert await auth.authorization(scope, "t") != sent


async def test_redact_hides_password_basic_form_and_tokens(setup: Setup) -> None:
    auth = setup.auth
    token = (await auth.authorization("repository:a:pull", "t") or "").removeprefix("Bearer ")
    basic = base64.b64encode(f"{PUSHER}:{PUSHER_PASSWORD}".encode()).decode()
    text = auth.redact(f"echo {PUSHER_PASSWORD} {basic} {token} done")
    assert text == "echo *** *** *** done"
    assert PUSHER_PASSWORD not in repr(auth) and PUSHER_PASSWORD not in repr(auth.credentials)


def test_denied_names_what_the_token_lacks() -> None:
    claims = {"access": [{"type": "repository", "name": "a/b", "actions": ["pull"]}]}
    token = "e30." + base64.urlsafe_b64encode(json.dumps(claims).encode()).decode().rstrip("=") + ".sig"
    auth = Authenticator(None, "r.test", Credentials("reader", "pw-12345"))  # type: ignore[arg-type]
    header = 'Bearer realm="https://t/token",service="s",scope="repository:a/b:pull,push",error="insufficient_scope"'
    err = auth.denied(header, "repository:a/b:pull,push", f"Bearer {token}", "r.test/a/b: start upload")
    assert str(err) == "r.test/a/b: start upload: denied: user 'reader' lacks push permission on repository a/b"
    assert err.exit_code == 2
    opaque = auth.denied(header, "repository:a/b:pull,push", "Bearer opaque", "x")
    assert "pull and push permission on repository a/b" in str(opaque)


# -- properties of what is parsed from servers ------------------------------------------------------

_TOKEN = st.text(alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789!#$%&'*+-.^_`|~",
                 min_size=1, max_size=12)
_VALUE = st.text(alphabet=st.characters(blacklist_categories=("Cs", "Cc")), max_size=30)


def _quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


@given(st.lists(st.tuples(_TOKEN, st.dictionaries(_TOKEN.map(str.lower), _VALUE, min_size=1, max_size=4)),
                min_size=1, max_size=3),
       st.sampled_from([",", ", ", " ,  "]))
def test_well_formed_challenges_parse_back_exactly(challenges: list[tuple[str, dict[str, str]]], sep: str) -> None:
    header = sep.join(f"{scheme} " + sep.join(f"{k}={_quote(v)}" for k, v in params.items())
                      for scheme, params in challenges)
    assert parse_challenges(header) == [Challenge(scheme.lower(), params) for scheme, params in challenges]


@given(st.text(max_size=200))
def test_scope_and_jwt_readers_never_raise(text: str) -> None:
    assert isinstance(parse_scope(text), frozenset)
    assert jwt_access(text) is None or isinstance(jwt_access(text), frozenset)
    b64 = base64.urlsafe_b64encode(text.encode()).decode()
    assert jwt_access(f"a.{b64}.c") is None or isinstance(jwt_access(f"a.{b64}.c"), frozenset)


@given(st.text(max_size=200), st.text(max_size=60))
def test_denied_on_any_challenge_is_an_auth_error(header: str, sent: str) -> None:
    auth = Authenticator(None, "r.test", Credentials())  # type: ignore[arg-type]
    err = auth.denied(header, "repository:x:pull", f"Bearer {sent}", "what")
    assert isinstance(err, AuthError) and str(err).startswith("what: ")

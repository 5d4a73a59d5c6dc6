"""Authentication input: ``WWW-Authenticate`` challenges and docker's credential configuration.

The challenge parser sees whatever a server (or a proxy in front of it) sends, so on any text it
either returns challenges or raises ``AuthError``. Credentials come from ``config.json`` (``auths``,
``credHelpers``) and never show up in a repr.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import stat
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest
import uvloop
from hypothesis import example, given
from hypothesis import strategies as st

from blobflow.errors import AuthError, BadInputError
from blobflow.registry import Challenge, Credentials, load_credentials, parse_challenges

DOCKER_HUB = ('Bearer realm="https://auth.docker.io/token",service="registry.docker.io",'
              'scope="repository:library/ubuntu:pull"')
GHCR = 'Bearer realm="https://ghcr.io/token",service="ghcr.io",scope="repository:user/image:pull"'


# -- parse_challenges ----------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (DOCKER_HUB, [Challenge("bearer", {"realm": "https://auth.docker.io/token", "service": "registry.docker.io",
                                           "scope": "repository:library/ubuntu:pull"})]),
        (GHCR, [Challenge("bearer", {"realm": "https://ghcr.io/token", "service": "ghcr.io",
                                     "scope": "repository:user/image:pull"})]),
        ('Basic realm="x"', [Challenge("basic", {"realm": "x"})]),
        ('Basic realm="Registry Realm"', [Challenge("basic", {"realm": "Registry Realm"})]),
        ("Basic", [Challenge("basic", {})]),
        # Distribution's answer to a token without the scope it needs
        ('Bearer realm="https://auth.example/token",service="reg",scope="repository:a/b:pull,push",'
         'error="insufficient_scope"',
         [Challenge("bearer", {"realm": "https://auth.example/token", "service": "reg",
                               "scope": "repository:a/b:pull,push", "error": "insufficient_scope"})]),
        # scheme and parameter names are case-insensitive; values are not
        ('BEARER Realm="https://A/token", SERVICE=Reg', [Challenge("bearer", {"realm": "https://A/token",
                                                                             "service": "Reg"})]),
        # token values, optional whitespace around '=' and ','
        ("Bearer realm=https://a/token , service = s", [Challenge("bearer", {"realm": "https://a/token",
                                                                            "service": "s"})]),
        ('Bearer realm=""', [Challenge("bearer", {"realm": ""})]),
        ("", []),
        ("   ", []),
    ],
)
def test_parse_real_challenges(header: str, expected: list[Challenge]) -> None:
    assert parse_challenges(header) == expected


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ('Bearer realm="a",service="b", Basic realm="c"',
         [Challenge("bearer", {"realm": "a", "service": "b"}), Challenge("basic", {"realm": "c"})]),
        ('Basic realm="x", ' + GHCR,
         [Challenge("basic", {"realm": "x"}), Challenge("bearer", {"realm": "https://ghcr.io/token",
                                                                   "service": "ghcr.io",
                                                                   "scope": "repository:user/image:pull"})]),
        ('Basic, Bearer realm="y"', [Challenge("basic", {}), Challenge("bearer", {"realm": "y"})]),
        ('Bearer realm="a", Bearer realm="b"', [Challenge("bearer", {"realm": "a"}),
                                                Challenge("bearer", {"realm": "b"})]),
    ],
)
def test_parse_several_challenges_in_one_header(header: str, expected: list[Challenge]) -> None:
    assert parse_challenges(header) == expected


@pytest.mark.parametrize(
    ("header", "params"),
    [
        (r'Bearer realm="say \"hi\", ok",service="s"', {"realm": 'say "hi", ok', "service": "s"}),
        (r'Bearer realm="a\\b",service="c,d"', {"realm": "a\\b", "service": "c,d"}),
        ('Bearer scope="repository:a/b:pull,push repository:c/d:pull",realm="r"',
         {"scope": "repository:a/b:pull,push repository:c/d:pull", "realm": "r"}),
        ('Bearer realm="x=y,z=w"', {"realm": "x=y,z=w"}),
        (r'Bearer realm="\q"', {"realm": "q"}),  # quoted-pair: backslash escapes any character
    ],
)
def test_parse_quoted_strings(header: str, params: dict[str, str]) -> None:
    assert parse_challenges(header) == [Challenge("bearer", params)]


@pytest.mark.parametrize(
    "header",
    ["=", "Bearer =x", 'Bearer realm="unterminated', 'Bearer realm="ends in backslash\\', "B\x00 r=x",
     'Bear(er realm="x"', "=Bearer"],
)
def test_parse_malformed_raises_auth_error(header: str) -> None:
    with pytest.raises(AuthError):
        parse_challenges(header)


@pytest.mark.parametrize("header", ["Negotiate abc==", "Basic dXNlcjpwYXNz=="])
def test_parse_token68(header: str) -> None:
    scheme, _, token = header.partition(" ")
    assert parse_challenges(header) == [Challenge(scheme.lower(), {"": token})]


def test_parse_accepts_empty_list_elements() -> None:
    assert parse_challenges('Bearer realm="x",,service="y"') == [Challenge("bearer", {"realm": "x", "service": "y"})]


_HEADER_ALPHABET = 'BearerBasic realm="\\,= \t:/' + "\x00é\n"


@given(st.text(alphabet=st.sampled_from(_HEADER_ALPHABET), max_size=60) | st.text(max_size=60))
@example('Bearer realm="x",service="y", Basic realm="z"')
@example('Bearer realm="\\')
@example(",,,")
@example("a=")
@example("a b=")
def test_parse_challenges_raises_only_auth_error(header: str) -> None:
    try:
        challenges = parse_challenges(header)
    except AuthError:
        return
    assert isinstance(challenges, list)
    for ch in challenges:
        assert isinstance(ch, Challenge)
        assert ch.scheme and ch.scheme == ch.scheme.lower()
        assert all(isinstance(k, str) and isinstance(v, str) for k, v in ch.params.items())


# -- load_credentials ----------------------------------------------------------------------------

def _write_config(directory: Path, config: object) -> Path:
    path = directory / "config.json"
    path.write_text(json.dumps(config))
    return path


async def test_credentials_from_base64_auth(tmp_path: Path) -> None:
    token = base64.b64encode(b"alice:pa:ss").decode()  # the password may contain ':'
    path = _write_config(tmp_path, {"auths": {"reg.example:5000": {"auth": token}}})
    creds = await load_credentials("reg.example:5000", path=path)
    assert (creds.username, creds.password) == ("alice", "pa:ss")
    assert creds.basic == "Basic " + token


async def test_credentials_from_username_password_and_url_keys(tmp_path: Path) -> None:
    path = _write_config(tmp_path, {"auths": {"https://reg.example": {"username": "bob", "password": "hunter2"}}})
    creds = await load_credentials("reg.example", path=path)
    assert (creds.username, creds.password) == ("bob", "hunter2")
    assert not await load_credentials("other.example", path=path)


async def test_credentials_identity_token(tmp_path: Path) -> None:
    path = _write_config(tmp_path, {"auths": {"reg.example": {"auth": base64.b64encode(b"u:p").decode(),
                                                              "identitytoken": "refresh-xyz"}}})
    creds = await load_credentials("reg.example", path=path)
    assert creds.identity_token == "refresh-xyz"
    assert creds


async def test_credentials_docker_hub_legacy_key(tmp_path: Path) -> None:
    token = base64.b64encode(b"hubuser:hubpass").decode()
    path = _write_config(tmp_path, {"auths": {"https://index.docker.io/v1/": {"auth": token}}})
    creds = await load_credentials("docker.io", path=path)
    assert (creds.username, creds.password) == ("hubuser", "hubpass")


async def test_credentials_missing_file_and_entry(tmp_path: Path) -> None:
    assert await load_credentials("reg.example", path=tmp_path / "absent.json") == Credentials()
    assert not await load_credentials("reg.example", path=_write_config(tmp_path, {}))


@pytest.mark.parametrize(("content", "said"), [
    ("{not json", "is not valid JSON (Expecting property name enclosed in double quotes at line 1 column 2)"),
    ("[1, 2]", "is not a JSON object"),
])
async def test_credentials_bad_config_is_bad_input(tmp_path: Path, content: str, said: str) -> None:
    path = tmp_path / "config.json"
    path.write_text(content)
    with pytest.raises(BadInputError, match=re.escape(f"docker config {path} {said}")):
        await load_credentials("reg.example", path=path)


async def test_credentials_bad_base64_is_bad_input_without_secret(tmp_path: Path) -> None:
    bad = base64.b64encode(b"\xff\xfe:topsecret").decode()  # not UTF-8 once decoded
    path = _write_config(tmp_path, {"auths": {"reg.example": {"auth": bad}}})
    with pytest.raises(BadInputError) as info:
        await load_credentials("reg.example", path=path)
    assert bad not in str(info.value) and "topsecret" not in str(info.value)


@pytest.fixture
def helper_bin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A directory on PATH holding ``docker-credential-blobtest``.

    The helper answers ``get`` as docker's helpers do: JSON for servers it knows, exit 1 otherwise,
    and logs each server asked for to ``asked.log``.
    """
    directory = tmp_path / "bin"
    directory.mkdir()
    script = directory / "docker-credential-blobtest"
    script.write_text(f"""#!{sys.executable}
import json, pathlib, sys
assert sys.argv[1:] == ["get"], sys.argv
server = sys.stdin.read().strip()
with open(pathlib.Path(__file__).with_name("asked.log"), "a") as log:
    log.write(server + "\\n")
known = {{
    "helper.example": {{"Username": "carol", "Secret": "helper-s3cret"}},
    "https://index.docker.io/v1/": {{"Username": "hub", "Secret": "hub-s3cret"}},
    "token.example": {{"Username": "<token>", "Secret": "identity-s3cret"}},
    "slow.example": {{"Username": "slow", "Secret": "slow-s3cret"}},
}}
if server == "slow.example":  # a cloud login's helper: a second or so an answer
    import time
    time.sleep(0.6)
if server == "hang.example":  # a keychain waiting for a passphrase nobody types
    import os, time
    pathlib.Path(__file__).with_name("hang.pid").write_text(str(os.getpid()))
    time.sleep(60)
if server == "expired.example":
    print("error getting credentials: the login of your cloud account has expired", file=sys.stderr)
    sys.exit(1)
if server not in known:
    print("credentials not found in native keychain")
    sys.exit(1)
print(json.dumps(dict(known[server], ServerURL=server)))
""")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{directory}{os.pathsep}{os.environ.get('PATH', '')}")
    return directory


async def test_credentials_from_cred_helper(tmp_path: Path, helper_bin: Path) -> None:
    path = _write_config(tmp_path, {
        "credHelpers": {"helper.example": "blobtest", "docker.io": "blobtest", "token.example": "blobtest"},
        "auths": {"helper.example": {"username": "stale", "password": "stale"}},
    })
    creds = await load_credentials("helper.example", path=path)
    assert (creds.username, creds.password) == ("carol", "helper-s3cret")  # the helper wins over auths
    hub = await load_credentials("docker.io", path=path)
    assert (hub.username, hub.password) == ("hub", "hub-s3cret")
    token = await load_credentials("token.example", path=path)
    assert (token.username, token.password, token.identity_token) == ("", "", "identity-s3cret")
    asked = (helper_bin / "asked.log").read_text().split()
    assert asked == ["helper.example", "https://index.docker.io/v1/", "token.example"]


async def test_cred_helper_without_entry_falls_back_to_auths(tmp_path: Path, helper_bin: Path) -> None:
    path = _write_config(tmp_path, {"credsStore": "blobtest",
                                    "auths": {"plain.example": {"username": "dave", "password": "pw"}}})
    creds = await load_credentials("plain.example", path=path)
    assert (creds.username, creds.password) == ("dave", "pw")
    assert (helper_bin / "asked.log").read_text().split() == ["plain.example"]


async def test_cred_helper_that_fails_is_auth_error_saying_why(tmp_path: Path, helper_bin: Path) -> None:
    """Not "credentials not found" but a failure (an expired cloud login): named, as docker and
    crane do, not taken for an anonymous registry that answers 401 later."""
    path = _write_config(tmp_path, {"credHelpers": {"expired.example": "blobtest"}})
    with pytest.raises(AuthError, match=r"docker-credential-blobtest failed for expired.example \(exit 1\): "
                                        "error getting credentials: the login of your cloud account has expired"):
        await load_credentials("expired.example", path=path)


async def test_a_slow_cred_helper_does_not_stall_the_event_loop(tmp_path: Path, helper_bin: Path) -> None:
    """The helper is a child process the loop waits on: the job's transfers go on meanwhile."""
    path = _write_config(tmp_path, {"credsStore": "blobtest"})
    loop = asyncio.get_running_loop()
    gaps: list[float] = []

    async def tick() -> None:
        while True:
            before = loop.time()
            await asyncio.sleep(0.01)
            gaps.append(loop.time() - before)

    ticker = asyncio.create_task(tick())
    started = loop.time()
    creds = await load_credentials("slow.example", path=path)
    ticker.cancel()
    assert (creds.username, creds.password) == ("slow", "slow-s3cret")
    assert loop.time() - started >= 0.6 and len(gaps) > 20 and max(gaps) < 0.3, (loop.time() - started, max(gaps))


async def test_cancelling_a_lookup_kills_its_helper(tmp_path: Path, helper_bin: Path) -> None:
    """Ctrl-C while a helper waits for a passphrase: the helper goes too, at once."""
    path = _write_config(tmp_path, {"credsStore": "blobtest"})
    lookup = asyncio.create_task(load_credentials("hang.example", path=path))
    pid_file = helper_bin / "hang.pid"
    for _ in range(500):
        if pid_file.exists() and pid_file.read_text():
            break
        await asyncio.sleep(0.01)
    pid = int(pid_file.read_text())
    lookup.cancel()
    with pytest.raises(asyncio.CancelledError):
        await lookup
    with pytest.raises(ProcessLookupError):  # killed and reaped
        os.kill(pid, 0)


@pytest.mark.parametrize("run", [asyncio.run, uvloop.run], ids=["asyncio", "uvloop"])
def test_a_helper_that_fails_without_reading_its_input(
    tmp_path: Path, helper_bin: Path, run: Callable[[Coroutine[Any, Any, None]], None]
) -> None:
    """It may exit before blobflow has written the server's name. uvloop (the CLI's loop) then
    raised "unable to perform operation on <WriteUnixTransport closed=True ...>": an internal
    error in place of the helper's own message."""
    script = helper_bin / "docker-credential-quick"
    script.write_text("#!/bin/sh\necho 'keychain is locked' >&2\nexit 3\n")
    script.chmod(0o755)
    path = _write_config(tmp_path, {"credsStore": "quick"})

    async def ask() -> None:
        for _ in range(20):
            with pytest.raises(AuthError, match=r"docker-credential-quick failed for reg.example \(exit 3\): "
                                                "keychain is locked"):
                await load_credentials("reg.example", path=path)

    run(ask())


async def test_cred_helper_missing_is_auth_error(tmp_path: Path, helper_bin: Path) -> None:
    path = _write_config(tmp_path, {"credHelpers": {"reg.example": "no-such-helper-blobflow"}})
    with pytest.raises(AuthError, match="docker-credential-no-such-helper-blobflow"):
        await load_credentials("reg.example", path=path)


async def test_docker_config_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _write_config(tmp_path, {"auths": {"env.example": {"username": "erin", "password": "pw"}}})
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path))
    assert (await load_credentials("env.example")).username == "erin"


def test_credentials_repr_hides_secrets() -> None:
    creds = Credentials("alice", "wonderland-s3cret", "identity-t0ken")
    for text in (repr(creds), str(creds), f"{creds!r}", repr([creds]), repr({"r": creds})):
        assert "wonderland-s3cret" not in text
        assert "identity-t0ken" not in text
    assert "alice" in repr(creds)

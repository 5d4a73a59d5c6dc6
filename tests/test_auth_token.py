"""Bearer-token auth against a real Distribution registry (``auth: token``) over TLS.

The registry trusts JWTs from the test token service (tests/tokenserver.py); users are a
read-only ``reader`` and a ``pusher``. Each test runs the CLI in a subprocess, as a user would.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from authenv import (
    PUSHER,
    PUSHER_PASSWORD,
    READER,
    READER_PASSWORD,
    DockerHome,
    MakeTlsProxy,
    MakeTokenRegistry,
    RunCli,
    TokenRegistry,
)
from conftest import CheckLayout
from faultproxy import Faults

import blobflow
from blobflow.config import EngineConfig
from blobflow.errors import AuthError
from blobflow.localreg import LocalRegistry
from blobflow.registry import Credentials
from blobflow.synth import build_image

pytest_plugins = ["authenv"]


def _tls(reg: TokenRegistry) -> list[str]:
    return ["--ca-file", str(reg.ca_file)]


def _api(reg: TokenRegistry) -> blobflow.Client:
    """The Python API in this process (credentials from $DOCKER_CONFIG, as the CLI reads them)."""
    return blobflow.Client(EngineConfig(ca_file=str(reg.ca_file)))


async def test_push_user_pushes_and_read_only_user_pulls(
    token_registry: TokenRegistry, docker_home: DockerHome, small_image: Path, run_cli: RunCli,
    check_layout: CheckLayout, tmp_path: Path,
) -> None:
    reg = token_registry
    docker_home.login(reg.host, PUSHER, PUSHER_PASSWORD)
    pushed = await run_cli("push", str(small_image), f"{reg.host}/team/app:v1", *_tls(reg))
    assert pushed.returncode == 0, pushed.output
    push_scopes = {s for i in reg.tokens.tokens_for(PUSHER) for s in i.scopes}
    assert "repository:team/app:pull,push" in push_scopes

    docker_home.login(reg.host, READER, READER_PASSWORD)
    pulled = await run_cli("pull", f"{reg.host}/team/app:v1", str(tmp_path / "out"), *_tls(reg))
    assert pulled.returncode == 0, pulled.output
    assert "v1" in check_layout(tmp_path / "out").tags
    assert all(i.grant_type == "basic" and i.method == "GET" for i in reg.tokens.tokens_for(READER))


async def test_read_only_user_push_fails_with_exit_2_naming_push(
    token_registry: TokenRegistry, docker_home: DockerHome, small_image: Path, run_cli: RunCli,
) -> None:
    reg = token_registry
    docker_home.login(reg.host, READER, READER_PASSWORD)
    run = await run_cli("push", str(small_image), f"{reg.host}/team/app:v1", *_tls(reg))
    assert run.returncode == 2, run.output
    assert "denied: user 'reader' lacks push permission on repository team/app" in run.stderr
    assert "Traceback" not in run.stderr
    # the token service granted what it could (pull), so the registry, not blobflow, said no
    assert {a for i in reg.tokens.tokens_for(READER) for a in i.access} >= {("repository", "team/app", ("pull",))}


async def test_anonymous_pull_of_private_repository_says_to_log_in(
    token_registry: TokenRegistry, docker_home: DockerHome, tmp_path: Path,
) -> None:
    reg = token_registry
    with pytest.raises(AuthError) as info:
        await _api(reg).pull(f"{reg.host}/team/app:v1", tmp_path / "out")
    assert info.value.exit_code == 2
    assert "anonymous access lacks pull permission on repository team/app" in str(info.value)
    assert f"blobflow login {reg.host}" in str(info.value)
    assert not (tmp_path / "out").exists()
    assert {i.grant_type for i in reg.tokens.issued} == {"anonymous"}


async def test_cross_repository_mount_with_one_token_for_both_repositories(
    token_registry: TokenRegistry, docker_home: DockerHome, small_image: Path,
) -> None:
    reg = token_registry
    docker_home.login(reg.host, PUSHER, PUSHER_PASSWORD)
    await _api(reg).push(small_image, f"{reg.host}/team/a:v1")
    copied = await _api(reg).copy(f"{reg.host}/team/a:v1", f"{reg.host}/team/b:v1")
    assert copied.mounted == 3 and copied.bytes == 0, copied  # config and two layers
    scopes = {" ".join(i.scopes) for i in reg.tokens.tokens_for(PUSHER)}
    assert "repository:team/b:pull,push repository:team/a:pull" in scopes
    mount_grants = [i.access for i in reg.tokens.tokens_for(PUSHER) if len(i.scopes) == 2]
    assert (("repository", "team/b", ("pull", "push")), ("repository", "team/a", ("pull",))) in mount_grants


async def test_tokens_expiring_mid_transfer_are_refreshed_between_chunks_and_parts(
    make_token_registry: MakeTokenRegistry, make_tls_proxy: MakeTlsProxy, docker_home: DockerHome,
    run_cli: RunCli, check_layout: CheckLayout, tmp_path: Path,
) -> None:
    """2 s tokens; a 4.5 MiB layer pushed in 512 KiB PATCHes and pulled in 512 KiB ranges, each
    transfer about 3 s long through a 1.5 MB/s proxy: every request must start with a live token."""
    reg = await make_token_registry(ttl=2.0)
    image = tmp_path / "image"
    build_image(image, "v1", [4608 * 1024], seed=5)  # over the 4 MiB a single PUT carries
    front = await make_tls_proxy(reg, Faults(bandwidth=1_500_000))
    docker_home.login(front.host, PUSHER, PUSHER_PASSWORD)
    pushed = await run_cli("push", str(image), f"{front.host}/team/big:v1", "--chunk-size", "512KiB",
                           *_tls(reg))
    assert pushed.returncode == 0, pushed.output
    assert len(reg.tokens.tokens_for(PUSHER)) >= 3, "the push outlived its first token without a new one"
    patches = [status for method, _, status in front.log if method == "PATCH"]
    assert len(patches) >= 8 and set(patches) == {202}, f"a chunk was sent with a stale token: {patches}"

    pulled = await run_cli("pull", f"{front.host}/team/big:v1", str(tmp_path / "out"), "--part-size", "512KiB",
                           "--concurrency", "1", *_tls(reg))
    assert pulled.returncode == 0, pulled.output
    check_layout(tmp_path / "out")
    gets = [status for method, path, status in front.log if method == "GET" and "/blobs/" in path]
    assert 401 not in gets, "a range was requested with a stale token"

async def test_token_refused_by_the_registry_is_replaced_once_mid_transfer(
    make_token_registry: MakeTokenRegistry, make_tls_proxy: MakeTlsProxy, docker_home: DockerHome, tmp_path: Path,
) -> None:
    """The token service says 300 s but its tokens die within 0.5 to 1.5 s (a revoked token, a
    drifting clock): the registry's 401s are answered with one new token each, replayable
    requests are repeated at once and a refused chunk is resumed from the registry's offset."""
    reg = await make_token_registry(ttl=0.5, advertised_ttl=300.0)
    image = tmp_path / "image"
    build_image(image, "v1", [1024 * 1024], seed=6)
    front = await make_tls_proxy(reg, Faults(bandwidth=500_000))
    config = EngineConfig(ca_file=str(reg.ca_file), chunk_size=128 * 1024, monolithic_threshold=64 * 1024,
                          part_size=128 * 1024, range_threshold=128 * 1024 + 1, concurrency=1, backoff_base=0.05)
    client = blobflow.Client(config, credentials={front.host: Credentials(PUSHER, PUSHER_PASSWORD)})
    pushed = await client.push(image, f"{front.host}/team/revoked:v1")
    refused = [(m, s) for m, _, s in front.log if s == 401 and m != "GET"]
    assert refused, "the tokens never died during the push: the test proves nothing"
    assert ("PATCH", 401) in refused, f"no chunk met a dead token: {front.log}"
    assert pushed.blobs == 2

    # A token lives at most 1.5 s from the pull's first request, and four ranges are in flight at
    # once, so the later ranges must be asked for well after that: at 250 kB/s, from about 2 s on.
    front.faults = Faults(bandwidth=250_000)
    before = len(front.log)
    pulled = await client.pull(f"{front.host}/team/revoked:v1", tmp_path / "out")
    assert pulled.blobs == 2
    range_gets = [s for m, p, s in front.log[before:] if m == "GET" and "/blobs/" in p]
    assert 401 in range_gets and range_gets.count(206) >= 8, range_gets


async def test_credential_helper_supplies_the_password(
    token_registry: TokenRegistry, docker_home: DockerHome, small_image: Path,
) -> None:
    reg = token_registry
    docker_home.add_helper("blobtest", {reg.host: (PUSHER, PUSHER_PASSWORD)})
    docker_home.write({"auths": {}, "credHelpers": {reg.host: "blobtest"}})
    await _api(reg).push(small_image, f"{reg.host}/team/helped:v1")
    # asked once, at the first 401, however many requests (three blobs at once) met one
    assert docker_home.helper_log.read_text().splitlines() == [f"get {reg.host}"]
    assert reg.tokens.tokens_for(PUSHER), "the helper's credentials were not used"


async def test_a_credential_store_is_asked_only_by_registries_that_want_a_login(
    token_registry: TokenRegistry, registry: LocalRegistry, docker_home: DockerHome, small_image: Path,
) -> None:
    """docker's ``credsStore`` (Docker Desktop's, a keychain's) covers every registry, and its helper
    can take a second an answer: blobflow asked it for each registry of a job up front, the open
    ones included, with the whole job waiting. Now only a registry that answers 401 runs it."""
    reg = token_registry
    docker_home.add_helper("blobtest", {reg.host: (PUSHER, PUSHER_PASSWORD)})
    docker_home.write({"auths": {}, "credsStore": "blobtest"})
    client = _api(reg)
    await client.push(small_image, f"{registry.host}/open/app:v1")
    await client.copy(f"{registry.host}/open/app:v1", f"{reg.host}/team/copied:v1")
    assert docker_home.helper_log.read_text().splitlines() == [f"get {reg.host}"]
    assert reg.tokens.tokens_for(PUSHER)


async def test_a_failing_credential_helper_fails_the_registry_that_wants_a_login(
    token_registry: TokenRegistry, registry: LocalRegistry, docker_home: DockerHome, small_image: Path,
    run_cli: RunCli,
) -> None:
    """An expired cloud login's helper: the registry that needs it fails, naming the helper (exit
    2, as before); an open registry of the same job is not held up by it."""
    reg = token_registry
    failing = docker_home.bin_dir / "docker-credential-expired"
    failing.write_text("#!/bin/sh\necho 'error getting credentials: your login has expired' >&2\nexit 1\n")
    failing.chmod(0o755)
    docker_home.write({"auths": {}, "credsStore": "expired"})
    pushed = await run_cli("push", str(small_image), f"{registry.host}/open/app:v1")
    assert pushed.returncode == 0, pushed.output
    copied = await run_cli("copy", f"{registry.host}/open/app:v1", f"{reg.host}/team/app:v1", *_tls(reg))
    assert copied.returncode == 2, copied.output
    assert (f"credential helper docker-credential-expired failed for {reg.host} (exit 1): "
            "error getting credentials: your login has expired") in copied.output
    assert "Traceback" not in copied.output


async def test_identity_token_is_exchanged_for_access_tokens_with_oauth2_post(
    token_registry: TokenRegistry, docker_home: DockerHome, small_image: Path,
) -> None:
    reg = token_registry
    refresh = reg.tokens.mint_refresh_token(PUSHER)
    docker_home.write({"auths": {reg.host: {"identitytoken": refresh}}})
    await _api(reg).push(small_image, f"{reg.host}/team/oauth:v1")
    grants = reg.tokens.tokens_for(PUSHER)
    assert grants and all(i.method == "POST" and i.grant_type == "refresh_token" for i in grants)

    docker_home.write({"auths": {reg.host: {"identitytoken": "not-a-refresh-token"}}})
    with pytest.raises(AuthError) as info:
        await _api(reg).push(small_image, f"{reg.host}/team/oauth:v2")
    assert "rejected the credentials of the identity token stored for" in str(info.value)
    assert f"blobflow login {reg.host}" in str(info.value) and "not-a-refresh-token" not in str(info.value)

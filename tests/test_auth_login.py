"""``blobflow login``: credentials are checked with the registry first, then stored as docker does."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import stat
import sys
from pathlib import Path

import pytest
from authenv import PUSHER, PUSHER_PASSWORD, DockerHome, RunCli, TokenRegistry
from conftest import AUTH_PASSWORD, AUTH_USER, sigint_as_at_a_terminal

from blobflow.errors import BadInputError
from blobflow.localreg import LocalRegistry
from blobflow.registry import Credentials, load_credentials, store_credentials

pytest_plugins = ["authenv"]


def _tls(reg: TokenRegistry) -> list[str]:
    return ["--ca-file", str(reg.ca_file)]


async def test_login_verifies_then_stores_auths_entry_with_mode_0600(
    token_registry: TokenRegistry, docker_home: DockerHome, small_image: Path, run_cli: RunCli,
) -> None:
    reg = token_registry
    docker_home.write({"auths": {"other.example": {"auth": "b3RoZXI6c2VjcmV0"}}, "psFormat": "table"})
    run = await run_cli("login", reg.host, "-u", PUSHER, "--password-stdin", *_tls(reg), stdin=PUSHER_PASSWORD + "\n")
    assert run.returncode == 0, run.output
    assert "Login Succeeded" in run.stdout and PUSHER_PASSWORD not in run.output
    assert reg.tokens.tokens_for(PUSHER), "login did not check the credentials with the token service"
    config = docker_home.read()
    assert config["psFormat"] == "table" and config["auths"]["other.example"] == {"auth": "b3RoZXI6c2VjcmV0"}
    assert config["auths"][reg.host] == {"auth": base64.b64encode(f"{PUSHER}:{PUSHER_PASSWORD}".encode()).decode()}
    assert stat.S_IMODE(docker_home.config_path.stat().st_mode) == 0o600
    assert [p.name for p in docker_home.directory.iterdir() if p.name.startswith(".config")] == []

    pushed = await run_cli("push", str(small_image), f"{reg.host}/team/app:v1", *_tls(reg))
    assert pushed.returncode == 0, pushed.output


async def test_login_with_a_wrong_password_stores_nothing_and_exits_2(
    token_registry: TokenRegistry, docker_home: DockerHome, run_cli: RunCli,
) -> None:
    reg = token_registry
    run = await run_cli("login", reg.host, "-u", PUSHER, "--password-stdin", *_tls(reg), stdin="wrong-password-1")
    assert run.returncode == 2, run.output
    assert f"rejected the credentials of user '{PUSHER}'" in run.stderr
    assert "incorrect username or password" in run.stderr
    assert not docker_home.config_path.exists()


async def test_login_stores_in_the_configured_credential_helper(
    token_registry: TokenRegistry, docker_home: DockerHome, small_image: Path, run_cli: RunCli,
) -> None:
    reg = token_registry
    docker_home.add_helper("blobtest", {})
    docker_home.write({"credsStore": "blobtest"})
    run = await run_cli("login", reg.host, "-u", PUSHER, "--password-stdin", "--json", *_tls(reg),
                        stdin=PUSHER_PASSWORD)
    assert run.returncode == 0, run.output
    assert '"stored_in": "credential helper docker-credential-blobtest"' in run.stdout
    assert docker_home.helper_saved("blobtest")[reg.host] == [PUSHER, PUSHER_PASSWORD]
    assert docker_home.read() == {"credsStore": "blobtest", "auths": {reg.host: {}}}  # no secret in the file
    pushed = await run_cli("push", str(small_image), f"{reg.host}/team/app:v1", *_tls(reg))
    assert pushed.returncode == 0, pushed.output


async def test_logout_forgets_what_login_stored(
    token_registry: TokenRegistry, docker_home: DockerHome, small_image: Path, run_cli: RunCli,
) -> None:
    """`blobflow logout` undoes `blobflow login`, as docker logout does: the helper's copy is
    erased and the config's entry goes, other settings kept; logging out again is no error."""
    reg = token_registry
    docker_home.add_helper("blobtest", {})
    docker_home.write({"credHelpers": {reg.host: "blobtest"}, "auths": {"other.example": {"auth": "b3RoZXI6cHc="}},
                       "proxies": {"default": {}}})
    login = await run_cli("login", reg.host, "-u", PUSHER, "--password-stdin", *_tls(reg), stdin=PUSHER_PASSWORD)
    assert login.returncode == 0, login.output
    assert reg.host in docker_home.helper_saved("blobtest")

    out = await run_cli("logout", reg.host)
    assert out.returncode == 0, out.output
    assert out.stdout.strip() == (f"Removed the credentials for {reg.host} from credential helper "
                                  f"docker-credential-blobtest and {docker_home.config_path}")
    assert docker_home.helper_saved("blobtest") == {}
    assert docker_home.read() == {"credHelpers": {reg.host: "blobtest"},
                                  "auths": {"other.example": {"auth": "b3RoZXI6cHc="}}, "proxies": {"default": {}}}
    denied = await run_cli("push", str(small_image), f"{reg.host}/team/app:v1", *_tls(reg))
    assert denied.returncode == 2 and "denied" in denied.stderr, denied.output  # anonymous now

    again = await run_cli("logout", f"https://{reg.host}/", "--json")
    assert again.returncode == 0, again.output
    assert json.loads(again.stdout) == {"event": "logout", "registry": reg.host, "removed_from": []}


async def test_logout_from_a_helper_that_fails_says_so(docker_home: DockerHome, run_cli: RunCli) -> None:
    failing = docker_home.bin_dir / "docker-credential-locked"
    failing.write_text("#!/bin/sh\necho 'the keychain is locked' >&2\nexit 1\n")
    failing.chmod(0o755)
    docker_home.write({"credsStore": "locked", "auths": {"reg.example": {}}})
    out = await run_cli("logout", "reg.example")
    assert out.returncode == 2, out.output
    assert ("credential helper docker-credential-locked could not erase the credentials for reg.example: "
            "the keychain is locked") in out.stderr
    assert docker_home.read() == {"credsStore": "locked", "auths": {"reg.example": {}}}  # nothing half done


async def test_login_with_a_credential_helper_that_cannot_run(
    token_registry: TokenRegistry, docker_home: DockerHome, run_cli: RunCli,
) -> None:
    """A helper that is there but not executable: bad input naming it (was "docker-credential-
    blobtest: Permission denied", exit 1), and nothing written to config.json."""
    reg = token_registry
    docker_home.add_helper("blobtest", {}).chmod(0o644)
    docker_home.write({"credsStore": "blobtest"})
    run = await run_cli("login", reg.host, "-u", PUSHER, "--password-stdin", *_tls(reg), stdin=PUSHER_PASSWORD)
    assert run.returncode == 2, run.output
    assert (f"credential helper docker-credential-blobtest configured for {reg.host} cannot run: "
            "Permission denied") in run.stderr
    assert docker_home.read() == {"credsStore": "blobtest"}
    assert PUSHER_PASSWORD not in run.output


async def test_login_to_a_basic_auth_registry(
    auth_registry: LocalRegistry, docker_home: DockerHome, run_cli: RunCli,
) -> None:
    ok = await run_cli("login", f"http://{auth_registry.host}/", "-u", AUTH_USER, "--password-stdin",
                       stdin=AUTH_PASSWORD)
    assert ok.returncode == 0, ok.output
    assert auth_registry.host in docker_home.read()["auths"]
    bad = await run_cli("login", auth_registry.host, "-u", AUTH_USER, "--password-stdin", stdin="nope-nope")
    assert bad.returncode == 2 and f"rejected the credentials of user '{AUTH_USER}'" in bad.stderr


async def test_login_refuses_a_password_it_cannot_read_safely(docker_home: DockerHome, run_cli: RunCli) -> None:
    no_stdin, no_user, bad_host = await asyncio.gather(
        run_cli("login", "localhost:5000", "-u", "me"),
        run_cli("login", "localhost:5000", "--password-stdin", stdin="pw"),
        run_cli("login", "not a host", "-u", "me", "--password-stdin", stdin="pw"))
    assert no_stdin.returncode == 2 and "--password-stdin" in no_stdin.stderr
    assert no_user.returncode == 2 and "-u USER" in no_user.stderr
    assert bad_host.returncode == 2 and "invalid registry" in bad_host.stderr
    assert not docker_home.config_path.exists()


async def test_ctrl_c_at_the_password_prompt_ends_login_at_once(docker_home: DockerHome) -> None:
    """The prompt is on a terminal (a pty of the test's; its own session, so not the terminal
    running the tests). The prompt used to wait in a worker thread, which held the exit after
    Ctrl-C until a line was typed."""
    leader, follower = os.openpty()
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "blobflow", "login", "localhost:5000", "-u", "me", stdin=follower,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE, start_new_session=True,
            preexec_fn=sigint_as_at_a_terminal)
        assert proc.stderr is not None
        try:
            async with asyncio.timeout(30):
                prompt = await proc.stderr.readuntil(b"Password: ")
            proc.send_signal(signal.SIGINT)
            async with asyncio.timeout(10):
                rest = await proc.stderr.read()
                code = await proc.wait()
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    finally:
        os.close(follower)
        os.close(leader)
    assert prompt.endswith(b"Password: ")
    assert code == 130, rest.decode()
    assert b"interrupted" in rest
    assert not docker_home.config_path.exists()


async def test_ctrl_d_at_a_login_prompt_is_bad_input_not_an_internal_error(docker_home: DockerHome) -> None:
    """End of input at "Username: " or "Password: " is no name or no password (exit 2), not
    Python's EOFError as an internal error."""
    for args in (["login", "localhost:5000"], ["login", "localhost:5000", "-u", "me"]):
        leader, follower = os.openpty()
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "blobflow", *args, stdin=follower, stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.PIPE, start_new_session=True)
            assert proc.stderr is not None
            async with asyncio.timeout(30):
                if "-u" in args:  # getpass flushes what was typed before its prompt
                    await proc.stderr.readuntil(b"Password: ")
                os.write(leader, b"\x04")  # Ctrl-D: the terminal's end of input
                _, err = await proc.communicate()
        finally:
            os.close(follower)
            os.close(leader)
        assert proc.returncode == 2, (args, err.decode())
        assert "internal error" not in err.decode()
        assert ("a user name" if "-u" not in args else "a password or token") in err.decode(), err.decode()
    assert not docker_home.config_path.exists()


async def test_store_credentials_round_trips_as_docker_names_registries(tmp_path: Path) -> None:
    path = tmp_path / "dc" / "config.json"  # the directory does not exist yet
    store_credentials("docker.io", Credentials("hubuser", "hub-secret-1"), path=path)
    store_credentials("ghcr.io", Credentials(identity_token="refresh-abc-123"), path=path)
    config = json.loads(path.read_text())
    assert set(config["auths"]) == {"https://index.docker.io/v1/", "ghcr.io"}
    assert config["auths"]["ghcr.io"] == {"identitytoken": "refresh-abc-123"}
    assert await load_credentials("docker.io", path=path) == Credentials("hubuser", "hub-secret-1")
    assert await load_credentials("ghcr.io", path=path) == Credentials(identity_token="refresh-abc-123")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and stat.S_IMODE(path.parent.stat().st_mode) == 0o700

    # a new login replaces the entry under any of the names docker accepts for that registry
    config["auths"] = {"https://ghcr.io": {"auth": "b2xkOm9sZA=="}}
    path.write_text(json.dumps(config))
    store_credentials("ghcr.io", Credentials("new", "new-secret-2"), path=path)
    assert json.loads(path.read_text())["auths"] == {"ghcr.io": {"auth": "bmV3Om5ldy1zZWNyZXQtMg=="}}


def test_store_credentials_refuses_a_config_it_cannot_read(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_text("{not json")
    with pytest.raises(BadInputError, match=r"config.json is not valid JSON \(Expecting property name"):
        store_credentials("ghcr.io", Credentials("u", "secret-3"), path=path)
    assert path.read_text() == "{not json"

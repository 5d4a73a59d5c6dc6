"""TLS: system CAs by default, ``--ca-file`` on top of them, ``--insecure`` with a warning, and a
clear error when a certificate is not trusted. The registries serve certificates from the test
session's CA (tests/pki.py), which no system store holds."""

from __future__ import annotations

import asyncio
import json
import socket
from pathlib import Path
from typing import Any

import pytest
from authenv import PUSHER, PUSHER_PASSWORD, DockerHome, Pki, RunCli, TokenRegistry
from conftest import CheckLayout

import blobflow
from blobflow.config import EngineConfig
from blobflow.localreg import LocalRegistry, TlsFiles

pytest_plugins = ["authenv"]


async def test_untrusted_certificate_fails_clearly_and_ca_file_fixes_it(
    token_registry: TokenRegistry, docker_home: DockerHome, small_image: Path, run_cli: RunCli, pki: Pki,
    tmp_path: Path,
) -> None:
    reg = token_registry
    docker_home.login(reg.host, PUSHER, PUSHER_PASSWORD)
    image = f"{reg.host}/team/app:v1"
    runs = await asyncio.gather(*(run_cli("push", str(small_image), image, "-v", "--retries", "3", *ca_args)
                                  for ca_args in ([], ["--ca-file", str(pki.other_ca.cert_path)])))
    for run in runs:
        assert run.returncode == 1, run.output
        assert f"TLS certificate of {reg.host} is not trusted" in run.stderr
        assert "certificate" in run.stderr.split("not trusted", 1)[1]  # OpenSSL's reason follows
        assert "pass its certificate with --ca-file FILE" in run.stderr
        assert "] retry" not in run.stderr, "a certificate failure was retried"
        assert "Traceback (most recent call last)" in run.stderr  # -v shows where; the message stays one line
    assert reg.tokens.issued == [], "a request went to the token service over an untrusted connection"

    ok = await run_cli("push", str(small_image), image, "--ca-file", str(reg.ca_file))
    assert ok.returncode == 0, ok.output
    assert "warning" not in ok.stderr


async def test_insecure_skips_verification_and_warns(
    token_registry: TokenRegistry, docker_home: DockerHome, small_image: Path, run_cli: RunCli,
    check_layout: CheckLayout, tmp_path: Path,
) -> None:
    reg = token_registry
    docker_home.login(reg.host, PUSHER, PUSHER_PASSWORD)
    pushed = await run_cli("push", str(small_image), f"{reg.host}/team/app:v1", "--insecure", "--json")
    assert pushed.returncode == 0, pushed.output
    assert "warning: --insecure: TLS certificates are not verified" in pushed.stderr
    assert all(json.loads(line) for line in pushed.stdout.splitlines())  # --json stays parseable
    pulled = await run_cli("pull", f"{reg.host}/team/app:v1", str(tmp_path / "out"), "--insecure")
    assert pulled.returncode == 0, pulled.output
    check_layout(tmp_path / "out")


async def test_ca_file_adds_to_the_system_trust_store(
    token_registry: TokenRegistry, docker_home: DockerHome, small_image: Path, run_cli: RunCli, pki: Pki,
    tmp_path: Path,
) -> None:
    """A mirror reads from a registry the system trusts and writes to one with a private CA:
    ``--ca-file`` must not cost the system's CAs. SSL_CERT_FILE stands in for the system store."""
    source = token_registry
    docker_home.login(source.host, PUSHER, PUSHER_PASSWORD)
    await blobflow.Client(EngineConfig(ca_file=str(source.ca_file))).push(small_image, f"{source.host}/team/app:v1")
    private = pki.other_ca.issue("private-registry")
    target = LocalRegistry(tmp_path / "private", tls=TlsFiles(private.cert_path, private.key_path))
    target.start()
    try:
        system = {"SSL_CERT_FILE": str(source.ca_file), "SSL_CERT_DIR": str(tmp_path / "no-such-dir")}
        copied, without = await asyncio.gather(
            run_cli("copy", f"{source.host}/team/app:v1", f"{target.host}/mirror/app:v1",
                    "--ca-file", str(pki.other_ca.cert_path), env=system),
            run_cli("copy", f"{source.host}/team/app:v1", f"{target.host}/mirror/app:v2", env=system))
        assert copied.returncode == 0, copied.output
        assert without.returncode == 1 and f"TLS certificate of {target.host} is not trusted" in without.stderr
    finally:
        target.stop()


async def test_unusable_ca_file_is_bad_input(docker_home: DockerHome, run_cli: RunCli, tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    missing, bad = await asyncio.gather(run_cli("tags", "127.0.0.1:9/x", "--ca-file", str(tmp_path / "nope.pem")),
                                        run_cli("tags", "127.0.0.1:9/x", "--ca-file", str(garbage)))
    assert missing.returncode == 2 and "--ca-file" in missing.stderr and "no such file" in missing.stderr
    assert bad.returncode == 2 and "not a readable PEM bundle" in bad.stderr, bad.output


async def test_a_registry_that_speaks_plain_http_is_named_with_the_flag_to_reach_it(
    registry: LocalRegistry, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A registry not on loopback is reached over HTTPS only (no silent downgrade). When it
    answers in plain HTTP, the handshake error says so and names --plain-http, without retries.
    (``plain.test`` is the plain-HTTP test registry under a name that is not loopback.)"""
    real = socket.getaddrinfo

    def getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
        return real("127.0.0.1" if host == "plain.test" else host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    events: list[blobflow.Event] = []
    image = f"plain.test:{registry.port}/r:v1"
    with pytest.raises(blobflow.TransferError, match="speak plain HTTP: if it does, pass --plain-http"):
        await blobflow.Client(listener=events.append).inspect(image)
    assert [e for e in events if e.kind == "retry"] == []
    with pytest.raises(blobflow.NotFoundError):  # with the flag: the registry, which has no such image
        await blobflow.Client(EngineConfig(plain_http=True)).inspect(image)

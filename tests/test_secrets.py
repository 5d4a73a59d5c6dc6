"""A canary password through every path that can fail (and the ones that succeed), with ``-v`` and
with ``--json``: it must appear nowhere in stdout, stderr, state files or exception reprs. Nor may
its base64 ``user:password`` form, nor any token the token service handed out."""

from __future__ import annotations

import asyncio
import base64
import re
import traceback
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import pytest
from authenv import ACCOUNTS, DockerHome, MakeTlsProxy, MakeTokenRegistry, Pki, Run, RunCli, TokenRegistry
from faultproxy import Faults
from tokenserver import PULL, PUSH, Account

import blobflow
from blobflow.config import EngineConfig
from blobflow.errors import AuthError
from blobflow.registry import Credentials

pytest_plugins = ["authenv"]

CANARY = "canary-7Qz-Kx93-never-print-me"
USER = "canary"  # the token service knows this user, with CANARY as password
GHOST = "ghost"  # configured with CANARY too, but unknown to the token service: a wrong password
OUTPUT_FLAGS = (("-v",), ("--json",))


def _forbidden(reg: TokenRegistry) -> list[str]:
    out = [CANARY]
    for user in (USER, GHOST):
        out.append(base64.b64encode(f"{user}:{CANARY}".encode()).decode())
    out += reg.tokens.values + list(reg.tokens.refresh_tokens)
    return out


def _assert_clean(reg: TokenRegistry, run: Run, *places: Path) -> None:
    texts = {"stdout": run.stdout, "stderr": run.stderr}
    for place in places:
        for path in [place] if place.is_file() else place.rglob("*"):
            try:
                texts[str(path)] = path.read_bytes().decode(errors="replace")
            except (FileNotFoundError, IsADirectoryError):
                # a directory, or a temp file that a run going on beside this one renamed or removed
                # meanwhile: the scan after every run is done reads what it became
                continue
    for secret in _forbidden(reg):
        for where, text in texts.items():
            assert secret not in text, f"a secret ({secret[:12]}...) leaked into {where}"
    # a bearer token printed anywhere, even one the tests did not record
    for where, text in texts.items():
        assert not re.search(r"Bearer\s+[A-Za-z0-9_\-.]{20,}", text), f"a bearer token leaked into {where}"


async def _together(runs: list[Coroutine[Any, Any, None]]) -> None:
    """Run the checks at once; the first failure cancels the others (and their processes) and is
    raised as itself."""
    try:
        async with asyncio.TaskGroup() as tg:
            for run in runs:
                tg.create_task(run)
    except BaseExceptionGroup as group:
        raise group.exceptions[0] from None


@pytest.fixture
async def canary_registry(make_token_registry: MakeTokenRegistry) -> TokenRegistry:
    return await make_token_registry(accounts={
        **ACCOUNTS, USER: Account(CANARY, {"team/*": PUSH, "readonly/*": PULL})})


async def test_canary_never_leaks_from_the_cli(
    canary_registry: TokenRegistry, docker_home: DockerHome, make_tls_proxy: MakeTlsProxy, small_image: Path,
    run_cli: RunCli, tmp_path: Path,
) -> None:
    reg = canary_registry
    ca = ["--ca-file", str(reg.ca_file)]
    front = await make_tls_proxy(reg, Faults(status={403: 1.0}, match=lambda r: r.method == "POST"))
    state = tmp_path / "state"
    common = ["--state-dir", str(state), "--retries", "1"]

    async def check(name: str, args: list[str], code: int, *, stdin: str | None = None) -> None:
        run = await run_cli(*args, stdin=stdin)
        assert run.returncode == code, f"{name}: {run.output}"
        _assert_clean(reg, run, state, tmp_path / "out", docker_home.helper_log)

    auth = base64.b64encode(f"{USER}:{CANARY}".encode()).decode()
    docker_home.write({"auths": {reg.host: {"auth": auth}, front.host: {"auth": auth}}})
    await check("push ok", ["push", str(small_image), f"{reg.host}/team/app:v1", *ca, *common, "-v"], 0)
    # independent runs go together: two cores, and each CLI start costs most of a second
    failing = [
        ("pull ok", ["pull", f"{reg.host}/team/app:v1", *ca], 0),
        ("push without permission", ["push", str(small_image), f"{reg.host}/readonly/app:v1", *ca], 2),
        ("push answered 403", ["push", str(small_image), f"{front.host}/team/other:v1", *ca], 2),
        ("TLS error", ["push", str(small_image), f"{reg.host}/team/app:v2"], 1),
    ]
    runs = []
    for flags in OUTPUT_FLAGS:
        for name, args, code in failing:
            if args[0] == "pull":
                args = [*args[:2], str(tmp_path / "out" / flags[-1].strip("-")), *args[2:]]
            runs.append(check(f"{name} {flags}", [*args, *flags, *common], code))
    await _together(runs)  # independent: two cores, and each CLI start costs most of a second
    _assert_clean(reg, Run(0, "", ""), state, tmp_path / "out", docker_home.helper_log)

    # a wrong password: the same canary, for a user the token service does not know
    docker_home.write({"auths": {reg.host: {"auth": base64.b64encode(f"{GHOST}:{CANARY}".encode()).decode()}}})
    before = docker_home.config_path.read_bytes()
    login = ["login", reg.host, "-u", GHOST, "--password-stdin", *ca]

    def pull(flags: tuple[str, ...]) -> list[str]:  # a directory each: runs side by side must not share one
        return ["pull", f"{reg.host}/team/app:v1", str(tmp_path / "never" / flags[-1].strip("-")), *ca]

    await _together([check(f"{args[0]}, wrong password {flags}", [*args, *flags], 2, stdin=stdin)
                     for flags in OUTPUT_FLAGS for args, stdin in ((pull(flags), None), (login, CANARY))])
    assert docker_home.config_path.read_bytes() == before, "a failed login changed the docker config"
    await check("login ok", ["login", reg.host, "-u", USER, "--password-stdin", "--json", "-v", *ca], 0, stdin=CANARY)
    assert len(reg.tokens.values) >= 6, "the runs above should have handed out many tokens"


async def test_canary_never_leaks_from_the_api(canary_registry: TokenRegistry, docker_home: DockerHome,
                                               small_image: Path, pki: Pki) -> None:
    reg = canary_registry
    for creds, ca_file in ((Credentials(GHOST, CANARY), reg.ca_file),  # wrong password
                           (Credentials(USER, CANARY), reg.ca_file),  # no push permission on readonly/
                           (Credentials(USER, CANARY), pki.other_ca.cert_path)):  # TLS failure
        client = blobflow.Client(EngineConfig(ca_file=str(ca_file), retries=0), credentials={reg.host: creds})
        with pytest.raises(blobflow.BlobflowError) as info:
            await client.push(small_image, f"{reg.host}/readonly/app:v1")
        err = info.value
        texts = [repr(err), str(err), repr(err.args), "".join(traceback.format_exception(err)), repr(creds),
                 repr(client), repr(vars(err))]
        for secret in _forbidden(reg):
            assert all(secret not in t for t in texts), f"{type(err).__name__} leaks a secret"
        assert isinstance(err, AuthError) or "TLS certificate" in str(err)

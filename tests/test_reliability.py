"""Never lose a transfer: faults from the proxy in front of the real registry, kills, restarts."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import signal
import sys
from pathlib import Path

import pytest
from aiohttp import web
from conftest import MakeProxy, sigint_as_at_a_terminal
from faultproxy import Faults

import blobflow
from blobflow.localreg import LocalRegistry
from blobflow.synth import build_image

MiB = 1 << 20
# a ~100 MB image of five layers (and a config): big enough that cuts land mid-stream
LAYERS = [48 * MiB, 24 * MiB, 16 * MiB, 8 * MiB, 4 * MiB]


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("reliability") / "image"
    build_image(root, "v1", LAYERS, seed=11)
    return root


def _blob_sizes(layout: Path) -> int:
    return sum(p.stat().st_size for p in (layout / "blobs" / "sha256").iterdir() if not p.name.startswith("."))


def _verify_layout(layout: Path) -> None:
    names = []
    for path in (layout / "blobs" / "sha256").iterdir():
        assert not path.name.startswith("."), f"leftover temp file {path.name}"
        assert hashlib.sha256(path.read_bytes()).hexdigest() == path.name, f"{path.name} is corrupt"
        names.append(path.name)
    index = json.loads((layout / "index.json").read_text())
    for entry in index["manifests"]:
        manifest = json.loads((layout / "blobs" / "sha256" / entry["digest"][7:]).read_text())
        for d in [manifest["config"], *manifest["layers"]]:
            assert d["digest"][7:] in names


def _config(tmp_path: Path, **kw: object) -> blobflow.EngineConfig:
    opts: dict[str, object] = {"plain_http": True, "state_dir": str(tmp_path / "state"), "backoff_base": 0.02,
                               "backoff_cap": 0.2, "part_size": 8 * MiB, "range_threshold": 16 * MiB}
    opts.update(kw)
    return blobflow.EngineConfig(**opts)  # type: ignore[arg-type]


async def test_pull_push_copy_survive_cuts_and_throttling(
    image: Path, registry: LocalRegistry, registry2: LocalRegistry, proxy: MakeProxy, tmp_path: Path,
) -> None:
    size = _blob_sizes(image)
    faults = Faults(cut_response=0.3, cut_request=0.3, status={429: 0.05, 503: 0.05}, retry_after="0", seed=5)
    p = await proxy(registry, faults)
    client = blobflow.Client(_config(tmp_path))

    pushed = await client.push(image, f"{p.host}/rel/app:v1")
    assert pushed.retries > 0

    before = p.counters["bytes_to_client"]
    pulled = await client.pull(f"{p.host}/rel/app:v1", tmp_path / "pulled")
    _verify_layout(tmp_path / "pulled")
    assert pulled.retries > 0
    pull_bytes = p.counters["bytes_to_client"] - before
    # resume, not restart: a cut costs the bytes after the last good byte, nothing more
    assert pull_bytes < 1.5 * size, (pull_bytes, size)

    before = p.counters["bytes_to_client"]
    copied = await client.copy(f"{p.host}/rel/app:v1", f"{registry2.host}/rel/app:v1")
    copy_bytes = p.counters["bytes_to_client"] - before
    assert copy_bytes < 1.5 * size, (copy_bytes, size)
    assert copied.images[0].digest == pulled.images[0].digest == pushed.images[0].digest

    # the faults really happened
    assert p.counters["cut_response"] > 0
    assert p.counters["cut_request"] > 0
    assert p.counters["status:429"] + p.counters["status:503"] > 0


async def test_flipped_bytes_are_never_committed_and_the_pull_completes(
    image: Path, registry: LocalRegistry, proxy: MakeProxy, tmp_path: Path,
) -> None:
    await blobflow.Client(_config(tmp_path)).push(image, f"{registry.host}/rel/app:v1")
    p = await proxy(registry, Faults(wrong_bytes=0.3, seed=2))
    result = await blobflow.Client(_config(tmp_path, retries=8)).pull(f"{p.host}/rel/app:v1", tmp_path / "out")
    assert p.counters["wrong_bytes"] > 0
    assert result.retries >= 1
    _verify_layout(tmp_path / "out")


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "blobflow", *args]


async def _run_until(cmd: list[str], *, stop_when: str, count: int, limit: float = 60) -> None:
    """Run the CLI with --json and SIGKILL it once ``count`` events of kind ``stop_when`` were printed."""
    proc = await asyncio.create_subprocess_exec(*cmd, "--json", stdout=asyncio.subprocess.PIPE)
    seen = 0
    assert proc.stdout is not None
    try:
        async with asyncio.timeout(limit):
            while line := await proc.stdout.readline():
                if json.loads(line).get("event") == stop_when:
                    seen += 1
                    if seen >= count:
                        break
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGKILL)
        await proc.wait()
    assert seen >= count, f"the job ended before {count} {stop_when} events"


async def _bytes_when(counters: dict[str, int], key: str, threshold: int, proc: asyncio.subprocess.Process) -> None:
    """Poll the proxy's counter (it has no event to wait on) until it passes ``threshold``."""
    while counters[key] < threshold and proc.returncode is None:  # noqa: ASYNC110
        await asyncio.sleep(0.02)


async def test_pull_killed_midway_resumes_from_the_journal(
    image: Path, registry: LocalRegistry, proxy: MakeProxy, tmp_path: Path,
) -> None:
    size = _blob_sizes(image)
    await blobflow.Client(_config(tmp_path)).push(image, f"{registry.host}/rel/app:v1")
    p = await proxy(registry, Faults(bandwidth=30e6))
    out, state = tmp_path / "out", tmp_path / "state"
    cmd = _cli("pull", "--plain-http", "--state-dir", str(state), f"{p.host}/rel/app:v1", str(out))
    proc = await asyncio.create_subprocess_exec(*cmd, stdout=asyncio.subprocess.DEVNULL)
    # killed two thirds in: what the journal had not yet recorded (at most 16 MiB or half a second
    # of bytes) is fetched again, the rest is verified on disk and kept
    await _bytes_when(p.counters, "bytes_to_client", int(0.65 * size), proc)
    proc.send_signal(signal.SIGKILL)
    await proc.wait()
    first = p.counters["bytes_to_client"]
    assert first < size, "the pull finished before it could be killed"
    assert list(state.rglob("*.json")), "no journal was left behind"

    second = await asyncio.create_subprocess_exec(*cmd, "-v", stdout=asyncio.subprocess.PIPE)
    stdout, _ = await second.communicate()
    assert second.returncode == 0
    moved = p.counters["bytes_to_client"] - first
    assert moved < 0.6 * size, (moved, size)
    assert b"resuming" in stdout
    _verify_layout(out)
    assert not list(state.rglob("*.json")), "journal records outlive the finished job"


async def test_push_killed_midway_moves_only_what_is_missing(
    image: Path, registry: LocalRegistry, proxy: MakeProxy, tmp_path: Path,
) -> None:
    """Distribution forgets an upload session whose PATCH was cut (a kill cuts one), so the blob in
    flight starts again; every blob the registry already holds is skipped."""
    size = _blob_sizes(image)
    p = await proxy(registry, Faults(bandwidth=40e6))
    state = tmp_path / "state"
    cmd = _cli("push", "--plain-http", "--concurrency", "1", "--state-dir", str(state), str(image),
               f"{p.host}/rel/app:v1")
    await _run_until(cmd, stop_when="blob_done", count=2)
    first = p.counters["bytes_to_upstream"]
    assert first < size
    second = await asyncio.create_subprocess_exec(*cmd)
    assert await second.wait() == 0
    moved = p.counters["bytes_to_upstream"] - first
    assert moved < 0.6 * size, (moved, size)
    pulled = await blobflow.Client(_config(tmp_path)).pull(f"{registry.host}/rel/app:v1", tmp_path / "check")
    assert pulled.images[0].digest == json.loads((image / "index.json").read_text())["manifests"][0]["digest"]
    _verify_layout(tmp_path / "check")


@pytest.mark.parametrize(("status", "code"), [(403, "DENIED"), (404, "NAME_UNKNOWN")])
async def test_non_retryable_errors_fail_fast_with_the_registry_message(
    image: Path, registry: LocalRegistry, proxy: MakeProxy, tmp_path: Path, status: int, code: str,
) -> None:
    await blobflow.Client(_config(tmp_path)).push(image, f"{registry.host}/rel/app:v1")
    p = await proxy(registry, Faults(status={status: 1.0}, match=lambda r: "/manifests/" in r.path))
    proc = await asyncio.create_subprocess_exec(
        *_cli("pull", "--plain-http", f"{p.host}/rel/app:v1", str(tmp_path / "out")),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    _, stderr = await proc.communicate()
    # a 403 is a permission the credentials lack: bad input (2), like issue 3's denied push
    assert proc.returncode == (2 if status == 403 else 1)
    text = stderr.decode()
    assert code in text and "injected by FaultProxy" in text and "Traceback" not in text
    assert p.counters["requests:GET"] == 1, "a non-retryable error was retried"
    assert not (tmp_path / "out").exists()


async def test_tags_inspect_and_blob_get_retry_a_503(registry: LocalRegistry, proxy: MakeProxy,
                                                     tmp_path: Path) -> None:
    """The first request of each command answered 503: retried, as transfers are."""
    layout = tmp_path / "img"
    build_image(layout, "v1", [4096], seed=12)
    await blobflow.Client(_config(tmp_path)).push(layout, f"{registry.host}/rel/small:v1")
    digest = (await blobflow.Client(_config(tmp_path)).inspect(f"{registry.host}/rel/small:v1")).digest
    answered: list[str] = []

    def first_of_each(request: web.Request) -> bool:  # one 503 per command: its first request
        kind = request.path.rsplit("/", 2)[-2]
        if kind in answered:
            return False
        answered.append(kind)
        return True

    p = await proxy(registry, Faults(status={503: 1.0}, retry_after=None, match=first_of_each))
    client = blobflow.Client(_config(tmp_path))
    assert await client.tags(f"{p.host}/rel/small") == ["v1"]
    assert (await client.inspect(f"{p.host}/rel/small:v1")).digest == digest
    config = (await client.inspect(f"{p.host}/rel/small:v1")).doc["config"]["digest"]
    await client.blob_get(f"{p.host}/rel/small@{config}", tmp_path / "config.json")
    assert hashlib.sha256((tmp_path / "config.json").read_bytes()).hexdigest() == config[7:]
    assert answered == ["tags", "manifests", "blobs"] and p.counters["status:503"] == 3


async def test_manifest_unknown_is_not_retried(registry: LocalRegistry, tmp_path: Path) -> None:
    proc = await asyncio.create_subprocess_exec(
        *_cli("pull", "--plain-http", f"{registry.host}/rel/none:v1", str(tmp_path / "out")),
        stderr=asyncio.subprocess.PIPE)
    _, stderr = await proc.communicate()
    assert proc.returncode == 1
    assert b"MANIFEST_UNKNOWN" in stderr or b"NAME_UNKNOWN" in stderr


async def test_corrupt_layout_blob_fails_without_retry_and_commits_nothing(
    tmp_path: Path, registry: LocalRegistry,
) -> None:
    root = tmp_path / "img"
    build_image(root, "v1", [2 * MiB], seed=4)
    manifest = json.loads((root / "blobs" / "sha256" /
                           json.loads((root / "index.json").read_text())["manifests"][0]["digest"][7:]).read_text())
    layer = root / "blobs" / "sha256" / manifest["layers"][0]["digest"][7:]
    data = bytearray(layer.read_bytes())
    data[len(data) // 2] ^= 0xFF
    layer.write_bytes(bytes(data))
    client = blobflow.Client(_config(tmp_path))
    with pytest.raises(blobflow.DigestMismatchError, match="local file is corrupt") as info:
        await client.push(root, f"{registry.host}/rel/bad:v1")
    assert info.value.exit_code == 1
    with pytest.raises(blobflow.NotFoundError):
        await client.inspect(f"{registry.host}/rel/bad:v1")


async def test_truncated_layout_blob_fails_at_once_naming_the_corruption(
    tmp_path: Path, registry: LocalRegistry,
) -> None:
    """A layer file shorter than its descriptor is a corrupt layout, not a transient fault: it
    used to be retried 60 times (every attempt re-sent the same bytes and counted as progress)."""
    root = tmp_path / "img"
    build_image(root, "v1", [2 * MiB], seed=5)
    manifest = json.loads((root / "blobs" / "sha256" /
                           json.loads((root / "index.json").read_text())["manifests"][0]["digest"][7:]).read_text())
    layer = root / "blobs" / "sha256" / manifest["layers"][0]["digest"][7:]
    layer.write_bytes(layer.read_bytes()[:MiB])
    events: list[blobflow.Event] = []
    client = blobflow.Client(_config(tmp_path), listener=events.append)
    with pytest.raises(blobflow.DigestMismatchError, match=r"local file is corrupt \(it ends after 1,048,576 of"):
        await client.push(root, f"{registry.host}/rel/short:v1")
    assert [e for e in events if e.kind == "retry"] == []
    with pytest.raises(blobflow.NotFoundError):
        await client.inspect(f"{registry.host}/rel/short:v1")


async def test_a_registry_that_refuses_every_upload_uses_up_the_retries(
    tmp_path: Path, registry: LocalRegistry, proxy: MakeProxy,
) -> None:
    """Every PUT of the blob answered 500: retries + 1 attempts, then the error. Bytes the
    registry then refused are no progress (counted as such, each attempt reset the retries and
    the blob was sent up to the hard cap: 30 times with --retries 2)."""
    blob = tmp_path / "blob"
    blob.write_bytes(os.urandom(MiB))
    failing = await proxy(registry, Faults(status={500: 1.0}, match=lambda r: r.method == "PUT"))
    client = blobflow.Client(_config(tmp_path, retries=2))
    with pytest.raises(blobflow.RegistryError, match="500"):
        await client.blob_put(blob, f"{failing.host}/rel/put500")
    assert failing.counters["status:500"] == 3


async def test_wrong_credentials_exit_2_naming_the_registry_without_the_secret(
    auth_registry: LocalRegistry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    canary = "canary-Pw-7f3a9"
    conf = tmp_path / "docker"
    conf.mkdir()
    token = base64.b64encode(f"alice:{canary}".encode()).decode()
    (conf / "config.json").write_text(json.dumps({"auths": {auth_registry.host: {"auth": token}}}))
    env = {**os.environ, "DOCKER_CONFIG": str(conf)}
    proc = await asyncio.create_subprocess_exec(
        *_cli("tags", "--plain-http", f"{auth_registry.host}/rel/app", "-v"),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env)
    stdout, stderr = await proc.communicate()
    assert proc.returncode == 2
    assert auth_registry.host in stderr.decode()
    assert canary not in (stdout + stderr).decode()
    assert token not in (stdout + stderr).decode()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
async def test_interrupt_exits_130_keeps_the_journal_and_the_same_command_resumes(
    image: Path, registry: LocalRegistry, proxy: MakeProxy, tmp_path: Path, sig: signal.Signals,
) -> None:
    size = _blob_sizes(image)
    await blobflow.Client(_config(tmp_path)).push(image, f"{registry.host}/rel/app:v1")
    p = await proxy(registry, Faults(bandwidth=40e6))
    out, state = tmp_path / "out", tmp_path / "state"
    cmd = _cli("pull", "--plain-http", "--state-dir", str(state), f"{p.host}/rel/app:v1", str(out))
    proc = await asyncio.create_subprocess_exec(*cmd, stdout=asyncio.subprocess.DEVNULL,
                                                stderr=asyncio.subprocess.PIPE, preexec_fn=sigint_as_at_a_terminal)
    await _bytes_when(p.counters, "bytes_to_client", int(0.5 * size), proc)
    proc.send_signal(sig)
    _, stderr = await proc.communicate()
    assert proc.returncode == 130, stderr
    assert b"interrupted" in stderr and b"Traceback" not in stderr
    assert list(state.rglob("*.json")), "the journal was not kept"
    first = p.counters["bytes_to_client"]
    again = await asyncio.create_subprocess_exec(*cmd, stdout=asyncio.subprocess.DEVNULL)
    assert await again.wait() == 0
    assert p.counters["bytes_to_client"] - first < 0.7 * size
    _verify_layout(out)

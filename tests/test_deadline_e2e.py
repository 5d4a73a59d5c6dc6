"""Upload windows against a real registry: the fault proxy emulates a shared uplink of bandwidth B
and a registry that forgets upload sessions W seconds after their POST (or cuts requests longer
than a per-request window).

Scaled down from GHCR (12 MB/s, 600 s) to about 1.5 MB/s and a few seconds. Socket buffers are
scaled down with it: on loopback the kernel would otherwise hold megabytes of every upload, a
whole layer here, where on a real uplink it holds well under a second of the window. So the proxy
gets a small receive buffer, the client small send buffers (``small_send_buffers``), and the
engine is told (``socket_buffer``) how much its sockets may hold unsent.
"""

from __future__ import annotations

import asyncio
import functools
import json
import socket
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from conftest import Cli, MakeProxy
from faultproxy import FaultProxy, Faults

import blobflow
from blobflow.layout import Layout
from blobflow.localreg import LocalRegistry
from blobflow.synth import build_image
from blobflow.types import Descriptor

KiB, MB = 1024, 1_000_000
B = 1_500_000  # bytes per second through the proxy, shared by every body


def _small_send_buffer(addr_info: Any) -> socket.socket:
    family, type_, proto, _, _ = addr_info
    sock = socket.socket(family=family, type=type_, proto=proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * KiB)
    return sock


@pytest.fixture
def small_send_buffers(monkeypatch: pytest.MonkeyPatch) -> None:
    """blobflow's connections get 64 KiB send buffers (the kernel's autotuning would allow 4 MiB)."""
    monkeypatch.setattr(aiohttp, "TCPConnector",
                        functools.partial(aiohttp.TCPConnector, socket_factory=_small_send_buffer))


def windowed_config(window: float, **overrides: Any) -> blobflow.EngineConfig:
    options: dict[str, Any] = dict(plain_http=True, upload_window=window, retries=0, read_size=64 * KiB,
                                   file_read_size=64 * KiB,
                                   socket_buffer=1024 * KiB, monolithic_threshold=256 * KiB)
    options.update(overrides)
    return blobflow.EngineConfig(**options)


def layers_of(root: Path, tag: str = "v1") -> list[Descriptor]:
    layout = Layout.open(root)
    manifest = json.loads(layout.read_blob(layout.resolve(tag), limit=MB))
    return [Descriptor.from_json(x) for x in manifest["layers"]]


def most_at_once(proxy: FaultProxy, min_bytes: int) -> int:
    """The most upload sessions of at least ``min_bytes`` that were open at the same time."""
    spans = [(s.started, s.last) for s in proxy.sessions.values() if s.bytes >= min_bytes]
    return max(sum(1 for a, b in spans if a <= start < b) for start, _ in spans)


async def head_blob(registry: LocalRegistry, repo: str, desc: Descriptor) -> int:
    async with aiohttp.ClientSession() as session:
        async with session.head(f"{registry.url}/v2/{repo}/blobs/{desc.digest}") as response:
            return response.status


# -- the fault proxy's windows and bandwidth ------------------------------------------------------

async def test_bandwidth_limits_upload_bodies_too(registry: LocalRegistry, proxy: MakeProxy, repo_name: str,
                                                  tmp_path: Path) -> None:
    fault_proxy = await proxy(registry, Faults(bandwidth=MB))
    blob = tmp_path / "blob"
    blob.write_bytes(bytes(1_500_000))
    started = time.monotonic()
    await blobflow.Client(blobflow.EngineConfig(plain_http=True)).blob_put(blob, f"{fault_proxy.host}/{repo_name}")
    assert 1.0 < time.monotonic() - started < 10.0
    assert fault_proxy.counters["bytes_to_upstream"] == 1_500_000


async def test_session_window_expires_sessions_and_cuts_bodies(registry: LocalRegistry, proxy: MakeProxy,
                                                               repo_name: str) -> None:
    fault_proxy = await proxy(registry, Faults(upload_window=0.5))

    async def slow_body() -> Any:
        for _ in range(10):
            yield bytes(1000)
            await asyncio.sleep(0.1)

    async with aiohttp.ClientSession() as session:
        locations = []
        for _ in range(2):
            async with session.post(f"{fault_proxy.url}/v2/{repo_name}/blobs/uploads/") as response:
                assert response.status == 202
                locations.append(response.headers["Location"])
        with pytest.raises(aiohttp.ClientError):  # still streaming when the window ends: cut
            async with session.patch(locations[0], data=slow_body()) as response:
                await response.read()
        await asyncio.sleep(0.1)
        async with session.patch(locations[1], data=b"late") as response:  # too late: gone
            assert response.status == 404
            error = (await response.json())["errors"][0]
            assert error["code"] == "BLOB_UPLOAD_UNKNOWN"
            assert error["message"] == "blob upload unknown to registry"
    assert fault_proxy.counters["expired_sessions"] == 2
    assert fault_proxy.counters["session_window_cuts"] == 1
    assert fault_proxy.counters["expired_requests"] == 1
    assert all(s.expired and not s.committed for s in fault_proxy.sessions.values())
    cut = next(s for s in fault_proxy.sessions.values() if s.bytes > 0)
    assert cut.last - cut.started >= 0.5, "a session cut mid-body was in use until the cut"


# -- N layers that fit alone but not all at once --------------------------------------------------

@pytest.mark.usefixtures("small_send_buffers")
async def test_layers_that_fit_alone_but_not_together_all_land_in_their_windows(
        registry: LocalRegistry, proxy: MakeProxy, repo_name: str, tmp_path: Path) -> None:
    window, n, size = 6.0, 4, 3 * MB
    assert size / B < 0.8 * window and n * size / B > window
    src = tmp_path / "src"
    build_image(src, "v1", [size] * n, seed=11)
    faults = Faults(bandwidth=B, upload_window=window, recv_buffer=64 * KiB)

    # deadline tracking: sessions open only when they fit, and every one lands in time
    tracked = await proxy(registry, faults)
    events: list[blobflow.Event] = []
    result = await blobflow.Client(windowed_config(window), listener=events.append).push(
        src, f"{tracked.host}/{repo_name}:tracked")
    assert tracked.counters["expired_sessions"] == 0
    assert tracked.counters["session_window_cuts"] == tracked.counters["expired_requests"] == 0
    layer_sessions = [s for s in tracked.sessions.values() if s.bytes >= size]
    assert len(layer_sessions) == n and all(s.committed and s.last - s.started < window for s in layer_sessions)
    assert most_at_once(tracked, size) < n
    assert result.min_slack is not None and 0 < result.min_slack < window
    assert any(e.kind == "deadline" and e.slack is not None for e in events)

    # the same push with tracking off, everything at once: sessions expire
    untracked = await proxy(registry, faults)
    with pytest.raises(blobflow.BlobflowError):
        await blobflow.Client(windowed_config(window, deadline_tracking=False)).push(
            src, f"{untracked.host}/{repo_name}/untracked:v1")  # another repository: nothing to mount
    assert untracked.counters["expired_sessions"] >= 1
    assert most_at_once(untracked, 100_000) == n


# -- one layer that cannot fit: fails early, the others land ---------------------------------------

async def test_a_layer_that_cannot_fit_fails_early_naming_the_rate_it_needs(
        registry: LocalRegistry, proxy: MakeProxy, repo_name: str, tmp_path: Path, cli: Cli) -> None:
    window = 10.0
    src = tmp_path / "src"
    build_image(src, "v1", [40 * MB, 100_000, 200_000], seed=12)
    big, *small = sorted(layers_of(src), key=lambda d: -d.size)
    assert big.size / B > 2 * window
    fault_proxy = await proxy(registry, Faults(bandwidth=B, upload_window=window, recv_buffer=64 * KiB))

    run = await cli("push", str(src), f"{fault_proxy.host}/{repo_name}:v1", "--plain-http",
                    "--upload-window", str(window), "--json")
    assert run.returncode == 1, run.stderr
    lines = [json.loads(line) for line in run.stdout.splitlines()]
    error = lines[-1]
    assert error["event"] == "error" and error["exit_code"] == 1
    for text in (error["message"], run.stderr):
        assert str(big.digest) in text and f"{big.size:,} bytes" in text
        assert "required rate" in text and "measured rate" in text and "MB/s" in text
    assert any(e["event"] == "deadline" and "window_left" in e for e in lines)

    # stopped early: well inside the window, before the registry expired anything
    assert fault_proxy.counters["expired_sessions"] == 0
    unfinished = [s for s in fault_proxy.sessions.values() if not s.committed]
    first_post = min(s.started for s in unfinished)
    gave_up = max(s.last for s in unfinished)
    assert gave_up - first_post < 0.4 * window
    # the other layers of the same push landed
    for desc in small:
        assert await head_blob(registry, repo_name, desc) == 200
    assert await head_blob(registry, repo_name, big) == 404


# -- a per-request window -------------------------------------------------------------------------

@pytest.mark.usefixtures("small_send_buffers")
async def test_per_request_window_pushes_a_large_layer_in_short_requests(
        registry: LocalRegistry, proxy: MakeProxy, repo_name: str, tmp_path: Path) -> None:
    request_window, size = 0.8, 6 * MB
    assert size > 4 * B * request_window
    src = tmp_path / "src"
    build_image(src, "v1", [size], seed=13)
    faults = Faults(bandwidth=B, request_window=request_window, recv_buffer=64 * KiB)
    config = windowed_config(request_window, window_scope="request")

    fault_proxy = await proxy(registry, faults)
    await blobflow.Client(config).push(src, f"{fault_proxy.host}/{repo_name}:chunked")
    assert fault_proxy.counters["request_window_cuts"] == 0
    assert fault_proxy.counters["requests:PATCH"] >= size / (B * request_window)
    assert await head_blob(registry, repo_name, layers_of(src)[0]) == 200

    # one streamed PATCH for the whole layer runs past the request window
    untracked = await proxy(registry, faults)
    with pytest.raises(blobflow.BlobflowError):
        await blobflow.Client(windowed_config(request_window, window_scope="request", deadline_tracking=False)).push(
            src, f"{untracked.host}/{repo_name}/streamed:v1")
    assert untracked.counters["request_window_cuts"] >= 1


async def test_per_request_chunks_grow_once_the_rate_is_measured(
        registry: LocalRegistry, proxy: MakeProxy, repo_name: str, tmp_path: Path) -> None:
    """Each request's body is sized to a quarter of its window at the measured rate, a 256 KiB
    probe before any rate is known. The size was read once, before the first chunk: every chunk
    of the blob stayed a probe (81 PATCHes for 20 MiB where 8 would do; 40,000 for 10 GB)."""
    request_window, size = 4.0, 6 * MB
    src = tmp_path / "src"
    build_image(src, "v1", [size], seed=14)
    fault_proxy = await proxy(registry, Faults(bandwidth=B, request_window=request_window, recv_buffer=64 * KiB))
    await blobflow.Client(windowed_config(request_window, window_scope="request")).push(
        src, f"{fault_proxy.host}/{repo_name}:v1")
    assert fault_proxy.counters["request_window_cuts"] == 0
    probes = size / (256 * KiB)  # 23
    assert fault_proxy.counters["requests:PATCH"] < probes / 2
    assert await head_blob(registry, repo_name, layers_of(src)[0]) == 200


# -- the size limit -------------------------------------------------------------------------------

async def test_a_layer_over_the_size_limit_is_refused_before_any_request(
        registry: LocalRegistry, proxy: MakeProxy, repo_name: str, tmp_path: Path, cli: Cli) -> None:
    src = tmp_path / "src"
    build_image(src, "v1", [2 * MB, 10_000], seed=14)
    big = max(layers_of(src), key=lambda d: d.size)
    fault_proxy = await proxy(registry)
    run = await cli("push", str(src), f"{fault_proxy.host}/{repo_name}:v1", "--plain-http",
                    "--max-layer-size", "1MB")
    assert run.returncode == 2, run.stderr
    assert str(big.digest) in run.stderr and f"{big.size:,} bytes" in run.stderr
    assert "1,000,000 bytes" in run.stderr and "nothing was sent" in run.stderr
    assert fault_proxy.counters["uploads_started"] == 0
    assert not any(method in ("POST", "PATCH", "PUT") for method, _, _ in fault_proxy.log)

"""Registry request limits end to end, against Distribution behind the fault proxy.

The proxy plays the registry's limits: GHCR's 4 MiB cap on ``Content-Range`` chunks (416 with
GHCR's message; a streamed PATCH passes), a 413 body cap, and cut bodies with the
``keep_received`` emulation of a registry that keeps what it received (Distribution itself forgets
a session whose PATCH was cut, so resuming from its offset could not be shown against it).

Sizes as in the issue (a 256 MiB layer, a 32 MiB body cap), 50 ms of latency per request.
"""

from __future__ import annotations

import io
import os
import time
from pathlib import Path

import aiohttp
import pytest
from conftest import Cli, MakeProxy
from faultproxy import FaultProxy, Faults

import blobflow
from blobflow.localreg import LocalRegistry
from blobflow.synth import build_image

MiB = 1 << 20
LAYER = 256 * MiB
CAP = 4 * MiB
LATENCY = 0.05


def _write(path: Path, size: int) -> Path:
    with open(path, "wb") as f:
        for _ in range(size // (4 * MiB)):
            f.write(os.urandom(4 * MiB))
        f.write(os.urandom(size % (4 * MiB)))
    return path


@pytest.fixture(scope="module")
def layer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _write(tmp_path_factory.mktemp("limits") / "layer", LAYER)


def _config(tmp_path: Path, **kw: object) -> blobflow.EngineConfig:
    opts: dict[str, object] = {"plain_http": True, "state_dir": str(tmp_path / "state"), "backoff_base": 0.02,
                               "backoff_cap": 0.2}
    opts.update(kw)
    return blobflow.EngineConfig(**opts)  # type: ignore[arg-type]


async def _push(config: blobflow.EngineConfig, path: Path, p: FaultProxy, repo: str,
                ) -> tuple[blobflow.Result, float, int]:
    """Push one file as a blob; (result, seconds, bytes the proxy forwarded to the registry)."""
    before = p.counters["bytes_to_upstream"]
    started = time.monotonic()
    result, desc = await blobflow.Client(config).blob_put(path, f"{p.host}/{repo}")
    seconds = time.monotonic() - started
    forwarded = p.counters["bytes_to_upstream"] - before
    assert forwarded >= desc.size
    return result, seconds, forwarded


async def test_push_under_a_4mib_chunk_cap_sends_what_it_sends_without(
    layer: Path, registry: LocalRegistry, proxy: MakeProxy, tmp_path: Path, repo_name: str,
) -> None:
    """Blobflow streams the layer in one PATCH, which GHCR's cap does not touch; a client chunking at
    4 MiB would pay 64 round trips. The requests are counted: the same with and without the cap.
    Their times are printed, not asserted (speed is the benches' job: a timed pair on two busy
    cores failed CI at 2.43 s against 1.92 s, the same requests both ways)."""
    p = await proxy(registry, Faults(latency=LATENCY))

    def requests() -> dict[str, int]:
        return {k: v for k, v in p.counters.items() if k.startswith("requests:")}

    before = requests()
    # a state dir per push: one left by an earlier push would make this one a mount of that layer
    free = (await _push(_config(tmp_path / "free"), layer, p, f"{repo_name}/free"))[0].seconds
    free_requests = {k: v - before.get(k, 0) for k, v in requests().items()}
    p.faults.chunk_cap = CAP
    before = requests()
    result = (await _push(_config(tmp_path / "capped"), layer, p, f"{repo_name}/capped"))[0]
    assert result.retries == 0 and p.counters["chunk_cap_refusals"] == 0
    assert {k: v - before.get(k, 0) for k, v in requests().items()} == free_requests
    assert free_requests["requests:PATCH"] == 1  # the whole layer in one streamed PATCH
    mib = LAYER / MiB
    print(f"\n{mib:.0f} MiB layer, {LATENCY * 1000:.0f} ms per request: without cap {free:.2f} s, "
          f"with the 4 MiB chunk cap {result.seconds:.2f} s")


async def test_proxy_limit_modes_answer_as_the_registries_do(
    registry: LocalRegistry, proxy: MakeProxy, repo_name: str,
) -> None:
    p = await proxy(registry, Faults(chunk_cap=CAP, max_body=6 * MiB))
    async with aiohttp.ClientSession() as http:
        async def start() -> str:
            async with http.post(f"{p.url}/v2/{repo_name}/blobs/uploads/") as resp:
                assert resp.status == 202
                return resp.headers["Location"]

        location = await start()
        big = b"x" * (CAP + 1)
        async with http.patch(location, data=io.BytesIO(big), headers={"Content-Range": f"0-{CAP}"}) as resp:
            assert resp.status == 416
            error = (await resp.json())["errors"][0]
            assert error["code"] == "REQUESTED_RANGE_NOT_SATISFIABLE"
            assert error["message"] == ("the request body is too large and exceeds the maximum permissible "
                                        "limit of 4.00MiB")
        async with http.patch(location, data=io.BytesIO(big)) as resp:  # streamed, no Content-Range: accepted
            assert resp.status == 202
        async with http.patch(resp.headers["Location"], data=io.BytesIO(b"x" * (6 * MiB + 1))) as resp:
            assert resp.status == 413 and "413 Request Entity Too Large" in await resp.text()
    assert p.counters["chunk_cap_refusals"] == 1 and p.counters["max_body_refusals"] == 1


async def test_cut_stream_under_the_cap_resumes_from_the_registrys_offset(
    layer: Path, registry: LocalRegistry, proxy: MakeProxy, tmp_path: Path, repo_name: str,
) -> None:
    """A layer goes as one streamed PATCH, so a 20% cut rate gives few cuts: seed 85 is a run in which
    the first three bodies are cut (at 62%, then 91% and 46% of what was left) and the fourth passes."""
    p = await proxy(registry, Faults(latency=LATENCY, chunk_cap=CAP, cut_request=0.2, keep_received=True,
                                     seed=85))
    result, seconds, forwarded = await _push(_config(tmp_path), layer, p, repo_name)
    print(f"\n{p.counters['cut_request']} cuts, {forwarded / LAYER:.3f}x the layer sent to the registry "
          f"in {seconds:.2f} s")
    assert p.counters["cut_kept"] == 3 and result.retries == 3, (p.counters, result.retries)
    assert forwarded < 1.3 * LAYER, forwarded / LAYER


async def test_forced_chunks_learn_ghcrs_cap_once_per_job(
    registry: LocalRegistry, proxy: MakeProxy, tmp_path: Path, repo_name: str,
) -> None:
    """Chunks asked for (``chunk_size``) over the cap: the first 416 teaches 4 MiB, the upload goes
    on from the registry's offset, and the next blob of the job is sent in 4 MiB chunks at once."""
    build_image(tmp_path / "image", "v1", [12 * MiB, 10 * MiB], seed=7)
    p = await proxy(registry, Faults(chunk_cap=CAP))
    client = blobflow.Client(_config(tmp_path, chunk_size=8 * MiB, concurrency=1))
    result = await client.push(tmp_path / "image", f"{p.host}/{repo_name}:v1")
    assert p.counters["chunk_cap_refusals"] == 1, p.counters
    learned = [n for n in result.notes if "learned" in n]
    assert learned == [f"{p.host}: learned a chunk (PATCH with Content-Range) limit of 4.00 MiB "
                       "(416 for 8,388,608 bytes in one chunk); later uploads of this job stay within it"], result.notes
    pulled = await client.pull(f"{p.host}/{repo_name}:v1", tmp_path / "pulled")
    assert pulled.images[0].digest == result.images[0].digest


async def test_413_over_32mib_is_learned_and_reported_in_the_summary(
    layer: Path, registry: LocalRegistry, proxy: MakeProxy, tmp_path: Path, repo_name: str, cli: Cli,
) -> None:
    p = await proxy(registry, Faults(latency=LATENCY, max_body=32 * MiB))
    run = await cli("blob", "put", str(layer), f"{p.host}/{repo_name}", "--plain-http",
                    env={"XDG_STATE_HOME": str(tmp_path / "state")})
    assert run.returncode == 0, run.stderr
    # the streamed PATCH of 256 MiB refused (this 413 states no limit: halve to 128 MiB), then a chunk of
    # 64 MiB (blobflow's default chunk, under 128) refused: 32 MiB chunks from the registry's offset on
    assert p.counters["max_body_refusals"] == 2, p.counters
    # the summary reports the limit learned last (each step down is an info event as it happens)
    # (blob put's summary goes to stderr: stdout carries the digest alone)
    notes = [line for line in run.stderr.splitlines() if line.startswith("note: ")]
    assert notes == [f"note: {p.host}: learned a request body limit of 32.00 MiB (413 for 67,108,864 bytes in "
                     "one chunk); later uploads of this job stay within it"], run.stderr
    print(f"\n{run.stderr.strip()}")
    head = await blobflow.Client(_config(tmp_path)).blob_put(layer, f"{p.host}/{repo_name}")
    assert head[0].skipped == 1 and run.stdout == f"{head[1].digest}\n"

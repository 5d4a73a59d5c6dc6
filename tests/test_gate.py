"""Per-host politeness: the rate cap and the host-wide pause after 429/503 (injected clock)."""

from __future__ import annotations

import itertools

import pytest
from conftest import MakeProxy
from faultproxy import Faults

import blobflow
from blobflow.localreg import LocalRegistry
from blobflow.registry.gate import HostGate
from blobflow.synth import build_image


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.now += seconds


async def test_rate_cap_spaces_requests_evenly() -> None:
    clock = Clock()
    gate = HostGate(4.0, clock=clock, sleep=clock.sleep)
    starts = []
    for _ in range(5):
        await gate.enter()
        starts.append(clock.now)
    assert [round(b - a, 6) for a, b in itertools.pairwise(starts)] == [0.25] * 4


async def test_a_throttle_pauses_the_whole_host_and_doubles_until_an_answer_is_ok() -> None:
    clock = Clock()
    gate = HostGate(clock=clock, sleep=clock.sleep)
    assert gate.throttled(None) == 0.5
    assert gate.throttled(None) == 1.0
    await gate.enter()
    assert clock.now == pytest.approx(101.0)  # every request waits for the host's pause
    gate.ok()
    assert gate.throttled(None) == 0.5
    assert gate.throttled(3.0) == 3.0  # Retry-After wins
    assert gate.throttles == 4


async def test_without_a_cap_or_a_throttle_nothing_waits() -> None:
    clock = Clock()
    gate = HostGate(None, clock=clock, sleep=clock.sleep)
    for _ in range(100):
        await gate.enter()
    assert clock.now == 100.0


async def test_429s_slow_the_host_and_the_pull_still_completes(
    registry: LocalRegistry, proxy: MakeProxy, tmp_path: pytest.TempPathFactory,
) -> None:
    root = tmp_path / "img"  # type: ignore[operator]
    build_image(root, "v1", [64 * 1024, 32 * 1024, 16 * 1024], seed=3)
    cfg = blobflow.EngineConfig(plain_http=True, state_dir=str(tmp_path / "state"))  # type: ignore[operator]
    await blobflow.Client(cfg).push(root, f"{registry.host}/gate/app:v1")
    p = await proxy(registry, Faults(status={429: 0.3}, retry_after="1", seed=9))
    result = await blobflow.Client(cfg).pull(f"{p.host}/gate/app:v1", tmp_path / "out")  # type: ignore[operator]
    assert p.counters["status:429"] > 0
    assert result.retries > 0
    # after a 429 with Retry-After: 1, no new request reached the host for that second (requests
    # already on their way may land within a few milliseconds)
    for t, status in p.arrivals:
        if status == 429:
            assert not [a for a, _ in p.arrivals if t + 0.1 < a < t + 0.9], "a request did not wait out the pause"

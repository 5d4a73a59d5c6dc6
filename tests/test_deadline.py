"""Deadline tracking without a network: the estimator, the policy functions and the tracker, on an
injected clock (no sleeps). The same model against a real registry behind the fault proxy is in
test_deadline_e2e.py.
"""

from __future__ import annotations

import asyncio
import io
import json
import math
from pathlib import Path

import pytest

from blobflow import DeadlineError, EngineConfig, Event, Stats, TransferError
from blobflow._render import format_seconds, summary_line
from blobflow.api import Result
from blobflow.config import KNOWN_LIMITS, RegistryLimits, load_registry_limits
from blobflow.deadline import (
    PROBE_CHUNK,
    Admission,
    DeadlineTracker,
    Running,
    ThroughputEstimator,
    admission,
    doomed,
    may_send,
    project,
    request_chunk,
    required_rate,
)
from blobflow.errors import BadInputError
from blobflow.types import Digest

MB = 1_000_000
REG = "registry.test"


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def digest(n: int) -> Digest:
    return Digest("sha256", f"{n:064x}")


# -- the estimator -----------------------------------------------------------------------------

def feed(est: ThroughputEstimator, clock: FakeClock, *, rate: float, seconds: float, piece: int = 65536) -> None:
    """Hand over ``piece``-byte pieces at ``rate`` for ``seconds``."""
    for _ in range(round(seconds * rate / piece)):
        est.add(piece)
        clock.advance(piece / rate)


def test_estimator_gives_no_rate_before_min_time_then_the_link_rate() -> None:
    clock = FakeClock()
    est = ThroughputEstimator(clock=clock, tau=1.0, interval=0.1, min_time=0.5)
    feed(est, clock, rate=2 * MB, seconds=0.3)
    assert est.rate is None
    feed(est, clock, rate=2 * MB, seconds=1.0)
    assert est.rate == pytest.approx(2 * MB, rel=0.05)


def test_estimator_ignores_idle_time_between_uploads() -> None:
    clock = FakeClock()
    est = ThroughputEstimator(clock=clock, tau=1.0, interval=0.1)
    feed(est, clock, rate=3 * MB, seconds=2.0)
    est.pause()
    clock.advance(60.0)  # nothing to send for a minute: not a slow link
    feed(est, clock, rate=3 * MB, seconds=1.0)
    assert est.rate == pytest.approx(3 * MB, rel=0.05)


def test_estimator_follows_a_slower_link_within_a_few_time_constants() -> None:
    clock = FakeClock()
    est = ThroughputEstimator(clock=clock, tau=1.0, interval=0.1)
    feed(est, clock, rate=4 * MB, seconds=5.0)
    feed(est, clock, rate=1 * MB, seconds=0.5)
    halfway = est.rate
    assert halfway is not None and 1 * MB < halfway < 4 * MB
    feed(est, clock, rate=1 * MB, seconds=4.0)
    assert est.rate == pytest.approx(1 * MB, rel=0.1)


def test_estimator_weighs_samples_by_duration_not_by_count() -> None:
    # pieces arriving unevenly (a 1 MiB read, then many small ones) give the same rate
    clock = FakeClock()
    est = ThroughputEstimator(clock=clock, tau=2.0, interval=0.05)
    for _ in range(20):
        est.add(1_000_000)
        clock.advance(0.5)
        for _ in range(10):
            est.add(100_000)
            clock.advance(0.05)
    assert est.rate == pytest.approx(2 * MB, rel=0.05)


def test_estimator_rejects_nonsense() -> None:
    with pytest.raises(ValueError):
        ThroughputEstimator(tau=0)


# -- projections and the admission rule --------------------------------------------------------

def test_projection_serves_closest_deadline_first() -> None:
    now = 0.0
    uploads = [Running(1, 4 * MB, deadline=20.0), Running(2, 2 * MB, deadline=10.0)]
    p = {x.key: x for x in project(uploads, 1 * MB, now)}
    assert p[2].finish == pytest.approx(2.0) and p[2].slack == pytest.approx(8.0)
    assert p[1].finish == pytest.approx(6.0) and p[1].slack == pytest.approx(14.0)


def test_admission_alone_whatever_the_size_until_a_rate_proves_it_hopeless() -> None:
    assert admission([], 50 * MB, window=10.0, rate=None, now=0.0) is Admission.ADMIT
    assert admission([], 50 * MB, window=10.0, rate=6 * MB, now=0.0) is Admission.ADMIT
    assert admission([], 61 * MB, window=10.0, rate=6 * MB, now=0.0) is Admission.REFUSE


def test_admission_one_at_a_time_before_any_rate_is_measured() -> None:
    running = [Running(1, 1, deadline=100.0)]
    assert admission(running, 1, window=100.0, rate=None, now=0.0) is Admission.WAIT


@pytest.mark.parametrize(("left_of_first", "expected"), [
    (3 * MB, Admission.ADMIT),  # 3 + 5 MB at 1 MB/s: the new one finishes at 8 s, 2 s = 20 % to spare
    (int(3.1 * MB), Admission.WAIT),  # 0.1 s short of the margin
])
def test_admission_keeps_every_running_upload_and_the_new_one_inside_the_margin(
        left_of_first: int, expected: Admission) -> None:
    running = [Running(1, left_of_first, deadline=9.0)]
    assert admission(running, 5 * MB, window=10.0, rate=1 * MB, now=0.0) is expected


def test_admission_waits_when_the_new_upload_would_push_a_running_one_past_its_margin() -> None:
    # the running upload has the later deadline: the new one would go first and delay it
    running = [Running(1, int(9.5 * MB), deadline=12.0)]  # alone: done at 9.5 s, 2.5 s to spare
    assert admission(running, 1 * MB, window=10.0, rate=1 * MB, now=0.0) is Admission.WAIT
    assert admission(running, 1 * MB, window=10.0, rate=2 * MB, now=0.0) is Admission.ADMIT


def test_admission_sequence_grows_concurrency_again_when_there_is_room() -> None:
    """Five 2 MB uploads, 1 MB/s, 10 s windows: the admitted set stays feasible at every step."""
    clock, rate, window = FakeClock(0.0), 1 * MB, 10.0
    queue = [2 * MB] * 5
    running: dict[int, list[float]] = {}  # key -> [remaining, deadline]
    finished, most = 0, 0
    while queue or running:
        snapshot = [Running(k, int(r), d) for k, (r, d) in running.items()]
        if queue and admission(snapshot, queue[0], window=window, rate=rate, now=clock()) is Admission.ADMIT:
            running[len(running) + finished + 100] = [queue.pop(0), clock() + window]
            most = max(most, len(running))
            continue
        # closest deadline first, 0.1 s at a time
        key = min(running, key=lambda k: running[k][1])
        running[key][0] -= rate * 0.1
        clock.advance(0.1)
        if running[key][0] <= 0:
            assert clock() <= running[key][1] - 0.2 * window + 1e-6
            del running[key]
            finished += 1
    assert finished == 5
    assert 1 < most < 5  # more than one at a time, never all at once


# -- bandwidth to the closest deadline ---------------------------------------------------------

def test_the_closest_deadline_always_sends() -> None:
    uploads = [Running(1, 5 * MB, 6.0), Running(2, 1 * MB, 9.0)]
    assert may_send(uploads, 1, senders=[1, 2], rate=1 * MB, now=0.0, reserve=2.0)


def test_others_share_while_the_closest_keeps_its_margin() -> None:
    uploads = [Running(1, 1 * MB, 10.0), Running(2, 1 * MB, 12.0)]
    # upload 1 alone or shared by two: 1 MB at 0.5 MB/s = 2 s, 8 s to spare
    assert may_send(uploads, 2, senders=[1], rate=1 * MB, now=0.0, reserve=2.0)


def test_others_wait_when_sharing_would_endanger_the_closest() -> None:
    uploads = [Running(1, 3 * MB, 7.0), Running(2, 1 * MB, 12.0)]
    # shared, upload 1 gets 0.5 MB/s: 6 s of its 7, less than the 2 s margin left
    assert not may_send(uploads, 2, senders=[1], rate=1 * MB, now=0.0, reserve=2.0)
    # ... but on its own it has 4 s to spare, and the waiting one does not count as a sender
    assert may_send(uploads, 1, senders=[1], rate=1 * MB, now=0.0, reserve=2.0)


def test_everybody_sends_before_any_rate_is_measured() -> None:
    uploads = [Running(1, 3 * MB, 7.0), Running(2, 1 * MB, 12.0)]
    assert may_send(uploads, 2, senders=[1], rate=None, now=0.0, reserve=2.0)


# -- early failure and per-request chunks ------------------------------------------------------

def test_doomed_when_remaining_bytes_need_more_than_the_whole_link() -> None:
    assert doomed(10 * MB, 15.0, rate=1 * MB, now=6.0)  # 10 s of bytes, 9 s left
    assert not doomed(9 * MB, 15.0, rate=1 * MB, now=6.0)
    assert not doomed(10 * MB, 15.0, rate=None, now=6.0)  # nothing measured: nothing to say
    assert required_rate(10 * MB, 4.0) == 2.5 * MB
    assert math.isinf(required_rate(1, 0.0))


def test_request_chunks_take_a_quarter_of_a_per_request_window() -> None:
    assert request_chunk(None, 30.0) == PROBE_CHUNK
    assert request_chunk(2 * MB, 30.0) == 15 * MB
    assert request_chunk(2 * MB, 30.0, cap=4 * 1024 * 1024) == 4 * 1024 * 1024
    assert request_chunk(1000.0, 1.0) == 64 * 1024  # never absurdly small


# -- the tracker -------------------------------------------------------------------------------

def tracker(clock: FakeClock, events: list[Event], **config: object) -> DeadlineTracker:
    options: dict[str, object] = {"upload_window": 10.0, "monolithic_threshold": 1024, "read_size": 65536,
                                  "file_read_size": 65536, "socket_buffer": 0}
    options.update(config)
    return DeadlineTracker(EngineConfig(**options), emit=events.append, clock=clock)  # type: ignore[arg-type]


async def upload(ticket_pace: object, clock: FakeClock, *, size: int, rate: float, piece: int = 65536) -> None:
    while size > 0:
        n = min(piece, size)
        await ticket_pace(n)  # type: ignore[operator]
        clock.advance(n / rate)
        size -= n


async def test_registries_without_a_window_get_a_bare_ticket() -> None:
    clock, events = FakeClock(), []
    t = await tracker(clock, events, upload_window=None).admit("docker.io", digest(1), 50 * MB)
    assert t.dest is None and t.window is None and t.chunk_limit is None
    t.session_started()
    await t.pace(10 * MB)
    assert t.sent == 10 * MB and events == []


async def test_tracking_disabled_gives_bare_tickets_even_with_a_window() -> None:
    clock, events = FakeClock(), []
    tr = tracker(clock, events, deadline_tracking=False)
    tickets = [await tr.admit(REG, digest(i), 50 * MB) for i in range(3)]  # all at once, no waiting
    assert all(t.dest is None and t.window == 10.0 for t in tickets)


async def test_ghcr_limits_come_from_the_table() -> None:
    clock, events = FakeClock(), []
    t = await tracker(clock, events, upload_window=None).admit("ghcr.io", digest(1), 50 * MB)
    assert t.window == 600.0 and t.dest is not None
    assert KNOWN_LIMITS["ghcr.io"].source


async def test_an_upload_that_cannot_fit_fails_early_and_says_the_rate_it_needs() -> None:
    clock, events = FakeClock(), []
    tr = tracker(clock, events)
    t = await tr.admit(REG, digest(1), 30 * MB)  # 30 MB in 10 s needs 3 MB/s
    t.session_started()
    with pytest.raises(DeadlineError) as caught:
        await upload(t.pace, clock, size=30 * MB, rate=1 * MB)
    err = caught.value
    assert isinstance(err, TransferError) and not err.retryable and err.exit_code == 1
    assert clock.now - 1000.0 < 0.4 * 10.0  # stopped in the first 40 % of the window
    assert err.rate == pytest.approx(1 * MB, rel=0.1) and err.required > 2 * MB
    text = str(err)
    assert str(digest(1)) in text and "30,000,000 bytes" in text and "required rate" in text
    assert "MB/s" in text and "measured rate is 1.0" in text
    # the decision sticks: the next attempt sees it before it sends or opens anything
    with pytest.raises(DeadlineError):
        _ = t.chunk_limit
    with pytest.raises(DeadlineError):
        t.session_started()
    assert any(e.kind == "info" and "required rate" in e.detail for e in events)
    tr.release(t)  # idempotent after the failure released it


async def test_a_new_upload_that_cannot_fit_in_a_whole_window_is_refused_before_its_session() -> None:
    clock, events = FakeClock(), []
    tr = tracker(clock, events)
    first = await tr.admit(REG, digest(1), 8 * MB)
    first.session_started()
    await upload(first.pace, clock, size=2 * MB, rate=1 * MB)  # the link proves to be 1 MB/s
    with pytest.raises(DeadlineError, match=r"needs at least 1\.50 MB/s \(required rate\).*not started"):
        await tr.admit(REG, digest(2), 15 * MB)


async def test_a_second_upload_waits_for_a_rate_then_for_room() -> None:
    clock, events = FakeClock(), []
    tr = tracker(clock, events)
    first = await tr.admit(REG, digest(1), 6 * MB)
    first.session_started()
    second = asyncio.ensure_future(tr.admit(REG, digest(2), 4 * MB))
    await asyncio.sleep(0)
    assert not second.done()  # no rate yet: one at a time
    await upload(first.pace, clock, size=5 * MB, rate=1 * MB)
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    # 1 MB left + 4 MB at 1 MB/s finish at 5 s of its 10 s window: room
    t2 = await asyncio.wait_for(second, 5.0)
    assert t2.dest is not None
    assert any(e.kind == "deadline" and e.detail.startswith("waiting") for e in events)
    tr.release(first)
    tr.release(t2)


async def test_deadline_events_carry_window_left_projected_finish_and_slack() -> None:
    clock, events = FakeClock(), []
    tr = tracker(clock, events)
    t = await tr.admit(REG, digest(1), 6 * MB)
    t.session_started()
    await upload(t.pace, clock, size=6 * MB, rate=1 * MB)
    tr.release(t)
    progress = [e for e in events if e.kind == "deadline" and e.slack is not None]
    assert progress
    last = progress[-1]
    assert last.window_left is not None and last.projected_finish is not None
    assert last.slack == pytest.approx(last.window_left - last.projected_finish, abs=0.01)
    done = [e for e in events if e.kind == "deadline_met"]
    assert len(done) == 1 and done[0].slack == pytest.approx(4.0, abs=0.1)
    stats = Stats()
    for e in events:
        stats.observe(e)
    assert stats.min_slack == done[0].slack and stats.notes == []
    # --json keeps the deadline fields even when one is exactly zero
    assert json.loads(json.dumps(done[0].to_json()))["projected_finish"] == 0.0
    assert "slack" not in Event("bytes", n=5).to_json()


async def test_per_request_windows_size_chunks_from_the_measured_rate() -> None:
    clock, events = FakeClock(), []
    tr = tracker(clock, events, upload_window=2.0, window_scope="request")
    t = await tr.admit(REG, digest(1), 40 * MB)
    t.session_started()
    assert t.chunk_limit == PROBE_CHUNK  # nothing measured yet
    await upload(t.pace, clock, size=4 * MB, rate=4 * MB)  # no admission, pacing or early failure
    assert t.chunk_limit == pytest.approx(2 * MB, rel=0.1)  # a quarter of 2 s at 4 MB/s
    other = await tr.admit(REG, digest(2), 40 * MB)  # never waits
    assert other.dest is not None


async def test_small_blobs_sent_in_one_put_are_neither_scheduled_nor_measured() -> None:
    clock, events = FakeClock(), []
    tr = tracker(clock, events)
    big = await tr.admit(REG, digest(1), 6 * MB)
    big.session_started()
    small = await tr.admit(REG, digest(2), 1000)  # admitted next to it, no rate known yet
    small.session_started()
    await small.pace(1000)
    assert tr.destination(REG) is not None and tr.destination(REG).estimator.rate is None  # type: ignore[union-attr]


# -- configuration, summary --------------------------------------------------------------------

def test_registry_limits_file_overrides_the_table_and_flags_override_the_file(tmp_path: Path) -> None:
    path = tmp_path / "limits.toml"
    path.write_text('[registries."ghcr.io"]\nupload_window = 300\n\n'
                    '[registries."registry.example.com"]\nmax_layer_size = "2GB"\nwindow_scope = "request"\n'
                    'upload_window = 30\n')
    table = load_registry_limits(path)
    assert table["ghcr.io"].upload_window == 300.0 and table["ghcr.io"].max_layer_size == 10 * 1000**3
    assert table["registry.example.com"] == RegistryLimits(max_layer_size=2 * 1000**3, upload_window=30.0,
                                                           window_scope="request", source=str(path))
    config = EngineConfig(extra_limits=table, upload_window=120.0)
    assert config.limits("ghcr.io").upload_window == 120.0
    assert config.limits("registry.example.com").window_scope == "request"
    assert EngineConfig(window_scope="request").limits("ghcr.io").window_scope == "request"


@pytest.mark.parametrize("text", [
    '[registries."x.io"]\nupload_window = -1\n',
    '[registries."x.io"]\nupload_window = nan\n',  # nan <= 0 is false: a sign check let it through
    '[registries."x.io"]\nupload_window = inf\n',
    '[registries."x.io"]\nwindow_scope = "forever"\n',
    '[registries."x.io"]\nmax_layer_size = "lots"\n',
    '[registries."x.io"]\nspeed = 3\n',
    'upload_window = 3\n',
    'not toml [',
])
def test_bad_registry_limits_files_are_bad_input(tmp_path: Path, text: str) -> None:
    path = tmp_path / "limits.toml"
    path.write_text(text)
    with pytest.raises(BadInputError) as caught:
        load_registry_limits(path)
    if "x.io" in text:  # says which file and which registry ("invalid size 'lots'" said neither)
        assert f"registry limits {path}: " in str(caught.value) and "x.io" in str(caught.value), caught.value


@pytest.mark.parametrize("window", [0.0, -5.0, float("nan"), float("inf")])
def test_an_upload_window_that_is_no_duration_is_bad_input(window: float) -> None:
    with pytest.raises(BadInputError, match="upload-window must be a positive number of seconds"):
        EngineConfig(upload_window=window)


def test_summary_reports_the_smallest_slack() -> None:
    result = Result("push", [], 3, 9 * MB, 4.0, 0, 0, 0, 1, min_slack=125.4)
    assert "smallest slack 2:05 of an upload window" in summary_line(result)
    assert "slack" not in summary_line(Result("push", [], 3, 9 * MB, 4.0, 0, 0, 0, 1))
    assert result.to_json()["min_slack"] == 125.4
    assert format_seconds(42.4) == "42 s" and format_seconds(-3725) == "-1:02:05"
    assert format_seconds(4.24) == "4.2 s" and format_seconds(-0.04) == "0.0 s" and format_seconds(-0.3) == "-0.3 s"
    late = summary_line(Result("push", [], 3, 9 * MB, 4.0, 0, 0, 0, 1, min_slack=-0.3))
    assert "an upload finished 0.3 s after its window ended" in late and "slack" not in late


def test_rich_progress_shows_the_time_left_in_an_upload_window() -> None:
    from blobflow._render_rich import RichRenderer, WindowColumn

    renderer = RichRenderer(verbose=False, quiet=False)
    with renderer:
        renderer(Event("blob_start", "sha256:abc", size=6 * MB, target="ghcr.io/org/app"))
        renderer(Event("bytes", "sha256:abc", n=1 * MB))
        renderer(Event("deadline", "sha256:abc", size=6 * MB, window_left=300.0, projected_finish=60.0,
                       slack=240.0))
        renderer(Event("deadline", "sha256:abc", size=6 * MB, detail="waiting: ...", window_left=290.0))
        task = next(t for t in renderer.progress.tasks if t.description == "abc")
        text = WindowColumn().render(task).plain
        assert text.startswith("window 4:") and text.endswith("left, slack 4:00")
        overall = next(t for t in renderer.progress.tasks if t.description == "total")
        assert WindowColumn().render(overall).plain == ""
        renderer(Event("blob_done", "sha256:abc", size=6 * MB))


def test_rich_summary_is_printed_after_the_bars_are_gone() -> None:
    """The live display is stopped (its transient bars erased) before the summary line is written."""
    from blobflow._render_rich import RichRenderer

    renderer = RichRenderer(verbose=False, quiet=False)
    live_when_printed: list[bool] = []

    class Out(io.StringIO):
        def write(self, text: str) -> int:
            live_when_printed.append(renderer.progress.live.is_started)
            return super().write(text)

    renderer.out = out = Out()
    with renderer:
        renderer(Event("blob_start", "sha256:abc", size=6 * MB, target="ghcr.io/org/app"))
        renderer.result(Result("push", [], 1, 6 * MB, 1.0, 0, 0, 0, 1))
    assert out.getvalue().startswith("pushed 1 blob, 6.0 MB")
    assert live_when_printed and not any(live_when_printed)


def test_cli_flags_reach_the_engine_config(tmp_path: Path) -> None:
    from blobflow.cli import _config, build_parser

    limits = tmp_path / "limits.toml"
    limits.write_text('[registries."registry.example.com"]\nupload_window = 30\n')
    args = build_parser().parse_args(["push", "dir", "registry.example.com/app:1", "--upload-window", "90",
                                      "--window-scope", "request", "--registry-limits", str(limits),
                                      "--no-deadline-tracking"])
    config = _config(args)
    assert not config.deadline_tracking
    assert config.limits("registry.example.com") == RegistryLimits(upload_window=90.0, window_scope="request",
                                                                   source=str(limits))
    defaults = _config(build_parser().parse_args(["push", "dir", "ghcr.io/org/app:1"]))
    assert defaults.deadline_tracking and defaults.limits("ghcr.io") == KNOWN_LIMITS["ghcr.io"]

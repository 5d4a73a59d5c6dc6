"""Deadline tracking against registry upload windows.

The engine talks to this module through two calls only, so the policy lives here and the
transfer code stays unaware of it:

- ``ticket = await tracker.admit(registry, digest, size)`` before an upload session is created
  (waits while admitting it would make a running upload miss its window), and
  ``tracker.release(ticket)`` when the blob is done or failed;
- ``ticket.session_started()`` right after the POST that opens a session (the window starts),
  ``await ticket.pace(n)`` before sending ``n`` more bytes (may wait to give bandwidth to the
  upload closest to its deadline, or raise :class:`DeadlineError` when the upload cannot finish
  in time), and ``ticket.chunk_limit`` for registries whose window applies per request.

The model, for one destination registry with an upload window of ``W`` seconds:

- **rate** ``r``: bytes per second the destination takes, one smoothed estimate per registry
  (:class:`ThroughputEstimator`), measured on the bytes all its uploads hand to the network while
  any of them is sending;
- **deadline**: session start + ``W``; **remaining** ``R``: bytes not sent yet, counting as not
  sent the last ones handed over that may still wait in socket buffers (up to
  ``EngineConfig.socket_buffer`` + one read), until the blob's request is done;
- **projection** (:func:`project`): uploads are served closest deadline first, so the k-th one
  finishes at ``now + (R_1 + ... + R_k) / r``; its **slack** is its deadline minus that. Serving
  in deadline order maximizes the smallest slack (Jackson's rule), which is why the upload with
  the least slack is never made to wait for one whose deadline is later;
- **admission** (:func:`admission`): a new upload (deadline ``now + W``) starts only while every
  projected slack, its own included, stays at least ``SAFETY_MARGIN * W``. Before any rate is
  measured, one upload at a time per windowed destination;
- **bandwidth** (:func:`may_send`): the upload closest to its deadline always sends; another one
  sends too only while every upload ahead of it would keep that margin with the link shared
  equally among the senders, else it waits in ``pace`` between chunks;
- **early failure** (:func:`doomed`): when ``R / r`` exceeds the time left, the upload cannot
  finish even with the whole link: it stops with :class:`DeadlineError` naming the rate it would
  need (and a new upload that could not fit in ``W`` at ``r`` is refused before its session);
- **per-request windows** (``window_scope="request"``): no admission or early failure, but
  ``chunk_limit`` keeps each request to ``REQUEST_SHARE`` of the window at the measured rate.

Blobs small enough to go in one PUT (``monolithic_threshold``) are neither scheduled nor measured:
their bytes are read before their request starts. Destinations without a window, or a config
with ``deadline_tracking=False``, get a bare ticket: no bookkeeping, no waiting.

The policy is pure functions of snapshots (:class:`Running`) and an injected clock, so it is
tested without sleeping; :class:`DeadlineTracker` only holds state and waits.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from enum import Enum

from .config import EngineConfig, RegistryLimits
from .errors import DeadlineError
from .progress import Event, Listener
from .types import Digest

__all__ = [
    "PROBE_CHUNK",
    "REQUEST_SHARE",
    "SAFETY_MARGIN",
    "Admission",
    "DeadlineTracker",
    "Projection",
    "Running",
    "ThroughputEstimator",
    "UploadTicket",
    "admission",
    "doomed",
    "estimator_timing",
    "may_send",
    "project",
    "request_chunk",
    "required_rate",
]

SAFETY_MARGIN = 0.2  # share of the window every admitted upload keeps as slack
REQUEST_SHARE = 0.25  # per-request windows: each request is planned to take a quarter of the window
PROBE_CHUNK = 256 * 1024  # per-request windows, before any rate is measured
MIN_CHUNK = 64 * 1024

Clock = Callable[[], float]


# -- the policy: pure functions ------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Running:
    """One upload as the policy sees it: bytes still to send and its absolute deadline."""

    key: int
    remaining: int
    deadline: float


@dataclass(frozen=True, slots=True)
class Projection:
    key: int
    finish: float  # absolute time (same clock as the deadlines)
    slack: float  # deadline - finish, seconds; negative: projected to miss


def project(uploads: Sequence[Running], rate: float, now: float) -> list[Projection]:
    """Finish times and slacks when the link serves ``uploads`` closest deadline first at ``rate``."""
    out, queued = [], 0
    for u in sorted(uploads, key=lambda u: (u.deadline, u.key)):
        queued += max(0, u.remaining)
        finish = now + queued / rate
        out.append(Projection(u.key, finish, u.deadline - finish))
    return out


class Admission(Enum):
    ADMIT = "admit"
    WAIT = "wait"  # later, when running uploads have made room
    REFUSE = "refuse"  # cannot fit in a whole window even alone


def admission(running: Sequence[Running], size: int, *, window: float, rate: float | None, now: float,
              margin: float = SAFETY_MARGIN) -> Admission:
    """Whether an upload of ``size`` bytes may open its session now, next to ``running`` ones.

    Refused when even the whole link could not send it inside a window; admitted alone whatever
    its size otherwise; next to others only once a rate is known and every projected slack, the
    new upload's included (its deadline is ``now + window``), stays at least ``margin * window``.
    """
    if rate is not None and size / rate > window:
        return Admission.REFUSE
    if not running:
        return Admission.ADMIT
    if rate is None:
        return Admission.WAIT
    new = Running(key=max(u.key for u in running) + 1, remaining=size, deadline=now + window)
    reserve = margin * window
    ok = all(p.slack >= reserve for p in project([*running, new], rate, now))
    return Admission.ADMIT if ok else Admission.WAIT


def may_send(uploads: Sequence[Running], key: int, *, senders: Collection[int], rate: float | None, now: float,
             reserve: float) -> bool:
    """Whether upload ``key`` may send its next chunk now.

    ``uploads`` are the ones with bytes left and an open session, ``senders`` those among them
    sending right now. The upload closest to its deadline always may; another one may while every
    upload ahead of it (earlier deadline) would still finish ``reserve`` seconds before its
    deadline with the link shared equally among the senders and this one. So bandwidth is shared
    while there is room, and goes to the most urgent upload as soon as sharing would endanger it.
    """
    if rate is None:
        return True
    ahead = []
    for u in sorted(uploads, key=lambda u: (u.deadline, u.key)):
        if u.key == key:
            break
        ahead.append(u)
    else:
        return True
    share = rate / len({*senders, key})
    return all(u.deadline - now - u.remaining / share >= reserve for u in ahead)


def required_rate(remaining: int, time_left: float) -> float:
    """Bytes per second needed to send ``remaining`` bytes in ``time_left`` seconds."""
    return math.inf if time_left <= 0 else remaining / time_left


def doomed(remaining: int, deadline: float, *, rate: float | None, now: float) -> bool:
    """True when ``remaining`` bytes cannot be sent before ``deadline`` even with the whole link."""
    return rate is not None and remaining > 0 and remaining / rate > deadline - now


def request_chunk(rate: float | None, window: float, *, cap: int | None = None, share: float = REQUEST_SHARE,
                  probe: int = PROBE_CHUNK, floor: int = MIN_CHUNK) -> int:
    """Request body size so that one request takes ``share`` of a per-request ``window`` at ``rate``.

    ``probe`` bytes while no rate is known; never below ``floor`` nor above ``cap``.
    """
    size = probe if rate is None else max(floor, int(rate * window * share))
    return max(1, min(size, cap) if cap else size)


def estimator_timing(window: float) -> dict[str, float]:
    """How fast the estimate of a destination with a ``window`` follows the link.

    The time constant is a tenth of the window (0.25 s to 10 s), samples span at least a fortieth
    of it (50 ms to 1 s), and no rate is given before a twentieth of it (0.1 s to 5 s) was seen:
    early enough to stop a hopeless upload in the first quarter of its window.
    """
    return {"tau": min(10.0, max(0.25, window / 10)), "interval": min(1.0, max(0.05, window / 40)),
            "min_time": min(5.0, max(0.1, window / 20))}


class ThroughputEstimator:
    """Bytes per second to one destination, smoothed; time counts only while bytes flow.

    ``add(n)`` as each piece is handed to the network. Every ``interval`` seconds or more, the
    bytes and the seconds since the previous sample are added to two exponentially decaying sums
    (time constant ``tau``), and the estimate is their ratio: recent bytes over recent time, each
    stretch weighted by its length, without the bias toward the first sample of a plain moving
    average. ``rate`` is None until ``min_time`` seconds of flow were seen (default ``tau``), so
    one noisy start never decides anything. ``pause()`` when nothing is sending: idle time is not
    a slow link.
    """

    def __init__(self, *, clock: Clock = time.monotonic, tau: float = 5.0, interval: float = 0.5,
                 min_time: float | None = None) -> None:
        if tau <= 0 or interval <= 0 or (min_time is not None and min_time < 0):
            raise ValueError("tau and interval must be positive, min_time not negative")
        self.clock, self.tau, self.interval = clock, tau, interval
        self.min_time = tau if min_time is None else min_time
        self.flowing = False
        self._mark = 0.0
        self._bytes = 0
        self._seen = 0.0  # seconds of flow sampled
        self._num = 0.0  # decaying sum of bytes
        self._den = 0.0  # decaying sum of seconds

    @property
    def rate(self) -> float | None:
        if self._seen < self.min_time or self._den <= 0:
            return None
        return self._num / self._den

    def resume(self) -> None:
        if not self.flowing:
            self.flowing, self._mark, self._bytes = True, self.clock(), 0

    def pause(self) -> None:
        """Nothing is sending: the bytes handed over last may still be on their way; drop them."""
        self.flowing = False
        self._bytes = 0

    def add(self, n: int) -> None:
        now = self.clock()
        if not self.flowing:
            self.resume()
        dt = now - self._mark
        if dt >= self.interval:
            decay = math.exp(-dt / self.tau)
            self._num = self._num * decay + self._bytes
            self._den = self._den * decay + dt
            self._seen += dt
            # the piece handed over now travels in the next interval
            self._mark, self._bytes = now, 0
        self._bytes += n


# -- state: tickets and destinations -------------------------------------------------------------

_ids = itertools.count()


@dataclass(eq=False)
class UploadTicket:
    """One blob's upload as the tracker follows it; ``dest`` is None when nothing is tracked."""

    registry: str
    digest: Digest
    size: int
    window: float | None
    clock: Clock = field(default=time.monotonic, repr=False)
    started: float | None = None
    sent: int = 0
    dest: _Destination | None = field(default=None, repr=False)
    light: bool = False  # one PUT: neither scheduled nor measured
    key: int = field(default_factory=lambda: next(_ids))
    admitted: float = 0.0
    failure: DeadlineError | None = None
    waiting: bool = False
    last_active: float = 0.0
    last_piece: int = 0
    last_report: float = -math.inf

    def session_started(self) -> None:
        if self.failure is not None:  # see chunk_limit
            raise self.failure
        self.started = self.clock()
        self.sent = 0
        if self.dest is not None:
            self.dest.session_started(self)

    def session_resumed(self, age: float, sent: int) -> None:
        """A session from an earlier run, opened ``age`` seconds ago and holding ``sent`` bytes: its
        window is that much spent (a registry counts from the POST, not from our restart)."""
        if self.failure is not None:
            raise self.failure
        self.started = self.clock() - max(0.0, age)
        self.sent = sent
        if self.dest is not None:
            self.dest.session_started(self)

    async def pace(self, n: int) -> None:
        if self.dest is None:
            self.sent += n
            return
        await self.dest.pace(self, n)

    @property
    def chunk_limit(self) -> int | None:
        # A DeadlineError raised by pace() inside a request body reaches the retry layer wrapped
        # in a retryable connection error (aiohttp wraps what a body generator raises); the next
        # attempt reads chunk_limit before sending anything, so the decision is raised from here.
        if self.failure is not None:
            raise self.failure
        return None if self.dest is None else self.dest.chunk_limit()

    @property
    def remaining(self) -> int:
        return max(0, self.size - self.sent)

    @property
    def deadline(self) -> float:
        assert self.window is not None
        return (self.started if self.started is not None else self.admitted) + self.window


class _Destination:
    """The windowed uploads to one registry, its rate estimate, and who waits for what."""

    def __init__(self, registry: str, limits: RegistryLimits, config: EngineConfig, clock: Clock,
                 emit: Listener | None) -> None:
        assert limits.upload_window is not None
        self.registry, self.limits, self.config, self.clock, self.emit = registry, limits, config, clock, emit
        self.window: float = limits.upload_window
        self.per_request = limits.window_scope == "request"
        self.reserve = SAFETY_MARGIN * self.window
        self.estimator = ThroughputEstimator(clock=clock, **estimator_timing(self.window))
        self.poll = min(0.5, max(0.02, self.window / 50))
        self.report_every = min(15.0, max(0.25, self.window / 20))
        self.in_flight = config.socket_buffer + max(config.read_size, config.file_read_size)
        self.tickets: dict[int, UploadTicket] = {}
        self.waiters = 0
        self._changed = asyncio.Event()

    # -- admission ---------------------------------------------------------------------------
    async def admit(self, digest: Digest, size: int) -> UploadTicket:
        t = UploadTicket(self.registry, digest, size, self.window, self.clock, dest=self,
                         light=size <= self.config.monolithic_threshold, admitted=self.clock())
        queued = False
        while True:
            now = self.clock()
            if t.light or self.per_request:
                decision = Admission.ADMIT
            else:
                decision = admission(self._running(), size, window=self.window, rate=self.estimator.rate,
                                     now=now)
            if decision is Admission.ADMIT:
                t.admitted = t.last_active = now
                self.tickets[t.key] = t
                return t
            if decision is Admission.REFUSE:
                t.admitted = now
                raise self._fail(t, now, refused=True)
            if not queued:
                queued = True
                self._event(t, f"waiting: starting it now would make an upload to {self.registry} miss "
                               f"its {self.window:g} s window")
            self.waiters += 1
            try:
                await self._wait()
            finally:
                self.waiters -= 1

    def release(self, t: UploadTicket) -> None:
        if self.tickets.pop(t.key, None) is None:
            return
        self._update_flow()
        self._notify()
        if self._reported(t) and not t.remaining and t.failure is None:
            assert self.emit is not None
            now = self.clock()
            left = t.deadline - now
            detail = (f"finished with {left:.1f} s of its {self.window:g} s window left" if left >= 0 else
                      f"finished {-left:.1f} s after its {self.window:g} s window ended (a registry that "
                      "enforces the window would have cut it)")
            self.emit(Event("deadline_met", t.digest.short, size=t.size, n=t.sent, target=self.registry,
                            detail=detail, time=now,
                            window_left=round(left, 3), projected_finish=0.0, slack=round(left, 3)))

    def _left(self, t: UploadTicket) -> int:
        """Bytes of ``t`` not yet on the wire, as far as we can tell (see the module docstring)."""
        return t.remaining + min(t.sent, self.in_flight)

    # -- the window's clock ------------------------------------------------------------------
    def session_started(self, t: UploadTicket) -> None:
        t.last_active = t.started if t.started is not None else self.clock()
        t.last_report = -math.inf
        self._update_flow()
        self._report(t, t.last_active)
        self._notify()

    async def pace(self, t: UploadTicket, n: int) -> None:
        if t.light:
            t.sent = min(t.size, t.sent + n)
            return
        now = self.clock()
        if t.started is None:  # a session from an earlier run: its age is unknown, count from admission
            t.started = t.admitted
            self.session_started(t)
        if not self.per_request:
            self._check(t, now)
            if not self._may_send(t, now):
                await self._hold(t)
                now = self.clock()
        t.sent = min(t.size, t.sent + n)
        t.last_active, t.last_piece = now, n
        if self._measured(t):
            self.estimator.add(n)
        elif not t.remaining:
            self._update_flow()
        self._report(t, now, final=not t.remaining)
        if self.waiters:
            self._notify()

    async def _hold(self, t: UploadTicket) -> None:
        t.waiting = True
        self.waiters += 1
        self._update_flow()
        self._event(t, "waiting: an upload closer to its deadline gets the bandwidth first")
        try:
            while True:
                await self._wait()
                now = self.clock()
                self._check(t, now)
                if self._may_send(t, now):
                    return
        finally:
            t.waiting = False
            self.waiters -= 1
            self._update_flow()

    def chunk_limit(self) -> int | None:
        if not self.per_request:
            return None
        caps = [c for c in (self.limits.max_chunk, self.limits.max_body) if c]
        return request_chunk(self.estimator.rate, self.window, cap=min(caps) if caps else None)

    # -- decisions ---------------------------------------------------------------------------
    def _running(self) -> list[Running]:
        """Admitted uploads not done yet (their windows count from admission until their session
        starts)."""
        return [Running(t.key, self._left(t), t.deadline) for t in self.tickets.values() if not t.light]

    def _active(self) -> list[UploadTicket]:
        """Uploads with an open session: their bytes are flowing, or they soon will be."""
        return [t for t in self.tickets.values() if not t.light and t.started is not None]

    def _may_send(self, t: UploadTicket, now: float) -> bool:
        rate = self.estimator.rate
        if rate is None:
            return True
        # an upload silent for a while with bytes left to hand over (between attempts, waiting on
        # its registry) does not hold the others back
        live = [u for u in self._active()
                if u is t or not u.remaining or now - u.last_active <= max(1.0, 4 * u.last_piece / rate)]
        senders = [u.key for u in live if not u.waiting]
        return may_send([Running(u.key, self._left(u), u.deadline) for u in live], t.key, senders=senders,
                        rate=rate, now=now, reserve=self.reserve)

    def _check(self, t: UploadTicket, now: float) -> None:
        if t.failure is not None:
            raise t.failure
        if doomed(t.remaining, t.deadline, rate=self.estimator.rate, now=now):
            raise self._fail(t, now)

    def _fail(self, t: UploadTicket, now: float, *, refused: bool = False) -> DeadlineError:
        rate = self.estimator.rate or 0.0
        left = t.deadline - now
        need = required_rate(t.remaining, left)
        where = f"{self.registry}'s {self.window:g} s upload window"
        if refused:
            what = (f"needs at least {_rate(need)} (required rate) to fit inside {where}, but the measured "
                    f"rate is {_rate(rate)}; not started")
        else:
            what = (f"cannot finish inside {where}: {t.remaining:,} bytes left with {max(0.0, left):.1f} s to "
                    f"go need {_rate(need)} (required rate), but the measured rate is {_rate(rate)}; "
                    "stopped early")
        err = DeadlineError(f"blob {t.digest} ({t.size:,} bytes) {what}", digest=str(t.digest), size=t.size,
                            rate=rate, required=need)
        t.failure = err
        if self.emit is not None:
            self.emit(Event("info", t.digest.short, size=t.size, n=t.sent, target=self.registry, detail=str(err),
                            time=now, window_left=round(left, 3)))
        self.release(t)
        return err

    # -- bookkeeping -------------------------------------------------------------------------
    def _measured(self, t: UploadTicket) -> bool:
        """Whether ``t``'s bytes handed over so far go into the estimate: not a session's first
        ``in_flight`` (they fill socket buffers at memory speed), nor its last piece (it drains
        after the last look at the clock)."""
        return t.started is not None and not t.light and t.remaining > 0 and t.sent >= self.in_flight

    def _update_flow(self) -> None:
        """The estimate's clock runs while some upload hands over measured bytes; not while every
        one is held, filling or draining its socket buffers, or between sessions."""
        if any(self._measured(t) and not t.waiting for t in self._active()):
            self.estimator.resume()
        else:
            self.estimator.pause()

    def _reported(self, t: UploadTicket) -> bool:
        """Progress against a window is told for uploads whose session has one (not per request)."""
        return self.emit is not None and not t.light and not self.per_request

    def _report(self, t: UploadTicket, now: float, *, final: bool = False) -> None:
        if not self._reported(t) or (not final and now - t.last_report < self.report_every):
            return
        assert self.emit is not None
        t.last_report = now
        rate = self.estimator.rate
        finish = slack = None
        if rate is not None:
            mine = [p for p in project(self._running(), rate, now) if p.key == t.key]
            if mine:
                finish, slack = mine[0].finish - now, mine[0].slack
        detail = f"slack {slack:.1f} s at {_rate(rate)}" if rate is not None and slack is not None else (
            "no rate measured yet")
        self.emit(Event("deadline", t.digest.short, size=t.size, n=t.sent, target=self.registry, detail=detail,
                        time=now, window_left=round(t.deadline - now, 3),
                        projected_finish=None if finish is None else round(finish, 3),
                        slack=None if slack is None else round(slack, 3)))

    def _event(self, t: UploadTicket, detail: str, *, now: float | None = None) -> None:
        if self.emit is not None:
            now = self.clock() if now is None else now
            self.emit(Event("deadline", t.digest.short, size=t.size, n=t.sent, target=self.registry,
                            detail=detail, time=now, window_left=round(t.deadline - now, 3)))

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def _wait(self) -> None:
        """Until something changes here, or ``poll`` seconds (time alone changes projections)."""
        changed = self._changed
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.poll):
                await changed.wait()


def _rate(bps: float) -> str:
    if math.isinf(bps):
        return "an unbounded rate (no time left)"
    for unit in ("B/s", "kB/s", "MB/s", "GB/s"):
        if bps < 1000 or unit == "GB/s":
            return f"{bps:.0f} {unit}" if unit == "B/s" else f"{bps:.2f} {unit}"
        bps /= 1000
    raise AssertionError("unreachable")


class DeadlineTracker:
    """Per job: one :class:`_Destination` per windowed registry; bare tickets for the others."""

    def __init__(self, config: EngineConfig, *, emit: Listener | None = None,
                 clock: Clock = time.monotonic) -> None:
        self.config = config
        self.emit = emit
        self.clock = clock
        self._destinations: dict[str, _Destination | None] = {}

    def destination(self, registry: str) -> _Destination | None:
        if registry not in self._destinations:
            limits = self.config.limits(registry)
            tracked = self.config.deadline_tracking and limits.upload_window is not None
            self._destinations[registry] = (_Destination(registry, limits, self.config, self.clock, self.emit)
                                            if tracked else None)
        return self._destinations[registry]

    async def admit(self, registry: str, digest: Digest, size: int) -> UploadTicket:
        dest = self.destination(registry)
        if dest is None:
            window = self.config.limits(registry).upload_window
            return UploadTicket(registry, digest, size, window, self.clock)
        return await dest.admit(digest, size)

    def release(self, ticket: UploadTicket) -> None:
        if ticket.dest is not None:
            ticket.dest.release(ticket)

"""Timing: calls timed round-robin on the CPU (``perf_counter``) or CUDA (events), the host time
of a call, and the same-run ``copy_`` that every op is measured against."""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from sema import backends

if TYPE_CHECKING:
    from sema.profile.report import Progress

DEFAULT_REPEATS = {"cpu": 15, "cuda": 100}


@dataclass(frozen=True)
class Timing:
    """Seconds per call over ``n`` timed calls: median and quartiles, and the minimum (on a
    shared machine the calls that another process interrupted make the upper tail)."""

    median_s: float
    q1_s: float
    q3_s: float
    min_s: float
    n: int

    @classmethod
    def of(cls, samples: Sequence[float]) -> Timing:
        if len(samples) < 2:
            return cls(samples[0], samples[0], samples[0], samples[0], len(samples))
        q1, q2, q3 = statistics.quantiles(samples, n=4, method="inclusive")
        return cls(q2, q1, q3, min(samples), len(samples))

    def row_fields(self, nbytes: int) -> dict[str, float | int]:
        """The timing columns of a result row, with GB/s for ``nbytes`` moved per call."""
        return {
            "median_ms": self.median_s * 1e3,
            "q1_ms": self.q1_s * 1e3,
            "q3_ms": self.q3_s * 1e3,
            "min_ms": self.min_s * 1e3,
            "repeats": self.n,
            "GB/s": nbytes / self.median_s / 1e9,
        }


@dataclass
class Candidate:
    """One thing to time. ``call(i)`` gets a running call count (to pick a rotating buffer);
    ``after(i)``, when given, runs untimed right after each timed call (e.g. to undo a swap)."""

    call: Callable[[int], object]
    after: Callable[[int], object] | None = None


def copy_candidates(
    byte_counts: dict[str, int], buffer_bytes: int, device: torch.device, rotations: int
) -> dict[str, Candidate]:
    """For each op, a ``copy_`` of half its bytes into the other half (the same traffic), over
    ``rotations`` source/destination pairs of ``buffer_bytes`` each, rotated like the op's own
    buffers. The sources are written first: untouched pages read as zeros from the cache and
    would inflate ``copy_``."""
    copies = [
        (
            torch.ones(buffer_bytes, dtype=torch.uint8, device=device),
            torch.empty(buffer_bytes, dtype=torch.uint8, device=device),
        )
        for _ in range(rotations)
    ]
    k = rotations
    return {
        op: Candidate(lambda i, m=nbytes // 2: copies[i % k][1][:m].copy_(copies[i % k][0][:m]))
        for op, nbytes in byte_counts.items()
    }


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class WallClock:
    """CPU timing: ``perf_counter`` around each call (the ops run synchronously there)."""

    def hold(self, seconds: float) -> None:
        """Nothing to queue: the CPU runs each call as it is made."""

    def start(self) -> float:
        return time.perf_counter()

    def stop(self, started: float) -> float:
        return time.perf_counter() - started

    def seconds(self, marks: list[float]) -> list[float]:
        return marks


class EventClock:
    """CUDA timing: a pair of events around each call. Events time the stream, so the stream
    must never wait for the host inside a timed region: on an idle GPU the start event fires
    when it is recorded and the kernel only later, when its launch arrives, and that host
    latency would be counted. :meth:`hold` queues a spin kernel ahead of each round that lasts
    longer than the host takes to issue the round, so every call of it is queued before the GPU
    reaches it."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._cycles_per_second: float | None = None

    def _calibrate(self) -> float:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        cycles = 1 << 22
        torch.cuda._sleep(cycles)  # wakes the clocks first
        start.record()
        torch.cuda._sleep(cycles)
        end.record()
        end.synchronize()
        return cycles / (start.elapsed_time(end) / 1e3)

    def hold(self, seconds: float) -> None:
        if self._cycles_per_second is None:
            self._cycles_per_second = self._calibrate()
        torch.cuda._sleep(max(1, int(seconds * self._cycles_per_second)))

    def start(self) -> tuple[torch.cuda.Event, torch.cuda.Event]:
        events = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        events[0].record()
        return events

    def stop(self, started: tuple[torch.cuda.Event, torch.cuda.Event]) -> tuple[torch.cuda.Event, torch.cuda.Event]:
        started[1].record()
        return started

    def seconds(self, marks: list[tuple[torch.cuda.Event, torch.cuda.Event]]) -> list[float]:
        torch.cuda.synchronize(self.device)
        return [start.elapsed_time(end) / 1e3 for start, end in marks]


# The first round's hold, before any round has been issued to measure; later rounds hold for
# HOLD_MARGIN times the host time of the round before, at most MAX_HOLD_SECONDS: a candidate
# that synchronizes waits for the hold itself, and the hold must not then grow round after round.
FIRST_HOLD_SECONDS = 0.02
HOLD_MARGIN = 1.5
MAX_HOLD_SECONDS = 0.05


def measure(
    candidates: dict[str, Candidate],
    device: torch.device,
    repeats: int,
    warmup: int = 2,
    progress: Progress | None = None,
    errors: dict[str, str] | None = None,
    clock: WallClock | EventClock | None = None,
) -> dict[str, Timing]:
    """Time every candidate ``repeats`` times, round-robin (one call of each per round), after
    ``warmup`` untimed rounds. CUDA: events around each call, with the GPU kept busy ahead of
    each round (:class:`EventClock`); CPU: ``perf_counter``.

    With ``errors`` given, a candidate that raises is recorded there (``"Type: message"``) and
    left out of the later rounds and of the result, and the others carry on; without it the
    exception propagates.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    if clock is None:
        clock = EventClock(device) if device.type == "cuda" else WallClock()
    if device.type == "cuda":
        with torch.cuda.device(device):  # the events belong to the tensors' device
            return _measure(candidates, clock, repeats, warmup, progress, errors)
    return _measure(candidates, clock, repeats, warmup, progress, errors)


def _measure(
    candidates: dict[str, Candidate],
    clock: WallClock | EventClock,
    repeats: int,
    warmup: int,
    progress: Progress | None,
    errors: dict[str, str] | None,
) -> dict[str, Timing]:
    items = list(candidates.items())
    samples: dict[str, list[float]] = {name: [] for name in candidates}
    failed: dict[str, str] = {}
    calls = 0
    hold = FIRST_HOLD_SECONDS
    for timed_round in [False] * warmup + [True] * repeats:
        names, marks = [], []
        issued_from = time.perf_counter()
        clock.hold(hold)
        for name, candidate in items:
            if name in failed:
                continue
            try:
                started = clock.start()
                candidate.call(calls)
                mark = clock.stop(started)
                if candidate.after is not None:
                    candidate.after(calls)
            except Exception as exc:
                if errors is None:
                    raise
                failed[name] = f"{type(exc).__name__}: {exc}"
            else:
                names.append(name)
                marks.append(mark)
            calls += 1
        hold = min(MAX_HOLD_SECONDS, HOLD_MARGIN * (time.perf_counter() - issued_from))
        seconds = clock.seconds(marks)
        if timed_round:
            for name, elapsed in zip(names, seconds, strict=True):
                samples[name].append(elapsed)
        if progress is not None:
            progress.update()
    if errors is not None:
        errors.update(failed)
    return {name: Timing.of(times) for name, times in samples.items() if name not in failed}


def host_seconds(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int = 3) -> float:
    """Median wall time of ``fn()`` alone, the device idle before each call. On CUDA that is the
    time to issue the launches (nothing waits for the GPU)."""
    for _ in range(warmup):
        fn()
    _synchronize(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        _synchronize(device)
    return statistics.median(times)


# The entry points every backend module implements (sema/backends.py); all kernel work is below them.
KERNEL_ENTRY_POINTS = ("ema_update_", "ema_update_multi_", "switch_", "swap_")


@contextlib.contextmanager
def without_kernels(backend: str) -> Iterator[None]:
    """Inside the block, ``backend``'s kernel entry points do nothing, so that timing
    ``SwitchEMA.update()`` leaves the host work above the backend: the Python, the checks and
    the small torch ops of the step counter and decay. On the CPU, where the kernels run
    synchronously inside the call, this is the only way to see that work apart from the memory
    traffic. Raises RuntimeError on exit when no entry point was called inside (the calls went
    around the backend module, so the time would still include the kernels)."""
    module = backends.module(backend)
    calls = 0

    def skip(*args: object, **kwargs: object) -> None:
        nonlocal calls
        calls += 1

    saved = {name: getattr(module, name) for name in KERNEL_ENTRY_POINTS}
    try:
        for name in KERNEL_ENTRY_POINTS:
            setattr(module, name, skip)
        yield
    finally:
        for name, fn in saved.items():
            setattr(module, name, fn)
    if calls == 0:
        raise RuntimeError(
            f"without_kernels({backend!r}): no kernel entry point of the backend was called, so the kernels were "
            "not replaced and the time would include them; SwitchEMA must reach the kernels through "
            "sema.backends.module(name)"
        )

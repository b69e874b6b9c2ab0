"""Timing: calls timed round-robin on the CPU (``perf_counter``) or CUDA (events), the host time
of a call, and the same-run ``copy_`` that every op is measured against."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

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


def measure(
    candidates: dict[str, Candidate],
    device: torch.device,
    repeats: int,
    warmup: int = 2,
    progress: Progress | None = None,
) -> dict[str, Timing]:
    """Time every candidate ``repeats`` times, round-robin (one call of each per round), after
    ``warmup`` untimed rounds. CUDA: events around each call; CPU: ``perf_counter``."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    if device.type == "cuda":
        with torch.cuda.device(device):  # the events belong to the tensors' device
            return _measure(candidates, device, repeats, warmup, progress)
    return _measure(candidates, device, repeats, warmup, progress)


def _measure(
    candidates: dict[str, Candidate], device: torch.device, repeats: int, warmup: int, progress: Progress | None
) -> dict[str, Timing]:
    items = list(candidates.items())
    samples: dict[str, list[float]] = {name: [] for name in candidates}
    calls = 0
    for timed_round in [False] * warmup + [True] * repeats:
        events = []
        for name, candidate in items:
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                candidate.call(calls)
                end.record()
                events.append((name, start, end))
            else:
                t0 = time.perf_counter()
                candidate.call(calls)
                seconds = time.perf_counter() - t0
                if timed_round:
                    samples[name].append(seconds)
            if candidate.after is not None:
                candidate.after(calls)
            calls += 1
        _synchronize(device)
        if timed_round:
            for name, start, end in events:
                samples[name].append(start.elapsed_time(end) / 1e3)
        if progress is not None:
            progress.update()
    return {name: Timing.of(times) for name, times in samples.items()}


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

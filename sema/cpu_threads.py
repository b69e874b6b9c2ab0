"""How many threads each CPU op of the ``torch`` and ``cpp`` backends runs with.

A parallel region ends when its last thread is done. When another process holds a core (a
data-loader worker, say), a region's second thread can wait a whole scheduler slice (about
8 ms on the 2-core VM of ``bench/results/``) while the first has long finished its half: a 1 ms
op then takes 9 ms, and the torch backend's cache-blocked ops pay it once per block. So every
CPU op asks :data:`PLANNER` for a thread count and reports its wall time:

- work of fewer than ``SMALL_WORK_BYTES`` runs on one thread: no region to wait for;
- the first call of each kind (op, dtypes, size within a factor of 2) runs on one thread, to
  learn what one thread costs per byte;
- a parallel call slower than that by ``LATE_RATIO`` plus ``LATE_SECONDS`` marks the machine as
  contended: calls then run on one thread for a back-off period (doubling while the probes stay
  late, up to ``MAX_BACKOFF_SECONDS``), after which the next call probes all threads again.

The thread count never changes a result: every op is elementwise.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager

import torch

SMALL_WORK_BYTES = 1 << 20
# Late means parallel costs more than twice one quiet thread: under contention one thread slows
# too, and big memory-bound work still gains from a second thread that starts late
# (bench/results/contention-cpu-2threads-20261201-*.json: 1.25 backed ResNet-50's single cpp region
# off to one thread at 2.03x its quiet time, where staying parallel costs 1.7x).
LATE_RATIO = 2.0
LATE_SECONDS = 1e-3  # above the timer and page-fault noise of a 1 MiB op, below one scheduler slice
FIRST_BACKOFF_SECONDS = 0.05
MAX_BACKOFF_SECONDS = 1.0


class ThreadPlanner:
    """Thread counts for CPU ops, backing off to one thread while parallel calls come back late."""

    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        self._clock = clock
        self._single_seconds_per_byte: dict[tuple[Hashable, int], float] = {}
        self._single_until = -math.inf
        self._backoff = 0.0
        self._all_threads = False
        self._local = threading.local()  # per calling thread: its cap (cap_this_thread)
        self.stats = {"parallel": 0, "single": 0, "late": 0}

    def threads(self, key: Hashable, nbytes: int, max_threads: int) -> int:
        """The thread count for an op of kind ``key`` moving ``nbytes``, at most ``max_threads``."""
        if max_threads <= 1:
            return 1
        if self._all_threads:
            return max_threads
        if (
            nbytes < SMALL_WORK_BYTES
            or (key, nbytes.bit_length()) not in self._single_seconds_per_byte
            or self._clock() < self._single_until
        ):
            return 1
        return max_threads

    def record(self, key: Hashable, nbytes: int, threads: int, seconds: float) -> None:
        """Reports the wall time of a call of kind ``key`` that moved ``nbytes`` on ``threads`` threads."""
        size_class = (key, nbytes.bit_length())
        if threads == 1:
            self.stats["single"] += 1
            if seconds / nbytes < self._single_seconds_per_byte.get(size_class, math.inf):
                self._single_seconds_per_byte[size_class] = seconds / nbytes
            return
        self.stats["parallel"] += 1
        single = self._single_seconds_per_byte.get(size_class)
        if single is not None and seconds > single * nbytes * LATE_RATIO + LATE_SECONDS:
            self.stats["late"] += 1
            self._backoff = min(2 * self._backoff, MAX_BACKOFF_SECONDS) if self._backoff else FIRST_BACKOFF_SECONDS
            self._single_until = self._clock() + self._backoff
        else:
            self._backoff = 0.0

    def cap_this_thread(self, threads: int | None) -> None:
        """At most ``threads`` threads for every op called from the calling thread (None: no cap
        beyond ``torch.get_num_threads()``): the offload worker's ``offload_threads``."""
        self._local.cap = threads

    def run(self, key: Hashable, nbytes: int, op: Callable[[int], None]) -> None:
        """Calls ``op(threads)`` with the planned thread count and records its time."""
        max_threads = torch.get_num_threads()
        cap = getattr(self._local, "cap", None)
        if cap is not None:
            max_threads = min(max_threads, cap)
        if self._all_threads:
            op(max_threads)  # not recorded: forced calls must not steer the planner
            return
        threads = self.threads(key, nbytes, max_threads)
        if max_threads <= 1 or nbytes < SMALL_WORK_BYTES:
            op(threads)
            return
        start = self._clock()
        op(threads)
        self.record(key, nbytes, threads, self._clock() - start)

    def run_torch(self, key: Hashable, nbytes: int, body: Callable[[], None]) -> None:
        """Runs PyTorch ops in ``body`` with the planned thread count (ATen opens no region on one)."""

        def op(threads: int) -> None:
            previous = torch.get_num_threads()
            if threads == previous:
                body()
                return
            torch.set_num_threads(threads)
            try:
                body()
            finally:
                torch.set_num_threads(previous)

        self.run(key, nbytes, op)

    @property
    def forced(self) -> bool:
        """Whether :meth:`all_threads` is in force."""
        return self._all_threads

    @contextmanager
    def all_threads(self) -> Iterator[None]:
        """Inside, every call runs with ``torch.get_num_threads()`` threads, as sema did before this
        planner: for A/B benchmarks and for tests of the parallel paths."""
        previous = self._all_threads
        self._all_threads = True
        try:
            yield
        finally:
            self._all_threads = previous


PLANNER = ThreadPlanner()

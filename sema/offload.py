"""When a ``SwitchEMA`` update runs off the training thread's critical path: the offload and
overlap engines.

``SwitchEMA`` hands an engine the weights of one update; the engine decides where and when the
update runs and what a caller must wait for before it writes the params (``params_read``) or reads
the EMA (``finish``).

- :class:`OverlapEngine` (``overlap=True``, EMA on the GPU): the fused update runs on a side
  stream after an event recorded on the current stream, so that it overlaps the next forward and
  backward. ``params_read`` makes the current stream wait for it; nothing syncs with the host.
- :class:`OffloadEngine` (``ema_device="cpu"``): the EMA lives in host memory. ``update()``
  records an event on the current stream and hands the update to a worker thread, which copies
  each bucket chunk by chunk into a ring of staging buffers (two by default; device to host on a
  side stream, pinned, for CUDA params; a plain copy for CPU params) and runs the cpp update on
  each chunk as soon as its copy has landed. With CPU params the ring is empty by default: the
  worker updates from the params directly (a staging copy there costs 8 more bytes per element of
  memory traffic and frees the params only a ring before the end). The copies run at most a ring ahead of the updates,
  so the params are free to be written once the update is within a ring of its end (at once
  after the copies when the ring holds the whole model). At most one update is in flight: the
  next one first waits for the previous.
"""

from __future__ import annotations

import contextlib
import operator
import queue
import threading
import traceback
import warnings
import weakref
from collections.abc import Callable

import torch
from torch import Tensor

from sema import ops
from sema.buckets import FlatBucket
from sema.cpu_threads import PLANNER
from sema.storage import EMAStorage

# Default chunk of the offload pipeline, in param elements: 4 MiB of fp32 params (2 MiB of bf16);
# the staging ring holds OFFLOAD_STAGING_CHUNKS buffers of one chunk each, of the widest param dtype.
OFFLOAD_CHUNK_ELEMENTS = 1 << 20
OFFLOAD_STAGING_CHUNKS = 2  # for CUDA params; CPU params are read directly unless asked otherwise


def staging_chunks_for(requested: int | None, param_devices: list[torch.device]) -> int:
    """The staging ring size: ``requested``, or the default for these params (0 reads them
    directly, which only params in host memory allow)."""
    on_cuda = any(device.type != "cpu" for device in param_devices)
    if requested is None:
        return OFFLOAD_STAGING_CHUNKS if on_cuda else 0
    if isinstance(requested, bool) or not isinstance(requested, int) or requested < 0:
        raise ValueError(f"SwitchEMA: offload_staging_chunks={requested!r} must be None or a non-negative int")
    if requested == 0 and on_cuda:
        raise ValueError(
            "SwitchEMA: offload_staging_chunks=0 reads the params directly, which only params in host memory "
            "allow; params on the GPU are copied through at least one staging chunk (None picks 2)"
        )
    return requested


_NO_EVENTS: dict = {}  # never written: the events of params in host memory

# overlap=True splits each bucket's update into launches of at most this many elements: a CUDA
# kernel of sema's keeps every block it can fit resident until it ends, so one launch over a
# whole bucket would hold the SMs against the next forward's kernels; between pieces, they get in.
OVERLAP_PIECE_ELEMENTS = 1 << 24

# The offload worker checks that no param was written before it had read them (a write without
# wait() or attach()) on updates 1 and 2 of every RACE_CHECK_EVERY: the check is O(params).
RACE_CHECK_EVERY = 16
_VERSION = operator.attrgetter("_version")


# The live engines: a SwitchEMA about to write the params (switch, swapped) first waits for every
# other engine over the same params to have read them.
_ENGINES: weakref.WeakSet = weakref.WeakSet()


def wait_for_readers(storage: EMAStorage, engine: object) -> None:
    """Before ``storage``'s params are written: every other live engine whose pending update reads
    them (another SwitchEMA of the same params) has read them."""
    others = [e for e in list(_ENGINES) if e is not engine]
    if not others:
        return
    ours = storage.param_storages()
    for other in others:
        if not ours.isdisjoint(other.storage.param_storages()):
            other.params_read()


class OverlapEngine:
    """The fused update on a side stream per CUDA device, ordered after the current stream."""

    staging_bytes = 0

    def __init__(self, storage: EMAStorage) -> None:
        self.storage = storage
        devices = {h.device for h in (*storage.buckets, *storage.tensor_groups) if h.device.type == "cuda"}
        self.streams = {device: torch.cuda.Stream(device) for device in sorted(devices, key=str)}
        self.done: dict[torch.device, torch.cuda.Event] = {}
        _ENGINES.add(self)

    def update(
        self, weights: dict[torch.device, Tensor], weights64: dict[torch.device, Tensor] | None, switch: bool
    ) -> None:
        for device, stream in self.streams.items():
            stream.wait_event(torch.cuda.current_stream(device).record_event())
        try:
            with contextlib.ExitStack() as streams:
                for stream in self.streams.values():
                    streams.enter_context(torch.cuda.stream(stream))
                self.storage.update_(weights, switch, weights64=weights64, piece=OVERLAP_PIECE_ELEMENTS)
        finally:  # also after a failed launch: what was enqueued is waited for
            for device, stream in self.streams.items():
                for w in (weights.get(device), (weights64 or {}).get(device)):
                    if w is not None:  # freed on the current stream while the side stream may still read it
                        w.record_stream(stream)
                self.done[device] = stream.record_event()
        if switch:  # the params were written on the side stream: the next forward must see them
            self.params_read()

    def params_read(self) -> None:
        """The current streams wait for the pending update (no host sync)."""
        for device, event in self.done.items():
            torch.cuda.current_stream(device).wait_event(event)

    finish = params_read

    def check(self) -> None:
        """Errors surface at the call on this engine: nothing to report later."""

    def clear_error(self) -> None:
        """Nothing kept: see :meth:`check`."""

    def close(self) -> None:
        """Nothing to release: the streams go with the engine."""


class _Job:
    """One update for the worker: how many updates came before it (its weights follow from it),
    the events the copies wait for (CUDA params), its number on this engine (for messages) and
    the params' version counters when it was handed over (a write before the worker has read
    them changes them)."""

    __slots__ = ("known", "number", "ready", "versions")

    def __init__(
        self, known: int, ready: dict[torch.device, torch.cuda.Event], number: int, versions: int | None
    ) -> None:
        self.known = known
        self.ready = ready
        self.number = number
        self.versions = versions


class _Task:
    """One piece of the worker's pass: a chunk of a bucket (or a whole bucket read directly), with
    its views made once (views made per call would change the bucket storage's use count, which
    the placement check reads)."""

    __slots__ = ("backend", "bucket", "copy_only", "emas", "param", "staged")

    def __init__(self, storage: EMAStorage, bucket: FlatBucket, start: int, end: int, staged: Tensor | None) -> None:
        self.bucket = bucket
        self.param = bucket.param_flat[start:end]
        self.emas = [e[start:end] for e in storage.bucket_emas(bucket)]
        self.staged = staged
        self.backend = storage.backend_of(bucket)
        self.copy_only = storage.is_copy_only(bucket)


class _Gate:
    """A flag the training thread closes when it hands over an update and the worker opens, waited
    for on a plain lock: ``threading.Event`` goes through a Python-level Condition, which costs
    tens of µs in ``update()`` once the worker has streamed the EMA through the caches."""

    __slots__ = ("_lock",)

    def __init__(self) -> None:
        self._lock = threading.Lock()

    def close(self) -> None:
        """Only while open (the training thread waits for the previous update first); blocking,
        since another thread's wait() holds the lock for a moment."""
        self._lock.acquire()

    def open(self) -> None:
        """From the worker only (opening twice is fine)."""
        if self._lock.locked():
            self._lock.release()

    def wait(self) -> None:
        self._lock.acquire()
        self._lock.release()


class OffloadWorkerError(RuntimeError):
    """The offload worker failed during an update: the EMA holds a partial update of that step."""


class OffloadRaceWarning(RuntimeWarning):
    """A param was written while the offload worker was still reading it (no ``wait()`` or
    ``attach()`` before the write): that update of the EMA may hold the new values."""


class OffloadEngine:
    """An EMA in host memory, updated by a worker thread from chunked staging copies."""

    def __init__(
        self,
        storage: EMAStorage,
        step: Tensor,
        weights_at: Callable[[Tensor, int], tuple[Tensor, Tensor | None]],
        chunk_elements: int = OFFLOAD_CHUNK_ELEMENTS,
        staging_chunks: int = OFFLOAD_STAGING_CHUNKS,
        threads: int | None = None,
    ) -> None:
        self.storage = storage
        self.threads = threads  # at most this many CPU threads per update (None: torch's count)
        # The host step counter (0-d int64): the worker computes each update's weights from it
        # (weights_at(step, number of earlier updates): float32, and float64 for fp64 params) and
        # counts the update there once it is done. Read it after finish().
        self.step = step
        self._weights_at = weights_at
        buckets = [b for b in storage.buckets if b.param_flat.numel()]
        self.buckets = buckets
        self._params = [p for b in buckets for p in b.params]
        self.cuda_devices = sorted({b.device for b in buckets if b.device.type == "cuda"}, key=str)
        longest = max((b.param_flat.numel() for b in buckets), default=0)
        chunk = min(chunk_elements, longest)
        widest = max((b.param_flat.element_size() for b in buckets), default=1)
        spans = []  # (bucket, start, end): chunks through the staging ring, or whole buckets read directly
        for b in buckets:
            n = b.param_flat.numel()
            step = chunk if staging_chunks else n
            spans += [(b, start, min(start + step, n)) for start in range(0, n, step)]
        ring = min(staging_chunks, len(spans))
        # Only the staging is pinned (the copies into it are asynchronous): the EMA itself is read and
        # written by the host alone, and pinned blocks are rounded up to a power of two.
        self.staging = [
            torch.empty(chunk * widest, dtype=torch.uint8, pin_memory=bool(self.cuda_devices)) for _ in range(ring)
        ]
        self.staging_bytes = sum(s.numel() for s in self.staging)
        self.tasks = [
            _Task(
                storage,
                b,
                start,
                end,
                self.staging[i % ring][: (end - start) * b.param_flat.element_size()].view(b.dtype) if ring else None,
            )
            for i, (b, start, end) in enumerate(spans)
        ]
        self.copy_streams = {device: torch.cuda.Stream(device) for device in self.cuda_devices}
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._idle = _Gate()  # closed while an update is in flight
        self._read = _Gate()  # closed until the update in flight has read the params
        self._read_events: dict[torch.device, torch.cuda.Event] = {}
        self._error: tuple[BaseException, str, int] | None = None
        self._raced: int | None = None
        self._submitted = 0
        self._thread = threading.Thread(target=self._run, name="sema-offload", daemon=True)
        self._thread.start()
        _ENGINES.add(self)

    # --- the training thread ------------------------------------------------------------------

    def hand_over(self, known: int) -> None:
        """Start update number ``known`` (0-based) on the worker and return: ``SwitchEMA`` calls it
        last in ``update()``, after :meth:`finish`. If it raises, nothing was queued."""
        ready = _NO_EVENTS
        if self.cuda_devices:
            ready = {device: torch.cuda.current_stream(device).record_event() for device in self.cuda_devices}
        number = self._submitted + 1
        # The race check reads every param's version counter (O(params)): on a few updates only.
        versions = self._versions() if number % RACE_CHECK_EVERY in (1, 2) else None
        job = _Job(known, ready, number, versions)
        try:
            self._idle.close()
            self._read.close()
            self._read_events = _NO_EVENTS
            self._jobs.put(job)
        except BaseException:  # an interrupt before the job was queued: nothing is in flight
            self._read.open()
            self._idle.open()
            raise
        self._submitted = number

    def switch_in(self) -> None:
        """A switch fused into the update just handed over: wait for it, then put the EMA into the
        params (host to device)."""
        self.finish()
        wait_for_readers(self.storage, self)
        self.storage.switch_(0)

    def params_read(self) -> None:
        """Return once the pending update has read the params (CUDA: the current streams wait
        for the last staging copy): after it, the params may be written."""
        self._read.wait()
        for device, event in self._read_events.items():
            torch.cuda.current_stream(device).wait_event(event)
        self.check()

    def finish(self) -> None:
        """Return once the pending update has finished: the EMA is final (a host wait)."""
        self._idle.wait()
        self.check()

    def wait_idle(self) -> None:
        """:meth:`finish` without raising the worker's error (for reading the step counter)."""
        self._idle.wait()

    def check(self) -> None:
        """Raise the worker's error, if it failed: at every call until the EMA is reloaded or reset;
        warn once about a write that raced the worker's read."""
        if self._raced is not None:
            number, self._raced = self._raced, None
            warnings.warn(
                f"SwitchEMA: a param was written while the offload worker was still reading it for update {number} "
                "(counting this SwitchEMA's updates), so that update of the EMA may hold the new values. Call "
                "ema.attach(optimizer), or ema.wait() before writing the params after ema.update()",
                OffloadRaceWarning,
                stacklevel=4,
            )
        if self._error is not None:
            exc, trace, number = self._error
            raise OffloadWorkerError(
                f"SwitchEMA offload worker failed in update {number} (counting this SwitchEMA's updates); the EMA "
                "holds a partial update of that step. Load a checkpoint (ema.load_state_dict) or call ema.reset() "
                f"to go on. The worker's traceback:\n{trace}"
            ) from exc

    def clear_error(self) -> None:
        """After the EMA was overwritten as a whole (load_state_dict, reset): go on."""
        self._idle.wait()
        self._error = None

    def close(self) -> None:
        """Stop the worker once the pending update is done, and wait for it (a daemon thread still
        inside a kernel at interpreter exit aborts the process). From a finalizer: never raises."""
        self._jobs.put(None)
        if threading.current_thread() is not self._thread:
            self._thread.join()

    # --- the worker -----------------------------------------------------------------------------

    def _run(self) -> None:
        if self.cuda_devices:  # else the first CUDA call of this thread makes a context on GPU 0
            torch.cuda.set_device(self.cuda_devices[0])
        PLANNER.cap_this_thread(self.threads)
        while True:
            job = self._jobs.get()
            if job is None:
                return
            try:
                self._process(job)
            except BaseException as exc:  # kept, re-raised on the training thread at its next call
                self._error = (exc, traceback.format_exc(), job.number)
            finally:
                self._read.open()
                self._idle.open()

    def _versions(self) -> int:
        """The sum of the params' version counters: any in-place write to one raises it (a param
        re-pointed into a bucket keeps its own counter, not the bucket's)."""
        return sum(map(_VERSION, self._params))

    def _params_read(self, job: _Job, events: dict[torch.device, torch.cuda.Event]) -> None:
        """Every read of the params is done (CPU) or issued (CUDA, ``events``): let writers go."""
        if job.versions is not None and self._versions() != job.versions:
            self._raced = job.number
        self._read_events = dict(events)
        self._read.open()

    def _process(self, job: _Job) -> None:
        for device, event in job.ready.items():
            self.copy_streams[device].wait_event(event)
        self._pass(job, *self._weights_at(self.step, job.known))
        self.step.add_(1)  # counted once the EMA holds it: a failed update is not

    def _pass(self, job: _Job, w: Tensor, w64: Tensor | None) -> None:
        tasks = self.tasks
        if not self.staging:  # params in host memory, read directly: one update per bucket
            for task in tasks:
                self._update(task, task.param, w, w64)
            self._params_read(job, {})
            return
        ring = len(self.staging)
        last: dict[torch.device, torch.cuda.Event] = {}
        events: list[torch.cuda.Event | None] = []

        def issue(i: int) -> None:
            task = tasks[i]
            if task.bucket.device.type == "cuda":
                stream = self.copy_streams[task.bucket.device]
                event = torch.cuda.Event(blocking=True)  # waited for on the host: sleep, do not spin
                with torch.cuda.stream(stream):
                    task.staged.copy_(task.param, non_blocking=True)
                    event.record(stream)
                last[task.bucket.device] = event
                events.append(event)
            else:
                task.staged.copy_(task.param)
                events.append(None)
            if i == len(tasks) - 1:  # every copy is issued: the params may be written after them
                self._params_read(job, last)

        for i in range(min(ring, len(tasks))):
            issue(i)
        for i, task in enumerate(tasks):
            event = events[i]
            if event is not None:
                event.synchronize()
                events[i] = None
            self._update(task, task.staged, w, w64)
            if i + ring < len(tasks):  # into the buffer just freed
                issue(i + ring)

    def _update(self, task: _Task, source: Tensor, w: Tensor, w64: Tensor | None) -> None:
        if task.bucket.dtype == torch.float64 and w64 is not None:
            w = w64
        if self.storage.num_emas > 1:
            ops.dispatch_update_k(task.emas, source, torch.ones_like(w) if task.copy_only else w, None, task.backend)
        else:
            ops.dispatch_update(task.emas[0], source, 1.0 if task.copy_only else w, False, task.backend)

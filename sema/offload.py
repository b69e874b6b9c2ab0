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
import queue
import threading
import traceback

import torch
from torch import Tensor

from sema import ops
from sema.buckets import FlatBucket
from sema.storage import EMAStorage

# Default chunk of the offload pipeline, in param elements: 4 MiB of fp32 params (2 MiB of bf16);
# the staging ring holds OFFLOAD_STAGING_CHUNKS buffers of one chunk each, of the widest param dtype.
_CPU = torch.device("cpu")

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


# overlap=True splits each bucket's update into launches of at most this many elements: a CUDA
# kernel of sema's keeps every block it can fit resident until it ends, so one launch over a
# whole bucket would hold the SMs against the next forward's kernels; between pieces, they get in.
OVERLAP_PIECE_ELEMENTS = 1 << 24


class OffloadWorkerError(RuntimeError):
    """The offload worker failed during an update: the EMA holds a partial update of that step."""


class OverlapEngine:
    """The fused update on a side stream per CUDA device, ordered after the current stream."""

    def __init__(self, storage: EMAStorage) -> None:
        self.storage = storage
        devices = {h.device for h in (*storage.buckets, *storage.tensor_groups) if h.device.type == "cuda"}
        self.streams = {device: torch.cuda.Stream(device) for device in sorted(devices, key=str)}
        self.done: dict[torch.device, torch.cuda.Event] = {}

    def update(
        self, weights: dict[torch.device, Tensor], weights64: dict[torch.device, Tensor] | None, switch: bool
    ) -> None:
        for device, stream in self.streams.items():
            stream.wait_event(torch.cuda.current_stream(device).record_event())
        with contextlib.ExitStack() as streams:
            for stream in self.streams.values():
                streams.enter_context(torch.cuda.stream(stream))
            self.storage.update_(weights, switch, weights64=weights64, piece=OVERLAP_PIECE_ELEMENTS)
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

    def close(self) -> None:
        """Nothing to release: the streams go with the engine."""

    staging_bytes = 0


class _Job:
    """One update for the worker: its weights (on the CPU: 0-d, or (K,) with K EMAs), the events
    the copies wait for (CUDA params), and its number (for error messages)."""

    __slots__ = ("number", "ready", "weights", "weights64")

    def __init__(
        self, weights: Tensor, weights64: Tensor | None, ready: dict[torch.device, torch.cuda.Event], number: int
    ) -> None:
        self.weights = weights
        self.weights64 = weights64
        self.ready = ready
        self.number = number


class OffloadEngine:
    """An EMA in host memory, updated by a worker thread from chunked staging copies."""

    def __init__(
        self,
        storage: EMAStorage,
        chunk_elements: int = OFFLOAD_CHUNK_ELEMENTS,
        staging_chunks: int = OFFLOAD_STAGING_CHUNKS,
    ) -> None:
        self.storage = storage
        self.chunk_elements = chunk_elements
        buckets = [b for b in storage.buckets if b.param_flat.numel()]
        self.cuda_devices = sorted({b.device for b in buckets if b.device.type == "cuda"}, key=str)
        pinned = bool(self.cuda_devices)
        longest = max((b.param_flat.numel() for b in buckets), default=0)
        chunk = min(chunk_elements, longest)
        widest = max((b.param_flat.element_size() for b in buckets), default=1)
        # (bucket, start, end): chunks through the staging ring, or whole buckets read directly
        self.tasks: list[tuple[FlatBucket, int, int]] = []
        for b in buckets:
            n = b.param_flat.numel()
            step = chunk if staging_chunks else n
            self.tasks += [(b, start, min(start + step, n)) for start in range(0, n, step)]
        ring = min(staging_chunks, len(self.tasks))
        self.staging = [torch.empty(chunk * widest, dtype=torch.uint8, pin_memory=pinned) for _ in range(ring)]
        self.staging_bytes = sum(s.numel() for s in self.staging)
        self.copy_streams = {device: torch.cuda.Stream(device) for device in self.cuda_devices}
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._idle = threading.Event()
        self._idle.set()
        self._read = threading.Event()
        self._read.set()
        self._read_events: dict[torch.device, torch.cuda.Event] = {}
        self._error: tuple[BaseException, str, int] | None = None
        self._thread: threading.Thread | None = None
        self._submitted = 0

    # --- the training thread ------------------------------------------------------------------

    def update(
        self, weights: dict[torch.device, Tensor], weights64: dict[torch.device, Tensor] | None, switch: bool
    ) -> None:
        """Hand one update to the worker and return; with ``switch``, wait for it and put the
        EMA into the params (host to device)."""
        self.finish()  # at most one update in flight (and a worker error surfaces here)
        ready = {device: torch.cuda.current_stream(device).record_event() for device in self.cuda_devices}
        self._submitted += 1
        job = _Job(weights[_CPU], None if weights64 is None else weights64.get(_CPU), ready, self._submitted)
        self._idle.clear()
        self._read.clear()
        self._read_events = {}
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="sema-offload", daemon=True)
            self._thread.start()
        self._jobs.put(job)
        if switch:
            self.finish()
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

    def check(self) -> None:
        """Raise the worker's error, if it failed: at every call until the EMA is reloaded or reset."""
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
        """Stop the worker once the pending update is done (from a finalizer: never raises)."""
        if self._thread is not None:
            self._jobs.put(None)

    # --- the worker -----------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            try:
                self._process(job)
            except BaseException as exc:  # kept, re-raised on the training thread at its next call
                self._error = (exc, traceback.format_exc(), job.number)
            finally:
                self._read.set()
                self._idle.set()

    def _process(self, job: _Job) -> None:
        for device, event in job.ready.items():
            self.copy_streams[device].wait_event(event)
        tasks = self.tasks
        if not self.staging:  # params in host memory, read directly: one update per bucket
            for bucket, start, end in tasks:
                self._update_chunk(bucket, start, end, bucket.param_flat[start:end], job)
            return
        last: dict[torch.device, torch.cuda.Event] = {}
        staged: list[tuple[Tensor, torch.cuda.Event | None]] = []

        def issue(i: int) -> None:
            bucket, start, end = tasks[i]
            size = bucket.param_flat.element_size()
            buffer = self.staging[i % ring][: (end - start) * size].view(bucket.dtype)
            if bucket.device.type == "cuda":
                stream = self.copy_streams[bucket.device]
                with torch.cuda.stream(stream):
                    buffer.copy_(bucket.param_flat[start:end], non_blocking=True)
                    event = last[bucket.device] = stream.record_event()
                staged.append((buffer, event))
            else:
                buffer.copy_(bucket.param_flat[start:end])
                staged.append((buffer, None))
            if i == len(tasks) - 1:  # every copy is issued: the params may be written after them
                self._read_events = dict(last)
                self._read.set()

        ring = len(self.staging)
        for i in range(min(ring, len(tasks))):
            issue(i)
        if not tasks:
            self._read.set()
        for i, (bucket, start, end) in enumerate(tasks):
            buffer, event = staged[i]
            if event is not None:
                event.synchronize()
            self._update_chunk(bucket, start, end, buffer, job)
            staged[i] = (buffer, None)  # drop the event
            if i + ring < len(tasks):  # into the buffer just freed
                issue(i + ring)

    def _update_chunk(self, bucket: FlatBucket, start: int, end: int, staged: Tensor, job: _Job) -> None:
        storage = self.storage
        backend = storage.backend_of(bucket)
        w = job.weights64 if bucket.dtype == torch.float64 and job.weights64 is not None else job.weights
        emas = storage.bucket_emas(bucket)
        if storage.num_emas > 1:
            if storage.is_copy_only(bucket):
                w = torch.ones_like(w)
            ops.dispatch_update_k([e[start:end] for e in emas], staged, w, None, backend)
        else:
            ops.dispatch_update(emas[0][start:end], staged, 1.0 if storage.is_copy_only(bucket) else w, False, backend)

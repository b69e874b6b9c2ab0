"""``SwitchEMA``: an EMA of a model's weights kept in flat buckets, switched into the model.

SEMA (Li et al., arXiv 2402.09240) = the usual EMA of the weights, plus a periodic *switch*
that overwrites the live weights with the EMA; training then goes on from there. The EMA is
never reset by a switch, and the optimizer state is never touched.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import warnings
import weakref
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import Tensor, nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

from sema import ops
from sema.buckets import FlatBucket, check_aliasing, plan_buckets
from sema.module_view import build_module_view
from sema.offload import (
    OFFLOAD_CHUNK_ELEMENTS,
    OffloadEngine,
    OverlapEngine,
    staging_chunks_for,
    wait_for_readers,
)
from sema.policy import SwitchPolicy
from sema.schedules import DecaySchedule, copy_updates_of
from sema.selection import ParamSelection
from sema.storage import (
    ACTIVE_SWAPS,
    EMAStorage,
    ModelSlots,
    PlacementGuard,
    TensorGroup,
    as_param_layout,
    is_dtensor,
    local_tensor,
)
from sema.tracked_buffers import BUFFER_POLICIES, TrackedBuffers

STATE_FORMAT = "sema.SwitchEMA"
STATE_VERSION = 1

# The counters of a state dict, and whether a state must hold them (older states may lack the others).
COUNTERS = {"step": True, "calls": True, "epochs": True, "num_switches": False, "num_skipped": False}


def _run_eagerly(reason: str) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """``torch.compiler.disable`` with a reason where this torch takes one."""
    if "reason" in inspect.signature(torch.compiler.disable).parameters:
        return functools.partial(torch.compiler.disable, reason=reason)
    return torch.compiler.disable  # pragma: no cover - older torch


class SwitchEMA:
    """Switch EMA of ``model``'s trainable parameters.

    Build it **before** the optimizer, DDP/FSDP wrapping, ``torch.compile`` or CUDA-graph
    capture: with ``flatten=True`` (default) the params are moved into one flat buffer per
    (device, dtype) and each ``param.data`` becomes a view of it, so one fused kernel covers a
    whole bucket. The ``Parameter`` objects stay the same, so optimizers built later (or
    earlier) keep working.

    Args:
        model: the module whose trainable params (``requires_grad``) are averaged.
        decay: EMA decay in [0, 1): ``ema <- decay * ema + (1 - decay) * param``; a tuple of K
            decays keeps K EMAs, updated in one pass that reads the params once (``index=``
            picks one in :meth:`switch`, :meth:`swapped`, :meth:`averaged_state_dict` and
            :meth:`as_module`; :meth:`epoch_end` and an int ``switch_every`` switch EMA 0).
        warmup: ``None``, ``"linear"``, ``"exp"``, ``"constant"`` (the SEMA authors' warmups:
            start at ``warmup_ratio * decay`` for ``warmup_steps`` steps), ``"power"``
            (``1 - (1 + t / inv_gamma) ** -power``, capped at ``decay``, as in timm, diffusers and
            ema-pytorch) or ``"inverse"`` (``min(decay, (1 + n) / (10 + n))``, torch_ema's and
            diffusers' default). See :class:`sema.DecaySchedule`.
        update_every: update the EMA on every K-th call of :meth:`update`, with decay
            ``decay ** K`` so the averaging horizon in steps stays the same (see
            ``compensate_update_every``).
        switch_every: ``"epoch"`` (switch in :meth:`epoch_end`), an int K (switch after every
            K-th :meth:`update` call, fused into that update), or ``None`` (a plain EMA).
        switch_start: switching starts after this many epochs (or steps for an int policy).
        switch_end: no switch after this many epochs (or steps); ``None`` never stops.
            A switch happens at count ``c`` (1-based) when ``switch_start < c <= switch_end``
            and ``c % K == 0``.
        buffers: ``"ignore"`` (buffers are not tracked), ``"copy"`` (the EMA keeps a copy of the
            model's buffers as of the last update) or ``"ema"`` (float buffers such as BatchNorm
            running stats are averaged too). Integer buffers (``num_batches_tracked``) are never
            averaged, only copied. Tracked buffers go into the model on a switch and inside
            :meth:`swapped`.
        ema_dtype: dtype of the EMA, ``torch.float32`` (default) or ``None`` (each param's dtype).
        flatten: ``False`` keeps params where they are (multi-tensor mode, e.g. for shards).
        backend: ``"auto"`` (``SEMA_BACKEND``, else the fastest available for the device) or a
            name from :func:`sema.available_backends`; an unavailable one raises.
        warmup_steps, warmup_ratio: for the ``linear``/``exp``/``constant`` warmups.
        inv_gamma, power: for the ``power`` warmup; min_decay: the floor of the ``power`` and
            ``inverse`` warmups (the others refuse it).
        skip_nonfinite: skip an update (and count it in ``num_skipped``) when any param is NaN or
            Inf, so a bad step does not spread into the EMA. Off by default: it reads every param
            once more and synchronises with the host once per update.
        update_after_step: the first N calls of :meth:`update` copy the params into the EMA;
            the warmup counts from the first averaging update (on the device).
        compensate_update_every: ``False`` fires ``update_every=K`` on calls 1, K+1, 2K+1, ...
            with the plain decay, as ema-pytorch, NeMo, mmengine and Lightning do.
        include, exclude: ``fnmatch`` patterns on param names picking the params to average.
        copy_only: patterns of tracked params whose EMA is a copy refreshed at every update.
        ema_device: ``None`` (the EMA lives beside the params) or ``"cpu"``: the EMA lives in host
            memory and none on the GPU; :meth:`update` returns at once and a worker thread
            updates the EMA with the cpp kernel (CUDA params: copied chunk by chunk through a
            pinned staging ring; CPU params: read directly). Call :meth:`attach` (or :meth:`wait`
            before writing the params) so the next optimizer step waits for the read. Flat
            buckets only.
        overlap: run the update on a side stream (CUDA params), overlapping the next forward and
            backward; :meth:`attach`/:meth:`wait` order the next write to the params after it. On
            CPU params the update runs synchronously. See docs/offload.md.
        offload_chunk_elements: the chunk of the offload pipeline, in param elements.
        offload_staging_chunks: how many staging buffers of one chunk each (:attr:`staging_bytes`):
            the copies run this many chunks ahead of the host update, so the params may be
            written once the update is that close to its end; enough to hold every bucket
            frees them as soon as the copies land, at the price of that much pinned memory.
            ``None``: 2 for CUDA params, 0 for CPU params (the worker reads them directly).
        offload_threads: at most this many CPU threads for the offload worker's updates (the
            training thread and data loaders keep the other cores); ``None``:
            ``torch.get_num_threads()``.

        Which arguments reproduce other EMA libraries: docs/migration.md.
    """

    def __init__(
        self,
        model: nn.Module,
        decay: float | Sequence[float] = 0.999,
        warmup: str | None = None,
        update_every: int = 1,
        switch_every: str | int | None = "epoch",
        switch_start: int = 0,
        switch_end: int | None = None,
        buffers: str = "ignore",
        ema_dtype: torch.dtype | None = torch.float32,
        flatten: bool = True,
        backend: str = "auto",
        *,
        warmup_steps: int = 0,
        warmup_ratio: float = 0.9,
        inv_gamma: float = 1.0,
        power: float = 2.0 / 3.0,
        min_decay: float = 0.0,
        skip_nonfinite: bool = False,
        update_after_step: int = 0,
        compensate_update_every: bool = True,
        include: Sequence[str] | str | None = None,
        exclude: Sequence[str] | str | None = None,
        copy_only: Sequence[str] | str | None = None,
        ema_device: str | torch.device | None = None,
        overlap: bool = False,
        offload_chunk_elements: int = OFFLOAD_CHUNK_ELEMENTS,
        offload_staging_chunks: int | None = None,
        offload_threads: int | None = None,
    ) -> None:
        # Every check runs before the model is touched: a bad argument leaves it as it was.
        if not isinstance(model, nn.Module):
            raise TypeError(f"SwitchEMA: model must be an nn.Module, got {type(model).__name__}")
        if isinstance(update_after_step, bool) or not isinstance(update_after_step, int) or update_after_step < 0:
            raise ValueError(f"SwitchEMA: update_after_step={update_after_step!r} must be a non-negative int")
        if not isinstance(compensate_update_every, bool):
            raise TypeError(
                f"SwitchEMA: compensate_update_every must be True or False, got {compensate_update_every!r}"
            )
        decays = _decays(decay)
        schedules = [
            DecaySchedule(
                d,
                warmup,
                warmup_steps,
                warmup_ratio,
                inv_gamma,
                power,
                min_decay,
                update_every,
                copy_updates=copy_updates_of(update_after_step, update_every, compensate_update_every),
                compensate=compensate_update_every,
                start_step=None if compensate_update_every else update_after_step,
            )
            for d in decays
        ]
        schedule = schedules[0]
        policy = SwitchPolicy(schedule, switch_every, switch_start, switch_end, skip_nonfinite)
        if buffers not in BUFFER_POLICIES:
            raise ValueError(f"SwitchEMA: buffers={buffers!r} is not one of {BUFFER_POLICIES}")
        if buffers == "ema" and len(decays) > 1:
            raise ValueError(
                "SwitchEMA: buffers='ema' with several decays is not supported (the buffers would need one average "
                "per decay); use buffers='copy' (each switch and swap puts the buffers as of the last update) "
                "or 'ignore'"
            )
        selection = ParamSelection(model, include, exclude, copy_only)
        named = selection.tracked
        if not named:
            raise ValueError(
                "SwitchEMA: the model has no trainable parameters (none with requires_grad=True"
                + (" among those include/exclude select" if include or exclude else "")
                + "); there is nothing to average"
            )
        bad = [f"{n} ({p.dtype})" for n, p in named if p.dtype not in (*ops.PARAM_DTYPES, torch.float64)]
        if bad:
            raise TypeError(
                f"SwitchEMA: params must be float32, bfloat16, float16 or float64; these are not: {', '.join(bad)}"
                + (
                    ". A complex param has no order-free average here: keep its real and imaginary parts as two "
                    "real params (torch.view_as_real)"
                    if any(p.is_complex() for _, p in named)
                    else ""
                )
            )
        bad = [n for n, p in named if p.is_sparse or p.layout != torch.strided]
        if bad:
            raise TypeError(f"SwitchEMA: sparse params are not supported: {', '.join(bad)}")
        bad = [n for n, p in named if p.device.type == "meta"]
        if bad:
            raise ValueError(
                f"SwitchEMA: params on the meta device have no values to average: {', '.join(bad)}. Materialize the "
                "model first (model.to_empty(device=...) and initialise it, or load its weights), then build SwitchEMA"
            )
        bad = [n for n, p in named if _overlaps_itself(local_tensor(p))]
        if bad:
            raise ValueError(
                f"SwitchEMA: params whose elements share memory (e.g. made with expand()) cannot be averaged "
                f"element by element: {', '.join(bad)}. Make them real tensors: "
                "module.name = nn.Parameter(param.detach().clone())"
            )
        for name, value in (("flatten", flatten), ("skip_nonfinite", skip_nonfinite), ("overlap", overlap)):
            if not isinstance(value, bool):
                raise TypeError(f"SwitchEMA: {name} must be True or False, got {value!r} ({type(value).__name__})")
        if ema_dtype is not None and not isinstance(ema_dtype, torch.dtype):
            raise TypeError(
                f"SwitchEMA: ema_dtype must be a torch.dtype or None, got {ema_dtype!r}; e.g. ema_dtype=torch.float32"
            )
        if not isinstance(backend, str):
            raise TypeError(f"SwitchEMA: backend must be a str such as 'auto', got {backend!r}")
        if ema_dtype is not None and ema_dtype != torch.float32:
            odd = sorted({str(p.dtype) for _, p in named if p.dtype not in (ema_dtype, torch.float64)})
            if odd:
                raise TypeError(
                    f"SwitchEMA: ema_dtype={ema_dtype} does not fit params of dtype {', '.join(odd)}; "
                    "use torch.float32 or None (each param's own dtype)"
                )
        # Memory shared between params (old-style ties stay tied in a bucket; a param over part of
        # another, or over a frozen param or a buffer, cannot be kept) and, where params stay in
        # place, layouts a kernel cannot address: refused here, before anything moves.
        tracked_ids = {id(p) for _, p in named}
        local = [(n, local_tensor(p)) for n, p in named]
        untracked = [(n, local_tensor(p)) for n, p in model.named_parameters() if id(p) not in tracked_ids]
        untracked += [(n, b) for n, b in model.named_buffers()]
        grouped = not flatten or any(is_dtensor(p) for _, p in named)
        check_aliasing(local, untracked, allow_ties=not grouped)
        if grouped:
            ops.check_dense(local, "SwitchEMA(flatten=False)" if not flatten else "SwitchEMA (sharded params)")
        offload_to = _ema_device(ema_device, offload_chunk_elements, grouped)
        if offload_threads is not None and (
            isinstance(offload_threads, bool) or not isinstance(offload_threads, int) or offload_threads < 1
        ):
            raise ValueError(f"SwitchEMA: offload_threads={offload_threads!r} must be None or a positive int")
        if offload_threads is not None and offload_to is None:
            raise ValueError(
                f"SwitchEMA: offload_threads={offload_threads!r} sets the offload worker's threads, and there is no "
                "worker without ema_device='cpu'; pass ema_device='cpu' too, or leave offload_threads=None"
            )
        param_devices = list(dict.fromkeys(device for device, _ in plan_buckets(named)))
        staging_chunks = staging_chunks_for(offload_staging_chunks, param_devices)
        resolved: dict[torch.device, str] = {}
        # a DTensor reports its local shard's device and dtype; an offloaded EMA is updated on the host
        for device in param_devices if offload_to is None else [offload_to]:
            resolved[device] = ops.resolve_backend(backend, device)  # raises with the reason
        lacking = sorted({name for name in resolved.values() if len(decays) > 1 and not ops.has_update_k(name)})
        if lacking:
            raise ValueError(
                f"SwitchEMA: decay={tuple(decays)} keeps several EMAs, which needs the fused K-EMA op; the "
                f"{', '.join(lacking)} backend has none. Pick a backend that has it (backend='torch' always does)"
            )

        self.model = model
        self.schedule = schedule  # EMA 0's: the one epoch_end() and int switch_every switch
        self.schedules = schedules
        self.policy = policy
        self.ema_dtype = ema_dtype
        self.flatten = bool(flatten)
        self.requested_backend = backend
        self._swapped_active = False
        # Everything that can fail without moving a param comes first: building the storage is
        # the one step that re-points params, and it undoes itself if it fails.
        self.tracked_buffers = TrackedBuffers(model, buffers, ema_dtype)
        self._slots = ModelSlots(model, named)
        self.selection = selection
        self.storage = EMAStorage(
            named,
            ema_dtype,
            self.flatten,
            resolved,
            copy_only=selection.copy_only,
            num_emas=len(schedules),
            ema_device=offload_to,
            keep_originals=offload_to is not None,  # until the offload engine is built
        )
        self._final_weights: dict[tuple[torch.device, torch.dtype], Tensor] = {}
        self._fp64 = self.storage.has_fp64
        # One step counter per device that computes a weight: where the kernels run (the params'
        # devices, or with offload the host: the worker's weights, no device-to-host copy) and,
        # with offload, the params' devices where tracked buffers need a weight there.
        step_devices = list(resolved)
        if offload_to is not None and self.tracked_buffers.buffers:
            step_devices += param_devices
        self._steps = {
            device: torch.zeros((), dtype=torch.int64, device=device) for device in dict.fromkeys(step_devices)
        }
        for step in self._steps.values():
            for schedule in self.schedules:  # cached now, not inside a traced update
                schedule.weight(step, known_at_least=2**62)
                schedule.one(step.device)
            self._weights(step, 2**62)
            if self._fp64:
                self._weights(step, 2**62, torch.float64)
                for schedule in self.schedules:
                    schedule.one(step.device, torch.float64)
        self._on_cuda = any(device.type == "cuda" for device in param_devices)
        # A lower bound of the device step, counted by eager updates only (graph replays and
        # compiled calls add to the device step without the host seeing them): once it passes
        # schedule.settled_after, the weight is a cached tensor.
        self._module: nn.Module | None = None
        self._updates_seen = 0
        self._traced_updates = False  # whether _updates_seen may miss some (compiled, captured)
        self._horizon = HorizonCheck()
        self._placement = PlacementGuard("SwitchEMA", self.storage, self._slots)
        self._engine: OffloadEngine | OverlapEngine | None = None
        if offload_to is not None:
            weights_of = weakref.WeakMethod(self._host_weights)  # the worker must not keep this SwitchEMA alive

            def host_weights(step: Tensor, known: int) -> tuple[Tensor, Tensor | None]:
                return weights_of()(step, known)

            try:  # pinned staging, a thread: if either fails, the params go back to their old memory
                self._engine = OffloadEngine(
                    self.storage,
                    self._steps[offload_to],
                    host_weights,
                    offload_chunk_elements,
                    staging_chunks,
                    offload_threads,
                )
            except BaseException:
                self.storage.restore_originals()
                raise
            self.storage.forget_originals()
            # The step counters update() advances itself: the params' devices' (tracked buffers).
            self._device_steps = tuple(step for step in self._steps.values() if step is not self._engine.step)
        elif overlap and self._on_cuda:
            self._engine = OverlapEngine(self.storage)
        if self._engine is not None:
            weakref.finalize(self, self._engine.close)
        self._offload_every_call = isinstance(self._engine, OffloadEngine) and not policy.counts_on_host

    def __deepcopy__(self, memo: dict) -> SwitchEMA:
        raise TypeError(
            "SwitchEMA cannot be deep-copied: a copied model's params get storages of their own, outside any "
            "bucket. Copy the model, build a SwitchEMA on the copy and load the state: "
            "new = SwitchEMA(copy.deepcopy(model), ...); new.load_state_dict(ema.state_dict())"
        )

    def __reduce_ex__(self, protocol: object) -> object:
        raise TypeError(
            "SwitchEMA cannot be pickled: save ema.state_dict() (torch.save) and load it into a SwitchEMA built on "
            "the model with ema.load_state_dict()"
        )

    # --- properties --------------------------------------------------------------------------

    @property
    def decay(self) -> float:
        """The decay of EMA 0 (see :attr:`decays` for all)."""
        return self.schedule.decay

    @property
    def decays(self) -> tuple[float, ...]:
        """The decay of each EMA, in index order."""
        return tuple(s.decay for s in self.schedules)

    @property
    def step(self) -> int:
        """Number of EMA updates performed (reads the device counter: a host sync; with
        ``ema_device="cpu"``, waits for the pending update, which the worker counts)."""
        if isinstance(self._engine, OffloadEngine):
            self._engine.wait_idle()
        return int(next(iter(self._steps.values())).item())

    @property
    def epochs(self) -> int:
        """Number of :meth:`epoch_end` calls so far."""
        return self.policy.epochs

    @property
    def buckets(self) -> list[FlatBucket]:
        return self.storage.buckets

    @property
    def tensor_groups(self) -> list[TensorGroup]:
        return self.storage.tensor_groups

    @property
    def backends(self) -> dict[torch.device, str]:
        return self.storage.backends

    @property
    def switch_every(self) -> str | int | None:
        return self.policy.switch_every

    @property
    def switch_start(self) -> int:
        return self.policy.switch_start

    @property
    def switch_end(self) -> int | None:
        return self.policy.switch_end

    @property
    def skip_nonfinite(self) -> bool:
        return self.policy.skip_nonfinite

    @property
    def buffer_policy(self) -> str:
        return self.tracked_buffers.policy

    @property
    def num_switches(self) -> int:
        return self.policy.num_switches

    @property
    def num_skipped(self) -> int:
        return self.policy.num_skipped

    @property
    def ema_device(self) -> torch.device | None:
        """Where the EMA lives: ``torch.device("cpu")`` when offloaded, else ``None`` (beside the params)."""
        return self.storage.ema_device

    @property
    def staging_bytes(self) -> int:
        """Host memory of the offload pipeline's staging ring (pinned for CUDA params), in bytes."""
        return self._engine.staging_bytes if self._engine is not None else 0

    def as_module(self, index: int = 0) -> nn.Module:
        """An ``nn.Module`` of the model's structure whose params are views of EMA ``index``
        (no copy of the weights; it follows every update), in eval mode with
        ``requires_grad=False``; see :mod:`sema.module_view`. Each call builds a new one; use
        :attr:`module` for a cached one."""
        self._check_index("as_module", index)
        self.synchronize()
        return build_module_view(self, index)

    @property
    def module(self) -> nn.Module:
        """``as_module(0)``, built on first use and cached: the EMA as a callable teacher network."""
        if self._module is None:
            self._module = self.as_module(0)
        else:
            self.synchronize()
        return self._module

    # --- the hot path ------------------------------------------------------------------------

    def update(self, switch: bool = False) -> None:
        """Fold the current params into the EMA: one fused pass per bucket.

        Call it after every ``optimizer.step()``. With ``switch=True`` (or when an int
        ``switch_every`` says so) the switch ``param <- ema`` is fused into the same pass.
        The decay comes from a device step counter: no host sync (unless ``skip_nonfinite``).
        """
        if type(switch) is not bool:
            raise TypeError(f"SwitchEMA.update: switch must be True or False, got {switch!r}")
        if self._engine is not None:
            if torch.compiler.is_compiling():
                self._update_with_engine_eagerly(switch)  # a graph break
            else:
                self._update_with_engine(switch)  # without the wrapper's cost on the hot path
            return
        if self.policy.counts_on_host:
            self._update_counted(switch)
            return
        traced = torch.compiler.is_compiling() or self._capturing()
        if not traced:
            self._check_placement("update", hot=True)
        self._update_now(switch, traced)

    @_run_eagerly(
        "SwitchEMA.update counts calls on the host with update_every > 1, an int switch_every or "
        "skip_nonfinite=True, which a compiled graph would not replay: compile with update_every=1, "
        "switch_every='epoch' or None and skip_nonfinite=False, or leave update() eager"
    )
    def _update_counted(self, switch: bool) -> None:
        """update() for the policies that count calls on the host: always eager (under
        torch.compile a graph break runs it eagerly, and fullgraph=True raises), never captured."""
        if self._capturing():
            raise RuntimeError(
                "SwitchEMA.update inside CUDA-graph capture with update_every > 1, an int switch_every or "
                "skip_nonfinite=True: these decide on the host, so a graph would replay the decision made at "
                "capture (an empty graph, or a switch on every replay). Capture with update_every=1, "
                "switch_every='epoch' or None and skip_nonfinite=False, or call update() outside the graph"
            )
        self._check_placement("update", hot=True)
        averages, switch = self.policy.count_call(switch)
        if not averages or (self.policy.skip_nonfinite and not self.storage.all_finite()):
            if averages:
                self.policy.num_skipped += 1
            if switch:
                self.switch()
            return
        self._update_now(switch, traced=False)

    @_run_eagerly(
        "SwitchEMA.update with ema_device='cpu' or overlap=True hands the update to a worker thread or a "
        "side stream, which a compiled graph cannot hold: leave update() eager (it is one call per step)"
    )
    def _update_with_engine_eagerly(self, switch: bool) -> None:
        self._update_with_engine(switch)

    def _update_with_engine(self, switch: bool) -> None:
        if self._capturing():
            if isinstance(self._engine, OffloadEngine):
                raise RuntimeError(
                    "SwitchEMA.update inside CUDA-graph capture with ema_device='cpu': the offload worker runs "
                    "on the host, which a graph cannot replay. Call update() outside the graph"
                )
            if self.policy.counts_on_host:
                self._update_counted(switch)  # refuses capture, as without overlap
                return
            self._update_now(switch, traced=True, engine=False)  # in a graph: the graph orders it
            return
        if self._offload_every_call:  # the shortest path: update() is on the training thread's step
            self._check_placement("update", hot=True)
            self._update_offloaded(switch)  # its first wait raises a worker error
            return
        self._engine.check()
        if self.policy.counts_on_host:
            self._update_counted(switch)
            return
        self._check_placement("update", hot=True)
        self._update_now(switch, traced=False)

    def _update_now(self, switch: bool, traced: bool, engine: bool = True) -> None:
        if engine and isinstance(self._engine, OffloadEngine):
            self._update_offloaded(switch)
            return
        known = None if traced else self._updates_seen
        weights = {device: self._weights(step, known) for device, step in self._steps.items()}
        weights64 = None
        if self._fp64:  # fp64 params: the weight in fp64 too
            weights64 = {device: self._weights(step, known, torch.float64) for device, step in self._steps.items()}
        if engine and self._engine is not None:
            self._engine.update(weights, weights64, switch)  # first: if it fails, nothing is counted
        else:
            self.storage.update_(weights, switch, weights64=weights64)
        self.tracked_buffers.update_(weights)
        for step in self._steps.values():
            step.add_(1)
        if traced:
            self._traced_updates = True
        else:
            self._updates_seen += 1
        if switch:
            self._after_switch()

    def _update_offloaded(self, switch: bool) -> None:
        """update() with ema_device='cpu': the worker computes the weights from the host step
        counter and counts the update there, so no torch op runs on the training thread (each one
        costs tens of µs with the caches the worker has just streamed through). The hand-over
        comes last: from then on the worker's threads take the host's cores."""
        engine = self._engine
        engine.finish()  # at most one update in flight; a worker error surfaces here, before anything counts
        known = self._updates_seen
        device_steps = self._device_steps
        if device_steps or self.tracked_buffers.buffers:  # read now, beside the params, with their weights
            self.tracked_buffers.update_({device: self._weights(step, known) for device, step in self._steps.items()})
            for step in device_steps:
                step.add_(1)
        self._updates_seen += 1
        try:
            engine.hand_over(known)
        except BaseException:
            # Interrupted before the job was queued: the update is not counted (tracked buffers,
            # updated above by a lerp that cannot be undone, keep it).
            for step in device_steps:
                step.sub_(1)
            self._updates_seen -= 1
            raise
        if switch:
            engine.switch_in()
            self._after_switch()

    def _report_newly_trainable(self) -> None:
        """Warn once about selected params that were frozen at construction and train now: a
        check on the rare calls (switch, state_dict), never per update."""
        names = self.selection.newly_trainable()
        if names:
            warnings.warn(
                f"SwitchEMA: {len(names)} param(s) were frozen (requires_grad=False) when SwitchEMA was built and "
                f"train now, but are not averaged, since the buckets were built without them: {', '.join(names[:8])}"
                + (f" and {len(names) - 8} more" if len(names) > 8 else "")
                + ". Build SwitchEMA after unfreezing them (load its state with load_state_dict where it has one), "
                "or build it while they are trainable and freeze them afterwards (a frozen param's EMA then just "
                "stays equal to it).",
                UntrackedParamWarning,
                stacklevel=3,
            )

    def _host_weights(self, step: Tensor, known: int) -> tuple[Tensor, Tensor | None]:
        """The offload worker's weights (float32, and float64 for fp64 params) from the host step."""
        return self._weights(step, known), self._weights(step, known, torch.float64) if self._fp64 else None

    def _weights(self, step: Tensor, known: int | None, dtype: torch.dtype = torch.float32) -> Tensor:
        """EMA 0's weight (0-d), or with K decays a (K,) tensor of the K weights: cached once every
        schedule has settled, else stacked on the device (one launch more)."""
        if len(self.schedules) == 1:
            return self.schedule.weight(step, known, dtype)
        settled = max(s.copy_updates + s.settled_after for s in self.schedules)
        if known is not None and known >= settled:
            w = self._final_weights.get((step.device, dtype))
            if w is None:
                w = torch.stack([s.weight(step, known, dtype) for s in self.schedules])
                self._final_weights[(step.device, dtype)] = w
            return w
        return torch.stack([s.weight(step, known, dtype) for s in self.schedules])

    def _check_index(self, where: str, index: int) -> None:
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(self.schedules):
            raise IndexError(
                f"SwitchEMA.{where}: index={index!r}, but this SwitchEMA keeps {len(self.schedules)} EMA(s) "
                f"(decays {self.decays}); use 0..{len(self.schedules) - 1}"
            )

    def _capturing(self) -> bool:
        return self._on_cuda and torch.cuda.is_current_stream_capturing()

    # --- switching ---------------------------------------------------------------------------

    def epoch_end(self) -> bool:
        """Mark the end of an epoch; switch when ``switch_every="epoch"`` and the
        ``switch_start``/``switch_end`` window allows. Returns whether it switched."""
        self._check_placement("epoch_end")
        self._report_newly_trainable()
        if self.policy.end_epoch():
            if self.num_switches == 0:
                self._horizon.first_switch(self)
            self.switch()
            return True
        self._horizon.poll()
        return False

    def switch(self, index: int = 0) -> None:
        """``param <- ema`` now (cast to each param's dtype, round to nearest even), for every
        bucket, plus tracked buffers; ``index`` picks the EMA where there are several. The EMA
        itself is not changed."""
        self._check_index("switch", index)
        self._check_placement("switch")
        self._report_newly_trainable()
        self.synchronize()
        wait_for_readers(self.storage, self._engine)  # another SwitchEMA's update of these params
        self.storage.switch_(index)
        self._after_switch()

    def _after_switch(self) -> None:
        self.tracked_buffers.switch_()
        if not torch.compiler.is_compiling():
            self.policy.num_switches += 1

    @contextlib.contextmanager
    def swapped(self, index: int = 0) -> Iterator[nn.Module]:
        """Inside the block the model holds the EMA weights; on exit (even through an exception)
        params and EMA are restored bit for bit. Do not train inside the block.

        Memory: none extra for equal dtypes (an in-place exchange) and for fp32 EMA with bf16
        params (the lossless packing of DESIGN.md: the model sees the EMA rounded half away
        from zero). fp32 EMA with fp16 params goes through a scratch copy of the params:
        2 bytes per element, freed on exit. Tracked buffers are saved by copy (small).

        Writes to the params inside the block are refused or reported: an ``optimizer.step()``
        over these params raises before it writes anything, and any other in-place write (seen by
        the params' version counters) makes the exit raise :class:`SwappedWriteError`, which says
        what each tensor then holds and how to recover.
        """
        if self._swapped_active:
            raise RuntimeError("SwitchEMA.swapped() is already active; it cannot be nested")
        self._check_index("swapped", index)
        self._check_placement("swapped")
        self.synchronize()
        wait_for_readers(self.storage, self._engine)
        counters = self.storage.version_counters()
        undo: list[Callable[[], None]] = []
        versions: list[int] | None = None
        guard = register_optimizer_step_pre_hook(self._refuse_step_inside_swapped)
        held = self.storage.param_storages()
        try:
            self.storage.swap_in(undo, index)
            self.tracked_buffers.swap_in(undo)
            versions = [t._version for _, t, _ in counters]
            self._swapped_active = True
            ACTIVE_SWAPS.update(dict.fromkeys(held, self))
            yield self.model
        finally:
            for key in held:
                ACTIVE_SWAPS.pop(key, None)
            self._swapped_active = False
            guard.remove()
            written = [] if versions is None else _written(counters, versions)
            for action in reversed(undo):
                action()
            if written:
                raise SwappedWriteError(_describe_swapped_writes(written))

    def _refuse_step_inside_swapped(self, optimizer: torch.optim.Optimizer, args: object, kwargs: object) -> None:
        if not self._swapped_active:
            return
        ours = {id(p) for _, p, _ in self.storage.named_emas()}
        if any(id(p) in ours for group in optimizer.param_groups for p in group["params"]):
            raise RuntimeError(
                "optimizer.step() inside SwitchEMA.swapped(): the model holds the EMA weights there, so the step "
                "would train the EMA and the live weights would lose it. Nothing was written. Step after the "
                "with-block (swapped() is for evaluation); to train from the EMA weights, call ema.switch()"
            )

    # --- ordering with an update in flight (offload, overlap) --------------------------------

    def attach(self, optimizer: torch.optim.Optimizer) -> torch.utils.hooks.RemovableHandle:
        """Make every ``optimizer.step()`` first :meth:`wait` for the pending update to have read
        the params (a pre-step hook; returns its handle). Needed with ``ema_device="cpu"`` and
        ``overlap=True``, harmless otherwise."""
        # Wrappers that subclass Optimizer without its state (accelerate's AcceleratedOptimizer) step
        # the optimizer they hold: the hook goes there.
        inner = optimizer
        while not hasattr(inner, "_optimizer_step_pre_hooks") and isinstance(
            getattr(inner, "optimizer", None), torch.optim.Optimizer
        ):
            inner = inner.optimizer
        if not isinstance(inner, torch.optim.Optimizer) or not hasattr(inner, "_optimizer_step_pre_hooks"):
            raise TypeError(f"SwitchEMA.attach: expected a torch.optim.Optimizer, got {type(optimizer).__name__}")
        return inner.register_step_pre_hook(_WaitBeforeStep(self))

    def wait(self) -> None:
        """Return once the pending update has read the params, so they may be written: with
        offload, a host wait for the last staging copy to be issued (CPU params: to be done),
        then the current CUDA stream waits for it; with overlap, the current stream waits for the
        side stream (no host sync). A no-op for a synchronous update. Raises a worker error."""
        if self._engine is not None:
            self._engine.params_read()

    def synchronize(self) -> None:
        """Return once every pending update has finished, so the EMA may be read: with offload a
        host wait; with overlap the current stream waits for the side stream. Every method that
        reads or writes the EMA (``state_dict``, ``switch``, ``swapped``, ``module``, ...) calls it."""
        if self._engine is not None:
            self._engine.finish()

    # --- placement checks --------------------------------------------------------------------

    def _check_placement(self, where: str, hot: bool = False) -> None:
        if self._swapped_active:
            raise RuntimeError(
                f"SwitchEMA.{where}() called inside swapped(): the model holds the EMA there; "
                "call it after the with-block"
            )
        self._placement.check(where, hot)

    # --- state -------------------------------------------------------------------------------

    def _config(self) -> dict[str, object]:
        return {
            **self.schedule.config(),
            **({"decays": list(self.decays)} if len(self.schedules) > 1 else {}),
            **self.policy.config(),
            "buffers": self.buffer_policy,
            "ema_dtype": None if self.ema_dtype is None else str(self.ema_dtype),
            "skip_nonfinite": self.skip_nonfinite,
        }

    def state_dict(self) -> dict[str, object]:
        """The EMA by param name (one storage per tensor, safe for ``torch.save`` and
        safetensors), the tracked buffers, the step/call/epoch counters and the policy."""
        if self._swapped_active:
            raise RuntimeError("SwitchEMA.state_dict() inside swapped(): the EMA buffers hold the swapped state")
        self._report_newly_trainable()
        self._horizon.poll()
        self.synchronize()
        step = self.step
        return {
            "format": STATE_FORMAT,
            "version": STATE_VERSION,
            "step": step,
            # Calls are counted on the host only where a policy needs them (never under compile or
            # CUDA graphs); elsewhere every call is an update, so the device step is the count.
            "calls": self.policy.calls if self.policy.counts_on_host else step,
            "epochs": self.policy.epochs,
            "num_switches": self.num_switches,
            "num_skipped": self.num_skipped,
            "config": self._config(),
            "ema": self._ema_state(0)
            if len(self.schedules) == 1
            else [self._ema_state(k) for k in range(len(self.schedules))],
            "buffers": {n: e.detach().clone() for n, e in self.tracked_buffers.named().items()},
        }

    def _ema_state(self, index: int) -> dict[str, Tensor]:
        return {name: as_param_layout(p, e.detach().clone()) for name, p, e in self.storage.named_emas(index)}

    def load_state_dict(self, state: dict[str, object]) -> None:
        """Load what :meth:`state_dict` returned. Everything is checked before anything is
        written; a state of another model raises listing the mismatched names, shapes, dtypes."""
        if self._swapped_active:
            raise RuntimeError("SwitchEMA.load_state_dict() inside swapped(); call it after the with-block")
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise ValueError("SwitchEMA.load_state_dict: not a SwitchEMA state dict (no format='sema.SwitchEMA')")
        if state.get("version") != STATE_VERSION:
            raise ValueError(
                f"SwitchEMA.load_state_dict: state version {state.get('version')!r}, this sema reads {STATE_VERSION}"
            )
        problems: list[str] = []
        K = len(self.schedules)
        saved = state.get("ema", {})
        if K == 1 and isinstance(saved, list):
            problems.append(f"ema: the state holds {len(saved)} EMAs (several decays); this SwitchEMA keeps one")
            saved_by_index = [{}]
        elif K > 1 and not (isinstance(saved, list) and len(saved) == K):
            count = len(saved) if isinstance(saved, list) else 1
            problems.append(f"ema: the state holds {count} EMA(s); this SwitchEMA keeps {K} (decays {self.decays})")
            saved_by_index = [{}] * K
        else:
            saved_by_index = [saved] if K == 1 else saved
        named = list(self.storage.named_emas())
        ours = [{name: e for name, _, e in self.storage.named_emas(k)} for k in range(K)]
        presented = {name: as_param_layout(p, e) for name, p, e in named}  # global shapes
        if not problems:  # the EMA count matches: compare each EMA's entries
            for k in range(K):
                _compare("param" if K == 1 else f"EMA {k} param", presented, saved_by_index[k], problems)
        for name, p, _ in named:
            first = saved_by_index[0]
            value = first.get(name) if isinstance(first, dict) else None
            if isinstance(value, Tensor) and is_dtensor(p) != is_dtensor(value):
                problems.append(
                    f"param {name}: {'a DTensor' if is_dtensor(value) else 'a plain tensor'} in the state, "
                    f"{'a DTensor shard' if is_dtensor(p) else 'a plain tensor'} here (save and load sharded "
                    "states with torch.distributed.checkpoint on the same layout)"
                )
            elif is_dtensor(p) and isinstance(value, Tensor) and value.placements != p.placements:
                problems.append(f"param {name}: placements {value.placements} in the state, {p.placements} here")
        buffers = self.tracked_buffers.named()
        _compare("buffer", buffers, state.get("buffers", {}), problems)
        counters = {}
        for key, required in COUNTERS.items():
            value = state.get(key, None if required else 0)
            if isinstance(value, Tensor) and value.dim() == 0 and not value.is_floating_point():
                value = int(value)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                problems.append(
                    f"counter {key!r}: {'missing' if key not in state else repr(value)}; "
                    "a state from SwitchEMA.state_dict() holds a non-negative int there"
                )
            counters[key] = value
        if not isinstance(state.get("config", {}), dict):
            problems.append("config: not a dict")
        if problems:
            raise ValueError(
                "SwitchEMA.load_state_dict: the state does not match this model:\n  " + "\n  ".join(problems)
            )
        if self._engine is not None:  # the pending update finishes first; a failed one is overwritten now
            self._engine.clear_error()
            self._engine.finish()
        saved_config = state.get("config", {})
        diff = {k: (v, saved_config.get(k)) for k, v in self._config().items() if saved_config.get(k) != v}
        if diff:
            shown = ", ".join(f"{k}: now {a!r}, saved {b!r}" for k, (a, b) in diff.items())
            warnings.warn(
                f"SwitchEMA.load_state_dict: policy differs from the saved one ({shown}); keeping the current one",
                stacklevel=2,
            )
        with torch.no_grad():
            for k in range(K):
                for name, e in ours[k].items():
                    e.copy_(local_tensor(saved_by_index[k][name]))
            for name, e in buffers.items():
                e.copy_(state["buffers"][name])
            for step in self._steps.values():
                step.fill_(counters["step"])
        self._updates_seen = counters["step"]
        self.policy.calls = counters["calls"]
        self.policy.epochs = counters["epochs"]
        self.policy.num_switches = counters["num_switches"]
        self.policy.num_skipped = counters["num_skipped"]

    def averaged_state_dict(self, full: bool = False, index: int = 0) -> dict[str, Tensor]:
        """A ``model.state_dict()``-shaped dict holding the EMA weights (cast to each param's
        dtype) and the tracked buffers, each tensor with its own storage: it loads into a fresh
        model with ``model.load_state_dict`` and saves with ``torch.save`` or safetensors.

        Sharded (FSDP2) params give DTensors with the params' placements, as the model's own
        ``state_dict()`` does. ``full=True`` gathers them: every rank must call it (it is a
        collective), rank 0 gets full tensors and the other ranks an empty dict.
        """
        if self._swapped_active:
            raise RuntimeError("SwitchEMA.averaged_state_dict() inside swapped(); call it after the with-block")
        self._check_index("averaged_state_dict", index)
        self.synchronize()
        ema_of = {id(p): (p, e) for _, p, e in self.storage.named_emas(index)}
        buffer_of = {id(b): e for b, e in zip(self.tracked_buffers.buffers, self.tracked_buffers.emas, strict=True)}
        # An offloaded EMA gives every tensor on the host (a copy of the model on the GPU is what
        # offloading avoids).
        to = {"device": "cpu"} if self.ema_device is not None else {}
        out = {k: v.detach().to(**to, copy=True) for k, v in self.model.state_dict().items()}
        for name, p in self.model.named_parameters(remove_duplicate=False):
            if id(p) in ema_of and name in out:
                param, e = ema_of[id(p)]
                out[name] = as_param_layout(param, e.detach().to(p.dtype, copy=True))
        for name, b in self.model.named_buffers(remove_duplicate=False):
            if id(b) in buffer_of and name in out:
                out[name] = buffer_of[id(b)].detach().to(dtype=b.dtype, **to, copy=True)
        if full:
            out = {k: v.full_tensor() if is_dtensor(v) else v for k, v in out.items()}
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                if torch.distributed.get_rank() != 0:
                    return {}
        return out

    def reset(self) -> None:
        """Restart the average from the current weights: EMA <- params (and tracked buffers),
        step counter back to 0 (warmups start over). With DDP, call it after wrapping the model,
        which broadcasts rank 0's weights, so every rank's EMA starts from the same values."""
        self._check_placement("reset")
        if self._engine is not None:
            self._engine.clear_error()
            self._engine.finish()
        self.storage.copy_params_to_ema_()
        self.tracked_buffers.copy_model_to_ema_()
        with torch.no_grad():
            for step in self._steps.values():
                step.zero_()
        self._updates_seen = 0
        self.policy.calls = 0


def _compare(kind: str, ours: dict[str, Tensor], theirs: object, problems: list[str]) -> None:
    if not isinstance(theirs, dict):
        problems.append(f"{kind} entries are missing")
        return
    for name in ours.keys() - theirs.keys():
        problems.append(f"missing {kind} {name}")
    for name in theirs.keys() - ours.keys():
        problems.append(f"unexpected {kind} {name}")
    for name in ours.keys() & theirs.keys():
        a, b = ours[name], theirs[name]
        if not isinstance(b, Tensor):
            problems.append(f"{kind} {name}: not a tensor")
        elif a.shape != b.shape:
            problems.append(f"{kind} {name}: shape {tuple(b.shape)} in the state, {tuple(a.shape)} here")
        elif a.dtype != b.dtype:
            problems.append(f"{kind} {name}: dtype {b.dtype} in the state, {a.dtype} here")


class SwappedWriteError(RuntimeError):
    """Params were written inside ``SwitchEMA.swapped()``: the message says what each tensor
    holds after the exit and how to recover."""


def _written(counters: list[tuple[str, Tensor, bool]], versions: list[int]) -> list[tuple[str, bool]]:
    return [
        (name, ema_takes_writes)
        for (name, t, ema_takes_writes), v in zip(counters, versions, strict=True)
        if t._version != v
    ]


def _describe_swapped_writes(written: list[tuple[str, bool]]) -> str:
    into_ema = [n for n, takes in written if takes]
    dropped = [n for n, takes in written if not takes]

    def shown(names: list[str]) -> str:
        return ", ".join(names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")

    lines = [
        f"SwitchEMA.swapped(): {len(written)} param(s) were written inside the block, where the model held the "
        "EMA weights (an optimizer step or an in-place write; swapped() is for evaluation only).",
        "The live params are back as they were before the block: the writes are not in the model.",
    ]
    if into_ema:
        lines.append(
            f"The EMA of {shown(into_ema)} now holds the written weights (those slots were exchanged, not copied): "
            "it is no longer the average. Recover with ema.load_state_dict() of your last ema.state_dict(), or "
            "restart the average from the live weights with ema.reset()."
        )
    if dropped:
        lines.append(f"The EMA of {shown(dropped)} is unchanged (restored from a scratch copy); the writes are lost.")
    lines.append("Train after the with-block; to continue training from the EMA weights, call ema.switch().")
    return "\n".join(lines)


def _overlaps_itself(t: Tensor) -> bool:
    """Whether two elements of ``t`` share memory (a stride-0 or otherwise overlapping layout)."""
    expected = 1
    for size, stride in sorted(zip(t.shape, t.stride(), strict=True), key=lambda s: s[1]):
        if size == 1:
            continue
        if stride < expected:
            return True
        expected = stride * size
    return False


class UntrackedParamWarning(UserWarning):
    """A param that was frozen when ``SwitchEMA`` was built trains now and is not averaged."""


class SwitchHorizonWarning(UserWarning):
    """The EMA spans an epoch or more, where the project's study found that switching hurts.
    Silence it with ``warnings.filterwarnings("ignore", category=sema.SwitchHorizonWarning)``."""


# bench/effectiveness: with updates per epoch x (1 - decay) <= 0.3 (the EMA spans about 3 epochs
# or more), SEMA's switch pulled training back to stale weights, down to -4.5 points.
HORIZON_THRESHOLD = 0.3


class HorizonCheck:
    """At the first switch, compares the EMA's horizon with the epoch length, from the device step
    counter without an extra sync: exact on the host where every update was eager, read directly
    on a CPU, otherwise copied to the host asynchronously and judged at a later rare call."""

    def __init__(self) -> None:
        self.done = False
        self._pending: tuple[Tensor, object, SwitchEMA] | None = None

    def first_switch(self, ema: SwitchEMA) -> None:
        if self.done or self._pending is not None:
            return
        step = next(iter(ema._steps.values()))
        if not ema._traced_updates:
            self._judge(ema, ema._updates_seen)
        elif step.device.type != "cuda":
            self._judge(ema, int(step))
        else:
            host = torch.empty((), dtype=torch.int64, pin_memory=True)
            host.copy_(step, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            self._pending = (host, event, ema)

    def poll(self) -> None:
        if self._pending is not None and self._pending[1].query():
            host, _, ema = self._pending
            self._pending = None
            self._judge(ema, int(host))

    def _judge(self, ema: SwitchEMA, updates: int) -> None:
        self.done = True
        epochs = max(ema.policy.epochs, 1)
        schedule = ema.schedule
        per_update = schedule.decay ** (schedule.update_every if schedule.compensate else 1)
        per_epoch = (updates - schedule.copy_updates) / epochs
        measure = per_epoch * (1.0 - per_update)
        if per_epoch <= 0 or measure > HORIZON_THRESHOLD:
            return
        suggestion = 1.0 - HORIZON_THRESHOLD / per_epoch if per_epoch > HORIZON_THRESHOLD else 0.0
        warnings.warn(
            f"SwitchEMA: the EMA spans about {1.0 / measure:.1f} epochs ({per_epoch:.0f} updates per epoch x "
            f"(1 - {per_update:.6g}) = {measure:.3g} <= {HORIZON_THRESHOLD}). The project's study "
            "(bench/effectiveness) found that switching such an EMA into the model hurts (down to -4.5 points): it "
            "pulls training back to weights that are too old. Use a smaller decay (below "
            f"{suggestion:.4g} for this epoch length) or switch_every=None for a plain EMA. Silence with "
            "warnings.filterwarnings('ignore', category=sema.SwitchHorizonWarning).",
            SwitchHorizonWarning,
            stacklevel=4,
        )


class _WaitBeforeStep:
    """The pre-step hook of :meth:`SwitchEMA.attach` (holds the SwitchEMA weakly: an optimizer
    outliving it does not keep it alive)."""

    def __init__(self, ema: SwitchEMA) -> None:
        self._ema = weakref.ref(ema)

    def __call__(self, optimizer: torch.optim.Optimizer, args: object, kwargs: object) -> None:
        ema = self._ema()
        if ema is not None:
            ema.wait()


def _ema_device(ema_device: object, chunk_elements: object, grouped: bool) -> torch.device | None:
    """The device of an offloaded EMA (the host), or None; checks the offload arguments."""
    if isinstance(chunk_elements, bool) or not isinstance(chunk_elements, int) or chunk_elements < 1:
        raise ValueError(f"SwitchEMA: offload_chunk_elements={chunk_elements!r} must be a positive int")
    if ema_device is None:
        return None
    try:
        device = torch.device(ema_device)
    except (RuntimeError, TypeError):
        raise ValueError(f"SwitchEMA: ema_device={ema_device!r} is not a device; use None or 'cpu'") from None
    if device.type != "cpu":
        raise ValueError(
            f"SwitchEMA: ema_device={ema_device!r}: the EMA can be offloaded to the host only (ema_device='cpu'); "
            "None keeps it beside the params"
        )
    if grouped:
        raise ValueError(
            "SwitchEMA: ema_device='cpu' works on flat buckets; with flatten=False or sharded (DTensor) params "
            "the EMA stays beside the params (ema_device=None)"
        )
    return device


def _decays(decay: object) -> list[float]:
    """``decay`` as a list: a float gives one EMA, a tuple or list of floats one EMA per decay."""
    if isinstance(decay, (list, tuple)):
        if not decay:
            raise ValueError("SwitchEMA: decay=() holds no decay; pass a float or a tuple of floats")
        return list(decay)
    return [decay]

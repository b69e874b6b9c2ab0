"""``SwitchEMA``: an EMA of a model's weights kept in flat buckets, switched into the model.

SEMA (Li et al., arXiv 2402.09240) = the usual EMA of the weights, plus a periodic *switch*
that overwrites the live weights with the EMA; training then goes on from there. The EMA is
never reset by a switch, and the optimizer state is never touched.
"""

from __future__ import annotations

import contextlib
import operator
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from sema import ops
from sema.buckets import BucketMovedError, FlatBucket, build_bucket, plan_buckets
from sema.schedules import DecaySchedule

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # a torch built without distributed
    DTensor = None

STATE_FORMAT = "sema.SwitchEMA"
STATE_VERSION = 1
BUFFER_POLICIES = ("ignore", "copy", "ema")


@dataclass
class _TensorGroup:
    """Multi-tensor mode (``flatten=False``, or DTensor params such as FSDP2 shards): params
    stay where they are, one EMA per param. ``views`` are the params' local tensors (the local
    shard of a DTensor), cached; ``moved()`` checks they still alias the params' memory."""

    device: torch.device
    dtype: torch.dtype
    names: list[str]
    params: list[nn.Parameter]
    emas: list[Tensor]
    views: list[Tensor]
    data_ptrs: tuple[int, ...]

    def moved(self) -> list[str]:
        ptrs = tuple(_local(p).data_ptr() for p in self.params)
        if ptrs == self.data_ptrs:
            return []
        return [n for n, ptr, old in zip(self.names, ptrs, self.data_ptrs, strict=False) if ptr != old]


def _is_dtensor(t: Tensor) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def _local(t: Tensor) -> Tensor:
    """The tensor holding this rank's elements: the local shard of a DTensor, else ``t``."""
    if _is_dtensor(t):
        return t._local_tensor  # what to_local() returns, without an autograd node per call
    return t.detach()


def _as_param_layout(param: Tensor, local: Tensor) -> Tensor:
    """``local`` presented like ``param``: a DTensor with its mesh and placements (no
    communication), or ``local`` itself."""
    if _is_dtensor(param):
        return DTensor.from_local(
            local, param.device_mesh, param.placements, run_check=False, shape=param.shape, stride=param.stride()
        )
    return local


class SwitchEMA:
    """Switch EMA of ``model``'s trainable parameters.

    Build it **before** the optimizer, DDP/FSDP wrapping, ``torch.compile`` or CUDA-graph
    capture: with ``flatten=True`` (default) the params are moved into one flat buffer per
    (device, dtype) and each ``param.data`` becomes a view of it, so one fused kernel covers a
    whole bucket. The ``Parameter`` objects stay the same, so optimizers built later (or
    earlier) keep working.

    Args:
        model: the module whose trainable params (``requires_grad``) are averaged.
        decay: EMA decay in [0, 1): ``ema <- decay * ema + (1 - decay) * param``.
        warmup: ``None``, ``"linear"``, ``"exp"``, ``"constant"`` (the SEMA authors' warmups:
            start at ``warmup_ratio * decay`` for ``warmup_steps`` steps) or ``"power"``
            (``1 - (1 + t / inv_gamma) ** -power``, capped at ``decay``, as in timm and diffusers).
            See :class:`sema.DecaySchedule`.
        update_every: update the EMA on every K-th call of :meth:`update`, with decay
            ``decay ** K`` so the averaging horizon in steps stays the same.
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
        inv_gamma, power, min_decay: for the ``power`` warmup.
        skip_nonfinite: skip an update (and count it in ``num_skipped``) when any param is NaN or
            Inf, so a bad step does not spread into the EMA. Off by default: it reads every param
            once more and synchronises with the host once per update.
    """

    def __init__(
        self,
        model: nn.Module,
        decay: float = 0.999,
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
    ) -> None:
        # Every check runs before the model is touched: a bad argument leaves it as it was.
        if not isinstance(model, nn.Module):
            raise TypeError(f"SwitchEMA: model must be an nn.Module, got {type(model).__name__}")
        self.schedule = DecaySchedule(
            decay, warmup, warmup_steps, warmup_ratio, inv_gamma, power, min_decay, update_every
        )
        _check_switch_policy(switch_every, switch_start, switch_end)
        if buffers not in BUFFER_POLICIES:
            raise ValueError(f"SwitchEMA: buffers={buffers!r} is not one of {BUFFER_POLICIES}")
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError(
                "SwitchEMA: the model has no trainable parameters (none with requires_grad=True); "
                "there is nothing to average"
            )
        bad = [f"{n} ({p.dtype})" for n, p in named if p.dtype not in ops.PARAM_DTYPES]
        if bad:
            raise TypeError(f"SwitchEMA: params must be float32, bfloat16 or float16; these are not: {', '.join(bad)}")
        bad = [n for n, p in named if p.is_sparse or p.layout != torch.strided]
        if bad:
            raise TypeError(f"SwitchEMA: sparse params are not supported: {', '.join(bad)}")
        if ema_dtype is not None and ema_dtype != torch.float32:
            odd = sorted({str(p.dtype) for _, p in named if p.dtype != ema_dtype})
            if odd:
                raise TypeError(
                    f"SwitchEMA: ema_dtype={ema_dtype} does not fit params of dtype {', '.join(odd)}; "
                    "use torch.float32 or None (each param's own dtype)"
                )
        groups = plan_buckets(named)  # a DTensor reports its local shard's device and dtype
        resolved = {}
        for device, _ in groups:
            if device not in resolved:
                resolved[device] = ops.resolve_backend(backend, device)  # raises with the reason

        self.model = model
        self.switch_every = switch_every
        self.switch_start = switch_start
        self.switch_end = switch_end
        self.buffer_policy = buffers
        self.ema_dtype = ema_dtype
        self.flatten = bool(flatten)
        self.requested_backend = backend
        self.backends: dict[torch.device, str] = resolved
        self.skip_nonfinite = bool(skip_nonfinite)
        self.num_switches = 0
        self.num_skipped = 0
        self._calls = 0
        self._epochs = 0
        self._swapped_active = False

        self.buckets: list[FlatBucket] = []
        self.tensor_groups: list[_TensorGroup] = []
        for (device, dtype), members in groups.items():
            target = dtype if ema_dtype is None else ema_dtype
            # DTensor params (FSDP2 shards) cannot be re-pointed into a bucket: they always use
            # the multi-tensor mode, on their local shards, with no communication.
            if self.flatten and not any(_is_dtensor(p) for _, p in members):
                self.buckets.append(build_bucket(device, dtype, members, target))
                continue
            params = [p for _, p in members]
            views = [_local(p) for p in params]
            with torch.no_grad():
                emas = [v.to(target, copy=True, memory_format=torch.preserve_format) for v in views]
            self.tensor_groups.append(
                _TensorGroup(
                    device, dtype, [n for n, _ in members], params, emas, views, tuple(v.data_ptr() for v in views)
                )
            )
        self._steps = {device: torch.zeros((), dtype=torch.int64, device=device) for device in resolved}
        for step in self._steps.values():
            self.schedule.weight(step)  # creates a constant weight now, not inside a traced update
        # Where the model holds each param: load_state_dict(assign=True) puts new Parameter
        # objects there, which a data-pointer check alone cannot see.
        tracked = {id(p): n for n, p in named}
        self._slots = [
            (module._parameters, key, p, tracked[id(p)])
            for module in model.modules()
            for key, p in module._parameters.items()
            if p is not None and id(p) in tracked
        ]
        self._slot_dicts = [d for d, _, _, _ in self._slots]
        self._slot_keys = [k for _, k, _, _ in self._slots]
        self._slot_params = [p for _, _, p, _ in self._slots]

        self._buffer_names: list[str] = []
        self._buffers: list[Tensor] = []
        self._buffer_emas: list[Tensor] = []
        if buffers != "ignore":
            for name, b in model.named_buffers():
                self._buffer_names.append(name)
                self._buffers.append(b)
                keep = torch.float32 if (b.is_floating_point() and ema_dtype is not None) else b.dtype
                self._buffer_emas.append(b.detach().to(keep, copy=True))

    # --- properties --------------------------------------------------------------------------

    @property
    def decay(self) -> float:
        return self.schedule.decay

    @property
    def step(self) -> int:
        """Number of EMA updates performed (reads the device counter: a host sync)."""
        return int(next(iter(self._steps.values())).item())

    @property
    def epochs(self) -> int:
        """Number of :meth:`epoch_end` calls so far."""
        return self._epochs

    def _needs_host_count(self) -> bool:
        return self.schedule.update_every > 1 or isinstance(self.switch_every, int) or self.skip_nonfinite

    # --- the hot path ------------------------------------------------------------------------

    def update(self, switch: bool = False) -> None:
        """Fold the current params into the EMA: one fused pass per bucket.

        Call it after every ``optimizer.step()``. With ``switch=True`` (or when an int
        ``switch_every`` says so) the switch ``param <- ema`` is fused into the same pass.
        The decay comes from a device step counter: no host sync (unless ``skip_nonfinite``).
        """
        host_count = self._needs_host_count()
        if not torch.compiler.is_compiling():
            self._check_placement("update")
        elif host_count:
            raise RuntimeError(
                "SwitchEMA.update under torch.compile supports update_every=1, switch_every='epoch' or None "
                "and skip_nonfinite=False: the other policies count calls on the host. Compile with those, "
                "or leave update() eager"
            )
        if host_count:  # otherwise every call is an update and the device step is the count
            self._calls += 1
            if isinstance(self.switch_every, int) and self._switch_due(self._calls, self.switch_every):
                switch = True
            if self._calls % self.schedule.update_every != 0:
                if switch:
                    self.switch()
                return
            if self.skip_nonfinite and not self._all_finite():
                self.num_skipped += 1
                if switch:
                    self.switch()
                return
        weights = {device: self.schedule.weight(step) for device, step in self._steps.items()}
        for bucket in self.buckets:
            ops.dispatch_update(
                bucket.ema_flat, bucket.param_flat, weights[bucket.device], switch, self.backends[bucket.device]
            )
        for group in self.tensor_groups:
            ops.dispatch_update_multi(
                group.emas, group.views, weights[group.device], switch, self.backends[group.device]
            )
        self._update_buffers(weights)
        for step in self._steps.values():
            step.add_(1)
        if switch:
            self._after_switch()

    def _update_buffers(self, weights: dict[torch.device, Tensor]) -> None:
        if not self._buffers:
            return
        with torch.no_grad():
            for b, e in zip(self._buffers, self._buffer_emas, strict=False):
                if self.buffer_policy == "ema" and e.is_floating_point():
                    e.lerp_(b.to(e.dtype), weights.get(b.device, next(iter(weights.values()))).to(b.device))
                else:
                    e.copy_(b)

    def _all_finite(self) -> bool:
        flags = [torch.isfinite(b.param_flat).all() for b in self.buckets]
        flags += [torch.isfinite(v).all() for g in self.tensor_groups for v in g.views]
        return bool(torch.stack([f.cpu() for f in flags]).all())

    # --- switching ---------------------------------------------------------------------------

    def _switch_due(self, count: int, every: int) -> bool:
        if count <= self.switch_start:
            return False
        if self.switch_end is not None and count > self.switch_end:
            return False
        return count % every == 0

    def epoch_end(self) -> bool:
        """Mark the end of an epoch; switch when ``switch_every="epoch"`` and the
        ``switch_start``/``switch_end`` window allows. Returns whether it switched."""
        self._check_placement("epoch_end")
        self._epochs += 1
        if self.switch_every == "epoch" and self._switch_due(self._epochs, 1):
            self.switch()
            return True
        return False

    def switch(self) -> None:
        """``param <- ema`` now (cast to each param's dtype, round to nearest even), for every
        bucket, plus tracked buffers. The EMA itself is not changed."""
        self._check_placement("switch")
        for bucket in self.buckets:
            ops.dispatch_switch(bucket.ema_flat, bucket.param_flat, self.backends[bucket.device])
        for group in self.tensor_groups:
            for e, v in zip(group.emas, group.views, strict=True):
                ops.dispatch_switch(ops.dense_view(e), ops.dense_view(v), self.backends[group.device])
        self._after_switch()

    def _after_switch(self) -> None:
        with torch.no_grad():
            for b, e in zip(self._buffers, self._buffer_emas, strict=False):
                b.copy_(e)
        if not torch.compiler.is_compiling():
            self.num_switches += 1

    @contextlib.contextmanager
    def swapped(self) -> Iterator[nn.Module]:
        """Inside the block the model holds the EMA weights; on exit (even through an exception)
        params and EMA are restored bit for bit. Do not train inside the block.

        Memory: none extra for equal dtypes (an in-place exchange) and for fp32 EMA with bf16
        params (the lossless packing of DESIGN.md: the model sees the EMA rounded half away
        from zero). fp32 EMA with fp16 params goes through a scratch copy of the params:
        2 bytes per element, freed on exit. Tracked buffers are saved by copy (small).
        """
        if self._swapped_active:
            raise RuntimeError("SwitchEMA.swapped() is already active; it cannot be nested")
        self._check_placement("swapped")
        undo: list[Callable[[], None]] = []
        try:
            for bucket in self.buckets:
                undo.append(self._swap_in(bucket.ema_flat, bucket.param_flat, self.backends[bucket.device]))
            for group in self.tensor_groups:
                for e, v in zip(group.emas, group.views, strict=True):
                    undo.append(self._swap_in(ops.dense_view(e), ops.dense_view(v), self.backends[group.device]))
            if self._buffers:
                saved = [b.clone() for b in self._buffers]
                with torch.no_grad():
                    for b, e in zip(self._buffers, self._buffer_emas, strict=False):
                        b.copy_(e)

                def restore_buffers() -> None:
                    with torch.no_grad():
                        for b, s in zip(self._buffers, saved, strict=False):
                            b.copy_(s)

                undo.append(restore_buffers)
            self._swapped_active = True
            yield self.model
        finally:
            self._swapped_active = False
            for action in reversed(undo):
                action()

    @staticmethod
    def _swap_in(ema: Tensor, param: Tensor, backend: str) -> Callable[[], None]:
        if ema.dtype == param.dtype or param.dtype == torch.bfloat16:
            ops.dispatch_swap(ema, param, False, backend)
            return lambda: ops.dispatch_swap(ema, param, True, backend)
        scratch = param.clone()
        ops.dispatch_switch(ema, param, backend)

        def restore() -> None:
            with torch.no_grad():
                param.copy_(scratch)

        return restore

    # --- placement checks --------------------------------------------------------------------

    def _check_placement(self, where: str) -> None:
        if self._swapped_active:
            raise RuntimeError(
                f"SwitchEMA.{where}() called inside swapped(): the model holds the EMA there; "
                "call it after the with-block"
            )
        moved = [n for b in self.buckets for n in b.moved()]
        moved += [n for g in self.tensor_groups for n in g.moved()]
        if not all(map(operator.is_, map(dict.get, self._slot_dicts, self._slot_keys), self._slot_params)):
            moved += [f"{n} (replaced by a new Parameter)" for d, k, p, n in self._slots if d.get(k) is not p]
        if moved:
            shown = ", ".join(moved[:8]) + (f" and {len(moved) - 8} more" if len(moved) > 8 else "")
            raise BucketMovedError(
                f"SwitchEMA.{where}(): {len(moved)} param(s) no longer live where SwitchEMA put them: {shown}. "
                "Something replaced param.data (model.to()/.half(), load_state_dict(assign=True), "
                "param.data = ...). Move or convert the model before building SwitchEMA, and load weights "
                "with load_state_dict(assign=False)."
            )

    # --- state -------------------------------------------------------------------------------

    def _named_emas(self) -> Iterator[tuple[str, nn.Parameter, Tensor]]:
        for bucket in self.buckets:
            for i, (name, p) in enumerate(zip(bucket.names, bucket.params, strict=False)):
                yield name, p, bucket.ema_view(i)
        for group in self.tensor_groups:
            yield from zip(group.names, group.params, group.emas, strict=False)

    def _config(self) -> dict[str, object]:
        return {
            **self.schedule.config(),
            "switch_every": self.switch_every,
            "switch_start": self.switch_start,
            "switch_end": self.switch_end,
            "buffers": self.buffer_policy,
            "ema_dtype": None if self.ema_dtype is None else str(self.ema_dtype),
            "skip_nonfinite": self.skip_nonfinite,
        }

    def state_dict(self) -> dict[str, object]:
        """The EMA by param name (one storage per tensor, safe for ``torch.save`` and
        safetensors), the tracked buffers, the step/call/epoch counters and the policy."""
        if self._swapped_active:
            raise RuntimeError("SwitchEMA.state_dict() inside swapped(): the EMA buffers hold the swapped state")
        step = self.step
        return {
            "format": STATE_FORMAT,
            "version": STATE_VERSION,
            "step": step,
            # Calls are counted on the host only where a policy needs them (never under compile or
            # CUDA graphs); elsewhere every call is an update, so the device step is the count.
            "calls": self._calls if self._needs_host_count() else step,
            "epochs": self._epochs,
            "num_switches": self.num_switches,
            "num_skipped": self.num_skipped,
            "config": self._config(),
            "ema": {name: _as_param_layout(p, e.detach().clone()) for name, p, e in self._named_emas()},
            "buffers": {n: e.detach().clone() for n, e in zip(self._buffer_names, self._buffer_emas, strict=False)},
        }

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
        ours = {name: e for name, _, e in self._named_emas()}
        presented = {name: _as_param_layout(p, e) for name, p, e in self._named_emas()}  # global shapes
        _compare("param", presented, state.get("ema", {}), problems)
        for name, p, _ in self._named_emas():
            value = state.get("ema", {}).get(name) if isinstance(state.get("ema"), dict) else None
            if isinstance(value, Tensor) and _is_dtensor(p) != _is_dtensor(value):
                problems.append(
                    f"param {name}: {'a DTensor' if _is_dtensor(value) else 'a plain tensor'} in the state, "
                    f"{'a DTensor shard' if _is_dtensor(p) else 'a plain tensor'} here (save and load sharded "
                    "states with torch.distributed.checkpoint on the same layout)"
                )
            elif _is_dtensor(p) and isinstance(value, Tensor) and value.placements != p.placements:
                problems.append(f"param {name}: placements {value.placements} in the state, {p.placements} here")
        _compare(
            "buffer", dict(zip(self._buffer_names, self._buffer_emas, strict=False)), state.get("buffers", {}), problems
        )
        if problems:
            raise ValueError(
                "SwitchEMA.load_state_dict: the state does not match this model:\n  " + "\n  ".join(problems)
            )
        saved_config = state.get("config", {})
        diff = {k: (v, saved_config.get(k)) for k, v in self._config().items() if saved_config.get(k) != v}
        if diff:
            shown = ", ".join(f"{k}: now {a!r}, saved {b!r}" for k, (a, b) in diff.items())
            warnings.warn(
                f"SwitchEMA.load_state_dict: policy differs from the saved one ({shown}); keeping the current one",
                stacklevel=2,
            )
        with torch.no_grad():
            for name, e in ours.items():
                e.copy_(_local(state["ema"][name]))
            for e, name in zip(self._buffer_emas, self._buffer_names, strict=False):
                e.copy_(state["buffers"][name])
            for step in self._steps.values():
                step.fill_(int(state["step"]))
        self._calls = int(state["calls"])
        self._epochs = int(state["epochs"])
        self.num_switches = int(state.get("num_switches", 0))
        self.num_skipped = int(state.get("num_skipped", 0))

    def averaged_state_dict(self, full: bool = False) -> dict[str, Tensor]:
        """A ``model.state_dict()``-shaped dict holding the EMA weights (cast to each param's
        dtype) and the tracked buffers, each tensor with its own storage: it loads into a fresh
        model with ``model.load_state_dict`` and saves with ``torch.save`` or safetensors.

        Sharded (FSDP2) params give DTensors with the params' placements, as the model's own
        ``state_dict()`` does. ``full=True`` gathers them: every rank must call it (it is a
        collective), rank 0 gets full tensors and the other ranks an empty dict.
        """
        if self._swapped_active:
            raise RuntimeError("SwitchEMA.averaged_state_dict() inside swapped(); call it after the with-block")
        ema_of = {id(p): (p, e) for _, p, e in self._named_emas()}
        buffer_of = {id(b): e for b, e in zip(self._buffers, self._buffer_emas, strict=True)}
        out = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        for name, p in self.model.named_parameters(remove_duplicate=False):
            if id(p) in ema_of and name in out:
                param, e = ema_of[id(p)]
                out[name] = _as_param_layout(param, e.detach().to(p.dtype, copy=True))
        for name, b in self.model.named_buffers(remove_duplicate=False):
            if id(b) in buffer_of and name in out:
                out[name] = buffer_of[id(b)].detach().to(b.dtype, copy=True)
        if full:
            out = {k: v.full_tensor() if _is_dtensor(v) else v for k, v in out.items()}
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                if torch.distributed.get_rank() != 0:
                    return {}
        return out

    def reset(self) -> None:
        """Restart the average from the current weights: EMA <- params (and tracked buffers),
        step counter back to 0 (warmups start over). With DDP, call it after wrapping the model,
        which broadcasts rank 0's weights, so every rank's EMA starts from the same values."""
        self._check_placement("reset")
        with torch.no_grad():
            for bucket in self.buckets:
                bucket.ema_flat.copy_(bucket.param_flat)
            for group in self.tensor_groups:
                for e, v in zip(group.emas, group.views, strict=True):
                    e.copy_(v)
            for b, e in zip(self._buffers, self._buffer_emas, strict=True):
                e.copy_(b)
            for step in self._steps.values():
                step.zero_()
        self._calls = 0


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


def _check_switch_policy(switch_every: object, switch_start: object, switch_end: object) -> None:
    if switch_every not in ("epoch", None) and (
        isinstance(switch_every, bool) or not isinstance(switch_every, int) or switch_every < 1
    ):
        raise ValueError(
            f"SwitchEMA: switch_every={switch_every!r} must be 'epoch', a positive int (steps) or None (no switch)"
        )
    if isinstance(switch_start, bool) or not isinstance(switch_start, int) or switch_start < 0:
        raise ValueError(f"SwitchEMA: switch_start={switch_start!r} must be a non-negative int")
    if switch_end is not None and (
        isinstance(switch_end, bool) or not isinstance(switch_end, int) or switch_end <= switch_start
    ):
        raise ValueError(
            f"SwitchEMA: switch_end={switch_end!r} must be None or an int greater than switch_start={switch_start}"
        )

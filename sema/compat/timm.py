"""``ModelEmaV3``: a drop-in for timm's ``timm.utils.ModelEmaV3`` (timm 1.0.31) on sema's buckets.

Change ``from timm.utils import ModelEmaV3`` to ``from sema.compat.timm import ModelEmaV3``; the
constructor, ``get_decay``, ``update(model, step=None)``, ``apply_update_``,
``apply_update_no_buffers_``, ``set(model)``, ``forward``, ``module``, the attributes and the
``state_dict()`` format (``module.*`` keys) are timm's. What runs underneath:

- The model's trainable params move into sema's flat buckets (a ``SwitchEMA`` with
  ``switch_every=None`` holds them), and ``module`` is a copy of the model whose params *are*
  views of the EMA buckets, so one fused launch per bucket updates them. Frozen params and
  buffers keep EMA tensors of their own, updated by one multi-tensor launch per dtype pair;
  integer buffers are copied. Like timm, every floating ``state_dict`` entry is averaged (frozen
  params included), each name once (a tied weight under two names is updated twice).
- The decay is computed on the host from ``step`` exactly as timm does; ``w = 1 - decay``.
- ``update(model)`` with the constructor's model or a wrapper holding the same tensors (DDP,
  ``torch.compile``) takes the fused path; any other model of the same structure goes through the
  multi-tensor path, as timm allows.
- Numbers: fp32 and bf16 EMAs (``stochastic_rounding=False``) use torch's lerp formula, bit for
  bit here. timm's foreach path with an EMA dtype other than the model's
  (``dtype=torch.float32`` for a bf16 model) computes ``ema * (1 - w) + w * model`` instead of
  the lerp: the two differ by fp32 rounding. A bf16 EMA with ``stochastic_rounding`` (timm's
  default for bf16 models) runs timm's own algorithm with the same private generator and the
  same chunks, so it draws the same random bits: no fused kernel there, speed like timm's.

Differences, each raised or warned with its reason rather than done silently:

- ``device=`` other than the model's (EMA offload) is refused: this drop-in's EMA lives beside the
  params; ``sema.SwitchEMA(model, ema_device="cpu")`` is sema's offloaded EMA.
- ``dtype=`` other than ``torch.float32`` or the model's own dtype (a bf16 EMA of fp32 params, an
  fp64 EMA) is refused: sema keeps an EMA in fp32 or in each param's dtype.
- The model is bucketed at construction: build the EMA after moving the model to its device and
  dtype (timm asks the same). A trainable param moved or replaced afterwards (``model.to()``,
  ``load_state_dict(assign=True)``) makes ``update()`` raise, where timm would follow it (a
  replaced buffer or frozen param is followed, as in timm). ``model_ema.to()``/``.half()`` that
  would change a tensor, and a replaced or moved ``model_ema.module``, are refused too.
- A tied weight with an EMA dtype other than the model's and ``foreach=True`` warns
  (:class:`TiedWeightWarning`): timm's foreach path gives it ``e (1 - w)**2 + 2 w m``, no average.
- ``copy.deepcopy`` and pickling of the drop-in are refused (as ``SwitchEMA``'s): save
  ``state_dict()``. Its tensors share the bucket storage: ``torch.save`` stores each bucket once,
  safetensors refuses shared tensors (clone them first).
- timm's private ``_lerp_`` / ``_foreach_lerp_`` helpers do not exist here.
"""

from __future__ import annotations

import copy
import operator
import warnings
import weakref
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from sema import ops
from sema.storage import PlacementGuard, registrations
from sema.switch_ema import SwitchEMA

_storage_use_count = getattr(torch._C, "_storage_Use_Count", None)

# timm's chunk bound for stochastic rounding (``_lerp_stochastic_round_bf16_``): the random draws
# follow the chunks, so the same bound gives the same bits.
SR_CHUNK_NUMEL = 2**22


class ModelEmaV3(nn.Module):
    """timm's ``ModelEmaV3`` (same arguments and defaults) on sema's fused buckets.

    Args are timm's: ``decay``, ``min_decay``, ``update_after_step``, ``use_warmup``,
    ``warmup_gamma``, ``warmup_power`` (see :meth:`get_decay`), ``device`` (must be the model's
    device or ``None``), ``dtype`` (``None``, the model's dtype, or ``torch.float32``),
    ``stochastic_rounding`` and ``stochastic_rounding_seed`` (bf16 EMAs), ``foreach`` (only
    decides timm's stochastic-rounding chunks here) and ``exclude_buffers`` (average params,
    copy buffers). ``backend`` (keyword only, not timm's): the sema backend, as in
    :class:`sema.SwitchEMA`.

    Build it after the model is on its device and in its dtype and before the optimizer, DDP or
    ``torch.compile`` (timm asks the same): the trainable params move into flat buckets.
    """

    def __init__(
        self,
        model: nn.Module,
        decay: float = 0.9999,
        min_decay: float = 0.0,
        update_after_step: int = 0,
        use_warmup: bool = False,
        warmup_gamma: float = 1.0,
        warmup_power: float = 2 / 3,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        stochastic_rounding: bool = True,
        stochastic_rounding_seed: int = 0,
        foreach: bool = True,
        exclude_buffers: bool = False,
        *,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"ModelEmaV3: model must be an nn.Module, got {type(model).__name__}")
        first = next(model.parameters(), None)
        if first is None:
            raise ValueError("ModelEmaV3: the model has no parameters; there is nothing to average")
        if device is not None and not _same_device(torch.device(device), first.device):
            raise ValueError(
                f"ModelEmaV3(device={device!r}): the model is on {first.device}. sema.compat.timm keeps the EMA on "
                "the params' device (its fused kernels read both in one pass), so an EMA on another device "
                "(offload) is not supported by this drop-in. Use device=None, or sema.SwitchEMA(model, "
                "switch_every=None, ema_device='cpu') with ema.attach(optimizer) for an EMA in host memory updated "
                "off the training thread (docs/offload.md)"
            )
        ema_dtype = _sema_ema_dtype(model, dtype)
        for name, value in (
            ("use_warmup", use_warmup),
            ("stochastic_rounding", stochastic_rounding),
            ("foreach", foreach),
            ("exclude_buffers", exclude_buffers),
        ):
            if not isinstance(value, bool):
                raise TypeError(f"ModelEmaV3: {name} must be True or False, got {value!r}")

        # Checks done; SwitchEMA re-points the trainable params into buckets (or raises before).
        self._switch_ema = SwitchEMA(
            model, decay=0.5, switch_every=None, buffers="ignore", ema_dtype=ema_dtype, backend=backend
        )
        self.module = _module_view(model, self._switch_ema, dtype)
        self.module.eval()
        object.__setattr__(self, "_module_view", self.module)
        self.decay = decay
        self.min_decay = min_decay
        self.update_after_step = update_after_step
        self.use_warmup = use_warmup
        self.warmup_gamma = warmup_gamma
        self.warmup_power = warmup_power
        self.foreach = foreach
        self.device = device
        self.dtype = dtype
        self.stochastic_rounding = stochastic_rounding
        self.stochastic_rounding_seed = stochastic_rounding_seed
        self.exclude_buffers = exclude_buffers
        self._sr_generator = torch.Generator(device=next(self.module.parameters()).device)
        self._sr_generator.manual_seed(stochastic_rounding_seed)

        # Not a submodule: the live model stays out of this module's state_dict, train() and to().
        object.__setattr__(self, "_model", model)
        self._backend = backend
        storage = self._switch_ema.storage
        self._placement = PlacementGuard("ModelEmaV3", storage, self._switch_ema._slots)
        # Where each tracked EMA lives: id(module param) -> (its 1-D EMA, the param's 1-D view, backend).
        self._tracked: dict[int, tuple[Tensor, Tensor, str]] = {}
        view_of = {id(p): v for p, v in zip(model.parameters(), self.module.parameters(), strict=True)}
        for bucket in storage.buckets:
            backend_name = storage.backend_of(bucket)
            for i, p in enumerate(bucket.params):
                start, stop = bucket.offsets[i], bucket.offsets[i] + bucket.numels[i]
                self._tracked[id(view_of[id(p)])] = (
                    bucket.ema_flat[start:stop],
                    bucket.param_flat[start:stop],
                    backend_name,
                )
        for group in storage.tensor_groups:
            backend_name = storage.backend_of(group)
            for p, e, v in zip(group.params, group.emas, group.views, strict=True):
                self._tracked[id(view_of[id(p)])] = (ops.dense_view(e), ops.dense_view(v), backend_name)
        views = [v for v in self.module.parameters() if id(v) in self._tracked]
        flats = [b.ema_flat for b in storage.buckets]
        # The module's slots, and its params over the EMA buckets (which must stay there); the live
        # model's buffer slots (a buffer re-assigned there is followed, as timm reads state_dict()).
        self._module_slots = _Slots(self.module, buffers=True, views=views, storages=flats)
        self._model_slots = _Slots(model, buffers=False)
        self._verified: weakref.WeakSet[nn.Module] = weakref.WeakSet()
        self._verified_at = registrations()
        self._plans: dict[tuple[bool, bool, bool], _Plan] = {}
        _warn_tied_mixed(self.module, model, foreach, exclude_buffers, stochastic_rounding)
        # The slices above hold references to the bucket storages: count them in the baseline that
        # the placement guard's O(buckets) check compares with.
        storage.remember_placement()
        self._module_slots.remember()

    # --- timm's API -------------------------------------------------------------------------

    def get_decay(self, step: int | None = None) -> float:
        """timm's decay: ``self.decay`` without ``step``; else 0 (a copy) for the first
        ``update_after_step + 1`` steps, then ``decay`` or, with ``use_warmup``,
        ``1 - (1 + t / warmup_gamma) ** -warmup_power`` clamped to ``[min_decay, decay]``."""
        if step is None:
            return self.decay

        step = max(0, step - self.update_after_step - 1)
        if step <= 0:
            return 0.0

        if self.use_warmup:
            decay = 1 - (1 + step / self.warmup_gamma) ** -self.warmup_power
            decay = max(min(decay, self.decay), self.min_decay)
        else:
            decay = self.decay

        return decay

    @torch.no_grad()
    def update(self, model: nn.Module, step: int | None = None) -> None:
        """Fold ``model`` into the EMA with ``get_decay(step)``. ``model`` is the one given to the
        constructor, a wrapper of it (DDP, ``torch.compile``) or any model of the same structure
        (that one goes through the multi-tensor path, one tensor list per call, as timm does)."""
        decay = self.get_decay(step)
        if self.exclude_buffers:
            self.apply_update_no_buffers_(model, decay)
        else:
            self.apply_update_(model, decay)

    @torch.no_grad()
    def apply_update_(self, model: nn.Module, decay: float) -> None:
        """Average every floating entry of ``model.state_dict()`` (params and buffers) with
        ``decay``; copy the others (``num_batches_tracked``)."""
        self._update_from(model, decay, buffers=True)

    @torch.no_grad()
    def apply_update_no_buffers_(self, model: nn.Module, decay: float) -> None:
        """Average the params with ``decay``; copy every buffer."""
        self._update_from(model, decay, buffers=False)

    @torch.no_grad()
    def set(self, model: nn.Module) -> None:
        """EMA <- ``model.state_dict()`` (params and buffers), as timm's ``set``."""
        self._check_module()
        ours = list(self.module.state_dict(keep_vars=True).values())
        theirs = list(model.state_dict(keep_vars=True).values())
        _check_pairs(ours, theirs, "set")
        for e, m in zip(ours, theirs, strict=True):
            e.detach().copy_(m.detach())

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """``self.module(*args, **kwargs)``."""
        return self.module(*args, **kwargs)

    # --- sema ------------------------------------------------------------------------------

    def __deepcopy__(self, memo: dict) -> ModelEmaV3:
        raise TypeError(
            "sema.compat.timm.ModelEmaV3 cannot be deep-copied: its module's params are views of sema's EMA "
            "buckets. Build a new ModelEmaV3 and load the state: new.load_state_dict(model_ema.state_dict())"
        )

    def __reduce_ex__(self, protocol: object) -> object:
        raise TypeError(
            "sema.compat.timm.ModelEmaV3 cannot be pickled: save model_ema.state_dict() (torch.save) and load it "
            "with load_state_dict() into a ModelEmaV3 built on the model"
        )

    def _apply(self, fn: Any, recurse: bool = True) -> ModelEmaV3:
        """``nn.Module._apply`` (behind ``.to()``, ``.cuda()``, ``.half()``, ...): a no-op where
        ``fn`` leaves every tensor as it is (``.to()`` of its own device and dtype), else refused
        before anything changes."""
        tensors = [t for t in (*self.module.parameters(), *self.module.buffers())]
        if all(fn(t) is t for t in tensors):
            return self
        raise RuntimeError(
            "sema.compat.timm.ModelEmaV3 cannot be moved or converted (.to(), .cuda(), .half(), ...): its module's "
            "params are views of sema's EMA buckets, which live beside the model's params. Move or convert the "
            "model before building ModelEmaV3 (pass dtype=torch.float32 for an fp32 EMA of a low precision model)"
        )

    def _check_module(self) -> None:
        if self._modules.get("module") is not self._module_view or self._module_slots.changed():
            raise RuntimeError(
                "ModelEmaV3: model_ema.module or its tensors were replaced or moved (.to(), .half(), "
                "load_state_dict(assign=True), param.data = ...). Its params are views of sema's EMA buckets and "
                "must stay where they are: load weights with model_ema.module.load_state_dict(sd) (assign=False), "
                "and build a new ModelEmaV3 for another device or dtype"
            )

    def _is_tracked_model(self, model: nn.Module) -> bool:
        """Whether ``model`` holds exactly the constructor's model's tensors in the same order
        (the model itself, or a DDP / compiled wrapper): cached per object until a module
        registers a parameter anywhere."""
        if model is self._model:
            return True
        seen = registrations()
        if seen != self._verified_at:
            self._verified = weakref.WeakSet()
            self._verified_at = seen
        if model in self._verified:
            return True
        ours = self._model.state_dict(keep_vars=True).values()
        theirs = model.state_dict(keep_vars=True).values()
        same = len(ours) == len(theirs) and all(map(operator.is_, ours, theirs))
        ours_b, theirs_b = list(self._model.buffers()), list(model.buffers())
        same = same and len(ours_b) == len(theirs_b) and all(map(operator.is_, ours_b, theirs_b))
        if same:
            self._verified.add(model)
        return same

    def _update_from(self, model: nn.Module, decay: float, buffers: bool) -> None:
        self._check_module()
        w = 1.0 - decay
        if self._is_tracked_model(model):
            self._placement.check("update", hot=True)
            if self._model_slots.changed():  # a buffer re-assigned in the live model: follow it, as timm does
                self._plans.clear()
                self._model_slots = _Slots(self._model, buffers=False)
            # timm reads foreach and stochastic_rounding at every call: so does the plan's key.
            key = (buffers, self.foreach, self.stochastic_rounding)
            plan = self._plans.get(key)
            if plan is None:
                plan = self._plans[key] = self._plan(self._model, buffers, fused=True)
        else:
            plan = self._plan(model, buffers, fused=False)
        plan.run(w, self)

    def _plan(self, model: nn.Module, buffers: bool, fused: bool) -> _Plan:
        if buffers:
            ours = list(self.module.state_dict(keep_vars=True).values())
            theirs = list(model.state_dict(keep_vars=True).values())
            _check_pairs(ours, theirs, "update")
            entries = [(e, m, e.is_floating_point()) for e, m in zip(ours, theirs, strict=True)]
        else:
            ours, theirs = list(self.module.parameters()), list(model.parameters())
            _check_pairs(ours, theirs, "update")
            entries = [(e, m, True) for e, m in zip(ours, theirs, strict=True)]
            ours, theirs = list(self.module.buffers()), list(model.buffers())
            _check_pairs(ours, theirs, "update")
            entries += [(e, m, False) for e, m in zip(ours, theirs, strict=True)]
        return _Plan(entries, self._tracked if fused else {}, self, self._backend)


class _Plan:
    """What one update does, worked out once per (model, mode): the fused bucket pass, extra
    passes over the slices of entries that appear more than once (tied weights appear under
    each name in a state dict, and timm averages each name), multi-tensor lerps of the EMA
    tensors outside the buckets, timm's stochastic rounding for bf16 EMAs, and copies."""

    def __init__(
        self,
        entries: Sequence[tuple[Tensor, Tensor, bool]],
        tracked: dict[int, tuple[Tensor, Tensor, str]],
        owner: ModelEmaV3,
        backend: str,
    ) -> None:
        sr = owner.stochastic_rounding
        self.fused = bool(tracked)
        self.skip_bf16_buckets = sr
        self.sr_pairs: list[tuple[Tensor, Tensor]] = []
        self.sr_per_tensor = not owner.foreach
        self.copies: tuple[list[Tensor], list[Tensor]] = ([], [])
        self.repeats: list[tuple[Tensor, Tensor, str]] = []
        passes: list[list[tuple[Tensor, Tensor]]] = []
        seen: dict[int, int] = {}
        # The tensors themselves, not detached aliases: a live buffer or frozen param whose .data is
        # re-assigned is then followed (updates run under no_grad).
        for e, m, average in entries:
            if not average:
                self.copies[0].append(e)
                self.copies[1].append(m)
                continue
            if sr and e.dtype == torch.bfloat16:
                self.sr_pairs.append((e, m))
                continue
            count = seen[id(e)] = seen.get(id(e), 0) + 1
            slot = tracked.get(id(e))
            if slot is not None:
                if count > 1:
                    self.repeats.append(slot)
                continue
            while len(passes) < count:
                passes.append([])
            passes[count - 1].append((e, m))
        self.lerps = [_multi_groups(pairs, backend) for pairs in passes]
        self.storage = owner._switch_ema.storage

    def run(self, w: float, owner: ModelEmaV3) -> None:
        if self.fused:
            storage = self.storage
            for bucket in storage.buckets:
                if self.skip_bf16_buckets and bucket.ema_flat.dtype == torch.bfloat16:
                    continue
                ops.dispatch_update(bucket.ema_flat, bucket.param_flat, w, False, storage.backend_of(bucket))
            for group in storage.tensor_groups:
                if self.skip_bf16_buckets and group.emas[0].dtype == torch.bfloat16:
                    continue
                ops.dispatch_update_multi(group.emas, group.views, w, False, storage.backend_of(group))
            for ema, param, backend in self.repeats:
                ops.dispatch_update(ema, param, w, False, backend)
        for groups in self.lerps:
            for emas, params, backend in groups:
                if backend is None:
                    for e, p in zip(emas, params, strict=True):
                        e.lerp_(p.to(e.dtype), w)
                else:
                    ops.dispatch_update_multi(emas, params, w, False, backend)
        if self.sr_pairs:
            if self.sr_per_tensor:
                for e, m in self.sr_pairs:
                    _lerp_stochastic_round_bf16_([e], [m], w, owner._sr_generator)
            else:
                _lerp_stochastic_round_bf16_(
                    [e for e, _ in self.sr_pairs], [m for _, m in self.sr_pairs], w, owner._sr_generator
                )
        if self.copies[0]:
            torch._foreach_copy_(*self.copies)


def _multi_groups(
    pairs: Sequence[tuple[Tensor, Tensor]], backend: str
) -> list[tuple[list[Tensor], list[Tensor], str | None]]:
    """``pairs`` (each EMA at most once) grouped for one multi-tensor launch per (device, EMA
    dtype, model dtype); pairs no sema kernel takes (odd dtypes, unequal strides) go to a
    group with backend ``None``: ``torch.lerp_`` one tensor at a time."""
    groups: dict[tuple, tuple[list[Tensor], list[Tensor]]] = {}
    for e, m in pairs:
        if m.device != e.device:
            raise ValueError(
                f"ModelEmaV3.update: a model tensor is on {m.device}, its EMA on {e.device}; sema.compat.timm keeps "
                "the EMA on the model's device (no offload): pass the model the EMA was built on"
            )
        if e.shape != m.shape:
            raise ValueError(
                f"ModelEmaV3.update: a model tensor of shape {tuple(m.shape)} meets an EMA of shape {tuple(e.shape)}; "
                "pass a model of the same structure as the one the EMA was built on"
            )
        fits = (
            m.dtype in ops.PARAM_DTYPES
            and e.dtype in (torch.float32, m.dtype)
            and e.stride() == m.stride()
            and ops._is_dense(e)
            and ops._is_dense(m)
        )
        if e.dtype == torch.float64 and m.dtype == torch.float64 and e.stride() == m.stride() and ops._is_dense(e):
            key: tuple = (e.device, e.dtype, m.dtype, "torch")
        elif fits:
            key = (e.device, e.dtype, m.dtype, ops.resolve_backend(backend, e.device))
        else:
            key = (e.device, e.dtype, m.dtype, None)
        emas, params = groups.setdefault(key, ([], []))
        emas.append(e)
        params.append(m)
    return [(emas, params, key[3]) for key, (emas, params) in groups.items()]


def _lerp_stochastic_round_bf16_(
    ema_values: list[Tensor],
    model_values: list[Tensor],
    weight: float,
    generator: torch.Generator,
    chunk_numel: int = SR_CHUNK_NUMEL,
) -> None:
    """timm's update of bf16 EMAs with stochastic rounding, step for step (same chunks, same
    draws from ``generator``, same fp32 arithmetic), so the bits match timm's."""

    def update_chunk(chunk_ema: list[Tensor], chunk_model: list[Tensor]) -> None:
        x = torch.cat([v.reshape(-1) for v in chunk_ema]).float()
        x.mul_(1.0 - weight).add_(torch.cat([v.reshape(-1) for v in chunk_model]), alpha=weight)
        bits = x.view(torch.int32)
        bits.add_(torch.randint(0, 1 << 16, bits.shape, dtype=torch.int32, device=bits.device, generator=generator))
        bits.bitwise_and_(-(1 << 16))  # truncate to bf16 precision
        split = [xi.view(v.shape) for xi, v in zip(x.split([v.numel() for v in chunk_ema]), chunk_ema, strict=True)]
        torch._foreach_copy_(chunk_ema, split)

    chunk_ema: list[Tensor] = []
    chunk_model: list[Tensor] = []
    numel = 0
    for ema_v, model_v in zip(ema_values, model_values, strict=True):
        if numel and numel + ema_v.numel() > chunk_numel:
            update_chunk(chunk_ema, chunk_model)
            chunk_ema, chunk_model, numel = [], [], 0
        chunk_ema.append(ema_v)
        chunk_model.append(model_v)
        numel += ema_v.numel()
    if chunk_ema:
        update_chunk(chunk_ema, chunk_model)


class _Slots:
    """The tensors a module tree holds in its ``_parameters`` (and, with ``buffers``, ``_buffers``)
    slots: ``changed()`` is one C-level identity pass, no Python loop per tensor. ``views``, the
    tensors whose memory must not move (the module's params over the EMA buckets), are also
    checked by data pointer: on one call in ``FULL_CHECK_EVERY``, and on every call where a
    storage they live in lost or gained a reference (``storages``: O(buckets), as the placement
    guard of sema.storage does for the params)."""

    FULL_CHECK_EVERY = 64

    def __init__(
        self, module: nn.Module, buffers: bool, views: Sequence[Tensor] = (), storages: Sequence[Tensor] = ()
    ) -> None:
        slots = [
            (table, key, t)
            for m in module.modules()
            for table in ((m._parameters, m._buffers) if buffers else (m._buffers,))
            for key, t in table.items()
            if t is not None
        ]
        self._dicts = [d for d, _, _ in slots]
        self._keys = [k for _, k, _ in slots]
        self._tensors = [t for _, _, t in slots]
        self._views = list(views)
        self._ptrs = list(map(Tensor.data_ptr, self._views))
        self._storages = [t.untyped_storage() for t in storages]
        self._calls = 0
        self.remember()

    def _use_counts(self) -> list[int] | None:
        if _storage_use_count is None:
            return None
        return [_storage_use_count(s._cdata) for s in self._storages]

    def remember(self) -> None:
        self._counts = self._use_counts()

    def changed(self) -> bool:
        if not all(map(operator.is_, map(dict.get, self._dicts, self._keys), self._tensors)):
            return True
        if not self._views:
            return False
        self._calls += 1
        if self._calls % self.FULL_CHECK_EVERY and self._counts is not None and self._use_counts() == self._counts:
            return False
        return list(map(Tensor.data_ptr, self._views)) != self._ptrs


class TiedWeightWarning(UserWarning):
    """A weight held under several names whose EMA dtype differs from the model's: timm's
    ``foreach=True`` path gives it no average there (see :func:`_warn_tied_mixed`)."""


def _warn_tied_mixed(
    module: nn.Module, model: nn.Module, foreach: bool, exclude_buffers: bool, stochastic_rounding: bool
) -> None:
    """timm averages each ``state_dict`` name, so a tied weight is updated once per name. With
    ``foreach=True`` and an EMA dtype other than the model's, timm runs ``_foreach_mul_`` over
    all names and then ``_foreach_add_``: a weight under two names becomes ``e (1 - w)**2 + 2 w m``,
    which is no average (and its CUDA kernels race on the repeated tensor). sema lerps once per
    name, as timm's ``foreach=False`` path and its same-dtype path do: said here, not silently."""
    if not foreach or exclude_buffers:
        return
    seen: dict[int, int] = {}
    ours = module.state_dict(keep_vars=True)
    theirs = list(model.state_dict(keep_vars=True).values())
    tied = []
    for (name, e), m in zip(ours.items(), theirs, strict=True):
        seen[id(e)] = seen.get(id(e), 0) + 1
        sr = stochastic_rounding and e.dtype == torch.bfloat16
        if seen[id(e)] > 1 and e.is_floating_point() and e.dtype != m.dtype and not sr:
            tied.append(name)
    if tied:
        warnings.warn(
            f"ModelEmaV3: {', '.join(tied)} hold(s) a weight tied to another name, with an EMA dtype other than the "
            "model's. timm's foreach path updates such a weight as e * (1 - w)**2 + 2 * w * m (not an average); "
            "sema lerps it once per name, as timm does with foreach=False, so the two differ there. Pass "
            "foreach=False to timm to compare them",
            TiedWeightWarning,
            stacklevel=3,
        )


def _check_pairs(ours: list[Tensor], theirs: list[Tensor], where: str) -> None:
    if len(ours) != len(theirs):
        raise ValueError(
            f"ModelEmaV3.{where}: the model has {len(theirs)} entries where the EMA has {len(ours)}; pass the model "
            "the EMA was built on (or one of the same structure)"
        )


def _same_device(a: torch.device, b: torch.device) -> bool:
    if a.type != b.type:
        return False
    if a.index is None and a.type == "cuda":
        a = torch.device("cuda", torch.cuda.current_device())
    return a.index is None or a.index == b.index


def _float_tensors(model: nn.Module) -> list[Tensor]:
    return [t for t in (*model.parameters(), *model.buffers()) if t.is_floating_point()]


def _sema_ema_dtype(model: nn.Module, dtype: torch.dtype | None) -> torch.dtype | None:
    """The ``SwitchEMA`` ``ema_dtype`` for timm's ``dtype``; raises where sema has none."""
    if dtype is None:
        return None
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"ModelEmaV3: dtype must be a torch.dtype or None, got {dtype!r}")
    dtypes = {t.dtype for t in _float_tensors(model)}
    if dtypes <= {dtype}:
        return None
    if dtype == torch.float32 and torch.float64 not in dtypes:
        return torch.float32
    raise ValueError(
        f"ModelEmaV3(dtype={dtype}): the model holds {', '.join(sorted(map(str, dtypes)))} tensors. sema keeps an "
        "EMA in float32 or in each tensor's own dtype, so only dtype=None, dtype=torch.float32 (for a bf16/fp16 "
        "model) or the model's own dtype are supported here; convert the model first, or use timm's ModelEmaV3"
    )


def _module_view(model: nn.Module, ema: SwitchEMA, dtype: torch.dtype | None) -> nn.Module:
    """timm's ``deepcopy(model)`` (then ``.to(dtype)``), except that the trainable params are
    views of ``ema``'s buckets; frozen params and buffers are copies (cast to ``dtype``)."""
    memo: dict[int, Any] = {}
    for _, p, view in ema.storage.named_emas():
        memo[id(p)] = nn.Parameter(view, requires_grad=p.requires_grad)

    def cast(t: Tensor) -> Tensor:
        target = dtype if dtype is not None and t.is_floating_point() else t.dtype
        out = torch.empty_like(t, dtype=target)  # keeps a dense layout's strides
        with torch.no_grad():
            out.copy_(t)
        return out

    for p in model.parameters():
        if id(p) not in memo:
            memo[id(p)] = nn.Parameter(cast(p.detach()), requires_grad=p.requires_grad)
    for b in model.buffers():
        memo[id(b)] = cast(b.detach())
    return copy.deepcopy(model, memo)

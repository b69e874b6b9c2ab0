"""``EMAModel``: a drop-in for diffusers' ``diffusers.training_utils.EMAModel`` (0.42), on sema's
flat buckets and fused ops.

Change ``from diffusers.training_utils import EMAModel`` to ``from sema.compat.diffusers import
EMAModel``. Same constructor (arguments and defaults), the same decay at every step
(:meth:`EMAModel.get_decay` is diffusers' formula, computed on the host as diffusers does), the
same ``state_dict()`` format both ways, and the same ``save_pretrained``/``from_pretrained`` files.

How it runs: the params given at construction are moved into flat buckets (one per device and
dtype; the ``Parameter`` objects stay the same, see ``sema.SwitchEMA``) beside one flat EMA buffer
each. ``step(params)`` with those same params is one fused ``lerp`` pass per bucket. Another list
of the same shapes, dtypes and devices (the training model's params when the EMA was built from a
separate copy, as diffusers' example scripts do; or ours after ``model.to()`` moved them out of the
buckets) is copied into a staging buffer laid out like the buckets (one multi-tensor copy; the
buffer, as large as the params, is allocated at the first such step and kept), then the same fused
pass runs: the result is bit for bit the fused path's. Any other list takes sema's checked
multi-tensor op. Building the EMA from the training model's own params (``EMAModel(
unet.parameters())``) needs neither the copy nor the staging buffer, nor the separate model copy.

What differs from diffusers (each raises with the reason, never silently):

- Numbers: an fp32 EMA is updated by sema's fused ``torch.lerp(ema, param, 1 - decay)``, where
  diffusers computes ``ema - (1 - decay) * (ema - param)``: the two agree to fp32 rounding, not
  bit for bit. A bf16/fp16 EMA (bf16/fp16 params without ``to(dtype=torch.float32)``) runs
  diffusers' own arithmetic, so it is bit for bit diffusers' EMA, for ``foreach=False``
  (``s.sub_(w * (s - p))``, on each flat bucket: three ops per bucket) and ``foreach=True``
  (``_foreach_sub_(s, _foreach_sub(s, p), alpha=w)`` on the per-param views, as diffusers calls
  it: its rounding depends on each tensor's length). For the fused kernel and a better average of
  bf16 params, give the EMA float32 (``ema.to(dtype=torch.float32)``, as with diffusers).
- ``parameters`` must be ``nn.Parameter`` objects (sema keeps the EMA beside them), distinct,
  float32/bfloat16/float16 (float64: the fused update takes an fp32 weight; use
  ``sema.SwitchEMA``), and not empty. Calls that take parameters (``step``, ``copy_to``,
  ``restore``) need as many as the EMA holds; diffusers would silently ``zip`` a shorter list.
- ``to(device=...)`` keeps the EMA beside the params it was built from: it moves the EMA to a
  device where those params live now (``model.to(device)`` first, then ``ema.to(device)``), and
  raises for any other device. An EMA on another device than its params (CPU offload) and
  ``pin_memory()`` are not supported by this drop-in: ``sema.SwitchEMA(ema_device="cpu")`` is sema's
  offloaded EMA (docs/offload.md).
- ``to(dtype=...)`` can give the EMA float32 (e.g. bf16 params, an fp32 EMA) or each param's own
  dtype; an EMA in a lower precision than its params (fp32 params, a bf16 EMA) raises.
- ``load_state_dict`` copies the saved shadow params into the EMA (its device stays; its dtype
  follows the saved one where ``to(dtype=...)`` allows it); diffusers adopts the saved tensors.
  A state of another model (count or shapes differ) raises before anything changes.
- ``shadow_params`` are views of the flat EMA buffers (one list, as diffusers' attribute; an
  in-place write writes the EMA). Assigning a list copies it in; an entry replaced in the list
  (``ema.shadow_params[i] = t``) is copied into the EMA at the next call (``step``, ``copy_to``,
  ``to``, ``state_dict``, ``load_state_dict``) and the entry is the view again, so later steps
  do not update ``t`` itself, as diffusers' would. A replacement whose dtype does not fit (see
  ``to(dtype=...)``) raises at that call, before anything changes.
- Inside ``torch.inference_mode()``, ``to()`` works here and the steps after it too (diffusers'
  ``to()`` there makes inference tensors its next step outside cannot update).
- An ``EMAModel`` cannot be deep-copied or pickled (save its ``state_dict()``).
"""

from __future__ import annotations

import operator
import warnings
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from sema import ops
from sema.buckets import BucketMovedError
from sema.switch_ema import SwitchEMA

_requires_grad = operator.attrgetter("requires_grad")
_shape = operator.attrgetter("shape")
_dtype = operator.attrgetter("dtype")
_device = operator.attrgetter("device")
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# EMA dtypes that run diffusers' own arithmetic (its roundings), to match it bit for bit.
PEER_ARITHMETIC_DTYPES = (torch.bfloat16, torch.float16)


def _peer_step_(emas: list[Tensor], params: list[Tensor], w: float, foreach: bool) -> None:
    """diffusers' update, rounding where it rounds: ``s.sub_(w * (s - p))`` tensor by tensor, or
    with ``foreach`` ``_foreach_sub_(s, _foreach_sub(s, p), alpha=w)``. The first gives the same
    bits on a flat bucket as on its params one by one; the second only on the params' own shapes
    (on the CPU a tensor's last elements take a scalar ``s - w * d`` that rounds differently from
    the vectorised one), so ``foreach`` runs on the per-param views."""
    if foreach:
        torch._foreach_sub_(emas, torch._foreach_sub(emas, params), alpha=w)
        return
    for e, p in zip(emas, params, strict=True):
        e.sub_(w * (e - p))


def _deprecated(message: str) -> None:
    # diffusers' deprecate(..., standard_warn=False): the message alone, as a FutureWarning.
    warnings.warn(message, FutureWarning, stacklevel=3)


class _ParamHolder(nn.Module):
    """The params handed to ``EMAModel``, as a module for ``SwitchEMA`` (the same objects)."""

    def __init__(self, params: list[nn.Parameter]) -> None:
        super().__init__()
        self.params = nn.ParameterList(params)


class EMAModel:
    """Exponential moving average of model weights: ``diffusers.training_utils.EMAModel`` on
    sema's fused ops. See the module docstring for what differs from diffusers.

    Args:
        parameters: the ``nn.Parameter`` objects to average (``model.parameters()``). Passing
            the module itself is deprecated, as in diffusers, and turns ``use_ema_warmup`` on.
        decay: the largest decay. min_decay: the smallest.
        update_after_step: the first ``update_after_step + 1`` steps copy the params.
        use_ema_warmup: decay ``1 - (1 + t / inv_gamma) ** -power``; else ``(1 + t) / (10 + t)``;
            both capped at ``decay`` and floored at ``min_decay``, ``t`` counting from the first
            averaging step.
        foreach: which of diffusers' two arithmetics a bf16/fp16 EMA runs (each bit for bit
            diffusers'); an fp32 EMA takes sema's fused ops either way.
        model_cls, model_config: for :meth:`save_pretrained` (a diffusers ``ModelMixin`` with
            ``ConfigMixin``, or any class with ``from_config``, ``register_to_config``,
            ``save_pretrained`` and ``from_pretrained``).
        kwargs: diffusers' deprecated ``max_value`` (for ``decay``), ``min_value`` (for
            ``min_decay``) and ``device`` (calls :meth:`to`); others are ignored, as there.
    """

    def __init__(
        self,
        parameters: Iterable[nn.Parameter],
        decay: float = 0.9999,
        min_decay: float = 0.0,
        update_after_step: int = 0,
        use_ema_warmup: bool = False,
        inv_gamma: float | int = 1.0,
        power: float | int = 2 / 3,
        foreach: bool = False,
        model_cls: Any | None = None,
        model_config: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        if isinstance(parameters, nn.Module):
            _deprecated(
                "Passing a `torch.nn.Module` to `ExponentialMovingAverage` is deprecated. "
                "Please pass the parameters of the module instead.",
            )
            parameters = parameters.parameters()
            use_ema_warmup = True  # diffusers' backward compatibility for a module
        if kwargs.get("max_value") is not None:
            _deprecated("The `max_value` argument is deprecated. Please use `decay` instead.")
            decay = kwargs["max_value"]
        if kwargs.get("min_value") is not None:
            _deprecated("The `min_value` argument is deprecated. Please use `min_decay` instead.")
            min_decay = kwargs["min_value"]
        params = list(parameters)
        _check_params(params)
        self._params = params
        with torch.inference_mode(False):  # the params move into these buckets: never inference tensors
            self._ema = _build(params, None)
        self._adopt(self._ema)
        self._weights: dict[torch.device, tuple[float, Tensor]] = {}

        self.temp_stored_params: list[Tensor] | None = None
        self.decay = decay
        self.min_decay = min_decay
        self.update_after_step = update_after_step
        self.use_ema_warmup = use_ema_warmup
        self.inv_gamma = inv_gamma
        self.power = power
        self.optimization_step = 0
        self.cur_decay_value: float | None = None  # set in step()
        self.foreach = foreach
        self.model_cls = model_cls
        self.model_config = model_config
        if kwargs.get("device") is not None:
            _deprecated("The `device` argument is deprecated. Please use `to` instead.")
            self.to(device=kwargs["device"])

    def _adopt(self, ema: SwitchEMA) -> None:
        """Use ``ema``'s storage: the EMA views in the order of ``self._params``."""
        view_of = {id(p): e for _, p, e in ema.storage.named_emas()}
        self._views = [view_of[id(p)] for p in self._params]
        self._shadow_list = list(self._views)  # what `shadow_params` returns; entries replaced in it are adopted
        self._ema = ema
        storage = ema.storage
        self._peer_buckets = {id(b) for b in storage.buckets if b.ema_flat.dtype in PEER_ARITHMETIC_DTYPES}
        self._peer_groups = {id(g) for g in storage.tensor_groups if g.emas[0].dtype in PEER_ARITHMETIC_DTYPES}
        self._peer_index = [i for i, e in enumerate(self._views) if e.dtype in PEER_ARITHMETIC_DTYPES]
        self._peer_views = [self._views[i] for i in self._peer_index]
        self._peer_params = [self._params[i] for i in self._peer_index]
        self._in_buckets = True  # params still where the buckets put them (else: the list path)
        self._devices = sorted({e.device for e in self._views}, key=str)
        self._shapes = list(map(_shape, self._params))
        self._dtypes = list(map(_dtype, self._params))
        self._param_devices = list(map(_device, self._params))
        self._staging: list[tuple[Any, Tensor]] | None = None  # built on the first step() with other params
        self._staging_views: list[Tensor] = []
        self._peer_staging_views: list[Tensor] = []

    def __deepcopy__(self, memo: dict) -> EMAModel:
        raise TypeError(
            "sema.compat.diffusers.EMAModel cannot be deep-copied: its EMA lives in flat buckets beside the params "
            "it was built from. Build a new EMAModel on the copied model's params and load_state_dict(ema.state_dict())"
        )

    def __reduce_ex__(self, protocol: object) -> object:
        raise TypeError(
            "sema.compat.diffusers.EMAModel cannot be pickled: torch.save(ema.state_dict()) and load it with "
            "load_state_dict() into an EMAModel built on the model's params"
        )

    # --- diffusers' API ----------------------------------------------------------------------

    @property
    def shadow_params(self) -> list[Tensor]:
        """The EMA of each param (views of the flat EMA buffers, in the order given). One list:
        an entry replaced in it (``ema.shadow_params[i] = t``) is copied into the EMA at the next
        call, as diffusers would then average ``t``."""
        return self._shadow_list

    @shadow_params.setter
    def shadow_params(self, values: list[Tensor]) -> None:
        self._load_shadow(values, "shadow_params")

    @classmethod
    def from_pretrained(cls, path: str, model_cls: Any, foreach: bool = False) -> EMAModel:
        """Load what :meth:`save_pretrained` (this class's or diffusers') wrote."""
        _, ema_kwargs = model_cls.from_config(path, return_unused_kwargs=True)
        model = model_cls.from_pretrained(path)
        ema_model = cls(model.parameters(), model_cls=model_cls, model_config=model.config, foreach=foreach)
        ema_model.load_state_dict(ema_kwargs)
        return ema_model

    def save_pretrained(self, path: str) -> None:
        """A fresh ``model_cls`` holding the EMA weights and, in its config, the EMA settings,
        saved with its ``save_pretrained``: the files diffusers writes."""
        if self.model_cls is None:
            raise ValueError("`save_pretrained` can only be used if `model_cls` was defined at __init__.")
        if self.model_config is None:
            raise ValueError("`save_pretrained` can only be used if `model_config` was defined at __init__.")
        model = self.model_cls.from_config(self.model_config)
        state_dict = self.state_dict()
        state_dict.pop("shadow_params", None)
        model.register_to_config(**state_dict)
        self.copy_to(model.parameters())
        model.save_pretrained(path)

    def get_decay(self, optimization_step: int) -> float:
        """The decay of the step numbered ``optimization_step`` (1-based), diffusers' formula."""
        step = max(0, optimization_step - self.update_after_step - 1)
        if step <= 0:
            return 0.0
        if self.use_ema_warmup:
            cur_decay_value = 1 - (1 + step / self.inv_gamma) ** -self.power
        else:
            cur_decay_value = (1 + step) / (10 + step)
        cur_decay_value = min(cur_decay_value, self.decay)
        return max(cur_decay_value, self.min_decay)

    @torch.no_grad()
    def step(self, parameters: Iterable[nn.Parameter]) -> None:
        """``ema <- lerp(ema, param, 1 - decay)`` for each param with ``requires_grad``, a copy
        for the others. The params this EMA was built from: one fused pass per bucket; another
        list: a copy into a staging buffer, then the same pass (see the module docstring)."""
        if isinstance(parameters, nn.Module):
            _deprecated(
                "Passing a `torch.nn.Module` to `ExponentialMovingAverage.step` is deprecated. "
                "Please pass the parameters of the module instead.",
            )
            parameters = parameters.parameters()
        params = self._given(parameters, "step")
        self._adopt_shadow_writes()
        decay = self.get_decay(self.optimization_step + 1)
        w = 1 - decay
        storage = self._ema.storage
        # bf16/fp16 EMAs: diffusers' own arithmetic (on each flat bucket, or with foreach on the
        # per-param views in one _foreach call), bit for bit its numbers; fp32 EMAs: sema's fused ops.
        peer_buckets, peer_groups = self._peer_buckets, self._peer_groups
        foreach = bool(self.foreach) and bool(self._peer_index)
        if self._fused(params):
            if not peer_buckets and not peer_groups:
                storage.update_({d: self._weight(d, w) for d in self._devices}, switch=False)
            else:
                for bucket in storage.buckets:
                    if id(bucket) not in peer_buckets:
                        weight, backend = self._weight(bucket.device, w), storage.backend_of(bucket)
                        ops.dispatch_update(bucket.ema_flat, bucket.param_flat, weight, False, backend)
                    elif not foreach:
                        _peer_step_([bucket.ema_flat], [bucket.param_flat], w, False)
                for group in storage.tensor_groups:
                    if id(group) not in peer_groups:
                        weight = self._weight(group.device, w)
                        ops.dispatch_update_multi(group.emas, group.views, weight, False, storage.backend_of(group))
                    elif not foreach:
                        _peer_step_(group.emas, group.views, w, False)
                if foreach:
                    _peer_step_(self._peer_views, self._peer_params, w, True)
        elif self._staged(params):
            for bucket, staging in self._staging:
                if id(bucket) not in peer_buckets:
                    weight = self._weight(bucket.device, w)
                    ops.dispatch_update(bucket.ema_flat, staging, weight, False, storage.backend_of(bucket))
                elif not foreach:
                    _peer_step_([bucket.ema_flat], [staging], w, False)
            if foreach:
                _peer_step_(self._peer_views, self._peer_staging_views, w, True)
        else:
            peer = self._peer_index
            if peer:
                _peer_step_(self._peer_views, [params[i] for i in peer], w, bool(self.foreach))
            for device, (views, given) in self._by_device(params).items():
                if views:
                    ops.ema_update_multi_(views, given, self._weight(device, w), backend=storage.backends[device])
        if not all(map(_requires_grad, params)):
            frozen = [(e, p) for e, p in zip(self._views, params, strict=True) if not p.requires_grad]
            torch._foreach_copy_([e for e, _ in frozen], [p for _, p in frozen])
        self.optimization_step += 1
        self.cur_decay_value = decay

    @torch.no_grad()
    def copy_to(self, parameters: Iterable[nn.Parameter]) -> None:
        """``param <- ema`` (cast to each param's dtype): one fused pass per bucket for the
        params this EMA was built from, a multi-tensor copy for any other list."""
        params = self._given(parameters, "copy_to")
        self._adopt_shadow_writes()
        if self._fused(params):
            self._ema.storage.switch_()
            return
        for p, e in zip(params, self._views, strict=True):
            if p.shape != e.shape:
                raise ValueError(f"EMAModel.copy_to: param shape {tuple(p.shape)}, its EMA {tuple(e.shape)}")
        torch._foreach_copy_(params, [e.to(p.device) for e, p in zip(self._views, params, strict=True)])

    def pin_memory(self) -> None:
        """Not supported: pinned host memory serves an EMA offloaded to the CPU while the params
        train on the GPU; ``sema.SwitchEMA(ema_device="cpu")`` is sema's offloaded EMA."""
        raise NotImplementedError(
            "sema.compat.diffusers.EMAModel.pin_memory(): pinned memory is for an EMA kept on the CPU while the "
            "params train on an accelerator (offload), and this EMA lives beside its params; the offloaded EMA "
            "(sema.SwitchEMA(ema_device='cpu'), docs/offload.md) is not wrapped by this drop-in. Drop the "
            "pin_memory() call and the ema.to() calls around step(): the EMA then stays on the params' device"
        )

    def to(
        self,
        device: str | torch.device | int | None = None,
        dtype: torch.dtype | None = None,
        non_blocking: bool = False,
    ) -> None:
        """Put the EMA on ``device`` (where the params it was built from live now) and/or give
        it ``dtype`` (float32, or the params' own dtype). Other requests raise, naming why."""
        target = None if device is None else torch.device(device)
        if target is not None and target.type == "cuda" and target.index is None and torch.cuda.is_available():
            target = torch.device("cuda", torch.cuda.current_device())
        if dtype is not None and not isinstance(dtype, torch.dtype):
            raise TypeError(f"EMAModel.to: dtype must be a torch.dtype, got {dtype!r}")
        # Without dtype= the EMA keeps its dtypes (even where the params changed theirs since).
        wanted = [dtype] * len(self._views) if dtype is not None else list(map(_dtype, self._views))
        self._adopt_shadow_writes()
        ema_dtype = _ema_dtype_for(self._params, wanted)
        moving = target is not None and any(e.device != target for e in self._views)
        if moving:
            elsewhere = [i for i, p in enumerate(self._params) if p.device != target]
            if elsewhere:
                raise NotImplementedError(
                    f"EMAModel.to(device={str(target)!r}): sema keeps the EMA beside the params it was built from, "
                    f"and {len(elsewhere)} of them (e.g. #{elsewhere[0]}, on {self._params[elsewhere[0]].device}) are "
                    f"not on {target}. Move them first (model.to(device), then ema.to(device)), or build the EMAModel "
                    "from params already on that device. An EMA on another device than its params (CPU offload) "
                    "is sema.SwitchEMA(ema_device='cpu') (docs/offload.md), which this drop-in does not wrap"
                )
        if moving or list(map(_dtype, self._views)) != wanted:
            self._rebuild(ema_dtype)

    def state_dict(self) -> dict:
        """diffusers' format: the settings, ``optimization_step`` and ``shadow_params`` (the EMA
        tensors themselves, not copies, as diffusers returns them)."""
        self._adopt_shadow_writes()
        return {
            "decay": self.decay,
            "min_decay": self.min_decay,
            "optimization_step": self.optimization_step,
            "update_after_step": self.update_after_step,
            "use_ema_warmup": self.use_ema_warmup,
            "inv_gamma": self.inv_gamma,
            "power": self.power,
            "shadow_params": self.shadow_params,
        }

    def store(self, parameters: Iterable[nn.Parameter]) -> None:
        """Keep a CPU copy of ``parameters`` for :meth:`restore` (as diffusers does)."""
        self.temp_stored_params = [param.detach().cpu().clone() for param in parameters]

    @torch.no_grad()
    def restore(self, parameters: Iterable[nn.Parameter]) -> None:
        """Put back what :meth:`store` kept, then forget it."""
        if self.temp_stored_params is None:
            raise RuntimeError("This ExponentialMovingAverage has no `store()`ed weights to `restore()`")
        params = list(parameters)
        if len(params) != len(self.temp_stored_params):
            raise ValueError(
                f"EMAModel.restore: {len(params)} params given, {len(self.temp_stored_params)} were stored; "
                "pass the params given to store()"
            )
        torch._foreach_copy_([p.data for p in params], self.temp_stored_params)
        self.temp_stored_params = None

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a state from :meth:`state_dict` (this class's or diffusers'): everything is
        checked before anything changes. The shadow params are copied into the EMA."""
        decay = state_dict.get("decay", self.decay)
        if decay < 0.0 or decay > 1.0:
            raise ValueError("Decay must be between 0 and 1")
        checks = {
            "min_decay": (float,),
            "optimization_step": (int,),
            "update_after_step": (int,),
            "use_ema_warmup": (bool,),
            "inv_gamma": (float, int),
            "power": (float, int),
        }
        values = {}
        for key, types in checks.items():
            values[key] = state_dict.get(key, getattr(self, key))
            if not isinstance(values[key], types):
                raise ValueError(f"Invalid {key}")
        shadow = state_dict.get("shadow_params", None)
        if shadow is None:
            self._adopt_shadow_writes()
        ema_dtype = None if shadow is None else self._check_shadow(shadow, "load_state_dict")
        self.decay = decay
        for key, value in values.items():
            setattr(self, key, value)
        if shadow is not None:
            self._copy_shadow(shadow, ema_dtype)

    # --- internals ---------------------------------------------------------------------------

    def _given(self, parameters: Iterable[nn.Parameter], where: str) -> list[nn.Parameter]:
        params = parameters if type(parameters) is list else list(parameters)
        if len(params) != len(self._views):
            raise ValueError(
                f"EMAModel.{where}: {len(params)} params given, the EMA holds {len(self._views)}; pass the same "
                "model's parameters() (diffusers would silently pair them up to the shorter length)"
            )
        return params

    def _fused(self, params: list[nn.Parameter]) -> bool:
        """Whether ``params`` are the params this EMA was built from, still in their buckets."""
        if not self._in_buckets or not (params is self._params or all(map(operator.is_, params, self._params))):
            return False
        try:
            self._ema._check_placement("update", hot=True)
        except BucketMovedError:
            self._in_buckets = False  # moved for good (model.to(), .half(), ...): the list path from now
            return False
        return True

    def _staged(self, params: list[nn.Parameter]) -> bool:
        """Copy ``params`` (another list, or ours moved out of the buckets) into a staging buffer
        laid out like the buckets, so the fused op runs on it; False where that cannot hold them
        as they are (other shapes, dtypes or devices than the params this EMA was built from:
        those take the checked multi-tensor op)."""
        storage = self._ema.storage
        if storage.tensor_groups or not (
            list(map(_shape, params)) == self._shapes
            and list(map(_dtype, params)) == self._dtypes
            and list(map(_device, params)) == self._param_devices
        ):
            return False
        if self._staging is None:
            with torch.inference_mode(False):  # built inside inference_mode, it could not be written outside
                self._staging = [(b, torch.zeros_like(b.param_flat)) for b in storage.buckets]
            staged = {}
            for bucket, staging in self._staging:
                for i, p in enumerate(bucket.params):
                    view = bucket.ema_view(i)
                    offset = view.storage_offset() - bucket.ema_flat.storage_offset()
                    staged[id(p)] = staging.as_strided(view.shape, view.stride(), offset)
            self._staging_views = [staged[id(p)] for p in self._params]
            self._peer_staging_views = [self._staging_views[i] for i in self._peer_index]
        torch._foreach_copy_(self._staging_views, params)
        return True

    def _by_device(self, params: list[nn.Parameter]) -> dict[torch.device, tuple[list[Tensor], list[Tensor]]]:
        """The pairs for sema's multi-tensor op (EMAs outside ``PEER_ARITHMETIC_DTYPES``), by device."""
        if len(self._devices) == 1 and not self._peer_index:
            return {self._devices[0]: (self._views, params)}
        out: dict[torch.device, tuple[list[Tensor], list[Tensor]]] = {d: ([], []) for d in self._devices}
        for e, p in zip(self._views, params, strict=True):
            if e.dtype not in PEER_ARITHMETIC_DTYPES:
                out[e.device][0].append(e)
                out[e.device][1].append(p)
        return out

    def _weight(self, device: torch.device, w: float) -> Tensor:
        """``w`` as a 0-d float32 tensor on ``device``, reused while ``w`` stays the same."""
        cached = self._weights.get(device)
        if cached is None or cached[0] != w:
            with torch.inference_mode(False):
                cached = (w, torch.full((), w, dtype=torch.float32, device=device))
            self._weights[device] = cached
        return cached[1]

    def _rebuild(self, ema_dtype: torch.dtype | None) -> None:
        """New storage where the params live now, in ``ema_dtype``, holding the current EMA."""
        old = self._views
        with torch.inference_mode(False):  # buckets built inside inference_mode could not be updated outside
            ema = _build(self._params, ema_dtype)
        view_of = {id(p): e for _, p, e in ema.storage.named_emas()}
        with torch.no_grad():
            for p, e in zip(self._params, old, strict=True):
                view_of[id(p)].copy_(e)
        self._adopt(ema)
        self._weights = {}

    def _check_shadow(self, shadow: object, where: str) -> torch.dtype | None:
        """The EMA dtype that holds ``shadow``'s values as they are; raises if it does not fit."""
        if not isinstance(shadow, list):
            raise ValueError("shadow_params must be a list")
        if not all(isinstance(p, Tensor) for p in shadow):
            raise ValueError("shadow_params must all be Tensors")
        if len(shadow) != len(self._views):
            raise ValueError(
                f"EMAModel.{where}: {len(shadow)} shadow params, this EMA holds {len(self._views)} (a state of "
                "another model?)"
            )
        bad = [
            f"#{i}: {tuple(s.shape)} vs {tuple(e.shape)}"
            for i, (s, e) in enumerate(zip(shadow, self._views, strict=True))
            if s.shape != e.shape
        ]
        if bad:
            raise ValueError(f"EMAModel.{where}: shadow param shapes differ from this EMA's: {', '.join(bad[:8])}")
        return _ema_dtype_for(self._params, [s.dtype for s in shadow])

    def _copy_shadow(self, shadow: list[Tensor], ema_dtype: torch.dtype | None) -> None:
        if list(map(_dtype, self._views)) != list(map(_dtype, shadow)):
            self._rebuild(ema_dtype)
        with torch.no_grad():
            for e, s in zip(self._views, shadow, strict=True):
                if s is not e:
                    e.copy_(s)
        self._shadow_list = list(self._views)  # entries replaced before are superseded by these values

    def _load_shadow(self, values: list[Tensor], where: str) -> None:
        self._copy_shadow(values, self._check_shadow(values, where))

    def _adopt_shadow_writes(self) -> None:
        """Copy entries of ``shadow_params`` the caller replaced into the EMA, and put the views
        back in the list (a C-level identity check per param when nothing changed)."""
        views, listed = self._views, self._shadow_list
        if len(listed) != len(views) or not all(map(operator.is_, listed, views)):
            self._load_shadow(list(listed), "shadow_params (entries replaced in the list)")


def _check_params(params: list[object]) -> None:
    if not params:
        raise ValueError("EMAModel: no parameters given; there is nothing to average")
    bad = [f"#{i} ({type(p).__name__})" for i, p in enumerate(params) if not isinstance(p, nn.Parameter)]
    if bad:
        raise TypeError(
            f"EMAModel: parameters must be nn.Parameter objects (sema keeps the EMA beside them); these are not: "
            f"{', '.join(bad[:8])}"
        )
    seen: dict[int, int] = {}
    for i, p in enumerate(params):
        if id(p) in seen:
            raise ValueError(f"EMAModel: parameter #{i} is parameter #{seen[id(p)]} again; pass each once")
        seen[id(p)] = i
    bad = [f"#{i} ({p.dtype})" for i, p in enumerate(params) if p.dtype not in _DTYPES]
    if bad:
        raise TypeError(
            f"EMAModel: params must be float32, bfloat16 or float16; these are not: {', '.join(bad[:8])}. "
            "float64: this drop-in passes the decay to sema's fused update as a float32 weight, which would hold "
            "an fp64 average to fp32 accuracy (diffusers computes it in fp64), and it does not wire sema's fp64 "
            "weights. Use sema.SwitchEMA (fp64 params keep an fp64 EMA there, with fp64 weights), or train in "
            "float32. Integer and complex params have no EMA"
        )


def _ema_dtype_for(params: list[nn.Parameter], dtypes: list[torch.dtype]) -> torch.dtype | None:
    """``SwitchEMA``'s ``ema_dtype`` giving param ``i`` an EMA of ``dtypes[i]``: ``None`` (each
    param's own dtype) or float32; raises for anything else."""
    if all(map(operator.eq, dtypes, (p.dtype for p in params))):
        return None
    if all(d == torch.float32 for d in dtypes):
        return torch.float32
    pairs = enumerate(zip(params, dtypes, strict=True))
    odd = next(f"#{i}: {p.dtype} param, {d} EMA" for i, (p, d) in pairs if d != p.dtype)
    raise NotImplementedError(
        f"EMAModel: an EMA of another dtype than its param, other than float32 ({odd}): sema keeps the EMA in "
        "float32 or in each param's own dtype. Use to(dtype=torch.float32) or the params' dtype"
    )


def _build(params: list[nn.Parameter], ema_dtype: torch.dtype | None) -> SwitchEMA:
    """A plain ``SwitchEMA`` over ``params`` (frozen ones included: diffusers keeps an EMA of
    every param it is given and copies the frozen ones at each step). Its decay is unused: the
    weights come from :meth:`EMAModel.get_decay`."""
    frozen = [p for p in params if not p.requires_grad]
    for p in frozen:
        p.requires_grad_(True)
    try:
        return SwitchEMA(_ParamHolder(params), decay=0.5, switch_every=None, ema_dtype=ema_dtype)
    finally:
        for p in frozen:
            p.requires_grad_(False)

"""``ExponentialMovingAverage``: a drop-in for torch_ema 0.3's class of the same name, on sema's
flat buckets and fused ops.

Change ``from torch_ema import ExponentialMovingAverage`` to
``from sema.compat.torch_ema import ExponentialMovingAverage``; the constructor, the methods, the
``decay`` / ``num_updates`` / ``shadow_params`` / ``collected_params`` attributes and the
``state_dict()`` format are torch_ema's (a checkpoint of either loads into the other).

How it runs: the given params are put in a container module and a plain ``sema.SwitchEMA``
(``switch_every=None``, EMA in each param's dtype, as torch_ema's clones are) keeps their EMA in
flat buckets; the decay is torch_ema's, computed on the host from ``num_updates``, and each
``update()`` is one fused ``lerp`` per bucket. ``shadow_params`` are views of the EMA buckets.

What differs from torch_ema (each either invisible in the numbers or raised, never silent):

- fp32 and fp64 EMAs: ``lerp(ema, param, 1 - decay)`` in one pass instead of
  ``ema - (ema - param) * (1 - decay)``: equal to fp32 (fp64) rounding, not bit for bit.
  bf16 and fp16 EMAs (the default for bf16/fp16 params) run torch_ema's own three roundings on
  each flat bucket (three torch ops per bucket), so they are bit for bit torch_ema's. For the
  fused kernel and a better average of bf16 params, call ``ema.to(dtype=torch.float32)`` as with
  torch_ema: the EMA is then fp32.
- The params are bucketed: each ``param.data`` becomes a view of a flat buffer (the ``Parameter``
  objects stay, so optimizers built before or after keep working). A param moved afterwards
  (``model.to(device)``, ``model.half()``, ``load_state_dict(assign=True)``) makes ``update()``
  raise until ``ema.to(device=..., dtype=...)`` rebuilds the buckets where the params now are.
  torch_ema would fail on a device mismatch, or go on silently with mixed dtypes.
- The EMA lives on the params' device: ``to(device=...)`` elsewhere (an EMA offloaded away from
  its params) raises. ``to(dtype=...)`` takes ``torch.float32`` or the params' own dtype, the
  EMA dtypes sema computes; others raise. ``to()`` without a dtype after ``model.double()`` (or
  another conversion) gives an EMA in the params' new dtype; torch_ema's shadows would keep theirs.
- ``copy.deepcopy(ema)`` gives an independent EMA of the same params, as torch_ema's does;
  pickling raises, as torch_ema's does (save ``state_dict()``).
- References: the buckets hold the params, so a dropped model's params stay in memory until the
  EMA is dropped. As in torch_ema, a call without ``parameters`` raises ``ValueError`` once the
  caller holds no reference to a param any more (told from the params' reference counts).
- ``store()`` keeps one flat copy per bucket; ``collected_params`` are views of it (detached:
  torch_ema's clones carry autograd history, which nothing can use).
- Writing to ``shadow_params``: an in-place write (``ema.shadow_params[0].mul_(2)``) writes the
  EMA, as in torch_ema. Replacing an entry (``ema.shadow_params[0] = t``) or the whole list is
  adopted at the next call: the values are copied into the buckets and the list again holds the
  views. Re-pointing an entry's ``.data`` is not seen (it detaches that entry from the EMA).
- Parameters must be ``nn.Parameter`` objects of a float dtype: a plain tensor could not be
  re-pointed into a bucket without breaking the caller's reference (torch_ema accepts it), and
  an integer one fails in torch_ema's update too.
- A ``decay`` of NaN is refused (torch_ema's range check lets it through).
"""

from __future__ import annotations

import contextlib
import copy
import math
import operator
import sys
from collections.abc import Iterable, Iterator

import torch
from torch import Tensor, nn

from sema import ops
from sema.buckets import BucketMovedError
from sema.switch_ema import SwitchEMA

# EMA dtypes that run torch_ema's own arithmetic (its three roundings), to match it bit for bit.
PEER_ARITHMETIC_DTYPES = (torch.bfloat16, torch.float16)

_GONE = (
    "(One of) the parameters with which this ExponentialMovingAverage was initialized no longer exists (was "
    "garbage collected); please either provide `parameters` explicitly or keep the model to which they belong "
    "from being garbage collected."
)


def _peer_update_(emas: list[Tensor], params: list[Tensor], w: float) -> None:
    """torch_ema's update, ``s -= (s - p) * w``, rounding where it rounds: one tensor at a time,
    since ``torch._foreach_mul_`` rounds a bf16 product differently from ``Tensor.mul_``."""
    for e, p in zip(emas, params, strict=True):
        tmp = e - p
        tmp.mul_(w)
        e.sub_(tmp)


class ExponentialMovingAverage:
    """Exponential moving average of ``parameters``, torch_ema 0.3's API on sema's buckets.

    Args:
        parameters: an iterable of ``nn.Parameter`` (typically ``model.parameters()``). Every one
            is averaged, whether or not it requires grad (as in torch_ema).
        decay: the decay, in [0, 1].
        use_num_updates: warm up with ``min(decay, (1 + n) / (10 + n))``, n the number of updates.
        backend: sema's backend (``"auto"``, ``"torch"``, ``"cpp"``, ...); not a torch_ema argument.

    The module docstring lists what differs from torch_ema.
    """

    def __init__(
        self,
        parameters: Iterable[nn.Parameter],
        decay: float,
        use_num_updates: bool = True,
        *,
        backend: str = "auto",
    ) -> None:
        _check_decay(decay)
        params = list(parameters)
        for j, p in enumerate(params):
            if not isinstance(p, nn.Parameter):
                raise TypeError(
                    f"ExponentialMovingAverage: parameters[{j}] is a {type(p).__name__}, not an nn.Parameter; sema "
                    "moves each param into a flat bucket by re-pointing param.data, which a plain tensor's other "
                    "references would not follow. Pass model.parameters() or wrap it: nn.Parameter(t)"
                )
            if not p.is_floating_point():
                raise TypeError(
                    f"ExponentialMovingAverage: parameters[{j}] has dtype {p.dtype}; only float params can be averaged"
                )
        self.decay = decay
        self.num_updates: int | None = 0 if use_num_updates else None
        self.collected_params: list[Tensor] | None = None
        self._backend = backend
        self._params = params
        first: dict[int, int] = {}
        self._duplicates: list[tuple[int, int]] = []  # (first position, later position) of one param
        for j, p in enumerate(params):
            if first.setdefault(id(p), j) != j:
                self._duplicates.append((first[id(p)], j))
        self._stored: tuple[list[Tensor], list[tuple[Tensor, Tensor]]] | None = None
        self._ema: SwitchEMA | None = None
        self._build(None, None)

    def __deepcopy__(self, memo: dict) -> ExponentialMovingAverage:
        """As torch_ema's deepcopy: an independent EMA (its own buffers, the same values) of the
        same params (not copies of them)."""
        self._adopt_shadow_writes()
        new = ExponentialMovingAverage(self._params, self.decay, backend=self._backend)
        if self._ema_dtype is not None:
            new.to(dtype=self._ema_dtype)
        new.shadow_params = self._shadow_views
        new.num_updates = self.num_updates
        new.collected_params = copy.deepcopy(self.collected_params, memo)
        return new

    def __reduce_ex__(self, protocol: object) -> object:
        raise TypeError(
            "ExponentialMovingAverage cannot be pickled (torch_ema's cannot either: it holds weak references); "
            "save ema.state_dict() with torch.save and load it into an EMA built on the model's parameters"
        )

    # --- building the storage ----------------------------------------------------------------

    def _build(self, ema_dtype: torch.dtype | None, values: list[Tensor] | None) -> None:
        """(Re)build the buckets where the params are now, with EMA dtype ``ema_dtype`` (``None``:
        each param's), filled with ``values`` (one per param) or with the params."""
        self._ema = None
        self._plan: list[tuple[bool, Tensor, Tensor, str]] = []
        self._group_plan: list[tuple[bool, list[Tensor], list[Tensor], str]] = []
        self._ema_dtype = ema_dtype
        if not self._params:
            self._shadow_views: list[Tensor] = []
            self._shadow_list = []
            self._floor: tuple[int, ...] = ()
            return
        before = tuple(map(sys.getrefcount, self._params))
        ema = _switch_ema(self._params, ema_dtype, self._backend)
        after = tuple(map(sys.getrefcount, self._params))
        # A param only this object references (its model is gone: torch_ema's weak reference would
        # be dead) has the references the storage took, one per entry in self._params, and the
        # argument of getrefcount.
        counts: dict[int, int] = {}
        for p in self._params:
            counts[id(p)] = counts.get(id(p), 0) + 1
        self._floor = tuple(a - b + counts[id(p)] + 1 for a, b, p in zip(after, before, self._params, strict=True))
        self._ema = ema
        storage = ema.storage
        view_of = {id(p): e for _, p, e in storage.named_emas()}
        self._shadow_views = [view_of[id(p)] for p in self._params]
        if values is not None:
            with torch.no_grad():
                for view, value in zip(self._shadow_views, values, strict=True):
                    view.copy_(value)
        self._shadow_list = list(self._shadow_views)
        for bucket in storage.buckets:
            peer = bucket.ema_flat.dtype in PEER_ARITHMETIC_DTYPES
            self._plan.append((peer, bucket.ema_flat, bucket.param_flat, storage.backend_of(bucket)))
        for group in storage.tensor_groups:
            peer = group.emas[0].dtype in PEER_ARITHMETIC_DTYPES
            self._group_plan.append((peer, group.emas, group.views, storage.backend_of(group)))

    # --- the torch_ema attributes --------------------------------------------------------------

    @property
    def shadow_params(self) -> list[Tensor]:
        """The EMA, one tensor per param: views of the EMA buckets (in-place writes write the EMA)."""
        return self._shadow_list

    @shadow_params.setter
    def shadow_params(self, values: list[Tensor]) -> None:
        values = list(values)
        self._check_values("shadow_params", values)
        with torch.no_grad():
            for view, value in zip(self._shadow_views, values, strict=True):
                if value is not view:
                    view.copy_(value)
        self._shadow_list = list(self._shadow_views)

    def _check_values(self, what: str, values: list[object]) -> None:
        if len(values) != len(self._params):
            raise ValueError(
                f"ExponentialMovingAverage: {what} has {len(values)} entries; this EMA keeps {len(self._params)}"
            )
        for j, (value, p) in enumerate(zip(values, self._params, strict=True)):
            if not isinstance(value, Tensor):
                raise TypeError(f"ExponentialMovingAverage: {what}[{j}] is a {type(value).__name__}, not a Tensor")
            if value.shape != p.shape:
                raise ValueError(
                    f"ExponentialMovingAverage: {what}[{j}] has shape {tuple(value.shape)}; its param has "
                    f"{tuple(p.shape)}"
                )

    def _adopt_shadow_writes(self) -> None:
        """Entries of ``shadow_params`` replaced by the caller go into the buckets (O(1) C-level
        identity check per param when nothing changed)."""
        views, listed = self._shadow_views, self._shadow_list
        if len(listed) != len(views) or not all(map(operator.is_, listed, views)):
            self.shadow_params = listed

    def _check_alive(self) -> None:
        if any(map(operator.le, map(sys.getrefcount, self._params), self._floor)):
            raise ValueError(_GONE)

    def _resolve(self, parameters: Iterable[nn.Parameter] | None) -> list[nn.Parameter] | None:
        """torch_ema's ``_get_parameters``: ``None`` for this EMA's own params (the buckets),
        else the given list."""
        if parameters is None:
            self._check_alive()
            return None
        params = list(parameters)
        if len(params) != len(self._params):
            raise ValueError(
                "Number of parameters passed as argument is different from number of shadow parameters maintained "
                "by this ExponentialMovingAverage"
            )
        if all(map(operator.is_, params, self._params)):
            return None
        return params

    def _in_place(self, where: str) -> bool:
        """Whether every param still lives in its bucket (the fused paths apply). Raises where
        the params hold another SwitchEMA's weights (inside its ``swapped()``)."""
        if self._ema is None:
            return True
        try:
            self._ema._check_placement(where)
        except BucketMovedError:
            return False
        return True

    def _next_decay(self) -> tuple[float, int | None]:
        decay = self.decay
        count = self.num_updates
        if count is not None:
            count += 1
            decay = min(decay, (1 + count) / (10 + count))
        return decay, count

    # --- updates -------------------------------------------------------------------------------

    def update(self, parameters: Iterable[nn.Parameter] | None = None) -> None:
        """Fold the params into the EMA (call it after every ``optimizer.step()``).

        Without ``parameters`` (or with the same params, in order): one fused pass per bucket.
        Another list of as many tensors (another model's params): sema's multi-tensor op.
        """
        params = self._resolve(parameters)
        self._adopt_shadow_writes()
        decay, count = self._next_decay()
        w = 1.0 - decay
        if params is not None:
            self._update_other(params, w)
            self.num_updates = count
            return
        if self._ema is not None:
            try:
                self._ema._check_placement("update", hot=True)
            except BucketMovedError as error:
                raise BucketMovedError(
                    f"ExponentialMovingAverage.update(): {error}\nWith this drop-in, call ema.to(device=..., "
                    "dtype=...) after moving or converting the model: it rebuilds the buckets where the params now "
                    "are and keeps the average."
                ) from None
            with torch.no_grad():
                for peer, ema, param, backend in self._plan:
                    if peer:
                        tmp = torch.sub(ema, param)
                        tmp.mul_(w)
                        ema.sub_(tmp)
                    else:
                        ops.dispatch_update(ema, param, w, False, backend)
                for peer, emas, views, backend in self._group_plan:
                    if peer:
                        _peer_update_(emas, views, w)
                    else:
                        ops.dispatch_update_multi(emas, views, w, False, backend)
        self.num_updates = count

    def _update_other(self, params: list[Tensor], w: float) -> None:
        for j0, j in self._duplicates:
            if params[j] is not params[j0]:
                raise ValueError(
                    f"ExponentialMovingAverage.update(parameters): this EMA was built with one param at positions "
                    f"{j0} and {j}, which therefore share one shadow; the given params differ there, so they cannot "
                    "both be averaged into it"
                )
        skip = {j for _, j in self._duplicates}
        fused: dict[torch.device, tuple[list[Tensor], list[Tensor]]] = {}
        peer_emas: list[Tensor] = []
        peer_params: list[Tensor] = []
        for j, (e, p) in enumerate(zip(self._shadow_views, params, strict=True)):
            if j in skip:
                continue
            if not isinstance(p, Tensor):
                raise TypeError(f"ExponentialMovingAverage.update: parameters[{j}] is a {type(p).__name__}")
            if p.shape != e.shape or p.device != e.device:
                raise ValueError(
                    f"ExponentialMovingAverage.update: parameters[{j}] is {tuple(p.shape)} on {p.device}; its "
                    f"shadow is {tuple(e.shape)} on {e.device}"
                )
            p = p.detach()
            if e.dtype == torch.float32 and p.dtype in ops.PARAM_DTYPES and p.stride() == e.stride():
                emas, ps = fused.setdefault(e.device, ([], []))
                emas.append(e)
                ps.append(p)
            else:
                peer_emas.append(e)
                peer_params.append(p)
        backend = None if self._backend == "auto" else self._backend
        for emas, ps in fused.values():
            ops.ema_update_multi_(emas, ps, w, backend=backend)
        if peer_emas:
            with torch.no_grad():
                _peer_update_(peer_emas, peer_params, w)

    # --- copies between the params and the EMA ----------------------------------------------

    def copy_to(self, parameters: Iterable[nn.Parameter] | None = None) -> None:
        """Copy the EMA into ``parameters`` (default: this EMA's params; one fused pass per bucket)."""
        params = self._resolve(parameters)
        self._adopt_shadow_writes()
        if params is None and self._in_place("copy_to"):
            if self._ema is not None:
                self._ema.storage.switch_()
            return
        with torch.no_grad():
            for s, p in zip(self._shadow_list, self._params if params is None else params, strict=True):
                p.data.copy_(s)

    def store(self, parameters: Iterable[nn.Parameter] | None = None) -> None:
        """Save a copy of ``parameters`` (default: this EMA's params, one flat copy per bucket)
        in ``collected_params``, for :meth:`restore`."""
        params = self._resolve(parameters)
        if params is None and self._in_place("store"):
            self._store_buckets()
            return
        source = self._params if params is None else params
        self.collected_params = [p.detach().clone() for p in source]
        self._stored = None

    def _store_buckets(self) -> None:
        if self._ema is None:
            self.collected_params = []
            self._stored = None
            return
        storage = self._ema.storage
        view_of: dict[int, Tensor] = {}
        flats: list[tuple[Tensor, Tensor]] = []
        with torch.no_grad():
            for bucket in storage.buckets:
                kept = bucket.param_flat.clone()
                flats.append((bucket.param_flat, kept))
                base = bucket.param_flat.storage_offset()
                for p in bucket.params:
                    view_of[id(p)] = kept.as_strided(p.shape, p.stride(), p.storage_offset() - base)
            for group in storage.tensor_groups:
                for p, v in zip(group.params, group.views, strict=True):
                    kept = v.clone(memory_format=torch.preserve_format)
                    flats.append((v, kept))
                    view_of[id(p)] = kept
        collected = [view_of[id(p)] for p in self._params]
        self.collected_params = collected
        self._stored = (collected, flats)

    def restore(self, parameters: Iterable[nn.Parameter] | None = None) -> None:
        """Copy ``collected_params`` (from :meth:`store`) back into ``parameters``."""
        if self.collected_params is None:
            raise RuntimeError("This ExponentialMovingAverage has no `store()`ed weights to `restore()`")
        params = self._resolve(parameters)
        stored = self._stored
        if (
            params is None
            and stored is not None
            and stored[0] is self.collected_params
            and len(stored[0]) == len(self._params)
            and self._in_place("restore")
        ):
            with torch.no_grad():
                for target, kept in stored[1]:
                    target.copy_(kept)
            return
        with torch.no_grad():
            for c, p in zip(self.collected_params, self._params if params is None else params, strict=True):
                p.data.copy_(c.data)

    @contextlib.contextmanager
    def average_parameters(self, parameters: Iterable[nn.Parameter] | None = None) -> Iterator[None]:
        """Inside the block the params hold the EMA (``store``, ``copy_to``; ``restore`` on exit)."""
        params = self._resolve(parameters)
        self.store(params)
        self.copy_to(params)
        try:
            yield
        finally:
            self.restore(params)

    # --- device, dtype, state ----------------------------------------------------------------

    def to(self, device: torch.device | str | int | None = None, dtype: torch.dtype | None = None) -> None:
        """Rebuild the EMA where the params are now (after ``model.to(device)``) and/or in
        ``dtype``: ``torch.float32`` (an fp32 EMA of any param, fused) or the params' own dtype.
        ``collected_params`` follow, as in torch_ema."""
        self._adopt_shadow_writes()
        unique = list(dict.fromkeys(self._params))
        if device is not None:
            target = torch.device(device)
            elsewhere = sorted({str(p.device) for p in unique if not _same_device(p.device, target)})
            if elsewhere:
                raise ValueError(
                    f"ExponentialMovingAverage.to(device={target}): the params are on {', '.join(elsewhere)}; this "
                    "drop-in keeps the EMA in flat buckets beside the params, so it cannot live on another device. "
                    "Move the model first (model.to(device)), then call ema.to(device)"
                )
        ema_dtype = self._ema_dtype
        if dtype is not None:
            if not isinstance(dtype, torch.dtype):
                raise TypeError(f"ExponentialMovingAverage.to: dtype must be a torch.dtype, got {dtype!r}")
            own = {p.dtype for p in unique}
            if own == {dtype}:
                ema_dtype = None
            elif dtype == torch.float32 and torch.float64 not in own:
                ema_dtype = torch.float32
            else:
                raise TypeError(
                    f"ExponentialMovingAverage.to(dtype={dtype}): sema keeps the EMA in float32 or in each param's "
                    f"own dtype (here {', '.join(sorted(map(str, own)))}); use one of those"
                )
        moved = self._ema is not None and not self._in_place("to")
        if moved or ema_dtype != self._ema_dtype:
            self._rebuild(ema_dtype)
        if self.collected_params is not None and (device is not None or dtype is not None):
            self.collected_params = [
                c.to(device=device, dtype=dtype) if c.is_floating_point() else c.to(device=device)
                for c in self.collected_params
            ]
            self._stored = None

    def _rebuild(self, ema_dtype: torch.dtype | None) -> None:
        values = [v.detach().clone() for v in self._shadow_views]
        self._ema = None
        self._plan = []
        self._group_plan = []
        self._shadow_views = []
        self._shadow_list = []
        self._build(ema_dtype, values)

    def state_dict(self) -> dict:
        """torch_ema's state: ``decay``, ``num_updates``, ``shadow_params`` (the EMA views, not
        copies, as torch_ema returns references) and ``collected_params``."""
        self._adopt_shadow_writes()
        return {
            "decay": self.decay,
            "num_updates": self.num_updates,
            "shadow_params": self.shadow_params,
            "collected_params": self.collected_params,
        }

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a state of torch_ema's format (from torch_ema or from this class). Everything is
        checked before anything changes. As torch_ema does, the shadows take each param's device
        and dtype (an fp32 EMA of bf16 params from ``to(dtype=torch.float32)`` goes back to bf16)."""
        state = copy.deepcopy(state_dict)
        if not isinstance(state, dict) or not {"decay", "num_updates", "shadow_params"} <= state.keys():
            raise ValueError(
                "ExponentialMovingAverage.load_state_dict: not a torch_ema state (keys decay, num_updates, "
                "shadow_params, collected_params)"
            )
        decay, num_updates = state["decay"], state["num_updates"]
        _check_decay(decay)
        if num_updates is not None and not isinstance(num_updates, int):
            raise ValueError(f"Invalid num_updates: {num_updates!r} (an int or None)")
        shadows = state["shadow_params"]
        if not isinstance(shadows, list) or not all(isinstance(s, Tensor) for s in shadows):
            raise ValueError("shadow_params must be a list of Tensors")
        if len(shadows) != len(self._params):
            raise ValueError("Tried to `load_state_dict()` with the wrong number of parameters in the saved state.")
        self._check_values("shadow_params", shadows)
        collected = state.get("collected_params")
        if collected is not None:
            if not isinstance(collected, list) or not all(isinstance(c, Tensor) for c in collected):
                raise ValueError("collected_params must be a list of Tensors")
            if len(collected) != len(shadows):
                raise ValueError("collected_params and shadow_params had different lengths")
            self._check_values("collected_params", collected)
        if self._ema_dtype is not None or (self._ema is not None and not self._in_place("load_state_dict")):
            self._rebuild(None)
        with torch.no_grad():
            for view, value in zip(self._shadow_views, shadows, strict=True):
                view.copy_(value)
        self._shadow_list = list(self._shadow_views)
        self.decay = decay
        self.num_updates = num_updates
        self.collected_params = (
            None
            if collected is None
            else [c.to(device=p.device, dtype=p.dtype) for c, p in zip(collected, self._params, strict=True)]
        )
        self._stored = None


def _switch_ema(params: list[nn.Parameter], ema_dtype: torch.dtype | None, backend: str) -> SwitchEMA:
    """A plain ``SwitchEMA`` over ``params`` (each once), frozen ones included: SwitchEMA tracks
    the params that require grad, so those that do not are made to for its construction only."""
    container = nn.ParameterList(dict.fromkeys(params))
    frozen = [p for p in container if not p.requires_grad]
    for p in frozen:
        p.requires_grad_(True)
    try:
        return SwitchEMA(container, decay=0.0, switch_every=None, ema_dtype=ema_dtype, backend=backend)
    finally:
        for p in frozen:
            p.requires_grad_(False)


def _check_decay(decay: object) -> None:
    if isinstance(decay, bool) or not isinstance(decay, (int, float)):
        raise TypeError(f"ExponentialMovingAverage: decay must be a float in [0, 1], got {decay!r}")
    if math.isnan(decay) or decay < 0.0 or decay > 1.0:
        raise ValueError(f"Decay must be between 0 and 1 (got {decay!r})")


def _same_device(a: torch.device, b: torch.device) -> bool:
    return a.type == b.type and (a.index is None or b.index is None or a.index == b.index)

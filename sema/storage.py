"""Where the EMA bytes live: the flat buckets and multi-tensor groups of one ``SwitchEMA``, and
the ops that run over all of them.

``EMAStorage`` answers "which EMA tensor belongs to which param, and is every param still where
it was put?". It knows nothing of decays or when to switch: ``SwitchEMA`` hands it the weights.

- Flat buckets (``flatten=True``): params of one (device, dtype) moved into one contiguous buffer
  (:mod:`sema.buckets`), one fused launch per bucket.
- Tensor groups (``flatten=False``, or DTensor params such as FSDP2 shards): params stay where
  they are, one EMA tensor per param, one multi-tensor launch per group.
"""

from __future__ import annotations

import dataclasses
import functools
import operator
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from sema import ops
from sema.buckets import BucketMovedError, FlatBucket, build_buckets, ema_buffer, plan_buckets

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # a torch built without distributed
    DTensor = None

_storage_use_count = getattr(torch._C, "_storage_Use_Count", None)

# id(param) -> a live bucket that holds it (the bucket keeps the param alive, so the id is not
# reused while the entry exists): how a second SwitchEMA of one model finds the first one's buckets.
_LIVE_BUCKETS: weakref.WeakValueDictionary[int, FlatBucket] = weakref.WeakValueDictionary()

# No kernel has an fp64 path: fp64 buckets and groups run on the reference backend, in fp64.
FP64_BACKEND = "torch"

# Param storages (by address) held by a SwitchEMA inside swapped(): every SwitchEMA over the same
# params refuses to update, switch or swap until that block ends.
ACTIVE_SWAPS: dict[int, object] = {}


def _bucket_holding(p: Tensor) -> FlatBucket | None:
    bucket = _LIVE_BUCKETS.get(id(p))
    if bucket is None:
        return None
    for q, name in zip(bucket.params, bucket.names, strict=True):
        if q is p:
            return None if name in bucket.moved() else bucket
    return None


def _share_bucket(
    bucket: FlatBucket,
    ours: Sequence[tuple[str, nn.Parameter]],
    ema_dtype: torch.dtype,
    ema_device: torch.device | None = None,
) -> FlatBucket:
    """``bucket``'s params and param buffer, under our names, with a new EMA buffer initialised
    to the params: a second EMA of the same params, still one launch per bucket."""
    name_of = {id(p): n for n, p in ours}
    ema_flat = ema_buffer(bucket.param_flat.numel(), ema_dtype, bucket.device, ema_device)
    with torch.no_grad():
        ema_flat.copy_(bucket.param_flat)
    return dataclasses.replace(bucket, ema_flat=ema_flat, names=[name_of[id(p)] for p in bucket.params])


# Bumped by a global hook whenever any module registers a parameter (setattr of a Parameter,
# register_parameter, load_state_dict(assign=True)): the only ways a module slot gets a new
# Parameter object short of writing module._parameters by hand.
_registrations = 0
_registration_hook = None


def _count_registration(module: nn.Module, name: str, param: object) -> None:
    global _registrations
    _registrations += 1


def registrations() -> int:
    """How many parameter registrations the global hook has seen (installed on first call)."""
    global _registration_hook
    if _registration_hook is None:
        _registration_hook = nn.modules.module.register_module_parameter_registration_hook(_count_registration)
    return _registrations


def is_dtensor(t: Tensor) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def local_tensor(t: Tensor) -> Tensor:
    """The tensor holding this rank's elements: the local shard of a DTensor, else ``t``."""
    if is_dtensor(t):
        return t._local_tensor  # what to_local() returns, without an autograd node per call
    return t.detach()


def as_param_layout(param: Tensor, local: Tensor) -> Tensor:
    """``local`` presented like ``param``: a DTensor with its mesh and placements (no
    communication), or ``local`` itself."""
    if is_dtensor(param):
        return DTensor.from_local(
            local, param.device_mesh, param.placements, run_check=False, shape=param.shape, stride=param.stride()
        )
    return local


@dataclass
class TensorGroup:
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
        locals_ = [local_tensor(p) for p in self.params]
        ptrs = tuple(t.data_ptr() for t in locals_)
        if ptrs == self.data_ptrs:
            return []
        # The cached views follow their storage (share_memory() moves it in place: no move).
        moved = [
            n
            for n, t, v in zip(self.names, locals_, self.views, strict=True)
            if t.data_ptr() != v.data_ptr() or t.shape != v.shape or t.stride() != v.stride()
        ]
        if not moved:
            self.data_ptrs = ptrs
        return moved


def _build_group(
    device: torch.device, dtype: torch.dtype, members: Sequence[tuple[str, nn.Parameter]], ema_dtype: torch.dtype
) -> TensorGroup:
    params = [p for _, p in members]
    views = [local_tensor(p) for p in params]
    with torch.no_grad():
        emas = [v.to(ema_dtype, copy=True, memory_format=torch.preserve_format) for v in views]
    return TensorGroup(device, dtype, [n for n, _ in members], params, emas, views, tuple(v.data_ptr() for v in views))


class ModelSlots:
    """Where the model holds each tracked param: ``load_state_dict(assign=True)`` puts new
    ``Parameter`` objects there, which a data-pointer check alone cannot see."""

    def __init__(self, model: nn.Module, named: Sequence[tuple[str, nn.Parameter]]) -> None:
        tracked = {id(p): n for n, p in named}
        self._slots = [
            (module._parameters, key, p, tracked[id(p)])
            for module in model.modules()
            for key, p in module._parameters.items()
            if p is not None and id(p) in tracked
        ]
        self._dicts = [d for d, _, _, _ in self._slots]
        self._keys = [k for _, k, _, _ in self._slots]
        self._params = [p for _, _, p, _ in self._slots]

    def replaced(self) -> list[str]:
        if all(map(operator.is_, map(dict.get, self._dicts, self._keys), self._params)):
            return []
        return [f"{n} (replaced by a new Parameter)" for d, k, p, n in self._slots if d.get(k) is not p]


# Elements per host-to-device copy when an EMA in host memory goes into the params (switch,
# swapped): bounds the temporary a cast across devices may take on the GPU.
HOST_TO_DEVICE_CHUNK = 1 << 22

# update() checks every param's placement on one call in this many, and on every call where a
# bucket's storage lost a reference or a module registered a parameter (see
# EMAStorage.maybe_moved): O(buckets) per call instead of O(params).
FULL_PLACEMENT_CHECK_EVERY = 64


class PlacementGuard:
    """Whether every tracked param still lives where ``storage`` put it, for the EMA class named
    ``owner``: on a hot call (``update()``) from the O(buckets) signals, with the full O(params)
    check on one call in ``FULL_PLACEMENT_CHECK_EVERY`` and whenever a signal changes; on every
    other call, the full check. Also refuses while another EMA of these params is inside
    ``swapped()``."""

    def __init__(self, owner: str, storage: EMAStorage, slots: ModelSlots) -> None:
        self.owner = owner
        self.storage = storage
        self.slots = slots
        self._hot_checks = 0
        self._registrations_seen = registrations()

    def check(self, where: str, hot: bool = False) -> None:
        if ACTIVE_SWAPS and not self.storage.param_storages().isdisjoint(ACTIVE_SWAPS):
            raise RuntimeError(
                f"{self.owner}.{where}() while another SwitchEMA of these params is inside swapped(): the params "
                "hold that EMA there; call it after that with-block"
            )
        if hot:
            self._hot_checks += 1
            if (
                self._hot_checks % FULL_PLACEMENT_CHECK_EVERY
                and registrations() == self._registrations_seen
                and not self.storage.maybe_moved()
            ):
                return
        registered = registrations()
        moved = self.storage.moved() + self.slots.replaced()
        if moved:
            shown = ", ".join(moved[:8]) + (f" and {len(moved) - 8} more" if len(moved) > 8 else "")
            raise BucketMovedError(
                f"{self.owner}.{where}(): {len(moved)} param(s) no longer live where {self.owner} put them: {shown}. "
                "Something replaced param.data (model.to()/.half(), load_state_dict(assign=True), "
                f"param.data = ...). Move or convert the model before building {self.owner}, and load weights "
                "with load_state_dict(assign=False)."
            )
        self.storage.remember_placement()
        self._registrations_seen = registered


class EMAStorage:
    """The EMA of ``named`` params: flat buckets where params can be re-pointed, tensor groups
    elsewhere; ``backends`` maps each device to the backend that serves it."""

    def __init__(
        self,
        named: Sequence[tuple[str, nn.Parameter]],
        ema_dtype: torch.dtype | None,
        flatten: bool,
        backends: dict[torch.device, str],
        copy_only: set[str] | frozenset[str] = frozenset(),
        num_emas: int = 1,
        ema_device: torch.device | None = None,
        keep_originals: bool = False,
    ) -> None:
        self.backends = backends
        # Offload: every EMA buffer lives on ema_device (host memory), the params stay where they
        # are; backends then maps ema_device to the backend that updates the EMA there.
        self.ema_device = ema_device
        self.num_emas = num_emas
        self.buckets: list[FlatBucket] = []
        self.tensor_groups: list[TensorGroup] = []
        # Copy-only params (tracked, but refreshed with weight 1 at every update) get buckets and
        # groups of their own: one launch each, never one per tensor.
        self._copy_only: set[int] = set()  # ids of the buckets and groups that copy
        averaged = [(n, p) for n, p in named if n not in copy_only]
        copied = [(n, p) for n, p in named if n in copy_only]
        fresh: list[tuple[torch.device, torch.dtype, list, torch.dtype, bool]] = []
        shared: list[tuple[FlatBucket, list, torch.dtype, bool]] = []
        grouped: list[tuple[torch.device, torch.dtype, list, torch.dtype, bool]] = []
        for members_of, copies in ((averaged, False), (copied, True)):
            for (device, dtype), members in plan_buckets(members_of).items():
                # fp64 params always get an fp64 EMA: an fp32 one would lose what they hold.
                target = dtype if ema_dtype is None or dtype == torch.float64 else ema_dtype
                # DTensor params (FSDP2 shards) cannot be re-pointed into a bucket: they always
                # use the multi-tensor mode, on their local shards, with no communication.
                if not flatten or any(is_dtensor(p) for _, p in members):
                    grouped.append((device, dtype, members, target, copies))
                    continue
                # Params another SwitchEMA already bucketed stay where they are: a bucket whose
                # params are all ours is shared (its param buffer, with an EMA buffer of our own);
                # part of a bucket becomes a tensor group. The rest get buckets of their own.
                outside, inside = [], {}
                for name, p in members:
                    bucket = _bucket_holding(p)
                    if bucket is None:
                        outside.append((name, p))
                    else:
                        inside.setdefault(id(bucket), (bucket, []))[1].append((name, p))
                for bucket, ours in inside.values():
                    if {id(p) for _, p in ours} == {id(p) for p in bucket.params}:
                        shared.append((bucket, ours, target, copies))
                    else:
                        grouped.append((device, dtype, ours, target, copies))
                if outside:
                    fresh.append((device, dtype, outside, target, copies))
        if ema_device is not None and grouped:
            names = [n for _, _, members, _, _ in grouped for n, _ in members]
            raise ValueError(
                f"SwitchEMA(ema_device='cpu'): {len(names)} param(s) cannot go into a bucket of their own "
                f"({', '.join(names[:4])}{' ...' if len(names) > 4 else ''}): another SwitchEMA holds them in a bucket "
                "with params this one does not track. An offloaded EMA runs on flat buckets only: build it over the "
                "same params as the other one (or over the whole model), or keep it beside the params"
            )
        # All or nothing: if anything fails once buckets are built (an allocation, say), every
        # param points at its old memory again (build_buckets itself undoes a failed bucket).
        for device, dtype, members, target, copies in grouped:
            self.tensor_groups.append(_build_group(device, dtype, members, target))
            if copies:
                self._copy_only.add(id(self.tensor_groups[-1]))
        moving = [p for _, _, members, _, _ in fresh for _, p in members]
        originals = [p.data for p in moving]
        built = build_buckets(
            [(device, dtype, members, target) for device, dtype, members, target, _ in fresh], ema_device
        )
        try:
            for bucket, (*_, copies) in zip(built, fresh, strict=True):
                self._add_bucket(bucket, copies)
            for bucket, ours, target, copies in shared:
                self._add_bucket(_share_bucket(bucket, ours, target, ema_device), copies)
            # EMAs 1..K-1 of K decays, beside EMA 0 (the bucket's ema_flat, the group's emas); all
            # K start as copies of the params and are updated by one fused pass.
            self._more: dict[int, list] = {
                id(b): [b.ema_flat.clone() for _ in range(num_emas - 1)] for b in self.buckets
            }
            for g in self.tensor_groups:
                self._more[id(g)] = [[e.clone() for e in g.emas] for _ in range(num_emas - 1)]
        except BaseException:
            for p, old in zip(moving, originals, strict=True):
                p.data = old
            raise
        # With keep_originals, the params' old memory stays alive (no more than during the build)
        # until the caller calls forget_originals(), or restore_originals() after a later failure.
        self._originals = list(zip(moving, originals, strict=True)) if keep_originals else None
        self._ones: dict[tuple[torch.device, torch.dtype], Tensor] = {}
        self._bucket_storages = [b.param_flat.untyped_storage() for b in self.buckets]
        # Their StorageImpl addresses, stable while the list above keeps them alive: maybe_moved()
        # runs in every update() and maps over these without touching the Python wrappers.
        self._bucket_cdata = tuple(s._cdata for s in self._bucket_storages)
        self._use_counts: tuple[int, ...] | None = None
        self.remember_placement()

    def restore_originals(self) -> None:
        """After a failure once the storage was built (``SwitchEMA``'s offload engine): every param
        this storage moved into a bucket points at its old memory again, as before the build."""
        for p, old in self._originals or ():
            p.data = old
        self._originals = None

    def forget_originals(self) -> None:
        """The build is final: free the params' old memory."""
        self._originals = None

    def backend_of(self, holder: FlatBucket | TensorGroup) -> str:
        """The backend that serves a bucket or group: the device's, except for fp64, which only
        the torch backend computes (in fp64, its weight included)."""
        if holder.dtype == torch.float64:
            return FP64_BACKEND
        return self.backends[holder.device if self.ema_device is None else self.ema_device]

    @property
    def has_fp64(self) -> bool:
        return any(h.dtype == torch.float64 for h in (*self.buckets, *self.tensor_groups))

    def bucket_emas(self, bucket: FlatBucket) -> list[Tensor]:
        """The K flat EMA buffers of ``bucket``, EMA 0 first."""
        return [bucket.ema_flat, *self._more[id(bucket)]]

    def group_emas(self, group: TensorGroup) -> list[list[Tensor]]:
        """The K EMAs of ``group``, each a list with one tensor per param, EMA 0 first."""
        return [group.emas, *self._more[id(group)]]

    def _add_bucket(self, bucket: FlatBucket, copies: bool) -> None:
        self.buckets.append(bucket)
        if copies:
            self._copy_only.add(id(bucket))
        for p in bucket.params:
            _LIVE_BUCKETS[id(p)] = bucket

    def param_storages(self) -> set[int]:
        """The storages the tracked params live in (by address): what a swap writes."""
        keys = {b.param_flat.untyped_storage().data_ptr() for b in self.buckets}
        return keys | {v.untyped_storage().data_ptr() for g in self.tensor_groups for v in g.views}

    def named_emas(self, index: int = 0) -> Iterator[tuple[str, nn.Parameter, Tensor]]:
        """(param name, param, its EMA ``index`` shaped like the param's local tensor), in model
        order per group."""
        for bucket in self.buckets:
            flat = self.bucket_emas(bucket)[index]
            for i, (name, p) in enumerate(zip(bucket.names, bucket.params, strict=False)):
                view = bucket.ema_view(i)
                yield name, p, view if index == 0 else flat.as_strided(view.shape, view.stride(), view.storage_offset())
        for group in self.tensor_groups:
            yield from zip(group.names, group.params, self.group_emas(group)[index], strict=False)

    def moved(self) -> list[str]:
        """Names of the params that no longer live where they were put."""
        moved = [n for b in self.buckets for n in b.moved()]
        return moved + [n for g in self.tensor_groups for n in g.moved()]

    def _bucket_use_counts(self) -> tuple[int, ...] | None:
        if _storage_use_count is None:
            return None
        return tuple(map(_storage_use_count, self._bucket_cdata))

    def remember_placement(self) -> None:
        """Take the current state as checked: :meth:`maybe_moved` compares against it."""
        self._use_counts = self._bucket_use_counts()

    def maybe_moved(self) -> bool:
        """O(buckets), not O(params): False only when no bucket's storage lost a reference since
        :meth:`remember_placement`. Every param holds one reference to its bucket's storage, so
        re-pointing any param (``.to()``, ``.half()``, ``param.data = ...``) changes the count;
        other references taken at the same moment (a ``state_dict()`` kept alive, a ``detach()``)
        can mask that, which is why callers still run the full check now and then. Tensor groups
        have no shared storage and always report True."""
        if self.tensor_groups or self._use_counts is None:
            return True
        return self._bucket_use_counts() != self._use_counts

    def version_counters(self) -> list[tuple[str, Tensor, bool]]:
        """(name, a tensor whose ``_version`` counts in-place writes to that param, whether a write
        there while the EMA is swapped in lands in the EMA on the swap back): the latter is true
        where the swap exchanges the slots (equal dtypes, bf16 params with an fp32 EMA) and false
        where it goes through a scratch copy (fp16 params with an fp32 EMA)."""
        out = []
        for bucket in self.buckets:
            exchanged = self.ema_device is None and (
                bucket.ema_flat.dtype == bucket.dtype or bucket.dtype == torch.bfloat16
            )
            out += [(n, p, exchanged) for n, p in zip(bucket.names, bucket.params, strict=True)]
        for group in self.tensor_groups:
            exchanged = group.emas[0].dtype == group.dtype or group.dtype == torch.bfloat16
            out += [(n, v, exchanged) for n, v in zip(group.names, group.views, strict=True)]
        return out

    def _dense_pairs(self, index: int = 0) -> Iterator[tuple[Tensor, Tensor, str]]:
        """(EMA ``index``, param, backend) as flat 1-D tensors: one pair per bucket, one per
        grouped param."""
        for bucket in self.buckets:
            yield self.bucket_emas(bucket)[index], bucket.param_flat, self.backend_of(bucket)
        for group in self.tensor_groups:
            for e, v in zip(self.group_emas(group)[index], group.views, strict=True):
                yield ops.dense_view(e), ops.dense_view(v), self.backend_of(group)

    def update_(
        self,
        weights: dict[torch.device, Tensor],
        switch: bool,
        switch_index: int = 0,
        weights64: dict[torch.device, Tensor] | None = None,
        piece: int | None = None,
    ) -> None:
        """``ema <- lerp(ema, param, w)`` (then ``param <- ema`` with ``switch``), one fused launch
        per bucket and one multi-tensor launch per group. With K EMAs, ``weights`` holds a (K,)
        tensor per device, one pass reads the params once for all K, and the switch takes EMA
        ``switch_index``. ``piece``: at most that many elements per bucket launch (a multiple of
        16 keeps every piece aligned), so that other streams' kernels get in between."""
        copies = self._copy_only
        if weights64:

            def weight_of(holder: FlatBucket | TensorGroup) -> Tensor:
                return (weights64 if holder.dtype == torch.float64 else weights)[holder.device]
        else:

            def weight_of(holder: FlatBucket | TensorGroup) -> Tensor:
                return weights[holder.device]

        if self.num_emas > 1:
            index = switch_index if switch else None
            for bucket in self.buckets:
                w = self._all_ones(bucket) if copies and id(bucket) in copies else weight_of(bucket)
                emas, backend = self.bucket_emas(bucket), self.backend_of(bucket)
                for start, end in _pieces(bucket.param_flat.numel(), piece):
                    ops.dispatch_update_k([e[start:end] for e in emas], bucket.param_flat[start:end], w, index, backend)
            for group in self.tensor_groups:
                w = self._all_ones(group) if copies and id(group) in copies else weight_of(group)
                ops.dispatch_update_k_multi(self.group_emas(group), group.views, w, index, self.backend_of(group))
            return
        for bucket in self.buckets:
            w = 1.0 if copies and id(bucket) in copies else weight_of(bucket)
            if piece is None or bucket.param_flat.numel() <= piece:
                ops.dispatch_update(bucket.ema_flat, bucket.param_flat, w, switch, self.backend_of(bucket))
                continue
            for start, end in _pieces(bucket.param_flat.numel(), piece):
                ops.dispatch_update(
                    bucket.ema_flat[start:end], bucket.param_flat[start:end], w, switch, self.backend_of(bucket)
                )
        for group in self.tensor_groups:
            w = 1.0 if copies and id(group) in copies else weight_of(group)
            ops.dispatch_update_multi(group.emas, group.views, w, switch, self.backend_of(group))

    def _all_ones(self, holder: FlatBucket | TensorGroup) -> Tensor:
        dtype = torch.float64 if holder.dtype == torch.float64 else torch.float32
        w = self._ones.get((holder.device, dtype))
        if w is None:
            w = self._ones[(holder.device, dtype)] = torch.ones(self.num_emas, dtype=dtype, device=holder.device)
        return w

    def is_copy_only(self, holder: FlatBucket | TensorGroup) -> bool:
        """Whether ``holder``'s EMA is a copy refreshed with weight 1 at every update."""
        return id(holder) in self._copy_only

    def switch_(self, index: int = 0) -> None:
        """``param <- EMA index`` cast to each param's dtype; the EMA is unchanged."""
        if self.ema_device is not None:
            for bucket in self.buckets:
                self._switch_offloaded(bucket, index)
            return
        for ema, param, backend in self._dense_pairs(index):
            ops.dispatch_switch(ema, param, backend)

    def _switch_offloaded(self, bucket: FlatBucket, index: int) -> None:
        """``param <- EMA`` for an EMA in host memory: on the host where the params are, else
        host to device in chunks (a cast of a whole bucket would stage a bucket-sized copy)."""
        ema = self.bucket_emas(bucket)[index]
        if bucket.device == ema.device:
            ops.dispatch_switch(ema, bucket.param_flat, self.backend_of(bucket))
            return
        with torch.no_grad():
            for start in range(0, ema.numel(), HOST_TO_DEVICE_CHUNK):
                end = min(start + HOST_TO_DEVICE_CHUNK, ema.numel())
                bucket.param_flat[start:end].copy_(ema[start:end])

    def swap_in(self, undo: list[Callable[[], None]], index: int = 0) -> None:
        """Put EMA ``index`` into the params, appending to ``undo`` the actions (to run in reverse
        order) that restore params and EMA bit for bit; if a swap fails midway, ``undo`` holds
        those of the swaps already done. An EMA in host memory is copied in, and the params
        are kept in a host copy meanwhile (the EMA itself is not touched)."""
        if self.ema_device is not None:
            for bucket in self.buckets:
                saved = bucket.param_flat.to("cpu", copy=True)
                undo.append(functools.partial(_copy_back, bucket.param_flat, saved))
                self._switch_offloaded(bucket, index)
            return
        for ema, param, backend in self._dense_pairs(index):
            undo.append(_swap_in(ema, param, backend))

    def copy_params_to_ema_(self) -> None:
        """Every EMA <- params (the start of a fresh average)."""
        with torch.no_grad():
            for bucket in self.buckets:
                for flat in self.bucket_emas(bucket):
                    flat.copy_(bucket.param_flat)
            for group in self.tensor_groups:
                for emas in self.group_emas(group):
                    for e, v in zip(emas, group.views, strict=True):
                        e.copy_(v)

    def all_finite(self) -> bool:
        """Whether every param is finite (one host sync)."""
        flags = [torch.isfinite(b.param_flat).all() for b in self.buckets]
        flags += [torch.isfinite(v).all() for g in self.tensor_groups for v in g.views]
        return bool(torch.stack([f.cpu() for f in flags]).all())


def _pieces(numel: int, piece: int | None) -> list[tuple[int, int]]:
    if piece is None or numel <= piece:
        return [(0, numel)]
    return [(start, min(start + piece, numel)) for start in range(0, numel, piece)]


def _copy_back(param: Tensor, saved: Tensor) -> None:
    with torch.no_grad():
        param.copy_(saved)


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

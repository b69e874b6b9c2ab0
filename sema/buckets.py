"""Flat parameter buckets: one contiguous buffer per (device, dtype) group of trainable params.

Each param's ``.data`` is re-pointed to a view of its bucket, so the ``Parameter`` objects,
optimizer references and autograd stay intact while one kernel launch covers the bucket.
Each param starts at a 16-byte aligned offset (so kernels can use 16-byte vector loads on
every param); the padding between params is zero in both the param and the EMA buffer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

ALIGN_BYTES = 16


class BucketMovedError(RuntimeError):
    """A bucketed param no longer lives in its bucket (``.to()``, ``load_state_dict(assign=True)``,
    ``param.data = ...``): the EMA would silently stop following it."""


@dataclass
class FlatBucket:
    """Params of one (device, dtype), their flat storage and the matching EMA buffer.

    ``param_flat`` and ``ema_flat`` are 1-D, equal length (padding included); param ``i``
    occupies ``[offsets[i], offsets[i] + numels[i])`` of both.
    """

    device: torch.device
    dtype: torch.dtype
    param_flat: Tensor
    ema_flat: Tensor
    names: list[str]
    params: list[nn.Parameter]
    offsets: list[int]
    numels: list[int]
    data_ptrs: tuple[int, ...] = field(default=())

    def ema_view(self, index: int) -> Tensor:
        """The EMA of param ``index``, shaped (and strided) like the param."""
        p = self.params[index]
        start = self.ema_flat.storage_offset() + self.offsets[index]
        return self.ema_flat.as_strided(p.shape, _dense_strides(p), start)

    def moved(self) -> list[str]:
        """Names of the params that no longer point into this bucket (empty when all do)."""
        if tuple(map(Tensor.data_ptr, self.params)) == self.data_ptrs:
            return []
        return [n for n, p, ptr in zip(self.names, self.params, self.data_ptrs, strict=False) if p.data_ptr() != ptr]


def _dense_strides(t: Tensor) -> tuple[int, ...]:
    """Strides of ``t`` when it is dense (contiguous, channels_last, ...), else contiguous ones,
    so a param keeps its memory format when it moves into the bucket."""
    return torch.empty_like(t, device="meta").stride()


def _align(n: int, dtype: torch.dtype) -> int:
    step = max(1, ALIGN_BYTES // torch.empty((), dtype=dtype).element_size())
    return -(-n // step) * step


def plan_buckets(
    named_params: Sequence[tuple[str, nn.Parameter]],
) -> dict[tuple[torch.device, torch.dtype], list[tuple[str, nn.Parameter]]]:
    """Group params by (device, dtype), keeping model order inside each group."""
    groups: dict[tuple[torch.device, torch.dtype], list[tuple[str, nn.Parameter]]] = {}
    for name, p in named_params:
        groups.setdefault((p.device, p.dtype), []).append((name, p))
    return groups


def build_bucket(
    device: torch.device, dtype: torch.dtype, members: Sequence[tuple[str, nn.Parameter]], ema_dtype: torch.dtype
) -> FlatBucket:
    """Copy ``members`` into one flat buffer, re-point each ``param.data`` to its view and
    allocate the EMA buffer (initialised to the params, cast to ``ema_dtype``)."""
    offsets, numels = [], []
    total = 0
    for _, p in members:
        total = _align(total, dtype)
        offsets.append(total)
        numels.append(p.numel())
        total += p.numel()
    total = _align(total, dtype)
    flat = torch.zeros(total, dtype=dtype, device=device)
    with torch.no_grad():
        for (_, p), offset in zip(members, offsets, strict=False):
            view = flat.as_strided(p.shape, _dense_strides(p), offset)
            view.copy_(p.data)
            p.data = view
        ema_flat = flat.to(ema_dtype, copy=True)
    params = [p for _, p in members]
    return FlatBucket(
        device=device,
        dtype=dtype,
        param_flat=flat,
        ema_flat=ema_flat,
        names=[n for n, _ in members],
        params=params,
        offsets=offsets,
        numels=numels,
        data_ptrs=tuple(p.data_ptr() for p in params),
    )

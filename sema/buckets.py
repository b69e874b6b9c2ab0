"""Flat parameter buckets: one contiguous buffer per (device, dtype) group of trainable params.

Each param's ``.data`` is re-pointed to a view of its bucket, so the ``Parameter`` objects,
optimizer references and autograd stay intact while one kernel launch covers the bucket.
Each param starts at a 16-byte aligned offset (so kernels can use 16-byte vector loads on
every param); the padding between params is zero in both the param and the EMA buffer.
"""

from __future__ import annotations

import ctypes
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

ALIGN_BYTES = 16

# CPU buckets of this size and more ask Linux for transparent huge pages (see _empty).
HUGE_PAGE_BYTES = 2 << 20
HUGE_PAGE_MIN_BYTES = 4 * HUGE_PAGE_BYTES
_MADV_HUGEPAGE = 14  # <sys/mman.h> on Linux
_LINUX = sys.platform == "linux"


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
    flat = _empty(total, dtype, device).zero_()
    with torch.no_grad():
        for (_, p), offset in zip(members, offsets, strict=False):
            view = flat.as_strided(p.shape, _dense_strides(p), offset)
            view.copy_(p.data)
            p.data = view
        ema_flat = _empty(total, ema_dtype, device).copy_(flat)
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


def huge_pages_wanted() -> bool:
    """False when ``SEMA_HUGEPAGES=0`` (or off/false/no) turns the huge-page request off."""
    return os.environ.get("SEMA_HUGEPAGES", "1").strip().lower() not in ("0", "off", "false", "no")


def _empty(numel: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """An uninitialised bucket buffer. On Linux CPUs, one of HUGE_PAGE_MIN_BYTES or more is
    madvise()d MADV_HUGEPAGE over its 2 MiB-aligned interior before sema writes it, so that where
    transparent huge pages are enabled ("always" or "madvise") the kernel backs it with 2 MiB
    pages: every EMA op streams the whole bucket, and with 4 KiB pages that is a TLB miss per
    4 KiB. On the 2-core VM of bench/results/torch_formulations-cpp-*.json ("4 KiB pages" rows)
    that gained 3% in the median. Best effort: large buffers come from a fresh mmap, but glibc
    may serve one under 32 MiB from heap memory used before (its pages stay as they are; the
    hint stays on that range after the bucket is freed, which is harmless), and on any failure
    the buffer simply stays on normal pages."""
    flat = torch.empty(numel, dtype=dtype, device=device)
    nbytes = flat.numel() * flat.element_size()
    if device.type == "cpu" and _LINUX and nbytes >= HUGE_PAGE_MIN_BYTES and huge_pages_wanted():
        start = -(-flat.data_ptr() // HUGE_PAGE_BYTES) * HUGE_PAGE_BYTES
        end = (flat.data_ptr() + nbytes) // HUGE_PAGE_BYTES * HUGE_PAGE_BYTES
        if end > start:
            _madvise_hugepage(start, end - start)
    return flat


def _madvise_hugepage(address: int, length: int) -> bool:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        madvise = libc.madvise
        madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
        madvise.restype = ctypes.c_int
        return madvise(address, length, _MADV_HUGEPAGE) == 0
    except (OSError, AttributeError):
        return False

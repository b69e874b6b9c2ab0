"""The EMA update on a flat bucket: ``ema <- lerp(ema, param, w)`` in fp32, optionally followed by
the SEMA switch ``param <- cast(ema)`` in the same pass."""

from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

from .launch import NUM_WARPS, block_size, device_guard


@triton.jit
def update_block(ema_ptr, param_ptr, offsets, n_elements, weight, SWITCH: tl.constexpr, MASKED: tl.constexpr):
    """One block of the update; shared with the multi-tensor kernel. Only the last block of a
    tensor is ``MASKED``: a mask that is not constant over 16 bytes splits vector loads."""
    mask = offsets < n_elements if MASKED else None
    ema = tl.load(ema_ptr + offsets, mask=mask).to(tl.float32)
    param = tl.load(param_ptr + offsets, mask=mask).to(tl.float32)
    # torch.lerp's two branches, so weight = 1 copies param exactly. Explicit fmas (one rounding
    # each), so the result does not depend on Triton's fp-fusion setting.
    diff = param - ema
    result = tl.where(weight < 0.5, tl.fma(diff, weight, ema), tl.fma(-diff, 1.0 - weight, param))
    tl.store(ema_ptr + offsets, result.to(ema_ptr.dtype.element_ty), mask=mask)
    if SWITCH:
        tl.store(param_ptr + offsets, result.to(param_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _ema_update_kernel(
    ema_ptr,
    param_ptr,
    weight,
    n_elements,
    BLOCK: tl.constexpr,
    SWITCH: tl.constexpr,
    WEIGHT_IS_TENSOR: tl.constexpr,
):
    block_start = tl.program_id(0).to(tl.int64) * BLOCK  # int64: buckets past 2**31 elements
    offsets = tl.max_contiguous(tl.multiple_of(block_start + tl.arange(0, BLOCK), BLOCK), BLOCK)
    weight_value = tl.load(weight) if WEIGHT_IS_TENSOR else weight
    if block_start + BLOCK <= n_elements:
        update_block(ema_ptr, param_ptr, offsets, n_elements, weight_value, SWITCH, MASKED=False)
    else:
        update_block(ema_ptr, param_ptr, offsets, n_elements, weight_value, SWITCH, MASKED=True)


def _launch_update(ema: Tensor, param: Tensor, w: float | Tensor, switch: bool) -> None:
    n_elements = ema.numel()
    if n_elements == 0:
        return
    block = block_size(ema.dtype, param.dtype)
    grid = (triton.cdiv(n_elements, block),)
    with device_guard(ema.device):
        _ema_update_kernel[grid](
            ema,
            param,
            w,
            n_elements,
            BLOCK=block,
            SWITCH=switch,
            WEIGHT_IS_TENSOR=isinstance(w, Tensor),
            num_warps=NUM_WARPS,
            enable_fp_fusion=False,
        )


def ema_update_(ema: Tensor, param: Tensor, w: float | Tensor, switch: bool = False) -> None:
    """``ema <- lerp(ema, param, w)`` in fp32 (``torch.lerp``'s formula); with ``switch``, then
    ``param <- ema`` rounded to nearest even into the param dtype, in the same pass.

    ``ema``, ``param``: 1-D contiguous, equal length (validated by :mod:`sema.ops`); ``param``
    fp32/bf16/fp16, ``ema`` fp32 or the param dtype. ``w``: a float in [0, 1] or a 0-d fp32
    tensor on the same device, read by the kernel (no host sync, CUDA-graph capturable).
    Bytes per element: read ema + param, write ema (10 for fp32 EMA/bf16 params), plus the
    param write with ``switch`` (12).
    """
    _launch_update(ema, param, w, switch)

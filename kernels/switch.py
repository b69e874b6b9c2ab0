"""The SEMA switch on a flat bucket: ``param <- cast(ema)``, the EMA untouched."""

from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

from .launch import NUM_WARPS, block_size, device_guard


@triton.jit
def _switch_block(ema_ptr, param_ptr, offsets, n_elements, MASKED: tl.constexpr):
    mask = offsets < n_elements if MASKED else None
    ema = tl.load(ema_ptr + offsets, mask=mask)
    tl.store(param_ptr + offsets, ema.to(param_ptr.dtype.element_ty), mask=mask)  # round to nearest even


@triton.jit
def _switch_kernel(ema_ptr, param_ptr, n_elements, BLOCK: tl.constexpr):
    block_start = tl.program_id(0).to(tl.int64) * BLOCK  # int64: buckets past 2**31 elements
    offsets = tl.max_contiguous(tl.multiple_of(block_start + tl.arange(0, BLOCK), BLOCK), BLOCK)
    if block_start + BLOCK <= n_elements:
        _switch_block(ema_ptr, param_ptr, offsets, n_elements, MASKED=False)
    else:
        _switch_block(ema_ptr, param_ptr, offsets, n_elements, MASKED=True)


def _launch_switch(ema: Tensor, param: Tensor) -> None:
    n_elements = ema.numel()
    if n_elements == 0:
        return
    block = block_size(ema.dtype, param.dtype)
    grid = (triton.cdiv(n_elements, block),)
    with device_guard(ema.device):
        _switch_kernel[grid](ema, param, n_elements, BLOCK=block, num_warps=NUM_WARPS, enable_fp_fusion=False)


def switch_(ema: Tensor, param: Tensor) -> None:
    """``param <- ema`` cast to the param dtype (round to nearest even); the EMA is unchanged.

    ``ema``, ``param``: 1-D contiguous, equal length; ``param`` fp32/bf16/fp16, ``ema`` fp32 or
    the param dtype. Bytes per element: read ema, write param (6 for fp32 EMA/bf16 params).
    """
    _launch_switch(ema, param)

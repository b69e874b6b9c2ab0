"""The SEMA switch on a flat bucket: ``param <- cast(ema)``, the EMA untouched."""

from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

from .launch import NUM_WARPS, aligned_parts, block_size, device_guard
from .layout import TAIL_PARTS, first_element, join_rows, load_rows, row_offsets, store_rows


@triton.jit
def _switch_rows(ema_ptr, param_ptr, n_valid, ROWS: tl.constexpr, MASKED: tl.constexpr):
    ROW: tl.constexpr = 256 // ema_ptr.dtype.element_ty.primitive_bitwidth
    NARROW: tl.constexpr = param_ptr.dtype.element_ty.primitive_bitwidth < ema_ptr.dtype.element_ty.primitive_bitwidth
    first, second, whole = row_offsets(ROWS, ROW)
    ema_first = load_rows(ema_ptr, first, n_valid, MASKED)
    ema_second = load_rows(ema_ptr, second, n_valid, MASKED)
    if NARROW:  # round to nearest even
        store_rows(param_ptr, whole, join_rows(ema_first, ema_second, ROWS, ROW), n_valid, MASKED)
    else:
        store_rows(param_ptr, first, ema_first, n_valid, MASKED)
        store_rows(param_ptr, second, ema_second, n_valid, MASKED)


@triton.jit
def _switch_kernel(ema_ptr, param_ptr, n_elements, BLOCK: tl.constexpr):
    ROWS: tl.constexpr = BLOCK * ema_ptr.dtype.element_ty.primitive_bitwidth // 256
    block_start = first_element(BLOCK)
    ema_ptr += block_start
    param_ptr += block_start
    remaining = n_elements - block_start
    if remaining >= BLOCK:
        _switch_rows(ema_ptr, param_ptr, BLOCK, ROWS, MASKED=False)
    else:
        for part in range(TAIL_PARTS):
            start = part * (BLOCK // TAIL_PARTS)
            _switch_rows(ema_ptr + start, param_ptr + start, remaining - start, ROWS // TAIL_PARTS, MASKED=True)


def _launch_switch(ema: Tensor, param: Tensor) -> None:
    block = block_size(ema.dtype, param.dtype)
    with device_guard(ema.device):
        for ema_part, param_part in aligned_parts(ema, param):
            _switch_kernel[(triton.cdiv(ema_part.numel(), block),)](
                ema_part, param_part, ema_part.numel(), BLOCK=block, num_warps=NUM_WARPS, enable_fp_fusion=False
            )


def switch_(ema: Tensor, param: Tensor) -> None:
    """``param <- ema`` cast to the param dtype (round to nearest even); the EMA is unchanged.

    ``ema``, ``param``: 1-D contiguous, equal length; ``param`` fp32/bf16/fp16, ``ema`` fp32 or
    the param dtype. Bytes per element: read ema, write param (6 for fp32 EMA/bf16 params).
    """
    _launch_switch(ema, param)

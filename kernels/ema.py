"""The EMA update on a flat bucket: ``ema <- lerp(ema, param, w)`` in fp32, optionally followed by
the SEMA switch ``param <- cast(ema)`` in the same pass."""

from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

from .launch import NUM_WARPS, aligned_parts, block_size, device_guard
from .layout import TAIL_PARTS, first_element, join_rows, load_rows, row_offsets, split_rows, store_rows


@triton.jit
def _lerp(ema, param, weight):
    # torch.lerp's two branches, so weight = 1 copies param exactly. Explicit fmas (one rounding
    # each), so the result does not depend on Triton's fp-fusion setting.
    diff = param - ema
    return tl.where(weight < 0.5, tl.fma(diff, weight, ema), tl.fma(-diff, 1.0 - weight, param))


@triton.jit
def update_rows(ema_ptr, param_ptr, n_valid, weight, ROWS: tl.constexpr, SWITCH: tl.constexpr, MASKED: tl.constexpr):
    """The update of ``ROWS`` rows (layout.py) from ``ema_ptr``/``param_ptr``; shared with the
    multi-tensor kernel. ``MASKED``: only the first ``n_valid`` elements."""
    ROW: tl.constexpr = 256 // ema_ptr.dtype.element_ty.primitive_bitwidth
    NARROW: tl.constexpr = param_ptr.dtype.element_ty.primitive_bitwidth < ema_ptr.dtype.element_ty.primitive_bitwidth
    first, second, whole = row_offsets(ROWS, ROW)
    ema_first = load_rows(ema_ptr, first, n_valid, MASKED).to(tl.float32)
    ema_second = load_rows(ema_ptr, second, n_valid, MASKED).to(tl.float32)
    if NARROW:
        param_rows = load_rows(param_ptr, whole, n_valid, MASKED).to(tl.float32)
        param_first, param_second = split_rows(param_rows, ROWS, ROW)
    else:
        param_first = load_rows(param_ptr, first, n_valid, MASKED).to(tl.float32)
        param_second = load_rows(param_ptr, second, n_valid, MASKED).to(tl.float32)
    result_first = _lerp(ema_first, param_first, weight)
    result_second = _lerp(ema_second, param_second, weight)
    store_rows(ema_ptr, first, result_first, n_valid, MASKED)
    store_rows(ema_ptr, second, result_second, n_valid, MASKED)
    if SWITCH:  # round to nearest even
        if NARROW:
            store_rows(param_ptr, whole, join_rows(result_first, result_second, ROWS, ROW), n_valid, MASKED)
        else:
            store_rows(param_ptr, first, result_first, n_valid, MASKED)
            store_rows(param_ptr, second, result_second, n_valid, MASKED)


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
    ROWS: tl.constexpr = BLOCK * ema_ptr.dtype.element_ty.primitive_bitwidth // 256
    block_start = first_element(BLOCK)
    ema_ptr += block_start
    param_ptr += block_start
    remaining = n_elements - block_start
    weight_value = tl.load(weight) if WEIGHT_IS_TENSOR else weight
    if remaining >= BLOCK:
        update_rows(ema_ptr, param_ptr, BLOCK, weight_value, ROWS, SWITCH, MASKED=False)
    else:
        for part in range(TAIL_PARTS):
            start = part * (BLOCK // TAIL_PARTS)
            update_rows(
                ema_ptr + start, param_ptr + start, remaining - start, weight_value, ROWS // TAIL_PARTS, SWITCH, True
            )


def _launch_update(ema: Tensor, param: Tensor, w: float | Tensor, switch: bool) -> None:
    block = block_size(ema.dtype, param.dtype)
    with device_guard(ema.device):
        for ema_part, param_part in aligned_parts(ema, param):
            _ema_update_kernel[(triton.cdiv(ema_part.numel(), block),)](
                ema_part,
                param_part,
                w,
                ema_part.numel(),
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

"""The evaluation swap on a flat bucket, in one pass and with no temporary: a bit-exact exchange
for equal dtypes, or the lossless packing of an fp32 EMA with bf16 params (DESIGN.md)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .launch import NUM_WARPS, aligned_parts, block_size, device_guard
from .layout import TAIL_PARTS, first_element, join_rows, load_rows, row_offsets, split_rows, store_rows

_BITS = {4: torch.int32, 2: torch.int16}


@triton.jit
def _pack(ema, param, RESTORE: tl.constexpr):
    """``ema``: the 32 bits [hi16 | lo16] of an fp32 EMA; ``param``: the 16 bits of a bf16
    (both uint32). Returns the new EMA and param bits; the param's upper 16 bits are dropped."""
    low = ema & 0xFFFF
    carry = low >> 15  # low half >= 0x8000: round half away from zero
    # The halves do not overlap, so + stands for | (ptxas gives it fewer registers); a borrow past
    # bit 31 wraps in uint32, which is the mod 2**16 of the high half.
    if RESTORE:  # ema holds [param | lo16], param holds hi16 + carry (mod 2**16)
        return (param << 16) - (carry << 16) + low, ema >> 16
    else:
        return (param << 16) + low, (ema >> 16) + carry


@triton.jit
def _swap_rows(
    ema_ptr, param_ptr, n_valid, ROWS: tl.constexpr, PACK_BF16: tl.constexpr, RESTORE: tl.constexpr,
    MASKED: tl.constexpr,
):  # fmt: skip
    # Integer views: a float round trip could quiet a signalling NaN or flush a subnormal.
    ROW: tl.constexpr = 256 // ema_ptr.dtype.element_ty.primitive_bitwidth
    first, second, whole = row_offsets(ROWS, ROW)
    ema_first = load_rows(ema_ptr, first, n_valid, MASKED)
    ema_second = load_rows(ema_ptr, second, n_valid, MASKED)
    if PACK_BF16:
        param_rows = load_rows(param_ptr, whole, n_valid, MASKED).to(tl.uint16, bitcast=True).to(tl.uint32)
        param_first, param_second = split_rows(param_rows, ROWS, ROW)
        ema_first, param_first = _pack(ema_first.to(tl.uint32, bitcast=True), param_first, RESTORE)
        ema_second, param_second = _pack(ema_second.to(tl.uint32, bitcast=True), param_second, RESTORE)
        param_rows = join_rows(param_first, param_second, ROWS, ROW).to(tl.uint16).to(tl.int16, bitcast=True)
        store_rows(param_ptr, whole, param_rows, n_valid, MASKED)
        store_rows(ema_ptr, first, ema_first.to(tl.int32, bitcast=True), n_valid, MASKED)
        store_rows(ema_ptr, second, ema_second.to(tl.int32, bitcast=True), n_valid, MASKED)
    else:
        param_first = load_rows(param_ptr, first, n_valid, MASKED)
        param_second = load_rows(param_ptr, second, n_valid, MASKED)
        store_rows(ema_ptr, first, param_first, n_valid, MASKED)
        store_rows(ema_ptr, second, param_second, n_valid, MASKED)
        store_rows(param_ptr, first, ema_first, n_valid, MASKED)
        store_rows(param_ptr, second, ema_second, n_valid, MASKED)


@triton.jit
def _swap_kernel(ema_ptr, param_ptr, n_elements, BLOCK: tl.constexpr, PACK_BF16: tl.constexpr, RESTORE: tl.constexpr):
    ROWS: tl.constexpr = BLOCK * ema_ptr.dtype.element_ty.primitive_bitwidth // 256
    block_start = first_element(BLOCK)
    ema_ptr += block_start
    param_ptr += block_start
    remaining = n_elements - block_start
    if remaining >= BLOCK:
        _swap_rows(ema_ptr, param_ptr, BLOCK, ROWS, PACK_BF16, RESTORE, MASKED=False)
    else:
        for part in range(TAIL_PARTS):
            start = part * (BLOCK // TAIL_PARTS)
            _swap_rows(
                ema_ptr + start, param_ptr + start, remaining - start, ROWS // TAIL_PARTS, PACK_BF16, RESTORE, True
            )


def _launch_swap(ema: Tensor, param: Tensor, restore: bool) -> None:
    pack_bf16 = ema.dtype != param.dtype
    if pack_bf16 and (ema.dtype, param.dtype) != (torch.float32, torch.bfloat16):
        raise TypeError(
            f"sema.kernels.swap_: no lossless in-place swap between a {ema.dtype} EMA and {param.dtype} "
            "params; only equal dtypes or an fp32 EMA with bf16 params"
        )
    block = block_size(ema.dtype, param.dtype)
    ema_bits, param_bits = ema.view(_BITS[ema.element_size()]), param.view(_BITS[param.element_size()])
    with device_guard(ema.device):
        for ema_part, param_part in aligned_parts(ema_bits, param_bits):
            _swap_kernel[(triton.cdiv(ema_part.numel(), block),)](
                ema_part,
                param_part,
                ema_part.numel(),
                BLOCK=block,
                PACK_BF16=pack_bf16,
                RESTORE=restore and pack_bf16,  # an exchange is its own inverse: one compiled variant
                num_warps=NUM_WARPS,
                enable_fp_fusion=False,
            )


def swap_(ema: Tensor, param: Tensor, restore: bool = False) -> None:
    """Exchange ``ema`` and ``param`` bit for bit (equal dtypes; ``restore`` is ignored), or, for
    an fp32 EMA with bf16 params, pack them: the param slot gets the EMA rounded half away from
    zero to bf16, the EMA slot ``(param << 16) | lo16(ema)``; ``restore=True`` undoes it exactly,
    NaN and Inf included. Bit-identical to :func:`sema.reference.swap_`.

    ``ema``, ``param``: 1-D contiguous, equal length. One pass, no temporary. Bytes per element:
    read and write both (12 for fp32 EMA/bf16 params, 16 for fp32/fp32).
    """
    _launch_swap(ema, param, restore)

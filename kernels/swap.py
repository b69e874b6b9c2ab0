"""The evaluation swap on a flat bucket, in one pass and with no temporary: a bit-exact exchange
for equal dtypes, or the lossless packing of an fp32 EMA with bf16 params (DESIGN.md)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .launch import NUM_WARPS, block_size, device_guard

_BITS = {4: torch.int32, 2: torch.int16}


@triton.jit
def _swap_block(
    ema_ptr, param_ptr, offsets, n_elements, PACK_BF16: tl.constexpr, RESTORE: tl.constexpr, MASKED: tl.constexpr
):
    # Integer views: a float round trip could quiet a signalling NaN or flush a subnormal.
    mask = offsets < n_elements if MASKED else None
    ema = tl.load(ema_ptr + offsets, mask=mask)
    param = tl.load(param_ptr + offsets, mask=mask)
    if PACK_BF16:
        # ema: 32 bits [hi16 | lo16] of the fp32 EMA; param: the 16 bits of a bf16.
        ema = ema.to(tl.uint32, bitcast=True)
        param = param.to(tl.uint16, bitcast=True).to(tl.uint32)
        low = ema & 0xFFFF
        high = ema >> 16
        carry = low >> 15  # low half >= 0x8000: round half away from zero
        if RESTORE:  # ema holds [param | lo16], param holds hi16 + carry (mod 2**16)
            new_param = high
            new_ema = (((param - carry) & 0xFFFF) << 16) | low
        else:
            new_param = (high + carry) & 0xFFFF
            new_ema = (param << 16) | low
        tl.store(param_ptr + offsets, new_param.to(tl.uint16).to(tl.int16, bitcast=True), mask=mask)
        tl.store(ema_ptr + offsets, new_ema.to(tl.int32, bitcast=True), mask=mask)
    else:
        tl.store(ema_ptr + offsets, param, mask=mask)
        tl.store(param_ptr + offsets, ema, mask=mask)


@triton.jit
def _swap_kernel(ema_ptr, param_ptr, n_elements, BLOCK: tl.constexpr, PACK_BF16: tl.constexpr, RESTORE: tl.constexpr):
    block_start = tl.program_id(0).to(tl.int64) * BLOCK  # int64: buckets past 2**31 elements
    offsets = tl.max_contiguous(tl.multiple_of(block_start + tl.arange(0, BLOCK), BLOCK), BLOCK)
    if block_start + BLOCK <= n_elements:
        _swap_block(ema_ptr, param_ptr, offsets, n_elements, PACK_BF16, RESTORE, MASKED=False)
    else:
        _swap_block(ema_ptr, param_ptr, offsets, n_elements, PACK_BF16, RESTORE, MASKED=True)


def _launch_swap(ema: Tensor, param: Tensor, restore: bool) -> None:
    pack_bf16 = ema.dtype != param.dtype
    if pack_bf16 and (ema.dtype, param.dtype) != (torch.float32, torch.bfloat16):
        raise TypeError(
            f"sema.kernels.swap_: no lossless in-place swap between a {ema.dtype} EMA and {param.dtype} "
            "params; only equal dtypes or an fp32 EMA with bf16 params"
        )
    n_elements = ema.numel()
    if n_elements == 0:
        return
    block = block_size(ema.dtype, param.dtype)
    grid = (triton.cdiv(n_elements, block),)
    with device_guard(ema.device):
        _swap_kernel[grid](
            ema.view(_BITS[ema.element_size()]),
            param.view(_BITS[param.element_size()]),
            n_elements,
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

"""Launch settings shared by the Triton kernels: block size and warps per dtype, the device guard.

Fixed heuristics, no autotuning: autotune re-runs a kernel to time it, which would apply an
in-place update several times, and it does not run under the interpreter.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Sequence

import torch
import triton.language as tl
from torch import Tensor

TRITON_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}

NUM_WARPS = 8
BYTES_PER_THREAD = 64  # of the widest tensor, per block: four 16-byte vector loads in flight


@functools.cache
def block_size(*dtypes: torch.dtype) -> int:
    """Elements per program: 4096 when an fp32 tensor is involved, 8192 for 2-byte pairs.

    A power of two and a multiple of every vector width, so each block starts 16-byte aligned."""
    widest = max(dtype.itemsize for dtype in dtypes)
    return NUM_WARPS * 32 * BYTES_PER_THREAD // widest


def aligned_head(ema_address: int, param_address: int, ema_size: int, param_size: int, n_elements: int) -> int:
    """Elements before both addresses reach a 16-byte boundary together, to be run apart so that
    the rest gets vector accesses. 0 when they start aligned, and also when they never align
    together (offsets that differ) or the tensors end first: then nothing is split off."""
    return common_aligned_head((ema_address,), param_address, ema_size, param_size, n_elements)


def common_aligned_head(
    ema_addresses: Sequence[int], param_address: int, ema_size: int, param_size: int, n_elements: int
) -> int:
    """:func:`aligned_head` for several EMAs of one param: all of them and the param together."""
    for head in range(16 // min(ema_size, param_size)):
        if (param_address + head * param_size) % 16 == 0 and all(
            (address + head * ema_size) % 16 == 0 for address in ema_addresses
        ):
            return head if head < n_elements else 0
    return 0


def aligned_parts(ema: Tensor, param: Tensor) -> list[tuple[Tensor, Tensor]]:
    """The parts to launch over: none for empty tensors, ``(ema, param)``, or its unaligned head
    and its aligned rest (:func:`aligned_head`)."""
    return [(emas[0], part) for emas, part in aligned_parts_k([ema], param)]


def aligned_parts_k(emas: Sequence[Tensor], param: Tensor) -> list[tuple[list[Tensor], Tensor]]:
    """:func:`aligned_parts` for several EMAs of one param (:func:`common_aligned_head`)."""
    if param.numel() == 0:
        return []
    head = common_aligned_head(
        [ema.data_ptr() for ema in emas], param.data_ptr(), emas[0].element_size(), param.element_size(), param.numel()
    )
    if head == 0:
        return [(list(emas), param)]
    return [([ema[:head] for ema in emas], param[:head]), ([ema[head:] for ema in emas], param[head:])]


def device_guard(device: torch.device) -> contextlib.AbstractContextManager:
    """Triton launches on the current CUDA device: make it the tensors' device."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()

"""Launch settings shared by the Triton kernels: block size and warps per dtype, the device guard.

Fixed heuristics, no autotuning: autotune re-runs a kernel to time it, which would apply an
in-place update several times, and it does not run under the interpreter.
"""

from __future__ import annotations

import contextlib
import functools

import torch
import triton.language as tl

TRITON_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}

NUM_WARPS = 8
BYTES_PER_THREAD = 64  # of the widest tensor, per block: four 16-byte vector loads in flight


@functools.cache
def block_size(*dtypes: torch.dtype) -> int:
    """Elements per program: 4096 when an fp32 tensor is involved, 8192 for 2-byte pairs.

    A power of two and a multiple of every vector width, so each block starts 16-byte aligned."""
    widest = max(dtype.itemsize for dtype in dtypes)
    return NUM_WARPS * 32 * BYTES_PER_THREAD // widest


def device_guard(device: torch.device) -> contextlib.AbstractContextManager:
    """Triton launches on the current CUDA device: make it the tensors' device."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()

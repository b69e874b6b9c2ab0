"""The ``cpp`` backend: the kernel contract on CPU tensors, through the compiled ``sema._C``.

One pass over each buffer with vectorised loops and OpenMP threads: ``torch.get_num_threads()``
of them, or one where :data:`sema.cpu_threads.PLANNER` says so (small work, another process
holding a core); AVX2 + FMA + F16C kernels where the CPU has them, baseline x86-64 ones
elsewhere. The fp32 lerp rounds exactly as ``torch.lerp`` on the same machine: with fma where
PyTorch's CPU capability is AVX2 or better, without where it is DEFAULT. Casts round to nearest
even as ``Tensor.to`` does (a NaN stays a NaN; its payload bits may differ).

Every tensor is checked again here (device, dtype, layout, length, overlap) before its address
goes to C++: a wrong pointer there is a crash, not an exception.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from sema import _extension
from sema._extension import check_k, check_pair, check_swap_dtypes, flat_k_lists, flat_pairs, switch_index_code
from sema.cpu_threads import PLANNER, SMALL_WORK_BYTES

_C = _extension.extension

if _C is not None and torch.backends.cpu.get_cpu_capability() == "DEFAULT":
    # PyTorch runs its baseline kernels (no fma; e.g. ATEN_CPU_CAPABILITY=default): so do we,
    # which keeps fp32 updates bit-identical to torch.lerp_.
    _C.set_cpu_isa("baseline")


def availability(device_type: str) -> tuple[bool, str]:
    if device_type != "cpu":
        return False, f"serves CPU tensors, not {device_type}"
    if _C is None:
        return False, _extension.load_error
    return True, _extension.describe()


def _weight(op: str, w: float | Tensor) -> float:
    if isinstance(w, Tensor):
        if w.device.type != "cpu" or w.numel() != 1 or not w.is_floating_point():
            raise ValueError(
                f"{op}: w as a tensor must be one float on the CPU, got {w.dtype} {tuple(w.shape)} on {w.device}"
            )
        return float(w)  # a CPU tensor: no device sync
    return float(w)


def ema_update_(ema: Tensor, param: Tensor, w: float | Tensor, switch: bool = False) -> None:
    """``ema <- lerp(ema, param, w)`` in fp32; with ``switch``, then ``param <- cast(ema)``."""
    op = "sema cpp ema_update_"
    ema_dtype, param_dtype = check_pair(op, ema, param, "cpu")
    weight = _weight(op, w)
    n = ema.numel()
    ema_ptr, param_ptr = ema.data_ptr(), param.data_ptr()
    nbytes = n * (2 * ema.element_size() + (2 if switch else 1) * param.element_size())
    if nbytes < SMALL_WORK_BYTES and not PLANNER.forced:  # the planner's answer, without its overhead
        _C.cpu_ema_update(ema_ptr, param_ptr, n, ema_dtype, param_dtype, weight, bool(switch), 1)
        return
    PLANNER.run(
        ("cpp update", ema_dtype, param_dtype, bool(switch)),
        nbytes,
        lambda threads: _C.cpu_ema_update(ema_ptr, param_ptr, n, ema_dtype, param_dtype, weight, bool(switch), threads),
    )


def switch_(ema: Tensor, param: Tensor) -> None:
    """``param <- cast(ema)``, rounding to nearest even."""
    ema_dtype, param_dtype = check_pair("sema cpp switch_", ema, param, "cpu")
    n = ema.numel()
    ema_ptr, param_ptr = ema.data_ptr(), param.data_ptr()
    PLANNER.run(
        ("cpp switch", ema_dtype, param_dtype),
        n * (ema.element_size() + param.element_size()),
        lambda threads: _C.cpu_switch(ema_ptr, param_ptr, n, ema_dtype, param_dtype, threads),
    )


def swap_(ema: Tensor, param: Tensor, restore: bool = False) -> None:
    """Bit exchange for equal dtypes; the lossless fp32/bf16 packing otherwise (see DESIGN.md)."""
    op = "sema cpp swap_"
    ema_dtype, param_dtype = check_pair(op, ema, param, "cpu")
    check_swap_dtypes(op, ema, param)
    n = ema.numel()
    ema_ptr, param_ptr = ema.data_ptr(), param.data_ptr()
    PLANNER.run(
        ("cpp swap", ema_dtype, param_dtype, bool(restore)),
        2 * n * (ema.element_size() + param.element_size()),
        lambda threads: _C.cpu_swap(ema_ptr, param_ptr, n, ema_dtype, param_dtype, bool(restore), threads),
    )


def ema_update_multi_(
    emas: Sequence[Tensor], params: Sequence[Tensor], w: float | Tensor, switch: bool = False
) -> None:
    """:func:`ema_update_` over pairs of dense tensors of any shape, in one call into C++."""
    op = "sema cpp ema_update_multi_"
    flat_emas, flat_params, ema_codes, param_codes = flat_pairs(op, emas, params, "cpu")
    weight = _weight(op, w)
    ema_ptrs = [e.data_ptr() for e in flat_emas]
    param_ptrs = [p.data_ptr() for p in flat_params]
    numels = [e.numel() for e in flat_emas]
    total = sum(numels)
    PLANNER.run(
        ("cpp update_multi", bool(switch)),
        total * (16 if switch else 12),  # as fp32 pairs: an upper bound, for the thread plan only
        lambda threads: _C.cpu_ema_update_multi(
            ema_ptrs, param_ptrs, numels, ema_codes, param_codes, weight, bool(switch), threads
        ),
    )


def ema_update_k_(emas: Sequence[Tensor], param: Tensor, ws: Tensor, switch_index: int | None = None) -> None:
    """K EMAs of one flat param in one pass over it: ``emas[k] <- lerp(emas[k], param, ws[k])``
    for every k, bit for bit as K calls of :func:`ema_update_`; with ``switch_index``, then
    ``param <- cast(emas[switch_index])`` (every EMA reads the param from before the switch).

    emas: K >= 1 1-D contiguous tensors of one dtype (float32 or the param's), as long as
    ``param``; ws: a 1-D float32 CPU tensor of K weights (read on the host). Any K in one pass.
    Bytes per element: 4 + 8K (fp32), 2 + 8K (bf16 params, fp32 EMAs), + the param write with a
    switch."""
    op = "sema cpp ema_update_k_"
    ema_dtype, param_dtype, switch_code = check_k(op, emas, param, ws, switch_index, "cpu")
    weights = ws.tolist()
    n = param.numel()
    ema_ptrs, param_ptr = [e.data_ptr() for e in emas], param.data_ptr()
    nbytes = n * (2 * len(emas) * emas[0].element_size() + (2 if switch_code >= 0 else 1) * param.element_size())

    def run(threads: int) -> None:
        _C.cpu_ema_update_k(ema_ptrs, param_ptr, n, ema_dtype, param_dtype, weights, switch_code, threads)

    if nbytes < SMALL_WORK_BYTES and not PLANNER.forced:  # the planner's answer, without its overhead
        run(1)
        return
    PLANNER.run(("cpp update_k", ema_dtype, param_dtype, len(emas), switch_code >= 0), nbytes, run)


def ema_update_k_multi_(
    emas: Sequence[Sequence[Tensor]], params: Sequence[Tensor], ws: Tensor, switch_index: int | None = None
) -> None:
    """:func:`ema_update_k_` over lists of dense tensors of any shape, in one call into C++:
    ``emas[k]`` is the k-th EMA's list, one tensor per param. Each param is read once."""
    op = "sema cpp ema_update_k_multi_"
    flat_emas, flat_params, ema_codes, param_codes = flat_k_lists(op, emas, params, ws, "cpu")
    switch_code = switch_index_code(op, switch_index, len(flat_emas))
    if not flat_params:
        return
    weights = ws.tolist()
    ema_ptrs = [[e.data_ptr() for e in row] for row in flat_emas]
    param_ptrs = [p.data_ptr() for p in flat_params]
    numels = [p.numel() for p in flat_params]
    k = len(flat_emas)
    PLANNER.run(
        ("cpp update_k_multi", k, switch_code >= 0),
        sum(numels) * (8 * k + (8 if switch_code >= 0 else 4)),  # as fp32: an upper bound, for the thread plan only
        lambda threads: _C.cpu_ema_update_k_multi(
            ema_ptrs, param_ptrs, numels, ema_codes, param_codes, weights, switch_code, threads
        ),
    )

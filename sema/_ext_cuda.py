"""The ``cuda`` backend: the kernel contract on CUDA tensors, through the compiled ``sema._C``.

Kernels launch on the current stream of the tensors' device. A tensor ``w`` is passed as a
device pointer and read by the kernel: no host sync, and the ops can be captured in a CUDA
graph. Every tensor is checked again here (device, dtype, layout, length, overlap) before its
address goes to C++: a wrong pointer there is a crash, not an exception.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
from torch import Tensor

from sema import _extension
from sema._extension import check_pair, check_swap_dtypes, flat_pairs

_C = _extension.extension


@functools.cache
def _probe(device_index: int) -> str:
    return _C.cuda_probe(device_index)


def availability(device_type: str) -> tuple[bool, str]:
    if device_type != "cuda":
        return False, f"serves CUDA tensors, not {device_type}"
    if _C is None:
        return False, _extension.load_error
    info = _extension.build_info()
    if not info.get("cuda"):
        return False, f"{_extension.describe()} was built without CUDA kernels: {info.get('cuda_skipped')}"
    if not torch.cuda.is_available():
        return False, f"no CUDA device (torch.cuda.is_available() is False); {_extension.describe()}"
    problem = _probe(torch.cuda.current_device())
    if problem:
        return False, f"{problem}; {_extension.describe()}"
    return True, _extension.describe()


def _weight(op: str, w: float | Tensor, ema: Tensor, param: Tensor) -> tuple[float, int]:
    """(value, device pointer): the kernel reads the pointer when it is not 0."""
    if isinstance(w, Tensor):
        if w.device != ema.device or w.dtype != torch.float32 or w.numel() != 1:
            raise ValueError(
                f"{op}: w as a tensor must be one float32 on {ema.device}, got {w.dtype} {tuple(w.shape)} on {w.device}"
            )
        if _extension.overlaps(w, ema) or _extension.overlaps(w, param):
            raise ValueError(f"{op}: w shares memory with the tensors it updates; pass a separate tensor")
        return 0.0, w.data_ptr()
    return float(w), 0


def _stream(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream


def ema_update_(ema: Tensor, param: Tensor, w: float | Tensor, switch: bool = False) -> None:
    """``ema <- lerp(ema, param, w)`` in fp32; with ``switch``, then ``param <- cast(ema)``."""
    op = "sema cuda ema_update_"
    ema_dtype, param_dtype = check_pair(op, ema, param, "cuda")
    w_value, w_ptr = _weight(op, w, ema, param)
    _C.cuda_ema_update(
        ema.data_ptr(),
        param.data_ptr(),
        ema.numel(),
        ema_dtype,
        param_dtype,
        w_value,
        w_ptr,
        bool(switch),
        ema.device.index,
        _stream(ema.device),
    )


def switch_(ema: Tensor, param: Tensor) -> None:
    """``param <- cast(ema)``, rounding to nearest even."""
    ema_dtype, param_dtype = check_pair("sema cuda switch_", ema, param, "cuda")
    _C.cuda_switch(
        ema.data_ptr(), param.data_ptr(), ema.numel(), ema_dtype, param_dtype, ema.device.index, _stream(ema.device)
    )


def swap_(ema: Tensor, param: Tensor, restore: bool = False) -> None:
    """Bit exchange for equal dtypes; the lossless fp32/bf16 packing otherwise (see DESIGN.md)."""
    op = "sema cuda swap_"
    ema_dtype, param_dtype = check_pair(op, ema, param, "cuda")
    check_swap_dtypes(op, ema, param)
    _C.cuda_swap(
        ema.data_ptr(),
        param.data_ptr(),
        ema.numel(),
        ema_dtype,
        param_dtype,
        bool(restore),
        ema.device.index,
        _stream(ema.device),
    )


def ema_update_multi_(
    emas: Sequence[Tensor], params: Sequence[Tensor], w: float | Tensor, switch: bool = False
) -> None:
    """:func:`ema_update_` over pairs of dense tensors of any shape: one launch per dtype pair
    and per 64 tensors."""
    op = "sema cuda ema_update_multi_"
    flat_emas, flat_params, ema_codes, param_codes = flat_pairs(op, emas, params, "cuda")
    if not flat_emas:
        return
    device = flat_emas[0].device
    if isinstance(w, Tensor):
        for e, p in zip(flat_emas, flat_params, strict=True):
            _weight(op, w, e, p)
    w_value, w_ptr = _weight(op, w, flat_emas[0], flat_params[0])
    _C.cuda_ema_update_multi(
        [e.data_ptr() for e in flat_emas],
        [p.data_ptr() for p in flat_params],
        [e.numel() for e in flat_emas],
        ema_codes,
        param_codes,
        w_value,
        w_ptr,
        bool(switch),
        device.index,
        _stream(device),
    )

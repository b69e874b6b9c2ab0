"""Functional ops of the kernel contract, on flat tensors, with a choice of backend.

Every op is in place and checks its inputs before any byte is written. The ops are also
registered as ``torch.ops.sema.*`` custom ops with fake implementations, which is the path
taken while ``torch.compile`` traces, so a compiled ``SwitchEMA.update`` has no graph break;
in eager mode the backend is called directly, which saves the custom-op dispatch cost.

Bytes moved per element (fp32 EMA, bf16 params; see DESIGN.md): update 10, update+switch 12,
switch 6, swap 12.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence

import torch
from torch import Tensor

from sema import backends

PARAM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _check_pair(op: str, ema: Tensor, param: Tensor) -> None:
    for arg, t in (("ema", ema), ("param", param)):
        if not isinstance(t, Tensor):
            raise TypeError(f"sema.ops.{op}: {arg} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 1 or not t.is_contiguous():
            raise ValueError(
                f"sema.ops.{op}: {arg} must be a 1-D contiguous tensor (a flat bucket), got shape "
                f"{tuple(t.shape)} with strides {t.stride()}; pass t.view(-1) of a contiguous tensor"
            )
    if param.dtype not in PARAM_DTYPES:
        raise TypeError(f"sema.ops.{op}: param dtype {param.dtype} is not supported; use fp32, bf16 or fp16")
    if ema.dtype not in (torch.float32, param.dtype):
        raise TypeError(
            f"sema.ops.{op}: ema dtype {ema.dtype} does not fit param dtype {param.dtype}; "
            f"the EMA must be float32 or {param.dtype}"
        )
    if ema.device != param.device:
        raise ValueError(f"sema.ops.{op}: ema is on {ema.device} but param is on {param.device}; move one")
    if ema.numel() != param.numel():
        raise ValueError(f"sema.ops.{op}: ema has {ema.numel()} elements but param has {param.numel()}")
    if _overlap(ema, param):
        raise ValueError(f"sema.ops.{op}: ema and param share memory; they must be separate buffers")


def _overlap(a: Tensor, b: Tensor) -> bool:
    if a.numel() == 0 or b.numel() == 0 or a.device != b.device:
        return False
    a0, b0 = a.data_ptr(), b.data_ptr()
    a1, b1 = a0 + a.numel() * a.element_size(), b0 + b.numel() * b.element_size()
    return a0 < b1 and b0 < a1


def _check_weight(op: str, w: float | Tensor, device: torch.device) -> float | Tensor:
    if isinstance(w, Tensor):
        if w.dim() != 0 or not w.is_floating_point():
            raise ValueError(
                f"sema.ops.{op}: w as a tensor must be a 0-d floating tensor, got {w.dtype} {tuple(w.shape)}"
            )
        if w.device != device:
            raise ValueError(
                f"sema.ops.{op}: w is on {w.device} but the tensors are on {device}; "
                "keep w on the bucket's device so the update needs no host sync"
            )
        return w if w.dtype == torch.float32 else w.to(torch.float32)
    if isinstance(w, bool) or not isinstance(w, (int, float)):
        raise TypeError(f"sema.ops.{op}: w must be a float or a 0-d tensor, got {type(w).__name__}")
    w = float(w)
    if not 0.0 <= w <= 1.0:  # also rejects NaN
        raise ValueError(f"sema.ops.{op}: w={w} is outside [0, 1]; w = 1 - decay")
    return w


@functools.lru_cache(maxsize=64)
def _resolve_cached(requested: str | None, device: torch.device, env: str | None) -> str:
    return backends.resolve(requested, device)


def resolve_backend(requested: str | None, device: torch.device) -> str:
    """The backend name ``requested`` maps to on ``device`` (``None``/``auto``: the best)."""
    return _resolve_cached(requested, device, os.environ.get(backends.ENV_VAR))


def _impl(name: str):
    return backends.module(name)


# --- custom ops: the traced path ----------------------------------------------------------


@torch.library.custom_op("sema::ema_update_", mutates_args=("ema",))
def _ema_update_op(ema: Tensor, param: Tensor, w_tensor: Tensor | None, w_scalar: float, backend: str) -> None:
    _impl(backend).ema_update_(ema, param, w_scalar if w_tensor is None else w_tensor, False)


@torch.library.custom_op("sema::ema_update_switch_", mutates_args=("ema", "param"))
def _ema_update_switch_op(ema: Tensor, param: Tensor, w_tensor: Tensor | None, w_scalar: float, backend: str) -> None:
    _impl(backend).ema_update_(ema, param, w_scalar if w_tensor is None else w_tensor, True)


@torch.library.custom_op("sema::switch_", mutates_args=("param",))
def _switch_op(ema: Tensor, param: Tensor, backend: str) -> None:
    _impl(backend).switch_(ema, param)


@torch.library.custom_op("sema::swap_", mutates_args=("ema", "param"))
def _swap_op(ema: Tensor, param: Tensor, restore: bool, backend: str) -> None:
    _impl(backend).swap_(ema, param, restore)


@_ema_update_op.register_fake
def _(ema, param, w_tensor, w_scalar, backend):
    return None


@_ema_update_switch_op.register_fake
def _(ema, param, w_tensor, w_scalar, backend):
    return None


@_switch_op.register_fake
def _(ema, param, backend):
    return None


@_swap_op.register_fake
def _(ema, param, restore, backend):
    return None


# --- dispatch without checks (SwitchEMA validated its buckets once) -----------------------


def _compiling() -> bool:
    return torch.compiler.is_compiling()


def dispatch_update(ema: Tensor, param: Tensor, w: float | Tensor, switch: bool, backend: str) -> None:
    if _compiling():
        op = _ema_update_switch_op if switch else _ema_update_op
        if isinstance(w, Tensor):
            op(ema, param, w, 0.0, backend)
        else:
            op(ema, param, None, w, backend)
        return
    with torch.no_grad():
        _impl(backend).ema_update_(ema, param, w, switch)


def dispatch_switch(ema: Tensor, param: Tensor, backend: str) -> None:
    if _compiling():
        _switch_op(ema, param, backend)
        return
    with torch.no_grad():
        _impl(backend).switch_(ema, param)


def dispatch_swap(ema: Tensor, param: Tensor, restore: bool, backend: str) -> None:
    if _compiling():
        _swap_op(ema, param, restore, backend)
        return
    with torch.no_grad():
        _impl(backend).swap_(ema, param, restore)


# --- public functional ops ----------------------------------------------------------------


def ema_update_(
    ema: Tensor, param: Tensor, w: float | Tensor, switch: bool = False, backend: str | None = None
) -> None:
    """``ema <- lerp(ema, param, w)``, computed in fp32 as ``torch.lerp`` does (``w = 1 - decay``);
    with ``switch=True`` then ``param <- ema`` cast to the param dtype (round to nearest even).

    ``ema``, ``param``: 1-D contiguous, equal length, same device; ``param`` fp32/bf16/fp16,
    ``ema`` fp32 or the param dtype. ``w``: a float in [0, 1] or a 0-d float tensor on the same
    device (read on the device: no host sync). Bytes per element: read ema + param, write ema
    (10 for fp32/bf16), plus a param write with ``switch`` (12).
    """
    _check_pair("ema_update_", ema, param)
    w = _check_weight("ema_update_", w, ema.device)
    dispatch_update(ema, param, w, bool(switch), resolve_backend(backend, ema.device))


def switch_(ema: Tensor, param: Tensor, backend: str | None = None) -> None:
    """``param <- ema`` cast to the param dtype (round to nearest even). The EMA is unchanged.
    Bytes per element: read ema, write param (6 for fp32/bf16)."""
    _check_pair("switch_", ema, param)
    dispatch_switch(ema, param, resolve_backend(backend, ema.device))


def swap_(ema: Tensor, param: Tensor, restore: bool = False, backend: str | None = None) -> None:
    """Put the EMA into ``param`` and keep what is needed to restore both, with no extra memory.

    Equal dtypes: a bit-exact exchange (its own inverse; ``restore`` is ignored). fp32 EMA with
    bf16 params: the param slot gets the EMA rounded half away from zero, the EMA slot keeps the
    old param and the EMA's low bits; ``swap_(..., restore=True)`` undoes it bit for bit (NaN and
    Inf included). fp32 EMA with fp16 params is refused (fp16 is no slice of fp32); use
    ``SwitchEMA.swapped()``, which goes through a scratch copy there. Bytes per element:
    read and write both (12 for fp32/bf16).
    """
    _check_pair("swap_", ema, param)
    if ema.dtype != param.dtype and param.dtype != torch.bfloat16:
        raise TypeError(
            f"sema.ops.swap_: no lossless in-place swap between a {ema.dtype} EMA and {param.dtype} "
            "params; use SwitchEMA.swapped() (scratch copy) or keep the EMA in the param dtype"
        )
    dispatch_swap(ema, param, bool(restore), resolve_backend(backend, ema.device))


def ema_update_multi_(
    emas: Sequence[Tensor],
    params: Sequence[Tensor],
    w: float | Tensor,
    switch: bool = False,
    backend: str | None = None,
) -> None:
    """:func:`ema_update_` over lists of tensors that cannot be bucketed (shards, user lists),
    one launch where the backend can. Pairs may have any shape but must match each other."""
    emas, params = list(emas), list(params)
    if len(emas) != len(params):
        raise ValueError(f"sema.ops.ema_update_multi_: {len(emas)} EMA tensors but {len(params)} params")
    if not emas:
        return
    device = emas[0].device
    for i, (e, p) in enumerate(zip(emas, params, strict=False)):
        if e.shape != p.shape or e.stride() != p.stride():
            raise ValueError(
                f"sema.ops.ema_update_multi_: pair {i} differs in shape or strides: "
                f"{tuple(e.shape)}/{e.stride()} vs {tuple(p.shape)}/{p.stride()}"
            )
        _check_pair("ema_update_multi_", dense_view(e), dense_view(p))
        if e.device != device:
            raise ValueError(f"sema.ops.ema_update_multi_: pair {i} is on {e.device}, pair 0 on {device}")
    w = _check_weight("ema_update_multi_", w, device)
    dispatch_update_multi(emas, params, w, bool(switch), resolve_backend(backend, device))


def dispatch_update_multi(
    emas: list[Tensor], params: list[Tensor], w: float | Tensor, switch: bool, backend: str
) -> None:
    with torch.no_grad():
        _impl(backend).ema_update_multi_(emas, params, w, switch)


def dense_view(t: Tensor) -> Tensor:
    """A 1-D view over the memory of a dense, non-overlapping tensor (any memory format)."""
    if t.is_contiguous():
        return t.view(-1)
    if not _is_dense(t):
        raise ValueError(
            f"tensor of shape {tuple(t.shape)} with strides {t.stride()} is not dense; call .contiguous() on it first"
        )
    return t.as_strided((t.numel(),), (1,), t.storage_offset())


def _is_dense(t: Tensor) -> bool:
    expected = 1
    for size, stride in sorted(zip(t.shape, t.stride(), strict=False), key=lambda s: s[1]):
        if size == 1:
            continue
        if stride != expected:
            return False
        expected *= size
    return True

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


def _check_tensor(op: str, arg: str, t: object, flat: bool) -> None:
    """``t`` is a plain strided tensor a kernel may address directly: 1-D contiguous (``flat``)
    or dense in any memory format."""
    if not isinstance(t, Tensor):
        raise TypeError(f"sema.ops.{op}: {arg} must be a torch.Tensor, got {type(t).__name__}")
    if t.layout != torch.strided:
        raise ValueError(f"sema.ops.{op}: {arg} has layout {t.layout}; only dense strided tensors are supported")
    if t.is_neg() or t.is_conj():
        raise ValueError(
            f"sema.ops.{op}: {arg} is a lazily negated or conjugated view whose memory does not hold its values; "
            "call .resolve_neg() / .resolve_conj() on it first"
        )
    if flat:
        if t.dim() != 1 or not t.is_contiguous():
            raise ValueError(
                f"sema.ops.{op}: {arg} must be a 1-D contiguous tensor (a flat bucket), got shape "
                f"{tuple(t.shape)} with strides {t.stride()}; pass t.view(-1) of a contiguous tensor"
            )
    elif not _is_dense(t):
        raise ValueError(
            f"sema.ops.{op}: {arg} of shape {tuple(t.shape)} with strides {t.stride()} is not dense (it has "
            "gaps or overlaps itself); call .contiguous() on it first"
        )


def _check_dtypes(op: str, ema: Tensor, param: Tensor, where: str = "") -> None:
    if param.dtype not in PARAM_DTYPES:
        raise TypeError(f"sema.ops.{op}: {where}param dtype {param.dtype} is not supported; use fp32, bf16 or fp16")
    if ema.dtype not in (torch.float32, param.dtype):
        raise TypeError(
            f"sema.ops.{op}: {where}ema dtype {ema.dtype} does not fit param dtype {param.dtype}; "
            f"the EMA must be float32 or {param.dtype}"
        )


def _check_pair(op: str, ema: Tensor, param: Tensor) -> None:
    _check_tensor(op, "ema", ema, flat=True)
    _check_tensor(op, "param", param, flat=True)
    _check_dtypes(op, ema, param)
    if ema.device != param.device:
        raise ValueError(f"sema.ops.{op}: ema is on {ema.device} but param is on {param.device}; move one")
    if ema.numel() != param.numel():
        raise ValueError(f"sema.ops.{op}: ema has {ema.numel()} elements but param has {param.numel()}")
    if _overlap(ema, param):
        raise ValueError(f"sema.ops.{op}: ema and param share memory; they must be separate buffers")


def _overlap(a: Tensor, b: Tensor) -> bool:
    if a.numel() == 0 or b.numel() == 0 or a.device != b.device or a.device.type == "meta":
        return False  # meta tensors have no memory (every data_ptr() is 0)
    a0, b0 = a.data_ptr(), b.data_ptr()
    a1, b1 = a0 + a.numel() * a.element_size(), b0 + b.numel() * b.element_size()
    return a0 < b1 and b0 < a1


def _check_disjoint(op: str, named: Sequence[tuple[str, Tensor]]) -> None:
    """No two of the dense tensors ``named`` (all on one device) share a byte. Sorted by address,
    so that only neighbours need comparing: O(n log n) for any number of tensors."""
    spans = sorted(
        (t.data_ptr(), t.data_ptr() + t.numel() * t.element_size(), name)
        for name, t in named
        if t.numel() and t.device.type != "meta"  # no memory: every data_ptr() is 0
    )
    end, owner = 0, ""
    for start, stop, name in spans:
        if start < end:
            raise ValueError(
                f"sema.ops.{op}: {owner} and {name} share memory; every EMA and every param must be a separate "
                "buffer (an update would read values it has just written)"
            )
        if stop > end:
            end, owner = stop, name


def _check_weight(op: str, w: float | Tensor, device: torch.device | None) -> float | Tensor:
    if isinstance(w, Tensor):
        if w.layout != torch.strided or w.dim() != 0 or not w.is_floating_point():
            raise ValueError(
                f"sema.ops.{op}: w as a tensor must be a 0-d floating tensor, got {w.dtype} {tuple(w.shape)}"
            )
        if device is not None and w.device != device:
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


def _check_flag(op: str, name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"sema.ops.{op}: {name} must be True or False, got {value!r}")
    return value


def check_dense(named: Sequence[tuple[str, Tensor]], where: str) -> None:
    """Refuse params the multi-tensor mode cannot address (``SwitchEMA(flatten=False)`` and
    DTensor shards keep params where they are): sparse or other layouts, and strided tensors with
    gaps or self-overlap. Raises ``ValueError`` naming every such param, before anything is built."""
    bad = [
        f"{name} ({t.layout})"
        if t.layout != torch.strided
        else f"{name} (shape {tuple(t.shape)}, strides {t.stride()})"
        for name, t in named
        if t.layout != torch.strided or not _is_dense(t)
    ]
    if bad:
        raise ValueError(
            f"{where}: where params stay in place (flatten=False, DTensor shards) each must be dense, with no "
            f"gaps or overlaps; these are not: {', '.join(bad)}. Make them dense first "
            "(param.data = param.data.contiguous()), or use flatten=True, which copies params into a dense bucket"
        )


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
    switch = _check_flag("ema_update_", "switch", switch)
    dispatch_update(ema, param, w, switch, resolve_backend(backend, ema.device))


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
    restore = _check_flag("swap_", "restore", restore)
    dispatch_swap(ema, param, restore, resolve_backend(backend, ema.device))


def ema_update_multi_(
    emas: Sequence[Tensor],
    params: Sequence[Tensor],
    w: float | Tensor,
    switch: bool = False,
    backend: str | None = None,
) -> None:
    """:func:`ema_update_` over lists of tensors that cannot be bucketed (shards, user lists),
    one launch where the backend can. Pairs may have any dense shape and memory format but must
    match each other; all on one device. Everything is checked before the first write, the same
    way for every backend: no EMA or param may share memory with any other (checked by address
    in O(n log n))."""
    op = "ema_update_multi_"
    emas, params = list(emas), list(params)
    if len(emas) != len(params):
        raise ValueError(f"sema.ops.{op}: {len(emas)} EMA tensors but {len(params)} params")
    device = None
    for i, (e, p) in enumerate(zip(emas, params, strict=True)):
        _check_tensor(op, f"emas[{i}]", e, flat=False)
        _check_tensor(op, f"params[{i}]", p, flat=False)
        if e.shape != p.shape or e.stride() != p.stride():
            raise ValueError(
                f"sema.ops.{op}: pair {i} differs in shape or strides: "
                f"{tuple(e.shape)}/{e.stride()} vs {tuple(p.shape)}/{p.stride()}"
            )
        _check_dtypes(op, e, p, f"pair {i}: ")
        if e.device != p.device:
            raise ValueError(f"sema.ops.{op}: pair {i}: ema is on {e.device} but param is on {p.device}; move one")
        if device is None:
            device = e.device
        elif e.device != device:
            raise ValueError(f"sema.ops.{op}: pair {i} is on {e.device}, pair 0 on {device}; use one list per device")
    w = _check_weight(op, w, device)
    switch = _check_flag(op, "switch", switch)
    _check_disjoint(
        op, [(f"emas[{i}]", e) for i, e in enumerate(emas)] + [(f"params[{i}]", p) for i, p in enumerate(params)]
    )
    if device is None:  # nothing to update; a misspelt backend still says so
        if backend not in (None, "auto", *backends.names()):
            raise ValueError(
                f"backend={backend!r}: unknown backend; choose one of {', '.join(backends.names())} or 'auto'"
            )
        return
    dispatch_update_multi(emas, params, w, switch, resolve_backend(backend, device))


def dispatch_update_multi(
    emas: list[Tensor], params: list[Tensor], w: float | Tensor, switch: bool, backend: str
) -> None:
    with torch.no_grad():
        _impl(backend).ema_update_multi_(emas, params, w, switch)


# --- K EMAs of the same params in one pass -------------------------------------------------
# Bytes per element: read the param once, read and write each EMA: 4 + 8K (fp32 params, fp32
# EMAs) or 2 + 8K (bf16 params, fp32 EMAs), against 12K / 10K for K single updates.


@torch.library.custom_op("sema::ema_update_k_", mutates_args=("emas", "param"))
def _ema_update_k_op(emas: list[Tensor], param: Tensor, ws: Tensor, switch_index: int, backend: str) -> None:
    _impl(backend).ema_update_k_(emas, param, ws, None if switch_index < 0 else switch_index)


@torch.library.custom_op("sema::ema_update_k_multi_", mutates_args=("emas", "params"))
def _ema_update_k_multi_op(
    emas: list[Tensor], params: list[Tensor], ws: Tensor, switch_index: int, backend: str
) -> None:
    n = len(params)
    nested = [emas[k * n : (k + 1) * n] for k in range(len(emas) // max(n, 1))]
    _impl(backend).ema_update_k_multi_(nested, params, ws, None if switch_index < 0 else switch_index)


@_ema_update_k_op.register_fake
def _(emas, param, ws, switch_index, backend):
    return None


@_ema_update_k_multi_op.register_fake
def _(emas, params, ws, switch_index, backend):
    return None


def has_update_k(backend: str) -> bool:
    """Whether ``backend`` implements the fused K-EMA op."""
    module = _impl(backend)
    return hasattr(module, "ema_update_k_") and hasattr(module, "ema_update_k_multi_")


def dispatch_update_k(emas: list[Tensor], param: Tensor, ws: Tensor, switch_index: int | None, backend: str) -> None:
    if _compiling():
        _ema_update_k_op(emas, param, ws, -1 if switch_index is None else switch_index, backend)
        return
    with torch.no_grad():
        _impl(backend).ema_update_k_(emas, param, ws, switch_index)


def dispatch_update_k_multi(
    emas: list[list[Tensor]], params: list[Tensor], ws: Tensor, switch_index: int | None, backend: str
) -> None:
    if _compiling():
        flat = [t for per_ema in emas for t in per_ema]
        _ema_update_k_multi_op(flat, params, ws, -1 if switch_index is None else switch_index, backend)
        return
    with torch.no_grad():
        _impl(backend).ema_update_k_multi_(emas, params, ws, switch_index)


def _check_ws(op: str, ws: Sequence[float] | Tensor, k: int, device: torch.device) -> Tensor:
    if not isinstance(ws, Tensor):
        if isinstance(ws, (str, bytes)) or not isinstance(ws, Sequence):
            raise TypeError(f"sema.ops.{op}: ws must be a 1-D float tensor or a list of floats, got {ws!r}")
        ws = torch.tensor([_check_weight(op, w, None) for w in ws], dtype=torch.float32, device=device)
    if ws.layout != torch.strided or ws.dim() != 1 or not ws.is_floating_point() or ws.numel() != k:
        raise ValueError(
            f"sema.ops.{op}: ws must be a 1-D float tensor of {k} weights (one per EMA), "
            f"got {ws.dtype} {tuple(ws.shape)}"
        )
    if ws.device != device:
        raise ValueError(
            f"sema.ops.{op}: ws is on {ws.device} but the tensors are on {device}; keep it on their device "
            "so the update needs no host sync"
        )
    return ws.to(torch.float32).contiguous()


def _check_switch_index(op: str, switch_index: object, k: int) -> int | None:
    if switch_index is None:
        return None
    if isinstance(switch_index, bool) or not isinstance(switch_index, int) or not 0 <= switch_index < k:
        raise ValueError(f"sema.ops.{op}: switch_index={switch_index!r} must be None or an int in [0, {k})")
    return switch_index


def ema_update_k_(
    emas: Sequence[Tensor],
    param: Tensor,
    ws: Sequence[float] | Tensor,
    switch_index: int | None = None,
    backend: str | None = None,
) -> None:
    """K EMAs of one flat param in one pass that reads the param once:
    ``emas[k] <- lerp(emas[k], param, ws[k])`` for every k, bit for bit what K calls of
    :func:`ema_update_` give; with ``switch_index=k``, then ``param <- cast(emas[k])`` (every EMA
    reads the param from before the switch).

    ``emas``: K 1-D contiguous tensors of one dtype (fp32 or the param dtype), as long as
    ``param``; ``ws``: a 1-D float32 tensor of K weights on the same device (read on the device:
    no host sync) or a list of floats in [0, 1]. Bytes per element: 4 + 8K (fp32 params) or
    2 + 8K (bf16 params, fp32 EMAs), plus the param write with a switch.
    """
    op = "ema_update_k_"
    emas = list(emas)
    if not emas:
        raise ValueError(f"sema.ops.{op}: emas is empty; pass one EMA tensor per decay")
    for k, e in enumerate(emas):
        _check_tensor(op, f"emas[{k}]", e, flat=True)
        _check_pair(op, e, param)
        if e.dtype != emas[0].dtype:
            raise TypeError(f"sema.ops.{op}: emas[{k}] is {e.dtype} but emas[0] is {emas[0].dtype}; use one dtype")
    ws = _check_ws(op, ws, len(emas), param.device)
    switch_index = _check_switch_index(op, switch_index, len(emas))
    _check_disjoint(op, [(f"emas[{k}]", e) for k, e in enumerate(emas)] + [("param", param)])
    name = resolve_backend(backend, param.device)
    if not has_update_k(name):
        raise NotImplementedError(f"sema.ops.{op}: the {name} backend has no fused K-EMA op")
    dispatch_update_k(emas, param, ws, switch_index, name)


def ema_update_k_multi_(
    emas: Sequence[Sequence[Tensor]],
    params: Sequence[Tensor],
    ws: Sequence[float] | Tensor,
    switch_index: int | None = None,
    backend: str | None = None,
) -> None:
    """:func:`ema_update_k_` over lists of tensors (shards, user lists): ``emas[k][i]`` is EMA k
    of ``params[i]``; one launch where the backend can. Everything is checked before the first
    write, as in :func:`ema_update_multi_`."""
    op = "ema_update_k_multi_"
    emas = [list(per_ema) for per_ema in emas]
    params = list(params)
    if not emas:
        raise ValueError(f"sema.ops.{op}: emas is empty; pass one list of EMA tensors per decay")
    for k, per_ema in enumerate(emas):
        if len(per_ema) != len(params):
            raise ValueError(f"sema.ops.{op}: emas[{k}] has {len(per_ema)} tensors but there are {len(params)} params")
    device = params[0].device if params else None
    for i, p in enumerate(params):
        _check_tensor(op, f"params[{i}]", p, flat=False)
        for k, per_ema in enumerate(emas):
            e = per_ema[i]
            _check_tensor(op, f"emas[{k}][{i}]", e, flat=False)
            if e.shape != p.shape or e.stride() != p.stride() or e.device != p.device:
                raise ValueError(f"sema.ops.{op}: emas[{k}][{i}] differs from params[{i}] in shape, strides or device")
            _check_dtypes(op, e, p, f"emas[{k}][{i}]: ")
            if e.dtype != emas[0][i].dtype:
                raise TypeError(f"sema.ops.{op}: emas[{k}][{i}] is {e.dtype} but emas[0][{i}] is {emas[0][i].dtype}")
        if p.device != device:
            raise ValueError(f"sema.ops.{op}: params[{i}] is on {p.device}, params[0] on {device}")
    if device is None:
        return
    ws = _check_ws(op, ws, len(emas), device)
    switch_index = _check_switch_index(op, switch_index, len(emas))
    _check_disjoint(
        op,
        [(f"emas[{k}][{i}]", e) for k, per_ema in enumerate(emas) for i, e in enumerate(per_ema)]
        + [(f"params[{i}]", p) for i, p in enumerate(params)],
    )
    name = resolve_backend(backend, device)
    if not has_update_k(name):
        raise NotImplementedError(f"sema.ops.{op}: the {name} backend has no fused K-EMA op")
    dispatch_update_k_multi(emas, params, ws, switch_index, name)


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
    if t.numel() == 0:
        return True
    expected = 1
    for size, stride in sorted(zip(t.shape, t.stride(), strict=False), key=lambda s: s[1]):
        if size == 1:
            continue
        if stride != expected:
            return False
        expected *= size
    return True

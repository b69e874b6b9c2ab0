"""The PyTorch reference backend ``torch``: every op of the kernel contract in plain PyTorch.

It is what CPU users without the extension get, so it uses the fastest pure-PyTorch
formulation measured (``bench/torch_formulations.py``): cache-blocked chunks of ``CHUNK``
elements, so that when an op needs two passes over the same bytes (a cast to fp32 then the
lerp, or the lerp then the switch copy) the second pass reads from cache instead of memory.

Inputs are validated by :mod:`sema.ops` before they reach this module: 1-D contiguous
tensors of equal length on one device, a supported dtype pair, no overlap. ``w`` is a
Python float or a 0-d float32 tensor on the same device; nothing here reads a device tensor's
value on the host (a CPU tensor's, for a bf16/fp16 EMA, costs no sync).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor

# Elements per block: 4 MiB of fp32, still in cache when the second pass reads it back. On the
# 2-core AMD EPYC VM of bench/results/torch_formulations-*.json, 2**20 beat 2**16 and 2**18 and
# the flat and per-tensor forms for every two-pass op measured.
CHUNK = 1 << 20

if sys.byteorder != "little":  # the bf16 packing reads the halves of an fp32 word by position
    raise ImportError("sema's reference swap_ assumes a little-endian machine")


def availability(device_type: str) -> tuple[bool, str]:
    return True, "pure PyTorch, runs on any device"


def _chunks(*tensors: Tensor) -> Iterator[tuple[Tensor, ...]]:
    n = tensors[0].numel()
    for start in range(0, n, CHUNK):
        length = min(CHUNK, n - start)
        yield tuple(t.narrow(0, start, length) for t in tensors)


def ema_update_(ema: Tensor, param: Tensor, w: float | Tensor, switch: bool = False) -> None:
    """``ema <- lerp(ema, param, w)`` in fp32; with ``switch``, then ``param <- cast(ema)``."""
    if ema.dtype == torch.float32 and param.dtype == torch.float32:
        if not switch:
            ema.lerp_(param, w)  # a single pass: blocking gains nothing, and saves no Python loop
            return
        for e, p in _chunks(ema, param):
            e.lerp_(p, w)
            p.copy_(e)
        return
    if ema.dtype == torch.float32:  # fp32 EMA, bf16/fp16 params
        for e, p in _chunks(ema, param):
            e.lerp_(p.float(), w)
            if switch:
                p.copy_(e)  # copy_ rounds to nearest even
        return
    # Same reduced dtype: math in fp32, one rounding.
    if ema.device.type == "cpu":
        # PyTorch's CPU lerp on bf16/fp16 does exactly that when the weight is a Python float
        # (a tensor weight would first be rounded to bf16/fp16), 3x faster than the casts below.
        # float() of a CPU tensor costs no device sync.
        weight = float(w)
        if not switch:
            ema.lerp_(param, weight)
            return
        for e, p in _chunks(ema, param):
            e.lerp_(p, weight)
            p.copy_(e)
        return
    for e, p in _chunks(ema, param):
        acc = e.float()
        acc.lerp_(p.float(), w)
        e.copy_(acc)
        if switch:
            p.copy_(e)


def switch_(ema: Tensor, param: Tensor) -> None:
    """``param <- cast(ema)``, rounding to nearest even."""
    param.copy_(ema)


def swap_(ema: Tensor, param: Tensor, restore: bool = False) -> None:
    """Exchange ``ema`` and ``param`` bit for bit (equal dtypes), or pack/unpack fp32 EMA with
    bf16 params with no extra memory (see DESIGN.md): the param slot receives the EMA rounded
    half away from zero to bf16, the EMA keeps its low 16 bits and stores the param in its
    high half. ``swap_(restore=True)`` undoes the packing exactly."""
    if ema.dtype == param.dtype:
        # Raw bits, so NaN payloads survive; a chunk temporary instead of a full-size one.
        ema_bits, param_bits = _as_bits(ema), _as_bits(param)
        for e, p in _chunks(ema_bits, param_bits):
            saved = e.clone()
            e.copy_(p)
            p.copy_(saved)
        return
    halves = ema.view(torch.int16)  # little endian: [lo0, hi0, lo1, hi1, ...]
    low, high = halves[0::2], halves[1::2]
    param_bits = param.view(torch.int16)
    for lo, hi, p in _chunks(low, high, param_bits):
        carry = lo < 0  # low half >= 0x8000 as an unsigned number
        if not restore:
            saved = hi.clone()
            hi.copy_(p)
            p.copy_(saved + carry)  # int16 arithmetic wraps: modular, as the format needs
        else:
            saved = p.clone()
            p.copy_(hi)
            hi.copy_(saved - carry.to(torch.int16))


def _flat(t: Tensor) -> Tensor:
    """1-D view of a dense tensor's memory (contiguous or not: sema.ops checked it is dense)."""
    return t.view(-1) if t.is_contiguous() else t.as_strided((t.numel(),), (1,), t.storage_offset())


def _as_bits(t: Tensor) -> Tensor:
    return t.view({4: torch.int32, 2: torch.int16, 8: torch.int64}[t.element_size()])


def ema_update_multi_(
    emas: Sequence[Tensor], params: Sequence[Tensor], w: float | Tensor, switch: bool = False
) -> None:
    """The update over lists of tensors: one ``torch._foreach_lerp_`` for the fp32/fp32 pairs,
    the flat op per tensor for the others."""
    fp32_emas, fp32_params = [], []
    for e, p in zip(emas, params, strict=False):
        if e.dtype == torch.float32 and p.dtype == torch.float32:
            fp32_emas.append(e)
            fp32_params.append(p)
        else:
            ema_update_(_flat(e), _flat(p), w, switch)
    if fp32_emas:
        if isinstance(w, Tensor):
            torch._foreach_lerp_(fp32_emas, fp32_params, [w] * len(fp32_emas))
        else:
            torch._foreach_lerp_(fp32_emas, fp32_params, w)
        if switch:
            torch._foreach_copy_(fp32_params, fp32_emas)

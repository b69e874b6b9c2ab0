"""The PyTorch reference backend ``torch``: every op of the kernel contract in plain PyTorch.

It is what CPU users without the extension get, so it uses the fastest pure-PyTorch
formulation measured (``bench/torch_formulations.py``): on the CPU, cache-blocked chunks of
``CHUNK`` elements, so that when an op needs two passes over the same bytes (a cast to fp32 then
the lerp, or the lerp then the switch copy) the second pass reads from cache instead of memory.
Each CPU block runs with the thread count of :data:`sema.cpu_threads.PLANNER` (one thread while
another process holds a core). On other devices blocking saves nothing and costs launches: one
op per bucket (see :func:`chunk_elements`).

Inputs are validated by :mod:`sema.ops` before they reach this module: 1-D contiguous
tensors of equal length on one device, a supported dtype pair, no overlap. ``w`` is a
Python float or a 0-d float32 tensor on the same device; nothing here reads a device tensor's
value on the host (a CPU tensor's, for a bf16/fp16 EMA, costs no sync).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from sema.cpu_threads import PLANNER

# Elements per block on the CPU: 4 MiB of fp32, still in cache when the second pass reads it back.
# On the 2-core AMD EPYC VM of bench/results/torch_formulations-*.json, 2**20 beat 2**16 and 2**18
# and the flat and per-tensor forms for every two-pass op measured.
CHUNK = 1 << 20
# Off the CPU, the only reason to block is to bound full-size temporaries (a cast to fp32, a
# clone): 2**26 elements is 256 MiB of fp32, and a 1B-element bucket takes 17 blocks.
TEMPORARY_CHUNK = 1 << 26
# at::internal::GRAIN_SIZE: ATen's CPU kernels run inline, with no parallel region, up to here.
_ATEN_GRAIN_SIZE = 32768

if sys.byteorder != "little":  # the bf16 packing reads the halves of an fp32 word by position
    raise ImportError("sema's reference swap_ assumes a little-endian machine")


# Dtypes whose lerp PyTorch computes in their own precision: fp32, and fp64 (SwitchEMA's fp64
# buckets, which only this backend serves, with an fp64 weight).
_FULL = (torch.float32, torch.float64)


def availability(device_type: str) -> tuple[bool, str]:
    return True, "pure PyTorch, runs on any device"


def chunk_elements(device: torch.device, two_pass: bool, temporaries: bool) -> int | None:
    """Elements per block of an op on ``device`` (``None``: the whole bucket in one op).

    ``two_pass``: the op reads its bytes twice (blocking keeps the second read in cache on the
    CPU); ``temporaries``: it makes temporaries as large as its block."""
    if device.type == "cpu":
        return CHUNK if two_pass or temporaries else None
    return TEMPORARY_CHUNK if temporaries else None


def _blocked(
    body: Callable[..., None],
    key: tuple[object, ...],
    bytes_per_element: int,
    two_pass: bool,
    temporaries: bool,
    *tensors: Tensor,
) -> None:
    """``body(*blocks)`` over aligned blocks of ``tensors``."""
    n = tensors[0].numel()
    if n <= _ATEN_GRAIN_SIZE and tensors[0].is_cpu:  # one block, and ATen opens no region for it
        body(*tensors)
        return
    device = tensors[0].device
    chunk = chunk_elements(device, two_pass, temporaries)
    starts = [None] if chunk is None or n <= chunk else range(0, n, chunk)
    for start in starts:
        blocks = tensors if start is None else tuple(t.narrow(0, start, min(chunk, n - start)) for t in tensors)
        if device.type == "cpu":
            PLANNER.run_torch(key, blocks[0].numel() * bytes_per_element, lambda blocks=blocks: body(*blocks))
        else:
            body(*blocks)


def _lerp(e: Tensor, p: Tensor, w: float | Tensor) -> None:
    e.lerp_(p, w)


def _lerp_then_copy(e: Tensor, p: Tensor, w: float | Tensor) -> None:
    e.lerp_(p, w)
    p.copy_(e)


def _lerp_widened(e: Tensor, p: Tensor, w: float | Tensor, switch: bool) -> None:
    e.lerp_(p.float(), w)
    if switch:
        p.copy_(e)  # copy_ rounds to nearest even


def _lerp_in_fp32(e: Tensor, p: Tensor, w: float | Tensor, switch: bool) -> None:
    acc = e.float()
    acc.lerp_(p.float(), w)
    e.copy_(acc)
    if switch:
        p.copy_(e)


def ema_update_(ema: Tensor, param: Tensor, w: float | Tensor, switch: bool = False) -> None:
    """``ema <- lerp(ema, param, w)`` in fp32; with ``switch``, then ``param <- cast(ema)``."""
    key = ("update", ema.dtype, param.dtype, switch)
    nbytes = 2 * ema.element_size() + (2 if switch else 1) * param.element_size()
    if ema.dtype == param.dtype and (ema.dtype in _FULL or ema.device.type == "cpu"):
        # fp32, or a reduced dtype on the CPU: PyTorch's CPU lerp on bf16/fp16 computes in fp32
        # and rounds once when the weight is a Python float (a tensor weight would first be
        # rounded to bf16/fp16), 3x faster than the casts below. float() of a CPU tensor costs
        # no device sync.
        weight = w if ema.dtype in _FULL else float(w)
        if switch:
            _blocked(lambda e, p: _lerp_then_copy(e, p, weight), key, nbytes, True, False, ema, param)
        else:  # a single pass: blocking gains nothing
            _blocked(lambda e, p: _lerp(e, p, weight), key, nbytes, False, False, ema, param)
    elif ema.dtype == torch.float32:  # fp32 EMA, bf16/fp16 params
        _blocked(lambda e, p: _lerp_widened(e, p, w, switch), key, nbytes, True, True, ema, param)
    else:  # same reduced dtype off the CPU: math in fp32, one rounding
        _blocked(lambda e, p: _lerp_in_fp32(e, p, w, switch), key, nbytes, True, True, ema, param)


def switch_(ema: Tensor, param: Tensor) -> None:
    """``param <- cast(ema)``, rounding to nearest even."""
    key = ("switch", ema.dtype, param.dtype)
    _blocked(Tensor.copy_, key, ema.element_size() + param.element_size(), False, False, param, ema)


def _exchange(e: Tensor, p: Tensor) -> None:
    saved = e.clone()
    e.copy_(p)
    p.copy_(saved)


def _pack(lo: Tensor, hi: Tensor, p: Tensor) -> None:
    carry = lo < 0  # low half >= 0x8000 as an unsigned number
    saved = hi.clone()
    hi.copy_(p)
    p.copy_(saved + carry)  # int16 arithmetic wraps: modular, as the format needs


def _unpack(lo: Tensor, hi: Tensor, p: Tensor) -> None:
    carry = lo < 0
    saved = p.clone()
    p.copy_(hi)
    hi.copy_(saved - carry.to(torch.int16))


def swap_(ema: Tensor, param: Tensor, restore: bool = False) -> None:
    """Exchange ``ema`` and ``param`` bit for bit (equal dtypes), or pack/unpack fp32 EMA with
    bf16 params with no extra memory (see DESIGN.md): the param slot receives the EMA rounded
    half away from zero to bf16, the EMA keeps its low 16 bits and stores the param in its
    high half. ``swap_(restore=True)`` undoes the packing exactly."""
    key = ("swap", ema.dtype, param.dtype, restore)
    nbytes = 2 * (ema.element_size() + param.element_size())
    if ema.dtype == param.dtype:
        # Raw bits, so NaN payloads survive; a block-sized temporary instead of a full-size one.
        _blocked(_exchange, key, nbytes, True, True, _as_bits(ema), _as_bits(param))
        return
    halves = ema.view(torch.int16)  # little endian: [lo0, hi0, lo1, hi1, ...]
    low, high = halves[0::2], halves[1::2]
    _blocked(_unpack if restore else _pack, key, nbytes, True, True, low, high, param.view(torch.int16))


def _flat(t: Tensor) -> Tensor:
    """1-D view of a dense tensor's memory (contiguous or not: sema.ops checked it is dense)."""
    return t.view(-1) if t.is_contiguous() else t.as_strided((t.numel(),), (1,), t.storage_offset())


def _as_bits(t: Tensor) -> Tensor:
    return t.view({4: torch.int32, 2: torch.int16, 8: torch.int64}[t.element_size()])


def _foreach_update(emas: list[Tensor], params: list[Tensor], w: float | Tensor, switch: bool) -> None:
    if isinstance(w, Tensor):
        torch._foreach_lerp_(emas, params, [w] * len(emas))
    else:
        torch._foreach_lerp_(emas, params, w)
    if switch:
        torch._foreach_copy_(params, emas)


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
    if not fp32_emas:
        return
    if fp32_emas[0].device.type != "cpu":
        _foreach_update(fp32_emas, fp32_params, w, switch)
        return
    numel = sum(e.numel() for e in fp32_emas)
    key = ("update_multi", switch)
    PLANNER.run_torch(key, numel * (16 if switch else 12), lambda: _foreach_update(fp32_emas, fp32_params, w, switch))


def ema_update_k_(emas: Sequence[Tensor], param: Tensor, ws: Tensor, switch_index: int | None = None) -> None:
    """K EMAs of ``param`` (see :func:`sema.ops.ema_update_k_`), block by block: each block of the
    param is read from memory once and from cache for the other EMAs, and each EMA gets exactly
    the arithmetic of :func:`ema_update_` (so the result is bit for bit K single updates)."""
    ema0 = emas[0]
    weights = [ws[k] for k in range(len(emas))]  # 0-d views: no host read
    if ema0.dtype == param.dtype and ema0.dtype not in _FULL and ema0.device.type == "cpu":
        weights = [float(w) for w in weights]  # as the single op: a float weight on the CPU
    same = ema0.dtype == param.dtype and (ema0.dtype in _FULL or ema0.device.type == "cpu")
    widened = ema0.dtype == torch.float32 and param.dtype != torch.float32

    def body(p: Tensor, *es: Tensor) -> None:
        wide = p.float() if widened or not same else p
        for e, w in zip(es, weights, strict=True):
            if same or widened:
                e.lerp_(wide, w)
            else:  # same reduced dtype off the CPU: math in fp32, one rounding
                acc = e.float()
                acc.lerp_(wide, w)
                e.copy_(acc)
        if switch_index is not None:
            p.copy_(es[switch_index])  # copy_ rounds to nearest even

    key = ("update_k", ema0.dtype, param.dtype, len(emas), switch_index is not None)
    nbytes = 2 * len(emas) * ema0.element_size() + (2 if switch_index is not None else 1) * param.element_size()
    _blocked(body, key, nbytes, True, not same, param, *emas)


def ema_update_k_multi_(
    emas: Sequence[Sequence[Tensor]], params: Sequence[Tensor], ws: Tensor, switch_index: int | None = None
) -> None:
    """:func:`ema_update_k_` for each param of a list (``emas[k][i]``: EMA k of ``params[i]``)."""
    for i, p in enumerate(params):
        ema_update_k_([_flat(per_ema[i]) for per_ema in emas], _flat(p), ws, switch_index)

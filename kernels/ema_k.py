"""K EMAs of one flat bucket in one pass: ``emas[k] <- lerp(emas[k], param, ws[k])`` for every k,
reading the params once, optionally followed by the switch ``param <- cast(emas[switch_index])``.

A kernel takes ``MAX_K`` EMA pointers; the ``K``-th and later are ``None`` (constexpr), so each K
compiles to its own kernel with no unused arguments. The EMAs are updated one after the other,
with the param rows held in registers: a thread holds the param and one EMA at a time, so the
registers do not grow with K.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from .ema import _lerp
from .launch import NUM_WARPS, TRITON_DTYPES, aligned_parts_k, block_size, device_guard
from .layout import TAIL_PARTS, first_element, join_rows, load_rows, row_offsets, split_rows, store_rows
from .multi import _block_table

MAX_K = 8
NO_SWITCH = -1  # SWITCH_INDEX when nothing is switched
# Elements per program for every dtype pair: the param values stay in registers, in fp32, across
# the K updates, so a block of 2-byte tensors is half of the single update's (16 elements per
# thread either way: two 16-byte vectors of a 2-byte tensor, four of an fp32 one).
K_BLOCK = block_size(torch.float32)


@triton.jit
def kth(k: tl.constexpr, e0, e1, e2, e3, e4, e5, e6, e7):
    """The ``k``-th of eight values, ``k`` known at compile time."""
    return (
        e0 if k == 0 else e1 if k == 1 else e2 if k == 2 else e3 if k == 3
        else e4 if k == 4 else e5 if k == 5 else e6 if k == 6 else e7
    )  # fmt: skip


@triton.jit
def update_k_rows(
    e0, e1, e2, e3, e4, e5, e6, e7,
    param_ptr,
    ws_ptr,
    start,
    n_valid,
    ROWS: tl.constexpr,
    K: tl.constexpr,
    SWITCH_INDEX: tl.constexpr,
    MASKED: tl.constexpr,
    TABLE_DTYPE: tl.constexpr,
    ALIGNED: tl.constexpr,
):  # fmt: skip
    """The K updates of ``ROWS`` rows (layout.py) from element ``start`` of the EMAs ``e0``... and
    the param. ``MASKED``: only the first ``n_valid`` elements. The multi-tensor kernel passes
    table slots that hold the EMA addresses and their ``TABLE_DTYPE``: each address is read just
    before its EMA, so that a thread does not hold all K of them (``ALIGNED``: 16-byte aligned)."""
    EMA_DTYPE: tl.constexpr = e0.dtype.element_ty if TABLE_DTYPE is None else TABLE_DTYPE
    ROW: tl.constexpr = 256 // EMA_DTYPE.primitive_bitwidth
    # A 2-byte param beside 4-byte EMAs is read in whole rows, one vector each, and split in
    # registers. Not in the masked passes: their accesses are scalar, and with unaligned addresses
    # the split would move values between threads (through shared memory).
    NARROW: tl.constexpr = param_ptr.dtype.element_ty.primitive_bitwidth < EMA_DTYPE.primitive_bitwidth and not MASKED
    first, second, whole = row_offsets(ROWS, ROW)
    param_ptr += start
    if NARROW:
        param_rows = load_rows(param_ptr, whole, n_valid, MASKED).to(tl.float32)
        param_first, param_second = split_rows(param_rows, ROWS, ROW)
    else:
        param_first = load_rows(param_ptr, first, n_valid, MASKED).to(tl.float32)
        param_second = load_rows(param_ptr, second, n_valid, MASKED).to(tl.float32)
    for k in tl.static_range(K):
        ema_ptr = kth(k, e0, e1, e2, e3, e4, e5, e6, e7)
        if TABLE_DTYPE is not None:
            ema_ptr = tl.load(ema_ptr).to(tl.pointer_type(TABLE_DTYPE))
            if ALIGNED:
                ema_ptr = tl.multiple_of(ema_ptr, 16)
        ema_ptr += start
        weight = tl.load(ws_ptr + k)
        result_first = _lerp(load_rows(ema_ptr, first, n_valid, MASKED).to(tl.float32), param_first, weight)
        result_second = _lerp(load_rows(ema_ptr, second, n_valid, MASKED).to(tl.float32), param_second, weight)
        store_rows(ema_ptr, first, result_first, n_valid, MASKED)
        store_rows(ema_ptr, second, result_second, n_valid, MASKED)
        # The param rows stay in registers: the EMAs after this one read the value from before.
        if k == SWITCH_INDEX:
            if NARROW:  # round to nearest even
                store_rows(param_ptr, whole, join_rows(result_first, result_second, ROWS, ROW), n_valid, MASKED)
            else:
                store_rows(param_ptr, first, result_first, n_valid, MASKED)
                store_rows(param_ptr, second, result_second, n_valid, MASKED)


@triton.jit
def _ema_update_k_kernel(
    e0, e1, e2, e3, e4, e5, e6, e7,
    param_ptr,
    ws_ptr,
    n_elements,
    BLOCK: tl.constexpr,
    K: tl.constexpr,
    SWITCH_INDEX: tl.constexpr,
):  # fmt: skip
    ROWS: tl.constexpr = BLOCK * e0.dtype.element_ty.primitive_bitwidth // 256
    start = first_element(BLOCK)
    remaining = n_elements - start
    if remaining >= BLOCK:
        update_k_rows(
            e0, e1, e2, e3, e4, e5, e6, e7, param_ptr, ws_ptr, start, BLOCK, ROWS, K, SWITCH_INDEX, False, None, False
        )  # fmt: skip
    else:
        for part in range(TAIL_PARTS):
            offset = part * (BLOCK // TAIL_PARTS)
            update_k_rows(
                e0, e1, e2, e3, e4, e5, e6, e7, param_ptr, ws_ptr, start + offset, remaining - offset,
                ROWS // TAIL_PARTS, K, SWITCH_INDEX, True, None, False,
            )  # fmt: skip


def passes(n_emas: int, switch_index: int | None) -> list[tuple[range, int]]:
    """The EMAs of each pass (``MAX_K`` at most) and its ``SWITCH_INDEX`` within the pass. The
    pass that switches runs last, so that every pass reads the params from before the switch."""
    chunks = [range(start, min(start + MAX_K, n_emas)) for start in range(0, n_emas, MAX_K)]
    if switch_index is None:
        return [(chunk, NO_SWITCH) for chunk in chunks]
    last = switch_index // MAX_K
    order = [chunk for i, chunk in enumerate(chunks) if i != last] + [chunks[last]]
    return [(chunk, switch_index - chunk.start if chunk is chunks[last] else NO_SWITCH) for chunk in order]


def _launch_update_k(emas: Sequence[Tensor], param: Tensor, ws: Tensor, switch_index: int | None) -> None:
    with device_guard(param.device):
        for chunk, chunk_switch in passes(len(emas), switch_index):
            chunk_ws = ws[chunk.start : chunk.stop]
            for ema_parts, param_part in aligned_parts_k([emas[k] for k in chunk], param):
                _ema_update_k_kernel[(triton.cdiv(param_part.numel(), K_BLOCK),)](
                    *ema_parts,
                    *[None] * (MAX_K - len(ema_parts)),
                    param_part,
                    chunk_ws,
                    param_part.numel(),
                    BLOCK=K_BLOCK,
                    K=len(ema_parts),
                    SWITCH_INDEX=chunk_switch,
                    num_warps=NUM_WARPS,
                    enable_fp_fusion=False,
                )


@triton.jit
def _entry_update_k(
    entry,
    param_ptr,
    ws_ptr,
    n_elements,
    EMA_DTYPE: tl.constexpr,
    BLOCK: tl.constexpr,
    K: tl.constexpr,
    SWITCH_INDEX: tl.constexpr,
    ALIGNED: tl.constexpr,
):
    ROWS: tl.constexpr = BLOCK * EMA_DTYPE.primitive_bitwidth // 256
    e1 = entry + 1 if K > 1 else None
    e2 = entry + 2 if K > 2 else None
    e3 = entry + 3 if K > 3 else None
    e4 = entry + 4 if K > 4 else None
    e5 = entry + 5 if K > 5 else None
    e6 = entry + 6 if K > 6 else None
    e7 = entry + 7 if K > 7 else None
    if ALIGNED:
        update_k_rows(
            entry, e1, e2, e3, e4, e5, e6, e7, param_ptr, ws_ptr, 0, BLOCK, ROWS, K, SWITCH_INDEX, False,
            EMA_DTYPE, ALIGNED,
        )  # fmt: skip
    else:
        for part in range(TAIL_PARTS):
            offset = part * (BLOCK // TAIL_PARTS)
            update_k_rows(
                entry, e1, e2, e3, e4, e5, e6, e7, param_ptr, ws_ptr, offset, n_elements - offset,
                ROWS // TAIL_PARTS, K, SWITCH_INDEX, True, EMA_DTYPE, ALIGNED,
            )  # fmt: skip


@triton.jit
def _ema_update_k_multi_kernel(
    block_table_ptr,
    ws_ptr,
    EMA_DTYPE: tl.constexpr,
    PARAM_DTYPE: tl.constexpr,
    BLOCK: tl.constexpr,
    K: tl.constexpr,
    SWITCH_INDEX: tl.constexpr,
):
    # One program per block; its entry (multi._entries) holds K EMA addresses, the param
    # address and the element count, read in one round of loads before the data.
    entry = block_table_ptr + (K + 2) * tl.program_id(0).to(tl.int64)
    n_elements = tl.load(entry + K + 1)
    # The param address is read in each branch: Triton 3.6 puts a multiple_of hint on the value's
    # load, so one shared load would carry the full blocks' alignment into the masked path too.
    if n_elements == BLOCK:  # a full block, 16-byte aligned in every tensor
        param_ptr = tl.multiple_of(tl.load(entry + K).to(tl.pointer_type(PARAM_DTYPE)), 16)
        _entry_update_k(entry, param_ptr, ws_ptr, n_elements, EMA_DTYPE, BLOCK, K, SWITCH_INDEX, ALIGNED=True)
    else:
        param_ptr = tl.load(entry + K).to(tl.pointer_type(PARAM_DTYPE))
        _entry_update_k(entry, param_ptr, ws_ptr, n_elements, EMA_DTYPE, BLOCK, K, SWITCH_INDEX, ALIGNED=False)


def _launch_update_k_multi(
    emas: Sequence[Sequence[Tensor]], params: Sequence[Tensor], ws: Tensor, switch_index: int | None
) -> None:
    groups: dict[tuple[torch.dtype, torch.dtype], list[int]] = {}
    for i, param in enumerate(params):
        groups.setdefault((emas[0][i].dtype, param.dtype), []).append(i)
    for (ema_dtype, param_dtype), members in groups.items():
        group_params = [params[i] for i in members]
        for chunk, chunk_switch in passes(len(emas), switch_index):
            ema_lists = [[emas[k][i] for i in members] for k in chunk]
            block_table = _block_table(ema_lists, group_params, K_BLOCK)
            n_programs = block_table.numel() // (len(chunk) + 2)
            if n_programs == 0:  # only empty tensors
                break
            with device_guard(block_table.device):
                _ema_update_k_multi_kernel[(n_programs,)](
                    block_table,
                    ws[chunk.start : chunk.stop],
                    EMA_DTYPE=TRITON_DTYPES[ema_dtype],
                    PARAM_DTYPE=TRITON_DTYPES[param_dtype],
                    BLOCK=K_BLOCK,
                    K=len(chunk),
                    SWITCH_INDEX=chunk_switch,
                    num_warps=NUM_WARPS,
                    enable_fp_fusion=False,
                )


def ema_update_k_(emas: Sequence[Tensor], param: Tensor, ws: Tensor, switch_index: int | None = None) -> None:
    """``emas[k] <- lerp(emas[k], param, ws[k])`` in fp32 for every k, bit for bit as
    :func:`sema.kernels.ema_update_` with ``w = ws[k]``; with ``switch_index``, then
    ``param <- emas[switch_index]`` rounded to nearest even (every EMA reads the param from
    before the switch).

    ``emas``: K >= 1 tensors, 1-D contiguous, of the length of ``param`` (1-D contiguous), one
    dtype: fp32 or the param dtype (fp32/bf16/fp16); validated by :mod:`sema.ops`. ``ws``: 1-D contiguous
    fp32 tensor of K weights on the device, read by the kernel (no host sync, CUDA-graph
    capturable). One pass reads the params once for up to ``MAX_K`` (8) EMAs; more EMAs run in
    passes of up to 8, each reading the params once more. Bytes per element in one pass: read
    param, read and write each EMA (4 + 8K for fp32 params and EMAs, 2 + 8K for bf16 params with
    fp32 EMAs), plus the param write with ``switch_index``.
    """
    _launch_update_k(emas, param, ws, switch_index)


def ema_update_k_multi_(
    emas: Sequence[Sequence[Tensor]], params: Sequence[Tensor], ws: Tensor, switch_index: int | None = None
) -> None:
    """:func:`ema_update_k_` over lists: ``emas[k][i]`` is the k-th EMA of ``params[i]``. One launch
    per (EMA dtype, param dtype) group and pass of up to 8 EMAs, over a device table with one
    entry per block: K EMA addresses, the param address and the element count (8K + 16 bytes per
    block of 4096 elements), cached by address as for :func:`sema.kernels.ema_update_multi_`.

    ``emas[k][i]``, ``params[i]``: same shape and strides, dense, possibly empty; the K EMAs of a
    param share one dtype, fp32 or the param's. ``ws``: as for :func:`ema_update_k_`.
    """
    _launch_update_k_multi(emas, params, ws, switch_index)

"""The EMA update over lists of tensors that cannot be bucketed (FSDP2 shards, user lists): one
launch per (EMA dtype, param dtype) group, over a device table with one entry per block."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from .ema import update_rows
from .launch import NUM_WARPS, TRITON_DTYPES, block_size, common_aligned_head, device_guard
from .layout import TAIL_PARTS

ENTRY_LENGTH = tl.constexpr(3)  # block table row: ema address, param address, element count
_TABLE_CACHE_SIZE = 16


@triton.jit
def _ema_update_multi_kernel(
    block_table_ptr,
    weight,
    EMA_DTYPE: tl.constexpr,
    PARAM_DTYPE: tl.constexpr,
    BLOCK: tl.constexpr,
    SWITCH: tl.constexpr,
    WEIGHT_IS_TENSOR: tl.constexpr,
):
    # One program per block. Its row holds the block's own addresses, so one round of loads,
    # straight from the program id, comes before the data.
    entry = block_table_ptr + ENTRY_LENGTH * tl.program_id(0).to(tl.int64)
    ema_ptr = tl.load(entry).to(tl.pointer_type(EMA_DTYPE))
    param_ptr = tl.load(entry + 1).to(tl.pointer_type(PARAM_DTYPE))
    n_elements = tl.load(entry + 2)
    ROWS: tl.constexpr = BLOCK * EMA_DTYPE.primitive_bitwidth // 256
    weight_value = tl.load(weight) if WEIGHT_IS_TENSOR else weight
    if n_elements == BLOCK:  # a full block, 16-byte aligned in both tensors (_entries)
        ema_ptr = tl.multiple_of(ema_ptr, 16)
        param_ptr = tl.multiple_of(param_ptr, 16)
        update_rows(ema_ptr, param_ptr, BLOCK, weight_value, ROWS, SWITCH, MASKED=False)
    else:
        for part in range(TAIL_PARTS):
            start = part * (BLOCK // TAIL_PARTS)
            update_rows(
                ema_ptr + start, param_ptr + start, n_elements - start, weight_value, ROWS // TAIL_PARTS, SWITCH, True
            )


_table_cache: OrderedDict[tuple, Tensor] = OrderedDict()
_captured_tables: dict[tuple, Tensor] = {}  # read by CUDA graph replays: never freed


def _entries(rows: Sequence[int], block: int, ema_size: int, param_size: int, n_emas: int = 1) -> list[int]:
    """Block table rows for tensors given as (ema address, param address, element count), or
    with ``n_emas`` EMAs of one param as (``n_emas`` EMA addresses, param address, count).

    A row whose addresses reach a 16-byte boundary together after a few elements gets that
    head as an entry of its own, so that its full blocks are aligned. A full block that still
    is not aligned gets the count ``block + 1``: it takes the masked path, which assumes no
    alignment and covers the whole block. Partial entries come first: blocks usually start in
    program order, and the slower masked passes then run beside the full blocks."""
    width = n_emas + 2
    partial: list[int] = []
    full: list[int] = []
    for row in range(0, len(rows), width):
        ema_addresses, param_address, n_elements = rows[row : row + n_emas], rows[row + n_emas], rows[row + n_emas + 1]
        head = common_aligned_head(ema_addresses, param_address, ema_size, param_size, n_elements)
        if head:
            partial += (*ema_addresses, param_address, head)
        for start in range(head, n_elements, block):
            addresses = (*(address + start * ema_size for address in ema_addresses), param_address + start * param_size)
            count = min(block, n_elements - start)
            if count < block:
                partial += (*addresses, count)
            elif any(address % 16 for address in addresses):
                partial += (*addresses, block + 1)
            else:
                full += (*addresses, block)
    return partial + full


def _block_table(ema_lists: Sequence[Sequence[Tensor]], params: Sequence[Tensor], block: int) -> Tensor:
    """The block table (int64 ``[programs, K + 2]``, :func:`_entries`) on the tensors' device, for
    ``K = len(ema_lists)`` lists of EMAs, each with one EMA per param. Empty tensors get no entry.

    It holds only addresses and counts, so equal keys mean equal tables: it is cached, and a
    training loop that passes the same tensors each step copies nothing to the device."""
    rows: list[int] = []
    for i, param in enumerate(params):
        if param.numel():  # sema.ops checked density: data_ptr() is the lowest address of each
            rows += (*(ema_list[i].data_ptr() for ema_list in ema_lists), param.data_ptr(), param.numel())
    device = params[0].device
    ema_size, param_size = ema_lists[0][0].element_size(), params[0].element_size()
    capturing = device.type == "cuda" and torch.cuda.is_current_stream_capturing()
    key = (device, block, ema_size, param_size, len(ema_lists), *rows)
    cached = _captured_tables.get(key)
    if cached is None:
        cached = _table_cache.get(key)
    if cached is None:
        if capturing:  # a copy from host memory would be replayed from a buffer reused meanwhile
            raise RuntimeError(
                "sema.kernels.ema_update_multi_ / ema_update_k_multi_: its pointer table is built on the first "
                "call with a set of tensors; make one eager call with these tensors before CUDA-graph capture"
            )
        table = torch.tensor(_entries(rows, block, ema_size, param_size, len(ema_lists)), dtype=torch.int64)
        if device.type == "cuda":
            table = table.pin_memory().to(device, non_blocking=True)  # no host sync
        cached = table
        _table_cache[key] = cached
        if len(_table_cache) > _TABLE_CACHE_SIZE:
            _table_cache.popitem(last=False)
    elif key in _table_cache:
        _table_cache.move_to_end(key)
    if capturing:
        _captured_tables[key] = cached
    return cached


def _launch_update_multi(emas: Sequence[Tensor], params: Sequence[Tensor], w: float | Tensor, switch: bool) -> None:
    groups: dict[tuple[torch.dtype, torch.dtype], tuple[list[Tensor], list[Tensor]]] = {}
    for ema, param in zip(emas, params, strict=True):
        group_emas, group_params = groups.setdefault((ema.dtype, param.dtype), ([], []))
        group_emas.append(ema)
        group_params.append(param)
    for (ema_dtype, param_dtype), (group_emas, group_params) in groups.items():
        block = block_size(ema_dtype, param_dtype)
        block_table = _block_table([group_emas], group_params, block)
        n_programs = block_table.numel() // ENTRY_LENGTH.value
        if n_programs == 0:  # only empty tensors
            continue
        with device_guard(block_table.device):
            _ema_update_multi_kernel[(n_programs,)](
                block_table,
                w,
                EMA_DTYPE=TRITON_DTYPES[ema_dtype],
                PARAM_DTYPE=TRITON_DTYPES[param_dtype],
                BLOCK=block,
                SWITCH=switch,
                WEIGHT_IS_TENSOR=isinstance(w, Tensor),
                num_warps=NUM_WARPS,
                enable_fp_fusion=False,
            )


def ema_update_multi_(
    emas: Sequence[Tensor], params: Sequence[Tensor], w: float | Tensor, switch: bool = False
) -> None:
    """:func:`sema.kernels.ema_update_` over pairs of tensors, one launch per dtype pair.

    ``emas[i]``, ``params[i]``: same shape and strides, dense (any memory format, e.g.
    channels_last), possibly empty; dtype pairs as for the flat op and may differ between
    pairs. ``w``: a float in [0, 1] or a 0-d fp32 tensor on the device. Bytes per element as
    the flat op (10 for fp32 EMA/bf16 params, 12 with ``switch``), plus a 24-byte table entry
    per block of 4096-8192 elements. The tables are cached by address: the first call with
    a set of tensors copies them to the device, later calls (and CUDA graph captures) reuse them.
    """
    _launch_update_multi(emas, params, w, switch)

"""The EMA update over lists of tensors that cannot be bucketed (FSDP2 shards, user lists): one
launch per (EMA dtype, param dtype) group, over a device table of pointers and element counts."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from .ema import update_block
from .launch import NUM_WARPS, TRITON_DTYPES, block_size, device_guard

ROW_LENGTH = tl.constexpr(3)  # tensor table row: ema address, param address, element count
_TABLE_CACHE_SIZE = 16


@triton.jit
def _ema_update_multi_kernel(
    tensor_table_ptr,
    block_table_ptr,
    weight,
    EMA_DTYPE: tl.constexpr,
    PARAM_DTYPE: tl.constexpr,
    BLOCK: tl.constexpr,
    SWITCH: tl.constexpr,
    WEIGHT_IS_TENSOR: tl.constexpr,
    ALIGNED: tl.constexpr,
):
    # One program per block: block_table row = (tensor index, first element of the block).
    program = tl.program_id(0).to(tl.int64)
    tensor_index = tl.load(block_table_ptr + 2 * program)
    block_start = tl.load(block_table_ptr + 2 * program + 1)
    row = tensor_table_ptr + ROW_LENGTH * tensor_index
    ema_ptr = tl.load(row).to(tl.pointer_type(EMA_DTYPE))
    param_ptr = tl.load(row + 1).to(tl.pointer_type(PARAM_DTYPE))
    n_elements = tl.load(row + 2)
    if ALIGNED:  # every address in the group is 16-byte aligned: vector loads
        ema_ptr = tl.multiple_of(ema_ptr, 16)
        param_ptr = tl.multiple_of(param_ptr, 16)
    offsets = tl.max_contiguous(tl.multiple_of(block_start + tl.arange(0, BLOCK), BLOCK), BLOCK)
    weight_value = tl.load(weight) if WEIGHT_IS_TENSOR else weight
    if block_start + BLOCK <= n_elements:
        update_block(ema_ptr, param_ptr, offsets, n_elements, weight_value, SWITCH, MASKED=False)
    else:
        update_block(ema_ptr, param_ptr, offsets, n_elements, weight_value, SWITCH, MASKED=True)


_table_cache: OrderedDict[tuple, tuple[Tensor, Tensor]] = OrderedDict()
_captured_tables: dict[tuple, tuple[Tensor, Tensor]] = {}  # read by CUDA graph replays: never freed


def _tables(emas: Sequence[Tensor], params: Sequence[Tensor], block: int) -> tuple[Tensor, Tensor, bool]:
    """The tensor table (int64 [n, 3]) and block table (int64 [programs, 2]) on the tensors'
    device, and whether every address is 16-byte aligned. Empty tensors get no row.

    The tables hold only addresses and counts, so equal keys mean equal tables: they are cached
    and a training loop that passes the same tensors each step copies nothing to the device."""
    rows: list[int] = []
    for ema, param in zip(emas, params, strict=True):
        if ema.numel():  # sema.ops checked density: data_ptr() is the lowest address of each
            rows += (ema.data_ptr(), param.data_ptr(), ema.numel())
    device = emas[0].device
    capturing = device.type == "cuda" and torch.cuda.is_current_stream_capturing()
    key = (device, block, *rows)
    cached = _captured_tables.get(key) or _table_cache.get(key)
    if cached is None:
        if capturing:  # a copy from host memory would be replayed from a buffer reused meanwhile
            raise RuntimeError(
                "sema.kernels.ema_update_multi_: its pointer table is built on the first call with a "
                "set of tensors; make one eager call with these tensors before CUDA-graph capture"
            )
        blocks: list[int] = []
        for index, n_elements in enumerate(rows[2 :: ROW_LENGTH.value]):
            blocks.extend(value for start in range(0, n_elements, block) for value in (index, start))
        table = torch.tensor(rows + blocks, dtype=torch.int64)  # one host tensor, one copy
        if device.type == "cuda":
            table = table.pin_memory().to(device, non_blocking=True)  # no host sync
        cached = table[: len(rows)], table[len(rows) :]
        _table_cache[key] = cached
        if len(_table_cache) > _TABLE_CACHE_SIZE:
            _table_cache.popitem(last=False)
    elif key in _table_cache:
        _table_cache.move_to_end(key)
    if capturing:
        _captured_tables[key] = cached
    aligned = all(address % 16 == 0 for column in (0, 1) for address in rows[column :: ROW_LENGTH.value])
    return *cached, aligned


def _launch_update_multi(emas: Sequence[Tensor], params: Sequence[Tensor], w: float | Tensor, switch: bool) -> None:
    groups: dict[tuple[torch.dtype, torch.dtype], tuple[list[Tensor], list[Tensor]]] = {}
    for ema, param in zip(emas, params, strict=True):
        group_emas, group_params = groups.setdefault((ema.dtype, param.dtype), ([], []))
        group_emas.append(ema)
        group_params.append(param)
    for (ema_dtype, param_dtype), (group_emas, group_params) in groups.items():
        block = block_size(ema_dtype, param_dtype)
        tensor_table, block_table, aligned = _tables(group_emas, group_params, block)
        n_programs = block_table.numel() // 2
        if n_programs == 0:  # only empty tensors
            continue
        with device_guard(tensor_table.device):
            _ema_update_multi_kernel[(n_programs,)](
                tensor_table,
                block_table,
                w,
                EMA_DTYPE=TRITON_DTYPES[ema_dtype],
                PARAM_DTYPE=TRITON_DTYPES[param_dtype],
                BLOCK=block,
                SWITCH=switch,
                WEIGHT_IS_TENSOR=isinstance(w, Tensor),
                ALIGNED=aligned,
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
    the flat op (10 for fp32 EMA/bf16 params, 12 with ``switch``), plus 40 bytes of table
    rows per block of 4096-8192 elements. The tables are cached by address: the first call with
    a set of tensors copies them to the device, later calls (and CUDA graph captures) reuse them.
    """
    _launch_update_multi(emas, params, w, switch)

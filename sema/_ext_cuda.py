"""The ``cuda`` backend: the kernel contract on CUDA tensors, through the compiled ``sema._C``.

Kernels launch on the current stream of the tensors' device. A tensor ``w`` is passed as a
device pointer and read by the kernel: no host sync, and the ops can be captured in a CUDA
graph. The flat ops check every tensor again here (device, dtype, layout, length, overlap)
before its address goes to C++: a wrong pointer there is a crash, not an exception.

The multi-tensor update is the dispatch target of callers that validated their tensors once
(``SwitchEMA`` at construction, ``sema.ops.ema_update_multi_`` through
:func:`check_update_multi` before every call), so it does not check them again: per call it
builds a key from the tensors' addresses, lengths and dtypes and launches over a device table
cached under that key. sema._C checks every pair when it plans a table.
"""

from __future__ import annotations

import functools
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from sema import _extension
from sema._extension import (
    DTYPE_CODES,
    check_k,
    check_pair,
    check_swap_dtypes,
    flat_k_lists,
    flat_pairs,
    k_passes,
    switch_index_code,
)

_C = _extension.extension
PIECE_TABLE_CACHE_SIZE = 16


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


@dataclass
class PieceTables:
    """The device piece tables of one set of tensor pairs (one launch per dtype pair) and the
    streams that may read them.

    The tables are copied without a host sync on the stream current at the first call
    (``uploaded`` is recorded after the copy). A later call on another stream first makes that
    stream wait for the copy and records the stream with the caching allocator, so that when
    the tables are evicted their memory is reused only after the kernels queued on every stream
    that read them have finished. Tables read by a CUDA graph capture are never evicted: the
    graph replays the addresses it captured."""

    launches: list[tuple[int, int, int, int]]  # (ema dtype code, param dtype code, table address, pieces)
    storage: Tensor  # int64, every launch's table, on the device
    uploaded: torch.cuda.Event
    streams: set[int] = field(default_factory=set)  # handles of streams ordered after the upload


_piece_tables: OrderedDict[tuple, PieceTables] = OrderedDict()
_captured_piece_tables: dict[tuple, PieceTables] = {}


def _upload(
    spans: list[tuple[int, int, int, int]], values: list[int], device: torch.device, stream: torch.cuda.Stream
) -> PieceTables:
    """Copies the tables ``values`` to the device without a host sync; ``spans`` are (ema code,
    param code, offset in values, row count) per launch."""
    host = torch.tensor(values, dtype=torch.int64).pin_memory()
    with torch.cuda.stream(stream):
        storage = torch.empty(host.shape, dtype=torch.int64, device=device)
        storage.copy_(host, non_blocking=True)
        uploaded = torch.cuda.Event()
        uploaded.record(stream)
    base = storage.data_ptr()
    launches = [(e, p, base + 8 * offset, count) for e, p, offset, count in spans]
    return PieceTables(launches, storage, uploaded, {stream.cuda_stream})


def _plan_and_upload(
    emas: Sequence[Tensor], params: Sequence[Tensor], device: torch.device, stream: torch.cuda.Stream
) -> PieceTables:
    groups: dict[tuple[int, int], tuple[list[int], list[int], list[int]]] = {}
    for ema, param in zip(emas, params, strict=True):
        codes = (DTYPE_CODES[ema.dtype], DTYPE_CODES[param.dtype])
        group = groups.setdefault(codes, ([], [], []))
        group[0].append(ema.data_ptr())
        group[1].append(param.data_ptr())
        group[2].append(ema.numel())
    values: list[int] = []
    spans: list[tuple[int, int, int, int]] = []
    for (ema_code, param_code), (ema_ptrs, param_ptrs, numels) in groups.items():
        table = _C.cuda_plan_update_multi(ema_ptrs, param_ptrs, numels, ema_code, param_code, device.index)
        if table:
            spans.append((ema_code, param_code, len(values), len(table) // 3))
            values += table
    return _upload(spans, values, device, stream)


def _tables_for(emas: Sequence[Tensor], params: Sequence[Tensor], device: torch.device) -> PieceTables:
    pairs = zip(emas, params, strict=True)
    key = (device, *[x for e, p in pairs for x in (e.data_ptr(), p.data_ptr(), e.numel(), e.dtype, p.dtype)])
    return _cached_tables(key, device, lambda stream: _plan_and_upload(emas, params, device, stream))


def _cached_tables(
    key: tuple, device: torch.device, plan_and_upload: Callable[[torch.cuda.Stream], PieceTables]
) -> PieceTables:
    """The tables under ``key``, planned and uploaded on the current stream at the first call."""
    stream = torch.cuda.current_stream(device)
    capturing = torch.cuda.is_current_stream_capturing()
    tables = _captured_piece_tables.get(key) or _piece_tables.get(key)
    if tables is None:
        if capturing:  # the copy would be captured, and replayed from a host buffer freed meanwhile
            raise RuntimeError(
                "sema cuda ema_update_multi_: its piece tables are built on the first call with a set of "
                "tensors; make one call with these tensors before CUDA-graph capture"
            )
        tables = plan_and_upload(stream)
        _piece_tables[key] = tables
        if len(_piece_tables) > PIECE_TABLE_CACHE_SIZE:
            _piece_tables.popitem(last=False)
    elif key in _piece_tables:
        _piece_tables.move_to_end(key)
    handle = stream.cuda_stream
    if handle not in tables.streams:
        # During a capture no event may be waited for or queried; torch.cuda.graph synchronizes
        # the device before it starts capturing, which orders the upload before the graph.
        if not capturing:
            stream.wait_event(tables.uploaded)
            tables.storage.record_stream(stream)
        tables.streams.add(handle)
    if capturing and key not in _captured_piece_tables:
        _captured_piece_tables[key] = tables
        _piece_tables.pop(key, None)
    return tables


def ema_update_multi_(
    emas: Sequence[Tensor], params: Sequence[Tensor], w: float | Tensor, switch: bool = False
) -> None:
    """:func:`ema_update_` over pairs of dense tensors of any shape: one launch per dtype pair,
    each block one equal piece of one tensor. The caller has validated the pairs (see the module
    docstring and :func:`check_update_multi`); bytes per element as the flat op, plus 24 bytes
    of piece table per block."""
    if not emas:
        return
    device = emas[0].device
    if device.type != "cuda":
        raise ValueError(f"sema cuda ema_update_multi_: emas[0] is on {device}, this backend serves cuda tensors")
    w_value, w_ptr = (0.0, w.data_ptr()) if isinstance(w, Tensor) else (float(w), 0)
    tables = _tables_for(emas, params, device)
    stream = _stream(device)
    for ema_code, param_code, address, count in tables.launches:
        _C.cuda_ema_update_multi_pieces(
            address, count, ema_code, param_code, w_value, w_ptr, bool(switch), device.index, stream
        )


def check_update_multi(emas: Sequence[Tensor], params: Sequence[Tensor], w: float | Tensor) -> None:
    """Every check of the multi-tensor update's inputs (pairs, devices, dtypes, density, no
    shared memory within or across the lists, ``w``), for callers that have not validated them."""
    op = "sema cuda ema_update_multi_"
    flat_emas, flat_params, _, _ = flat_pairs(op, emas, params, "cuda")
    for e, p in zip(flat_emas, flat_params, strict=True):
        _weight(op, w, e, p)


# --- the K-EMA op ---------------------------------------------------------------------------


def ema_update_k_(emas: Sequence[Tensor], param: Tensor, ws: Tensor, switch_index: int | None = None) -> None:
    """K EMAs of one flat param in one launch that reads the param once: ``emas[k] <-
    lerp(emas[k], param, ws[k])`` for every k, bit for bit as K calls of :func:`ema_update_`
    with ``w = ws[k]``; with ``switch_index``, then ``param <- cast(emas[switch_index])`` (every
    EMA reads the param from before the switch).

    emas: K >= 1 1-D contiguous CUDA tensors of one dtype (float32 or the param's), as long as
    ``param``; ws: a 1-D float32 tensor of K weights on the same device, read by the kernel (no
    host sync; capturable in a CUDA graph). One launch takes up to 8 EMAs; more run in passes of
    8 that each read the param once more, the pass holding ``switch_index`` last. Bytes per
    element and pass of k EMAs: 4 + 8k (fp32), 2 + 8k (bf16 params, fp32 EMAs), + the param
    write with a switch."""
    op = "sema cuda ema_update_k_"
    ema_dtype, param_dtype, switch_code = check_k(op, emas, param, ws, switch_index, "cuda")
    stream = _stream(param.device)
    for start, stop, local_switch in k_passes(len(emas), switch_code):
        _C.cuda_ema_update_k(
            [e.data_ptr() for e in emas[start:stop]],
            param.data_ptr(),
            param.numel(),
            ema_dtype,
            param_dtype,
            ws.data_ptr() + 4 * start,
            local_switch,
            param.device.index,
            stream,
        )


def _k_tables_for(
    emas: Sequence[Sequence[Tensor]], params: Sequence[Tensor], device: torch.device, passes: list[tuple[int, int, int]]
) -> PieceTables:
    key = (
        "k",
        device,
        tuple(passes),
        *[x for p in params for x in (p.data_ptr(), p.numel(), p.dtype)],
        *[x for row in emas for e in row for x in (e.data_ptr(), e.dtype)],
    )

    def plan_and_upload(stream: torch.cuda.Stream) -> PieceTables:
        groups: dict[tuple[int, int], list[int]] = {}
        for i, param in enumerate(params):
            groups.setdefault((DTYPE_CODES[emas[0][i].dtype], DTYPE_CODES[param.dtype]), []).append(i)
        values: list[int] = []
        spans: list[tuple[int, int, int, int]] = []
        for start, stop, _ in passes:  # launch order: the pass holding the switch last
            for (ema_code, param_code), members in groups.items():
                table = _C.cuda_plan_update_k_multi(
                    [[emas[k][i].data_ptr() for i in members] for k in range(start, stop)],
                    [params[i].data_ptr() for i in members],
                    [params[i].numel() for i in members],
                    ema_code,
                    param_code,
                    device.index,
                )
                # one launch per pass and group, empty ones included (0 blocks): the caller walks them in step
                spans.append((ema_code, param_code, len(values), len(table) // (stop - start + 2)))
                values += table
        return _upload(spans, values, device, stream)

    return _cached_tables(key, device, plan_and_upload)


def ema_update_k_multi_(
    emas: Sequence[Sequence[Tensor]], params: Sequence[Tensor], ws: Tensor, switch_index: int | None = None
) -> None:
    """:func:`ema_update_k_` over lists of dense tensors of any shape: ``emas[k]`` is the k-th
    EMA's list, one tensor per param. One launch per dtype pair (and pass of 8 EMAs), each block
    one equal piece of one tensor and its K EMAs. The caller has validated the lists (see
    :func:`check_update_k_multi`), as for :func:`ema_update_multi_`; the piece tables are cached
    per set of tensors. Bytes per element as the flat op, plus 8 (K + 2) bytes of table per block."""
    if not params:
        return
    device = params[0].device
    if device.type != "cuda":
        raise ValueError(f"sema cuda ema_update_k_multi_: params[0] is on {device}, this backend serves cuda tensors")
    emas = [list(row) for row in emas]
    switch_code = -1 if switch_index is None else switch_index
    passes = k_passes(len(emas), switch_code)
    tables = _k_tables_for(emas, params, device, passes)
    stream = _stream(device)
    launches = iter(tables.launches)
    groups = len(tables.launches) // len(passes)
    for start, stop, local_switch in passes:
        for _ in range(groups):
            ema_code, param_code, address, count = next(launches)
            _C.cuda_ema_update_k_multi_pieces(
                address,
                count,
                stop - start,
                ema_code,
                param_code,
                ws.data_ptr() + 4 * start,
                local_switch,
                device.index,
                stream,
            )


def check_update_k_multi(
    emas: Sequence[Sequence[Tensor]], params: Sequence[Tensor], ws: Tensor, switch_index: int | None
) -> None:
    """Every check of the multi-tensor K-EMA update's inputs, for callers that have not validated them."""
    op = "sema cuda ema_update_k_multi_"
    flat_k_lists(op, emas, params, ws, "cuda")
    switch_index_code(op, switch_index, len(list(emas)))

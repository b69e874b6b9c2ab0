"""The optional compiled extension ``sema._C``, loaded once, with the reason when it cannot be.

Importing this module never fails: ``extension`` is the module or ``None``, and ``load_error``
says why it is missing (not built, built for another interface, a broken shared library), so
that ``sema.available_backends()`` can show it. Also the checks both extension backends run on
tensors before a pointer goes to C++, where a wrong pointer is a crash rather than an error.
"""

from __future__ import annotations

import importlib
import itertools
from collections.abc import Sequence
from types import ModuleType
from typing import Any

import torch
from torch import Tensor

# Must equal kInterfaceVersion in csrc/bindings.cpp: a stale build is reported, never called.
INTERFACE_VERSION = 3

DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
# EMAs one CUDA K-EMA launch takes (kMaxEmas in csrc/ema_cuda.cu); more run in several passes
MAX_EMAS_PER_PASS = 8


def _load() -> tuple[ModuleType | None, str]:
    try:
        module = importlib.import_module("sema._C")
    except ImportError as exc:
        return None, (
            f"sema._C is not built or cannot be loaded ({exc}); reinstall sema where a C++ compiler "
            "is available (pip install -v shows why the build was skipped)"
        )
    found = getattr(module, "INTERFACE_VERSION", None)
    if found != INTERFACE_VERSION:
        return None, (
            f"sema._C at {module.__file__} implements interface {found}, this sema needs {INTERFACE_VERSION}; "
            "it is a stale build: reinstall sema"
        )
    return module, ""


extension, load_error = _load()


def build_info() -> dict[str, Any]:
    """Build metadata of ``sema._C`` (empty when it is missing)."""
    return dict(extension.build_info()) if extension is not None else {}


def describe() -> str:
    """One line: version, compiler, CPU kernels and CUDA architectures of the build."""
    info = build_info()
    if not info:
        return load_error
    openmp = f"OpenMP {info['openmp']}" if info["openmp"] else "no OpenMP"
    text = f"sema._C {info['version']} ({info['compiler']}, {openmp}; CPU kernels: {info['cpu_isa']}"
    if info["cuda"]:
        ptx = f" + PTX {info['cuda_ptx']}" if info["cuda_ptx"] else ""
        text += f"; CUDA {info['nvcc']} for {', '.join(info['cuda_archs'])}{ptx})"
    else:
        text += f"; no CUDA: {info['cuda_skipped']})"
    return text


# --- checks before any pointer reaches C++ -------------------------------------------------


def check_pair(op: str, ema: Tensor, param: Tensor, device_type: str) -> tuple[int, int]:
    """Checks one (ema, param) pair of flat buffers; returns their dtype codes."""
    for name, tensor in (("ema", ema), ("param", param)):
        if not isinstance(tensor, Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(tensor).__name__}")
        if tensor.device.type != device_type:
            raise ValueError(f"{op}: {name} is on {tensor.device}, this backend serves {device_type} tensors")
        if tensor.layout != torch.strided or tensor.dim() != 1 or not tensor.is_contiguous():
            raise ValueError(
                f"{op}: {name} must be a 1-D contiguous strided tensor, got {tensor.layout} of shape "
                f"{tuple(tensor.shape)} with strides {tensor.stride() if tensor.layout == torch.strided else None}"
            )
        if tensor.dtype not in DTYPE_CODES:
            raise TypeError(f"{op}: {name} dtype {tensor.dtype} is not float32, bfloat16 or float16")
    if ema.dtype not in (torch.float32, param.dtype):
        raise TypeError(f"{op}: ema dtype {ema.dtype} does not fit param dtype {param.dtype}; use float32 or equal")
    if ema.device != param.device:
        raise ValueError(f"{op}: ema is on {ema.device} but param is on {param.device}")
    if ema.numel() != param.numel():
        raise ValueError(f"{op}: ema has {ema.numel()} elements but param has {param.numel()}")
    if overlaps(ema, param):
        raise ValueError(f"{op}: ema and param share memory; they must be separate buffers")
    return DTYPE_CODES[ema.dtype], DTYPE_CODES[param.dtype]


def check_swap_dtypes(op: str, ema: Tensor, param: Tensor) -> None:
    if ema.dtype != param.dtype and param.dtype != torch.bfloat16:
        raise TypeError(f"{op}: no lossless in-place swap between a {ema.dtype} EMA and {param.dtype} params")


def check_disjoint(op: str, tensors: Sequence[Tensor]) -> None:
    """No two of ``tensors`` (all on one device) share a byte."""
    spans = sorted(
        (t.data_ptr(), t.data_ptr() + t.numel() * t.element_size(), i) for i, t in enumerate(tensors) if t.numel()
    )
    for (_, end, i), (start, _, j) in itertools.pairwise(spans):
        if start < end:
            raise ValueError(f"{op}: tensors {min(i, j)} and {max(i, j)} of the lists share memory")


def flat_view(op: str, tensor: Tensor, name: str) -> Tensor:
    """A 1-D view over a dense tensor's memory (the multi-tensor ops accept any dense layout)."""
    if not isinstance(tensor, Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.layout != torch.strided:
        raise ValueError(f"{op}: {name} has layout {tensor.layout}; only strided tensors are supported")
    if tensor.is_contiguous():
        return tensor.view(-1)
    expected = 1
    for size, stride in sorted(zip(tensor.shape, tensor.stride(), strict=True), key=lambda s: s[1]):
        if size != 1 and stride != expected:
            raise ValueError(
                f"{op}: {name} of shape {tuple(tensor.shape)} with strides {tensor.stride()} is not dense; "
                "call .contiguous() on it first"
            )
        expected *= size
    return tensor.as_strided((tensor.numel(),), (1,), tensor.storage_offset())


def flat_pairs(
    op: str, emas: Sequence[Tensor], params: Sequence[Tensor], device_type: str
) -> tuple[list[Tensor], list[Tensor], list[int], list[int]]:
    """Flat views of the multi-tensor op's pairs, checked pair by pair and across the lists."""
    emas, params = list(emas), list(params)
    if len(emas) != len(params):
        raise ValueError(f"{op}: {len(emas)} EMA tensors but {len(params)} params")
    flat_emas, flat_params, ema_codes, param_codes = [], [], [], []
    for i, (ema, param) in enumerate(zip(emas, params, strict=True)):
        e, p = flat_view(op, ema, f"emas[{i}]"), flat_view(op, param, f"params[{i}]")
        if ema.shape != param.shape or ema.stride() != param.stride():
            raise ValueError(f"{op}: pair {i} differs in shape or strides")
        codes = check_pair(f"{op} pair {i}", e, p, device_type)
        if flat_emas and e.device != flat_emas[0].device:
            raise ValueError(f"{op}: pair {i} is on {e.device}, pair 0 on {flat_emas[0].device}")
        flat_emas.append(e)
        flat_params.append(p)
        ema_codes.append(codes[0])
        param_codes.append(codes[1])
    check_disjoint(op, flat_emas + flat_params)
    return flat_emas, flat_params, ema_codes, param_codes


def overlaps(a: Tensor, b: Tensor) -> bool:
    """Whether two tensors on one device share a byte."""
    if a.numel() == 0 or b.numel() == 0:
        return False
    a0, b0 = a.data_ptr(), b.data_ptr()
    return a0 < b0 + b.numel() * b.element_size() and b0 < a0 + a.numel() * a.element_size()


# --- the K-EMA op ---------------------------------------------------------------------------


def check_k(
    op: str, emas: Sequence[Tensor], param: Tensor, ws: Tensor, switch_index: int | None, device_type: str
) -> tuple[int, int, int]:
    """Checks the flat K-EMA op's inputs; returns (ema dtype code, param dtype code, switch index
    code: -1 for None)."""
    emas = list(emas)
    if not emas:
        raise ValueError(f"{op}: no EMAs; pass a list of at least one")
    codes = check_pair(f"{op} emas[0]", emas[0], param, device_type)
    for k, ema in enumerate(emas[1:], start=1):
        check_pair(f"{op} emas[{k}]", ema, param, device_type)
        if ema.dtype != emas[0].dtype:
            raise TypeError(f"{op}: emas[{k}] is {ema.dtype} but emas[0] is {emas[0].dtype}; all EMAs share one dtype")
    check_disjoint(op, emas)
    check_weights(op, ws, len(emas), param.device, [*emas, param])
    return (*codes, switch_index_code(op, switch_index, len(emas)))


def check_weights(op: str, ws: Tensor, count: int, device: torch.device, tensors: Sequence[Tensor]) -> None:
    """``ws`` holds one float32 weight per EMA on the tensors' device and shares no memory with them."""
    if (
        not isinstance(ws, Tensor)
        or ws.dtype != torch.float32
        or ws.dim() != 1
        or ws.numel() != count
        or not ws.is_contiguous()
        or ws.device != device
    ):
        got = f"{ws.dtype} {tuple(ws.shape)} on {ws.device}" if isinstance(ws, Tensor) else type(ws).__name__
        raise ValueError(f"{op}: ws must be a 1-D contiguous float32 tensor of {count} weights on {device}, got {got}")
    if any(overlaps(ws, t) for t in tensors):
        raise ValueError(f"{op}: ws shares memory with the tensors it updates; pass a separate tensor")


def switch_index_code(op: str, switch_index: int | None, count: int) -> int:
    """-1 for None, else the index after checking it is an int in [0, count)."""
    if switch_index is None:
        return -1
    if isinstance(switch_index, bool) or not isinstance(switch_index, int) or not 0 <= switch_index < count:
        raise ValueError(f"{op}: switch_index must be None or an int in [0, {count}), got {switch_index!r}")
    return switch_index


def k_passes(count: int, switch_index: int) -> list[tuple[int, int, int]]:
    """(start, stop, switch index within the pass or -1): passes of at most MAX_EMAS_PER_PASS
    EMAs, the one holding ``switch_index`` (-1: none) last, since its switch writes the param
    that the other passes read."""
    passes = []
    for start in range(0, count, MAX_EMAS_PER_PASS):
        stop = min(start + MAX_EMAS_PER_PASS, count)
        passes.append((start, stop, switch_index - start if start <= switch_index < stop else -1))
    return sorted(passes, key=lambda span: span[2] >= 0)


def flat_k_lists(
    op: str, emas: Sequence[Sequence[Tensor]], params: Sequence[Tensor], ws: Tensor, device_type: str
) -> tuple[list[list[Tensor]], list[Tensor], list[int], list[int]]:
    """Flat views of the multi-tensor K-EMA op's lists (emas[k][i]: EMA k of params[i]), checked
    as the multi-tensor update checks its pairs, and no tensor of any list sharing memory with
    another; also ``ws``. Returns (flat emas per k, flat params, ema codes, param codes)."""
    emas = [list(row) for row in emas]
    if not emas:
        raise ValueError(f"{op}: no EMA lists; pass a list of at least one")
    flat_emas, flat_params, ema_codes, param_codes = [], [], [], []
    for k, row in enumerate(emas):
        row_emas, flat_params, codes, param_codes = flat_pairs(f"{op} emas[{k}]", row, params, device_type)
        if k and codes != ema_codes:
            raise TypeError(f"{op}: emas[{k}] differs in dtype from emas[0]; the K EMAs of a tensor share one dtype")
        flat_emas.append(row_emas)
        ema_codes = codes
    check_disjoint(op, [e for row in flat_emas for e in row] + flat_params)
    if flat_params:
        check_weights(op, ws, len(emas), flat_params[0].device, [e for row in flat_emas for e in row] + flat_params)
    return flat_emas, flat_params, ema_codes, param_codes

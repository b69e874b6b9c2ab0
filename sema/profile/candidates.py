"""What a profile times: the ops of the kernel contract and the ``SwitchEMA.update()`` rows, the
bytes each moves (DESIGN.md), the (param, EMA) dtype pairs, and the calls that run them."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

import sema
from sema import ops
from sema.param_sets import Shape
from sema.profile.timing import Candidate

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}
OPS = ("update", "update_switch", "switch", "swap")
# The multi-tensor update (the FSDP2 path: one launch over a table of separate tensors) and the
# flat op whose bytes it moves; its row follows the flat one so the two can be compared.
MULTI_TENSOR_OPS = {"update_multi": "update"}
# What --ops and profile_shapes take, in the order of the rows.
PROFILE_OPS = ("update", "update_multi", "update_switch", "switch", "swap")
# The SwitchEMA rows and the op whose bytes they move.
SWITCH_EMA_OPS = {"SwitchEMA.update": "update", "SwitchEMA.update+switch": "update_switch"}
# Every row that is not an op of OPS, and the op whose bytes (and copy_ reference) it shares.
SAME_BYTES_AS = {**MULTI_TENSOR_OPS, **SWITCH_EMA_OPS}
# (param dtype, EMA dtype) pairs of the contract.
ALL_PAIRS: tuple[tuple[str, str], ...] = (
    ("fp32", "fp32"),
    ("bf16", "fp32"),
    ("fp16", "fp32"),
    ("bf16", "bf16"),
    ("fp16", "fp16"),
)
DEFAULT_PAIRS: tuple[tuple[str, str], ...] = (("fp32", "fp32"), ("bf16", "fp32"))
UPDATE_WEIGHT = 1e-3


def bytes_per_element(op: str, param_dtype: torch.dtype, ema_dtype: torch.dtype) -> int:
    """Bytes one element of ``op`` moves (DESIGN.md); ``op`` is one of :data:`OPS`, the
    multi-tensor update or a SwitchEMA row (which move the bytes of the op they stand for)."""
    op = SAME_BYTES_AS.get(op, op)
    e = torch.empty((), dtype=ema_dtype).element_size()
    p = torch.empty((), dtype=param_dtype).element_size()
    return {"update": 2 * e + p, "update_switch": 2 * e + 2 * p, "switch": e + p, "swap": 2 * e + 2 * p}[op]


def parse_pairs(text: str) -> list[tuple[str, str]]:
    """``"fp32,bf16"`` (EMA fp32), ``"bf16:bf16"`` (param:EMA) or ``"all"`` -> dtype-name pairs."""
    if text.strip() == "all":
        return list(ALL_PAIRS)
    pairs = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        param, _, ema = item.partition(":")
        pair = (param, ema or "fp32")
        if pair not in ALL_PAIRS:
            raise ValueError(
                f"dtype pair {item!r} is not one of the contract: "
                + ", ".join(f"{p}:{e}" for p, e in ALL_PAIRS)
                + " (PARAM alone means PARAM:fp32; 'all' takes every pair)"
            )
        if pair not in pairs:
            pairs.append(pair)
    if not pairs:
        raise ValueError("no dtype pair given")
    return pairs


def module_of(shapes: Sequence[Shape], dtype: torch.dtype, device: torch.device) -> nn.Module:
    """A module whose parameters have ``shapes`` (random values, ``dtype``, on ``device``)."""
    module = nn.Module()
    module.weights = nn.ParameterList(
        nn.Parameter(torch.randn(s, dtype=torch.float32, device=device).to(dtype)) for s in shapes
    )
    return module


def op_candidate(op: str, buffers: list[tuple[torch.Tensor, torch.Tensor]], backend: str) -> Candidate:
    """``op`` of :data:`OPS` on ``backend``, each call on the next of the rotating (EMA, param) buffers."""
    k = len(buffers)
    if op == "update":
        return Candidate(lambda i: ops.ema_update_(*buffers[i % k], UPDATE_WEIGHT, backend=backend))
    if op == "update_switch":
        return Candidate(lambda i: ops.ema_update_(*buffers[i % k], UPDATE_WEIGHT, switch=True, backend=backend))
    if op == "switch":
        return Candidate(lambda i: ops.switch_(*buffers[i % k], backend=backend))
    # Restored right away, so the other ops never see packed bf16 data.
    return Candidate(
        lambda i: ops.swap_(*buffers[i % k], backend=backend),
        lambda i: ops.swap_(*buffers[i % k], restore=True, backend=backend),
    )


def separate_tensors(
    shapes: Sequence[Shape], pair: tuple[torch.dtype, torch.dtype], device: torch.device
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Random (EMA, param) tensors of ``shapes``, each its own allocation, as FSDP2 shards are."""
    param_dtype, ema_dtype = pair
    emas = [torch.randn(s, device=device).to(ema_dtype) for s in shapes]
    params = [torch.randn(s, device=device).to(param_dtype) for s in shapes]
    return emas, params


def multi_tensor_candidate(tensors: list[tuple[list[torch.Tensor], list[torch.Tensor]]], backend: str) -> Candidate:
    """``sema.ops.ema_update_multi_`` over lists of separate tensors (the public op, so its
    per-call checks count, as they do for a caller), each call on the next rotation."""
    k = len(tensors)
    return Candidate(lambda i: ops.ema_update_multi_(*tensors[i % k], UPDATE_WEIGHT, backend=backend))


def switch_ema_candidate(averagers: list[sema.SwitchEMA], row_op: str) -> Candidate:
    """A :data:`SWITCH_EMA_OPS` row: ``update()`` (with ``switch=True`` for the ``+switch`` row),
    each call on the next of the rotating averagers."""
    switch = row_op.endswith("+switch")
    return Candidate(lambda i: averagers[i % len(averagers)].update(switch=switch))

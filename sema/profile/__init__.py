"""Bandwidth profile of the EMA ops (the ``sema-bench`` command).

For a built-in parameter set (shapes only, nothing downloaded) or any ``nn.Module``
(:func:`profile_module`), it times every op of the kernel contract on every available backend,
for each (param dtype, EMA dtype) pair, next to a ``copy_`` moving the same number of bytes in
the same run, plus the full ``SwitchEMA.update()`` call and its host time. GB/s use the byte
counts of DESIGN.md (E, P: bytes per EMA / param element):

    update          read ema + param, write ema           = 2E + P   per element
    update_switch   read ema + param, write ema + param   = 2E + 2P
    switch          read ema, write param                 = E + P
    swap            read and write both                   = 2E + 2P

(fp32 EMA with bf16 params: 10, 12, 6, 12 bytes.) ``% copy_`` = time of a ``copy_`` of
bytes/2 into bytes/2 (the same traffic, half read, half written) / time of the op; an op
that reads more than it writes can pass 100% where reads are cheaper than writes.

Timing: every candidate of one (set, dtype pair) is timed round-robin, so a noisy moment hits
all alike, and the median is kept (quartiles too). CUDA: a pair of events around each call;
CPU: ``time.perf_counter`` (the ops are synchronous there). Each call works on the next of
several copies of the buffers, enough that together they are twice the last-level cache, so a
call never finds its data in the cache left by the call before (``triton.testing.do_bench``
flushes the L2 for the same reason). The ``copy_`` source is written before timing: untouched
pages read as zeros from the cache and would inflate ``copy_``.

    sema-bench                                      # ResNet-50 set, fp32 and bf16 params, fp32 EMA

The package, one job per module: :mod:`~sema.profile.timing` (CPU and CUDA timing, the copy_
reference), :mod:`~sema.profile.candidates` (the ops, their bytes, the dtype pairs),
:mod:`sema.param_sets` (the parameter sets), :mod:`~sema.profile.machine` (cache, memory,
provenance), :mod:`~sema.profile.report` (table, JSON, CSV, plot) and :mod:`~sema.profile.cli`
(``sema-bench``). This module composes them into a profile.
"""

from __future__ import annotations

import gc
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

import sema
from sema import ops
from sema.param_sets import PARAM_SETS, Shape, numel
from sema.profile.candidates import (
    ALL_PAIRS,
    DEFAULT_PAIRS,
    DTYPE_NAMES,
    DTYPES,
    OPS,
    SWITCH_EMA_OPS,
    UPDATE_WEIGHT,
    bytes_per_element,
    module_of,
    op_candidate,
    parse_pairs,
    switch_ema_candidate,
)
from sema.profile.machine import (
    MAX_ROTATIONS,
    MEMORY_FRACTION,
    DoesNotFitError,
    available_memory,
    available_profile_backends,
    cache_bytes,
    device_name,
    memory_needed,
    provenance,
    rotations_for,
)
from sema.profile.report import (
    CSV_PROVENANCE,
    OP_LABELS,
    Progress,
    format_table,
    pyplot,
    write_csv,
    write_json,
    write_plot,
)
from sema.profile.timing import DEFAULT_REPEATS, Candidate, Timing, copy_candidates, host_seconds, measure

__all__ = [
    "ALL_PAIRS",
    "CSV_PROVENANCE",
    "DEFAULT_PAIRS",
    "DEFAULT_REPEATS",
    "DTYPES",
    "DTYPE_NAMES",
    "MAX_ROTATIONS",
    "MEMORY_FRACTION",
    "OPS",
    "OP_LABELS",
    "SWITCH_EMA_OPS",
    "UPDATE_WEIGHT",
    "Candidate",
    "DoesNotFitError",
    "Progress",
    "Timing",
    "available_memory",
    "available_profile_backends",
    "bytes_per_element",
    "cache_bytes",
    "device_name",
    "format_table",
    "host_seconds",
    "main",
    "measure",
    "memory_needed",
    "module_of",
    "parse_pairs",
    "profile",
    "profile_module",
    "profile_sets",
    "profile_shapes",
    "provenance",
    "pyplot",
    "rotations_for",
    "write_csv",
    "write_json",
    "write_plot",
]


def profile_shapes(
    shapes: Sequence[Shape],
    name: str = "module",
    pairs: Iterable[tuple[str, str]] = DEFAULT_PAIRS,
    device: str | torch.device | None = None,
    backends: Sequence[str] | None = None,
    op_names: Sequence[str] = OPS,
    repeats: int | None = None,
    warmup: int = 2,
    switch_ema: bool = True,
    progress: bool | Progress = False,
) -> dict[str, Any]:
    """Profile the ops on flat buffers as big as ``shapes`` (and ``SwitchEMA.update()`` on a
    module of those shapes). Returns ``{"provenance", "param_sets", "skipped", "settings", "rows"}``.

    Raises :class:`DoesNotFitError` before allocating anything when a pair needs more memory
    than ``device`` has available.
    """
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    shapes = [tuple(s) for s in shapes]
    pairs = list(pairs)
    n = numel(shapes)
    if n == 0:
        raise ValueError(f"{name}: the parameter shapes hold no elements; there is nothing to profile")
    names = available_profile_backends(dev)
    if backends is not None:
        missing = [b for b in backends if b not in names]
        if missing:
            reasons = sema.available_backends(dev)
            why = "; ".join(f"{b}: {reasons[b][1] if b in reasons else 'unknown backend'}" for b in missing)
            raise ValueError(f"backend(s) {missing} cannot run on {dev.type} here ({why}); available: {names}")
        names = list(backends)
    bad_ops = [op for op in op_names if op not in OPS]
    if bad_ops:
        raise ValueError(f"unknown op(s) {bad_ops}; choose from {list(OPS)}")
    repeats = repeats or DEFAULT_REPEATS.get(dev.type, 15)
    plans = []
    for pair in pairs:
        set_bytes = n * (DTYPES[pair[0]].itemsize + DTYPES[pair[1]].itemsize)
        k = rotations_for(set_bytes, dev)
        need = memory_needed(n, pair, k, len(names), switch_ema)
        have = available_memory(dev)
        if need > MEMORY_FRACTION * have:
            raise DoesNotFitError(
                f"{name} ({len(shapes)} tensors, {n / 1e6:.1f}M elements) with {pair[0]} params and a {pair[1]} "
                f"EMA needs about {need / 1e9:.1f} GB on {dev} ({k} buffer cop{'y' if k == 1 else 'ies'}, "
                f"{len(names)} backends), but only {have / 1e9:.1f} GB is available "
                f"(the profiler uses at most {MEMORY_FRACTION:.0%}); pick a smaller set, fewer dtype pairs or "
                "--backends, or run it on a device with more memory"
            )
        plans.append((pair, k))

    own_progress = isinstance(progress, bool)
    bar = Progress(len(plans) * (warmup + repeats), enabled=progress) if own_progress else progress
    rows: list[dict[str, Any]] = []
    try:
        for pair, k in plans:
            bar.describe(f"{name} {pair[0]}:{pair[1]}")
            rows += _profile_pair(shapes, name, pair, dev, names, op_names, repeats, warmup, k, switch_ema, bar)
            gc.collect()
            if dev.type == "cuda":
                torch.cuda.empty_cache()
    finally:
        if own_progress:
            bar.close()
    return {
        "provenance": provenance(dev),
        "param_sets": {name: {"tensors": len(shapes), "elements": n}},
        "skipped": {},
        "settings": {
            "repeats": repeats,
            "warmup_rounds": warmup,
            "update_weight": UPDATE_WEIGHT,
            "backends": names,
            "auto_backend": ops.resolve_backend("auto", dev),
            "cache_bytes": cache_bytes(dev),
            "timing": ("CUDA events around each call" if dev.type == "cuda" else "time.perf_counter around each call")
            + "; candidates timed round-robin; buffers rotated so their copies span twice the last-level cache",
            "host_ms": (
                "wall time of SwitchEMA.update() without waiting for the GPU (the launches)"
                if dev.type == "cuda"
                else "wall time of SwitchEMA.update() on a model with the same tensors of one element each "
                "(the CPU runs the ops synchronously, so this leaves the host work)"
            ),
            "swap": "swap_(restore=False) timed; the restore (same bytes) runs untimed after each call; "
            "not defined for fp16 params with an fp32 EMA",
        },
        "rows": rows,
    }


def _profile_pair(
    shapes: list[Shape],
    name: str,
    pair: tuple[str, str],
    dev: torch.device,
    backends: list[str],
    op_names: Sequence[str],
    repeats: int,
    warmup: int,
    k: int,
    switch_ema: bool,
    bar: Progress,
) -> list[dict[str, Any]]:
    param_dtype, ema_dtype = DTYPES[pair[0]], DTYPES[pair[1]]
    n = numel(shapes)
    buffers = [(torch.randn(n, device=dev).to(ema_dtype), torch.randn(n, device=dev).to(param_dtype)) for _ in range(k)]
    row_ops = [*op_names, *(SWITCH_EMA_OPS if switch_ema else ())]
    copy_ops = sorted({SWITCH_EMA_OPS.get(op, op) for op in row_ops}, key=OPS.index)
    byte_counts = {op: bytes_per_element(op, param_dtype, ema_dtype) * n for op in {*row_ops, *copy_ops}}
    half = n * (param_dtype.itemsize + ema_dtype.itemsize)  # the largest op moves 2E + 2P: copy half of it
    copies = copy_candidates({op: byte_counts[op] for op in copy_ops}, half, dev, k)
    candidates: dict[tuple[str, str], Candidate] = {("copy_", op): c for op, c in copies.items()}
    for op in op_names:
        if op == "swap" and param_dtype != ema_dtype and param_dtype == torch.float16:
            continue  # no in-place swap of fp16 params with an fp32 EMA (SwitchEMA uses a scratch copy)
        for backend in backends:
            candidates[(backend, op)] = op_candidate(op, buffers, backend)

    averagers: dict[str, list[sema.SwitchEMA]] = {}
    if switch_ema:
        ema_arg = torch.float32 if ema_dtype == torch.float32 else None
        for backend in backends:
            averagers[backend] = [
                sema.SwitchEMA(
                    module_of(shapes, param_dtype, dev), switch_every=None, ema_dtype=ema_arg, backend=backend
                )
                for _ in range(k)
            ]
            for row_op in SWITCH_EMA_OPS:
                candidates[(backend, row_op)] = switch_ema_candidate(averagers[backend], row_op)

    timings = measure({f"{b}|{o}": c for (b, o), c in candidates.items()}, dev, repeats, warmup, bar)

    host: dict[tuple[str, str], float] = {}
    if switch_ema:
        host_repeats = max(repeats, 20)
        for backend in backends:
            for row_op in SWITCH_EMA_OPS:
                switch = row_op.endswith("+switch")
                if dev.type == "cuda":
                    target = averagers[backend][0]
                else:
                    proxy = module_of([(1,)] * len(shapes), param_dtype, dev)
                    target = sema.SwitchEMA(proxy, switch_every=None, ema_dtype=ema_arg, backend=backend)
                host[(backend, row_op)] = host_seconds(lambda t=target, s=switch: t.update(switch=s), dev, host_repeats)

    rows = []
    for backend, op in candidates:
        if backend == "copy_":
            continue
        copy_op = SWITCH_EMA_OPS.get(op, op)
        t, copy_t = timings[f"{backend}|{op}"], timings[f"copy_|{copy_op}"]
        nbytes = byte_counts[op]
        rows.append(
            {
                "param_set": name,
                "tensors": len(shapes),
                "elements": n,
                "param_dtype": pair[0],
                "ema_dtype": pair[1],
                "backend": backend,
                "op": op,
                "bytes_per_element": nbytes // n,
                "bytes": nbytes,
                **t.row_fields(nbytes),
                "copy_ms": copy_t.median_s * 1e3,
                "copy_GB/s": nbytes / copy_t.median_s / 1e9,
                "pct_of_copy": 100.0 * copy_t.median_s / t.median_s,
                "host_ms": host[(backend, op)] * 1e3 if (backend, op) in host else None,
                "rotations": k,
            }
        )
    return rows


def profile_module(
    model: nn.Module,
    pairs: Iterable[tuple[str, str]] | None = None,
    device: str | torch.device | None = None,
    **options: Any,
) -> dict[str, Any]:
    """Profile the ops for ``model``'s trainable parameter shapes. The model itself is not
    touched: the ops run on fresh buffers (and fresh modules) of the same shapes.

    ``pairs`` defaults to each param dtype of the model with an fp32 EMA; ``device`` to the
    model's. Other options as in :func:`profile_shapes` (``backends``, ``op_names``,
    ``repeats``, ``warmup``, ``switch_ema``, ``progress``).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("profile_module: the model has no trainable parameters (requires_grad=True)")
    bad = sorted({str(p.dtype) for p in params if p.dtype not in DTYPE_NAMES})
    if bad and pairs is None:
        raise TypeError(f"profile_module: params of dtype {', '.join(bad)} are not supported; pass pairs=")
    if pairs is None:
        pairs = list(dict.fromkeys((DTYPE_NAMES[p.dtype], "fp32") for p in params))
    return profile_shapes(
        [tuple(p.shape) for p in params],
        name=type(model).__name__,
        pairs=pairs,
        device=device or params[0].device,
        **options,
    )


def profile_sets(
    set_names: Sequence[str],
    pairs: Iterable[tuple[str, str]] = DEFAULT_PAIRS,
    device: str | torch.device | None = None,
    **options: Any,
) -> dict[str, Any]:
    """Profile several built-in parameter sets; a set that does not fit in memory is skipped and
    listed under ``"skipped"`` with the reason (nothing is allocated for it)."""
    unknown = [s for s in set_names if s not in PARAM_SETS]
    if unknown:
        raise ValueError(f"unknown parameter set(s) {unknown}; choose from {sorted(PARAM_SETS)}")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    pairs = list(pairs)
    result: dict[str, Any] = {"provenance": provenance(dev), "param_sets": {}, "skipped": {}, "rows": []}
    progress = options.pop("progress", False)
    if isinstance(progress, bool):
        rounds = options.get("warmup", 2) + (options.get("repeats") or DEFAULT_REPEATS.get(dev.type, 15))
        bar = Progress(len(set_names) * len(pairs) * rounds, enabled=progress)
    else:
        bar = progress
    try:
        for set_name in set_names:
            try:
                part = profile_shapes(PARAM_SETS[set_name](), set_name, pairs, dev, progress=bar, **options)
            except DoesNotFitError as exc:
                result["skipped"][set_name] = str(exc)
                bar.update(len(pairs) * rounds if isinstance(progress, bool) else 0)
                continue
            result["param_sets"].update(part["param_sets"])
            result["settings"] = part["settings"]
            result["rows"] += part["rows"]
    finally:
        if bar is not progress:
            bar.close()
    return result


def profile(
    param_set: str = "resnet50",
    dtypes: Sequence[str] = ("fp32", "bf16"),
    device: str | None = None,
    repeats: int | None = None,
) -> dict[str, Any]:
    """One built-in set, param dtypes with an fp32 EMA (entries may also be ``"param:ema"``)."""
    result = profile_sets([param_set], parse_pairs(",".join(dtypes)), device, repeats=repeats)
    if result["skipped"]:
        raise DoesNotFitError(result["skipped"][param_set])
    return result


# The CLI drives the functions above, so it is imported after them.
from sema.profile.cli import _parser, main  # noqa: E402, F401

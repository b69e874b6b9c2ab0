"""Bandwidth profile of the EMA ops (the ``sema-bench`` command).

For a built-in parameter set (shapes only, nothing downloaded) or any ``nn.Module``
(:func:`profile_module`), it times every op of the kernel contract on every available backend,
for each (param dtype, EMA dtype) pair, next to a ``copy_`` moving the same number of bytes in
the same run, plus the multi-tensor update, the full ``SwitchEMA.update()`` call and its host
time. GB/s use the byte counts of DESIGN.md (E, P: bytes per EMA / param element):

    update          read ema + param, write ema           = 2E + P   per element
    update_multi    the same, over the tensors as separate allocations (the FSDP2 path)
    update_switch   read ema + param, write ema + param   = 2E + 2P
    switch          read ema, write param                 = E + P
    swap            read and write both                   = 2E + 2P

(fp32 EMA with bf16 params: 10, 12, 6, 12 bytes.) ``% copy_`` = time of a ``copy_`` of
bytes/2 into bytes/2 (the same traffic, half read, half written) / time of the op; an op
that reads more than it writes can pass 100% where reads are cheaper than writes.

Timing: every candidate of one (set, dtype pair) is timed round-robin, so a noisy moment hits
all alike, and the median is kept (quartiles too). CUDA: a pair of events around each call,
with a spin kernel queued ahead of each round for longer than the host takes to issue it, so
no call's events wait for the host; CPU: ``time.perf_counter`` (the ops are synchronous there).
Each call works on the next of several copies of the buffers, enough that together they are
twice the last-level cache, so a call never finds its data in the cache left by the call before
(``triton.testing.do_bench`` flushes the L2 for the same reason). The ``copy_`` source is written
before timing: untouched pages read as zeros from the cache and would inflate ``copy_``.

A candidate that raises becomes a row with its exception under ``"error"`` and no timings; the
other rows are measured, saved as each dtype pair finishes, and ``sema-bench`` exits with 1.

Host time of ``SwitchEMA.update()`` (median of single calls, the device idle before each):

- ``host_ms`` on CUDA: the full-size model, not waiting for the GPU: Python, checks and issuing
  every launch, i.e. what the training loop's thread pays per call.
- ``host_ms`` on the CPU: the kernels run inside the call, so it is timed on a model with the
  same number of tensors of one element each: Python, checks and each kernel's fixed cost
  (dispatch, an OpenMP region), an upper bound on the host work.
- ``host_python_ms`` (``--host-python``): the full-size model with the backend's kernel entry
  points replaced by no-ops (:func:`~sema.profile.timing.without_kernels`): the work above the
  backend alone (Python, checks, the small torch ops of the step counter and the decay), the
  same quantity on either device; the backend's own Python (argument packing, chunk loops) is
  below the entry points and not in it.

    sema-bench                                      # ResNet-50 set, fp32 and bf16 params, fp32 EMA
    sema-bench --set all --dtypes all --json p.json --csv p.csv --plot p.png

The package, one job per module: :mod:`~sema.profile.timing` (CPU and CUDA timing, the copy_
reference, host time), :mod:`~sema.profile.candidates` (the ops, their bytes, the dtype pairs),
:mod:`sema.param_sets` (the parameter sets), :mod:`~sema.profile.machine` (cache, memory,
provenance), :mod:`~sema.profile.report` (table, JSON, CSV, plot) and :mod:`~sema.profile.cli`
(``sema-bench``). This module composes them into a profile.
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
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
    MULTI_TENSOR_OPS,
    OPS,
    PROFILE_OPS,
    SAME_BYTES_AS,
    SWITCH_EMA_OPS,
    UPDATE_WEIGHT,
    bytes_per_element,
    module_of,
    multi_tensor_candidate,
    op_candidate,
    parse_pairs,
    separate_tensors,
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
from sema.profile.timing import (
    DEFAULT_REPEATS,
    Candidate,
    EventClock,
    Timing,
    WallClock,
    copy_candidates,
    host_seconds,
    measure,
    without_kernels,
)

__all__ = [
    "ALL_PAIRS",
    "CSV_PROVENANCE",
    "DEFAULT_PAIRS",
    "DEFAULT_REPEATS",
    "DTYPES",
    "DTYPE_NAMES",
    "MAX_ROTATIONS",
    "MEMORY_FRACTION",
    "MULTI_TENSOR_OPS",
    "OPS",
    "OP_LABELS",
    "PROFILE_OPS",
    "SAME_BYTES_AS",
    "SWITCH_EMA_OPS",
    "UPDATE_WEIGHT",
    "Candidate",
    "DoesNotFitError",
    "EventClock",
    "Progress",
    "Timing",
    "WallClock",
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
    "without_kernels",
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
    op_names: Sequence[str] = PROFILE_OPS,
    repeats: int | None = None,
    warmup: int = 2,
    switch_ema: bool = True,
    progress: bool | Progress = False,
    host_python: bool = False,
    on_rows: Callable[[dict[str, Any]], object] | None = None,
) -> dict[str, Any]:
    """Profile the ops on flat buffers as big as ``shapes`` (and ``SwitchEMA.update()`` on a
    module of those shapes). Returns ``{"provenance", "param_sets", "skipped", "settings", "rows"}``.

    ``op_names`` are from :data:`PROFILE_OPS`: the ops of the contract and ``update_multi``,
    ``sema.ops.ema_update_multi_`` over the shapes as separate tensors. ``host_python`` adds
    the column ``host_python_ms`` to the SwitchEMA rows: ``update()`` with the backend's kernels
    replaced by no-ops (see :func:`~sema.profile.timing.without_kernels`).

    A candidate that raises becomes a row with an ``"error"`` entry (the exception) and no
    timings, and the others carry on. ``on_rows(result)``, when given, is called with the result
    so far each time a dtype pair's rows are done, so that a caller can save them as they come.

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
        names = list(dict.fromkeys(backends))
    bad_ops = [op for op in op_names if op not in PROFILE_OPS]
    if bad_ops:
        raise ValueError(f"unknown op(s) {bad_ops}; choose from {list(PROFILE_OPS)}")
    op_names = sorted(set(op_names), key=PROFILE_OPS.index)
    repeats = repeats or DEFAULT_REPEATS.get(dev.type, 15)
    plans = []
    for pair in pairs:
        set_bytes = n * (DTYPES[pair[0]].itemsize + DTYPES[pair[1]].itemsize)
        k = rotations_for(set_bytes, dev)
        need = memory_needed(n, pair, k, len(names), switch_ema, multi_tensor="update_multi" in op_names)
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

    result = {
        "provenance": provenance(dev),
        "param_sets": {name: {"tensors": len(shapes), "elements": n}},
        "skipped": {},
        "settings": _settings(dev, repeats, warmup, names, host_python),
        "rows": [],
    }
    own_progress = isinstance(progress, bool)
    bar = Progress(len(plans) * (warmup + repeats), enabled=progress) if own_progress else progress
    try:
        for pair, k in plans:
            bar.describe(f"{name} {pair[0]}:{pair[1]}")
            plan = _PairPlan(shapes, name, pair, dev, names, op_names, k, switch_ema)
            try:
                rows = _profile_pair(plan, repeats, warmup, bar, host_python)
            except Exception as exc:  # e.g. out of memory: the pair's rows say so, the next pair runs
                rows = [plan.row(backend, op, error=_error_text(exc)) for backend, op in plan.row_keys()]
                bar.update(warmup + repeats)
            result["rows"] += rows
            gc.collect()
            if dev.type == "cuda":
                torch.cuda.empty_cache()
            if on_rows is not None:
                on_rows(result)
    finally:
        if own_progress:
            bar.close()
    return result


def _settings(dev: torch.device, repeats: int, warmup: int, names: list[str], host_python: bool) -> dict[str, Any]:
    settings = {
        "repeats": repeats,
        "warmup_rounds": warmup,
        "update_weight": UPDATE_WEIGHT,
        "backends": names,
        "auto_backend": ops.resolve_backend("auto", dev),
        "cache_bytes": cache_bytes(dev),
        "timing": (
            "CUDA events around each call, a spin kernel queued ahead of each round so that no call waits for the host"
            if dev.type == "cuda"
            else "time.perf_counter around each call"
        )
        + "; candidates timed round-robin; buffers rotated so their copies span twice the last-level cache",
        "host_ms": (
            "wall time of SwitchEMA.update() without waiting for the GPU (the launches)"
            if dev.type == "cuda"
            else "wall time of SwitchEMA.update() on a model with the same tensors of one element each "
            "(the CPU runs the ops synchronously, so this leaves the host work)"
        ),
        "swap": "swap_(restore=False) timed; the restore (same bytes) runs untimed after each call; "
        "not defined for fp16 params with an fp32 EMA",
        "update_multi": "sema.ops.ema_update_multi_ over the set's shapes as separate tensors (the FSDP2 path), "
        "with the bytes of update",
    }
    if host_python:
        settings["host_python_ms"] = (
            "wall time of SwitchEMA.update() on the full-size model with the backend's kernel entry points "
            "(ema_update_, ema_update_multi_, switch_, swap_) replaced by no-ops: the Python and the small torch "
            "ops above the backend"
        )
    return settings


def _error_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


@dataclass
class _PairPlan:
    """What one (set, dtype pair) profile times, and how its rows look."""

    shapes: list[Shape]
    name: str
    pair: tuple[str, str]
    dev: torch.device
    backends: list[str]
    op_names: Sequence[str]
    rotations: int
    switch_ema: bool

    @property
    def dtypes(self) -> tuple[torch.dtype, torch.dtype]:
        return DTYPES[self.pair[0]], DTYPES[self.pair[1]]

    def row_keys(self) -> list[tuple[str, str]]:
        """(backend, op) of every row, in the order of the table."""
        param_dtype, ema_dtype = self.dtypes
        keys = []
        for op in self.op_names:
            if op == "swap" and param_dtype != ema_dtype and param_dtype == torch.float16:
                continue  # no in-place swap of fp16 params with an fp32 EMA (SwitchEMA uses a scratch copy)
            keys += [(backend, op) for backend in self.backends]
        if self.switch_ema:
            keys += [(backend, row_op) for backend in self.backends for row_op in SWITCH_EMA_OPS]
        return keys

    def nbytes(self, op: str) -> int:
        return bytes_per_element(op, *self.dtypes) * numel(self.shapes)

    def row(
        self,
        backend: str,
        op: str,
        timing: Timing | None = None,
        copy_timing: Timing | None = None,
        host_s: float | None = None,
        error: str | None = None,
    ) -> dict[str, Any]:
        n, nbytes = numel(self.shapes), self.nbytes(op)
        row: dict[str, Any] = {
            "param_set": self.name,
            "tensors": len(self.shapes),
            "elements": n,
            "param_dtype": self.pair[0],
            "ema_dtype": self.pair[1],
            "backend": backend,
            "op": op,
            "bytes_per_element": nbytes // n,
            "bytes": nbytes,
        }
        if timing is None or copy_timing is None:
            row.update(dict.fromkeys(("median_ms", "q1_ms", "q3_ms", "min_ms", "repeats", "GB/s"), None))
            row.update({"copy_ms": None, "copy_GB/s": None, "pct_of_copy": None})
        else:
            row.update(timing.row_fields(nbytes))
            row["copy_ms"] = copy_timing.median_s * 1e3
            row["copy_GB/s"] = nbytes / copy_timing.median_s / 1e9
            row["pct_of_copy"] = 100.0 * copy_timing.median_s / timing.median_s
        row["host_ms"] = None if host_s is None else host_s * 1e3
        row["rotations"] = self.rotations
        if error is not None:
            row["error"] = error
        return row


def _profile_pair(plan: _PairPlan, repeats: int, warmup: int, bar: Progress, host_python: bool) -> list[dict[str, Any]]:
    shapes, dev, k = plan.shapes, plan.dev, plan.rotations
    param_dtype, ema_dtype = plan.dtypes
    n = numel(shapes)
    keys = plan.row_keys()
    errors: dict[str, str] = {}
    buffers = [(torch.randn(n, device=dev).to(ema_dtype), torch.randn(n, device=dev).to(param_dtype)) for _ in range(k)]
    copy_ops = sorted({SAME_BYTES_AS.get(op, op) for _, op in keys}, key=OPS.index)
    half = n * (param_dtype.itemsize + ema_dtype.itemsize)  # the largest op moves 2E + 2P: copy half of it
    copies = copy_candidates({op: plan.nbytes(op) for op in copy_ops}, half, dev, k)
    candidates: dict[str, Candidate] = {f"copy_|{op}": c for op, c in copies.items()}

    separate = []
    if "update_multi" in plan.op_names:
        separate = [separate_tensors(shapes, plan.dtypes, dev) for _ in range(k)]
    averagers: dict[str, list[sema.SwitchEMA]] = {}
    ema_arg = torch.float32 if ema_dtype == torch.float32 else None
    for backend, op in keys:
        try:
            if op == "update_multi":
                candidates[f"{backend}|{op}"] = multi_tensor_candidate(separate, backend)
            elif op in SWITCH_EMA_OPS:
                if backend not in averagers:
                    averagers[backend] = [
                        sema.SwitchEMA(
                            module_of(shapes, param_dtype, dev), switch_every=None, ema_dtype=ema_arg, backend=backend
                        )
                        for _ in range(k)
                    ]
                candidates[f"{backend}|{op}"] = switch_ema_candidate(averagers[backend], op)
            else:
                candidates[f"{backend}|{op}"] = op_candidate(op, buffers, backend)
        except Exception as exc:
            errors[f"{backend}|{op}"] = _error_text(exc)

    timings = measure(candidates, dev, repeats, warmup, bar, errors=errors)

    host: dict[str, float] = {}
    host_python_s: dict[str, float] = {}
    host_repeats = max(repeats, 20)
    for backend, op in keys:
        key = f"{backend}|{op}"
        if op not in SWITCH_EMA_OPS or key in errors:
            continue
        switch = op.endswith("+switch")
        try:
            if dev.type == "cuda":
                target = averagers[backend][0]
            else:
                proxy = module_of([(1,)] * len(shapes), param_dtype, dev)
                target = sema.SwitchEMA(proxy, switch_every=None, ema_dtype=ema_arg, backend=backend)
            host[key] = host_seconds(lambda t=target, s=switch: t.update(switch=s), dev, host_repeats)
            if host_python:
                full = averagers[backend][0]
                with without_kernels(backend):
                    host_python_s[key] = host_seconds(lambda t=full, s=switch: t.update(switch=s), dev, host_repeats)
        except Exception as exc:
            errors[key] = f"host time: {_error_text(exc)}"

    rows = []
    for backend, op in keys:
        key, copy_key = f"{backend}|{op}", f"copy_|{SAME_BYTES_AS.get(op, op)}"
        if key in errors:
            rows.append(plan.row(backend, op, error=errors[key]))
        elif copy_key in errors:
            rows.append(plan.row(backend, op, error=f"the copy_ reference failed: {errors[copy_key]}"))
        else:
            row = plan.row(backend, op, timings[key], timings[copy_key], host.get(key))
            if host_python and op in SWITCH_EMA_OPS:
                row["host_python_ms"] = host_python_s[key] * 1e3
            rows.append(row)
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
    on_rows: Callable[[dict[str, Any]], object] | None = None,
    **options: Any,
) -> dict[str, Any]:
    """Profile several built-in parameter sets; a set that does not fit in memory is skipped and
    listed under ``"skipped"`` with the reason (nothing is allocated for it). ``on_rows(result)``
    is called with the result so far whenever a dtype pair's rows are done; other options as in
    :func:`profile_shapes`."""
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

    def merge(part: dict[str, Any], done: list[dict[str, Any]]) -> None:
        result["param_sets"].update(part["param_sets"])
        result["settings"] = part["settings"]
        result["rows"] = done + part["rows"]

    try:
        for set_name in set_names:
            done = result["rows"]

            def report(part: dict[str, Any], done: list[dict[str, Any]] = done) -> None:
                merge(part, done)
                if on_rows is not None:
                    on_rows(result)

            try:
                part = profile_shapes(
                    PARAM_SETS[set_name](), set_name, pairs, dev, progress=bar, on_rows=report, **options
                )
            except DoesNotFitError as exc:
                result["skipped"][set_name] = str(exc)
                bar.update(len(pairs) * rounds if isinstance(progress, bool) else 0)
                continue
            merge(part, done)
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

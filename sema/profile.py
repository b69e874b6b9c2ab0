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
    sema-bench --set all --dtypes all --json p.json --csv p.csv --plot p.png
"""

from __future__ import annotations

import argparse
import csv
import datetime
import gc
import importlib.metadata
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

import sema
from sema import _extension, ops
from sema.param_sets import MODEL_SETS, PARAM_SETS, Shape, describe, numel

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}
OPS = ("update", "update_switch", "switch", "swap")
# The SwitchEMA rows and the op whose bytes they move.
SWITCH_EMA_OPS = {"SwitchEMA.update": "update", "SwitchEMA.update+switch": "update_switch"}
# (param dtype, EMA dtype) pairs of the contract.
ALL_PAIRS: tuple[tuple[str, str], ...] = (
    ("fp32", "fp32"),
    ("bf16", "fp32"),
    ("fp16", "fp32"),
    ("bf16", "bf16"),
    ("fp16", "fp16"),
)
DEFAULT_PAIRS: tuple[tuple[str, str], ...] = (("fp32", "fp32"), ("bf16", "fp32"))
DEFAULT_REPEATS = {"cpu": 15, "cuda": 100}
UPDATE_WEIGHT = 1e-3
MEMORY_FRACTION = 0.85  # of the memory available now; the rest is left to everything else
MAX_ROTATIONS = 64


class DoesNotFitError(RuntimeError):
    """A parameter set needs more memory than the device has available; the message says how much."""


def bytes_per_element(op: str, param_dtype: torch.dtype, ema_dtype: torch.dtype) -> int:
    """Bytes one element of ``op`` moves (DESIGN.md); ``op`` is one of :data:`OPS` or a SwitchEMA row."""
    op = SWITCH_EMA_OPS.get(op, op)
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


# --- timing ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Timing:
    """Seconds per call over ``n`` timed calls: median and quartiles, and the minimum (on a
    shared machine the calls that another process interrupted make the upper tail)."""

    median_s: float
    q1_s: float
    q3_s: float
    min_s: float
    n: int

    @classmethod
    def of(cls, samples: Sequence[float]) -> Timing:
        if len(samples) < 2:
            return cls(samples[0], samples[0], samples[0], samples[0], len(samples))
        q1, q2, q3 = statistics.quantiles(samples, n=4, method="inclusive")
        return cls(q2, q1, q3, min(samples), len(samples))

    def row_fields(self, nbytes: int) -> dict[str, float | int]:
        """The timing columns of a result row, with GB/s for ``nbytes`` moved per call."""
        return {
            "median_ms": self.median_s * 1e3,
            "q1_ms": self.q1_s * 1e3,
            "q3_ms": self.q3_s * 1e3,
            "min_ms": self.min_s * 1e3,
            "repeats": self.n,
            "GB/s": nbytes / self.median_s / 1e9,
        }


@dataclass
class Candidate:
    """One thing to time. ``call(i)`` gets a running call count (to pick a rotating buffer);
    ``after(i)``, when given, runs untimed right after each timed call (e.g. to undo a swap)."""

    call: Callable[[int], object]
    after: Callable[[int], object] | None = None


class Progress:
    """A progress bar on stderr: tqdm when installed, else a plain counter."""

    def __init__(self, total: int, enabled: bool = True) -> None:
        self.total, self.done, self.enabled = total, 0, enabled
        self._bar, self._last, self._text = None, 0.0, ""
        if enabled:
            try:
                from tqdm.auto import tqdm
            except ImportError:
                return
            self._bar = tqdm(total=total, desc="sema-bench", unit="round", leave=False, file=sys.stderr)

    def describe(self, text: str) -> None:
        if self._bar is not None:
            self._bar.set_description(text)
        self._text = text

    def update(self, n: int = 1) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
        elif self.enabled and (time.monotonic() - self._last > 1.0 or self.done >= self.total):
            self._last = time.monotonic()
            end = "\n" if self.done >= self.total or not sys.stderr.isatty() else ""
            print(f"\rsema-bench: {self.done}/{self.total} rounds {self._text}", end=end, file=sys.stderr)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(
    candidates: dict[str, Candidate],
    device: torch.device,
    repeats: int,
    warmup: int = 2,
    progress: Progress | None = None,
) -> dict[str, Timing]:
    """Time every candidate ``repeats`` times, round-robin (one call of each per round), after
    ``warmup`` untimed rounds. CUDA: events around each call; CPU: ``perf_counter``."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    if device.type == "cuda":
        with torch.cuda.device(device):  # the events belong to the tensors' device
            return _measure(candidates, device, repeats, warmup, progress)
    return _measure(candidates, device, repeats, warmup, progress)


def _measure(
    candidates: dict[str, Candidate], device: torch.device, repeats: int, warmup: int, progress: Progress | None
) -> dict[str, Timing]:
    items = list(candidates.items())
    samples: dict[str, list[float]] = {name: [] for name in candidates}
    calls = 0
    for timed_round in [False] * warmup + [True] * repeats:
        events = []
        for name, candidate in items:
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                candidate.call(calls)
                end.record()
                events.append((name, start, end))
            else:
                t0 = time.perf_counter()
                candidate.call(calls)
                seconds = time.perf_counter() - t0
                if timed_round:
                    samples[name].append(seconds)
            if candidate.after is not None:
                candidate.after(calls)
            calls += 1
        _synchronize(device)
        if timed_round:
            for name, start, end in events:
                samples[name].append(start.elapsed_time(end) / 1e3)
        if progress is not None:
            progress.update()
    return {name: Timing.of(times) for name, times in samples.items()}


def host_seconds(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int = 3) -> float:
    """Median wall time of ``fn()`` alone, the device idle before each call. On CUDA that is the
    time to issue the launches (nothing waits for the GPU)."""
    for _ in range(warmup):
        fn()
    _synchronize(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        _synchronize(device)
    return statistics.median(times)


# --- the machine -------------------------------------------------------------------------------


def cache_bytes(device: torch.device) -> int:
    """Size of the last-level cache the rotating buffers must defeat: the GPU's L2, or the
    CPU's largest cache (sysfs; 32 MiB when it cannot be read)."""
    if device.type == "cuda":
        return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 << 20))
    largest = 0
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            text = (index / "size").read_text().strip().upper()
        except OSError:
            continue
        scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        digits = text.rstrip("KMG")
        if digits.isdigit():
            largest = max(largest, int(digits) * scale)
    return largest or 32 << 20


def available_memory(device: torch.device) -> int:
    """Bytes that can be allocated on ``device`` now (CUDA: free memory; CPU: MemAvailable)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def rotations_for(set_bytes: int, device: torch.device) -> int:
    """How many copies of the buffers to rotate through: together at least twice the cache."""
    return max(1, min(MAX_ROTATIONS, math.ceil(2 * cache_bytes(device) / max(set_bytes, 1))))


def memory_needed(n_elements: int, pair: tuple[str, str], rotations: int, n_backends: int, switch_ema: bool) -> int:
    """Peak bytes of one (set, pair) profile: per rotation the op buffers (E + P per element),
    the copy_ source and destination (E + P each) and one SwitchEMA model + EMA per backend;
    plus the fp32 temporary that random initialisation makes and some slack."""
    e = DTYPES[pair[1]].itemsize
    p = DTYPES[pair[0]].itemsize
    per_rotation = (e + p) * (3 + (n_backends if switch_ema else 0))
    return n_elements * (per_rotation * rotations + 4) + (64 << 20)


def module_of(shapes: Sequence[Shape], dtype: torch.dtype, device: torch.device) -> nn.Module:
    """A module whose parameters have ``shapes`` (random values, ``dtype``, on ``device``)."""
    module = nn.Module()
    module.weights = nn.ParameterList(
        nn.Parameter(torch.randn(s, dtype=torch.float32, device=device).to(dtype)) for s in shapes
    )
    return module


def available_profile_backends(device: torch.device) -> list[str]:
    """Backends that run on ``device``; the Triton interpreter on the CPU is a test tool, not a backend."""
    names = [name for name, (ok, _) in sema.available_backends(device).items() if ok]
    if device.type == "cpu" and "triton" in names:
        names.remove("triton")
    return names


# --- the profile -------------------------------------------------------------------------------


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
    half = n * (param_dtype.itemsize + ema_dtype.itemsize)  # the largest op moves 2E + 2P: copy half of it
    copies = [
        (torch.ones(half, dtype=torch.uint8, device=dev), torch.empty(half, dtype=torch.uint8, device=dev))
        for _ in range(k)
    ]

    candidates: dict[tuple[str, str], Candidate] = {}
    row_ops = [*op_names, *(SWITCH_EMA_OPS if switch_ema else ())]
    copy_ops = sorted({SWITCH_EMA_OPS.get(op, op) for op in row_ops}, key=OPS.index)
    byte_counts = {op: bytes_per_element(op, param_dtype, ema_dtype) * n for op in {*row_ops, *copy_ops}}
    for op in copy_ops:
        m = byte_counts[op] // 2
        candidates[("copy_", op)] = Candidate(lambda i, m=m: copies[i % k][1][:m].copy_(copies[i % k][0][:m]))
    for op in op_names:
        if op == "swap" and param_dtype != ema_dtype and param_dtype == torch.float16:
            continue  # no in-place swap of fp16 params with an fp32 EMA (SwitchEMA uses a scratch copy)
        for backend in backends:
            candidates[(backend, op)] = _op_candidate(op, buffers, backend)

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
                switch = row_op.endswith("+switch")
                candidates[(backend, row_op)] = Candidate(
                    lambda i, a=averagers[backend], s=switch: a[i % len(a)].update(switch=s)
                )

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


def _op_candidate(op: str, buffers: list[tuple[torch.Tensor, torch.Tensor]], backend: str) -> Candidate:
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


# --- provenance and output ---------------------------------------------------------------------


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(
            ["git", *args], capture_output=True, text=True, cwd=Path(__file__).resolve().parent, check=False, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU model from /proc/cpuinfo."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def provenance(device: torch.device, note: str | None = None) -> dict[str, Any]:
    """Where and with what a result was measured: device, versions, extension build, date, commit."""
    device = torch.device(device)
    commit = _git("rev-parse", "HEAD")
    dirty = _git("status", "--porcelain", "--untracked-files=no") if commit else None
    info: dict[str, Any] = {
        "device": device_name(device),
        "device_type": device.type,
        "logical_cpus": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "sema": sema.__version__,
        "python": platform.python_version(),
        "extension": _extension.build_info() or {"missing": _extension.load_error},
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": commit,
        "git_dirty": None if dirty is None else bool(dirty),
        "backends": {name: reason for name, (_, reason) in sema.available_backends(device).items()},
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["cuda"] = torch.version.cuda
        info["capability"] = f"sm_{props.major}{props.minor}"
        info["memory_GB"] = round(props.total_memory / 1e9, 1)
    if note:
        info["note"] = note
    return info


def format_table(result: dict[str, Any]) -> str:
    """The rows as a fixed-width text table."""
    head = (
        f"{'set':11} {'param':5} {'ema':5} {'backend':8} {'op':24} {'ms':>9} {'q1-q3 ms':>15} "
        f"{'GB/s':>7} {'% copy_':>7} {'host ms':>8}"
    )
    lines = [head, "-" * len(head)]
    for r in result["rows"]:
        spread = f"{r['q1_ms']:.3f}-{r['q3_ms']:.3f}"
        host = "" if r["host_ms"] is None else f"{r['host_ms']:.3f}"
        lines.append(
            f"{r['param_set'][:11]:11} {r['param_dtype']:5} {r['ema_dtype']:5} {r['backend']:8} {r['op']:24} "
            f"{r['median_ms']:9.3f} {spread:>15} {r['GB/s']:7.2f} {r['pct_of_copy']:6.0f}% {host:>8}"
        )
    for set_name, reason in result.get("skipped", {}).items():
        lines.append(f"skipped {set_name}: {reason}")
    return "\n".join(lines)


CSV_PROVENANCE = ("device", "threads", "torch", "triton", "sema", "date", "git_commit", "note")


def write_json(result: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")


def write_csv(result: dict[str, Any], path: Path) -> None:
    """One line per row, each with the provenance columns (so any CSV reader keeps them)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    prov = result["provenance"]
    fields = list(result["rows"][0]) if result["rows"] else []
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields + list(CSV_PROVENANCE))
        writer.writeheader()
        for row in result["rows"]:
            writer.writerow({**row, **{key: prov.get(key) for key in CSV_PROVENANCE}})


def pyplot() -> Any:
    """matplotlib's pyplot on the Agg backend, or an ImportError that says how to get it."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ImportError(
            f"plotting needs matplotlib, which cannot be imported here ({exc}); "
            "install it with: pip install 'sema[bench]'  (or: pip install matplotlib)"
        ) from exc
    return plt


OP_LABELS = {
    "update": "update",
    "update_switch": "update\n+switch",
    "switch": "switch",
    "swap": "swap",
    "SwitchEMA.update": "SwitchEMA\n.update",
    "SwitchEMA.update+switch": "SwitchEMA\n.update+sw",
}


def write_plot(result: dict[str, Any], path: Path) -> None:
    """GB/s of each backend per op: one panel per (parameter set, dtype pair), the same-run
    ``copy_`` of the same bytes as a dashed line over each op."""
    plt = pyplot()
    rows = result["rows"]
    if not rows:
        raise ValueError("nothing to plot: the result has no rows")
    sets = list(dict.fromkeys(r["param_set"] for r in rows))
    pairs = list(dict.fromkeys((r["param_dtype"], r["ema_dtype"]) for r in rows))
    backends = list(dict.fromkeys(r["backend"] for r in rows))
    colors = {b: f"C{i}" for i, b in enumerate(backends)}
    fig, axes = plt.subplots(
        len(sets), len(pairs), figsize=(4.2 * len(pairs), 3.4 * len(sets)), squeeze=False, sharey="row"
    )
    bar_width = 0.8 / len(backends)
    for (i, set_name), (j, pair) in ((a, b) for a in enumerate(sets) for b in enumerate(pairs)):
        ax = axes[i, j]
        mine = [r for r in rows if r["param_set"] == set_name and (r["param_dtype"], r["ema_dtype"]) == pair]
        op_order = list(dict.fromkeys(r["op"] for r in mine))
        for b, backend in enumerate(backends):
            offset = (b - (len(backends) - 1) / 2) * bar_width
            picked = [r for r in mine if r["backend"] == backend]
            xs = [op_order.index(r["op"]) + offset for r in picked]
            ax.bar(xs, [r["GB/s"] for r in picked], bar_width, color=colors[backend], label=backend)
        for x, op in enumerate(op_order):
            copy_gbps = next(r["copy_GB/s"] for r in mine if r["op"] == op)
            ax.hlines(copy_gbps, x - 0.45, x + 0.45, colors="black", linestyles="dashed", linewidth=1)
        ax.plot([], [], color="black", linestyle="dashed", linewidth=1, label="copy_, same bytes")
        ax.set_xticks(range(len(op_order)))
        ax.set_xticklabels([OP_LABELS.get(op, op) for op in op_order], fontsize=7)
        info = result["param_sets"].get(set_name, {})
        ax.set_title(
            f"{set_name} ({info.get('elements', 0) / 1e6:.1f}M el.), params {pair[0]}, EMA {pair[1]}", fontsize=8
        )
        if j == 0:
            ax.set_ylabel("GB/s (DESIGN.md bytes)", fontsize=8)
        ax.tick_params(axis="y", labelsize=7)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    prov = result["provenance"]
    title = (
        f"sema {prov['sema']} on {prov['device']} ({prov['threads']} threads), torch {prov['torch']}, "
        f"{prov['date'][:10]}" + (f"; {prov['note']}" if prov.get("note") else "")
    )
    fig.suptitle(title, fontsize=9)
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.05, 1, 0.97))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _parser() -> argparse.ArgumentParser:
    sets = "\n".join(f"  {describe(name)}" for name in PARAM_SETS)
    parser = argparse.ArgumentParser(
        prog="sema-bench",
        description="Bandwidth profile of sema's EMA ops: every available backend x op x dtype pair, median "
        "time, GB/s from DESIGN.md's byte counts, %% of a same-run copy_ of the same bytes, and the host time "
        "of SwitchEMA.update().",
        epilog=f"parameter sets (shapes only, nothing downloaded):\n{sets}\n\n"
        "Python API: sema.profile.profile_module(model) profiles any nn.Module's parameter shapes.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--set",
        default="resnet50",
        help="parameter set(s), comma separated, or 'all' (every set but 'tiny'; sets that do not fit in "
        "memory are skipped with the reason). Default: resnet50",
    )
    parser.add_argument(
        "--dtypes",
        default="fp32,bf16",
        help="(param, EMA) dtype pairs, comma separated: PARAM (fp32 EMA) or PARAM:EMA, e.g. "
        "'fp32,bf16,bf16:bf16', or 'all'. Default: fp32,bf16",
    )
    parser.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda when present)")
    parser.add_argument("--backends", default=None, help="comma separated (default: every available backend)")
    parser.add_argument("--ops", default=",".join(OPS), help=f"comma separated, from {','.join(OPS)}")
    parser.add_argument("--no-switch-ema", action="store_true", help="skip the SwitchEMA.update() rows")
    parser.add_argument(
        "--repeats", type=int, default=None, help="timed calls per candidate (default: 15 on CPU, 100 on CUDA)"
    )
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds first (default: 2)")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads (torch.set_num_threads; the cpp backend shares torch's OpenMP pool). On a machine shared "
        "with other jobs, 1 thread gives far steadier numbers: a parallel region waits for every one of its threads",
    )
    parser.add_argument("--json", type=Path, default=None, help="write rows + provenance as JSON here")
    parser.add_argument("--csv", type=Path, default=None, help="write rows (with provenance columns) as CSV here")
    parser.add_argument("--plot", type=Path, default=None, help="write a PNG bar chart here (needs matplotlib)")
    parser.add_argument("--note", default=None, help="free text kept in the provenance (e.g. 'shared machine')")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    return parser


def main(argv: list[str] | None = None) -> int:
    """The ``sema-bench`` command. Returns the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    set_names = list(MODEL_SETS) if args.set.strip() == "all" else [s.strip() for s in args.set.split(",") if s]
    unknown = [s for s in set_names if s not in PARAM_SETS]
    if unknown or not set_names:
        parser.error(f"unknown parameter set(s) {unknown}; choose from {', '.join(PARAM_SETS)} or 'all'")
    try:
        pairs = parse_pairs(args.dtypes)
    except ValueError as exc:
        parser.error(str(exc))
    if args.repeats is not None and args.repeats < 1:
        parser.error("--repeats must be >= 1")
    if args.warmup < 0:
        parser.error("--warmup must be >= 0")
    if args.threads is not None:
        if args.threads < 1:
            parser.error("--threads must be >= 1")
        torch.set_num_threads(args.threads)
    if args.plot is not None:
        try:
            pyplot()
        except ImportError as exc:
            parser.error(f"--plot: {exc}")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch.cuda.is_available() is False here")
    options = {
        "backends": [b.strip() for b in args.backends.split(",") if b.strip()] if args.backends else None,
        "op_names": [o.strip() for o in args.ops.split(",") if o.strip()],
        "repeats": args.repeats,
        "warmup": args.warmup,
        "switch_ema": not args.no_switch_ema,
        "progress": not args.no_progress,
    }
    try:
        result = profile_sets(set_names, pairs, device, **options)
    except ValueError as exc:
        parser.error(str(exc))
    if args.note:
        result["provenance"]["note"] = args.note
    prov = result["provenance"]
    print(
        f"sema {prov['sema']} | torch {prov['torch']} | {prov['device']} ({prov['threads']} threads) | "
        f"commit {(prov['git_commit'] or 'n/a')[:10]}{' (dirty)' if prov['git_dirty'] else ''} | {prov['date']}"
    )
    for set_name, info in result["param_sets"].items():
        print(f"{set_name}: {info['tensors']} tensors, {info['elements'] / 1e6:.2f}M elements")
    print(format_table(result))
    if not result["rows"]:
        print("sema-bench: nothing was measured: every requested set was skipped (reasons above)", file=sys.stderr)
        return 1
    for path, writer in ((args.json, write_json), (args.csv, write_csv), (args.plot, write_plot)):
        if path is not None:
            writer(result, path)
            print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

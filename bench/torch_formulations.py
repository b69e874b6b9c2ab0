"""Which pure-PyTorch formulation should the ``torch`` backend use, and how far is the
compiled ``cpp`` backend ahead of the best of them?

On a ResNet-50-shaped parameter set, times the same work several ways in one process:
flat ops over a bucket, cache-blocked chunks of the bucket (several chunk sizes),
``torch._foreach_*`` over un-bucketed per-tensor lists, a per-tensor loop, and a ``copy_``
moving the same bytes; then ``SwitchEMA.update()`` / ``update(switch=True)`` on the torch
backend as shipped, and on the ``cpp`` backend when the extension is built. Bytes per element
(DESIGN.md): update 2E+P, update+switch 2E+2P.

    python bench/torch_formulations.py [--repeats 15] [--json bench/results/....json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch

import sema
from sema import reference
from sema.param_sets import resnet50
from sema.profile import bytes_per_element, module_of, provenance

W = 1e-3


def chunked(ema, param, switch, chunk):
    saved = reference.CHUNK
    reference.CHUNK = chunk
    try:
        reference.ema_update_(ema, param, W, switch)
    finally:
        reference.CHUNK = saved


def flat(ema, param, switch):
    if param.dtype == ema.dtype:
        ema.lerp_(param, W)
    else:
        ema.lerp_(param.to(ema.dtype), W)  # a full-size fp32 temporary
    if switch:
        param.copy_(ema)


def foreach(emas, params, switch):
    if params[0].dtype == emas[0].dtype:
        torch._foreach_lerp_(emas, params, W)
    else:
        torch._foreach_lerp_(emas, [p.to(emas[0].dtype) for p in params], W)
    if switch:
        torch._foreach_copy_(params, emas)


def loop(emas, params, switch):
    for e, p in zip(emas, params, strict=True):
        e.lerp_(p if p.dtype == e.dtype else p.to(e.dtype), W)
        if switch:
            p.copy_(e)


def interleaved_medians(candidates: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median seconds per candidate, timed round-robin so that a noisy moment of the machine
    hits every candidate alike (this is a shared 2-core VM)."""
    for fn in candidates.values():
        for _ in range(2):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(repeats):
        for name, fn in candidates.items():
            t0 = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - t0)
    return {name: statistics.median(times) for name, times in samples.items()}


def run(repeats: int) -> dict[str, object]:
    torch.manual_seed(0)
    device = torch.device("cpu")
    shapes = resnet50()
    rows = []
    for dtype_name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        params = [torch.randn(s).to(dtype) for s in shapes]
        emas = [p.to(torch.float32, copy=True) for p in params]
        n = sum(p.numel() for p in params)
        param_flat = torch.cat([p.view(-1) for p in params])
        ema_flat = param_flat.to(torch.float32, copy=True)
        for switch in (False, True):
            op = "update_switch" if switch else "update"
            nbytes = bytes_per_element(op, dtype, torch.float32) * n
            src = torch.ones(nbytes // 2, dtype=torch.uint8)  # written: untouched pages read from cache
            candidates: dict[str, Callable[[], object]] = {
                "copy_ (same bytes)": partial(torch.Tensor.copy_, torch.empty_like(src), src),
                "flat": partial(flat, ema_flat, param_flat, switch),
                "foreach per-tensor": partial(foreach, emas, params, switch),
                "loop per-tensor": partial(loop, emas, params, switch),
            }
            for chunk in (1 << 16, 1 << 18, 1 << 20):
                candidates[f"chunked {chunk >> 10}K"] = partial(chunked, ema_flat, param_flat, switch, chunk)
            averager = sema.SwitchEMA(module_of(shapes, dtype, device), backend="torch", switch_every=None)
            candidates["SwitchEMA.update (torch backend)"] = partial(averager.update, switch=switch)
            if sema.available_backends("cpu")["cpp"][0]:  # the compiled extension, for comparison
                compiled = sema.SwitchEMA(module_of(shapes, dtype, device), backend="cpp", switch_every=None)
                candidates["SwitchEMA.update (cpp backend)"] = partial(compiled.update, switch=switch)
            timings = interleaved_medians(candidates, repeats)
            foreach_s = timings["foreach per-tensor"]
            for name, seconds in timings.items():
                rows.append(
                    {
                        "param_dtype": dtype_name,
                        "op": op,
                        "formulation": name,
                        "median_ms": seconds * 1e3,
                        "GB/s": nbytes / seconds / 1e9,
                        "speedup_vs_foreach": foreach_s / seconds,
                        "pct_of_copy": 100 * timings["copy_ (same bytes)"] / seconds,
                    }
                )
    return {
        "what": "torch backend formulations, ResNet-50-shaped params",
        "elements": sum(int(torch.Size(s).numel()) for s in shapes),
        "tensors": len(shapes),
        "provenance": provenance(device),
        "rows": rows,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    result = run(args.repeats)
    print(f"{result['tensors']} tensors, {result['elements'] / 1e6:.1f}M elements, {result['provenance']['device']}")
    print(f"{'dtype':5} {'op':14} {'formulation':34} {'ms':>8} {'GB/s':>7} {'vs foreach':>10} {'% copy_':>8}")
    # "% copy_" is the copy_ time over this time for the same bytes: an update reads twice what
    # it writes, which this machine does faster than a copy's half-and-half, hence > 100%.
    for r in result["rows"]:
        print(
            f"{r['param_dtype']:5} {r['op']:14} {r['formulation']:34} {r['median_ms']:8.2f} {r['GB/s']:7.2f} "
            f"{r['speedup_vs_foreach']:9.2f}x {r['pct_of_copy']:7.0f}%"
        )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

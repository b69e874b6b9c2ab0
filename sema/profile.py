"""Bandwidth profile of the EMA ops (the ``sema-bench`` command).

For a built-in parameter set (shapes only) it times every op of the contract on every
available backend, next to a ``copy_`` moving the same number of bytes, and the full
``SwitchEMA.update()`` call. GB/s use the byte counts of DESIGN.md:

    update        read ema + param, write ema           = 2*E + P bytes per element
    update_switch read ema + param, write ema + param   = 2*E + 2*P
    switch        read ema, write param                 = E + P
    swap          read and write both                   = 2*E + 2*P

(E, P: bytes per EMA / param element; fp32 EMA with bf16 params gives 10, 12, 6, 12.)
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
from torch import nn

import sema
from sema import ops
from sema.param_sets import PARAM_SETS, numel

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
OPS = ("update", "update_switch", "switch", "swap")


def bytes_per_element(op: str, param_dtype: torch.dtype, ema_dtype: torch.dtype) -> int:
    e = torch.empty((), dtype=ema_dtype).element_size()
    p = torch.empty((), dtype=param_dtype).element_size()
    return {"update": 2 * e + p, "update_switch": 2 * e + 2 * p, "switch": e + p, "swap": 2 * e + 2 * p}[op]


def time_call(fn: Callable[[], None], device: torch.device, repeats: int, warmup: int = 3) -> float:
    """Median seconds per call."""
    for _ in range(warmup):
        fn()
    times = []
    if device.type == "cuda":
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
    else:
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def module_of(shapes: list[tuple[int, ...]], dtype: torch.dtype, device: torch.device) -> nn.Module:
    module = nn.Module()
    module.weights = nn.ParameterList(
        nn.Parameter(torch.randn(s, dtype=torch.float32, device=device).to(dtype)) for s in shapes
    )
    return module


def profile(
    param_set: str = "resnet50",
    dtypes: tuple[str, ...] = ("fp32", "bf16"),
    device: str | None = None,
    repeats: int = 10,
) -> dict[str, object]:
    """Time every op on every available backend; returns rows plus provenance."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    shapes = PARAM_SETS[param_set]()
    n = numel(shapes)
    available = [name for name, (ok, _) in sema.available_backends(dev).items() if ok]
    if dev.type == "cpu" and "triton" in available:
        available.remove("triton")  # the interpreter is a test tool, not a CPU backend
    rows = []
    for dtype_name in dtypes:
        param_dtype = DTYPES[dtype_name]
        ema_dtype = torch.float32
        param = torch.randn(n, device=dev).to(param_dtype)
        ema = torch.randn(n, device=dev, dtype=ema_dtype)
        for op in OPS:
            nbytes = bytes_per_element(op, param_dtype, ema_dtype) * n
            src = torch.ones(nbytes // 2, dtype=torch.uint8, device=dev)  # written: untouched pages read from cache
            copy_s = time_call(partial(torch.Tensor.copy_, torch.empty_like(src), src), dev, repeats)
            for backend in available:
                if op == "swap" and param_dtype == torch.float16:
                    continue  # no in-place swap for fp16 params with an fp32 EMA
                call = {
                    "update": partial(ops.ema_update_, ema, param, 1e-3, backend=backend),
                    "update_switch": partial(ops.ema_update_, ema, param, 1e-3, switch=True, backend=backend),
                    "switch": partial(ops.switch_, ema, param, backend=backend),
                    "swap": partial(ops.swap_, ema, param, backend=backend),
                }[op]
                seconds = time_call(call, dev, repeats)
                rows.append(_row(param_set, dtype_name, backend, op, n, nbytes, seconds, copy_s))
        for backend in available:
            averager = sema.SwitchEMA(module_of(shapes, param_dtype, dev), backend=backend, switch_every=None)
            for op, switch in (("SwitchEMA.update", False), ("SwitchEMA.update+switch", True)):
                seconds = time_call(partial(averager.update, switch=switch), dev, repeats)
                nbytes = bytes_per_element("update_switch" if switch else "update", param_dtype, ema_dtype) * n
                rows.append(_row(param_set, dtype_name, backend, op, n, nbytes, seconds, None))
    return {"provenance": provenance(dev), "param_set": param_set, "tensors": len(shapes), "rows": rows}


def _row(param_set, dtype, backend, op, n, nbytes, seconds, copy_s) -> dict[str, object]:
    gbps = nbytes / seconds / 1e9
    return {
        "param_set": param_set,
        "param_dtype": dtype,
        "ema_dtype": "fp32",
        "backend": backend,
        "op": op,
        "elements": n,
        "bytes": nbytes,
        "median_ms": seconds * 1e3,
        "GB/s": gbps,
        "copy_GB/s": None if copy_s is None else nbytes / copy_s / 1e9,
        "pct_of_copy": None if copy_s is None else 100.0 * copy_s / seconds,
    }


def provenance(device: torch.device) -> dict[str, object]:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = platform.processor() or platform.machine()
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
        except OSError:
            pass
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).parent,
            check=False,
        ).stdout.strip()
    except OSError:
        commit = ""
    return {
        "device": name,
        "device_type": device.type,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "sema": sema.__version__,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": commit or None,
        "backends": {k: v[1] for k, v in sema.available_backends(device).items()},
    }


def format_table(result: dict[str, object]) -> str:
    head = f"{'dtype':5} {'backend':8} {'op':24} {'ms':>9} {'GB/s':>8} {'% copy_':>8}"
    lines = [head, "-" * len(head)]
    for r in result["rows"]:
        pct = "" if r["pct_of_copy"] is None else f"{r['pct_of_copy']:.0f}%"
        lines.append(
            f"{r['param_dtype']:5} {r['backend']:8} {r['op']:24} {r['median_ms']:9.3f} {r['GB/s']:8.2f} {pct:>8}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sema-bench", description=__doc__.splitlines()[0])
    parser.add_argument("--set", default="resnet50", choices=sorted(PARAM_SETS), help="built-in parameter set")
    parser.add_argument("--dtypes", default="fp32,bf16", help="param dtypes, comma separated (EMA is fp32)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--json", type=Path, default=None, help="write the rows and provenance here")
    args = parser.parse_args(argv)
    dtypes = tuple(d.strip() for d in args.dtypes.split(",") if d.strip())
    bad = [d for d in dtypes if d not in DTYPES]
    if bad:
        parser.error(f"unknown dtype(s) {bad}; choose from {sorted(DTYPES)}")
    result = profile(args.set, dtypes, args.device, args.repeats)
    prov = result["provenance"]
    print(
        f"sema {prov['sema']} | torch {prov['torch']} | {prov['device']} ({prov['threads']} threads) | "
        f"{args.set}: {result['tensors']} tensors, {result['rows'][0]['elements'] / 1e6:.1f}M elements"
    )
    print(format_table(result))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""CPU benchmark of the compiled ``cpp`` backend against the ``torch`` reference backend and a
``copy_`` of the same bytes, on one flat bucket of ResNet-50 size (about 23M parameters).

GB/s = bytes moved / median time, with bytes per element from DESIGN.md (ema size E, param
size P): update 2E + P, update+switch 2E + 2P, switch E + P, swap 2E + 2P. The ``copy_``
ceiling copies bytes/2 into another bytes/2 in the same run, so "% copy" is the fraction of
what this machine's memory system delivers to a plain copy.

    python bench/cpu_ext.py [--numel 23000000] [--reps 20] [--out bench/results]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable

import torch

import sema
from sema import _extension

PAIRS = [  # (param dtype, ema dtype)
    (torch.float32, torch.float32),
    (torch.bfloat16, torch.float32),
    (torch.float16, torch.float32),
    (torch.bfloat16, torch.bfloat16),
]
SHORT = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def bytes_moved(op: str, ema_size: int, param_size: int) -> int:
    """Bytes per element of each op (DESIGN.md)."""
    return {
        "update": 2 * ema_size + param_size,
        "update+switch": 2 * ema_size + 2 * param_size,
        "switch": ema_size + param_size,
        "swap": 2 * ema_size + 2 * param_size,
    }[op]


def median_seconds(fn: Callable[[], None], reps: int) -> float:
    fn()  # warm up: page faults, thread pool start
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def op_call(op: str, ema: torch.Tensor, param: torch.Tensor, backend: str) -> Callable[[], None] | None:
    if op == "update":
        return lambda: sema.ops.ema_update_(ema, param, 1e-3, backend=backend)
    if op == "update+switch":
        return lambda: sema.ops.ema_update_(ema, param, 1e-3, switch=True, backend=backend)
    if op == "switch":
        return lambda: sema.ops.switch_(ema, param, backend=backend)
    if ema.dtype != param.dtype and param.dtype != torch.bfloat16:
        return None  # no in-place swap for fp32 EMA with fp16 params
    return lambda: sema.ops.swap_(ema, param, backend=backend)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit() -> str:
    try:
        result = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True).stdout.strip()
        return result.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--numel", type=int, default=23_000_000, help="elements in the bucket (ResNet-50: ~23M)")
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = parser.parse_args()

    ok, reason = sema.available_backends("cpu")["cpp"]
    if not ok:
        raise SystemExit(f"the cpp backend is unavailable: {reason}")
    n = args.numel
    rows = []
    for param_dtype, ema_dtype in PAIRS:
        generator = torch.Generator().manual_seed(0)
        ema = torch.randn(n, generator=generator).to(ema_dtype)
        param = torch.randn(n, generator=generator).to(param_dtype)
        for op in ("update", "update+switch", "switch", "swap"):
            if op_call(op, ema, param, "cpp") is None:
                continue
            nbytes = n * bytes_moved(op, ema.element_size(), param.element_size())
            # Both buffers written first: an untouched source would read the shared zero page from cache.
            source = torch.ones(nbytes // 2, dtype=torch.uint8)
            target = torch.ones_like(source)
            copy_s = median_seconds(lambda s=source, t=target: t.copy_(s), args.reps)
            row = {
                "op": op,
                "param": SHORT[param_dtype],
                "ema": SHORT[ema_dtype],
                "numel": n,
                "bytes": nbytes,
                "copy_ms": copy_s * 1e3,
                "copy_gbps": nbytes / copy_s / 1e9,
            }
            for backend in ("cpp", "torch"):
                seconds = median_seconds(op_call(op, ema, param, backend), args.reps)
                row[f"{backend}_ms"] = seconds * 1e3
                row[f"{backend}_gbps"] = nbytes / seconds / 1e9
                row[f"{backend}_pct_copy"] = 100 * copy_s / seconds
            row["speedup"] = row["torch_ms"] / row["cpp_ms"]
            rows.append(row)
            print(
                f"{op:14s} param {row['param']} ema {row['ema']}: cpp {row['cpp_ms']:7.2f} ms "
                f"{row['cpp_gbps']:5.1f} GB/s ({row['cpp_pct_copy']:3.0f}% copy) | torch {row['torch_ms']:7.2f} ms "
                f"{row['torch_gbps']:5.1f} GB/s ({row['torch_pct_copy']:3.0f}% copy) | x{row['speedup']:.2f}",
                flush=True,
            )

    result = {
        "benchmark": "cpu_ext",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": git_commit(),
        "device": {
            "cpu": cpu_model(),
            "logical_cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        },
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "sema": sema.__version__,
            "sema._C": _extension.build_info(),
        },
        "method": f"median of {args.reps} runs after one warm-up; bytes per element as in DESIGN.md",
        "rows": rows,
    }
    os.makedirs(args.out, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = os.path.join(args.out, f"cpu_ext-{platform.node() or 'host'}-{stamp}.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

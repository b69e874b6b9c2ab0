"""The CUDA extension's kernels on odd sizes, offset views and a 150-tensor multi-tensor call, for
``compute-sanitizer --tool memcheck`` (the suite's memcheck stage).

PyTorch's caching allocator hands out pieces of larger blocks, and memcheck sees only the blocks,
so caching is switched off here: every tensor is its own allocation. Each view ends where its
allocation ends (``base[offset:]``), so a read or write past its last element leaves the
allocation and is reported; offsets 1..3 also take the kernels off their 16-byte alignment.
Each result is compared with the ``torch`` backend on the same input (bit equality: the kernel
contract), so the run is a correctness check as well.

    compute-sanitizer --tool memcheck python bench/gpu/memcheck_target.py
    python bench/gpu/memcheck_target.py --device cpu --backend cpp     # the script itself
"""

from __future__ import annotations

import os

os.environ["PYTORCH_NO_CUDA_MEMORY_CACHING"] = "1"  # read when torch first allocates on the GPU

import argparse
import sys
from collections.abc import Callable

import torch

import sema

SIZES = [1, 3, 17, 127, 4097, 8191, 8193, 3 * 8192 + 5, 2**20 + 3]
OFFSETS = [0, 1, 2, 3]
QUICK_SIZES, QUICK_OFFSETS = [1, 17, 4097], [0, 1]
PAIRS = [
    (torch.float32, torch.float32),
    (torch.bfloat16, torch.float32),
    (torch.float16, torch.float32),
    (torch.bfloat16, torch.bfloat16),
    (torch.float16, torch.float16),
]
MULTI_TENSORS = 150


def tail_view(n: int, offset: int, dtype: torch.dtype, device: torch.device, generator: torch.Generator):
    """``n`` random elements at ``offset`` into an allocation that ends with them."""
    base = torch.randn(n + offset, device=device, generator=generator).to(dtype)
    return base[offset:]


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def run_case(
    name: str, op: Callable[..., None], ema: torch.Tensor, param: torch.Tensor, backend: str, failures: list[str]
) -> None:
    expected_ema, expected_param = ema.clone(), param.clone()
    op(ema, param, backend=backend)
    op(expected_ema, expected_param, backend="torch")
    if not (same_bits(ema, expected_ema) and same_bits(param, expected_param)):
        failures.append(name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="cuda", help="default cuda")
    parser.add_argument("--device", default="cuda", help="cuda[:N] or cpu (default cuda)")
    parser.add_argument("--quick", action="store_true", help=f"sizes {QUICK_SIZES}, offsets {QUICK_OFFSETS} only")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    sizes, offsets = (QUICK_SIZES, QUICK_OFFSETS) if args.quick else (SIZES, OFFSETS)
    ok, why = sema.available_backends(device.type)[args.backend]
    if not ok:
        print(f"{args.backend}: unavailable: {why}")
        return 1
    generator = torch.Generator(device=device).manual_seed(int(torch.seed() % 2**31))
    ops: dict[str, Callable[..., None]] = {
        "update": lambda e, p, backend: sema.ops.ema_update_(e, p, 0.3, backend=backend),
        "update_switch": lambda e, p, backend: sema.ops.ema_update_(e, p, 0.3, switch=True, backend=backend),
        "switch": lambda e, p, backend: sema.ops.switch_(e, p, backend=backend),
        "swap": lambda e, p, backend: sema.ops.swap_(e, p, backend=backend),
        "swap_restore": lambda e, p, backend: sema.ops.swap_(e, p, restore=True, backend=backend),
    }
    failures: list[str] = []
    cases = 0
    for param_dtype, ema_dtype in PAIRS:
        for n in sizes:
            for offset in offsets:
                for op_name, op in ops.items():
                    if op_name.startswith("swap") and param_dtype not in (ema_dtype, torch.bfloat16):
                        continue  # no in-place swap of fp16 params with an fp32 EMA (refused by design)
                    ema = tail_view(n, offset, ema_dtype, device, generator)
                    param = tail_view(n, offset, param_dtype, device, generator)
                    run_case(
                        f"{op_name} {param_dtype}/{ema_dtype} n={n} offset={offset}",
                        op,
                        ema,
                        param,
                        args.backend,
                        failures,
                    )
                    cases += 1

    emas, params = [], []
    for i in range(MULTI_TENSORS):
        param_dtype, ema_dtype = PAIRS[i % len(PAIRS)]
        n, offset = 1 + (i * 7919) % 20_000, i % 4
        emas.append(tail_view(n, offset, ema_dtype, device, generator))
        params.append(tail_view(n, offset, param_dtype, device, generator))
    expected = [(e.clone(), p.clone()) for e, p in zip(emas, params, strict=True)]
    sema.ops.ema_update_multi_(emas, params, 2e-3, switch=True, backend=args.backend)
    sema.ops.ema_update_multi_([e for e, _ in expected], [p for _, p in expected], 2e-3, switch=True, backend="torch")
    for i, (e, p) in enumerate(expected):
        if not (same_bits(emas[i], e) and same_bits(params[i], p)):
            failures.append(f"multi pair {i}")
    cases += 1
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    print(
        f"{args.backend}: {cases} calls ({len(sizes)} sizes x offsets {offsets} x dtype pairs x ops, one "
        f"{MULTI_TENSORS}-tensor multi call); {len(failures)} differ from the torch backend"
    )
    for name in failures[:20]:
        print(f"  differs: {name}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

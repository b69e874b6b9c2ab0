"""One launch of each sema kernel family per backend, for ``ncu`` to profile (the suite's ncu stage).

Families: update, update+switch, switch and swap (fp32 EMA, bf16 params, 2**28 elements: 1.5 GiB,
about 0.6 ms a launch at 4.3 TB/s) and the multi-tensor update (150 tensors, the same bytes in
all). No warm-up launch: the first launch of each is the profiled one (Triton compiles on the
host before it; ncu replays the kernel itself with the caches flushed). The data are random and
set up before any sema kernel runs, so ``ncu -k regex:...`` sees only these launches.

    ncu --clock-control none -k regex:'ema|switch|swap' python bench/gpu/ncu_target.py
    python bench/gpu/ncu_target.py --device cpu --backends cpp --n 4099     # the script itself
"""

from __future__ import annotations

import argparse
import sys

import torch

import sema

MULTI_TENSORS = 150


def launches(backend: str, n: int, device: torch.device, generator: torch.Generator) -> list[str]:
    """Runs one launch per family on fresh random data; returns the family names launched."""
    ema = torch.randn(n, device=device, generator=generator)
    param = torch.randn(n, device=device, generator=generator, dtype=torch.bfloat16)
    sizes = [n // MULTI_TENSORS + (i % 7) * 8 for i in range(MULTI_TENSORS)]
    emas = [torch.randn(s, device=device, generator=generator) for s in sizes]
    params = [torch.randn(s, device=device, generator=generator, dtype=torch.bfloat16) for s in sizes]
    weight = torch.tensor(1e-3, device=device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    sema.ops.ema_update_(ema, param, weight, backend=backend)
    sema.ops.ema_update_(ema, param, weight, switch=True, backend=backend)
    sema.ops.switch_(ema, param, backend=backend)
    sema.ops.swap_(ema, param, backend=backend)
    sema.ops.ema_update_multi_(emas, params, weight, backend=backend)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return ["update", "update_switch", "switch", "swap", f"multi ({MULTI_TENSORS} tensors)"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2**28, help="bucket elements (default 2**28)")
    parser.add_argument("--backends", default="triton,cuda", help="comma separated (default triton,cuda)")
    parser.add_argument("--device", default="cuda", help="cuda[:N] or cpu (default cuda)")
    args = parser.parse_args(argv)
    if args.n < MULTI_TENSORS:
        parser.error(f"--n must be >= {MULTI_TENSORS}")
    device = torch.device(args.device)
    generator = torch.Generator(device=device).manual_seed(int(torch.seed() % 2**31))
    failed = False
    for backend in (b.strip() for b in args.backends.split(",")):
        ok, why = sema.available_backends(device.type)[backend]
        if not ok:
            print(f"{backend}: unavailable: {why}")
            failed = True
            continue
        families = launches(backend, args.n, device, generator)
        print(f"{backend}: launched {', '.join(families)} once each, n={args.n}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

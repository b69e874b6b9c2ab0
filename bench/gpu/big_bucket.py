"""An update+switch of one bucket past 2**31 elements (fp32 EMA, bf16 params) on each GPU backend,
every element checked against an fp64 lerp, with the head, the 2**31 boundary and the tail named.

Memory on the GPU, n = 2**31 + 17: the bucket (6 B/element) and a copy of its start values
(6 B/element), 26 GB, plus about 5 GB for one fp64 check chunk. Time: one pass of 12 B/element
(6 ms at 4.3 TB/s) per backend; the fresh random data and the checks take a few seconds.

    python bench/gpu/big_bucket.py                                    # triton and cuda, n = 2**31 + 17
    python bench/gpu/big_bucket.py --device cpu --n 1048593 --backends torch,cpp   # the script itself
    python bench/gpu/big_bucket.py ... --spoil-tail     # negative control: must report the tail and fail
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

import sema

WEIGHT = 0.25
CHUNK = 2**27  # elements per fp64 check chunk: 5 tensors of 1 GiB
WINDOW = 2**20  # elements named as the head, the 2**31 boundary and the tail
# The fp32 lerp (a difference, a product, an fma) errs by under 2 eps * (|e| + |p|); an fp32
# EMA is not rounded again.
BOUND_EPS = 2 * 2.0**-23


def bad_elements(ema0: torch.Tensor, param0: torch.Tensor, ema: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """Mask of the elements where the EMA left the fp64 bound or the param is not the cast EMA."""
    e64, p64 = ema0.double(), param0.double()
    exact = torch.lerp(e64, p64, WEIGHT)
    ema_bad = ~((ema.double() - exact).abs() <= BOUND_EPS * (e64.abs() + p64.abs()))
    cast_bad = param.view(torch.int16) != ema.to(torch.bfloat16).view(torch.int16)
    return ema_bad | cast_bad


def regions(n: int) -> dict[str, tuple[int, int]]:
    middle = 2**31 if n > 2**31 else n // 2
    return {
        "head": (0, min(WINDOW, n)),
        "2**31 boundary" if n > 2**31 else "middle": (max(0, middle - WINDOW), min(n, middle + WINDOW)),
        "tail": (max(0, n - WINDOW), n),
    }


def check_backend(backend: str, n: int, device: torch.device, seed: int, spoil_tail: bool) -> bool:
    ok, why = sema.available_backends(device.type)[backend]
    if not ok:
        print(f"{backend}: FAIL, backend unavailable: {why}")
        return False
    generator = torch.Generator(device=device).manual_seed(seed)
    ema = torch.randn(n, device=device, generator=generator)
    param = torch.randn(n, device=device, generator=generator, dtype=torch.bfloat16)
    ema0, param0 = ema.clone(), param.clone()
    started = time.perf_counter()
    sema.ops.ema_update_(ema, param, WEIGHT, switch=True, backend=backend)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elapsed_ms = (time.perf_counter() - started) * 1e3
    if spoil_tail:  # an unwritten last element, as a kernel with int32 offsets could leave
        ema[-1], param[-1] = ema0[-1], param0[-1]

    total_bad, first_bad = 0, None
    for start in range(0, n, CHUNK):
        stop = min(n, start + CHUNK)
        bad = bad_elements(ema0[start:stop], param0[start:stop], ema[start:stop], param[start:stop])
        count = int(bad.sum())
        if count and first_bad is None:
            first_bad = start + int(bad.nonzero()[0, 0])
        total_bad += count
    passed = total_bad == 0
    parts = []
    for name, (lo, hi) in regions(n).items():
        count = int(bad_elements(ema0[lo:hi], param0[lo:hi], ema[lo:hi], param[lo:hi]).sum())
        parts.append(f"{name} [{lo}, {hi}): {'ok' if count == 0 else f'FAIL, {count} bad'}")
    verdict = "ok" if passed else f"FAIL, {total_bad} bad, first at index {first_bad}"
    print(f"{backend}: n={n} update+switch (fp32 EMA, bf16 params, w={WEIGHT}) took {elapsed_ms:.1f} ms (first call)")
    print(f"{backend}:   " + "; ".join(parts) + f"; all {n} elements: {verdict}")
    del ema, param, ema0, param0
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return passed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2**31 + 17, help="bucket elements (default 2**31 + 17)")
    parser.add_argument("--backends", default="triton,cuda", help="comma separated (default triton,cuda)")
    parser.add_argument("--device", default="cuda", help="cuda[:N] or cpu (default cuda)")
    parser.add_argument("--seed", type=int, default=None, help="random seed (default: fresh)")
    parser.add_argument("--spoil-tail", action="store_true", help="negative control: undo the last element")
    args = parser.parse_args(argv)
    if args.n < 1:
        parser.error("--n must be >= 1")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device (use --device cpu to check the script)")
    seed = args.seed if args.seed is not None else int(torch.seed() % 2**31)
    print(f"seed {seed}, device {device}")
    results = [check_backend(b.strip(), args.n, device, seed, args.spoil_tail) for b in args.backends.split(",")]
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())

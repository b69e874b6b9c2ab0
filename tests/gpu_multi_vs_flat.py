"""The multi-tensor CUDA update against the flat one on the same bytes (GPU only; not a test).

    python tests/gpu_multi_vs_flat.py [--elements 67108864] [--tensors 150 2000]

One flat fp32-EMA/bf16-param bucket of N elements, then the same N elements cut into T tensors
of random sizes (16-byte aligned), updated through the cuda backend's multi-tensor path (the piece table cached
after the first call). Median of CUDA-event timings over rounds that each touch fresh buffers
(twice the L2 in all); GB/s from 10 bytes per element (12 with --switch). The multi-tensor
path should be within 10% of the flat one (issue #12).
"""

from __future__ import annotations

import argparse
import statistics

import torch

from sema import _ext_cuda


def median_ms(run, rounds: int) -> float:
    times = []
    for i in range(rounds):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(1_000_000)  # queue work ahead so the first launch's host latency is hidden
        start.record()
        run(i)
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop))
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--elements", type=int, default=2**26)
    parser.add_argument("--tensors", type=int, nargs="+", default=[150, 2000])
    parser.add_argument("--switch", action="store_true")
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA device")
    n, copies = args.elements, 3  # 3 x 6 bytes x 64M elements: far past the L2
    bytes_moved = n * (12 if args.switch else 10)
    emas = [torch.randn(n, device="cuda") for _ in range(copies)]
    params = [torch.randn(n, device="cuda").bfloat16() for _ in range(copies)]
    flat = median_ms(
        lambda i: _ext_cuda.ema_update_(emas[i % copies], params[i % copies], 1e-3, args.switch), args.rounds
    )
    print(f"flat   {n} elements: {flat:.3f} ms, {bytes_moved / flat / 1e6:.0f} GB/s")
    generator = torch.Generator().manual_seed(0)
    for count in args.tensors:
        # cut at multiples of 64 elements: every tensor starts 16-byte aligned, as separate allocations do
        cuts = sorted({64 * c for c in torch.randint(1, n // 64, (count - 1,), generator=generator).tolist()})
        sizes = [b - a for a, b in zip([0, *cuts], [*cuts, n], strict=True)]
        lists = [(list(e.split(sizes)), list(p.split(sizes))) for e, p in zip(emas, params, strict=True)]
        for e, p in lists:  # build and cache the piece tables outside the timing
            _ext_cuda.ema_update_multi_(e, p, 1e-3, args.switch)
        multi = median_ms(
            lambda i, lists=lists: _ext_cuda.ema_update_multi_(*lists[i % copies], 1e-3, args.switch), args.rounds
        )
        print(
            f"multi  {len(sizes)} tensors: {multi:.3f} ms, {bytes_moved / multi / 1e6:.0f} GB/s, "
            f"{multi / flat:.3f}x the flat time (target <= 1.10)"
        )


if __name__ == "__main__":
    main()

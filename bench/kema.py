"""K decays in one pass against K separate EMAs (issue #14 section 2), in one run.

For each set and K: ``SwitchEMA(model, decay=(d_0, ..., d_K-1)).update()`` (one fused pass that
reads the params once: 4 + 8K bytes per element for fp32 params, 2 + 8K for bf16 params with fp32
EMAs) against K ``SwitchEMA``s of the same model (they share its buckets), each updated in turn
(12K or 10K bytes). The byte ratio bounds the speed-up: 1.2x at K=2 and 1.33x at K=4 (fp32).
Targets: K=2 at >= 1.15x and K=4 at >= 1.25x on the cpp backend.

    python bench/kema.py --sets resnet50,gpt2_124m --backend cpp --json bench/results/kema-cpu-DATE.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

import sema
from sema.param_sets import PARAM_SETS
from sema.profile import provenance

TARGETS = {2: 1.15, 4: 1.25}
DECAYS = (0.999, 0.9999, 0.99, 0.9995)


def model_of(set_name: str, dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Module()
    model.params = nn.ParameterList([nn.Parameter(torch.randn(shape).to(dtype)) for shape in PARAM_SETS[set_name]()])
    return model


def median_ms(fn, repeats: int) -> float:
    for _ in range(3):
        fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def measure(set_name: str, dtype: torch.dtype, k: int, backend: str, repeats: int) -> dict:
    decays = DECAYS[:k]
    fused_model, separate_model = model_of(set_name, dtype), model_of(set_name, dtype)
    fused = sema.SwitchEMA(fused_model, decay=decays, switch_every=None, backend=backend)
    separate = [sema.SwitchEMA(separate_model, decay=d, switch_every=None, backend=backend) for d in decays]

    def one_by_one() -> None:
        for ema in separate:
            ema.update()

    # Alternate the two forms so that drift in the machine's bandwidth hits both alike.
    fused_ms, separate_ms = [], []
    for _ in range(3):
        fused_ms.append(median_ms(fused.update, repeats))
        separate_ms.append(median_ms(one_by_one, repeats))
    f, s = statistics.median(fused_ms), statistics.median(separate_ms)
    row = {
        "set": set_name,
        "param_dtype": str(dtype).replace("torch.", ""),
        "k": k,
        "backend": backend,
        "fused_ms": round(f, 3),
        "separate_ms": round(s, 3),
        "speedup": round(s / f, 3),
        "byte_bound": round(
            (12 * k if dtype == torch.float32 else 10 * k) / ((4 if dtype == torch.float32 else 2) + 8 * k), 3
        ),
        "target": TARGETS.get(k),
    }
    verdict = (
        ""
        if row["target"] is None
        else ("  meets" if row["speedup"] >= row["target"] else "  MISSES") + f" {row['target']}x"
    )
    print(
        f"{set_name:10} {row['param_dtype']:8} K={k} {backend:6} fused {f:8.2f} ms  separate {s:8.2f} ms  "
        f"{row['speedup']:.2f}x (bytes bound {row['byte_bound']:.2f}x){verdict}"
    )
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sets", default="resnet50,gpt2_124m")
    parser.add_argument("--backend", default="cpp")
    parser.add_argument("--ks", default="2,4")
    parser.add_argument("--dtypes", default="fp32,bf16")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    ok, why = sema.available_backends("cpu").get(args.backend, (False, "unknown backend"))
    if not ok:
        print(f"bench/kema.py: backend {args.backend} is not available here: {why}", file=sys.stderr)
        return 2
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    rows = [
        measure(set_name, dtypes[d], int(k), args.backend, args.repeats)
        for set_name in args.sets.split(",")
        for d in args.dtypes.split(",")
        for k in args.ks.split(",")
    ]
    if args.json:
        result = {
            "what": __doc__.split("\n\n")[0],
            **provenance(torch.device("cpu")),  # machine, versions, date, git commit (sema.profile)
            "rows": rows,
        }
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

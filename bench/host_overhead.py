"""Host time of ``SwitchEMA.update()``: everything but the kernels (issue #12 section 3).

The backend's kernel entry points are replaced by no-ops for the timed calls, so what is left is
the Python, the placement check, the decay weight and the step counter: the part that stays on
the host when the kernels are asynchronous launches on a GPU. Targets: <= 20 us at 150 tensors and
<= 50 us at 2,000 tensors.

It uses only API that older sema versions have too, so the same script measures a checkout of an
older commit (``--label before`` with ``PYTHONPATH`` pointing at it) and the current one, and
``--merge`` puts both runs into one results file:

    PYTHONPATH=/tmp/sema-before python bench/host_overhead.py --label before --json /tmp/before.json
    python bench/host_overhead.py --label after --json /tmp/after.json
    python bench/host_overhead.py --merge /tmp/before.json /tmp/after.json --json bench/results/host_overhead.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

import sema
from sema import backends
from sema.param_sets import PARAM_SETS
from sema.profile import provenance

ENTRY_POINTS = ("ema_update_", "switch_", "swap_", "ema_update_multi_")
CASES = (  # (name, SwitchEMA options, updates made before timing)
    ("plain", {}, 0),
    ("power warmup, during", {"warmup": "power"}, 0),
    ("power warmup, settled", {"warmup": "power", "decay": 0.99}, 2_000),
    ("linear warmup, settled", {"warmup": "linear", "warmup_steps": 100}, 150),
)


@contextlib.contextmanager
def without_kernels(backend: str) -> Iterator[list[int]]:
    module = backends.module(backend)
    calls = [0]

    def skip(*args: object, **kwargs: object) -> None:
        calls[0] += 1

    saved = {name: getattr(module, name) for name in ENTRY_POINTS if hasattr(module, name)}
    try:
        for name in saved:
            setattr(module, name, skip)
        yield calls
    finally:
        for name, fn in saved.items():
            setattr(module, name, fn)


def model_of(set_name: str) -> nn.Module:
    model = nn.Module()
    model.params = nn.ParameterList([nn.Parameter(torch.zeros(shape)) for shape in PARAM_SETS[set_name]()])
    return model


def median_us(fn, repeats: int, rounds: int) -> float:
    samples = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        samples.append((time.perf_counter() - start) / repeats * 1e6)
    return statistics.median(samples)


def measure(set_name: str, backend: str, flatten: bool, repeats: int, rounds: int) -> list[dict]:
    rows = []
    for case, options, before in CASES:
        ema = sema.SwitchEMA(model_of(set_name), switch_every=None, backend=backend, flatten=flatten, **options)
        with without_kernels(backend) as calls:
            for _ in range(before):
                ema.update()
            for _ in range(20):
                ema.update()
            us = median_us(ema.update, repeats, rounds)
        if calls[0] == 0:
            raise RuntimeError("no kernel entry point was called: the time would include the kernels")
        rows.append(
            {
                "set": set_name,
                "tensors": len(PARAM_SETS[set_name]()),
                "backend": backend,
                "flatten": flatten,
                "case": case,
                "host_us": round(us, 2),
            }
        )
        print(f"{set_name:11} {rows[-1]['tensors']:5} {backend:6} flatten={flatten!s:5} {case:24} {us:9.2f} us")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sets", default="resnet50,many_small")
    parser.add_argument("--backends", default="torch,cpp")
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--label", default="current")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--merge", nargs="+", type=Path, help="combine earlier --json outputs into one file")
    args = parser.parse_args(argv)
    if args.merge:
        runs = [json.loads(p.read_text()) for p in args.merge]
        result = {"what": __doc__.split("\n\n")[0], "runs": runs}
    else:
        torch.set_num_threads(torch.get_num_threads())
        rows = []
        for set_name in args.sets.split(","):
            for backend in args.backends.split(","):
                ok, why = sema.available_backends("cpu").get(backend, (False, "unknown backend"))
                if not ok:
                    print(f"skipping {backend}: {why}")
                    continue
                for flatten in (True, False):
                    rows += measure(set_name, backend, flatten, args.repeats, args.rounds)
        result = {
            "label": args.label,
            **provenance(torch.device("cpu")),  # machine, versions, date, git commit (sema.profile)
            "rows": rows,
        }
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""PostHocEMA costs (issue #14 section 4): ``update()`` with K=2 next to two ``SwitchEMA``s, and the
time and peak memory of ``synthesize`` on a built-in parameter set (GPT-2 124M by default).

update(): one fused pass reads the params once for both EMAs, 4 + 8K bytes per element with fp32
params (2 + 8K with bf16 params) against 2 x 12 (2 x 10) for two separate SwitchEMA updates; the
table gives the achieved GB/s with those byte counts. Snapshots are off while it is timed.

synthesize(): ``--snapshots`` snapshots per EMA are written (one every update of a slowly
drifting model), then one synthesize is timed. Peak memory: on CUDA the peak allocated bytes
above those held before the call; on the CPU the peak anonymous resident memory (RssAnon,
sampled every 2 ms) above the level before it; the memory-mapped snapshot pages are page cache,
reported apart as the file-backed peak. Expect about one fp32 copy of the weights (the
accumulator) plus the output cast where params are not fp32.

    python bench/post_hoc.py --set gpt2_124m --device cuda --json bench/results/post_hoc-<device>.json
    python bench/post_hoc.py --set tiny --device cpu          # a quick check that it runs
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

import sema
from sema.param_sets import PARAM_SETS, numel
from sema.post_hoc import PostHocEMA
from sema.profile import provenance

SIGMA_RELS = (0.05, 0.10)


def model_of(set_name: str, device: str, dtype: torch.dtype) -> nn.Module:
    model = nn.Module()
    model.params = nn.ParameterList(
        [nn.Parameter(torch.randn(shape, device=device, dtype=dtype)) for shape in PARAM_SETS[set_name]()]
    )
    return model


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def median_s(fn: Callable[[], None], device: str, repeats: int, rounds: int) -> float:
    samples = []
    for _ in range(rounds):
        sync(device)
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        sync(device)
        samples.append((time.perf_counter() - start) / repeats)
    return statistics.median(samples)


def time_updates(args: argparse.Namespace, snapshot_dir: Path) -> list[dict]:
    n = numel(PARAM_SETS[args.set]())
    param_bytes = torch.tensor([], dtype=args.dtype).element_size()
    rows = []

    phema = PostHocEMA(
        model_of(args.set, args.device, args.dtype),
        SIGMA_RELS,
        snapshot_every=10**12,
        snapshot_dir=snapshot_dir,
        backend=args.backend,
    )
    model = model_of(args.set, args.device, args.dtype)
    first = sema.SwitchEMA(model, decay=0.999, switch_every=None, backend=args.backend)
    second = sema.SwitchEMA(model, decay=0.9999, switch_every=None, backend=args.backend)  # shares the buckets

    def two_switch_emas() -> None:
        first.update()
        second.update()

    for name, fn, bytes_per_element in (
        ("PostHocEMA K=2", phema.update, param_bytes + 8 * 2),
        ("2 x SwitchEMA", two_switch_emas, 2 * (param_bytes + 8)),
    ):
        for _ in range(3):
            fn()
        seconds = median_s(fn, args.device, args.repeats, args.rounds)
        rows.append(
            {
                "what": name,
                "ms": round(seconds * 1e3, 4),
                "bytes_per_element": bytes_per_element,
                "GB/s": round(n * bytes_per_element / seconds / 1e9, 2),
            }
        )
        print(f"update  {name:16} {seconds * 1e3:10.3f} ms  {rows[-1]['GB/s']:8.1f} GB/s ({bytes_per_element} B/elem)")
    return rows


def memory_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


class PeakSampler:
    """The peak of RssAnon and RssFile (kB) while it runs, sampled every 2 ms."""

    def __init__(self) -> None:
        self.peaks = {"RssAnon": 0, "RssFile": 0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for field in self.peaks:
                self.peaks[field] = max(self.peaks[field], memory_kb(field))
            time.sleep(0.002)

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def time_synthesize(args: argparse.Namespace, snapshot_dir: Path) -> dict:
    model = model_of(args.set, args.device, args.dtype)
    phema = PostHocEMA(model, SIGMA_RELS, snapshot_every=1, snapshot_dir=snapshot_dir, backend=args.backend)
    start = time.perf_counter()
    for _ in range(args.snapshots):
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(0.999)
        phema.update()
    sync(args.device)
    write_s = (time.perf_counter() - start) / (args.snapshots * len(SIGMA_RELS))
    weights_bytes = numel(PARAM_SETS[args.set]()) * 4
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    before = {"RssAnon": memory_kb("RssAnon"), "RssFile": memory_kb("RssFile")}
    held = torch.cuda.memory_allocated() if args.device.startswith("cuda") else 0
    with PeakSampler() as sampler:
        start = time.perf_counter()
        out = phema.synthesize(0.07, max_error=None)
        sync(args.device)
        seconds = time.perf_counter() - start
    row = {
        "snapshots": args.snapshots * len(SIGMA_RELS),
        "snapshot_write_s_each": round(write_s, 4),
        "synthesize_s": round(seconds, 4),
        "fp32_weights_MB": round(weights_bytes / 2**20, 1),
        "peak_anon_MB_above_before": round((sampler.peaks["RssAnon"] - before["RssAnon"]) / 1024, 1),
        "peak_file_MB_above_before": round((sampler.peaks["RssFile"] - before["RssFile"]) / 1024, 1),
    }
    if args.device.startswith("cuda"):
        row["peak_cuda_MB_above_before"] = round((torch.cuda.max_memory_allocated() - held) / 2**20, 1)
    del out
    print("synthesize " + ", ".join(f"{k}={v}" for k, v in row.items()))
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--set", default="gpt2_124m", choices=sorted(PARAM_SETS))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--snapshots", type=int, default=4, help="snapshots per EMA for synthesize")
    parser.add_argument("--snapshot-dir", type=Path, help="default: a temporary directory, removed at the end")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    args.dtype = getattr(torch, args.dtype)
    with tempfile.TemporaryDirectory(dir=args.snapshot_dir) as tmp:
        updates = time_updates(args, Path(tmp) / "update")
        synthesis = time_synthesize(args, Path(tmp) / "synthesize")
    result = {
        "what": __doc__.split("\n\n")[0],
        "set": args.set,
        **provenance(torch.device(args.device)),  # machine, versions, date, git commit (sema.profile)
        "param_dtype": str(args.dtype),
        "backend": args.backend,
        "update": updates,
        "synthesize": synthesis,
    }
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

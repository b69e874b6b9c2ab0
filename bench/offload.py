"""The EMA off the critical path (issue #17 section 4): offload (``ema_device="cpu"``) and overlap.

Three parts, each a table on stdout and a list of rows in the JSON:

- ``host`` (CPU params): host time of ``update()`` with ``ema_device="cpu"`` at 150 tensors, for a
  small and a large bucket: from the call to its return, the worker's work waited for outside the
  timing. Next to it the plain update's whole (synchronous) call and its host part alone, the
  kernels replaced by no-ops as in bench/host_overhead.py. Target: <= 50 us at any bucket size.
- ``worker`` (CPU params): time from ``update()`` to ``synchronize()`` with offload against the
  synchronous cpp update (plain ``SwitchEMA``, backend cpp) on ResNet-50 and GPT-2, for a few
  ``offload_chunk_elements``, alternated in one run. GB/s counts the plain update's bytes (fp32
  params: 4 read param + 4 read EMA + 4 write EMA = 12 per element; bf16 params: 10) for both, so
  the ratio is the time ratio; the offload's staging copy moves more bytes through the cache, and
  the chunk size decides whether they stay there. Target: offload / plain <= 1.1.
- ``train`` (CUDA; on a CPU only a tiny decoder, a check of the script): a training step of a bf16
  decoder (embedding, pre-norm blocks of causal attention and a 4x GELU MLP, untied head; about
  1.1B params at d=2048, 20 layers) with AdamW: without EMA, with the plain update, with
  ``overlap=True`` and with offload at ``update_every`` 1, 4 and 16 (both ``attach``-ed to the
  optimizer). Per step: the median of CUDA-event step times, the mean over the timed window (a
  step that waits for the worker, or an update every 16th step, shows there), the host time of the
  ``update()`` call, and GPU memory: what building the EMA allocated and the peak during the steps,
  in bytes, and the peak saved against the plain update. Moonshot target: overlap within 1% of no EMA.

    python bench/offload.py --json /tmp/offload-cpu.json                 # host + worker, about 2-4 min
    python bench/offload.py --quick                                      # a smoke run, seconds
    python bench/offload.py --parts train --json $OUT/offload.json        # on the GPU machine
    python bench/offload.py --table /tmp/offload-cpu.json                # the tables of a saved run
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import importlib.util
import inspect
import io
import json
import math
import os
import queue
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import sema
from sema.param_sets import PARAM_SETS, numel
from sema.profile import provenance

HOST_TARGET_US = 50.0
WORKER_TARGET_RATIO = 1.1
OVERLAP_TARGET_PCT = 1.0
HOST_TENSORS = 150


def _host_overhead_module():
    """bench/host_overhead.py, loaded by path (bench/ is no package): its ``without_kernels``."""
    path = Path(__file__).with_name("host_overhead.py")
    spec = importlib.util.spec_from_file_location("sema_bench_host_overhead", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def has_offload_api() -> str | None:
    """Why this sema cannot run the benchmark (no offload engine yet), or None."""
    params = inspect.signature(sema.SwitchEMA).parameters
    missing = [name for name in ("ema_device", "overlap", "offload_chunk_elements") if name not in params]
    missing += [n for n in ("attach", "wait", "synchronize", "staging_bytes") if not hasattr(sema.SwitchEMA, n)]
    if missing:
        return f"this sema's SwitchEMA lacks {', '.join(missing)} (the offload/overlap API of issue #17)"
    return None


def model_of(shapes: list[tuple[int, ...]], dtype: torch.dtype, seed: int = 0) -> nn.Module:
    generator = torch.Generator().manual_seed(seed)
    model = nn.Module()
    model.params = nn.ParameterList(
        [nn.Parameter(torch.randn(shape, generator=generator).to(dtype)) for shape in shapes]
    )
    return model


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def each_call_us(call: Callable[[], object], after: Callable[[], object] | None, samples: int) -> list[float]:
    """Microseconds of each of ``samples`` calls; ``after`` runs untimed after each."""
    out = []
    for _ in range(samples):
        start = time.perf_counter()
        call()
        out.append((time.perf_counter() - start) * 1e6)
        if after is not None:
            after()
    return out


# --- host time of update() -------------------------------------------------------------------------


def host_step(seconds: float, scratch: torch.Tensor) -> None:
    """What a training step does on the host between two updates, roughly: small torch ops (a
    GPU step's kernel launches), for ``seconds``."""
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        for _ in range(20):
            scratch.add_(1.0)


def measure_host(per_tensor: int, dtype: torch.dtype, samples: int) -> dict:
    """Host time of ``update()`` with offload, two ways:

    - ``offload_us``: called right after ``synchronize()``, i.e. right after the worker has
      streamed the whole EMA through the caches (both cores' on a 2-core host): the worst case.
      ``cold_op_us`` is what one tiny torch op costs at that same moment, for scale.
    - ``offload_in_loop_us``: in a loop with a host step (small torch ops, as long as the
      worker's pass, at least 2 ms) between updates, as in training; the step ends with an
      untimed ``synchronize()``, so that the timing holds the hand-over alone, not a wait for a
      worker slowed down by the step's own use of the cores. ``bare_handover_us``, alternated
      with it in the same loop: one ``SimpleQueue.put`` to a sleeping thread, the floor of any
      hand-over to a thread."""
    shapes = [(per_tensor,)] * HOST_TENSORS
    offload = sema.SwitchEMA(model_of(shapes, dtype), switch_every=None, ema_device="cpu")
    plain = sema.SwitchEMA(model_of(shapes, dtype), switch_every=None, backend="cpp")
    scratch = torch.zeros(1024)
    for _ in range(5):
        offload.update()
        offload.synchronize()
        plain.update()
    offload_us = each_call_us(offload.update, offload.synchronize, samples)
    cold_op_us = each_call_us(lambda: scratch.add_(1.0), lambda: (offload.update(), offload.synchronize()), samples)
    start = time.perf_counter()
    for _ in range(5):
        offload.update()
        offload.synchronize()
    step_s = max(2e-3, (time.perf_counter() - start) / 5)
    # Alternated with update() in the same loop: a bare queue hand-over to a sleeping thread, the
    # floor of any design that hands the update to a thread (a wake-up: on a VM, an IPI).
    idle: queue.SimpleQueue = queue.SimpleQueue()
    sleeper = threading.Thread(target=lambda: [None for _ in iter(idle.get, None)], daemon=True)
    sleeper.start()
    in_loop_us, handover_us = [], []
    for i in range(2 * samples):
        host_step(step_s, scratch)
        offload.synchronize()
        call = offload.update if i % 2 == 0 else functools.partial(idle.put, i)
        start = time.perf_counter()
        call()
        (in_loop_us if i % 2 == 0 else handover_us).append((time.perf_counter() - start) * 1e6)
    idle.put(None)
    sleeper.join()
    offload.synchronize()
    plain_call_us = each_call_us(plain.update, None, samples)
    with _host_overhead_module().without_kernels("cpp") as calls:
        plain_host_us = each_call_us(plain.update, None, samples)
    if calls[0] == 0:
        raise RuntimeError("the cpp kernels were not stubbed out: the plain host time would include them")
    row = {
        "tensors": HOST_TENSORS,
        "elements": HOST_TENSORS * per_tensor,
        "param_dtype": str(dtype).replace("torch.", ""),
        "offload_us": round(statistics.median(offload_us), 2),
        "offload_p90_us": round(percentile(offload_us, 0.9), 2),
        "cold_op_us": round(statistics.median(cold_op_us), 2),
        "offload_in_loop_us": round(statistics.median(in_loop_us), 2),
        "offload_in_loop_p90_us": round(percentile(in_loop_us, 0.9), 2),
        "bare_handover_us": round(statistics.median(handover_us), 2),
        "host_step_ms": round(step_s * 1e3, 2),
        "plain_call_us": round(statistics.median(plain_call_us), 2),
        "plain_host_us": round(statistics.median(plain_host_us), 2),
        "staging_bytes": offload.staging_bytes,
        "samples": samples,
        "target_us": HOST_TARGET_US,
    }
    offload.synchronize()
    return row


def print_host(rows: list[dict]) -> None:
    print(
        f"\nhost time of update() at {HOST_TENSORS} tensors, CPU params (target: offload <= {HOST_TARGET_US:.0f} us "
        "both after sync and in a loop)"
    )
    print("  after sync: called right after the worker streamed the EMA (cold caches; 'tiny op': one add_ then)")
    print("  in a loop: a host step of small torch ops (the worker's pass, >= 2 ms) between updates, as in training;")
    print("  'bare put', alternated with it: a queue put to a sleeping thread, the floor of any hand-over to a thread")
    heads = ("after sync", "p90", "tiny op", "in a loop", "p90", "bare put", "plain call", "plain host", "staging")
    print(f"{'elements':>12} {'dtype':8} " + " ".join(f"{h:>10}" for h in heads))
    for r in rows:
        in_loop = r.get("offload_in_loop_us")
        worst = max(r["offload_us"], in_loop if in_loop is not None else math.inf)
        verdict = "meets" if worst <= r["target_us"] else "MISSES"
        cells = [r["offload_us"], r["offload_p90_us"], r.get("cold_op_us"), in_loop, r.get("offload_in_loop_p90_us")]
        cells.append(r.get("bare_handover_us"))
        cells += [r["plain_call_us"], r["plain_host_us"]]
        print(
            f"{r['elements']:>12,} {r['param_dtype']:8} "
            + " ".join("         -" if c is None else f"{c:>7.1f} us" for c in cells)
            + f" {r['staging_bytes'] / 2**20:>6.1f} MiB  {verdict}"
        )


# --- worker throughput ------------------------------------------------------------------------------


def median_ms(call: Callable[[], object], repeats: int) -> float:
    call()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def measure_worker(set_name: str, dtype: torch.dtype, chunks: list[int], repeats: int, rounds: int) -> list[dict]:
    shapes = PARAM_SETS[set_name]()
    n = numel(shapes)
    nbytes = n * (12 if dtype == torch.float32 else 10)
    plain = sema.SwitchEMA(model_of(shapes, dtype), switch_every=None, backend="cpp")
    rows = []
    # CPU params: read directly (the default), then the staged pipeline CUDA params use, per chunk.
    for staging, chunk in [(None, None), *((2, c) for c in chunks)]:
        options = {} if chunk is None else {"offload_chunk_elements": chunk, "offload_staging_chunks": staging}
        offload = sema.SwitchEMA(model_of(shapes, dtype), switch_every=None, ema_device="cpu", **options)

        def offloaded(ema=offload) -> None:
            ema.update()
            ema.synchronize()

        # Alternate the two forms so that drift in the machine's bandwidth hits both alike.
        plain_ms, offload_ms = [], []
        for _ in range(rounds):
            plain_ms.append(median_ms(plain.update, repeats))
            offload_ms.append(median_ms(offloaded, repeats))
        p, o = statistics.median(plain_ms), statistics.median(offload_ms)
        rows.append(
            {
                "set": set_name,
                "tensors": len(shapes),
                "elements": n,
                "param_dtype": str(dtype).replace("torch.", ""),
                "pipeline": "direct" if chunk is None else "staged",
                "chunk_elements": chunk,
                "staging_bytes": offload.staging_bytes,
                "plain_ms": round(p, 3),
                "offload_ms": round(o, 3),
                "plain_GB/s": round(nbytes / p / 1e6, 2),
                "offload_GB/s": round(nbytes / o / 1e6, 2),
                "ratio": round(o / p, 3),
                "target_ratio": WORKER_TARGET_RATIO,
            }
        )
        offload.synchronize()
        del offload, offloaded
        gc.collect()
    return rows


def print_worker(rows: list[dict]) -> None:
    print(
        "\nworker: update() to synchronize() with offload vs the synchronous cpp update "
        f"(target: <= {WORKER_TARGET_RATIO}x)"
    )
    print(
        f"{'set':10} {'dtype':8} {'chunk':>8} {'staging':>10} {'plain':>10} {'offload':>10} {'GB/s':>14} {'ratio':>7}"
    )
    for r in rows:
        verdict = "meets" if r["ratio"] <= r["target_ratio"] else "MISSES"
        print(
            f"{r['set']:10} {r['param_dtype']:8} "
            + ("  direct " if r["chunk_elements"] is None else f"2**{int(math.log2(r['chunk_elements'])):<4}  ")
            + f"{r['staging_bytes'] / 2**20:>6.1f} MiB {r['plain_ms']:>7.2f} ms {r['offload_ms']:>7.2f} ms "
            f"{r['plain_GB/s']:>6.1f}/{r['offload_GB/s']:<6.1f} {r['ratio']:>6.2f}x  {verdict}"
        )


# --- a training step --------------------------------------------------------------------------------


class Block(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.proj = nn.Linear(d, d, bias=False)
        self.norm2 = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, 4 * d, bias=False)
        self.fc2 = nn.Linear(4 * d, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(attn.transpose(1, 2).reshape(b, t, d))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x)), approximate="tanh"))


class Decoder(nn.Module):
    """12 d^2 params per block, plus 2 * vocab * d for the embedding and the untied head."""

    def __init__(self, vocab: int, d: int, layers: int, heads: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList([Block(d, heads) for _ in range(layers)])
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


TRAIN_CONFIGS: dict[str, dict] = {  # name: SwitchEMA options (none: no EMA)
    "none": {},
    "plain": {},
    "overlap": {"overlap": True},
    "offload1": {"ema_device": "cpu", "update_every": 1},
    "offload4": {"ema_device": "cpu", "update_every": 4},
    "offload16": {"ema_device": "cpu", "update_every": 16},
}


def train_size(device: torch.device, quick: bool) -> dict[str, int]:
    """The decoder and step counts: 1.1B params on the GPU (a smaller one with --quick); on a
    CPU a tiny one, a check of the script rather than a measurement."""
    if device.type == "cuda" and not quick:
        return {"d": 2048, "layers": 20, "heads": 16, "seq": 1024, "batch": 4, "vocab": 32000, "steps": 16, "warmup": 3}
    if device.type == "cuda":
        return {"d": 512, "layers": 2, "heads": 8, "seq": 256, "batch": 2, "vocab": 8192, "steps": 16, "warmup": 1}
    if not quick:
        return {"d": 64, "layers": 2, "heads": 4, "seq": 32, "batch": 2, "vocab": 512, "steps": 16, "warmup": 3}
    return {"d": 32, "layers": 1, "heads": 2, "seq": 16, "batch": 2, "vocab": 128, "steps": 16, "warmup": 1}


class StepClock:
    """Per-step times: CUDA events on the current stream (a host stall inside a step leaves the
    GPU idle between them, so it is counted), or the host clock on a CPU."""

    def __init__(self, device: torch.device, steps: int) -> None:
        self.cuda = device.type == "cuda"
        if self.cuda:
            self.marks = [torch.cuda.Event(enable_timing=True) for _ in range(steps + 1)]
        else:
            self.marks = [0.0] * (steps + 1)

    def mark(self, i: int) -> None:
        if self.cuda:
            self.marks[i].record()
        else:
            self.marks[i] = time.perf_counter()

    def step_ms(self) -> list[float]:
        if self.cuda:
            self.marks[-1].synchronize()
            return [a.elapsed_time(b) for a, b in zip(self.marks[:-1], self.marks[1:], strict=True)]
        return [(b - a) * 1e3 for a, b in zip(self.marks[:-1], self.marks[1:], strict=True)]


def measure_train(config: str, options: dict, args: argparse.Namespace, device: torch.device) -> dict:
    """One configuration on a fresh decoder: ``config`` names it ("none": no EMA)."""
    cuda = device.type == "cuda"
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.synchronize()
    torch.manual_seed(0)
    with torch.device(device):
        model = Decoder(args.vocab, args.d, args.layers, args.heads).to(torch.bfloat16)
        tokens = torch.randint(args.vocab, (args.batch, args.seq + 1))
    inputs, targets = tokens[:, :-1], tokens[:, 1:].reshape(-1)
    allocated_before = torch.cuda.memory_allocated() if cuda else None
    ema = None
    if config != "none":
        if "ema_device" in options and args.offload_chunk:
            options = {**options, "offload_chunk_elements": args.offload_chunk}
        ema = sema.SwitchEMA(model, decay=0.999, switch_every=None, **options)
    ema_gpu_bytes = torch.cuda.memory_allocated() - allocated_before if cuda else None
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, **({"fused": True} if cuda else {"foreach": True}))
    handle = ema.attach(optimizer) if ema is not None and (options.get("overlap") or "ema_device" in options) else None
    update_host_us: list[float] = []

    def step(timed: bool) -> None:
        loss = F.cross_entropy(model(inputs).flatten(0, 1).float(), targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if ema is not None:
            start = time.perf_counter()
            ema.update()
            if timed:
                update_host_us.append((time.perf_counter() - start) * 1e6)

    # Any window of a multiple of update_every steps holds as many updates as steps that wait for
    # one (the step after an update waits for its copies): a steady-state average.
    every = options.get("update_every", 1)
    if args.steps % every:
        print(f"bench/offload.py: {args.steps} steps is no multiple of update_every={every}: {config}'s mean is skewed")
    for _ in range(max(args.warmup, every)):  # at least one update before the timed steps
        step(False)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    clock = StepClock(device, args.steps)
    clock.mark(0)
    for i in range(args.steps):
        step(True)
        clock.mark(i + 1)
    steps_ms = clock.step_ms()
    drain_start = time.perf_counter()
    if ema is not None:
        ema.synchronize()
    drain_ms = (time.perf_counter() - drain_start) * 1e3
    peak = torch.cuda.max_memory_allocated() if cuda else None
    row = {
        "config": config,
        "update_every": every if ema is not None else None,
        "attach": handle is not None,
        "params": sum(p.numel() for p in model.parameters()),
        "step_median_ms": round(statistics.median(steps_ms), 3),
        "step_mean_ms": round(statistics.fmean(steps_ms), 3),
        "update_host_us": round(statistics.median(update_host_us), 2) if update_host_us else None,
        "drain_ms": round(drain_ms, 3),
        "ema_gpu_bytes": ema_gpu_bytes,
        "peak_bytes": peak,
        "staging_bytes": ema.staging_bytes if ema is not None else 0,
        "steps": args.steps,
        "warmup": max(args.warmup, every),
    }
    if handle is not None:
        handle.remove()
    return row


def finish_train(rows: list[dict]) -> None:
    """Overhead against no EMA (on the mean step) and the peak GPU memory saved against plain."""
    base = next((r for r in rows if r["config"] == "none"), None)
    plain = next((r for r in rows if r["config"] == "plain"), None)
    for r in rows:
        r["overhead_pct"] = None if base is None else round((r["step_mean_ms"] / base["step_mean_ms"] - 1) * 100, 2)
        peaks = plain is not None and r["peak_bytes"] is not None and plain["peak_bytes"] is not None
        r["peak_saved_vs_plain_bytes"] = plain["peak_bytes"] - r["peak_bytes"] if peaks else None


def print_train(rows: list[dict], meta: dict) -> None:
    print(
        f"\ntraining step: bf16 decoder, {meta['params'] / 1e9:.2f}B params (d={meta['d']}, {meta['layers']} layers, "
        f"batch {meta['batch']} x {meta['seq']}), AdamW, {meta['device']}; mean of {meta['steps']} steps"
    )
    print(
        f"{'config':9} {'every':>5} {'median':>10} {'mean':>10} {'vs none':>8} {'update()':>10} {'drain':>9} "
        f"{'EMA on GPU':>11} {'peak':>10} {'saved':>10}"
    )

    def gib(b: int | None) -> str:
        return "-" if b is None else f"{b / 2**30:.2f} GiB"

    for r in rows:
        print(
            f"{r['config']:9} {r['update_every'] or '-':>5} "
            f"{r['step_median_ms']:>7.2f} ms {r['step_mean_ms']:>7.2f} ms "
            f"{'-' if r['overhead_pct'] is None else format(r['overhead_pct'], '+.1f') + '%':>8} "
            f"{'-' if r['update_host_us'] is None else format(r['update_host_us'], '.0f') + ' us':>10} "
            f"{r['drain_ms']:>6.1f} ms {gib(r['ema_gpu_bytes']):>11} {gib(r['peak_bytes']):>10} "
            f"{gib(r['peak_saved_vs_plain_bytes']):>10}"
        )


# --- main -----------------------------------------------------------------------------------------


def print_tables(result: dict) -> None:
    if result.get("host"):
        print_host(result["host"])
    if result.get("worker"):
        print_worker(result["worker"])
    if result.get("train"):
        print_train(result["train"], result["train_model"])


def parse_int(text: str) -> int:
    """'2**20' or '1048576'."""
    base, _, exponent = text.strip().partition("**")
    return int(base) ** int(exponent) if exponent else int(base)


def parse_ints(text: str) -> list[int]:
    return [parse_int(item) for item in text.split(",")]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", help="host,worker,train (default: host,worker; train too where CUDA is)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: small sets, few repeats, tiny decoder")
    parser.add_argument("--host-sizes", default="2**10,2**19", help=f"elements per tensor, {HOST_TENSORS} tensors")
    parser.add_argument("--host-samples", type=int, default=200)
    parser.add_argument("--sets", default="resnet50,gpt2_124m")
    parser.add_argument("--dtypes", default="fp32")
    parser.add_argument("--chunks", default="2**18,2**20,2**22", help="offload_chunk_elements to sweep")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="auto", help="the training part's device: auto, cuda or cpu")
    parser.add_argument("--d", type=int)
    parser.add_argument("--layers", type=int)
    parser.add_argument("--heads", type=int)
    parser.add_argument("--seq", type=int)
    parser.add_argument("--batch", type=int)
    parser.add_argument("--vocab", type=int)
    parser.add_argument("--steps", type=int, help="timed steps (a multiple of 16 keeps update_every=16 fair)")
    parser.add_argument("--warmup", type=int)
    parser.add_argument("--configs", help="none,plain,overlap,offload1,offload4,offload16 (default: all)")
    parser.add_argument("--offload-chunk", type=parse_int, help="offload_chunk_elements of the training part")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--text", type=Path, help="also write the tables to this file")
    parser.add_argument("--table", type=Path, help="print the tables of a saved --json run, nothing else")
    args = parser.parse_args(argv)

    if args.table:
        print_tables(json.loads(args.table.read_text()))
        return 0
    why = has_offload_api()
    if why:
        print(f"bench/offload.py: {why}", file=sys.stderr)
        return 2
    ok, reason = sema.available_backends("cpu")["cpp"]
    if not ok:
        print(f"bench/offload.py: the cpp backend is not available here: {reason}", file=sys.stderr)
        return 2
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("bench/offload.py: --device cuda, but torch sees no GPU", file=sys.stderr)
        return 2
    parts = args.parts or ("host,worker" + (",train" if device.type == "cuda" or args.quick else ""))
    parts = parts.split(",")
    unknown = set(parts) - {"host", "worker", "train"}
    if unknown:
        parser.error(f"--parts: unknown part(s) {', '.join(sorted(unknown))}; choose from host, worker, train")
    if args.quick:  # overrides the sizes of the host and worker parts
        args.host_sizes, args.host_samples = "2**10,2**14", 20
        args.sets, args.chunks, args.repeats, args.rounds = "tiny", "2**12,2**18", 3, 1
    for name, default in train_size(device, args.quick).items():
        if getattr(args, name) is None:
            setattr(args, name, default)
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}

    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    result: dict = {"what": __doc__.split("\n\n")[0], **provenance(device), "args": settings}
    result["suite_commit"] = os.environ.get("SUITE_COMMIT")  # the GPU machine's copy has no .git

    def save() -> None:  # after every part and every training config: a killed run keeps what it has
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(result, indent=1) + "\n")
        if args.text:
            tables = io.StringIO()
            with contextlib.redirect_stdout(tables):
                print_tables(result)
            args.text.write_text(tables.getvalue().lstrip("\n"))

    if "host" in parts:
        result["host"] = []
        for d in args.dtypes.split(","):
            for size in parse_ints(args.host_sizes):
                result["host"].append(measure_host(size, dtypes[d], args.host_samples))
                save()
        print_host(result["host"])
    if "worker" in parts:
        result["worker"] = []
        for set_name in args.sets.split(","):
            for d in args.dtypes.split(","):
                result["worker"] += measure_worker(
                    set_name, dtypes[d], parse_ints(args.chunks), args.repeats, args.rounds
                )
                save()
        print_worker(result["worker"])
    if "train" in parts:
        wanted = (args.configs or ",".join(TRAIN_CONFIGS)).split(",")
        bad = [w for w in wanted if w not in TRAIN_CONFIGS]
        if bad:
            parser.error(f"--configs: unknown {', '.join(bad)}; choose from {', '.join(TRAIN_CONFIGS)}")
        result["train"] = []
        if device.type == "cpu":  # a check of the script: one torch thread, no fight with the worker's
            torch.set_num_threads(1)
        for name in wanted:
            row = measure_train(name, TRAIN_CONFIGS[name], args, device)
            result["train"].append(row)
            finish_train(result["train"])
            result["train_model"] = {
                "device": str(device),
                "params": row["params"],
                **{k: getattr(args, k) for k in ("d", "layers", "heads", "seq", "batch", "vocab", "steps")},
            }
            save()
        print_train(result["train"], result["train_model"])
    save()
    return 0


if __name__ == "__main__":
    sys.exit(main())

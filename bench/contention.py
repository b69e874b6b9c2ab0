"""``SwitchEMA.update()`` on the CPU, quiet and next to busy processes (issue #13, item 10).

A parallel region waits for its slowest thread, so when another process holds a core (a
data-loader worker, say) a region can wait a whole scheduler slice for its second thread. This
benchmark starts synthetic contenders, spin loops in separate processes, and times
``SwitchEMA.update()`` on built-in parameter sets (fp32 params, fp32 EMA, one flat bucket)
for the ``torch`` and ``cpp`` backends in three scenarios:

- ``quiet``: no contender;
- ``one_per_two_cores``: ``cpus // 2`` busy processes (one on this 2-core VM);
- ``one_per_core``: ``cpus`` busy processes.

Each backend runs twice in the same rounds: ``adaptive`` (sema's thread planner, which backs off
to one thread while parallel calls come back late) and ``all_threads`` (every call with
``torch.get_num_threads()`` threads, as sema did before the planner). Candidates are timed
round-robin; the median of the repeats is reported, with the ratio contended/quiet. Target:
with ``one_per_two_cores``, the adaptive ``update()`` costs at most 2x its quiet time on every
set and CPU backend.

Contenders are started and stopped by the benchmark (also on an error or Ctrl-C), and each
stops itself after ``--contender-seconds`` whatever happens to the parent.

    python bench/contention.py [--sets resnet50,many_small] [--repeats 21] [--out bench/results]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

import sema
from sema import _extension, param_sets
from sema.cpu_threads import PLANNER

TARGET_RATIO = 2.0
TARGET_SCENARIO = "one_per_two_cores"
MODES = ("adaptive", "all_threads")


# A busy process: pure Python arithmetic in a fresh interpreter (no torch, no OpenMP), which says
# "ready" once it spins and stops itself after argv[1] seconds.
SPIN = """
import sys, time
deadline = time.monotonic() + float(sys.argv[1])
print("ready", flush=True)
x = 0
while time.monotonic() < deadline:
    for i in range(20000):
        x ^= i
"""


@contextmanager
def contenders(count: int, seconds: float) -> Iterator[list[subprocess.Popen]]:
    """``count`` busy processes for at most ``seconds``; always stopped on exit."""
    processes: list[subprocess.Popen] = []
    try:
        for _ in range(count):
            processes.append(
                subprocess.Popen([sys.executable, "-c", SPIN, str(seconds)], stdout=subprocess.PIPE, text=True)
            )
        for process in processes:
            if process.stdout is None or process.stdout.readline().strip() != "ready":
                raise RuntimeError(f"contender {process.pid} did not start (exit code {process.poll()})")
        yield processes
    finally:
        for process in processes:
            process.kill()
        for process in processes:
            process.wait(timeout=10)
            if process.stdout is not None:
                process.stdout.close()


def scenarios(cpus: int) -> dict[str, int]:
    return {"quiet": 0, "one_per_two_cores": max(1, cpus // 2), "one_per_core": cpus}


def make_averager(shapes: list[tuple[int, ...]], backend: str, generator: torch.Generator) -> sema.SwitchEMA:
    model = nn.Module()
    model.weights = nn.ParameterList(nn.Parameter(torch.randn(shape, generator=generator)) for shape in shapes)
    return sema.SwitchEMA(model, decay=0.999, switch_every=None, backend=backend)


def timed_round(candidates: dict[tuple[str, str, str], Callable[[], None]], times: dict[Any, list[float]]) -> None:
    for key, call in candidates.items():
        start = time.perf_counter()
        call()
        times[key].append(time.perf_counter() - start)


def in_mode(mode: str, update: Callable[[], None]) -> Callable[[], None]:
    if mode == "adaptive":
        return update

    def call() -> None:
        with PLANNER.all_threads():
            update()

    return call


def measure(
    sets: list[str], backends: list[str], repeats: int, warmup: int, contender_seconds: float
) -> list[dict[str, Any]]:
    generator = torch.Generator().manual_seed(0)
    averagers = {
        (set_name, backend): make_averager(param_sets.PARAM_SETS[set_name](), backend, generator)
        for set_name in sets
        for backend in backends
    }
    candidates = {
        (set_name, backend, mode): in_mode(mode, averager.update)
        for (set_name, backend), averager in averagers.items()
        for mode in MODES
    }
    rows = []
    cpus = os.cpu_count() or 1
    for scenario, count in scenarios(cpus).items():
        times: dict[Any, list[float]] = {key: [] for key in candidates}
        started = time.monotonic()
        with contenders(count, contender_seconds) as processes:
            for _ in range(warmup):
                for call in candidates.values():
                    call()
            stats_before = dict(PLANNER.stats)
            for _ in range(repeats):
                timed_round(candidates, times)
            stats = {k: PLANNER.stats[k] - stats_before[k] for k in stats_before}
            alive = all(process.poll() is None for process in processes)
        if not alive:
            raise RuntimeError(
                f"a contender of scenario {scenario!r} stopped before the measurement ended "
                f"({time.monotonic() - started:.0f} s); raise --contender-seconds"
            )
        for (set_name, backend, mode), samples in times.items():
            shapes = param_sets.PARAM_SETS[set_name]()
            q1, _, q3 = statistics.quantiles(samples, n=4) if len(samples) > 1 else (samples[0],) * 3
            rows.append(
                {
                    "param_set": set_name,
                    "tensors": len(shapes),
                    "elements": param_sets.numel(shapes),
                    "backend": backend,
                    "mode": mode,
                    "scenario": scenario,
                    "contenders": count,
                    "median_ms": statistics.median(samples) * 1e3,
                    "q1_ms": q1 * 1e3,
                    "q3_ms": q3 * 1e3,
                    "min_ms": min(samples) * 1e3,
                    "repeats": len(samples),
                    "planner_calls_in_scenario": stats,
                }
            )
        print(f"{scenario}: {count} contender(s), {time.monotonic() - started:.1f} s", file=sys.stderr)
    quiet = {(r["param_set"], r["backend"], r["mode"]): r["median_ms"] for r in rows if r["scenario"] == "quiet"}
    for row in rows:
        row["ratio_to_quiet"] = row["median_ms"] / quiet[(row["param_set"], row["backend"], row["mode"])]
    return rows


def verdicts(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for row in rows:
        if row["scenario"] == TARGET_SCENARIO and row["mode"] == "adaptive":
            out.append(
                {
                    "target": f"update() with {TARGET_SCENARIO} <= {TARGET_RATIO}x quiet",
                    "param_set": row["param_set"],
                    "backend": row["backend"],
                    "ratio": round(row["ratio_to_quiet"], 2),
                    "met": row["ratio_to_quiet"] <= TARGET_RATIO,
                }
            )
    return out


def _git(*args: str) -> str | None:
    try:
        result = subprocess.run(["git", *args], capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip()


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def provenance(note: str | None) -> dict[str, Any]:
    commit = _git("rev-parse", "HEAD")
    dirty = _git("status", "--porcelain", "--untracked-files=no") if commit else None
    info: dict[str, Any] = {
        "device": cpu_model(),
        "device_type": "cpu",
        "logical_cpus": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "sema": sema.__version__,
        "python": platform.python_version(),
        "extension": _extension.build_info() or {"missing": _extension.load_error},
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": commit,
        "git_dirty": None if dirty is None else bool(dirty),
        "load_average_at_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }
    if note:
        info["note"] = note
    return info


def table(rows: list[dict[str, Any]]) -> str:
    header = f"{'set':<11} {'backend':<7} {'mode':<11} {'scenario':<18} {'median ms':>10} {'x quiet':>8}"
    lines = [header, "-" * len(header)]
    for row in rows:
        lines.append(
            f"{row['param_set']:<11} {row['backend']:<7} {row['mode']:<11} {row['scenario']:<18} "
            f"{row['median_ms']:>10.2f} {row['ratio_to_quiet']:>8.2f}"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sets", default="resnet50,many_small", help="comma-separated sema.param_sets names")
    parser.add_argument("--backends", default="torch,cpp", help="comma-separated CPU backends")
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--contender-seconds", type=float, default=600.0, help="each contender stops itself then")
    parser.add_argument("--out", default="bench/results", help="folder for the JSON ('' writes none)")
    parser.add_argument("--note", default=None, help="a line about the machine's state, kept in the JSON")
    args = parser.parse_args(argv)
    args.sets = [s for s in args.sets.split(",") if s]
    args.backends = [b for b in args.backends.split(",") if b]
    for name in args.sets:
        if name not in param_sets.PARAM_SETS:
            parser.error(f"unknown set {name!r}; choose from {', '.join(param_sets.PARAM_SETS)}")
    available = sema.available_backends("cpu")
    for backend in args.backends:
        if backend not in ("torch", "cpp"):
            parser.error(f"unknown CPU backend {backend!r}; choose from torch, cpp")
        if not available[backend][0]:
            parser.error(f"backend {backend!r} is unavailable: {available[backend][1]}")
    if args.repeats < 1 or args.warmup < 0:
        parser.error("--repeats must be >= 1 and --warmup >= 0")
    if args.contender_seconds <= 0:
        parser.error("--contender-seconds must be > 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    info = provenance(args.note)
    rows = measure(args.sets, args.backends, args.repeats, args.warmup, args.contender_seconds)
    result = {
        "provenance": info,
        "settings": {
            "repeats": args.repeats,
            "warmup_rounds": args.warmup,
            "param_dtype": "fp32",
            "ema_dtype": "fp32",
            "scenarios": scenarios(os.cpu_count() or 1),
            "contender": "a fresh Python interpreter (no torch) running a spin loop",
            "timing": "time.perf_counter around each SwitchEMA.update(); candidates round-robin; median",
            "modes": {
                "adaptive": "sema.cpu_threads.PLANNER decides the thread count (the default)",
                "all_threads": "every call with torch.get_num_threads() threads, as before the planner",
            },
        },
        "rows": rows,
        "verdicts": verdicts(rows),
    }
    print(table(rows))
    for verdict in result["verdicts"]:
        status = "met" if verdict["met"] else "NOT met"
        print(f"target {verdict['target']}: {verdict['param_set']} {verdict['backend']} {verdict['ratio']}x, {status}")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
        path = out / f"contention-cpu-{torch.get_num_threads()}threads-{stamp}.json"
        path.write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

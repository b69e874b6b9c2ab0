"""The ``sema-bench`` command line."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from sema.param_sets import MODEL_SETS, PARAM_SETS, describe
from sema.profile import profile_sets
from sema.profile.candidates import OPS, parse_pairs
from sema.profile.report import format_table, pyplot, write_csv, write_json, write_plot


def _parser() -> argparse.ArgumentParser:
    sets = "\n".join(f"  {describe(name)}" for name in PARAM_SETS)
    parser = argparse.ArgumentParser(
        prog="sema-bench",
        description="Bandwidth profile of sema's EMA ops: every available backend x op x dtype pair, median "
        "time, GB/s from DESIGN.md's byte counts, %% of a same-run copy_ of the same bytes, and the host time "
        "of SwitchEMA.update().",
        epilog=f"parameter sets (shapes only, nothing downloaded):\n{sets}\n\n"
        "Python API: sema.profile.profile_module(model) profiles any nn.Module's parameter shapes.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--set",
        default="resnet50",
        help="parameter set(s), comma separated, or 'all' (every set but 'tiny'; sets that do not fit in "
        "memory are skipped with the reason). Default: resnet50",
    )
    parser.add_argument(
        "--dtypes",
        default="fp32,bf16",
        help="(param, EMA) dtype pairs, comma separated: PARAM (fp32 EMA) or PARAM:EMA, e.g. "
        "'fp32,bf16,bf16:bf16', or 'all'. Default: fp32,bf16",
    )
    parser.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda when present)")
    parser.add_argument("--backends", default=None, help="comma separated (default: every available backend)")
    parser.add_argument("--ops", default=",".join(OPS), help=f"comma separated, from {','.join(OPS)}")
    parser.add_argument("--no-switch-ema", action="store_true", help="skip the SwitchEMA.update() rows")
    parser.add_argument(
        "--repeats", type=int, default=None, help="timed calls per candidate (default: 15 on CPU, 100 on CUDA)"
    )
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds first (default: 2)")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads (torch.set_num_threads; the cpp backend shares torch's OpenMP pool). On a machine shared "
        "with other jobs, 1 thread gives far steadier numbers: a parallel region waits for every one of its threads",
    )
    parser.add_argument("--json", type=Path, default=None, help="write rows + provenance as JSON here")
    parser.add_argument("--csv", type=Path, default=None, help="write rows (with provenance columns) as CSV here")
    parser.add_argument("--plot", type=Path, default=None, help="write a PNG bar chart here (needs matplotlib)")
    parser.add_argument("--note", default=None, help="free text kept in the provenance (e.g. 'shared machine')")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    return parser


def main(argv: list[str] | None = None) -> int:
    """The ``sema-bench`` command. Returns the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    set_names = list(MODEL_SETS) if args.set.strip() == "all" else [s.strip() for s in args.set.split(",") if s]
    unknown = [s for s in set_names if s not in PARAM_SETS]
    if unknown or not set_names:
        parser.error(f"unknown parameter set(s) {unknown}; choose from {', '.join(PARAM_SETS)} or 'all'")
    try:
        pairs = parse_pairs(args.dtypes)
    except ValueError as exc:
        parser.error(str(exc))
    if args.repeats is not None and args.repeats < 1:
        parser.error("--repeats must be >= 1")
    if args.warmup < 0:
        parser.error("--warmup must be >= 0")
    if args.threads is not None:
        if args.threads < 1:
            parser.error("--threads must be >= 1")
        torch.set_num_threads(args.threads)
    if args.plot is not None:
        try:
            pyplot()
        except ImportError as exc:
            parser.error(f"--plot: {exc}")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch.cuda.is_available() is False here")
    options = {
        "backends": [b.strip() for b in args.backends.split(",") if b.strip()] if args.backends else None,
        "op_names": [o.strip() for o in args.ops.split(",") if o.strip()],
        "repeats": args.repeats,
        "warmup": args.warmup,
        "switch_ema": not args.no_switch_ema,
        "progress": not args.no_progress,
    }
    try:
        result = profile_sets(set_names, pairs, device, **options)
    except ValueError as exc:
        parser.error(str(exc))
    if args.note:
        result["provenance"]["note"] = args.note
    prov = result["provenance"]
    print(
        f"sema {prov['sema']} | torch {prov['torch']} | {prov['device']} ({prov['threads']} threads) | "
        f"commit {(prov['git_commit'] or 'n/a')[:10]}{' (dirty)' if prov['git_dirty'] else ''} | {prov['date']}"
    )
    for set_name, info in result["param_sets"].items():
        print(f"{set_name}: {info['tensors']} tensors, {info['elements'] / 1e6:.2f}M elements")
    print(format_table(result))
    if not result["rows"]:
        print("sema-bench: nothing was measured: every requested set was skipped (reasons above)", file=sys.stderr)
        return 1
    for path, writer in ((args.json, write_json), (args.csv, write_csv), (args.plot, write_plot)):
        if path is not None:
            writer(result, path)
            print(f"wrote {path}")
    return 0

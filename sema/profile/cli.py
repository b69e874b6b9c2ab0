"""The ``sema-bench`` command line. Every bad flag or value ends in one line on stderr that names
the problem and the fix, and exit status 2, before anything is measured or written; a run in
which some candidate failed writes its other rows and exits with status 1."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import torch

import sema
from sema.param_sets import MODEL_SETS, PARAM_SETS, describe
from sema.profile import profile_sets
from sema.profile.candidates import PROFILE_OPS, parse_pairs
from sema.profile.machine import available_profile_backends
from sema.profile.report import format_table, pyplot, write_csv, write_json, write_plot


class UsageError(Exception):
    """A bad flag or value; the message names it and the fix, on one line."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # argparse's own complaints (unknown option, missing value) carry no fix: point to --help.
        raise UsageError(f"{message}; run sema-bench --help for the options")


def _whole_number(flag: str, minimum: int, meaning: str) -> Callable[[str], int]:
    """An argparse type: a whole number >= ``minimum``. ``"true"``, ``"1.5"`` or ``"2e3"`` are refused
    (``int`` alone would take ``" 7"`` but also tell the user nothing about the fix)."""

    def parse(text: str) -> int:
        try:
            value = int(text.strip(), 10)
        except ValueError:
            raise UsageError(
                f"{flag} takes a whole number >= {minimum} ({meaning}), got {text!r}; e.g. {flag} {max(minimum, 1) * 5}"
            ) from None
        if value < minimum:
            raise UsageError(f"{flag} must be >= {minimum} ({meaning}), got {value}")
        return value

    return parse


def _parser() -> argparse.ArgumentParser:
    sets = "\n".join(f"  {describe(name)}" for name in PARAM_SETS)
    parser = _Parser(
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
    parser.add_argument(
        "--ops",
        default=",".join(PROFILE_OPS),
        help=f"comma separated, from {','.join(PROFILE_OPS)} (update_multi: sema.ops.ema_update_multi_ over the "
        "set's tensors as separate allocations, the FSDP2 path, with the bytes of update)",
    )
    parser.add_argument("--no-switch-ema", action="store_true", help="skip the SwitchEMA.update() rows")
    parser.add_argument(
        "--host-python",
        action="store_true",
        help="add the column host_python_ms to the SwitchEMA rows: update() on the full-size model with the "
        "backend's kernel entry points replaced by no-ops, i.e. the host work above the kernels (on the CPU the "
        "host ms column includes the kernels, which run inside the call)",
    )
    parser.add_argument(
        "--repeats",
        type=_whole_number("--repeats", 1, "timed calls per candidate"),
        default=None,
        help="timed calls per candidate (default: 15 on CPU, 100 on CUDA)",
    )
    parser.add_argument(
        "--warmup",
        type=_whole_number("--warmup", 0, "untimed rounds"),
        default=2,
        help="untimed rounds first (default: 2)",
    )
    parser.add_argument(
        "--threads",
        type=_whole_number("--threads", 1, "CPU threads"),
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


def _set_names(text: str) -> list[str]:
    if text.strip() == "all":
        return list(MODEL_SETS)
    names = list(dict.fromkeys(part.strip() for part in text.split(",") if part.strip()))
    choices = f"choose from {', '.join(PARAM_SETS)}, or 'all' alone"
    if not names:
        raise UsageError(f"--set: no parameter set given; {choices}")
    unknown = [name for name in names if name not in PARAM_SETS]
    if unknown:
        raise UsageError(f"--set: unknown parameter set(s) {', '.join(map(repr, unknown))}; {choices}")
    return names


def _device(text: str | None) -> torch.device:
    if text is None or not text.strip():
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(text.strip())
    except RuntimeError:
        raise UsageError(f"--device: {text!r} is not a device; use cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"--device {text}: sema-bench profiles cpu and cuda devices only; use cpu, cuda or cuda:N")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {text}: torch.cuda.is_available() is False here; use --device cpu")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise UsageError(
                f"--device {text}: this machine has {count} CUDA device(s); use cuda:0 to cuda:{count - 1}"
            )
    return device


def _backends(text: str | None, device: torch.device) -> list[str] | None:
    if text is None:
        return None
    names = list(dict.fromkeys(part.strip() for part in text.split(",") if part.strip()))
    runnable = available_profile_backends(device)
    if not names:
        raise UsageError(f"--backends: no backend given; choose from {', '.join(runnable)} (or leave it out for all)")
    report = sema.available_backends(device)
    for name in names:
        if name not in report:
            raise UsageError(
                f"--backends: unknown backend {name!r}; choose from {', '.join(runnable)} on {device.type}"
            )
        if name not in runnable:
            reason = report[name][1] if not report[name][0] else "the Triton interpreter is a test tool, not a backend"
            raise UsageError(
                f"--backends: {name} cannot run on {device.type} here ({reason}); choose from {', '.join(runnable)}"
            )
    return names


def _op_names(text: str) -> list[str]:
    names = list(dict.fromkeys(part.strip() for part in text.split(",") if part.strip()))
    unknown = [name for name in names if name not in PROFILE_OPS]
    if unknown:
        raise UsageError(f"--ops: unknown op(s) {', '.join(map(repr, unknown))}; choose from {', '.join(PROFILE_OPS)}")
    return names


def _check_writable(flag: str, path: Path) -> None:
    """Refuse an output path that cannot be written, before a run that might take minutes."""
    if path.is_dir():
        example = path / {"--json": "profile.json", "--csv": "profile.csv"}.get(flag, "profile.png")
        raise UsageError(f"{flag} {path}: is a directory; give a file name inside it, e.g. {example}")
    ancestor = path.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise UsageError(f"{flag} {path}: {ancestor} is a file, not a directory; choose another path")
    try:
        with tempfile.TemporaryFile(dir=ancestor):
            pass
    except OSError as exc:
        raise UsageError(
            f"{flag} {path}: cannot write in {ancestor} ({exc.strerror}); choose a writable path"
        ) from None
    if path.exists() and not os.access(path, os.W_OK):
        raise UsageError(f"{flag} {path}: the file is not writable; choose another path or make it writable")


def _validated(argv: list[str] | None) -> tuple[argparse.Namespace, dict[str, Any]]:
    """The parsed flags and the options of :func:`profile_sets`; raises UsageError."""
    args = _parser().parse_args(argv)
    set_names = _set_names(args.set)
    try:
        pairs = parse_pairs(args.dtypes)
    except ValueError as exc:
        raise UsageError(f"--dtypes: {exc}; e.g. --dtypes fp32,bf16 or --dtypes all") from None
    device = _device(args.device)
    backends = _backends(args.backends, device)
    op_names = _op_names(args.ops)
    if not op_names and args.no_switch_ema:
        raise UsageError("--ops is empty and --no-switch-ema is set: nothing to measure; name an op or drop one flag")
    outputs = {flag: path for flag, path in (("--json", args.json), ("--csv", args.csv), ("--plot", args.plot)) if path}
    for flag, path in outputs.items():
        _check_writable(flag, path)
    resolved = [path.resolve() for path in outputs.values()]
    if len(set(resolved)) < len(resolved):
        raise UsageError(f"{' and '.join(outputs)} name the same file; give each output its own path")
    if args.plot is not None:
        try:
            pyplot()
        except ImportError as exc:
            raise UsageError(f"--plot: {' '.join(str(exc).split())}") from None
    options = {
        "set_names": set_names,
        "pairs": pairs,
        "device": device,
        "backends": backends,
        "op_names": op_names,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "switch_ema": not args.no_switch_ema,
        "host_python": args.host_python,
        "progress": not args.no_progress,
    }
    return args, options


def main(argv: list[str] | None = None) -> int:
    """The ``sema-bench`` command. Returns the exit status: 0, or 1 when a row failed or nothing
    was measured; a bad flag exits with status 2 and one line on stderr."""
    try:
        args, options = _validated(argv)
    except UsageError as exc:
        print(f"sema-bench: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    def save(result: dict[str, Any], complete: bool) -> None:
        if args.note:
            result["provenance"]["note"] = args.note
        result["complete"] = complete
        if args.json is not None:
            write_json(result, args.json)
        if args.csv is not None:
            write_csv(result, args.csv)

    # Each finished dtype pair is saved at once, so a run stopped later keeps what it measured.
    result = profile_sets(on_rows=lambda partial: save(partial, complete=False), **options)
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
    save(result, complete=True)
    if args.plot is not None:
        write_plot(result, args.plot)
    for path in (args.json, args.csv, args.plot):
        if path is not None:
            print(f"wrote {path}")
    failed = [r for r in result["rows"] if r.get("error") is not None]
    if failed:
        print(
            f"sema-bench: {len(failed)} of {len(result['rows'])} rows failed (ERROR in the table; the exception is "
            "under 'error' in the JSON); the other rows are measured and saved",
            file=sys.stderr,
        )
        return 1
    return 0

"""Rerun the effectiveness study: ``python -m bench.effectiveness`` (from the repository root).

    python -m bench.effectiveness                 # E1 and E2, results in bench/effectiveness/results/
    python -m bench.effectiveness --only e1       # one experiment
    python -m bench.effectiveness --quick         # a few-second smoke run, written to a temp dir

Writes ``e1_digits.json`` / ``e2_charlm.json`` (configuration, seeds, environment, every curve and
the summaries: deterministic, so a rerun on the same machine type reproduces them exactly),
``summary.md`` (the tables printed on stdout), the PNG plots, and ``run_info.json`` (date, git
commit, wall time: what changes from run to run).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from .charlm import CharLMConfig, run_e2
from .digits import DigitsConfig, run_e1
from .report import e1_text, e2_text, write_json

RESULTS = Path(__file__).parent / "results"
FILES = {"e1": "e1_digits.json", "e2": "e2_charlm.json"}


def progress_bar(desc: str) -> Any:
    def make(total: int) -> Any:
        try:
            from tqdm import tqdm
        except ImportError:
            return _Counter(desc, total)
        return tqdm(total=total, desc=desc, unit="run", file=sys.stderr)

    return make


class _Counter:
    """Fallback progress report when tqdm is missing."""

    def __init__(self, desc: str, total: int) -> None:
        self.desc, self.total, self.done = desc, total, 0

    def update(self, n: int) -> None:
        self.done += n
        print(f"{self.desc}: {self.done}/{self.total} runs", file=sys.stderr, flush=True)

    def close(self) -> None:
        pass


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent
        )
    except OSError:
        return None
    return out.stdout.strip() or None


def quick_configs() -> tuple[DigitsConfig, CharLMConfig]:
    return (
        DigitsConfig(seeds=(0, 1), lrs=(0.2,), decays=(0.990625,), epochs=3),
        CharLMConfig(seeds=(0, 1), decays=(0.95,), epochs=2),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.effectiveness", description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=sorted(FILES), action="append", help="run only this experiment (repeatable)")
    parser.add_argument("--out", type=Path, help=f"output folder (default {RESULTS}, or a temp dir with --quick)")
    parser.add_argument("--quick", action="store_true", help="shortened configs: a smoke test of the whole pipeline")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots (no matplotlib needed)")
    args = parser.parse_args(argv)
    experiments = args.only or sorted(FILES)
    out_dir = args.out or (Path(tempfile.gettempdir()) / "sema-effectiveness-quick" if args.quick else RESULTS)
    out_dir.mkdir(parents=True, exist_ok=True)
    e1_config, e2_config = quick_configs() if args.quick else (DigitsConfig(), CharLMConfig())

    info_path = out_dir / "run_info.json"
    info = json.loads(info_path.read_text()) if info_path.exists() else {}
    texts = {}
    if (out_dir / "summary.md").exists():
        for block in (out_dir / "summary.md").read_text().split("\n## ")[1:]:
            name, _, body = block.partition("\n")
            texts[name.strip()] = body.strip()
    for name in experiments:
        start = time.perf_counter()
        bar = progress_bar(f"{name.upper()} {'digits' if name == 'e1' else 'char-LM'}")
        results = run_e1(e1_config, progress=bar) if name == "e1" else run_e2(e2_config, progress=bar)
        wall = time.perf_counter() - start
        write_json(results, out_dir / FILES[name])
        text = e1_text(results) if name == "e1" else e2_text(results)
        print(f"\n{text}\n\n{name.upper()} wall time {wall:.0f} s; wrote {out_dir / FILES[name]}", flush=True)
        texts[name.upper()] = text
        plots = []
        if not args.no_plots:
            from .plots import plot_e1, plot_e2

            plots = [str(p.name) for p in (plot_e1 if name == "e1" else plot_e2)(results, out_dir)]
        info[name] = {
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "git_commit": git_commit(),
            "wall_seconds": round(wall, 1),
            "command": "python -m bench.effectiveness " + " ".join(argv if argv is not None else sys.argv[1:]),
            "quick": args.quick,
            "config": dataclasses.asdict(e1_config if name == "e1" else e2_config),
            "environment": results["environment"],
            "plots": plots,
        }
        info_path.write_text(json.dumps(info, indent=1) + "\n")
    (out_dir / "summary.md").write_text(
        "# sema effectiveness study: summary tables\n"
        + "".join(f"\n## {name}\n\n{texts[name]}\n" for name in sorted(texts))
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

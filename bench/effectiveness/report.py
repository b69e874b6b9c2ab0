"""Summaries of the arms (mean ± 95% CI, paired differences, wins, time to the plain arm's final
score), text tables for stdout, and the JSON writer. Everything here is deterministic."""

from __future__ import annotations

import json
import platform
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy
import torch

import sema

from .arms import ARMS
from .stats import first_reaching, mean_ci, paired_difference

PAIRS = (("sema", "ema"), ("sema", "plain"), ("ema", "plain"))


def summarise_arms(curves: dict[str, list[list[float]]], higher_is_better: bool) -> dict[str, Any]:
    """``curves[arm][seed]`` = the per-epoch scores of one split. Final-epoch mean ± CI per arm;
    paired differences at the final epoch (seed by seed); epochs each arm needs to reach the plain
    arm's final score (seed by seed, and on the mean curves)."""
    final = {arm: [c[-1] for c in curves[arm]] for arm in ARMS}
    n_epochs = len(curves["plain"][0])
    mean_curves = {arm: [sum(c[e] for c in curves[arm]) / len(curves[arm]) for e in range(n_epochs)] for arm in ARMS}
    reach: dict[str, Any] = {}
    for arm in ARMS:
        per_seed = [
            first_reaching(c, plain_c[-1], higher_is_better)
            for c, plain_c in zip(curves[arm], curves["plain"], strict=True)
        ]
        reached = [e for e in per_seed if e is not None]
        reach[arm] = {
            "per_seed": per_seed,
            "reached": len(reached),
            "mean_epochs_when_reached": sum(reached) / len(reached) if reached else None,
            "on_mean_curve": first_reaching(mean_curves[arm], mean_curves["plain"][-1], higher_is_better),
        }
    return {
        "final": {arm: mean_ci(final[arm]) for arm in ARMS},
        "paired_final": {f"{a}_minus_{b}": paired_difference(final[a], final[b], higher_is_better) for a, b in PAIRS},
        "epochs_to_plain_final": reach,
        "mean_curves": mean_curves,
    }


def environment(backend: str) -> dict[str, Any]:
    """What the numbers depend on (and nothing that changes from run to run, such as the date)."""
    cpu = platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    env: dict[str, Any] = {
        "cpu": cpu,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "sema": sema.__version__,
        "sema_backend": backend,
        "deterministic_algorithms": True,
    }
    try:
        import sklearn

        env["scikit-learn"] = sklearn.__version__
    except ImportError:
        pass
    return env


def to_json(results: dict[str, Any]) -> str:
    """Strict JSON (no NaN/Inf); each list of numbers (a curve) on one line."""
    text = json.dumps(results, indent=1, allow_nan=False)
    return re.sub(r"\[\s+([^\[\]{}\"]*?)\s+\]", lambda m: "[" + " ".join(m.group(1).split()) + "]", text) + "\n"


def write_json(results: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(to_json(results))


def format_ci(stat: dict[str, Any], scale: float, digits: int) -> str:
    if stat["half_width"] is None:  # one seed: no interval
        return f"{stat['mean'] * scale:.{digits}f}"
    return f"{stat['mean'] * scale:.{digits}f} ± {stat['half_width'] * scale:.{digits}f}"


def format_wins(stat: dict[str, Any]) -> str:
    return f"{stat['wins']}/{stat['ties']}/{stat['losses']}"


def table(rows: Sequence[Sequence[str]], header: Sequence[str]) -> str:
    """A Markdown table (also readable on a terminal)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _epochs(reach: dict[str, Any]) -> str:
    mean_curve = reach["on_mean_curve"]
    return "never" if mean_curve is None else str(mean_curve)


def e1_text(results: dict[str, Any]) -> str:
    """Per-cell table, the validation-selected comparison and the grid outcome, as Markdown."""
    n = len(results["config"]["seeds"])
    rows = []
    for cell in results["cells"]:
        s = cell["summary_test"]
        f, p, r = s["final"], s["paired_final"], s["epochs_to_plain_final"]
        rows.append(
            [
                f"{cell['lr']:g}",
                f"{cell['decay']:g} ({cell['iters_per_epoch_x_1_minus_decay']:g})",
                *(format_ci(f[arm], 100, 2) for arm in ARMS),
                format_ci(p["sema_minus_ema"], 100, 2),
                format_wins(p["sema_minus_ema"]),
                format_ci(p["sema_minus_plain"], 100, 2),
                format_wins(p["sema_minus_plain"]),
                f"{_epochs(r['ema'])} / {_epochs(r['sema'])}",
            ]
        )
    header = [
        "lr",
        "decay (iters/epoch × (1−decay))",
        "plain %",
        "EMA %",
        "SEMA %",
        "SEMA − EMA (points)",
        "W/T/L",
        "SEMA − plain (points)",
        "W/T/L",
        "epochs to plain's final: EMA / SEMA",
    ]
    sel = results["selection"]
    sel_rows = [
        [
            arm,
            f"{c['lr']:g}",
            "—" if c["decay"] is None else f"{c['decay']:g}",
            format_ci(c["val"], 100, 2),
            format_ci(c["test"], 100, 2),
        ]
        for arm, c in sel["cells"].items()
    ]
    pt = sel["paired_test"]
    out = [
        f"E1 final test accuracy (mean ± 95% CI over {n} seeds; W/T/L = seeds where SEMA wins/ties/loses):",
        "",
        table(rows, header),
        "",
        f"Each arm at its best cell by validation accuracy ({sel['rule']}):",
        "",
        table(sel_rows, ["arm", "lr", "decay", "val %", "test %"]),
        "",
        table(
            [[k.replace("_minus_", " − "), format_ci(v, 100, 2), format_wins(v)] for k, v in pt.items()],
            ["paired on test (selected cells)", "points", "W/T/L"],
        ),
        "",
        "Grid outcome (cells whose paired 95% CI is above / below / around 0): "
        + "; ".join(
            f"{k.replace('_minus_', ' − ')}: {v['better']} better, {v['worse']} worse, "
            f"{v['no_detectable_difference']} no detectable difference"
            for k, v in results["outcome"]["paired_test_ci_vs_zero"].items()
        ),
    ]
    return "\n".join(out)


def e2_text(results: dict[str, Any]) -> str:
    n = len(results["config"]["seeds"])
    rows = []
    for cell in results["cells"]:
        s = cell["summary"]
        f, p, r = s["final"], s["paired_final"], s["epochs_to_plain_final"]
        rows.append(
            [
                f"{cell['decay']:g} ({cell['iters_per_epoch_x_1_minus_decay']:g})",
                *(format_ci(f[arm], 1, 4) for arm in ARMS),
                format_ci(p["sema_minus_ema"], 1, 4),
                format_wins(p["sema_minus_ema"]),
                format_ci(p["sema_minus_plain"], 1, 4),
                format_wins(p["sema_minus_plain"]),
                format_ci(p["ema_minus_plain"], 1, 4),
                f"{_epochs(r['ema'])} / {_epochs(r['sema'])}",
            ]
        )
    header = [
        "decay (iters/epoch × (1−decay))",
        "plain",
        "EMA",
        "SEMA",
        "SEMA − EMA",
        "W/T/L",
        "SEMA − plain",
        "W/T/L",
        "EMA − plain",
        "epochs to plain's final: EMA / SEMA",
    ]
    return "\n".join(
        [
            f"E2 final validation bits per character (mean ± 95% CI over {n} seeds; lower is better; "
            "W/T/L = seeds where SEMA is lower/equal/higher):",
            "",
            table(rows, header),
        ]
    )

"""The report: a progress bar while it runs, then the rows as a text table, JSON, CSV (with
provenance columns) and a PNG bar chart."""

from __future__ import annotations

import csv
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


class Progress:
    """A progress bar on stderr: tqdm when installed, else a plain counter."""

    def __init__(self, total: int, enabled: bool = True) -> None:
        self.total, self.done, self.enabled = total, 0, enabled
        self._bar, self._last, self._text = None, 0.0, ""
        if enabled:
            try:
                from tqdm.auto import tqdm
            except ImportError:
                return
            self._bar = tqdm(total=total, desc="sema-bench", unit="round", leave=False, file=sys.stderr)

    def describe(self, text: str) -> None:
        if self._bar is not None:
            self._bar.set_description(text)
        self._text = text

    def update(self, n: int = 1) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
        elif self.enabled and (time.monotonic() - self._last > 1.0 or self.done >= self.total):
            self._last = time.monotonic()
            end = "\n" if self.done >= self.total or not sys.stderr.isatty() else ""
            print(f"\rsema-bench: {self.done}/{self.total} rounds {self._text}", end=end, file=sys.stderr)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def format_table(result: dict[str, Any]) -> str:
    """The rows as a fixed-width text table; a row that failed shows its error instead of times.
    The column ``host py ms`` appears when the rows have ``host_python_ms`` (``--host-python``)."""
    python_column = any("host_python_ms" in r for r in result["rows"])
    head = (
        f"{'set':11} {'param':5} {'ema':5} {'backend':8} {'op':24} {'ms':>9} {'q1-q3 ms':>15} "
        f"{'GB/s':>7} {'% copy_':>7} {'host ms':>8}" + (f" {'host py ms':>10}" if python_column else "")
    )
    lines = [head, "-" * len(head)]
    for r in result["rows"]:
        first = f"{r['param_set'][:11]:11} {r['param_dtype']:5} {r['ema_dtype']:5} {r['backend']:8} {r['op']:24} "
        if r.get("error") is not None:
            lines.append(first + "ERROR " + " ".join(r["error"].split())[:200])
            continue
        spread = f"{r['q1_ms']:.3f}-{r['q3_ms']:.3f}"
        host = "" if r["host_ms"] is None else f"{r['host_ms']:.3f}"
        line = first + f"{r['median_ms']:9.3f} {spread:>15} {r['GB/s']:7.2f} {r['pct_of_copy']:6.0f}% {host:>8}"
        if python_column:
            python = "" if r.get("host_python_ms") is None else f"{r['host_python_ms']:.4f}"
            line += f" {python:>10}"
        lines.append(line)
    for set_name, reason in result.get("skipped", {}).items():
        lines.append(f"skipped {set_name}: {reason}")
    return "\n".join(lines)


def _replace(path: Path, write: Callable[[Any], object], newline: str | None = None) -> None:
    """Write through a temporary file and rename it over ``path``, so that a run stopped while
    writing leaves the previous complete file, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    with partial.open("w", newline=newline) as f:
        write(f)
    os.replace(partial, path)


CSV_PROVENANCE = ("device", "threads", "torch", "triton", "sema", "date", "git_commit", "note")


def write_json(result: dict[str, Any], path: Path) -> None:
    _replace(path, lambda f: f.write(json.dumps(result, indent=2) + "\n"))


def write_csv(result: dict[str, Any], path: Path) -> None:
    """One line per row, each with the provenance columns (so any CSV reader keeps them)."""
    prov = result["provenance"]
    fields = list(dict.fromkeys(key for row in result["rows"] for key in row))

    def write(f: Any) -> None:
        writer = csv.DictWriter(f, fieldnames=fields + list(CSV_PROVENANCE))
        writer.writeheader()
        for row in result["rows"]:
            writer.writerow({**row, **{key: prov.get(key) for key in CSV_PROVENANCE}})

    _replace(path, write, newline="")


def pyplot() -> Any:
    """matplotlib's pyplot on the Agg backend, or an ImportError that says how to get it."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ImportError(
            f"plotting needs matplotlib, which cannot be imported here ({exc}); "
            "install it with: pip install 'sema[bench]'  (or: pip install matplotlib)"
        ) from exc
    return plt


OP_LABELS = {
    "update": "update",
    "update_multi": "update\nmulti",
    "update_switch": "update\n+switch",
    "switch": "switch",
    "swap": "swap",
    "SwitchEMA.update": "SwitchEMA\n.update",
    "SwitchEMA.update+switch": "SwitchEMA\n.update+sw",
}


def write_plot(result: dict[str, Any], path: Path) -> None:
    """GB/s of each backend per op: one panel per (parameter set, dtype pair), the same-run
    ``copy_`` of the same bytes as a dashed line over each op."""
    plt = pyplot()
    rows = [r for r in result["rows"] if r.get("error") is None]
    if not rows:
        raise ValueError("nothing to plot: the result has no measured rows")
    sets = list(dict.fromkeys(r["param_set"] for r in rows))
    pairs = list(dict.fromkeys((r["param_dtype"], r["ema_dtype"]) for r in rows))
    backends = list(dict.fromkeys(r["backend"] for r in rows))
    colors = {b: f"C{i}" for i, b in enumerate(backends)}
    fig, axes = plt.subplots(
        len(sets), len(pairs), figsize=(4.2 * len(pairs), 3.4 * len(sets)), squeeze=False, sharey="row"
    )
    bar_width = 0.8 / len(backends)
    for (i, set_name), (j, pair) in ((a, b) for a in enumerate(sets) for b in enumerate(pairs)):
        ax = axes[i, j]
        mine = [r for r in rows if r["param_set"] == set_name and (r["param_dtype"], r["ema_dtype"]) == pair]
        op_order = list(dict.fromkeys(r["op"] for r in mine))
        for b, backend in enumerate(backends):
            offset = (b - (len(backends) - 1) / 2) * bar_width
            picked = [r for r in mine if r["backend"] == backend]
            xs = [op_order.index(r["op"]) + offset for r in picked]
            ax.bar(xs, [r["GB/s"] for r in picked], bar_width, color=colors[backend], label=backend)
        for x, op in enumerate(op_order):
            copy_gbps = next(r["copy_GB/s"] for r in mine if r["op"] == op)
            ax.hlines(copy_gbps, x - 0.45, x + 0.45, colors="black", linestyles="dashed", linewidth=1)
        ax.plot([], [], color="black", linestyle="dashed", linewidth=1, label="copy_, same bytes")
        ax.set_xticks(range(len(op_order)))
        ax.set_xticklabels([OP_LABELS.get(op, op) for op in op_order], fontsize=7)
        info = result["param_sets"].get(set_name, {})
        ax.set_title(
            f"{set_name} ({info.get('elements', 0) / 1e6:.1f}M el.), params {pair[0]}, EMA {pair[1]}", fontsize=8
        )
        if j == 0:
            ax.set_ylabel("GB/s (DESIGN.md bytes)", fontsize=8)
        ax.tick_params(axis="y", labelsize=7)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    prov = result["provenance"]
    title = (
        f"sema {prov['sema']} on {prov['device']} ({prov['threads']} threads), torch {prov['torch']}, "
        f"{prov['date'][:10]}" + (f"; {prov['note']}" if prov.get("note") else "")
    )
    fig.suptitle(title, fontsize=9)
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.05, 1, 0.97))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)

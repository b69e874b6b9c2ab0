"""The tables at the end of the GPU suite's summary.txt: bandwidth per set, dtype pair and op (one
column per backend: GB/s and % of a same-run ``copy_`` of the same bytes), and sema's speed-up
over each peer. Reads the JSON that ``sema-bench`` and ``bench/peers.py`` write; a missing or
unreadable file is named, not fatal.

    python bench/gpu/summary.py --profile profile.json profile-torch.json --peers peers.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def load_rows(paths: list[Path]) -> tuple[list[dict[str, Any]], list[str]]:
    rows, problems = [], []
    for path in paths:
        try:
            rows += json.loads(path.read_text())["rows"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            problems.append(f"{path.name}: {type(exc).__name__}: {exc}")
    return rows, problems


def bandwidth_table(rows: list[dict[str, Any]]) -> list[str]:
    """One line per (set, param:ema, op); a 'GB/s  %copy' cell per backend."""
    rows = [r for r in rows if "skipped" not in r and "GB/s" in r]
    if not rows:
        return ["bandwidth: no rows"]
    backends = list(dict.fromkeys(r["backend"] for r in rows))
    cells = {(r["param_set"], f"{r['param_dtype']}:{r['ema_dtype']}", r["op"], r["backend"]): r for r in rows}
    keys = list(dict.fromkeys(k[:3] for k in cells))
    head = f"{'set':11} {'param:ema':10} {'op':23}" + "".join(f" {b + ' GB/s %copy':>19}" for b in backends)
    lines = ["bandwidth (GB/s from the op's bytes; % of a same-run copy_ of those bytes)", head]
    for set_name, pair, op in keys:
        line = f"{set_name[:11]:11} {pair:10} {op[:23]:23}"
        for backend in backends:
            r = cells.get((set_name, pair, op, backend))
            if r is None:
                line += f" {'-':>19}"
            elif r.get("error") is not None:  # sema-bench's row for a candidate that raised
                line += f" {'ERROR':>19}"
            elif r.get("pct_of_copy") is None:
                line += f" {r['GB/s']:12.1f} {'-':>6}"
            else:
                line += f" {r['GB/s']:12.1f} {r['pct_of_copy']:5.0f}%"
        lines.append(line)
    return lines


def peers_table(rows: list[dict[str, Any]]) -> list[str]:
    measured = [r for r in rows if "skipped" not in r]
    skipped = sorted({f"{r['peer']}: {r['skipped']}" for r in rows if "skipped" in r})
    if not measured:
        return ["peers: no rows", *(f"  skipped: {s}" for s in skipped)]
    keys = list(dict.fromkeys((r["param_set"], r["param_dtype"]) for r in measured))
    names = list(dict.fromkeys(r["peer"] for r in measured))
    lines = [
        "peers: median ms / EMA dtype / sema speed-up (row ms over the sema row with the same EMA dtype)",
        f"{'peer':22}" + "".join(f" {s[:10] + '/' + d:>24}" for s, d in keys),
    ]
    for name in names:
        line = f"{name[:22]:22}"
        for s, d in keys:
            hit = [r for r in measured if (r["param_set"], r["param_dtype"], r["peer"]) == (s, d, name)]
            if hit:
                r = hit[0]
                line += f" {r['median_ms']:9.3f} {r.get('ema_dtype', '?'):>4} {r['sema_auto_speedup']:8.2f}x"
            else:
                line += f" {'-':>24}"
        lines.append(line)
    lines += [f"  skipped: {s}" for s in skipped]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", type=Path, nargs="*", default=[], help="sema-bench JSON files")
    parser.add_argument("--peers", type=Path, nargs="*", default=[], help="bench/peers.py JSON files")
    args = parser.parse_args(argv)
    lines: list[str] = []
    for paths, table in ((args.profile, bandwidth_table), (args.peers, peers_table)):
        present = [p for p in paths if p.exists()]
        if not present:
            lines.append(f"no results in {', '.join(p.name for p in paths) or '(none given)'}")
            continue
        rows, problems = load_rows(present)
        lines += table(rows) + [f"  unreadable: {p}" for p in problems] + [""]
    print("\n".join(lines).rstrip())
    return 0


if __name__ == "__main__":
    sys.exit(main())

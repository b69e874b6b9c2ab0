"""Which sema backends this build serves on a device, and why not; on ``cuda`` a missing GPU
backend, or Triton running under its interpreter, fails (exit 1): the tests after it would
otherwise skip or prove nothing.

    python bench/gpu/backends.py cuda
"""

from __future__ import annotations

import os
import sys

import sema
from sema import _extension


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    device = args[0] if args else "cuda"
    print(_extension.describe())
    rows = sema.available_backends(device)
    for name, (ok, why) in rows.items():
        print(f"{name:7} {'yes' if ok else 'no':3} {why}")
    print(f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET')!r}")
    if device != "cuda":
        return 0
    problems = [f"backend {n!r} unavailable: {rows[n][1]}" for n in ("cuda", "triton") if not rows[n][0]]
    if rows["triton"][0]:
        from sema import kernels

        if kernels._interpreted():
            problems.append("the Triton kernels run under the interpreter (TRITON_INTERPRET is on)")
    for problem in problems:
        print(f"FAIL: {problem}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())

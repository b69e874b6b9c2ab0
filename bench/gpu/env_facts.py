"""The facts that decide how to read a GPU suite run: machine, driver, toolchain, Python packages.

Imports torch but not sema (the suite runs this before sema is built). Each external tool gets
a few seconds; a missing one is reported, not fatal.

    python bench/gpu/env_facts.py [--copy env.txt]
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes.util
import datetime
import importlib.metadata
import os
import platform
import shutil
import subprocess
import sys

TOOLS = {
    "nvidia-smi": [
        "nvidia-smi",
        "--query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,clocks.mem,power.limit",
        "--format=csv",
    ],
    "nvcc": ["nvcc", "--version"],
    "ncu": ["ncu", "--version"],
    "compute-sanitizer": ["compute-sanitizer", "--version"],
    "cuobjdump": ["cuobjdump", "--version"],
    "c++": ["c++", "--version"],
}
PACKAGES = ("torch", "triton", "numpy", "pytest", "pytest-timeout", "pytest-xdist", "pybind11", "setuptools")
PACKAGES += ("matplotlib", "timm", "ema-pytorch", "torch-ema", "diffusers")


def tool_facts() -> None:
    for name, command in TOOLS.items():
        path = shutil.which(command[0])
        if path is None:
            print(f"{name}: not on PATH")
            continue
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=20)
            text = (result.stdout + result.stderr).strip().splitlines()
        except (OSError, subprocess.TimeoutExpired) as exc:
            text = [f"failed: {exc}"]
        shown = {"nvidia-smi": text, "c++": text[:1]}.get(name, text[-2:])
        print(f"{name} ({path}): " + " | ".join(line.strip() for line in shown))


def python_facts() -> None:
    print(f"python {platform.python_version()} at {sys.executable}")
    for package in PACKAGES:
        try:
            print(f"  {package} {importlib.metadata.version(package)}")
        except importlib.metadata.PackageNotFoundError:
            print(f"  {package}: not installed")
    print(f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET')!r}")
    print(f"ctypes.util.find_library('cuda') = {ctypes.util.find_library('cuda')!r}")

    import torch

    available = torch.cuda.is_available()
    print(f"torch {torch.__version__}, built for CUDA {torch.version.cuda}, cuda available: {available}")
    if available:
        props = torch.cuda.get_device_properties(0)
        print(
            f"device 0: {props.name}, sm_{props.major}{props.minor}, {props.multi_processor_count} SMs, "
            f"{props.total_memory / 2**30:.1f} GiB, L2 {getattr(props, 'L2_cache_size', 0) / 2**20:.0f} MiB"
        )
        free, total = torch.cuda.mem_get_info()
        print(f"free GPU memory: {free / 2**30:.1f} of {total / 2**30:.1f} GiB")


class Tee:
    """Writes to stdout and a file: the facts go to the log and to a file of their own."""

    def __init__(self, path: str) -> None:
        self.file = open(path, "w")
        self.stdout = sys.stdout

    def write(self, text: str) -> int:
        self.file.write(text)
        return self.stdout.write(text)

    def flush(self) -> None:
        self.file.flush()
        self.stdout.flush()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--copy", default=None, help="also write the facts to this file")
    args = parser.parse_args(argv)
    if args.copy is None:
        facts()
        return 0
    tee = Tee(args.copy)
    try:
        with contextlib.redirect_stdout(tee):
            facts()
    finally:
        tee.file.close()
    return 0


def facts() -> None:
    print(f"date (UTC): {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M:%S}")
    print(f"commit: {os.environ.get('SUITE_COMMIT') or 'unknown (set SUITE_COMMIT)'}")
    print(f"host: {platform.node()}, {platform.machine()}, {os.cpu_count()} CPUs, kernel {platform.release()}")
    tool_facts()
    python_facts()


if __name__ == "__main__":
    sys.exit(main())

"""The machine a profile runs on: its last-level cache (which sets how many buffer copies to
rotate through), the memory a parameter set needs and has, the backends that run there, and
the provenance kept with every result."""

from __future__ import annotations

import datetime
import importlib.metadata
import math
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

import torch

import sema
from sema import _extension
from sema.profile.candidates import DTYPES

MEMORY_FRACTION = 0.85  # of the memory available now; the rest is left to everything else
MAX_ROTATIONS = 64


class DoesNotFitError(RuntimeError):
    """A parameter set needs more memory than the device has available; the message says how much."""


def cache_bytes(device: torch.device) -> int:
    """Size of the last-level cache the rotating buffers must defeat: the GPU's L2, or the
    CPU's largest cache (sysfs; 32 MiB when it cannot be read)."""
    if device.type == "cuda":
        return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 << 20))
    largest = 0
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            text = (index / "size").read_text().strip().upper()
        except OSError:
            continue
        scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        digits = text.rstrip("KMG")
        if digits.isdigit():
            largest = max(largest, int(digits) * scale)
    return largest or 32 << 20


def available_memory(device: torch.device) -> int:
    """Bytes that can be allocated on ``device`` now (CUDA: free memory; CPU: MemAvailable)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def rotations_for(set_bytes: int, device: torch.device) -> int:
    """How many copies of the buffers to rotate through: together at least twice the cache."""
    return max(1, min(MAX_ROTATIONS, math.ceil(2 * cache_bytes(device) / max(set_bytes, 1))))


def memory_needed(
    n_elements: int,
    pair: tuple[str, str],
    rotations: int,
    n_backends: int,
    switch_ema: bool,
    multi_tensor: bool = False,
) -> int:
    """Peak bytes of one (set, pair) profile: per rotation the op buffers (E + P per element),
    the copy_ source and destination (E + P each), the separate tensors of the multi-tensor
    update (E + P) and one SwitchEMA model + EMA per backend; plus the fp32 temporary that
    random initialisation makes and some slack."""
    e = DTYPES[pair[1]].itemsize
    p = DTYPES[pair[0]].itemsize
    per_rotation = (e + p) * (3 + int(multi_tensor) + (n_backends if switch_ema else 0))
    return n_elements * (per_rotation * rotations + 4) + (64 << 20)


def available_profile_backends(device: torch.device) -> list[str]:
    """Backends that run on ``device``; the Triton interpreter on the CPU is a test tool, not a backend."""
    names = [name for name, (ok, _) in sema.available_backends(device).items() if ok]
    if device.type == "cpu" and "triton" in names:
        names.remove("triton")
    return names


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(
            ["git", *args], capture_output=True, text=True, cwd=Path(__file__).resolve().parent, check=False, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU model from /proc/cpuinfo."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def provenance(device: torch.device, note: str | None = None) -> dict[str, Any]:
    """Where and with what a result was measured: device, versions, extension build, date, commit."""
    device = torch.device(device)
    commit = _git("rev-parse", "HEAD")
    dirty = _git("status", "--porcelain", "--untracked-files=no") if commit else None
    info: dict[str, Any] = {
        "device": device_name(device),
        "device_type": device.type,
        "logical_cpus": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "sema": sema.__version__,
        "python": platform.python_version(),
        "extension": _extension.build_info() or {"missing": _extension.load_error},
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": commit,
        "git_dirty": None if dirty is None else bool(dirty),
        "backends": {name: reason for name, (_, reason) in sema.available_backends(device).items()},
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["cuda"] = torch.version.cuda
        info["capability"] = f"sm_{props.major}{props.minor}"
        info["memory_GB"] = round(props.total_memory / 1e9, 1)
    if note:
        info["note"] = note
    return info

"""The backend registry: which implementation of the kernel contract runs on which device.

A backend is a module that provides ``availability(device_type) -> (bool, reason)`` and the
ops ``ema_update_``, ``switch_``, ``swap_`` and ``ema_update_multi_`` with the signatures of
:mod:`sema.reference`. Modules are imported lazily, so ``import sema`` needs neither triton
nor the compiled extension.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from types import ModuleType

import torch

ENV_VAR = "SEMA_BACKEND"


@dataclass(frozen=True)
class BackendSpec:
    name: str
    module: str
    device_types: tuple[str, ...]  # () means any device
    description: str


# Order matters: ``auto`` takes the first available backend that serves the device.
_SPECS: dict[str, BackendSpec] = {
    spec.name: spec
    for spec in (
        BackendSpec(
            "triton", "sema.kernels", ("cuda", "cpu"), "Triton kernels (GPU; CPU only under TRITON_INTERPRET=1)"
        ),
        BackendSpec("cuda", "sema._ext_cuda", ("cuda",), "compiled CUDA kernels from the sema._C extension"),
        BackendSpec("cpp", "sema._ext_cpu", ("cpu",), "compiled OpenMP kernels from the sema._C extension"),
        BackendSpec("torch", "sema.reference", (), "pure PyTorch reference, any device"),
    )
}

# Backends that ``auto`` may pick per device type, best first. A backend earns its place here
# by a benchmark in bench/results/; until then it must be asked for by name.
AUTO_ORDER: dict[str, tuple[str, ...]] = {
    "cuda": ("triton", "cuda", "torch"),
    "cpu": ("cpp", "torch"),
}


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run here; the message says why."""


def names() -> tuple[str, ...]:
    return tuple(_SPECS)


def _load(name: str) -> tuple[ModuleType | None, str]:
    spec = _SPECS[name]
    try:
        return importlib.import_module(spec.module), ""
    except ImportError as exc:  # an optional dependency or the extension is missing
        return None, f"{spec.module} cannot be imported: {exc}"


def check(name: str, device_type: str) -> tuple[bool, str]:
    """Whether backend ``name`` can run ops on ``device_type`` tensors, and why (not)."""
    spec = _SPECS[name]
    if spec.device_types and device_type not in spec.device_types:
        return False, f"serves {'/'.join(spec.device_types)} tensors, not {device_type}"
    module, reason = _load(name)
    if module is None:
        return False, reason
    ok, reason = module.availability(device_type)
    if ok and name != "torch":  # no kernel has an fp64 path (sema.storage.FP64_BACKEND)
        reason += "; fp64 params are served by the torch backend"
    return ok, reason


def available_backends(device: str | torch.device | None = None) -> dict[str, tuple[bool, str]]:
    """Every backend with ``(available, reason)`` for ``device`` (default: CUDA when present,
    else CPU). A backend that is not available says why."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device_type = torch.device(device).type
    return {name: check(name, device_type) for name in _SPECS}


def resolve(requested: str | None, device: torch.device) -> str:
    """The backend name that will run on ``device``: an explicit name (checked, never silently
    replaced), or ``auto``/``None`` (``SEMA_BACKEND`` first, then the fastest available)."""
    if requested in (None, "auto"):
        requested = os.environ.get(ENV_VAR) or "auto"
        source = f"{ENV_VAR}={requested!r}"
    else:
        source = f"backend={requested!r}"
    if requested != "auto":
        if requested not in _SPECS:
            raise ValueError(f"{source}: unknown backend; choose one of {', '.join(_SPECS)} or 'auto'")
        ok, reason = check(requested, device.type)
        if not ok:
            raise BackendUnavailableError(
                f"{source} cannot run on {device.type} tensors: {reason}. "
                "Use backend='auto' or one that sema.available_backends() reports as available."
            )
        return requested
    for name in AUTO_ORDER.get(device.type, ("torch",)):
        if check(name, device.type)[0]:
            return name
    return "torch"


def module(name: str) -> ModuleType:
    mod, reason = _load(name)
    if mod is None:
        raise BackendUnavailableError(f"backend {name!r} is unavailable: {reason}")
    return mod

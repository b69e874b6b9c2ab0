"""Triton kernels for sema, installed as ``sema.kernels``: the ``triton`` backend.

Every op of the kernel contract (:mod:`sema.reference` has the signatures) in one pass over
flat buckets, the K-EMA update (K EMAs of one bucket, the params read once), and the
multi-tensor updates over a device table of pointers. Importing this
module never fails for want of triton; :func:`availability` then says why it cannot run.
"""

from __future__ import annotations

import os

import torch

try:
    import triton
except ImportError as exc:  # an optional dependency: pip install sema[triton]
    _IMPORT_ERROR = f"triton is not installed ({exc}); pip install 'sema[triton]'"
else:
    _IMPORT_ERROR = ""
    from .ema import ema_update_
    from .ema_k import ema_update_k_, ema_update_k_multi_
    from .multi import ema_update_multi_
    from .swap import swap_
    from .switch import switch_

__all__ = [
    "availability",
    "ema_update_",
    "ema_update_k_",
    "ema_update_k_multi_",
    "ema_update_multi_",
    "swap_",
    "switch_",
]

_CPU_REASON = "CPU only under TRITON_INTERPRET=1, for tests"


def _interpreted() -> bool:
    """Whether the kernels were decorated under the interpreter (it is chosen at import)."""
    from triton.runtime.interpreter import InterpretedFunction

    from .ema import _ema_update_kernel

    return isinstance(_ema_update_kernel, InterpretedFunction)


def availability(device_type: str) -> tuple[bool, str]:
    """Whether the Triton kernels can run on ``device_type`` tensors, and why (not)."""
    if _IMPORT_ERROR:
        return False, _IMPORT_ERROR
    if device_type == "cuda":
        if not torch.cuda.is_available():
            return False, "no CUDA device is available"
        if _interpreted():
            return True, f"triton {triton.__version__} under TRITON_INTERPRET=1: correct but slow"
        return True, f"triton {triton.__version__}"
    if device_type == "cpu":
        if _interpreted():
            return True, _CPU_REASON
        if os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes"):
            return False, f"{_CPU_REASON}; it was set after sema.kernels was imported, set it before"
        return False, f"{_CPU_REASON}; use the torch or cpp backend on CPU"
    return False, f"no Triton kernels for {device_type} tensors"


if _IMPORT_ERROR:

    def __getattr__(name: str):
        if name in __all__:
            raise RuntimeError(f"sema.kernels.{name} cannot run: {_IMPORT_ERROR}")
        raise AttributeError(f"module 'sema.kernels' has no attribute {name!r}")

"""The model's buffers that a ``SwitchEMA`` tracks (BatchNorm running stats and the like), by
its ``buffers=`` policy:

- ``"ignore"``: none are tracked;
- ``"copy"``: the EMA keeps a copy of each buffer as of the last update;
- ``"ema"``: float buffers are averaged with the params' weight; integer buffers
  (``num_batches_tracked``) are only copied.

Tracked buffers go into the model on a switch and inside ``swapped()``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

BUFFER_POLICIES = ("ignore", "copy", "ema")


class TrackedBuffers:
    def __init__(self, model: nn.Module, policy: str, ema_dtype: torch.dtype | None) -> None:
        if policy not in BUFFER_POLICIES:
            raise ValueError(f"SwitchEMA: buffers={policy!r} is not one of {BUFFER_POLICIES}")
        self.policy = policy
        self.names: list[str] = []
        self.buffers: list[Tensor] = []
        self.emas: list[Tensor] = []
        if policy != "ignore":
            for name, b in model.named_buffers():
                self.names.append(name)
                self.buffers.append(b)
                widen = b.is_floating_point() and ema_dtype is not None and b.dtype != torch.float64
                keep = torch.float32 if widen else b.dtype
                self.emas.append(b.detach().to(keep, copy=True))

    def update_(self, weights: dict[torch.device, Tensor]) -> None:
        if not self.buffers:
            return
        with torch.no_grad():
            for b, e in zip(self.buffers, self.emas, strict=False):
                if self.policy == "ema" and e.is_floating_point():
                    w = weights.get(b.device, next(iter(weights.values())))
                    e.lerp_(b.to(e.dtype), w.to(device=b.device, dtype=e.dtype))
                else:
                    e.copy_(b)

    def switch_(self) -> None:
        """model buffers <- tracked values."""
        with torch.no_grad():
            for b, e in zip(self.buffers, self.emas, strict=False):
                b.copy_(e)

    def swap_in(self, undo: list[Callable[[], None]]) -> None:
        """Put the tracked values into the model, appending the action that restores the
        model's own (saved by copy: buffers are small)."""
        if not self.buffers:
            return
        saved = [b.clone() for b in self.buffers]
        self.switch_()

        def restore() -> None:
            with torch.no_grad():
                for b, s in zip(self.buffers, saved, strict=False):
                    b.copy_(s)

        undo.append(restore)

    def copy_model_to_ema_(self) -> None:
        with torch.no_grad():
            for b, e in zip(self.buffers, self.emas, strict=True):
                e.copy_(b)

    def named(self) -> dict[str, Tensor]:
        return dict(zip(self.names, self.emas, strict=False))

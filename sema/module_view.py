"""The EMA as a module you can call: a copy of the model's structure whose params *are* the EMA
storage (views, no copy of the weights), for a teacher network (DINO, BYOL, mean teacher) that
runs beside the live model, or for evaluation without swapping.

- Memory: the tracked params are ``nn.Parameter`` views of the EMA buffers, so the module follows
  every ``update()`` with no sync step and costs no weight memory. Untracked params (frozen,
  excluded) are the live model's own tensors, shared.
- State: params have ``requires_grad=False`` and the module is in eval mode; running it never
  changes the live model (in eval mode, BatchNorm reads its running stats and does not update
  them).
- Dtype: the EMA's. An fp32 EMA of a bf16 model gives an fp32 module: feed it fp32 inputs, or
  run it under ``torch.autocast`` to compute in bf16.
- Buffers, by the EMA's buffer policy: ``"copy"``/``"ema"`` give the EMA's tracked buffers (views,
  following every update); ``"ignore"`` gives the live model's buffers (running stats as the live
  model has them at each call): shared, or, where the EMA's dtype differs (an fp32 EMA of a bf16
  model), cast copies refreshed from the live ones before each call.
- Do not call it inside ``ema.swapped()``: the EMA buffers hold the live weights there (equal
  dtypes) or a packed form (bf16 params), so the module raises.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from sema.switch_ema import SwitchEMA


def build_module_view(ema: SwitchEMA, index: int = 0) -> nn.Module:
    """A structural copy of ``ema.model`` whose tracked params are views of ``ema``'s EMA
    ``index``."""
    memo: dict[int, Any] = {}
    for _, param, view in ema.storage.named_emas(index):
        memo[id(param)] = nn.Parameter(view, requires_grad=False)
    for p in ema.model.parameters():
        if id(p) not in memo:
            memo[id(p)] = p  # untracked params are shared with the live model, not copied
    buffers = ema.tracked_buffers
    by_buffer = {id(b): e for b, e in zip(buffers.buffers, buffers.emas, strict=True)}
    refreshed: list[tuple[Tensor, Tensor]] = []  # (live buffer, its cast in the module)
    for b in ema.model.buffers():
        if id(b) in by_buffer:
            memo[id(b)] = by_buffer[id(b)]
        elif b.is_floating_point() and ema.ema_dtype is not None and b.dtype != ema.ema_dtype:
            memo[id(b)] = b.detach().to(ema.ema_dtype)  # the live value, refreshed before each call
            refreshed.append((b, memo[id(b)]))
        else:
            memo[id(b)] = b
    module = copy.deepcopy(ema.model, memo)
    module.requires_grad_(False)
    module.eval()

    def before_call(mod: nn.Module, args: object) -> None:
        if ema._swapped_active:
            raise RuntimeError(
                "SwitchEMA.module called inside ema.swapped(): the EMA buffers hold the swapped state there. "
                "Call it outside the with-block (inside it, the model itself holds the EMA)"
            )
        with torch.no_grad():
            for live, cast in refreshed:
                cast.copy_(live)

    module.register_forward_pre_hook(before_call)
    return module

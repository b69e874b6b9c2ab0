"""Training-framework integrations of :class:`sema.SwitchEMA`.

- :mod:`sema.integrations.lightning`: ``SwitchEMACallback`` for the Lightning ``Trainer``.
- :mod:`sema.integrations.transformers`: ``SwitchEMACallback`` for the Hugging Face ``Trainer``.

Each submodule imports its framework; this package imports neither, so ``import sema`` and
``import sema.integrations`` work without lightning or transformers installed. What lives here
is the part both callbacks share: argument checks, building (or rebuilding) the EMA at the
point where the trainer has put the model on its device, and the evaluation swap.
"""

from __future__ import annotations

import contextlib
import inspect
import logging

from torch import nn

from sema.switch_ema import SwitchEMA

VALIDATE_ON = ("ema", "live")

logger = logging.getLogger(__name__)


def check_callback_args(owner: str, validate_on: str, ema_kwargs: dict[str, object]) -> dict[str, object]:
    """Reject a bad ``validate_on`` or a keyword that :class:`SwitchEMA` does not take, when the
    callback is created (not later, inside ``fit``). Values are checked by ``SwitchEMA`` itself
    when the EMA is built, before the model is touched."""
    if validate_on not in VALIDATE_ON:
        raise ValueError(f"{owner}: validate_on={validate_on!r} is not one of {VALIDATE_ON}")
    if "model" in ema_kwargs:
        raise TypeError(f"{owner}: do not pass model=; the callback takes the model from the trainer")
    try:
        inspect.signature(SwitchEMA).bind(nn.Module(), **ema_kwargs)
    except TypeError as exc:
        accepted = ", ".join(name for name in inspect.signature(SwitchEMA).parameters if name != "model")
        raise TypeError(f"{owner}: {exc} (SwitchEMA takes: {accepted})") from None
    return dict(ema_kwargs)


def placement_intact(ema: SwitchEMA) -> bool:
    """Whether every param still lives where ``ema`` put it (no ``.to()``/``.cpu()`` since)."""
    return not any(bucket.moved() for bucket in ema.buckets) and not any(group.moved() for group in ema.tensor_groups)


def ensure_ema(ema: SwitchEMA | None, model: nn.Module, ema_kwargs: dict[str, object]) -> SwitchEMA:
    """The EMA of ``model``: ``ema`` itself when it already tracks ``model`` in place; a new one
    that carries ``ema``'s state over when the trainer moved the model since (Lightning moves it
    to the CPU after ``fit`` and back to the device for the next stage); a fresh one otherwise."""
    if ema is not None and ema.model is model and placement_intact(ema):
        return ema
    fresh = SwitchEMA(model, **ema_kwargs)
    if ema is not None and ema.model is model:
        fresh.load_state_dict(ema.state_dict())
    return fresh


class EvaluationSwap:
    """Holds :meth:`SwitchEMA.swapped` open across two trainer hooks (evaluation start and end)."""

    def __init__(self) -> None:
        self._stack: contextlib.ExitStack | None = None

    @property
    def active(self) -> bool:
        return self._stack is not None

    def begin(self, ema: SwitchEMA) -> None:
        if self._stack is not None:
            return
        stack = contextlib.ExitStack()
        stack.enter_context(ema.swapped())
        self._stack = stack

    def end(self) -> None:
        stack, self._stack = self._stack, None
        if stack is not None:
            stack.close()


def log_switch(framework: str, ema: SwitchEMA) -> None:
    """One log line per switch (logger ``sema.integrations``, INFO)."""
    logger.info(
        "%s: end of epoch %d: switched the EMA into the model (switch #%d, after %d EMA updates)",
        framework,
        ema.epochs,
        ema.num_switches,
        ema.step,
    )


__all__ = ["VALIDATE_ON", "EvaluationSwap", "check_callback_args", "ensure_ema", "log_switch", "placement_intact"]

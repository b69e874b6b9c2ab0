"""Training-framework integrations of :class:`sema.SwitchEMA`.

- :mod:`sema.integrations.lightning`: ``SwitchEMACallback`` for the Lightning ``Trainer``.
- :mod:`sema.integrations.transformers`: ``SwitchEMACallback`` for the Hugging Face ``Trainer``.

Each submodule imports its framework; this package imports neither, so ``import sema`` and
``import sema.integrations`` work without lightning or transformers installed. What lives here
is the part both callbacks share: argument checks, building (or rebuilding) the EMA at the
point where the trainer has put the model on its device, and the evaluation swap.

Which weights a stage uses (``validate_on``, and Lightning's ``test_on``, ``predict_on`` and
``checkpoint_weights``) is one string: ``"live"``, ``"ema"`` (EMA 0), or ``"ema:<k>"`` for EMA
``k`` of a callback with several decays (``decay=(0.999, 0.9999)``: ``"ema:1"`` is the 0.9999 one).
A string, so it fits YAML and command-line configs; it is checked against the number of decays
when the callback is made.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from collections.abc import Mapping

from torch import nn

from sema.switch_ema import SwitchEMA

VALIDATE_ON = ("ema", "live")
EMA_INDEX_PREFIX = "ema:"

logger = logging.getLogger(__name__)


def num_emas(decay: object) -> int:
    """How many EMAs ``SwitchEMA(decay=decay)`` keeps: one per decay of a tuple or list."""
    if isinstance(decay, (list, tuple)):
        if not decay:
            raise ValueError("decay=() holds no decay; pass a float or a tuple of floats")
        return len(decay)
    return 1


def allowed_weights(count: int) -> str:
    """The values a weights choice takes for ``count`` EMAs, as an error message lists them."""
    if count == 1:
        return "'live', 'ema' (one decay; 'ema:<k>' needs decay=(d0, d1, ...))"
    return f"'live', 'ema' (EMA 0), 'ema:0' .. 'ema:{count - 1}'"


def weights_index(owner: str, name: str, value: object, ema_kwargs: Mapping[str, object]) -> int | None:
    """``None`` for ``"live"``, else the index of the EMA that ``value`` names (``"ema"`` is
    EMA 0, ``"ema:<k>"`` EMA ``k``), checked against the decays in ``ema_kwargs``."""
    decay = ema_kwargs.get("decay", 0.999)
    try:
        count = num_emas(decay)
    except ValueError as exc:
        raise ValueError(f"{owner}: {exc}") from None
    if value == "live":
        return None
    index: int | None = None
    if value == "ema":
        index = 0
    elif isinstance(value, str) and value.startswith(EMA_INDEX_PREFIX):
        digits = value[len(EMA_INDEX_PREFIX) :]
        if digits.isascii() and digits.isdigit():
            index = int(digits)
    if index is None:
        hint = ""
        if isinstance(value, (tuple, list)) and len(value) == 2 and value[0] == "ema" and isinstance(value[1], int):
            hint = f"; to name EMA {value[1]} write {name}='ema:{value[1]}'"
        raise ValueError(f"{owner}: {name}={value!r} is not one of {allowed_weights(count)}{hint}")
    if index >= count:
        raise ValueError(
            f"{owner}: {name}={value!r} names EMA {index}, but decay={decay!r} keeps "
            f"{count} EMA{'s' if count > 1 else ''}; use one of {allowed_weights(count)}"
        )
    return index


def check_callback_args(owner: str, validate_on: str, ema_kwargs: dict[str, object]) -> dict[str, object]:
    """Reject a bad ``validate_on`` (see :func:`weights_index`) or a keyword that
    :class:`SwitchEMA` does not take, when the callback is created (not later, inside ``fit``).
    Values are checked by ``SwitchEMA`` itself when the EMA is built, before the model is touched."""
    if "model" in ema_kwargs:
        raise TypeError(f"{owner}: do not pass model=; the callback takes the model from the trainer")
    try:
        inspect.signature(SwitchEMA).bind(nn.Module(), **ema_kwargs)
    except TypeError as exc:
        accepted = ", ".join(name for name in inspect.signature(SwitchEMA).parameters if name != "model")
        raise TypeError(f"{owner}: {exc} (SwitchEMA takes: {accepted})") from None
    weights_index(owner, "validate_on", validate_on, ema_kwargs)
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

    def begin(self, ema: SwitchEMA, index: int = 0) -> None:
        if self._stack is not None:
            return
        stack = contextlib.ExitStack()
        stack.enter_context(ema.swapped(index=index))
        self._stack = stack

    def end(self) -> None:
        stack, self._stack = self._stack, None
        if stack is not None:
            stack.close()


def log_switch(framework: str, ema: SwitchEMA) -> None:
    """One log line per switch (logger ``sema.integrations``, INFO)."""
    logger.info(
        "%s: end of epoch %d: switched %s into the model (switch #%d, after %d EMA updates)",
        framework,
        "the EMA" if len(ema.decays) == 1 else f"EMA 0 (decay {ema.decays[0]})",
        ema.epochs,
        ema.num_switches,
        ema.step,
    )


__all__ = [
    "EMA_INDEX_PREFIX",
    "VALIDATE_ON",
    "EvaluationSwap",
    "allowed_weights",
    "check_callback_args",
    "ensure_ema",
    "log_switch",
    "num_emas",
    "placement_intact",
    "weights_index",
]

"""Decay schedules, evaluated on the device from a device step counter (no host sync).

``t`` is the optimizer step at which an EMA update happens (``update index * update_every``).
The decay at ``t`` is, by ``warmup``:

- ``None``: ``decay``.
- ``"constant"``: ``warmup_ratio * decay`` while ``t < warmup_steps``, then ``decay``.
- ``"linear"``: ``(1 - (1 - t / warmup_steps) * (1 - warmup_ratio)) * decay`` while
  ``t < warmup_steps``: rises from ``warmup_ratio * decay`` to ``decay`` (the SEMA authors' hook).
- ``"exp"``: ``warmup_ratio ** (1 - t / warmup_steps) * decay`` while ``t < warmup_steps``.
- ``"power"``: ``clamp(1 - (1 + t / inv_gamma) ** -power, min_decay, decay)`` (timm ModelEmaV3,
  diffusers EMAModel); the first update (``t = 0``) copies the weights.

With ``update_every = K`` the EMA is updated every K-th step with decay ``d(t) ** K``, which
compensates for the skipped steps. The op weight is ``w = 1 - d(t) ** K``, computed in float64
and handed to the kernels as float32.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

WARMUPS = (None, "linear", "exp", "constant", "power")


class DecaySchedule:
    """``weight(step)`` gives the op weight ``w = 1 - decay_t ** update_every`` as a 0-d float32
    tensor on the step's device; ``decay_at(t)`` gives the decay on the host, for tests and logs."""

    def __init__(
        self,
        decay: float,
        warmup: str | None = None,
        warmup_steps: int = 0,
        warmup_ratio: float = 0.9,
        inv_gamma: float = 1.0,
        power: float = 2.0 / 3.0,
        min_decay: float = 0.0,
        update_every: int = 1,
    ) -> None:
        _check_unit_interval("decay", decay, "e.g. decay=0.999", upper_open=True)
        if warmup not in WARMUPS:
            raise ValueError(f"warmup={warmup!r} is not one of {WARMUPS}")
        if warmup in ("linear", "exp", "constant"):
            if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps <= 0:
                raise ValueError(f"warmup={warmup!r} needs warmup_steps, a positive int (got {warmup_steps!r})")
            if isinstance(warmup_ratio, bool) or not (
                isinstance(warmup_ratio, (int, float)) and 0.0 < warmup_ratio <= 1.0
            ):
                raise ValueError(f"warmup_ratio must be in (0, 1], got {warmup_ratio!r}")
        if warmup == "power":
            for name, value in (("inv_gamma", inv_gamma), ("power", power)):
                if isinstance(value, bool) or not (
                    isinstance(value, (int, float)) and math.isfinite(value) and value > 0
                ):
                    raise ValueError(f"warmup='power' needs {name} > 0, got {value!r}")
            _check_unit_interval("min_decay", min_decay, "e.g. min_decay=0.0", upper_open=False)
            if min_decay > decay:
                raise ValueError(f"min_decay={min_decay} is above decay={decay}")
        if isinstance(update_every, bool) or not isinstance(update_every, int) or update_every < 1:
            raise ValueError(f"update_every must be a positive int, got {update_every!r}")
        self.decay = float(decay)
        self.warmup = warmup
        self.warmup_steps = int(warmup_steps)
        self.warmup_ratio = float(warmup_ratio)
        self.inv_gamma = float(inv_gamma)
        self.power = float(power)
        self.min_decay = float(min_decay)
        self.update_every = update_every
        self._constant: dict[torch.device, Tensor] = {}
        self.settled_after = self._settled_after()

    def _settled_after(self) -> int:
        """The first update index from which the weight no longer changes: past it,
        ``weight(step, settled=True)`` returns one cached tensor (no launch) instead of evaluating
        the schedule on the device (about ten tiny launches)."""
        K = self.update_every
        if self.warmup is None:
            return 0
        if self.warmup != "power":
            return -(-self.warmup_steps // K)
        if self.decay == 0.0:
            return 0
        # 1 - (1 + t / inv_gamma) ** -power >= decay from t* on; the margin keeps the device's
        # float64 rounding on the capped side, which the host check below confirms.
        try:
            t = self.inv_gamma * ((1.0 - self.decay) * (1.0 - 1e-9)) ** (-1.0 / self.power) - self.inv_gamma
        except OverflowError:
            t = math.inf
        if not t < 2.0**52:
            return 2**62  # never reached: the device formula decides every step
        n = math.ceil(max(t, 0.0) / K) + 1
        at = torch.tensor(n, dtype=torch.int64)
        if float(self._formula(at)) != float(self._formula(at + 10**6)):
            return 2**62
        return n

    def config(self) -> dict[str, object]:
        return {
            "decay": self.decay,
            "warmup": self.warmup,
            "warmup_steps": self.warmup_steps,
            "warmup_ratio": self.warmup_ratio,
            "inv_gamma": self.inv_gamma,
            "power": self.power,
            "min_decay": self.min_decay,
            "update_every": self.update_every,
        }

    def decay_at(self, t: int) -> float:
        """Decay for one optimizer step at step ``t`` (host float64; mirrors :meth:`weight`)."""
        d, T, r = self.decay, self.warmup_steps, self.warmup_ratio
        if self.warmup == "power":
            return min(max(1.0 - (1.0 + t / self.inv_gamma) ** -self.power, self.min_decay), d)
        if self.warmup is None or t >= T:
            return d
        if self.warmup == "constant":
            return r * d
        if self.warmup == "linear":
            return (1.0 - (1.0 - t / T) * (1.0 - r)) * d
        return r ** (1.0 - t / T) * d  # exp

    def weight_at(self, update_index: int) -> float:
        """The op weight of update number ``update_index`` (0-based), as float32 would hold it."""
        d = self.decay_at(update_index * self.update_every)
        return float(torch.tensor(1.0 - d**self.update_every, dtype=torch.float64).to(torch.float32))

    def weight(self, step: Tensor, settled: bool = False) -> Tensor:
        """0-d float32 weight on ``step``'s device for update number ``step`` (an int64 0-d
        tensor). Pure device arithmetic: capturable, traceable, no host read.

        ``settled=True`` promises that ``step >= settled_after`` (the caller knows a lower bound
        of the device step): the weight is then a cached tensor, the same bits the formula gives."""
        if self.warmup is None or settled:
            w = self._constant.get(step.device)
            if w is None:
                if self.warmup is None:
                    w = torch.tensor(1.0 - self.decay**self.update_every, dtype=torch.float32, device=step.device)
                else:
                    w = self._formula(torch.full_like(step, self.settled_after))
                self._constant[step.device] = w
            return w
        return self._formula(step)

    def _formula(self, step: Tensor) -> Tensor:
        t = step.to(torch.float64) * self.update_every
        d = self.decay
        if self.warmup == "power":
            decay_t = (1.0 - (1.0 + t / self.inv_gamma) ** -self.power).clamp(self.min_decay, d)
        else:
            T, r = float(self.warmup_steps), self.warmup_ratio
            if self.warmup == "constant":
                warm = torch.full_like(t, r * d)
            elif self.warmup == "linear":
                warm = (1.0 - (1.0 - t / T) * (1.0 - r)) * d
            else:
                warm = torch.pow(r, 1.0 - t / T) * d
            decay_t = torch.where(t < T, warm, torch.full_like(t, d))
        return (1.0 - decay_t**self.update_every).to(torch.float32)


def _check_unit_interval(name: str, value: object, example: str, upper_open: bool) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__} ({example})")
    bad = not (0.0 <= value < 1.0) if upper_open else not (0.0 <= value <= 1.0)
    if bad or math.isnan(value):
        bound = "[0, 1)" if upper_open else "[0, 1]"
        raise ValueError(f"{name}={value} is outside {bound} ({example})")

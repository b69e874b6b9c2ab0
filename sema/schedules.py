"""Decay schedules, evaluated on the device from a device step counter (no host sync).

The device step counts EMA updates (0-based index ``j``). The first ``copy_updates`` of them copy
the params (weight 1: ``update_after_step``); the schedule then runs on the averaging updates,
``u = j - copy_updates``, and ``t = u * update_every`` is the optimizer step of update ``u``
counted from the first averaging one. The decay at ``t`` is, by ``warmup``:

- ``None``: ``decay``.
- ``"constant"``: ``warmup_ratio * decay`` while ``t < warmup_steps``, then ``decay``.
- ``"linear"``: ``(1 - (1 - t / warmup_steps) * (1 - warmup_ratio)) * decay`` while
  ``t < warmup_steps``: rises from ``warmup_ratio * decay`` to ``decay`` (the SEMA authors' hook).
- ``"exp"``: ``warmup_ratio ** (1 - t / warmup_steps) * decay`` while ``t < warmup_steps``.
- ``"power"``: ``clamp(1 - (1 + t / inv_gamma) ** -power, min_decay, decay)`` (timm ModelEmaV3,
  diffusers EMAModel, ema-pytorch); the first averaging update (``t = 0``) copies the weights,
  whatever ``min_decay`` is, as those libraries do.
- ``"inverse"``: ``min(decay, (1 + n) / (10 + n))`` with ``n = u + 1``, the 1-based count of
  averaging updates: torch_ema's ``use_num_updates=True`` (its ``num_updates`` is incremented
  before the decay is read, so its first update uses ``n = 1``) and diffusers' ``EMAModel``
  without ``use_ema_warmup`` (its ``step = optimization_step - update_after_step - 1`` after the
  increment, with a copy while ``step <= 0``: sema's ``update_after_step = 1`` plus ``n = step``);
  floored at ``min_decay`` as diffusers does.

``min_decay`` is for the ``"power"`` and ``"inverse"`` warmups; the others refuse it.

With ``update_every = K`` the EMA is updated every K-th step. By default (``compensate=True``) its
decay is ``d(t) ** K``, which compensates for the skipped steps; with ``compensate=False`` it is
``d(t)``, as ema-pytorch, NeMo, mmengine and Lightning do, and ``t`` is the firing call's index
minus ``update_after_step`` (ema-pytorch's count: the same as ``u * K`` when K divides it). The op
weight is ``w = 1 - d(t) ** K`` (or ``1 - d(t)``), computed in float64 and handed to the kernels as
float32.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

WARMUPS = (None, "linear", "exp", "constant", "power", "inverse")


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
        copy_updates: int = 0,
        compensate: bool = True,
        start_step: int | None = None,
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
        if warmup in ("power", "inverse"):
            _check_unit_interval("min_decay", min_decay, "e.g. min_decay=0.0", upper_open=False)
            if min_decay > decay:
                raise ValueError(f"min_decay={min_decay} is above decay={decay}")
        elif min_decay != 0.0:
            raise ValueError(
                f"min_decay={min_decay!r} has no effect with warmup={warmup!r}: it is the floor of the 'power' and "
                "'inverse' warmups; leave it at 0"
            )
        if warmup == "power":
            for name, value in (("inv_gamma", inv_gamma), ("power", power)):
                if isinstance(value, bool) or not (
                    isinstance(value, (int, float)) and math.isfinite(value) and value > 0
                ):
                    raise ValueError(f"warmup='power' needs {name} > 0, got {value!r}")
        if isinstance(update_every, bool) or not isinstance(update_every, int) or update_every < 1:
            raise ValueError(f"update_every must be a positive int, got {update_every!r}")
        if isinstance(copy_updates, bool) or not isinstance(copy_updates, int) or copy_updates < 0:
            raise ValueError(f"copy_updates must be a non-negative int, got {copy_updates!r}")
        if not isinstance(compensate, bool):
            raise TypeError(f"compensate must be True or False, got {compensate!r}")
        self.decay = float(decay)
        self.warmup = warmup
        self.warmup_steps = int(warmup_steps)
        self.warmup_ratio = float(warmup_ratio)
        self.inv_gamma = float(inv_gamma)
        self.power = float(power)
        self.min_decay = float(min_decay)
        self.update_every = update_every
        self.copy_updates = copy_updates
        self.compensate = compensate
        # t of update j is j * K - start_step: copy_updates * K by default (u * K), or the
        # update_after_step calls themselves (ema-pytorch's count, for compensate=False).
        self.start_step = copy_updates * update_every if start_step is None else int(start_step)
        self._exponent = update_every if compensate else 1
        self._constant: dict[tuple[torch.device, torch.dtype], Tensor] = {}
        self._one: dict[tuple[torch.device, torch.dtype], Tensor] = {}
        self.settled_after = self._settled_after()

    def _settled_after(self) -> int:
        """The first averaging update (``u``) from which the weight no longer changes: past it,
        :meth:`weight` returns one cached tensor (no launch) instead of evaluating the schedule
        on the device (about ten tiny launches)."""
        K = self.update_every
        if self.warmup is None:
            return 0
        if self.warmup in ("linear", "exp", "constant"):
            return -(-self.warmup_steps // K)
        if self.decay == 0.0:
            return 0
        if self.warmup == "inverse":  # (1 + n) / (10 + n) >= decay from n >= (10 d - 1) / (1 - d)
            n = max(0, math.ceil((10.0 * self.decay - 1.0) / (1.0 - self.decay)))
            return self._verified_settle(max(n - 1, 0) + 1)
        # 1 - (1 + t / inv_gamma) ** -power >= decay from t* on; the margin keeps the device's
        # float64 rounding on the capped side, which the host check below confirms.
        try:
            t = self.inv_gamma * ((1.0 - self.decay) * (1.0 - 1e-9)) ** (-1.0 / self.power) - self.inv_gamma
        except OverflowError:
            t = math.inf
        if not t < 2.0**52:
            return 2**62  # never reached: the device formula decides every step
        return self._verified_settle(math.ceil(max(t, 0.0) / K) + 1)

    def _verified_settle(self, u: int) -> int:
        """``u`` if the formula is already at its final value there (checked on the host), else
        never (2**62: the device formula decides every step)."""
        at = torch.tensor(u + self.copy_updates, dtype=torch.int64)
        if float(self._formula(at)) != float(self._formula(at + 10**6)):
            return 2**62
        return u

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
            "update_after_updates": self.copy_updates,
            "compensate": self.compensate,
        }

    def decay_at(self, t: int) -> float:
        """Decay for one optimizer step at step ``t`` (host float64; mirrors :meth:`weight`)."""
        d, T, r = self.decay, self.warmup_steps, self.warmup_ratio
        if self.warmup == "power":
            if t == 0:
                return 0.0
            return min(max(1.0 - (1.0 + t / self.inv_gamma) ** -self.power, self.min_decay), d)
        if self.warmup == "inverse":
            n = t / self.update_every + 1.0
            return max(min(d, (1.0 + n) / (10.0 + n)), self.min_decay)
        if self.warmup is None or t >= T:
            return d
        if self.warmup == "constant":
            return r * d
        if self.warmup == "linear":
            return (1.0 - (1.0 - t / T) * (1.0 - r)) * d
        return r ** (1.0 - t / T) * d  # exp

    def weight_at(self, update_index: int) -> float:
        """The op weight of update number ``update_index`` (0-based, copies included), as float32
        would hold it."""
        if update_index < self.copy_updates:
            return 1.0
        d = self.decay_at(update_index * self.update_every - self.start_step)
        return float(torch.tensor(1.0 - d**self._exponent, dtype=torch.float64).to(torch.float32))

    def weight(self, step: Tensor, known_at_least: int | None = None, dtype: torch.dtype = torch.float32) -> Tensor:
        """0-d float32 weight on ``step``'s device for update number ``step`` (an int64 0-d
        tensor, copies included). Pure device arithmetic: capturable, traceable, no host read.

        ``known_at_least``: a lower bound of ``step`` that the caller knows on the host. Past the
        copies and the warmup the weight is then a cached tensor, and past the copies alone the
        copy test is left out; the bits are those of the full formula either way. ``dtype``:
        float32 (what the kernels take) or float64 (for fp64 params, whose math is fp64)."""
        N = self.copy_updates
        if known_at_least is not None and known_at_least >= N + self.settled_after:
            return self._final(step.device, dtype)
        if self.warmup is None:
            w = self._final(step.device, dtype)
        elif known_at_least is not None and known_at_least >= N:
            return self._formula(step, dtype)
        else:
            w = self._formula(step, dtype)
        if N == 0:
            return w
        return torch.where(step < N, self.one(step.device, dtype), w)

    def one(self, device: torch.device, dtype: torch.dtype = torch.float32) -> Tensor:
        """The weight of a copy, cached per device and dtype."""
        w = self._one.get((device, dtype))
        if w is None:
            w = self._one[(device, dtype)] = torch.ones((), dtype=dtype, device=device)
        return w

    def _final(self, device: torch.device, dtype: torch.dtype = torch.float32) -> Tensor:
        """The weight once the warmup is over, cached per device and dtype (the formula's bits)."""
        w = self._constant.get((device, dtype))
        if w is None:
            if self.warmup is None:
                w = torch.tensor(1.0 - self.decay**self._exponent, dtype=dtype, device=device)
            else:
                at = torch.full((), self.copy_updates + self.settled_after, dtype=torch.int64, device=device)
                w = self._formula(at, dtype)
            self._constant[(device, dtype)] = w
        return w

    def _formula(self, step: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
        """The weight of averaging update ``step - copy_updates`` (not valid for a copy)."""
        d = self.decay
        if self.warmup == "inverse":
            u = step.to(torch.float64)
            if self.copy_updates:
                u = u - self.copy_updates
            n = u + 1.0
            decay_t = ((1.0 + n) / (10.0 + n)).clamp(self.min_decay, d)
        else:
            t = step.to(torch.float64) * self.update_every
            if self.start_step:
                t = t - self.start_step
            if self.warmup == "power":
                decay_t = (1.0 - (1.0 + t / self.inv_gamma) ** -self.power).clamp(self.min_decay, d)
                if self.min_decay:  # the first averaging update copies, floor or not
                    decay_t = torch.where(t == 0, torch.zeros_like(decay_t), decay_t)
            else:
                T, r = float(self.warmup_steps), self.warmup_ratio
                if self.warmup == "constant":
                    warm = torch.full_like(t, r * d)
                elif self.warmup == "linear":
                    warm = (1.0 - (1.0 - t / T) * (1.0 - r)) * d
                else:
                    warm = torch.pow(r, 1.0 - t / T) * d
                decay_t = torch.where(t < T, warm, torch.full_like(t, d))
        return (1.0 - decay_t**self._exponent).to(dtype)


def copy_updates_of(update_after_step: int, update_every: int, compensate: bool) -> int:
    """How many EMA updates copy when the first ``update_after_step`` calls of ``update()`` copy:
    the updates among those calls. Compensated, updates fire on calls K, 2K, ... (1-based);
    otherwise on calls 1, K + 1, 2K + 1, ..."""
    if isinstance(update_every, bool) or not isinstance(update_every, int) or update_every < 1:
        return 0  # DecaySchedule refuses it, with the reason
    if compensate:
        return update_after_step // update_every
    return -(-update_after_step // update_every)


def _check_unit_interval(name: str, value: object, example: str, upper_open: bool) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__} ({example})")
    bad = not (0.0 <= value < 1.0) if upper_open else not (0.0 <= value <= 1.0)
    if bad or math.isnan(value):
        bound = "[0, 1)" if upper_open else "[0, 1]"
        raise ValueError(f"{name}={value} is outside {bound} ({example})")

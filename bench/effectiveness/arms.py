"""The three arms of the study, driven through the public ``sema.SwitchEMA`` API.

- ``plain``: the live model, evaluated after each epoch.
- ``ema``: ``SwitchEMA(switch_every=None)``, evaluated on the EMA inside ``ema.swapped()``.
- ``sema``: ``SwitchEMA(switch_every="epoch")``; ``ema.epoch_end()`` switches, then the model
  (which now *is* the EMA) is evaluated.

``plain`` and ``ema`` come from one training run per seed: an EMA without switching never feeds
back into training, so its run is the plain run (tests check that bit for bit against a run
without any ``SwitchEMA``), and ``ema - plain`` is exactly the effect of averaging. The ``sema``
run starts from the same init and sees the same batches in the same order.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Literal, Protocol

import torch
from torch import Tensor, nn

import sema

ARMS = ("plain", "ema", "sema")
RunKind = Literal["plain", "plain+ema", "sema"]
# The data order of seed s comes from its own generator, apart from the init (global RNG).
ORDER_SEED_OFFSET = 1_000_003


class Task(Protocol):
    """What an experiment supplies; the runner owns seeding, the LR schedule, the EMA and evaluation order."""

    higher_is_better: bool
    steps_per_epoch: int

    def make_model(self) -> nn.Module: ...

    def make_optimizer(self, model: nn.Module, lr: float) -> torch.optim.Optimizer: ...

    def epoch_batches(self, generator: torch.Generator) -> Iterable[Any]: ...

    def loss(self, model: nn.Module, batch: Any) -> Tensor: ...

    def evaluate(self, model: nn.Module) -> dict[str, float]: ...


EpochHook = Callable[[str, int, nn.Module, "sema.SwitchEMA | None"], None]


@contextlib.contextmanager
def deterministic(threads: int) -> Iterator[None]:
    """Fixed intra-op threads and deterministic algorithms for the block; restores both after,
    so a test process is left as it was."""
    saved_threads = torch.get_num_threads()
    saved_det = torch.are_deterministic_algorithms_enabled()
    saved_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.set_num_threads(saved_threads)
        torch.use_deterministic_algorithms(saved_det, warn_only=saved_warn)


def cosine_lr(base_lr: float, step: int, total_steps: int, warmup_steps: int = 0) -> float:
    """Linear warmup over ``warmup_steps``, then cosine from ``base_lr`` to 0 at ``total_steps``."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def model_equals_ema(ema: sema.SwitchEMA) -> float:
    """Largest |model - EMA| over all params (0.0 right after a switch of fp32 params)."""
    model_state = ema.model.state_dict()
    worst = 0.0
    for name, value in ema.averaged_state_dict().items():
        worst = max(worst, float((model_state[name].double() - value.double()).abs().max()))
    return worst


def resolved_backend(backend: str) -> str:
    """The backend ``SwitchEMA(backend=...)`` picks for CPU params here (recorded with the results)."""
    probe = sema.SwitchEMA(nn.Linear(1, 1), backend=backend)
    return probe.backends[torch.device("cpu")]


def warmup_ema_options(
    backend: str, warmup: str | None, warmup_epochs: int, warmup_ratio: float, steps_per_epoch: int
) -> dict[str, Any]:
    """The ``SwitchEMA`` options of an experiment's EMA and SEMA arms, the warmup given in epochs."""
    options: dict[str, Any] = {"backend": backend, "warmup": warmup}
    if warmup in ("linear", "exp", "constant"):
        options["warmup_steps"] = warmup_epochs * steps_per_epoch
        options["warmup_ratio"] = warmup_ratio
    return options


def train_run(
    task: Task,
    kind: RunKind,
    *,
    seed: int,
    lr: float,
    epochs: int,
    decay: float = 0.0,
    ema_options: dict[str, Any] | None = None,
    lr_warmup_steps: int = 0,
    grad_clip: float | None = None,
    on_epoch_end: EpochHook | None = None,
) -> dict[str, Any]:
    """Train one seed and evaluate the arms of ``kind`` after every epoch.

    Returns ``{"curves": {arm: {split: [score per epoch]}}, "switches": n,
    "max_abs_model_minus_ema_after_switch": x}``. ``kind="plain"`` builds no ``SwitchEMA`` at all
    (the control for the shared plain/EMA run). ``on_epoch_end(arm_kind, epoch, model, ema)`` is
    called after each epoch's evaluation (tests use it to check invariants).
    """
    torch.manual_seed(seed)
    model = task.make_model()
    ema = None
    if kind != "plain":
        ema = sema.SwitchEMA(
            model, decay=decay, switch_every="epoch" if kind == "sema" else None, **(ema_options or {})
        )
    optimizer = task.make_optimizer(model, lr)  # after SwitchEMA, as the README asks
    order = torch.Generator().manual_seed(seed + ORDER_SEED_OFFSET)
    total_steps = epochs * task.steps_per_epoch
    arms = {"plain": ("plain",), "plain+ema": ("plain", "ema"), "sema": ("sema",)}[kind]
    curves: dict[str, dict[str, list[float]]] = {arm: {} for arm in arms}
    worst_switch_gap = 0.0
    step = 0
    for epoch in range(1, epochs + 1):
        model.train()
        for batch in task.epoch_batches(order):
            for group in optimizer.param_groups:
                group["lr"] = cosine_lr(lr, step, total_steps, lr_warmup_steps)
            loss = task.loss(model, batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if grad_clip is not None:
                nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            optimizer.step()
            if ema is not None:
                ema.update()
            step += 1
        model.eval()
        scores: dict[str, dict[str, float]] = {}
        if kind == "sema":
            assert ema is not None
            with warnings.catch_warnings():  # the grid spans long horizons on purpose: that is the study
                warnings.simplefilter("ignore", sema.SwitchHorizonWarning)
                switched = ema.epoch_end()
            if not switched:
                raise RuntimeError(f"SwitchEMA did not switch at the end of epoch {epoch}")
            worst_switch_gap = max(worst_switch_gap, model_equals_ema(ema))
            scores["sema"] = task.evaluate(model)  # the model is the EMA now
        else:
            scores["plain"] = task.evaluate(model)
            if ema is not None:
                ema.epoch_end()
                with ema.swapped():
                    scores["ema"] = task.evaluate(model)
        for arm, by_split in scores.items():
            for split, value in by_split.items():
                curves[arm].setdefault(split, []).append(value)
        if on_epoch_end is not None:
            on_epoch_end(kind, epoch, model, ema)
    if step != total_steps:
        raise RuntimeError(f"task yielded {step} batches, expected {total_steps} ({task.steps_per_epoch} per epoch)")
    return {
        "curves": curves,
        "switches": 0 if ema is None else ema.num_switches,
        "max_abs_model_minus_ema_after_switch": worst_switch_gap,
    }


class GridRunner:
    """An experiment's grid: in each (lr, decay) cell, the ``plain+ema`` and ``sema`` runs of every
    seed; the switch checks are tallied over the whole grid.

    ``progress(total_runs)`` returns an object with ``update(1)`` (a tqdm bar); ``train_options``
    go to every :func:`train_run` (``lr_warmup_steps``, ``grad_clip``).
    """

    def __init__(
        self,
        task: Task,
        *,
        n_cells: int,
        seeds: tuple[int, ...],
        epochs: int,
        ema_options: dict[str, Any],
        progress: Callable[[int], Any] | None = None,
        on_epoch_end: EpochHook | None = None,
        **train_options: Any,
    ) -> None:
        self.task = task
        self.n_cells = n_cells
        self.seeds = seeds
        self.epochs = epochs
        self.ema_options = ema_options
        self.on_epoch_end = on_epoch_end
        self.train_options = train_options
        self.bar = progress(n_cells * len(seeds) * 2) if progress else None
        self.switches = 0
        self.worst_switch_gap = 0.0

    def run_cell(self, lr: float, decay: float) -> dict[str, dict[str, list[list[float]]]]:
        """Every seed's curves in one cell: ``{arm: {split: [curve per seed]}}``."""
        curves: dict[str, dict[str, list[list[float]]]] = {arm: {} for arm in ARMS}
        for seed in self.seeds:
            for kind in ("plain+ema", "sema"):
                run = train_run(
                    self.task,
                    kind,
                    seed=seed,
                    lr=lr,
                    decay=decay,
                    epochs=self.epochs,
                    ema_options=self.ema_options,
                    on_epoch_end=self.on_epoch_end,
                    **self.train_options,
                )
                for arm, by_split in run["curves"].items():
                    for split, curve in by_split.items():
                        curves[arm].setdefault(split, []).append(curve)
                self.switches += run["switches"]
                self.worst_switch_gap = max(self.worst_switch_gap, run["max_abs_model_minus_ema_after_switch"])
                if self.bar is not None:
                    self.bar.update(1)
        return curves

    def checks(self, plain_identical_across_decays: bool) -> dict[str, Any]:
        """The grid's sanity checks, as recorded with the results."""
        return {
            "sema_switches": self.switches,
            "sema_switches_expected": self.n_cells * len(self.seeds) * self.epochs,
            "max_abs_model_minus_ema_after_switch": self.worst_switch_gap,
            "plain_identical_across_decays": plain_identical_across_decays,
        }

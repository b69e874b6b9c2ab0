"""E1: image classification on scikit-learn's ``load_digits`` (8x8 handwritten digits, shipped
inside scikit-learn: nothing is downloaded).

A 2-hidden-layer MLP, SGD with momentum, a per-step cosine LR; a grid over the learning rate and
the EMA decay; the three arms of :mod:`bench.effectiveness.arms`; held-out test accuracy on a
fixed stratified split (the validation split picks each arm's best cell).
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .arms import ARMS, EpochHook, GridRunner, deterministic, resolved_backend, warmup_ema_options
from .report import environment, summarise_arms
from .stats import mean_ci, paired_difference


@dataclass(frozen=True)
class DigitsConfig:
    seeds: tuple[int, ...] = tuple(range(10))
    # Around the plain arm's best (0.2) in a 3-seed pilot over 0.0125 ... 0.8; 0.4 is at the edge of divergence.
    lrs: tuple[float, ...] = (0.05, 0.1, 0.2, 0.4)
    # 32 iterations per epoch x (1 - decay) = 0.1, 0.3, 1, 3: EMA horizons of 10, 3.3, 1 and 1/3 epochs
    # (3 was added after the 0.1 ... 1 grid put SEMA's best cell on its edge).
    decays: tuple[float, ...] = (0.996875, 0.990625, 0.96875, 0.90625)
    epochs: int = 30
    batch_size: int = 32
    n_train: int = 1024
    n_test: int = 500  # the remaining 273 images are the validation split
    split_seed: int = 0
    hidden: tuple[int, ...] = (256, 256)
    momentum: float = 0.9
    weight_decay: float = 5e-4
    # The SEMA authors' EMA warmup (decay rises linearly from 0.9 * decay over the first epoch),
    # the same for the EMA and SEMA arms.
    ema_warmup: str | None = "linear"
    ema_warmup_epochs: int = 1
    ema_warmup_ratio: float = 0.9
    threads: int = 1
    backend: str = "auto"

    @property
    def steps_per_epoch(self) -> int:
        return self.n_train // self.batch_size

    def ema_options(self) -> dict[str, Any]:
        return warmup_ema_options(
            self.backend, self.ema_warmup, self.ema_warmup_epochs, self.ema_warmup_ratio, self.steps_per_epoch
        )


class DigitsTask:
    higher_is_better = True

    def __init__(self, config: DigitsConfig) -> None:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        images, labels = load_digits(return_X_y=True)
        index = list(range(len(labels)))
        rest, test = train_test_split(index, test_size=config.n_test, stratify=labels, random_state=config.split_seed)
        train, val = train_test_split(
            rest, train_size=config.n_train, stratify=labels[rest], random_state=config.split_seed
        )
        x = torch.tensor(images / 16.0, dtype=torch.float32)
        y = torch.tensor(labels, dtype=torch.int64)
        self.splits = {name: (x[idx], y[idx]) for name, idx in (("train", train), ("val", val), ("test", test))}
        self.split_indices = {"train": train, "val": val, "test": test}
        self.config = config
        self.steps_per_epoch = config.steps_per_epoch

    def data_fingerprint(self) -> dict[str, Any]:
        digest = hashlib.sha256()
        for name in ("train", "val", "test"):
            x, y = self.splits[name]
            digest.update(x.numpy().tobytes())
            digest.update(y.numpy().tobytes())
        return {**{f"n_{k}": len(v) for k, v in self.split_indices.items()}, "sha256": digest.hexdigest()}

    def make_model(self) -> nn.Module:
        layers: list[nn.Module] = []
        width = 64
        for h in self.config.hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        layers.append(nn.Linear(width, 10))
        return nn.Sequential(*layers)

    def make_optimizer(self, model: nn.Module, lr: float) -> torch.optim.Optimizer:
        return torch.optim.SGD(
            model.parameters(), lr=lr, momentum=self.config.momentum, weight_decay=self.config.weight_decay
        )

    def epoch_batches(self, generator: torch.Generator) -> Iterator[tuple[Tensor, Tensor]]:
        x, y = self.splits["train"]
        order = torch.randperm(len(y), generator=generator)
        b = self.config.batch_size
        for i in range(self.steps_per_epoch):
            idx = order[i * b : (i + 1) * b]
            yield x[idx], y[idx]

    def loss(self, model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
        x, y = batch
        return nn.functional.cross_entropy(model(x), y)

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        out = {}
        for split in ("val", "test"):
            x, y = self.splits[split]
            out[split] = int((model(x).argmax(dim=1) == y).sum()) / len(y)
        return out


def run_e1(
    config: DigitsConfig,
    progress: Callable[[int], Any] | None = None,
    on_epoch_end: EpochHook | None = None,
) -> dict[str, Any]:
    """Run the grid; ``progress(total_runs)`` returns an object with ``update(1)`` (a tqdm bar)."""
    with deterministic(config.threads):
        task = DigitsTask(config)
        grid = GridRunner(
            task,
            n_cells=len(config.lrs) * len(config.decays),
            seeds=config.seeds,
            epochs=config.epochs,
            ema_options=config.ema_options(),
            progress=progress,
            on_epoch_end=on_epoch_end,
        )
        cells = []
        for lr in config.lrs:
            for decay in config.decays:
                curves = grid.run_cell(lr, decay)
                cells.append(
                    {
                        "lr": lr,
                        "decay": decay,
                        "iters_per_epoch_x_1_minus_decay": round(config.steps_per_epoch * (1 - decay), 6),
                        "summary_test": summarise_arms({a: curves[a]["test"] for a in ARMS}, True),
                        "summary_val": summarise_arms({a: curves[a]["val"] for a in ARMS}, True)["final"],
                        "curves": curves,
                    }
                )
        backend = resolved_backend(config.backend)
        data = task.data_fingerprint()
    plain_same = all(
        cell["curves"]["plain"] == cells[i - i % len(config.decays)]["curves"]["plain"] for i, cell in enumerate(cells)
    )
    return {
        "experiment": "E1",
        "title": "load_digits MLP, SGD momentum + cosine LR: plain vs EMA vs SEMA (held-out test accuracy)",
        "config": {
            **dataclasses.asdict(config),
            "steps_per_epoch": config.steps_per_epoch,
            "ema_options": config.ema_options(),
            "optimizer": "SGD(momentum, weight_decay), per-step cosine LR to 0, no LR warmup",
            "model": f"MLP 64-{'-'.join(map(str, config.hidden))}-10, ReLU",
        },
        "environment": environment(backend),
        "data": {"source": "sklearn.datasets.load_digits, pixels / 16, stratified fixed split", **data},
        "checks": grid.checks(plain_identical_across_decays=plain_same),
        "selection": select_by_validation(cells),
        "outcome": outcome(cells),
        "cells": cells,
    }


def select_by_validation(cells: list[dict[str, Any]]) -> dict[str, Any]:
    """Each arm's best cell by mean final *validation* accuracy, then compared on the test split,
    paired by seed (the same seed gives the same init and data order in every cell)."""
    best: dict[str, dict[str, Any]] = {}
    for arm in ARMS:
        pick = max(cells, key=lambda c: c["summary_val"][arm]["mean"])  # first of equals
        best[arm] = pick
    finals = {arm: [c[-1] for c in best[arm]["curves"][arm]["test"]] for arm in ARMS}
    return {
        "rule": "per arm, the (lr, decay) cell with the highest mean final validation accuracy",
        "cells": {
            arm: {
                "lr": best[arm]["lr"],
                "decay": best[arm]["decay"] if arm != "plain" else None,
                "val": best[arm]["summary_val"][arm],
                "test": mean_ci(finals[arm]),
            }
            for arm in ARMS
        },
        "paired_test": {
            "sema_minus_ema": paired_difference(finals["sema"], finals["ema"], True),
            "sema_minus_plain": paired_difference(finals["sema"], finals["plain"], True),
            "ema_minus_plain": paired_difference(finals["ema"], finals["plain"], True),
        },
    }


def outcome(cells: list[dict[str, Any]]) -> dict[str, Any]:
    """Over the grid: in how many cells each paired test difference has a 95% CI above 0 (better),
    below 0 (worse) or containing 0 (no detectable difference)."""
    counts: dict[str, dict[str, int]] = {}
    for name in ("sema_minus_ema", "sema_minus_plain", "ema_minus_plain"):
        c = {"better": 0, "worse": 0, "no_detectable_difference": 0}
        for cell in cells:
            d = cell["summary_test"]["paired_final"][name]
            key = "better" if d["ci_low"] > 0 else "worse" if d["ci_high"] < 0 else "no_detectable_difference"
            c[key] += 1
        counts[name] = c
    return {"cells": len(cells), "paired_test_ci_vs_zero": counts}

"""E2: character-level language modelling on the source of Python's standard library, read from
the running interpreter (a fixed list of files; nothing is downloaded).

A one-layer GRU, AdamW with a per-step cosine LR, one learning rate and two EMA decays, the three
arms of :mod:`bench.effectiveness.arms`; the score is validation bits per character on held-out
*files* (other modules than the training ones). The stdlib text differs between Python versions,
so the results record the Python version and a hash of the corpus.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import sysconfig
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .arms import EpochHook, GridRunner, deterministic, resolved_backend, warmup_ema_options
from .report import environment, summarise_arms

TRAIN_FILES = (
    "textwrap.py",
    "heapq.py",
    "shlex.py",
    "queue.py",
    "string.py",
    "copy.py",
    "glob.py",
    "sched.py",
    "fnmatch.py",
    "operator.py",
)
VAL_FILES = ("cmd.py", "graphlib.py", "getopt.py")


@dataclass(frozen=True)
class CharLMConfig:
    seeds: tuple[int, ...] = tuple(range(5))
    # The best plain-arm final of 2e-3 ... 1.6e-2 after 8 epochs in a one-seed pilot (on the validation files).
    lr: float = 1.6e-2
    # 58 iterations per epoch x (1 - decay) = 0.29 and 2.9: EMA horizons of 3.4 and 0.34 epochs. 0.3 was
    # chosen first; 3 was added when E1 showed SEMA needs a short horizon.
    decays: tuple[float, ...] = (0.995, 0.95)
    epochs: int = 8
    seq_len: int = 64
    batch_size: int = 32
    embed: int = 32
    hidden: int = 128
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    lr_warmup_steps: int = 50
    eval_window: int = 512
    train_files: tuple[str, ...] = TRAIN_FILES
    val_files: tuple[str, ...] = VAL_FILES
    ema_warmup: str | None = "linear"
    ema_warmup_epochs: int = 1
    ema_warmup_ratio: float = 0.9
    threads: int = 1
    backend: str = "auto"


class GRULanguageModel(nn.Module):
    def __init__(self, vocab: int, embed: int, hidden: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, embed)
        self.rnn = nn.GRU(embed, hidden, batch_first=True)
        self.head = nn.Linear(hidden, vocab)

    def forward(self, tokens: Tensor) -> Tensor:  # (batch, time) -> (batch, time, vocab)
        return self.head(self.rnn(self.embed(tokens))[0])


def read_stdlib(files: tuple[str, ...]) -> str:
    root = Path(sysconfig.get_paths()["stdlib"])
    missing = [f for f in files if not (root / f).is_file()]
    if missing:
        raise FileNotFoundError(f"E2 corpus: not in this Python's stdlib ({root}): {', '.join(missing)}")
    return "\n".join((root / f).read_text(encoding="utf-8") for f in files)


class CharLMTask:
    higher_is_better = False

    def __init__(self, config: CharLMConfig) -> None:
        train_text = read_stdlib(config.train_files)
        val_text = read_stdlib(config.val_files)
        self.vocab = sorted(set(train_text))
        unknown = len(self.vocab)  # characters of the validation files never seen in training
        index = {c: i for i, c in enumerate(self.vocab)}
        self.train = torch.tensor([index[c] for c in train_text], dtype=torch.int64)
        self.val = torch.tensor([index.get(c, unknown) for c in val_text], dtype=torch.int64)
        self.config = config
        self.n_windows = (len(self.train) - 1 - config.seq_len) // config.seq_len
        self.steps_per_epoch = self.n_windows // config.batch_size
        # Validation in windows of eval_window + 1 characters overlapping by one: every character
        # after the first is predicted once; each window starts from a zero hidden state.
        w = config.eval_window
        starts = range(0, len(self.val) - 1, w)
        self.val_windows = [self.val[s : s + w + 1] for s in starts]
        self.fingerprint = {
            "train_chars": len(train_text),
            "val_chars": len(val_text),
            "vocab": len(self.vocab) + 1,
            "val_unknown_chars": int((self.val == unknown).sum()),
            "sha256": hashlib.sha256((train_text + "\0" + val_text).encode()).hexdigest(),
        }

    def make_model(self) -> nn.Module:
        return GRULanguageModel(len(self.vocab) + 1, self.config.embed, self.config.hidden)

    def make_optimizer(self, model: nn.Module, lr: float) -> torch.optim.Optimizer:
        return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=self.config.weight_decay)

    def epoch_batches(self, generator: torch.Generator) -> Iterator[Tensor]:
        t = self.config.seq_len
        offset = int(torch.randint(t, (1,), generator=generator))
        order = torch.randperm(self.n_windows, generator=generator)
        starts = offset + order * t
        span = torch.arange(t + 1)
        b = self.config.batch_size
        for i in range(self.steps_per_epoch):
            yield self.train[starts[i * b : (i + 1) * b, None] + span]

    def loss(self, model: nn.Module, batch: Tensor) -> Tensor:
        logits = model(batch[:, :-1])
        return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        total_nats, count = 0.0, 0
        full = [w for w in self.val_windows if len(w) == self.config.eval_window + 1]
        batches = [torch.stack(full)] + [w[None] for w in self.val_windows if len(w) != self.config.eval_window + 1]
        for batch in batches:
            logits = model(batch[:, :-1])
            targets = batch[:, 1:]
            nats = nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum")
            total_nats += float(nats)
            count += targets.numel()
        return {"val_bpc": total_nats / count / math.log(2)}


def run_e2(
    config: CharLMConfig,
    progress: Callable[[int], Any] | None = None,
    on_epoch_end: EpochHook | None = None,
) -> dict[str, Any]:
    """All seeds of E2; ``progress(total_runs)`` returns an object with ``update(1)`` (a tqdm bar)."""
    with deterministic(config.threads):
        task = CharLMTask(config)
        ema_options = warmup_ema_options(
            config.backend, config.ema_warmup, config.ema_warmup_epochs, config.ema_warmup_ratio, task.steps_per_epoch
        )
        grid = GridRunner(
            task,
            n_cells=len(config.decays),
            seeds=config.seeds,
            epochs=config.epochs,
            ema_options=ema_options,
            progress=progress,
            on_epoch_end=on_epoch_end,
            lr_warmup_steps=config.lr_warmup_steps,
            grad_clip=config.grad_clip,
        )
        cells = []
        for decay in config.decays:
            curves = {arm: by_split["val_bpc"] for arm, by_split in grid.run_cell(config.lr, decay).items()}
            cells.append(
                {
                    "lr": config.lr,
                    "decay": decay,
                    "iters_per_epoch_x_1_minus_decay": round(task.steps_per_epoch * (1 - decay), 6),
                    "summary": summarise_arms(curves, higher_is_better=False),
                    "curves": curves,
                }
            )
        backend = resolved_backend(config.backend)
    n_params = sum(p.numel() for p in task.make_model().parameters())
    return {
        "experiment": "E2",
        "title": "char-level GRU on Python stdlib source, AdamW + cosine LR: plain vs EMA vs SEMA (val bits/char)",
        "config": {
            **dataclasses.asdict(config),
            "steps_per_epoch": task.steps_per_epoch,
            "ema_options": ema_options,
            "optimizer": "AdamW, linear LR warmup then per-step cosine to 0, grad-norm clipping",
            "model": f"GRU LM: embedding {config.embed}, one GRU layer of {config.hidden}, linear head",
            "parameters": n_params,
        },
        "environment": environment(backend),
        "data": {"source": f"Python {sysconfig.get_python_version()} stdlib source files", **task.fingerprint},
        "checks": grid.checks(
            plain_identical_across_decays=all(c["curves"]["plain"] == cells[0]["curves"]["plain"] for c in cells)
        ),
        "cells": cells,
    }

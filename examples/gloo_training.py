"""What the distributed examples share: a gloo process group on the CPU and the training loop
on a synthetic 4-class task, each rank training on its slice of every global batch.

Imported by ``train_ddp.py`` and ``train_fsdp2.py`` from their own folder, which Python puts
first on the path for a script (also under ``torchrun``).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator

import torch
import torch.distributed as dist
from torch import nn

import sema

IN_FEATURES, CLASSES = 20, 4


@contextlib.contextmanager
def gloo_process_group() -> Iterator[tuple[int, int]]:
    """``(rank, world size)`` inside an initialised gloo group; a barrier before the teardown so
    that no rank tears gloo down while another still talks to it."""
    dist.init_process_group("gloo")
    yield dist.get_rank(), dist.get_world_size()
    dist.barrier()
    dist.destroy_process_group()


def train(
    forward: Callable[[torch.Tensor], torch.Tensor],
    optimizer: torch.optim.Optimizer,
    ema: sema.SwitchEMA,
    steps_per_epoch: int,
) -> Iterator[tuple[int, float]]:
    """Train for ``$EPOCHS`` epochs (default 3), ``ema.update()`` after every step; yields
    ``(epoch, last loss)`` after each epoch whose ``ema.epoch_end()`` switched."""
    rank, world = dist.get_rank(), dist.get_world_size()
    g = torch.Generator().manual_seed(1)  # the same data on every rank, each takes its chunk
    true_w = torch.randn(IN_FEATURES, CLASSES, generator=g)
    for epoch in range(int(os.environ.get("EPOCHS", 3))):
        for _ in range(steps_per_epoch):
            x = torch.randn(32 * world, IN_FEATURES, generator=g)
            y = (x @ true_w).argmax(1)
            loss = nn.functional.cross_entropy(forward(x.chunk(world)[rank]), y.chunk(world)[rank])
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            ema.update()
        if ema.epoch_end():
            yield epoch, loss.item()

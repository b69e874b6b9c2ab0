"""SEMA with DistributedDataParallel on the CPU (gloo).

    torchrun --nproc-per-node 2 examples/train_ddp.py

Every rank updates and switches its own full EMA (never rank 0 alone: a switch on one rank
would desynchronise the replicas); update() issues no collective. The ranks' EMAs stay
bit-identical because their params are.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import sema


def main() -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 4))
    ema = sema.SwitchEMA(model, decay=0.98)  # before wrapping: DDP keeps the Parameter objects
    ddp = DistributedDataParallel(model)
    ema.reset()  # DDP broadcast rank 0's weights; start every rank's EMA from them
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(1)
    true_w = torch.randn(20, 4, generator=g)
    for epoch in range(int(os.environ.get("EPOCHS", 3))):
        for _ in range(50):
            x = torch.randn(32 * world, 20, generator=g)
            y = (x @ true_w).argmax(1)
            loss = nn.functional.cross_entropy(ddp(x.chunk(world)[rank]), y.chunk(world)[rank])
            loss.backward()
            opt.step()
            opt.zero_grad()
            ema.update()
        if ema.epoch_end():
            checksum = sum(float(p.detach().double().sum()) for p in model.parameters())
            print(f"rank {rank}: epoch {epoch}: switched model <- EMA (loss {loss.item():.3f}, sum {checksum:.6f})")
    dist.barrier()  # no rank tears gloo down while another still talks to it
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

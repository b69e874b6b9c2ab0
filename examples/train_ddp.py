"""SEMA with DistributedDataParallel on the CPU (gloo).

    torchrun --nproc-per-node 2 examples/train_ddp.py

Every rank updates and switches its own full EMA (never rank 0 alone: a switch on one rank
would desynchronise the replicas); update() issues no collective. The ranks' EMAs stay
bit-identical because their params are.
"""

from __future__ import annotations

import torch
from gloo_training import CLASSES, IN_FEATURES, gloo_process_group, train
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import sema


def main() -> None:
    with gloo_process_group() as (rank, _):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(IN_FEATURES, 64), nn.ReLU(), nn.Linear(64, CLASSES))
        ema = sema.SwitchEMA(model, decay=0.98)  # before wrapping: DDP keeps the Parameter objects
        ddp = DistributedDataParallel(model)
        ema.reset()  # DDP broadcast rank 0's weights; start every rank's EMA from them
        opt = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)
        for epoch, loss in train(ddp, opt, ema, steps_per_epoch=50):
            checksum = sum(float(p.detach().double().sum()) for p in model.parameters())
            print(f"rank {rank}: epoch {epoch}: switched model <- EMA (loss {loss:.3f}, sum {checksum:.6f})")


if __name__ == "__main__":
    main()

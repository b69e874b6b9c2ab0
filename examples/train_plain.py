"""Switch EMA in a plain PyTorch training loop, on the CPU, in a few seconds.

A small MLP learns a synthetic 3-class problem. After every optimizer step ``ema.update()``
folds the weights into the EMA; at every epoch end ``ema.epoch_end()`` switches the EMA into the
model (one log line per switch); evaluation runs on the live weights and, through
``ema.swapped()``, on the EMA.

    python examples/train_plain.py --epochs 5
"""

from __future__ import annotations

import argparse
import logging

import torch
from torch import nn

import sema

log = logging.getLogger("sema.examples.plain")


def make_data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Three noisy Gaussian blobs in 16 dimensions, labels 0..2."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(3, 16, generator=torch.Generator().manual_seed(0)) * 1.5
    y = torch.randint(0, 3, (n,), generator=g)
    x = centers[y] + torch.randn(n, 16, generator=g) * 1.5
    return x, y


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        correct = (model(x).argmax(1) == y).float().mean().item()
    model.train()
    return correct


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--decay", type=float, default=0.99)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")

    torch.manual_seed(0)
    x_train, y_train = make_data(4096, seed=1)
    x_val, y_val = make_data(1024, seed=2)
    model = nn.Sequential(nn.Linear(16, 128), nn.GELU(), nn.Linear(128, 128), nn.GELU(), nn.Linear(128, 3))
    # Build the EMA first (it moves the params into flat buckets), then the optimizer.
    ema = sema.SwitchEMA(model, decay=args.decay, warmup="linear", warmup_steps=50)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    log.info("backends: %s", {str(device): name for device, name in ema.backends.items()})

    for epoch in range(1, args.epochs + 1):
        order = torch.randperm(len(x_train))
        total = 0.0
        for start in range(0, len(order), args.batch_size):
            index = order[start : start + args.batch_size]
            loss = nn.functional.cross_entropy(model(x_train[index]), y_train[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            ema.update()  # one fused pass per bucket, no host sync
            total += loss.item() * len(index)
        live = accuracy(model, x_val, y_val)  # the live weights, before the switch
        with ema.swapped():  # the EMA, exactly restored afterwards
            averaged = accuracy(model, x_val, y_val)
        log.info("epoch %d: train loss %.4f, val acc live %.4f, EMA %.4f", epoch, total / len(x_train), live, averaged)
        if ema.epoch_end():  # the SEMA switch: model <- EMA
            log.info(
                "epoch %d: switched the EMA into the model (switch #%d, step %d)", epoch, ema.num_switches, ema.step
            )
    log.info("final val acc (the model holds the EMA after the last switch): %.4f", accuracy(model, x_val, y_val))


if __name__ == "__main__":
    main()

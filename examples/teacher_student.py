"""A BYOL/DINO-style target network on the CPU: the teacher is ``ema.module``, whose params are
the EMA itself (no copy, no sync step), running forward beside the student it averages.

    python examples/teacher_student.py --steps 200

The student learns to predict the teacher's embedding of another augmented view of the same
input; the teacher is the EMA of the student (a plain EMA: ``switch_every=None``).
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import nn

import sema


def augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    return x + 0.1 * torch.randn(x.shape, generator=generator)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--decay", type=float, default=0.99)
    args = parser.parse_args()
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(1)
    student = nn.Sequential(nn.Linear(16, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, 8))
    predictor = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 8))
    ema = sema.SwitchEMA(student, decay=args.decay, switch_every=None, buffers="ema")  # before the optimizer
    teacher = ema.module  # eval mode, requires_grad=False, params are views of the EMA
    optimizer = torch.optim.Adam([*student.parameters(), *predictor.parameters()], lr=1e-3)
    data = torch.randn(512, 16, generator=generator)
    for step in range(args.steps):
        x = data[torch.randint(0, len(data), (64,), generator=generator)]
        view_a, view_b = augment(x, generator), augment(x, generator)
        with torch.no_grad():
            target = F.normalize(teacher(view_b), dim=-1)
        prediction = F.normalize(predictor(student(view_a)), dim=-1)
        loss = (2 - 2 * (prediction * target).sum(-1)).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        ema.update()  # the teacher now holds the new average: nothing else to call
        if step % 50 == 0 or step == args.steps - 1:
            print(f"step {step:4d}  loss {loss.item():.4f}")
    gap = max((t - s).abs().max().item() for t, s in zip(teacher.parameters(), student.parameters(), strict=True))
    print(f"teacher follows the student: largest |teacher - student| param difference {gap:.4f}")


if __name__ == "__main__":
    main()

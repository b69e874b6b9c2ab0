"""Switch EMA in the Lightning ``Trainer`` with ``sema.integrations.lightning.SwitchEMACallback``,
on the CPU, in well under a minute.

The callback updates the EMA after every optimizer step (here with gradient accumulation),
switches it into the model at every training-epoch end (one log line per switch, logger
``sema.integrations``), validates on the EMA and keeps its state in Lightning checkpoints. The
run then resumes from the epoch-2 checkpoint and lands on the same weights, bit for bit.

    pip install lightning
    python examples/train_lightning.py
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from sema.integrations.lightning import SwitchEMACallback


class Classifier(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(16, 128), nn.GELU(), nn.Linear(128, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.log("val_loss", nn.functional.cross_entropy(logits, y), prog_bar=True)
        self.log("val_acc", (logits.argmax(1) == y).float().mean(), prog_bar=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=3e-3)


def make_loader(n: int, seed: int, shuffle: bool) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(3, 16, generator=torch.Generator().manual_seed(0)) * 1.5
    y = torch.randint(0, 3, (n,), generator=g)
    x = centers[y] + torch.randn(n, 16, generator=g) * 1.5
    return DataLoader(TensorDataset(x, y), batch_size=64, shuffle=shuffle, generator=g if shuffle else None)


def fit(root: Path, epochs: int, ckpt_path: Path | None = None) -> tuple[Classifier, SwitchEMACallback]:
    pl.seed_everything(0, verbose=False)
    model = Classifier()
    callback = SwitchEMACallback(decay=0.99, warmup="linear", warmup_steps=20, validate_on="ema")
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=epochs,
        accumulate_grad_batches=2,  # one EMA update per optimizer step, not per batch
        default_root_dir=root,
        callbacks=[callback, pl.callbacks.ModelCheckpoint(dirpath=root / "checkpoints", save_top_k=-1)],
        logger=False,
        enable_model_summary=False,
        enable_progress_bar=False,
        num_sanity_val_steps=0,
    )
    # shuffle=False keeps the batch order of a resumed run equal to the uninterrupted one.
    trainer.fit(model, make_loader(2048, 1, shuffle=False), make_loader(512, 2, shuffle=False), ckpt_path=ckpt_path)
    print(
        f"fit done: {callback.ema.num_switches} switches, {callback.ema.step} EMA updates, {trainer.callback_metrics}"
    )
    return model, callback


def main() -> None:
    logging.basicConfig(format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("sema").setLevel(logging.INFO)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model, _ = fit(root / "full", epochs=3)
        checkpoint = sorted((root / "full" / "checkpoints").glob("epoch=1-*.ckpt"))[0]
        print(f"resuming from {checkpoint.name}")
        resumed, _ = fit(root / "resumed", epochs=3, ckpt_path=checkpoint)
        same = all(torch.equal(a, b) for a, b in zip(model.parameters(), resumed.parameters(), strict=True))
        print(f"resumed run ends on the same weights, bit for bit: {same}")


if __name__ == "__main__":
    main()

"""SEMA with FSDP2 (``fully_shard``) on the CPU (gloo).

    torchrun --nproc-per-node 2 examples/train_fsdp2.py

The params are DTensor shards, so SwitchEMA keeps one EMA per local shard (multi-tensor
mode: one launch per (device, dtype) group) and switches shards in place: no all-gather in
update/switch/swap, and each rank holds 1/N of the EMA. The EMA state dict holds DTensors that
torch.distributed.checkpoint saves sharded; averaged_state_dict(full=True) gathers on request.
"""

from __future__ import annotations

import gc

import torch
from gloo_training import CLASSES, IN_FEATURES, gloo_process_group, train
from torch import nn
from torch.distributed.fsdp import fully_shard

import sema


def main() -> None:
    with gloo_process_group() as (rank, _):
        torch.manual_seed(0)
        model = nn.Sequential(
            nn.Linear(IN_FEATURES, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, CLASSES)
        )
        for layer in model:
            if isinstance(layer, nn.Linear):
                fully_shard(layer)
        fully_shard(model)
        ema = sema.SwitchEMA(model, decay=0.98)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        ema_bytes = sum(e.numel() * e.element_size() for g in ema.tensor_groups for e in g.emas)
        model_bytes = sum(p.numel() * 4 for p in model.parameters())
        print(f"rank {rank}: EMA holds {ema_bytes} of {model_bytes} bytes ({ema_bytes / model_bytes:.3f} of the model)")
        for epoch, loss in train(model, opt, ema, steps_per_epoch=30):
            print(f"rank {rank}: epoch {epoch}: switched model shards <- EMA shards (loss {loss:.3f})")
        full = ema.averaged_state_dict(full=True)  # a collective: every rank calls it, rank 0 gets the weights
        if rank == 0:
            print(f"rank 0: gathered the averaged weights: {sum(t.numel() for t in full.values())} elements")
        # Free the sharded model and its FSDP2 state while the process group still exists, rather
        # than at interpreter exit: on a 2-core VM a rank sometimes aborted in gloo's teardown.
        del full, ema, opt, model
        gc.collect()


if __name__ == "__main__":
    main()

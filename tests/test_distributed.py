"""DDP and FSDP2 on the CPU with gloo, 2 processes on loopback: every rank updates and
switches its own (shard of the) EMA with no collective, and the result equals a
single-process run over the same global batches."""

from __future__ import annotations

import os
import socket
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import sema

pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(), reason="torch.distributed with gloo is not available"
)

WORLD = 2
EPOCHS = 2
STEPS = 6
DECAY = 0.8
COLLECTIVES = (
    "all_reduce",
    "all_gather",
    "all_gather_into_tensor",
    "reduce_scatter_tensor",
    "broadcast",
    "all_to_all",
    "all_to_all_single",
    "reduce",
    "gather",
    "scatter",
)


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 3))


def global_batches() -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    g = torch.Generator().manual_seed(7)
    return [
        [(torch.randn(16, 12, generator=g), torch.randn(16, 3, generator=g)) for _ in range(STEPS)]
        for _ in range(EPOCHS)
    ]


def local_half(x: torch.Tensor, rank: int) -> torch.Tensor:
    return x.chunk(WORLD)[rank]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init(rank: int, port: int) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=timedelta(seconds=120))


class CollectiveCounter:
    """Counts torch.distributed collectives issued while ``active`` (c10d Python API), plus
    DTensor/functional collectives through CommDebugMode around the same calls."""

    def __init__(self) -> None:
        self.active = False
        self.calls: list[str] = []
        for name in COLLECTIVES:
            original = getattr(dist, name)

            def wrapper(*args, _name=name, _original=original, **kwargs):
                if self.active:
                    self.calls.append(_name)
                return _original(*args, **kwargs)

            setattr(dist, name, wrapper)

    def run(self, fn):
        from torch.distributed.tensor.debug import CommDebugMode

        self.active = True
        try:
            with CommDebugMode() as mode:
                result = fn()
            if mode.get_total_counts():
                self.calls.append(f"functional:{mode.get_comm_counts()}")
            return result
        finally:
            self.active = False


def swap_round_trip(ema: sema.SwitchEMA):
    def run() -> None:
        with ema.swapped():
            pass

    return run


def single_process_reference() -> dict[str, dict[str, torch.Tensor]]:
    model = make_model()
    ema = sema.SwitchEMA(model, decay=DECAY)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for epoch in global_batches():
        for x, y in epoch:
            nn.functional.mse_loss(model(x), y).backward()
            opt.step()
            opt.zero_grad()
            ema.update()
        ema.epoch_end()
    return {
        "params": {n: p.detach().clone() for n, p in model.named_parameters()},
        "ema": {n: t.clone() for n, t in ema.state_dict()["ema"].items()},
    }


# --- DDP ---------------------------------------------------------------------------------------


def ddp_worker(rank: int, port: int, out: str) -> None:
    from torch.nn.parallel import DistributedDataParallel

    init(rank, port)
    counter = CollectiveCounter()
    counter.run(lambda: dist.all_reduce(torch.zeros(1)))  # negative control: the counter sees collectives
    assert counter.calls[:1] == ["all_reduce"], counter.calls
    counter.calls.clear()
    model = make_model()
    ema = sema.SwitchEMA(model, decay=DECAY)  # before wrapping: DDP keeps the Parameter objects
    ddp = DistributedDataParallel(model)
    ema.reset()  # DDP broadcast rank 0's weights: start every rank's EMA from them
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)
    for epoch in global_batches():
        for x, y in epoch:
            nn.functional.mse_loss(ddp(local_half(x, rank)), local_half(y, rank)).backward()
            opt.step()
            opt.zero_grad()
            counter.run(ema.update)
        counter.run(ema.epoch_end)
    counter.run(swap_round_trip(ema))
    torch.save(
        {
            "params": {n: p.detach().clone() for n, p in model.named_parameters()},
            "ema": ema.state_dict()["ema"],
            "collectives": counter.calls,
            "switches": ema.num_switches,
        },
        Path(out) / f"ddp{rank}.pt",
    )
    dist.destroy_process_group()


def test_ddp_ranks_stay_identical_and_match_one_process(tmp_path):
    mp.spawn(ddp_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"ddp{r}.pt") for r in range(WORLD)]
    for r in ranks:
        assert r["collectives"] == [], f"collectives in update/switch: {r['collectives']}"
        assert r["switches"] == EPOCHS
    for key in ("params", "ema"):
        for name, value in ranks[0][key].items():
            assert torch.equal(value, ranks[1][key][name]), f"{key} {name} differs between ranks"
    reference = single_process_reference()
    for key in ("params", "ema"):
        for name, value in ranks[0][key].items():
            torch.testing.assert_close(value, reference[key][name], rtol=1e-5, atol=1e-6, msg=f"{key} {name}")


# --- FSDP2 -------------------------------------------------------------------------------------


def sharded_model() -> tuple[nn.Module, sema.SwitchEMA, torch.optim.Optimizer]:
    from torch.distributed.fsdp import fully_shard

    model = make_model()
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    ema = sema.SwitchEMA(model, decay=DECAY)
    return model, ema, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)


def train_epochs(model, ema, opt, epochs, rank, counter=None) -> None:
    run = counter.run if counter is not None else (lambda fn: fn())
    for epoch in epochs:
        for x, y in epoch:
            nn.functional.mse_loss(model(local_half(x, rank)), local_half(y, rank)).backward()
            opt.step()
            opt.zero_grad()
            run(ema.update)
        run(ema.epoch_end)


def fsdp_worker(rank: int, port: int, out: str) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    init(rank, port)
    counter = CollectiveCounter()
    data = global_batches()

    model, ema, opt = sharded_model()
    counter.run(lambda: next(model.parameters()).full_tensor())  # negative control: an all-gather is seen
    assert counter.calls, "the counter missed a DTensor all-gather"
    counter.calls.clear()
    assert not ema.buckets and ema.tensor_groups, "DTensor params must use the multi-tensor mode"
    local_elements = sum(e.numel() for g in ema.tensor_groups for e in g.emas)
    full_elements = sum(p.numel() for p in model.parameters())
    train_epochs(model, ema, opt, data, rank, counter)

    counter.run(swap_round_trip(ema))
    counter.run(ema.switch)
    straight = {n: t.to_local().clone() for n, t in ema.state_dict()["ema"].items()}
    straight_params = {n: p.to_local().clone() for n, p in model.named_parameters()}
    full_ema = ema.averaged_state_dict(full=True)
    full_params = {n: p.full_tensor() for n, p in model.named_parameters()}

    # Resume: one epoch, a sharded DCP checkpoint, a fresh model and EMA, the second epoch.
    model, ema, opt = sharded_model()
    train_epochs(model, ema, opt, data[:1], rank)
    model_sd, opt_sd = get_state_dict(model, opt)
    checkpoint = Path(out) / "dcp"
    dcp.save({"model": model_sd, "optim": opt_sd, "ema": ema.state_dict()}, checkpoint_id=checkpoint)
    model, ema, opt = sharded_model()
    model_sd, opt_sd = get_state_dict(model, opt)
    state = {"model": model_sd, "optim": opt_sd, "ema": ema.state_dict()}
    dcp.load(state, checkpoint_id=checkpoint)
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    ema.load_state_dict(state["ema"])
    train_epochs(model, ema, opt, data[1:], rank)
    ema.switch()
    resumed = {n: t.to_local().clone() for n, t in ema.state_dict()["ema"].items()}
    resumed_params = {n: p.to_local().clone() for n, p in model.named_parameters()}
    torch.save(
        {
            "collectives": counter.calls,
            "local_elements": local_elements,
            "full_elements": full_elements,
            "straight": straight,
            "straight_params": straight_params,
            "resumed": resumed,
            "resumed_params": resumed_params,
            "full_ema": full_ema,
            "full_params": full_params if rank == 0 else {},
        },
        Path(out) / f"fsdp{rank}.pt",
    )
    dist.destroy_process_group()


def test_fsdp2_shard_local_ema_matches_one_process_and_resumes(tmp_path):
    mp.spawn(fsdp_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"fsdp{r}.pt", weights_only=False) for r in range(WORLD)]
    for rank, r in enumerate(ranks):
        assert r["collectives"] == [], f"rank {rank}: collectives in update/switch/swap: {r['collectives']}"
        # Each rank holds its shard of the EMA: half the model (plus at most a row of padding).
        assert r["local_elements"] <= r["full_elements"] // WORLD + 32 + 16 + 3, (
            r["local_elements"],
            r["full_elements"],
        )
        for name, value in r["straight"].items():
            assert torch.equal(value, r["resumed"][name]), f"rank {rank}: resumed EMA {name} differs"
        for name, value in r["straight_params"].items():
            assert torch.equal(value, r["resumed_params"][name]), f"rank {rank}: resumed param {name} differs"
    assert ranks[1]["full_ema"] == {}, "averaged_state_dict(full=True) returns the full weights on rank 0 only"
    reference = single_process_reference()
    for name, value in ranks[0]["full_ema"].items():
        torch.testing.assert_close(value, reference["ema"][name], rtol=1e-5, atol=1e-6, msg=f"EMA {name}")
    for name, value in ranks[0]["full_params"].items():
        # After the last switch the model holds the EMA.
        torch.testing.assert_close(value, reference["ema"][name], rtol=1e-5, atol=1e-6, msg=f"param {name}")


TEARDOWN_ABORT = "terminate called without an active exception"


@pytest.mark.parametrize("script", ["train_ddp.py", "train_fsdp2.py"])
def test_distributed_examples_run_with_torchrun(script):
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "EPOCHS": "1", "OMP_NUM_THREADS": "1"}

    def run() -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
             "--master-port", str(free_port()), str(root / "examples" / script)],
            env=env, capture_output=True, text=True, timeout=300, check=False,
        )  # fmt: skip

    # On the busy 2-core VM, train_fsdp2.py's rank 1 sometimes aborted in teardown, after every
    # line was printed (TEARDOWN_ABORT; in bursts: 2 of 4 runs, then none in 80). Up to three
    # runs for that one signature; any other failure fails at once.
    for _ in range(3):
        result = run()
        if result.returncode == 0 or TEARDOWN_ABORT not in result.stderr:
            break
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("switched") == 2, result.stdout  # one switch per rank in the one epoch

"""SwitchEMA beside torch.compile and inside CUDA graphs.

- A compiled model reads its params as graph inputs: it must see the weights that ``switch()``
  and ``swapped()`` write into the buckets, with no stale guard and no recompile.
- ``ema.update()`` compiled with ``fullgraph=True`` runs beside a compiled model and a compiled
  optimizer step and follows the same trajectory as everything eager.
- On CUDA, ``ema.update()`` is captured in a CUDA graph and replayed: the decay comes from the
  device step counter, nothing is allocated and nothing syncs with the host.
"""

from __future__ import annotations

import pytest
import torch
from conftest import assert_bits_equal
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend

import sema

# Compiled (inductor) against eager outputs: fused kernels round differently, by a few ulps of
# the output dtype. A model that still read the weights from before a switch is off by far more
# (each test checks that the stale output fails this same tolerance).
TOLERANCES = {
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
}
DTYPE_IDS = {torch.float32: "fp32", torch.bfloat16: "bf16"}


def make_model(dtype: torch.dtype = torch.float32, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 4)).to(dtype)


def batches(n: int, dtype: torch.dtype = torch.float32) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(3)
    return [(torch.randn(16, 8, generator=g).to(dtype), torch.randn(16, 4, generator=g).to(dtype)) for _ in range(n)]


def train_step(forward, optimizer: torch.optim.Optimizer, step, x: torch.Tensor, y: torch.Tensor) -> None:
    optimizer.zero_grad()
    nn.functional.mse_loss(forward(x).float(), y.float()).backward()
    step()


def assert_differs(a: torch.Tensor, b: torch.Tensor, tolerance: dict[str, float], what: str) -> None:
    assert not torch.allclose(a, b, **tolerance), f"{what}: outputs agree within the tolerance, the check is blind"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=DTYPE_IDS.get)
def test_compiled_model_sees_switch_and_swapped(dtype):
    torch._dynamo.reset()
    model = make_model(dtype)
    ema = sema.SwitchEMA(model, decay=0.5)  # before torch.compile, as documented
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(model, backend=counter)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    data = batches(6, dtype)
    probe = data[0][0]
    tolerance = TOLERANCES[dtype]

    def run(forward) -> torch.Tensor:  # grad mode as in training: one graph for everything
        return forward(probe).detach().float()

    train_step(compiled, optimizer, optimizer.step, *data[0])
    ema.update()
    with torch._dynamo.config.patch(error_on_recompile=True):  # a recompile raises, naming the guard
        for x, y in data[1:3]:
            train_step(compiled, optimizer, optimizer.step, x, y)
            ema.update()
        live = run(compiled)
        torch.testing.assert_close(live, run(model), **tolerance, msg="live weights")

        ema.switch()
        switched = run(compiled)
        torch.testing.assert_close(switched, run(model), **tolerance, msg="after switch()")
        assert_differs(switched, live, tolerance, "switch()")

        for x, y in data[3:]:
            train_step(compiled, optimizer, optimizer.step, x, y)
            ema.update()
        live = run(compiled)
        with ema.swapped():
            inside = run(compiled)
            torch.testing.assert_close(inside, run(model), **tolerance, msg="inside swapped()")
        assert_differs(inside, live, tolerance, "swapped()")
        assert_bits_equal(run(compiled).reshape(-1), live.reshape(-1), "after swapped()")
    assert counter.frame_count == 1, f"the model compiled {counter.frame_count} times"


def test_compiled_update_beside_compiled_model_and_optimizer():
    torch._dynamo.reset()
    settings = dict(decay=0.6, warmup="linear", warmup_steps=4)  # the decay moves: a device schedule
    compiled_model, eager_model = make_model(), make_model()
    compiled_ema, eager_ema = sema.SwitchEMA(compiled_model, **settings), sema.SwitchEMA(eager_model, **settings)
    model_counter = CompileCounterWithBackend("inductor")
    update_counter = CompileCounterWithBackend("inductor")
    forward = torch.compile(compiled_model, backend=model_counter)
    update = torch.compile(compiled_ema.update, fullgraph=True, backend=update_counter)  # fullgraph: no break
    # SGD with momentum: linear in the gradients, so the compiled and eager trajectories stay a
    # few ulps apart (Adam divides by tiny second moments and amplifies ulp differences to ~1e-5).
    compiled_optimizer = torch.optim.SGD(compiled_model.parameters(), lr=0.1, momentum=0.9)
    eager_optimizer = torch.optim.SGD(eager_model.parameters(), lr=0.1, momentum=0.9)
    optimizer_step = torch.compile(compiled_optimizer.step)

    data = batches(3)
    for epoch in range(2):
        for i, (x, y) in enumerate(data):
            train_step(forward, compiled_optimizer, optimizer_step, x, y)
            if epoch == 0 and i == 0:
                update()
            else:
                with torch._dynamo.config.patch(error_on_recompile=True):
                    update()
            train_step(eager_model, eager_optimizer, eager_optimizer.step, x, y)
            eager_ema.update()
        assert compiled_ema.epoch_end() and eager_ema.epoch_end()
        compiled_emas = compiled_ema.state_dict()["ema"]
        for name, e in eager_ema.state_dict()["ema"].items():
            torch.testing.assert_close(compiled_emas[name], e, **TOLERANCES[torch.float32], msg=f"EMA {name}")
        for (name, p), q in zip(compiled_model.named_parameters(), eager_model.parameters(), strict=True):
            torch.testing.assert_close(p, q, **TOLERANCES[torch.float32], msg=f"param {name} after the switch")
            assert_bits_equal(p.detach().reshape(-1), compiled_emas[name].reshape(-1), f"switched {name}")
    assert compiled_ema.step == eager_ema.step == 6
    assert update_counter.frame_count == 1, f"update() compiled {update_counter.frame_count} times"
    assert model_counter.frame_count == 1, f"the model compiled {model_counter.frame_count} times"


# --- CUDA graphs ------------------------------------------------------------------------------

CUDA_BACKENDS = ["torch", "triton", "cuda"]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device; none here")
@pytest.mark.parametrize("warmup", [None, "linear"], ids=["constant_decay", "linear_warmup"])
@pytest.mark.parametrize("backend", CUDA_BACKENDS)
def test_update_is_captured_and_replayed_in_a_cuda_graph(backend, warmup):
    available, reason = sema.available_backends("cuda")[backend]
    if not available:
        pytest.skip(f"backend {backend!r} is unavailable: {reason}")
    torch.manual_seed(0)
    # Two buckets (fp32 and bf16 params) in one update.
    model = nn.Sequential(nn.Linear(64, 256), nn.Linear(256, 64).to(torch.bfloat16)).cuda()
    ema = sema.SwitchEMA(model, decay=0.9, warmup=warmup, warmup_steps=6, backend=backend)
    params = dict(model.named_parameters())
    reference = {n: p.detach().float().clone() for n, p in params.items()}
    warm, replays = 3, 6
    g = torch.Generator(device="cuda").manual_seed(1)
    nudges = [
        {n: torch.randn(p.shape, generator=g, device="cuda").to(p.dtype) for n, p in params.items()}
        for _ in range(replays)
    ]

    def fold_into_reference(index: int) -> None:
        w = ema.schedule.weight_at(index)
        for n, p in params.items():
            reference[n].lerp_(p.detach().float(), w)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capture stream: kernels compiled, weights created
        for i in range(warm):
            ema.update()
            fold_into_reference(i)
    torch.cuda.current_stream().wait_stream(side)

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):  # a host sync inside update() makes the capture itself fail
        ema.update()
    allocated = torch.cuda.memory_allocated()
    for i in range(replays):
        with torch.no_grad():
            for n, p in params.items():
                p.add_(nudges[i][n])  # in place: the captured kernels read the buckets
        graph.replay()
        fold_into_reference(warm + i)
    assert torch.cuda.memory_allocated() == allocated, "replaying the update allocated memory"
    torch.cuda.synchronize()

    assert ema.step == warm + replays, "the device step counter did not advance on replay"
    emas = ema.state_dict()["ema"]
    for n in params:
        torch.testing.assert_close(emas[n], reference[n], rtol=1e-6, atol=1e-7, msg=f"EMA {n} after replays")

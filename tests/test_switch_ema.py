"""SwitchEMA behaviour: bucketing keeps training identical, schedules and switch policies,
swapped() round trips, resume, state dicts, bad input, torch.compile. Run on every backend
that serves CPU tensors here."""

from __future__ import annotations

import copy

import pytest
import torch
import torch._dynamo.testing
from conftest import EPS, assert_bits_equal, cpu_backends
from torch import nn

import sema

BACKENDS = cpu_backends()


def make_model(seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(12, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 17), nn.ReLU(), nn.Linear(17, 3)
    )
    return model.to(dtype)


def batches(n: int, seed: int = 1, dtype: torch.dtype = torch.float32) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 12, generator=g).to(dtype), torch.randint(0, 3, (16,), generator=g)) for _ in range(n)]


def train_step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> float:
    loss = nn.functional.cross_entropy(model(x).float(), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.item()


def params_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def emas_of(ema: sema.SwitchEMA) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in ema.state_dict()["ema"].items()}


OPTIMIZERS = {
    "sgd_momentum": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9),
    "adamw_foreach": lambda ps: torch.optim.AdamW(ps, lr=1e-2, foreach=True),
    "adamw_for_loop": lambda ps: torch.optim.AdamW(ps, lr=1e-2, foreach=False),
    "adamw_fused": lambda ps: torch.optim.AdamW(ps, lr=1e-2, fused=True),
}


# --- bucketing does not change training ------------------------------------------------------


@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
@pytest.mark.parametrize("optimizer_first", [False, True], ids=["ema_first", "optimizer_first"])
def test_bucketed_training_is_bit_identical(opt_name, optimizer_first):
    plain, bucketed = make_model(), make_model()
    opt_plain = OPTIMIZERS[opt_name](plain.parameters())
    if optimizer_first:
        opt = OPTIMIZERS[opt_name](bucketed.parameters())
        ema = sema.SwitchEMA(bucketed, switch_every=None)
    else:
        ema = sema.SwitchEMA(bucketed, switch_every=None)
        opt = OPTIMIZERS[opt_name](bucketed.parameters())
    assert len(ema.buckets) == 1
    held = opt.param_groups[0]["params"]
    assert all(a is b for a, b in zip(held, bucketed.parameters(), strict=False))
    bucket = ema.buckets[0]
    for p in bucketed.parameters():  # every param is a view of the bucket, 16-byte aligned
        assert p.untyped_storage().data_ptr() == bucket.param_flat.untyped_storage().data_ptr()
        assert p.data_ptr() % 16 == 0
    losses_plain, losses = [], []
    for x, y in batches(25):
        losses_plain.append(train_step(plain, opt_plain, x, y))
        losses.append(train_step(bucketed, opt, x, y))
        ema.update()
    assert losses == losses_plain
    for (name, a), b in zip(plain.named_parameters(), bucketed.parameters(), strict=False):
        assert_bits_equal(b.detach(), a.detach(), name)


def test_channels_last_params_keep_their_memory_format():
    model = nn.Conv2d(3, 8, 3).to(memory_format=torch.channels_last)
    before = model.weight.detach().clone()
    sema.SwitchEMA(model)
    assert model.weight.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(model.weight.detach(), before)


def test_buckets_per_dtype_and_frozen_params_are_left_alone():
    model = make_model()
    model[3].to(torch.bfloat16)
    model[5].weight.requires_grad_(False)
    frozen_ptr = model[5].weight.data_ptr()
    ema = sema.SwitchEMA(model)
    assert sorted(str(b.dtype) for b in ema.buckets) == ["torch.bfloat16", "torch.float32"]
    assert model[5].weight.data_ptr() == frozen_ptr
    assert "5.weight" not in ema.state_dict()["ema"]


# --- the EMA itself, schedules, update_every ---------------------------------------------------


def naive_ema(
    model_seed: int, steps: int, schedule: sema.DecaySchedule, switch_at: set[int]
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Per-tensor fp64 SEMA: same data, same schedule, written out by hand."""
    model = make_model(model_seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    ema = {n: p.detach().double().clone() for n, p in model.named_parameters()}
    k = schedule.update_every
    for call, (x, y) in enumerate(batches(steps), start=1):
        train_step(model, opt, x, y)
        if call % k == 0:
            w = schedule.weight_at(call // k - 1)
            for n, p in model.named_parameters():
                ema[n].lerp_(p.detach().double(), w)
        if call in switch_at:
            with torch.no_grad():
                for n, p in model.named_parameters():
                    p.copy_(ema[n])
    return ema, params_of(model)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "kwargs",
    [
        {"decay": 0.9},
        {"decay": 0.99, "warmup": "linear", "warmup_steps": 10},
        {"decay": 0.99, "warmup": "exp", "warmup_steps": 10, "warmup_ratio": 0.5},
        {"decay": 0.99, "warmup": "constant", "warmup_steps": 10},
        {"decay": 0.999, "warmup": "power", "inv_gamma": 1.0, "power": 0.75},
        {"decay": 0.9, "update_every": 3},
        {"decay": 0.8, "switch_every": 7},
        {"decay": 0.8, "switch_every": 5, "switch_start": 5, "switch_end": 20, "update_every": 2},
    ],
    ids=["plain", "linear", "exp", "constant", "power", "every3", "switch7", "window"],
)
def test_trajectory_matches_fp64_by_hand(backend, kwargs):
    steps = 30
    kwargs = {"switch_every": None, **kwargs}
    model = make_model(3)
    ema = sema.SwitchEMA(model, backend=backend, **kwargs)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for x, y in batches(steps):
        train_step(model, opt, x, y)
        ema.update()
    every = kwargs["switch_every"]
    switch_at = set()
    if every is not None:
        start, end = kwargs.get("switch_start", 0), kwargs.get("switch_end") or steps
        switch_at = {c for c in range(1, steps + 1) if start < c <= end and c % every == 0}
    expected, expected_params = naive_ema(3, steps, ema.schedule, switch_at)
    assert ema.num_switches == len(switch_at)
    # fp32 storage of a contraction: each step adds at most ~2 eps relative, errors do not grow.
    for name, value in emas_of(ema).items():
        err = (value.double() - expected[name]).abs().max().item()
        assert err <= 8 * EPS[torch.float32] * expected[name].abs().max().item() + 1e-7, (name, err)
    if switch_at:
        for name, p in model.named_parameters():
            err = (p.detach().double() - expected_params[name].double()).abs().max().item()
            assert err <= 1e-4, (name, err)


def test_decay_schedules_on_device_match_host():
    for warmup, extra in [
        ("linear", {"warmup_steps": 50}),
        ("exp", {"warmup_steps": 50}),
        ("constant", {"warmup_steps": 50}),
        ("power", {}),
        (None, {}),
    ]:
        schedule = sema.DecaySchedule(0.999, warmup, update_every=2, **extra)
        for i in [0, 1, 10, 24, 25, 26, 1000]:
            got = schedule.weight(torch.tensor(i)).item()
            assert got == pytest.approx(schedule.weight_at(i), rel=1e-6, abs=1e-9), (warmup, i)
    linear = sema.DecaySchedule(0.99, "linear", warmup_steps=10, warmup_ratio=0.9)
    assert linear.decay_at(0) == pytest.approx(0.9 * 0.99)
    assert linear.decay_at(10) == 0.99
    power = sema.DecaySchedule(0.9999, "power")
    assert power.decay_at(0) == 0.0  # the first update copies the weights
    assert power.decay_at(10) == pytest.approx(1 - 11 ** (-2 / 3))


# --- switch semantics -------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_epoch_switch_copies_ema_and_leaves_ema_and_optimizer_alone(backend):
    model = make_model()
    ema = sema.SwitchEMA(model, decay=0.9, backend=backend)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for x, y in batches(8):
        train_step(model, opt, x, y)
        ema.update()
    ema_before = emas_of(ema)
    opt_before = copy.deepcopy(opt.state_dict())
    assert ema.epoch_end() is True
    for name, p in model.named_parameters():
        assert_bits_equal(p.detach(), ema_before[name].to(p.dtype), f"switched {name}")
    for name, value in emas_of(ema).items():
        assert_bits_equal(value, ema_before[name], f"EMA {name} after the switch")
    for key, state in opt.state_dict()["state"].items():
        for field, value in state.items():
            assert torch.equal(value, opt_before["state"][key][field]), (key, field)
    # The EMA goes on from where it was: the next update folds the new params into it.
    x, y = batches(1, seed=9)[0]
    train_step(model, opt, x, y)
    ema.update()
    for name, p in model.named_parameters():
        expected = torch.lerp(ema_before[name].double(), p.detach().double(), ema.schedule.weight_at(8))
        assert torch.allclose(emas_of(ema)[name].double(), expected, rtol=1e-6, atol=1e-7), name


def test_epoch_window_and_plain_ema():
    model = make_model()
    ema = sema.SwitchEMA(model, switch_every="epoch", switch_start=2, switch_end=4)
    assert [ema.epoch_end() for _ in range(6)] == [False, False, True, True, False, False]
    plain = sema.SwitchEMA(make_model(), switch_every=None)
    assert [plain.epoch_end() for _ in range(3)] == [False] * 3 and plain.num_switches == 0


def test_int_switch_every_switches_on_every_kth_step():
    model = make_model()
    ema = sema.SwitchEMA(model, decay=0.5, switch_every=4, switch_start=4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    switched = []
    for x, y in batches(16):
        train_step(model, opt, x, y)
        ema.update()
        emas = emas_of(ema)
        switched.append(all(torch.equal(p.detach(), emas[n]) for n, p in model.named_parameters()))
    assert switched == [c % 4 == 0 and c > 4 for c in range(1, 17)]
    assert ema.epoch_end() is False  # an int policy does not switch at epoch ends


def test_update_switch_true_is_fused_switch():
    model = make_model()
    ema = sema.SwitchEMA(model, decay=0.7, switch_every=None)
    ema.update(switch=True)
    emas = emas_of(ema)
    for name, p in model.named_parameters():
        assert_bits_equal(p.detach(), emas[name], name)
    assert ema.num_switches == 1


@pytest.mark.parametrize("policy", ["copy", "ema"])
def test_buffer_policies(policy):
    model = make_model()
    ema = sema.SwitchEMA(model, decay=0.5, buffers=policy)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    bn = model[1]
    tracked = []
    for x, y in batches(4):
        train_step(model, opt, x, y)
        ema.update()
        tracked.append(bn.running_mean.clone())
    buffers = ema.state_dict()["buffers"]
    assert buffers["1.num_batches_tracked"].dtype == torch.int64
    assert buffers["1.num_batches_tracked"].item() == 4  # integers are copied, never averaged
    if policy == "copy":
        assert torch.equal(buffers["1.running_mean"], bn.running_mean)
    else:
        assert not torch.equal(buffers["1.running_mean"], bn.running_mean)
    ema.switch()
    assert torch.equal(bn.running_mean, buffers["1.running_mean"])


# --- swapped() --------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "dtype, ema_dtype",
    [
        (torch.float32, torch.float32),
        (torch.bfloat16, torch.float32),
        (torch.float16, torch.float32),
        (torch.bfloat16, None),
        (torch.float16, None),
    ],
    ids=["fp32", "bf16_fp32ema", "fp16_fp32ema_scratch", "bf16_same", "fp16_same"],
)
def test_swapped_round_trips_are_bit_exact(backend, dtype, ema_dtype):
    model = make_model(dtype=dtype)
    ema = sema.SwitchEMA(model, decay=0.9, ema_dtype=ema_dtype, buffers="ema", backend=backend)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for x, y in batches(5, dtype=dtype):
        train_step(model, opt, x, y)
        ema.update()
    params0 = params_of(model)
    emas0 = emas_of(ema)
    buffers0 = {n: b.clone() for n, b in model.named_buffers()}
    # Every trip starts from the same bits, so a trip that is not exact shows at once; the
    # Triton interpreter takes ~0.1 s a trip, so it runs 140 (every exit path 20 times), not 1000.
    trips = 140 if backend == "triton" else 1000
    for trip in range(trips):
        try:
            with ema.swapped() as inside:
                assert inside is model
                if trip % 100 == 0:
                    for name, p in model.named_parameters():
                        e = emas0[name]
                        if ema_dtype is None or dtype != torch.bfloat16:
                            assert_bits_equal(p.detach(), e.to(dtype), f"inside swapped(): {name}")
                        else:  # packed: the EMA rounded half away from zero, within half a bf16 ulp
                            assert (p.detach().double() - e.double()).abs().max() <= 2**-8 * e.abs().max()
                if trip % 7 == 0:
                    raise KeyError("the body failed")
        except KeyError:
            pass
    for name, p in model.named_parameters():
        assert_bits_equal(p.detach(), params0[name], f"param {name} after {trips} round trips")
    for name, value in emas_of(ema).items():
        assert_bits_equal(value, emas0[name], f"EMA {name} after {trips} round trips")
    for name, b in model.named_buffers():
        assert torch.equal(b, buffers0[name]), name


def test_swapped_refuses_nesting_and_updates_inside():
    model = make_model()
    ema = sema.SwitchEMA(model)
    with ema.swapped():
        with pytest.raises(RuntimeError, match="nested"):
            with ema.swapped():
                pass
        with pytest.raises(RuntimeError, match="inside swapped"):
            ema.update()
        with pytest.raises(RuntimeError, match="inside swapped"):
            ema.state_dict()
    ema.update()


# --- state dicts and resume ------------------------------------------------------------------


def run(model, ema, opt, data, epochs_steps):
    for epoch, steps in enumerate(epochs_steps):
        for x, y in data[epoch][:steps]:
            train_step(model, opt, x, y)
            ema.update()
        if steps == len(data[epoch]):
            ema.epoch_end()


@pytest.mark.parametrize("backend", BACKENDS)
def test_resume_is_bit_identical(backend):
    data = [batches(10, seed=s) for s in range(3)]
    kwargs = {"decay": 0.9, "warmup": "linear", "warmup_steps": 12, "buffers": "ema", "backend": backend}

    def fresh():
        model = make_model(5)
        ema = sema.SwitchEMA(model, **kwargs)
        return model, ema, torch.optim.AdamW(model.parameters(), lr=1e-2)

    model, ema, opt = fresh()
    for epoch in range(3):
        for x, y in data[epoch]:
            train_step(model, opt, x, y)
            ema.update()
        ema.epoch_end()
    final_params, final_ema = params_of(model), emas_of(ema)

    model, ema, opt = fresh()
    for x, y in data[0]:
        train_step(model, opt, x, y)
        ema.update()
    ema.epoch_end()
    for x, y in data[1][:4]:
        train_step(model, opt, x, y)
        ema.update()
    saved = copy.deepcopy(
        {"model": model.state_dict(), "opt": opt.state_dict(), "ema": ema.state_dict()}
    )  # a deep copy stands in for torch.save/torch.load

    model, ema, opt = fresh()
    model.load_state_dict(saved["model"])
    opt.load_state_dict(saved["opt"])
    ema.load_state_dict(saved["ema"])
    assert ema.step == 14 and ema.epochs == 1
    for x, y in data[1][4:]:
        train_step(model, opt, x, y)
        ema.update()
    ema.epoch_end()
    for x, y in data[2]:
        train_step(model, opt, x, y)
        ema.update()
    ema.epoch_end()
    for name, p in model.named_parameters():
        assert_bits_equal(p.detach(), final_params[name], f"resumed param {name}")
    for name, value in emas_of(ema).items():
        assert_bits_equal(value, final_ema[name], f"resumed EMA {name}")


def test_state_dict_tensors_have_their_own_storage():
    ema = sema.SwitchEMA(make_model())
    sd = ema.state_dict()
    storages = {t.untyped_storage().data_ptr() for t in sd["ema"].values()}
    assert len(storages) == len(sd["ema"])
    for t in sd["ema"].values():
        assert t.untyped_storage().nbytes() == t.numel() * t.element_size()


def test_state_dict_of_another_model_lists_mismatches():
    ema = sema.SwitchEMA(make_model())
    other = nn.Sequential(nn.Linear(12, 30), nn.BatchNorm1d(30), nn.ReLU(), nn.Linear(30, 17), nn.ReLU())
    other_state = sema.SwitchEMA(other, ema_dtype=None).state_dict()
    other_state["ema"]["1.bias"] = other_state["ema"]["1.bias"].double()
    before = emas_of(ema)
    with pytest.raises(ValueError) as info:
        ema.load_state_dict(other_state)
    message = str(info.value)
    assert "missing param 5.weight" in message
    assert "param 0.weight: shape (30, 12) in the state, (32, 12) here" in message
    assert "param 1.bias: shape (30,)" in message
    for name, value in emas_of(ema).items():
        assert_bits_equal(value, before[name], f"EMA {name} after a refused load")
    state = ema.state_dict()
    state["ema"]["0.bias"] = state["ema"]["0.bias"].half()
    with pytest.raises(ValueError, match=r"param 0.bias: dtype torch.float16 in the state, torch.float32 here"):
        ema.load_state_dict(state)
    with pytest.raises(ValueError, match="not a SwitchEMA state"):
        ema.load_state_dict(make_model().state_dict())


def test_averaged_state_dict_loads_into_a_fresh_model():
    model = make_model()
    model[3].to(torch.bfloat16)
    ema = sema.SwitchEMA(model, decay=0.5, buffers="ema")
    for _ in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        ema.update()
    averaged = ema.averaged_state_dict()
    fresh = make_model(7)
    fresh[3].to(torch.bfloat16)
    fresh.load_state_dict(averaged)
    emas = emas_of(ema)
    for name, p in fresh.named_parameters():
        assert_bits_equal(p.detach(), emas[name].to(p.dtype), name)
    assert set(averaged) == set(model.state_dict())
    storages = [t.untyped_storage().data_ptr() for t in averaged.values()]
    assert len(set(storages)) == len(storages)


# --- flatten=False (multi-tensor mode) ---------------------------------------------------------


def test_multi_tensor_mode_matches_flat_mode():
    flat_model, multi_model = make_model(), make_model()
    flat = sema.SwitchEMA(flat_model, decay=0.8, switch_every=3)
    multi = sema.SwitchEMA(multi_model, decay=0.8, switch_every=3, flatten=False)
    assert not multi.buckets and multi.tensor_groups
    ptrs = [p.data_ptr() for p in multi_model.parameters()]
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (flat_model, multi_model)]
    for x, y in batches(10):
        for model, ema, opt in zip((flat_model, multi_model), (flat, multi), opts, strict=False):
            train_step(model, opt, x, y)
            ema.update()
    assert ptrs == [p.data_ptr() for p in multi_model.parameters()]
    a, b = emas_of(flat), emas_of(multi)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-6, atol=1e-7)
    with multi.swapped():
        for name, p in multi_model.named_parameters():
            assert_bits_equal(p.detach(), b[name], name)


# --- bad input --------------------------------------------------------------------------------


def bad_constructors():
    frozen = make_model()
    for p in frozen.parameters():
        p.requires_grad_(False)
    return [
        ("decay=1", {"decay": 1.0}, ValueError, "decay=1.0 is outside"),
        ("decay<0", {"decay": -0.1}, ValueError, "decay=-0.1 is outside"),
        ("decay nan", {"decay": float("nan")}, ValueError, "decay=nan"),
        ("decay str", {"decay": "0.9"}, TypeError, "decay must be a float"),
        ("warmup name", {"warmup": "cosine"}, ValueError, "warmup='cosine'"),
        ("warmup steps", {"warmup": "linear"}, ValueError, "needs warmup_steps"),
        ("warmup ratio", {"warmup": "exp", "warmup_steps": 5, "warmup_ratio": 0}, ValueError, "warmup_ratio"),
        ("power", {"warmup": "power", "power": -1}, ValueError, "power > 0"),
        ("update_every", {"update_every": 0}, ValueError, "update_every"),
        ("switch_every", {"switch_every": "step"}, ValueError, "switch_every='step'"),
        ("switch_every 0", {"switch_every": 0}, ValueError, "switch_every=0"),
        ("switch_start", {"switch_start": -1}, ValueError, "switch_start=-1"),
        ("switch_end", {"switch_start": 3, "switch_end": 3}, ValueError, "switch_end=3"),
        ("buffers", {"buffers": "average"}, ValueError, "buffers='average'"),
        ("ema_dtype", {"ema_dtype": torch.float16}, TypeError, "ema_dtype"),
        ("backend name", {"backend": "nope"}, ValueError, "unknown backend"),
        ("backend device", {"backend": "cuda"}, sema.BackendUnavailableError, "cannot run on cpu"),
        ("no params", {"model": frozen}, ValueError, "no trainable parameters"),
        ("complex params", {"model": make_model().to(torch.complex64)}, TypeError, "0.weight.*view_as_real"),
        ("not a module", {"model": [1, 2]}, TypeError, "nn.Module"),
    ]


@pytest.mark.parametrize("case", bad_constructors(), ids=lambda c: c[0])
def test_bad_constructor_arguments_leave_the_model_alone(case):
    _, kwargs, error, message = case
    model = kwargs.pop("model", None)
    model = make_model() if model is None else model
    ptrs = [p.data_ptr() for p in model.parameters()] if isinstance(model, nn.Module) else None
    with pytest.raises(error, match=message):
        sema.SwitchEMA(model, **kwargs)
    if ptrs is not None:
        assert ptrs == [p.data_ptr() for p in model.parameters()]


@pytest.mark.parametrize("how", ["to_double", "assign", "data"])
def test_param_moved_out_of_its_bucket_is_detected(how):
    model = make_model()
    ema = sema.SwitchEMA(model)
    ema.update()
    before = emas_of(ema)
    if how == "to_double":
        model.double()
    elif how == "assign":
        model.load_state_dict({k: v.clone() for k, v in model.state_dict().items()}, assign=True)
    else:
        model[0].weight.data = model[0].weight.data.clone()
    with pytest.raises(sema.BucketMovedError, match=r"0\.weight"):
        ema.update()
    with pytest.raises(sema.BucketMovedError):
        ema.switch()
    for name, value in emas_of(ema).items():
        assert_bits_equal(value, before[name], f"EMA {name} after a refused update")


def test_skip_nonfinite_keeps_the_ema_clean():
    model = make_model()
    ema = sema.SwitchEMA(model, decay=0.5, skip_nonfinite=True)
    before = emas_of(ema)
    with torch.no_grad():
        model[0].weight[0, 0] = float("inf")
    ema.update()
    assert ema.num_skipped == 1 and ema.step == 0
    for name, value in emas_of(ema).items():
        assert_bits_equal(value, before[name], name)
    with torch.no_grad():
        model[0].weight[0, 0] = 0.0
    ema.update()
    assert ema.step == 1


# --- torch.compile ----------------------------------------------------------------------------


@pytest.mark.parametrize("warmup", [None, "power"])
def test_compiled_update_has_no_graph_break_and_no_recompile(warmup):
    torch._dynamo.reset()
    model = make_model()
    eager_model = make_model()
    ema = sema.SwitchEMA(model, decay=0.9, warmup=warmup)
    eager = sema.SwitchEMA(eager_model, decay=0.9, warmup=warmup)
    counter = torch._dynamo.testing.CompileCounter()
    update = torch.compile(ema.update, fullgraph=True, backend=counter)
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (model, eager_model)]
    for i, (x, y) in enumerate(batches(6)):
        train_step(model, opts[0], x, y)
        if i == 0:
            update()
        else:  # a recompile now raises, naming the guard that failed
            with torch._dynamo.config.patch(error_on_recompile=True):
                update()
        train_step(eager_model, opts[1], x, y)
        eager.update()
    assert counter.frame_count == 1, "update() recompiled"
    assert ema.step == 6
    a, b = emas_of(ema), emas_of(eager)
    for name in a:
        assert_bits_equal(a[name], b[name], name)


def test_compiled_update_with_inductor_runs():
    torch._dynamo.reset()
    model = make_model()
    ema = sema.SwitchEMA(model, decay=0.9)
    update = torch.compile(ema.update, fullgraph=True)
    for _ in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)
        update()
    assert ema.step == 3


def test_reset_restarts_the_average_from_the_params():
    model = make_model()
    ema = sema.SwitchEMA(model, decay=0.5, warmup="power")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update()
    assert ema.step == 1
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3.0)
    ema.reset()
    assert ema.step == 0
    emas = emas_of(ema)
    for name, p in model.named_parameters():
        assert_bits_equal(emas[name], p.detach(), name)


@pytest.mark.parametrize("setting", ["1", "0"])
def test_large_cpu_buckets_ask_for_huge_pages(setting, monkeypatch):
    """CPU buckets of 8 MiB and more are madvise()d MADV_HUGEPAGE over their whole 2 MiB-aligned
    interior; SEMA_HUGEPAGES=0 turns that off. Values and the zero padding are unaffected."""
    from sema import buckets

    calls = []
    monkeypatch.setattr(buckets, "_madvise_hugepage", lambda address, length: calls.append((address, length)))
    monkeypatch.setattr(buckets, "_LINUX", True)
    monkeypatch.setenv("SEMA_HUGEPAGES", setting)
    model = nn.Sequential(nn.Linear(1500, 1500), nn.Linear(1500, 3, bias=False))  # 9 MB of fp32
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ema = sema.SwitchEMA(model, backend="torch")
    bucket = ema.buckets[0]
    for name, p in model.named_parameters():
        assert_bits_equal(p.detach(), before[name], name)
    assert int(torch.count_nonzero(bucket.param_flat)) == sum(int(torch.count_nonzero(v)) for v in before.values())
    assert_bits_equal(bucket.ema_flat, bucket.param_flat, "EMA starts as the params")
    if setting == "0":
        assert calls == []
        return
    assert len(calls) == 2  # the param bucket and the EMA bucket
    huge = buckets.HUGE_PAGE_BYTES
    for (address, length), flat in zip(calls, (bucket.param_flat, bucket.ema_flat), strict=True):
        start, end = flat.data_ptr(), flat.data_ptr() + flat.numel() * flat.element_size()
        assert address % huge == 0 and length % huge == 0 and length > 0
        assert start <= address and address + length <= end
        assert address - start < huge and end - (address + length) < huge  # the whole interior


def test_small_buckets_and_non_linux_skip_huge_pages(monkeypatch):
    from sema import buckets

    calls = []
    monkeypatch.setattr(buckets, "_madvise_hugepage", lambda address, length: calls.append((address, length)))
    sema.SwitchEMA(nn.Linear(100, 100), backend="torch")  # 40 KB
    monkeypatch.setattr(buckets, "_LINUX", False)
    sema.SwitchEMA(nn.Linear(1500, 1500), backend="torch")
    assert calls == []


def test_madvise_hugepage_really_asks_the_kernel():
    """The real call: a Linux kernel with transparent huge pages accepts it for a 2 MiB-aligned
    range (whatever the THP mode; "never" makes it a no-op)."""
    import os

    from sema import buckets

    if not buckets._LINUX or not os.path.isdir("/sys/kernel/mm/transparent_hugepage"):
        pytest.skip("needs Linux with transparent huge pages (else madvise says EINVAL)")
    flat = buckets._empty(3 * buckets.HUGE_PAGE_BYTES, torch.uint8, torch.device("cpu"))
    start = -(-flat.data_ptr() // buckets.HUGE_PAGE_BYTES) * buckets.HUGE_PAGE_BYTES
    assert buckets._madvise_hugepage(start, buckets.HUGE_PAGE_BYTES)

"""The options that let users of other EMA libraries keep their behaviour (issue #15): start
control (``update_after_step``), the ``"inverse"`` warmup, ``update_every`` without compensation,
``include``/``exclude``/``copy_only``, the warning for params unfrozen later, and the study's
warning about EMAs that span an epoch or more. Each against a plain float64 loop written from the
documented formula; the peers themselves are in test_migration.py."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import assert_bits_equal, cpu_backends
from torch import nn

import sema


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 2))


def trajectory(model: nn.Module, steps: int, seed: int = 1) -> list[dict[str, torch.Tensor]]:
    """Param values after each of ``steps`` random in-place steps (applied to ``model``)."""
    generator = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=generator) * 0.1)
        out.append({n: p.detach().clone() for n, p in model.named_parameters()})
    return out


def reference_emas(initial: dict[str, torch.Tensor], params: list[dict], decays: list[float | None]) -> list[dict]:
    """float64 EMA after each call; ``decays[c]`` is the decay of call c (0: a copy, None: no update)."""
    ema = {n: v.double() for n, v in initial.items()}
    out = []
    for step, decay in zip(params, decays, strict=True):
        if decay is not None:
            ema = {n: decay * e + (1.0 - decay) * step[n].double() for n, e in ema.items()}
        out.append(dict(ema))
    return out


def run_and_compare(options: dict, decays: list[float | None], backend: str, steps: int) -> None:
    model = make_model()
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    ema = sema.SwitchEMA(model, switch_every=None, backend=backend, **options)
    params = []
    generator = torch.Generator().manual_seed(1)
    got = []
    for _ in range(steps):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=generator) * 0.1)
        params.append({n: p.detach().clone() for n, p in model.named_parameters()})
        ema.update()
        got.append({n: e.clone() for n, e in ema.state_dict()["ema"].items()})
    expected = reference_emas(initial, params, decays)
    for c, (g, x) in enumerate(zip(got, expected, strict=True)):
        for name in g:
            if decays[c] == 0.0:  # a copy is exact
                assert_bits_equal(g[name], params[c][name], f"call {c}: {name} should be a copy")
            torch.testing.assert_close(
                g[name].double(), x[name], rtol=2e-6, atol=1e-6, msg=lambda m, c=c, name=name: f"call {c} {name}: {m}"
            )


@pytest.mark.parametrize("backend", cpu_backends())
def test_update_after_step_copies_then_the_schedule_starts_at_zero(backend):
    decay, n = 0.8, 3
    # copies for calls 0..2, then the power warmup from t = 0 (itself a copy), t = 1, 2, ...
    schedule = sema.DecaySchedule(decay, "power", power=0.75)
    decays = [0.0] * n + [schedule.decay_at(t) for t in range(12)]
    run_and_compare({"decay": decay, "warmup": "power", "power": 0.75, "update_after_step": n}, decays, backend, 15)


@pytest.mark.parametrize("backend", cpu_backends())
def test_inverse_warmup_counts_averaging_updates_from_one(backend):
    decay = 0.95
    decays = [min(decay, (1 + k) / (10 + k)) for k in range(1, 31)]  # torch_ema: num_updates = 1 first
    run_and_compare({"decay": decay, "warmup": "inverse"}, decays, backend, 30)
    # diffusers: the first step() copies, then (1 + s) / (10 + s) for s = 1, 2, ...
    decays = [0.0] + [min(decay, (1 + s) / (10 + s)) for s in range(1, 30)]
    run_and_compare({"decay": decay, "warmup": "inverse", "update_after_step": 1}, decays, backend, 30)


@pytest.mark.parametrize("compensate", [True, False])
@pytest.mark.parametrize("after", [0, 4])
def test_update_every_with_and_without_compensation(compensate, after):
    decay, K, calls = 0.7, 3, 14
    decays = []
    for c in range(calls):
        fires = (c + 1) % K == 0 if compensate else c % K == 0
        if not fires:
            decays.append(None)
        elif c < after:
            decays.append(0.0)
        else:
            decays.append(decay**K if compensate else decay)
    options = {"decay": decay, "update_every": K, "compensate_update_every": compensate, "update_after_step": after}
    run_and_compare(options, decays, "torch", calls)


def test_update_after_step_compiles_with_no_graph_break_and_matches_eager():
    torch._dynamo.reset()
    options = {"decay": 0.9, "warmup": "inverse", "update_after_step": 2, "switch_every": None}
    compiled_model, eager_model = make_model(), make_model()
    compiled, eager = sema.SwitchEMA(compiled_model, **options), sema.SwitchEMA(eager_model, **options)
    update = torch.compile(compiled.update, fullgraph=True)
    for a, b in zip(trajectory(compiled_model, 6), trajectory(eager_model, 6), strict=True):
        assert all(torch.equal(a[n], b[n]) for n in a)
        update()
        eager.update()
    for name, e in compiled.state_dict()["ema"].items():
        assert_bits_equal(e, eager.state_dict()["ema"][name], name)


def test_weight_at_mirrors_the_device_weights():
    for warmup, options in ((None, {}), ("inverse", {}), ("power", {"power": 0.5}), ("linear", {"warmup_steps": 7})):
        for compensate in (True, False):
            schedule = sema.DecaySchedule(0.9, warmup, update_every=2, copy_updates=3, compensate=compensate, **options)
            for j in range(20):
                device = float(schedule.weight(torch.tensor(j)))
                assert device == pytest.approx(schedule.weight_at(j), rel=1e-6, abs=0), (warmup, compensate, j)


# --- which params ------------------------------------------------------------------------------


def test_include_exclude_pick_params_by_name():
    model = make_model()
    bias_ptrs = [model[0].bias.data_ptr(), model[2].bias.data_ptr()]
    ema = sema.SwitchEMA(model, include=["0.*", "2.weight"], exclude="*.bias")
    assert [model[0].bias.data_ptr(), model[2].bias.data_ptr()] == bias_ptrs, "untracked params stay where they are"
    assert sorted(ema.state_dict()["ema"]) == ["0.weight", "2.weight"]
    untracked = (model[0].bias, model[2].bias)
    assert all(not any(p is q for b in ema.buckets for q in b.params) for p in untracked)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"include": ["encoder.*"]}, "include pattern"),
        ({"exclude": "nothing.here"}, "exclude pattern"),
        ({"copy_only": ["9.*"]}, "copy_only pattern"),
        ({"include": 3}, "list of str"),
        ({"include": ["*.bias"], "exclude": ["*"]}, "no trainable parameters"),
    ],
)
def test_patterns_that_select_nothing_are_refused(kwargs, match):
    model = make_model()
    before = [p.data_ptr() for p in model.parameters()]
    with pytest.raises((TypeError, ValueError), match=match):
        sema.SwitchEMA(model, **kwargs)
    assert [p.data_ptr() for p in model.parameters()] == before


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("flatten", [True, False], ids=["buckets", "multi-tensor"])
def test_copy_only_params_are_copied_at_every_update_in_their_own_bucket(backend, flatten):
    model = make_model()
    ema = sema.SwitchEMA(model, decay=0.9, copy_only=["*.bias"], backend=backend, flatten=flatten)
    holders = ema.buckets if flatten else ema.tensor_groups
    assert len(holders) == 2, "copy-only params must get a bucket (or group) of their own"
    for seed in range(4):
        step = trajectory(model, 1, seed=seed)[0]
        ema.update()
        state = ema.state_dict()["ema"]
        for name in ("0.bias", "2.bias"):
            assert_bits_equal(state[name], step[name], f"copy-only {name}")
        assert not torch.equal(state["0.weight"], step["0.weight"]), "averaged params must not be copies"


def test_copy_only_costs_one_launch_per_bucket():
    from sema import ops

    model = make_model()
    ema = sema.SwitchEMA(model, decay=0.9, copy_only=["*.bias"], backend="torch")
    calls = []
    original = ops.dispatch_update

    def counting(*args, **kwargs):
        calls.append(args[2])
        return original(*args, **kwargs)

    ops.dispatch_update = counting
    try:
        ema.update()
    finally:
        ops.dispatch_update = original
    assert len(calls) == 2 and 1.0 in calls, calls


def test_params_unfrozen_later_are_reported_once():
    model = make_model()
    model[2].weight.requires_grad_(False)
    ema = sema.SwitchEMA(model, decay=0.9, switch_every=None)
    assert "2.weight" not in ema.state_dict()["ema"]
    with warnings.catch_warnings():
        warnings.simplefilter("error", sema.UntrackedParamWarning)
        ema.update()
        ema.epoch_end()  # still frozen: nothing to say
    model[2].weight.requires_grad_(True)
    ema.update()  # the check is not on the update path
    with pytest.warns(sema.UntrackedParamWarning, match=r"not averaged.*: 2\.weight"):
        ema.epoch_end()
    with warnings.catch_warnings():
        warnings.simplefilter("error", sema.UntrackedParamWarning)
        ema.epoch_end()
        ema.state_dict()


# --- the study's warning -------------------------------------------------------------------------


def run_epochs(ema: sema.SwitchEMA, epochs: int, per_epoch: int) -> None:
    for _ in range(epochs):
        for _ in range(per_epoch):
            ema.update()
        ema.epoch_end()


@pytest.mark.parametrize("update_every", [1, 2])
def test_a_long_horizon_warns_once_at_the_first_switch(update_every):
    ema = sema.SwitchEMA(make_model(), decay=0.99, update_every=update_every)  # 10 x 0.01 = 0.1 per epoch
    with pytest.warns(sema.SwitchHorizonWarning, match=r"10 updates per epoch.*switch_every=None") as record:
        run_epochs(ema, 1, 10 * update_every)
    assert len([w for w in record if w.category is sema.SwitchHorizonWarning]) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error", sema.SwitchHorizonWarning)
        run_epochs(ema, 2, 10 * update_every)


@pytest.mark.parametrize(
    "options, per_epoch",
    [
        ({"decay": 0.9}, 10),  # 10 x 0.1 = 1.0: the EMA spans a tenth of an epoch
        ({"decay": 0.99, "switch_every": None}, 10),  # never switches
    ],
)
def test_a_short_horizon_or_no_switch_does_not_warn(options, per_epoch):
    ema = sema.SwitchEMA(make_model(), **options)
    with warnings.catch_warnings():
        warnings.simplefilter("error", sema.SwitchHorizonWarning)
        run_epochs(ema, 3, per_epoch)


def test_the_horizon_warning_is_easy_to_silence():
    ema = sema.SwitchEMA(make_model(), decay=0.999)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        warnings.filterwarnings("ignore", category=sema.SwitchHorizonWarning)
        run_epochs(ema, 1, 5)
    assert not [w for w in record if w.category is sema.SwitchHorizonWarning]

"""Ordinary things users do around a ``SwitchEMA``: each is either correct or refused with a
clear error before anything changes (issue #13). The counters under ``torch.compile`` are in
test_update_host_path.py; buckets and the functional ops in test_buckets_reliability.py and
test_ops_validation.py."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from conftest import assert_bits_equal, cpu_backends
from torch import nn

import sema
from sema.switch_ema import SwappedWriteError

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def make_model(dtype: torch.dtype = torch.float32, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)).to(dtype)


def snapshot(model: nn.Module, ema: sema.SwitchEMA) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
    return [p.detach().clone() for p in model.parameters()], {n: e.clone() for n, e in ema.state_dict()["ema"].items()}


def drift(model: nn.Module, generator: torch.Generator) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=generator).to(p.dtype))


# --- 1. training inside swapped() -----------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("optimizer", ["sgd", "adam-foreach", "adamw-fused"])
def test_optimizer_step_inside_swapped_is_refused_before_it_writes(dtype, optimizer):
    model = make_model(dtype)
    ema = sema.SwitchEMA(model, decay=0.5)
    generator = torch.Generator().manual_seed(1)
    drift(model, generator)
    ema.update()
    drift(model, generator)
    if optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
    elif optimizer == "adam-foreach":
        opt = torch.optim.Adam(model.parameters(), lr=0.1, foreach=True)
    else:
        if dtype != torch.float32:
            pytest.skip("fused AdamW on the CPU: fp32 here")
        opt = torch.optim.AdamW(model.parameters(), lr=0.1, fused=True)
    live, averaged = snapshot(model, ema)
    with pytest.raises(RuntimeError, match=r"optimizer.step\(\) inside SwitchEMA.swapped\(\).*Nothing was written"):
        with ema.swapped():
            model(torch.randn(4, 6).to(dtype)).float().sum().backward()
            opt.step()
    after_live, after_ema = snapshot(model, ema)
    for i, (a, b) in enumerate(zip(after_live, live, strict=True)):
        assert_bits_equal(a, b, f"live param {i}")
    for name in averaged:
        assert_bits_equal(after_ema[name], averaged[name], f"EMA {name}")
    opt.step()  # after the block it trains the live weights as usual


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("flatten", [True, False], ids=["buckets", "multi-tensor"])
def test_in_place_writes_inside_swapped_raise_and_say_what_each_tensor_holds(dtype, flatten):
    model = make_model(dtype)
    ema = sema.SwitchEMA(model, decay=0.5, flatten=flatten)
    generator = torch.Generator().manual_seed(2)
    drift(model, generator)
    ema.update()
    drift(model, generator)
    live, averaged = snapshot(model, ema)
    with pytest.raises(SwappedWriteError) as caught:
        with ema.swapped():
            with torch.no_grad():
                model[0].weight.mul_(3.0)
    message = str(caught.value)
    assert "1 param(s) were written" in message and "0.weight" in message
    assert "The live params are back as they were before the block" in message
    after_live, after_ema = snapshot(model, ema)
    for i, (a, b) in enumerate(zip(after_live, live, strict=True)):
        assert_bits_equal(a, b, f"live param {i}")
    for name in averaged:
        if name != "0.weight":
            assert_bits_equal(after_ema[name], averaged[name], f"EMA {name} (not written)")
    if dtype == torch.float16:  # a scratch copy: the EMA is intact, the write is lost
        assert "is unchanged" in message and "ema.reset()" not in message
        assert_bits_equal(after_ema["0.weight"], averaged["0.weight"], "EMA 0.weight")
    else:  # exchanged slots: the EMA took the write, and the message says so
        assert "now holds the written weights" in message and "ema.reset()" in message
        if dtype == torch.float32:
            assert_bits_equal(after_ema["0.weight"], averaged["0.weight"] * 3.0, "EMA 0.weight holds the write")
        else:  # bf16 packing: the written bf16 value is back in the EMA's high half, its own low half kept
            torch.testing.assert_close(after_ema["0.weight"], averaged["0.weight"] * 3.0, rtol=2**-6, atol=0)


def test_swapped_without_writes_still_restores_bit_for_bit():
    model = make_model(torch.bfloat16)
    ema = sema.SwitchEMA(model, decay=0.5)
    drift(model, torch.Generator().manual_seed(3))
    ema.update()
    live, averaged = snapshot(model, ema)
    with ema.swapped():
        model(torch.randn(2, 6).bfloat16())
    after_live, after_ema = snapshot(model, ema)
    for i, (a, b) in enumerate(zip(after_live, live, strict=True)):
        assert_bits_equal(a, b, f"live param {i}")
    for name in averaged:
        assert_bits_equal(after_ema[name], averaged[name], name)


def test_an_optimizer_over_other_params_may_step_inside_swapped():
    model, other = make_model(), make_model(seed=1)
    ema = sema.SwitchEMA(model, decay=0.5)
    opt = torch.optim.SGD(other.parameters(), lr=0.1)
    with ema.swapped():
        other(torch.randn(2, 6)).sum().backward()
        opt.step()


# --- 2. load_state_dict checks everything before it writes ----------------------------------


def broken_states(state: dict) -> list[tuple[str, dict]]:
    cases = []
    for key in ("step", "calls", "epochs"):
        missing = dict(state)
        del missing[key]
        cases.append((f"missing {key}", missing))
    for key, value in (("step", -1), ("calls", "3"), ("epochs", 1.5), ("step", True), ("num_switches", None)):
        cases.append((f"{key}={value!r}", {**state, key: value}))
    cases.append(("config not a dict", {**state, "config": [1, 2]}))
    return cases


@pytest.mark.parametrize("case", range(9))
def test_load_state_dict_with_a_bad_counter_changes_nothing(case):
    model = make_model()
    ema = sema.SwitchEMA(model, decay=0.5, buffers="copy")
    generator = torch.Generator().manual_seed(4)
    for _ in range(3):
        drift(model, generator)
        ema.update()
    good = ema.state_dict()
    other = sema.SwitchEMA(make_model(seed=5), decay=0.5, buffers="copy")
    other.update()
    name, bad = broken_states(good)[case]
    bad["ema"] = {n: e + 1 for n, e in good["ema"].items()}  # would change the EMA if written
    before = ema.state_dict()
    with pytest.raises(ValueError, match=r"counter|config"):
        ema.load_state_dict(bad)
    after = ema.state_dict()
    for key in ("step", "calls", "epochs", "num_switches", "num_skipped"):
        assert after[key] == before[key], (name, key)
    for n in before["ema"]:
        assert_bits_equal(after["ema"][n], before["ema"][n], f"{name}: EMA {n}")


def test_load_state_dict_still_loads_a_good_state_exactly():
    model = make_model()
    ema = sema.SwitchEMA(model, decay=0.5)
    for _ in range(3):
        drift(model, torch.Generator().manual_seed(6))
        ema.update()
    state = ema.state_dict()
    fresh = sema.SwitchEMA(make_model(seed=7), decay=0.5)
    fresh.load_state_dict(state)
    again = fresh.state_dict()
    assert (again["step"], again["calls"], again["epochs"]) == (3, 3, 0)
    for n in state["ema"]:
        assert_bits_equal(again["ema"][n], state["ema"][n], n)


# --- 7. construction refuses what cannot work, before any param moves ----------------------


def expanded_bias() -> nn.Module:
    model = make_model()
    model[0].bias = nn.Parameter(torch.randn(1).expand(8))
    return model


def meta_layer() -> nn.Module:
    return nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2, device="meta"))


@pytest.mark.parametrize(
    "build, error, match",
    [
        (expanded_bias, ValueError, r"share memory.*0\.bias"),
        (meta_layer, ValueError, r"meta device.*1\.weight.*to_empty"),
    ],
    ids=["expanded", "meta"],
)
@pytest.mark.parametrize("flatten", [True, False], ids=["buckets", "multi-tensor"])
def test_models_that_cannot_work_are_refused_before_any_param_moves(build, error, match, flatten):
    model = build()
    before = [(p.data_ptr(), p.stride()) for p in model.parameters()]
    with pytest.raises(error, match=match):
        sema.SwitchEMA(model, flatten=flatten)
    assert [(p.data_ptr(), p.stride()) for p in model.parameters()] == before


# --- 9. arguments mean what they say ---------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"flatten": "False"}, "flatten must be True or False"),
        ({"skip_nonfinite": "no"}, "skip_nonfinite must be True or False"),
        ({"skip_nonfinite": 1}, "skip_nonfinite must be True or False"),
        ({"ema_dtype": "float32"}, "ema_dtype must be a torch.dtype"),
        ({"backend": None}, "backend must be a str"),
        ({"decay": True}, "decay must be a float"),
        ({"warmup": "exp", "warmup_steps": 5, "warmup_ratio": True}, "warmup_ratio"),
        ({"warmup": "power", "inv_gamma": True}, "inv_gamma"),
        ({"warmup": "power", "power": True}, "power"),
        ({"update_every": True}, "update_every"),
        ({"switch_every": True}, "switch_every"),
    ],
    ids=lambda v: str(v) if isinstance(v, dict) else "",
)
def test_bools_strings_and_numbers_are_not_confused(kwargs, match):
    model = make_model()
    before = [p.data_ptr() for p in model.parameters()]
    with pytest.raises((TypeError, ValueError), match=match):
        sema.SwitchEMA(model, **kwargs)
    assert [p.data_ptr() for p in model.parameters()] == before


def test_update_switch_must_be_a_bool():
    ema = sema.SwitchEMA(make_model())
    with pytest.raises(TypeError, match="switch must be True or False"):
        ema.update(switch="no")
    assert ema.step == 0


# --- beyond the list: copies, pickles, parametrizations, torch.func -------------------------


def test_deepcopy_and_pickle_of_the_ema_are_refused_with_the_way_to_copy():
    model = make_model()
    ema = sema.SwitchEMA(model)
    with pytest.raises(TypeError, match="load_state_dict"):
        copy.deepcopy(ema)
    with pytest.raises(TypeError, match="state_dict"):
        pickle.dumps(ema)
    twin = copy.deepcopy(model)  # the model itself copies (unbucketed), and the recipe works
    new = sema.SwitchEMA(twin)
    new.load_state_dict(ema.state_dict())
    ema.update()  # the original is untouched by all this


@pytest.mark.parametrize("backend", cpu_backends())
def test_parametrized_weights_are_averaged_through_their_originals(backend):
    torch.manual_seed(0)
    model = nn.Sequential(nn.utils.parametrizations.weight_norm(nn.Linear(4, 4)), nn.Linear(4, 2))
    ema = sema.SwitchEMA(model, decay=0.5, backend=backend)
    names = {n for n, _, _ in ema.storage.named_emas()}
    assert {"0.parametrizations.weight.original0", "0.parametrizations.weight.original1"} <= names
    drift(model, torch.Generator().manual_seed(8))
    ema.update()
    x = torch.randn(3, 4)
    with ema.swapped():
        inside = model(x)
    reference = copy.deepcopy(model)
    reference.load_state_dict(ema.averaged_state_dict())
    torch.testing.assert_close(inside, reference(x), rtol=0, atol=0)


def test_functional_call_leaves_the_buckets_in_place():
    model = make_model()
    ema = sema.SwitchEMA(model, decay=0.5)
    replacement = {n: p.detach().clone() + 1 for n, p in model.named_parameters()}
    torch.func.functional_call(model, replacement, (torch.randn(2, 6),))
    ema.update()  # no BucketMovedError: functional_call puts the original params back
    assert ema.step == 1


def non_dense_weight() -> nn.Module:
    model = make_model()
    model[0].weight = nn.Parameter(torch.randn(8, 12)[:, ::2])  # gaps: not addressable in place
    return model


def tied_pair() -> nn.Module:
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    model[1].weight = nn.Parameter(model[0].weight)  # old-style tie: two Parameters, one memory
    return model


def param_over_a_buffer() -> nn.Module:
    model = nn.Sequential(nn.Linear(4, 4))
    model.register_buffer("shadow", model[0].bias.detach())
    return model


@pytest.mark.parametrize(
    "build, flatten, match",
    [
        (non_dense_weight, False, r"flatten=False.*0\.weight \(shape \(8, 6\)"),
        (tied_pair, False, r"'0\.weight' and '1\.weight' are distinct Parameters"),
        (param_over_a_buffer, True, r"'0\.bias' shares memory with 'shadow'"),
    ],
    ids=["non-dense in place", "tie in place", "param over a buffer"],
)
def test_layouts_and_aliases_that_cannot_work_are_refused_at_construction(build, flatten, match):
    model = build()
    before = [(p.data_ptr(), p.stride(), p.detach().clone()) for p in model.parameters()]
    with pytest.raises(ValueError, match=match):
        sema.SwitchEMA(model, flatten=flatten)
    for (ptr, stride, value), p in zip(before, model.parameters(), strict=True):
        assert (p.data_ptr(), p.stride()) == (ptr, stride)
        assert_bits_equal(p.detach(), value, "param")

"""K decays in one fused pass (issue #14 section 2): ``sema.ops.ema_update_k_`` on every backend
that has it equals K single updates bit for bit, and ``SwitchEMA(decay=(d0, d1, ...))`` keeps K
EMAs, each equal to a one-decay ``SwitchEMA`` bit for bit."""

from __future__ import annotations

import pytest
import torch
from conftest import DTYPE_PAIRS, assert_bits_equal, cpu_backends, pair_id, poisoned, random_values
from torch import nn

import sema
from sema import ops


def k_backends() -> list[str]:
    return [b for b in cpu_backends() if ops.has_update_k(b)]


def single_updates(emas, param, ws, switch_index, backend):
    """The specification: K single updates with w = ws[k] as a 0-d tensor, then the switch."""
    for k, e in enumerate(emas):
        ops.ema_update_(e, param, ws[k], backend=backend)
    if switch_index is not None:
        ops.switch_(emas[switch_index], param, backend=backend)


@pytest.mark.parametrize("backend", k_backends())
@pytest.mark.parametrize("pair", DTYPE_PAIRS, ids=pair_id)
@pytest.mark.parametrize("n", [0, 1, 17, 4097, 2**20 + 3])
@pytest.mark.parametrize("k, switch_index", [(1, None), (2, None), (2, 1), (3, 0), (8, 7)])
def test_k_emas_in_one_pass_equal_k_single_updates(backend, pair, n, k, switch_index):
    if backend == "triton" and n > 4097:
        pytest.skip("Triton's CPU interpreter takes minutes here; tests/test_kema_triton.py covers its block edges")
    param_dtype, ema_dtype = pair
    generator = torch.Generator().manual_seed(n + 31 * k)
    param = random_values(n, param_dtype, generator)
    emas = [random_values(n, ema_dtype, generator) for _ in range(k)]
    ws = torch.rand(k, generator=generator)
    ws[0] = 1.0 if k > 1 else ws[0]  # a copy among them
    ref_param, ref_emas = param.clone(), [e.clone() for e in emas]
    for _ in range(3):  # stateful: several steps, fresh params each time
        fresh = random_values(n, param_dtype, generator)
        param.copy_(fresh)
        ref_param.copy_(fresh)
        ops.ema_update_k_(emas, param, ws, switch_index, backend=backend)
        single_updates(ref_emas, ref_param, ws, switch_index, backend)
        for j, (a, b) in enumerate(zip(emas, ref_emas, strict=True)):
            assert_bits_equal(a, b, f"EMA {j}")
        assert_bits_equal(param, ref_param, "param")


@pytest.mark.parametrize("backend", k_backends())
def test_the_multi_form_equals_k_single_updates_and_writes_every_element(backend):
    generator = torch.Generator().manual_seed(5)
    shapes = [(3, 5), (17,), (0,), (64, 2)]
    params = [torch.randn(s, generator=generator) for s in shapes]
    emas = [[torch.randn(s, generator=generator) for s in shapes] for _ in range(3)]
    ref = [[e.clone() for e in per] for per in emas]
    ref_params = [p.clone() for p in params]
    ws = torch.tensor([0.1, 0.5, 1.0])
    ops.ema_update_k_multi_(emas, params, ws, switch_index=2, backend=backend)
    for i in range(len(shapes)):
        single_updates([per[i].view(-1) for per in ref], ref_params[i].view(-1), ws, 2, backend)
        for k in range(3):
            assert_bits_equal(emas[k][i], ref[k][i], f"EMA {k} of tensor {i}")
        assert_bits_equal(params[i], ref_params[i], f"param {i}")


def test_a_wrong_k_update_is_caught():
    """Negative control: an implementation whose EMAs read the param after the switch."""
    generator = torch.Generator().manual_seed(6)
    param = torch.randn(33, generator=generator)
    emas = [torch.randn(33, generator=generator) for _ in range(2)]
    ref_param, ref = param.clone(), [e.clone() for e in emas]
    ws = torch.tensor([0.3, 0.6])
    ops.ema_update_(emas[0], param, ws[0], switch=True, backend="torch")  # switches too early
    ops.ema_update_(emas[1], param, ws[1], backend="torch")
    single_updates(ref, ref_param, ws, 0, "torch")
    with pytest.raises(AssertionError, match="differ bitwise"):
        assert_bits_equal(emas[1], ref[1], "EMA 1")


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda e, p: ops.ema_update_k_([], p, []), "emas is empty"),
        (lambda e, p: ops.ema_update_k_([e, e], p, [0.1, 0.2]), "share memory"),
        (lambda e, p: ops.ema_update_k_([e], p, [0.1, 0.2]), "1 weights"),
        (lambda e, p: ops.ema_update_k_([e], p, [1.5]), "outside"),
        (lambda e, p: ops.ema_update_k_([e], p, [0.1], switch_index=1), "switch_index"),
        (lambda e, p: ops.ema_update_k_([e, e.half()], p, [0.1, 0.2]), "dtype"),
        (lambda e, p: ops.ema_update_k_([e], p, torch.tensor([[0.1]])), "1-D"),
    ],
)
def test_bad_k_calls_change_nothing(call, match):
    e, p = torch.randn(8), torch.randn(8)
    before = e.clone(), p.clone()
    with pytest.raises((TypeError, ValueError), match=match):
        call(e, p)
    assert_bits_equal(e, before[0], "ema")
    assert_bits_equal(p, before[1], "param")


# --- SwitchEMA with several decays -------------------------------------------------------------


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 9), nn.ReLU(), nn.Linear(9, 4))


def drift(models: list[nn.Module], generator: torch.Generator) -> None:
    with torch.no_grad():
        for params in zip(*(m.parameters() for m in models), strict=True):
            delta = torch.randn(params[0].shape, generator=generator)
            for p in params:
                p.add_(delta)


@pytest.mark.parametrize("backend", k_backends())
@pytest.mark.parametrize("flatten", [True, False], ids=["buckets", "multi-tensor"])
@pytest.mark.parametrize("warmup", [None, "inverse"])
def test_k_decays_equal_k_one_decay_emas(backend, flatten, warmup):
    decays = (0.9, 0.5, 0.99)
    model = make_model()
    alone = [make_model() for _ in decays]
    options = {"warmup": warmup, "switch_every": 4, "backend": backend, "flatten": flatten}
    ema = sema.SwitchEMA(model, decay=decays, **options)
    singles = [sema.SwitchEMA(m, decay=d, **options) for m, d in zip(alone, decays, strict=True)]
    assert ema.decays == decays and ema.decay == decays[0]
    generator = torch.Generator().manual_seed(1)
    for _ in range(9):  # switches (EMA 0) fused into updates 4 and 8
        drift([model, *alone], generator)
        ema.update()
        for s in singles:
            s.update()
    state = ema.state_dict()
    assert isinstance(state["ema"], list) and len(state["ema"]) == 3
    for (name, p), q in zip(model.named_parameters(), alone[0].parameters(), strict=True):  # EMA 0 switched in
        assert_bits_equal(p.detach(), q.detach(), f"live {name}")
    for k in range(3):
        averaged = ema.averaged_state_dict(index=k)
        for name, e in state["ema"][k].items():
            if k == 0:  # the others' live models switched to their own EMAs: compare EMA 0 directly
                assert_bits_equal(e, singles[0].state_dict()["ema"][name], f"EMA 0 {name}")
            assert_bits_equal(averaged[name], e.to(averaged[name].dtype), f"averaged_state_dict(index={k}) {name}")


def test_each_of_k_emas_against_a_lone_ema_on_one_trajectory():
    """With no switch, EMA k of one SwitchEMA equals a one-decay SwitchEMA, bit for bit."""
    decays = (0.9, 0.5, 0.99, 0.0)
    model = make_model()
    alone = [make_model() for _ in decays]
    ema = sema.SwitchEMA(model, decay=decays, switch_every=None, backend="torch")
    singles = [
        sema.SwitchEMA(m, decay=d, switch_every=None, backend="torch") for m, d in zip(alone, decays, strict=False)
    ]
    generator = torch.Generator().manual_seed(2)
    for _ in range(6):
        drift([model, *alone], generator)
        ema.update()
        for s in singles:
            s.update()
    state = ema.state_dict()["ema"]
    for k, single in enumerate(singles):
        for name, e in single.state_dict()["ema"].items():
            assert_bits_equal(state[k][name], e, f"EMA {k} {name}")


def test_switch_swapped_module_and_state_pick_an_index():
    model = make_model()
    ema = sema.SwitchEMA(model, decay=(0.9, 0.5), switch_every=None, backend="torch")
    drift([model], torch.Generator().manual_seed(3))
    ema.update()
    state = ema.state_dict()["ema"]
    x = torch.randn(2, 5)
    for k in (0, 1):
        with ema.swapped(index=k):
            inside = model(x)
            for name, p in model.named_parameters():
                assert_bits_equal(p.detach(), state[k][name], f"swapped(index={k}) {name}")
        assert_bits_equal(ema.as_module(k)(x), inside, f"as_module({k})")
    ema.switch(index=1)
    for name, p in model.named_parameters():
        assert_bits_equal(p.detach(), state[1][name], f"switch(index=1) {name}")
    for call in (lambda: ema.switch(index=2), lambda: ema.averaged_state_dict(index=-1), lambda: ema.as_module(5)):
        with pytest.raises(IndexError, match="keeps 2 EMA"):
            call()


def test_k_states_load_only_into_the_same_number_of_emas():
    two = sema.SwitchEMA(make_model(), decay=(0.9, 0.5))
    one = sema.SwitchEMA(make_model(), decay=0.9)
    three = sema.SwitchEMA(make_model(), decay=(0.9, 0.5, 0.1))
    with pytest.raises(ValueError, match="holds 2 EMA"):
        one.load_state_dict(two.state_dict())
    with pytest.raises(ValueError, match="holds 2 EMA"):
        three.load_state_dict(two.state_dict())
    with pytest.raises(ValueError, match="holds 1 EMA"):
        two.load_state_dict(one.state_dict())
    again = sema.SwitchEMA(make_model(seed=3), decay=(0.9, 0.5))
    again.load_state_dict(two.state_dict())
    for k in range(2):
        for name, e in again.state_dict()["ema"][k].items():
            assert_bits_equal(e, two.state_dict()["ema"][k][name], f"EMA {k} {name}")


def test_k_decays_refuse_averaged_buffers_and_an_empty_tuple():
    with pytest.raises(ValueError, match="buffers='ema' with several decays"):
        sema.SwitchEMA(make_model(), decay=(0.9, 0.5), buffers="ema")
    with pytest.raises(ValueError, match="holds no decay"):
        sema.SwitchEMA(make_model(), decay=())
    with pytest.raises(ValueError, match="outside"):
        sema.SwitchEMA(make_model(), decay=(0.9, 1.0))


def test_poisoned_k_outputs_are_all_written():
    param = torch.randn(4099)
    emas = [poisoned(4099, torch.float32) for _ in range(2)]
    for e in emas:
        e.copy_(torch.randn(4099))
    ops.ema_update_k_(emas, param, [1.0, 1.0], backend="torch")  # w = 1 copies: every element written
    for k, e in enumerate(emas):
        assert_bits_equal(e, param, f"EMA {k}")

"""fp64 params (issue #15 section 5): accepted, with an fp64 EMA and the update's math (its weight
included) in fp64, served by the torch backend per bucket whatever the device's backend is, and
said so by ``sema.available_backends()``. Complex params are refused with the reason."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_bits_equal, cpu_backends
from torch import nn

import sema


def make_model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Linear(6, 2))
    model[1].double()  # one fp64 layer beside an fp32 one
    return model


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("warmup", [None, "inverse"])
def test_fp64_params_get_an_fp64_ema_computed_in_fp64(backend, warmup):
    model = make_model()
    ema = sema.SwitchEMA(model, decay=0.9, warmup=warmup, switch_every=None, backend=backend)
    by_dtype = {b.dtype: b for b in ema.buckets}
    assert by_dtype[torch.float64].ema_flat.dtype == torch.float64
    assert ema.storage.backend_of(by_dtype[torch.float64]) == "torch"
    assert ema.storage.backend_of(by_dtype[torch.float32]) == backend
    reference = {n: p.detach().clone() for n, p in model.named_parameters() if p.dtype == torch.float64}
    generator = torch.Generator().manual_seed(1)
    for j in range(6):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=generator, dtype=torch.float64).to(p.dtype) * 1e-3)
        ema.update()
        n = j + 1
        decay = 0.9 if warmup is None else min(0.9, (1 + n) / (10 + n))  # computed in float64
        for name, r in reference.items():
            r.lerp_(dict(model.named_parameters())[name].detach(), 1.0 - decay)
    state = ema.state_dict()["ema"]
    for name, r in reference.items():
        assert state[name].dtype == torch.float64
        # A weight rounded to fp32 would be off by ~1e-9 relative: far outside this bound.
        torch.testing.assert_close(state[name], r, rtol=1e-14, atol=1e-15)


def test_an_fp32_weight_would_be_caught():
    """Negative control: the same loop with the weight rounded to fp32 fails the fp64 bound."""
    e, p = torch.randn(100, dtype=torch.float64), torch.randn(100, dtype=torch.float64)
    exact = e.clone().lerp_(p, 1.0 - 0.9)
    rounded = e.clone().lerp_(p, float(torch.tensor(1.0 - 0.9, dtype=torch.float32)))
    with pytest.raises(AssertionError):
        torch.testing.assert_close(rounded, exact, rtol=1e-14, atol=1e-15)


def test_fp64_swap_and_switch_are_exact():
    model = make_model()
    ema = sema.SwitchEMA(model, decay=0.5, switch_every=None)
    with torch.no_grad():
        model[1].weight.add_(1.0)
    ema.update()
    live = model[1].weight.detach().clone()
    averaged = ema.state_dict()["ema"]["1.weight"]
    with ema.swapped():
        assert_bits_equal(model[1].weight.detach(), averaged, "inside swapped()")
    assert_bits_equal(model[1].weight.detach(), live, "after swapped()")
    ema.switch()
    assert_bits_equal(model[1].weight.detach(), averaged, "after switch()")


def test_available_backends_says_who_serves_fp64():
    for name, (ok, reason) in sema.available_backends("cpu").items():
        if ok and name != "torch":
            assert "fp64 params are served by the torch backend" in reason, (name, reason)


def test_complex_params_are_refused_with_the_reason():
    model = nn.Linear(2, 2)
    model.c = nn.Parameter(torch.randn(3, dtype=torch.complex64))
    before = [p.data_ptr() for p in model.parameters()]
    with pytest.raises(TypeError, match=r"c \(torch.complex64\).*view_as_real"):
        sema.SwitchEMA(model)
    assert [p.data_ptr() for p in model.parameters()] == before

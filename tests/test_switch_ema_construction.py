"""SwitchEMA-level checks of what construction refuses or keeps before anything moves (issue #13
items 3, 4, 7, 8): aliasing across dtypes and frozen params, density where params stay in place,
share_memory() of a multi-tensor group, and failures after the buckets are built."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_bits_equal, assert_params_untouched, param_snapshot
from torch import nn

import sema
from sema.buckets import ParamAliasError


def test_a_trainable_param_over_a_frozen_one_is_refused_before_anything_moves():
    model = nn.Sequential(nn.Linear(4, 4).to(torch.bfloat16), nn.Linear(4, 4), nn.Linear(4, 4))
    model[2].weight = nn.Parameter(model[1].weight, requires_grad=False)
    before = param_snapshot(model)
    with pytest.raises(ParamAliasError, match=r"'1\.weight' shares memory with '2\.weight'.*does not track"):
        sema.SwitchEMA(model, backend="torch")
    assert_params_untouched(model, before)


def test_a_param_over_part_of_another_of_another_dtype_is_refused_before_anything_moves():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    model[1].weight = nn.Parameter(model[0].weight.detach().view(torch.bfloat16)[:, :4])
    before = param_snapshot(model)
    with pytest.raises(ParamAliasError, match=r"'0\.weight'.*'1\.weight'"):
        sema.SwitchEMA(model, backend="torch")
    assert_params_untouched(model, before)


def test_flatten_false_refuses_a_non_dense_param_at_construction():
    model = nn.Linear(4, 6)
    model.weight = nn.Parameter(torch.randn(6, 8)[:, ::2])
    with pytest.raises(ValueError, match=r"weight \(shape \(6, 4\), strides \(8, 2\)\)"):
        sema.SwitchEMA(model, flatten=False, backend="torch")


def test_flatten_false_refuses_old_style_ties_at_construction():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    model[1].weight = nn.Parameter(model[0].weight)
    with pytest.raises(ParamAliasError, match=r"model\.1\.weight = model\.0\.weight"):
        sema.SwitchEMA(model, flatten=False, backend="torch")


def test_flatten_false_share_memory_after_building_is_not_a_move():
    model = nn.Sequential(nn.Linear(5, 7), nn.Linear(7, 3))
    ema = sema.SwitchEMA(model, decay=0.5, flatten=False, switch_every=None, backend="torch")
    model.share_memory()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    expected = {
        n: torch.lerp(e, p.detach(), 0.5)
        for (n, p), e in zip(model.named_parameters(), ema.state_dict()["ema"].values(), strict=True)
    }
    ema.update()
    ema.switch()
    for name, p in model.named_parameters():
        assert_bits_equal(p.detach().flatten(), expected[name].flatten(), name)
    model[0].weight.data = model[0].weight.data.clone()
    with pytest.raises(sema.BucketMovedError, match=r"0\.weight"):
        ema.switch()


def test_a_failure_after_the_buckets_are_built_restores_every_param(monkeypatch):
    model = nn.Sequential(nn.Linear(5, 7), nn.Linear(7, 3).to(torch.bfloat16))
    before = param_snapshot(model)

    def fail(*args, **kwargs):
        raise MemoryError("injected: no memory for the extra EMAs")

    monkeypatch.setattr(sema.storage.EMAStorage, "_add_bucket", fail)
    with pytest.raises(MemoryError, match="injected"):
        sema.SwitchEMA(model, decay=(0.9, 0.5), backend="torch")
    assert_params_untouched(model, before)

"""Any number of ``SwitchEMA`` objects on one model (issue #14 section 1): the second finds the
params in the first one's buckets and shares them (no re-bucketing, no error); each keeps its own
EMA, schedule, counters, policy and state dict."""

from __future__ import annotations

import gc

import pytest
import torch
from conftest import assert_bits_equal, cpu_backends
from torch import nn

import sema


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 9), nn.ReLU(), nn.Linear(9, 4))


def drift_both(models: list[nn.Module], generator: torch.Generator) -> None:
    with torch.no_grad():
        for params in zip(*(m.parameters() for m in models), strict=True):
            delta = torch.randn(params[0].shape, generator=generator)
            for p in params:
                p.add_(delta)


def emas(ema: sema.SwitchEMA) -> dict[str, torch.Tensor]:
    return {n: e.clone() for n, e in ema.state_dict()["ema"].items()}


@pytest.mark.parametrize("backend", cpu_backends())
def test_two_emas_share_the_buckets_and_each_equals_a_lone_ema(backend):
    model, alone_a, alone_b = make_model(), make_model(), make_model()
    slow = sema.SwitchEMA(model, decay=0.9, warmup="inverse", switch_every=None, backend=backend)
    fast = sema.SwitchEMA(model, decay=0.5, switch_every=None, backend=backend)  # no BucketMovedError
    assert fast.buckets[0].param_flat is slow.buckets[0].param_flat, "the second EMA re-bucketed the params"
    assert fast.buckets[0].ema_flat.data_ptr() != slow.buckets[0].ema_flat.data_ptr()
    ref_slow = sema.SwitchEMA(alone_a, decay=0.9, warmup="inverse", switch_every=None, backend=backend)
    ref_fast = sema.SwitchEMA(alone_b, decay=0.5, switch_every=None, backend=backend)
    generator = torch.Generator().manual_seed(1)
    for _ in range(7):
        drift_both([model, alone_a, alone_b], generator)
        slow.update()
        fast.update()
        ref_slow.update()
        ref_fast.update()
    for ours, alone in ((slow, ref_slow), (fast, ref_fast)):
        got, want = emas(ours), emas(alone)
        for name in want:
            assert_bits_equal(got[name], want[name], name)
    assert slow.step == fast.step == 7


def test_each_ema_keeps_its_own_counters_policy_and_state():
    model = make_model()
    a = sema.SwitchEMA(model, decay=0.9)
    b = sema.SwitchEMA(model, decay=0.5, switch_every=None)
    for _ in range(3):
        a.update()
    b.update()
    assert (a.step, b.step) == (3, 1)
    assert a.epoch_end() and not b.epoch_end()
    assert (a.num_switches, b.num_switches) == (1, 0)
    state = b.state_dict()
    other = sema.SwitchEMA(make_model(seed=4), decay=0.5, switch_every=None)
    other.load_state_dict(state)
    for name, e in emas(other).items():
        assert_bits_equal(e, state["ema"][name], name)


def test_a_subset_of_a_shared_bucket_becomes_a_tensor_group():
    model = make_model()
    whole = sema.SwitchEMA(model, decay=0.9, switch_every=None)
    part = sema.SwitchEMA(model, decay=0.5, include=["2.*"], switch_every=None)
    assert not part.buckets and len(part.tensor_groups) == 1
    ptrs = [p.data_ptr() for p in model.parameters()]
    generator = torch.Generator().manual_seed(2)
    drift_both([model], generator)
    whole.update()
    part.update()
    assert [p.data_ptr() for p in model.parameters()] == ptrs, "params moved"
    live = {n: p.detach() for n, p in model.named_parameters()}
    start = make_model()
    for name, e in emas(part).items():
        expected = 0.5 * dict(start.named_parameters())[name].detach() + 0.5 * live[name]
        torch.testing.assert_close(e, expected, rtol=1e-6, atol=1e-7)


def test_a_third_ema_finds_the_buckets_after_the_first_is_gone():
    model = make_model()
    first = sema.SwitchEMA(model)
    second = sema.SwitchEMA(model, decay=0.5)
    flat = first.buckets[0].param_flat
    del first
    gc.collect()
    third = sema.SwitchEMA(model, decay=0.7)
    assert third.buckets[0].param_flat is flat
    second.update()
    third.update()


def test_swapped_of_one_blocks_the_others_until_it_ends():
    model = make_model()
    a = sema.SwitchEMA(model, decay=0.9)
    b = sema.SwitchEMA(model, decay=0.5)
    drift_both([model], torch.Generator().manual_seed(3))
    before = emas(b)
    with a.swapped():
        for call in (b.update, b.switch, b.epoch_end):
            with pytest.raises(RuntimeError, match="another SwitchEMA of these params is inside swapped"):
                call()
        with pytest.raises(RuntimeError, match="another SwitchEMA"), b.swapped():
            pass
    for name, e in emas(b).items():
        assert_bits_equal(e, before[name], f"{name} changed while refused")
    b.update()  # after the block, all is well
    a.update()

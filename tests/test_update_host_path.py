"""What ``SwitchEMA.update()`` does on the host, besides launching the kernels.

- The placement check is O(buckets) per call (a storage reference count and a parameter-
  registration counter), with the full O(params) check on one call in
  ``FULL_PLACEMENT_CHECK_EVERY`` and whenever the cheap signals change: every way of moving a
  param is still caught, at the next update where nothing masks it, and within that many
  updates (and at the next switch, swap or state dict) where something does.
- Once a warmup has ended, the weight is a cached tensor: no schedule launches per update, and
  the same bits the device formula gives.
- Host-counted policies (``update_every > 1``, an int ``switch_every``, ``skip_nonfinite``) count
  correctly under ``torch.compile`` without ``fullgraph`` (they run eagerly there), raise under
  ``fullgraph=True``, and raise while a CUDA graph is being captured.
"""

from __future__ import annotations

import pytest
import torch
from conftest import assert_bits_equal
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import sema
from sema.storage import FULL_PLACEMENT_CHECK_EVERY


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))


def test_param_data_replaced_is_caught_at_the_next_update():
    model = make_model()
    ema = sema.SwitchEMA(model, decay=0.9, backend="torch")
    for _ in range(3):
        ema.update()
    before = {n: e.clone() for n, e in ema.state_dict()["ema"].items()}
    model[0].weight.data = model[0].weight.detach().clone()
    with pytest.raises(sema.BucketMovedError, match=r"0\.weight"):
        ema.update()
    for name, e in ema.state_dict()["ema"].items():
        assert_bits_equal(e, before[name], f"EMA {name} changed by the refused update")


def test_load_state_dict_assign_is_caught_at_the_next_update():
    model = make_model()
    ema = sema.SwitchEMA(model, decay=0.9, backend="torch")
    ema.update()
    # The old Parameter objects still point into the bucket: only the slot check sees this.
    model.load_state_dict({k: v.clone() for k, v in model.state_dict().items()}, assign=True)
    with pytest.raises(sema.BucketMovedError, match="replaced by a new Parameter"):
        ema.update()


def test_a_move_masked_by_a_new_reference_is_caught_within_the_full_check_interval():
    model = make_model()
    ema = sema.SwitchEMA(model, decay=0.9, backend="torch")
    ema.update()
    # A new reference to the bucket taken together with a move keeps the storage's reference
    # count as it was: the cheap signal misses it, the periodic full check does not.
    alias = model[2].bias.detach()
    model[0].bias.data = model[0].bias.detach().clone()
    calls = 0
    with pytest.raises(sema.BucketMovedError, match=r"0\.bias"):
        for calls in range(1, FULL_PLACEMENT_CHECK_EVERY + 1):  # noqa: B007
            ema.update()
    assert calls <= FULL_PLACEMENT_CHECK_EVERY
    del alias


@pytest.mark.parametrize("where", ["switch", "epoch_end", "swapped", "reset"])
def test_a_masked_move_is_caught_by_every_other_entry_point(where):
    model = make_model()
    ema = sema.SwitchEMA(model, decay=0.9, backend="torch")
    ema.update()
    alias = model[2].bias.detach()  # noqa: F841 - masks the reference count, see above
    model[0].bias.data = model[0].bias.detach().clone()
    with pytest.raises(sema.BucketMovedError, match=r"0\.bias"):
        if where == "swapped":
            with ema.swapped():
                pass
        else:
            getattr(ema, where)()


def test_new_references_to_the_bucket_are_not_taken_for_moves():
    model = make_model()
    ema = sema.SwitchEMA(model, decay=0.9, backend="torch")
    kept = []
    for i in range(2 * FULL_PLACEMENT_CHECK_EVERY):
        if i % 7 == 0:
            kept.append(model.state_dict())  # views of the bucket come and go
        if i % 11 == 0:
            kept.clear()
        ema.update()
    assert ema.step == 2 * FULL_PLACEMENT_CHECK_EVERY


class OpCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def ops_of_one_update(ema: sema.SwitchEMA) -> list[str]:
    """The aten ops of the calls up to and including the next one that averages."""
    calls = ema.schedule.update_every - ema.policy.calls % ema.schedule.update_every
    with OpCounter() as counter:
        for _ in range(calls):
            ema.update()
    return counter.ops


@pytest.mark.parametrize(
    "warmup, options",
    [
        ("linear", {"warmup_steps": 5}),
        ("exp", {"warmup_steps": 5, "warmup_ratio": 0.5}),
        ("constant", {"warmup_steps": 5}),
        ("power", {"inv_gamma": 1.0, "power": 0.75}),
    ],
)
@pytest.mark.parametrize("update_every", [1, 3])
def test_the_weight_after_the_warmup_is_cached_and_bit_identical(warmup, options, update_every):
    decay = 0.9
    schedule = sema.DecaySchedule(decay, warmup, update_every=update_every, **options)
    n = schedule.settled_after
    assert 0 < n < 100, n
    final = schedule._formula(torch.tensor(10**9)).reshape(1)
    for step in range(n, n + 50):
        t = torch.tensor(step)
        assert_bits_equal(schedule.weight(t, known_at_least=step).reshape(1), final, f"cached weight, step {step}")
        assert_bits_equal(schedule._formula(t).reshape(1), final, f"formula, step {step}")
    first = next(m for m in range(n + 1) if bool(schedule._formula(torch.tensor(m)) == final))
    slack = 0 if warmup != "power" else 2  # the power warmup's bound keeps a margin
    assert n - slack <= first <= n, f"settled_after={n}, but the weight settles at update {first}"

    model, plain_model = make_model(), make_model()
    ema = sema.SwitchEMA(model, decay=decay, warmup=warmup, update_every=update_every, backend="torch", **options)
    plain = sema.SwitchEMA(plain_model, decay=decay, update_every=update_every, backend="torch")
    for _ in range(n * update_every):
        ema.update()
        plain.update()
    after_warmup, without_warmup = ops_of_one_update(ema), ops_of_one_update(plain)
    assert after_warmup == without_warmup, "the schedule still launches ops after its warmup"
    during = sema.SwitchEMA(
        make_model(), decay=decay, warmup=warmup, update_every=update_every, backend="torch", **options
    )
    assert len(ops_of_one_update(during)) > len(without_warmup), "the counter cannot see the schedule's ops"


def test_settled_weights_give_the_same_ema_as_the_formula():
    options = {"decay": 0.8, "warmup": "linear", "warmup_steps": 4, "backend": "torch"}
    fast_model, slow_model = make_model(), make_model()
    fast, slow = sema.SwitchEMA(fast_model, **options), sema.SwitchEMA(slow_model, **options)
    slow._updates_seen = -(2**62)  # a lower bound that never allows the cached weight
    generator = torch.Generator().manual_seed(3)
    for _ in range(20):
        with torch.no_grad():
            for p, q in zip(fast_model.parameters(), slow_model.parameters(), strict=True):
                delta = torch.randn(p.shape, generator=generator)
                p.add_(delta)
                q.add_(delta)
        fast.update()
        slow.update()
    for (name, a), b in zip(fast.state_dict()["ema"].items(), slow.state_dict()["ema"].values(), strict=True):
        assert_bits_equal(a, b, name)


def test_reset_and_load_bring_the_warmup_back():
    options = {"decay": 0.8, "warmup": "linear", "warmup_steps": 4, "backend": "torch"}
    ema = sema.SwitchEMA(make_model(), **options)
    state = ema.state_dict()
    for _ in range(10):
        ema.update()
    ema.reset()
    assert ema._updates_seen == 0
    plain_ops = len(ops_of_one_update(sema.SwitchEMA(make_model(), decay=0.8, backend="torch")))
    assert len(ops_of_one_update(ema)) > plain_ops, "reset() must start the warmup over"
    for _ in range(10):
        ema.update()
    ema.load_state_dict(state)
    assert len(ops_of_one_update(ema)) > plain_ops, "loading a step-0 state must start the warmup over"


@pytest.mark.parametrize(
    "policy", [{"switch_every": 2}, {"update_every": 2}, {"skip_nonfinite": True}], ids=lambda p: next(iter(p))
)
def test_host_counted_policies_count_correctly_under_compile_without_fullgraph(policy):
    torch._dynamo.reset()
    compiled_ema = sema.SwitchEMA(make_model(), decay=0.5, **policy)
    eager_ema = sema.SwitchEMA(make_model(), decay=0.5, **policy)
    update = torch.compile(compiled_ema.update)
    for _ in range(6):
        update()
        eager_ema.update()
    for field in ("step", "calls", "epochs", "num_switches", "num_skipped"):
        assert compiled_ema.state_dict()[field] == eager_ema.state_dict()[field], field
    assert compiled_ema.state_dict()["num_switches"] == (3 if "switch_every" in policy else 0)


def test_host_counted_policies_raise_under_fullgraph():
    torch._dynamo.reset()
    ema = sema.SwitchEMA(make_model(), decay=0.5, switch_every=2)
    with pytest.raises(Exception, match="counts calls on the host"):
        torch.compile(ema.update, fullgraph=True)()
    assert ema.policy.calls == 0 and ema.step == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA-graph capture needs a CUDA device; none here")
@pytest.mark.parametrize(
    "policy", [{"switch_every": 2}, {"update_every": 2}, {"skip_nonfinite": True}], ids=lambda p: next(iter(p))
)
def test_capture_with_a_host_counted_policy_raises(policy):
    model = make_model().cuda()
    ema = sema.SwitchEMA(model, decay=0.5, **policy)
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        ema.update()  # warm up outside the capture
    torch.cuda.current_stream().wait_stream(side)
    calls = ema.policy.calls
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="CUDA-graph capture"), torch.cuda.graph(graph):
        ema.update()
    assert ema.policy.calls == calls, "the refused call was counted"

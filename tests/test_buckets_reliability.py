"""Ordinary things a user does around bucketed params: old-style tying, shared memory for
multiprocessing, saving the live weights, and builds that fail halfway (issue #13, items 3, 4, 5, 7)."""

from __future__ import annotations

import copy
import io
import multiprocessing
import sys

import pytest
import torch
from conftest import assert_bits_equal as assert_flat_bits_equal
from conftest import assert_params_untouched, cpu_backends, param_snapshot
from torch import nn

import sema
from sema import buckets
from sema.buckets import ParamAliasError, build_bucket, build_buckets, check_aliasing, live_state_dict, plan_buckets

BACKENDS = cpu_backends()


def assert_bits_equal(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)}, expected {tuple(expected.shape)}"
    assert_flat_bits_equal(actual.flatten(), expected.flatten(), what)


class TiedAutoencoder(nn.Module):
    """``decoder.weight`` is a distinct Parameter over ``encoder.weight``'s memory (old-style tying)."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.encoder = nn.Linear(6, 6)
        self.middle = nn.Linear(6, 6)
        self.decoder = nn.Linear(6, 6)
        self.decoder.weight = nn.Parameter(self.encoder.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(torch.tanh(self.middle(torch.tanh(self.encoder(x)))))


def train_step(model: nn.Module, opt: torch.optim.Optimizer, g: torch.Generator) -> None:
    x = torch.randn(8, 6, generator=g)
    loss = (model(x) - x).square().mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def momentum_sgd(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)


# --- item 3: old-style tying ---------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_old_style_tied_params_stay_tied_and_train_as_without_buckets(backend):
    plain, model = TiedAutoencoder(seed=3), TiedAutoencoder(seed=3)
    ema = sema.SwitchEMA(model, decay=0.75, switch_every=None, backend=backend)
    assert model.decoder.weight is not model.encoder.weight
    assert model.decoder.weight.data_ptr() == model.encoder.weight.data_ptr()
    expected = {n: p.detach().clone() for n, p in plain.named_parameters()}  # the EMA's start
    with torch.no_grad():
        model.encoder.weight.add_(0.5)
        plain.encoder.weight.add_(0.5)
    assert_bits_equal(model.decoder.weight.detach(), model.encoder.weight.detach(), "a write through the other name")

    g_plain, g = torch.Generator().manual_seed(11), torch.Generator().manual_seed(11)
    opt_plain, opt = momentum_sgd(plain), momentum_sgd(model)
    for _ in range(6):
        train_step(plain, opt_plain, g_plain)
        for name, p in plain.named_parameters():  # the EMA by hand; both names read one memory
            expected[name] = torch.lerp(expected[name], p.detach(), 0.25)
        train_step(model, opt, g)
        ema.update()
    for (name, p), q in zip(model.named_parameters(), plain.parameters(), strict=True):
        assert_bits_equal(p.detach(), q.detach(), f"trained {name}")

    bucket = ema.buckets[0]
    assert len(set(bucket.offsets)) == len(bucket.offsets) - 1, "the tied memory is bucketed once"
    views = {name: e for name, _, e in ema.storage.named_emas()}
    assert views["encoder.weight"].data_ptr() == views["decoder.weight"].data_ptr()
    state = ema.state_dict()["ema"]
    averaged = ema.averaged_state_dict()
    for name in expected:
        assert_bits_equal(state[name], expected[name], f"EMA {name}")
        assert_bits_equal(averaged[name], expected[name], f"averaged {name}")


def test_a_param_over_part_of_another_is_refused_before_anything_moves():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    model[1].weight = nn.Parameter(model[0].weight[:2])
    before = param_snapshot(model)
    with pytest.raises(ParamAliasError, match=r"'0\.weight'.*'1\.weight'.*nn\.Parameter\(t\.clone\(\)\)"):
        sema.SwitchEMA(model, backend="torch")
    assert_params_untouched(model, before)


def test_a_trainable_param_over_a_frozen_one_is_refused():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    model[1].weight = nn.Parameter(model[0].weight, requires_grad=False)
    tracked = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    frozen = [(n, p) for n, p in model.named_parameters() if not p.requires_grad]
    with pytest.raises(ParamAliasError, match=r"'0\.weight' shares memory with '1\.weight'.*does not track"):
        check_aliasing(tracked, frozen)


def test_check_aliasing_finds_ties_and_overlaps_anywhere_in_address_order():
    base = torch.randn(1000)
    named = [(f"p{i}", nn.Parameter(torch.randn(3))) for i in range(2000)]
    named += [("whole", nn.Parameter(base)), ("whole_again", nn.Parameter(base))]
    assert check_aliasing(named) == [["whole", "whole_again"]]
    with pytest.raises(ParamAliasError, match=r"'whole' and 'whole_again' are distinct Parameters.*model\.whole_again"):
        check_aliasing(named, allow_ties=False)
    # A view of the tail of the tied pair, last in list order, far from it in address order.
    named.append(("tail", nn.Parameter(base[990:])))
    with pytest.raises(ParamAliasError, match=r"'whole'.*'tail'"):
        check_aliasing(named)
    empty = nn.Parameter(base[:0])
    assert check_aliasing([("whole", named[-2][1]), ("empty", empty)]) == []


def test_build_bucket_keeps_ties_without_switch_ema():
    a = nn.Parameter(torch.randn(5, 3))
    b = nn.Parameter(a)
    c = nn.Parameter(torch.randn(7))
    bucket = build_bucket(a.device, a.dtype, [("a", a), ("c", c), ("b", b)], torch.float32)
    assert bucket.offsets[0] == bucket.offsets[2] != bucket.offsets[1]
    assert a.data_ptr() == b.data_ptr()
    assert bucket.param_flat.numel() == 16 + 8  # 15 and 7 elements, each padded to 16 bytes


# --- item 4: shared memory -----------------------------------------------------------------


def _write_in_child(param: nn.Parameter, value: float) -> None:
    with torch.no_grad():
        param.fill_(value)


def _child_writes(param: nn.Parameter, value: float) -> None:
    process = multiprocessing.get_context("fork").Process(target=_write_in_child, args=(param, value))
    process.start()
    process.join(timeout=120)
    if process.is_alive():
        process.kill()
        pytest.fail("the child process did not finish within 120 s")
    assert process.exitcode == 0


@pytest.mark.skipif(sys.platform != "linux", reason="forks a child process (Linux)")
def test_bucket_of_shared_params_is_shared_and_a_child_write_shows_in_the_parent():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Linear(7, 3))
    model.share_memory()
    ema = sema.SwitchEMA(model, switch_every=None, backend="torch")
    bucket = ema.buckets[0]
    assert bucket.param_flat.is_shared()
    assert all(p.is_shared() for p in model.parameters())
    value = float(torch.randn(()))
    _child_writes(model[1].weight, value)
    assert_bits_equal(model[1].weight.detach(), torch.full((3, 7), value), "the child's write, seen by the parent")
    ema.update()  # still in its bucket


@pytest.mark.parametrize("backend", BACKENDS)
def test_share_memory_after_building_is_not_a_move(backend):
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(5, 7), nn.Linear(7, 3))
    model.register_parameter("empty", nn.Parameter(torch.empty(0, 3)))  # data_ptr() 0: no memory
    ema = sema.SwitchEMA(model, decay=0.5, switch_every=None, backend=backend)
    old_ptrs = [p.data_ptr() for p in model.parameters()]
    model.share_memory()
    assert all(p.is_shared() for p in model.parameters() if p.numel())
    assert [p.data_ptr() for p in model.parameters()] != old_ptrs  # a new storage, same offsets
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    expected = {
        n: torch.lerp(e, p.detach(), 0.5) for (n, p), e in zip(model.named_parameters(), _emas(ema), strict=True)
    }
    assert ema.buckets[0].moved() == []
    ema.update()
    for name, value in ema.state_dict()["ema"].items():
        assert_bits_equal(value, expected[name], f"EMA {name} after share_memory()")
    ema.switch()  # checks every param, always
    for name, p in model.named_parameters():
        assert_bits_equal(p.detach(), expected[name], f"{name} after the switch")
    model[0].weight.data = model[0].weight.data.clone()  # a real move is still one
    with pytest.raises(sema.BucketMovedError, match=r"0\.weight"):
        ema.switch()


def _emas(ema: sema.SwitchEMA) -> list[torch.Tensor]:
    return [e.clone() for e in ema.state_dict()["ema"].values()]


# --- item 5: saving the live model ---------------------------------------------------------


def _saved_bytes(obj: object) -> int:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getbuffer().nbytes


def test_live_state_dict_saves_each_tensor_at_its_own_size():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 4))
    plain = copy.deepcopy(model)
    sema.SwitchEMA(model, backend="torch")
    head = ("2.weight", "2.bias")
    live = live_state_dict(model)
    assert _saved_bytes({k: live[k] for k in head}) == _saved_bytes({k: plain.state_dict()[k] for k in head})
    for k, v in live.items():
        assert v.untyped_storage().nbytes() == v.numel() * v.element_size(), k
        assert_bits_equal(v, plain.state_dict()[k], k)
    with torch.no_grad():
        model[2].bias.add_(1.0)
    assert_bits_equal(live["2.bias"], plain[2].bias.detach(), "the snapshot does not follow later writes")


def test_live_weights_round_trip_through_safetensors_into_a_bucketed_model(tmp_path):
    safetensors_torch = pytest.importorskip("safetensors.torch")
    source, target = TiedAutoencoder(seed=8), TiedAutoencoder(seed=9)
    sema.SwitchEMA(source, backend="torch")
    ema = sema.SwitchEMA(target, decay=0.5, switch_every=None, backend="torch")
    path = tmp_path / "live.safetensors"
    safetensors_torch.save_file(live_state_dict(source), path)
    target.load_state_dict(safetensors_torch.load_file(path))
    for (name, p), q in zip(target.named_parameters(), source.parameters(), strict=True):
        assert_bits_equal(p.detach(), q.detach(), name)
    assert target.decoder.weight.data_ptr() == target.encoder.weight.data_ptr()
    ema.update()  # loading copied into the bucket: nothing moved


# --- item 7: building buckets is all or nothing ---------------------------------------------


def _two_dtype_model() -> nn.Module:
    torch.manual_seed(4)
    return nn.Sequential(nn.Linear(6, 5), nn.Linear(5, 4).to(torch.bfloat16), nn.Linear(4, 3))


def _plans(model: nn.Module) -> list:
    named = list(model.named_parameters())
    return [(device, dtype, members, torch.float32) for (device, dtype), members in plan_buckets(named).items()]


@pytest.mark.parametrize("failing_call", [2, 3, 4], ids=["first_ema", "second_params", "second_ema"])
def test_a_failed_allocation_leaves_every_param_where_it_was(failing_call, monkeypatch):
    model = _two_dtype_model()
    before = param_snapshot(model)
    allocate, calls = buckets._empty, []

    def failing(*args, **kwargs):
        calls.append(args)
        if len(calls) == failing_call:
            raise torch.OutOfMemoryError("injected allocation failure")
        return allocate(*args, **kwargs)

    monkeypatch.setattr(buckets, "_empty", failing)
    with pytest.raises(torch.OutOfMemoryError, match="injected"):
        build_buckets(_plans(model))
    assert_params_untouched(model, before)
    monkeypatch.setattr(buckets, "_empty", allocate)
    built = build_buckets(_plans(model))  # the model is still fine to bucket
    assert [b.dtype for b in built] == [torch.float32, torch.bfloat16]
    for name, p in model.named_parameters():
        assert_bits_equal(p.detach(), before[name][1], f"{name} after a successful build")


def test_a_failed_ema_allocation_moves_no_param(monkeypatch):
    model = nn.Sequential(nn.Linear(6, 5), nn.Linear(5, 4))
    before = param_snapshot(model)
    allocate = buckets._empty

    def no_room_for_the_ema(numel, dtype, device, *args):
        if dtype == torch.float64:
            raise torch.OutOfMemoryError("injected allocation failure")
        return allocate(numel, dtype, device, *args)

    monkeypatch.setattr(buckets, "_empty", no_room_for_the_ema)
    with pytest.raises(torch.OutOfMemoryError, match="injected"):
        build_bucket(torch.device("cpu"), torch.float32, list(model.named_parameters()), torch.float64)
    assert_params_untouched(model, before)


def test_a_failure_while_re_pointing_restores_the_params_already_moved(monkeypatch):
    model = nn.Sequential(nn.Linear(6, 5), nn.Linear(5, 4))
    before = param_snapshot(model)
    victim = model[1].weight
    original_setter = nn.Parameter.data.__set__

    def set_data(p, value):
        if p is victim:
            raise RuntimeError("injected re-point failure")
        original_setter(p, value)

    monkeypatch.setattr(nn.Parameter, "data", property(nn.Parameter.data.__get__, set_data), raising=False)
    with pytest.raises(RuntimeError, match="injected re-point"):
        build_bucket(torch.device("cpu"), torch.float32, list(model.named_parameters()), torch.float32)
    monkeypatch.undo()
    assert_params_untouched(model, before)

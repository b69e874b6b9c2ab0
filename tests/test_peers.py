"""bench/peers.py: the quick run works end to end, and every peer does the same work as sema:
after 20 steps on the same data with the same decay its EMA equals ours within the rounding
of its EMA dtype. Peers that are not installed are skipped with the reason; the ones
reimplemented in bench/peers.py (timm ModelEmaV3 where timm is missing, NeMo-style) run. timm's
own ModelEmaV3 is checked against a stand-in with its signature where timm is not installed."""

from __future__ import annotations

import copy
import importlib.machinery
import importlib.util
import json
import sys
import types
from pathlib import Path

import pytest
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
STEPS = 20
DECAY = 0.75  # the start value still weighs 0.75**20 = 3e-3 after 20 steps: a wrong start shows
# A step's rounding error r decays by DECAY per later step, so the accumulated error stays
# below r / (1 - DECAY). Two implementations each round at most ~1.5 eps per step (relative to
# the largest |param| seen): ERROR_FACTOR * eps * scale bounds their difference with margin.
EPS = {torch.float32: 2.0**-23, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}
ERROR_FACTOR = 4.0 / (1.0 - DECAY)


def _load_peers():
    spec = importlib.util.spec_from_file_location("bench_peers", ROOT / "bench" / "peers.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_peers"] = module
    spec.loader.exec_module(module)
    return module


peers = _load_peers()


def make_model(dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(17, 33), nn.LayerNorm(33), nn.Linear(33, 129), nn.Linear(129, 1)).to(dtype)


def run_same_steps(models: list[nn.Module], setups: list, generator: torch.Generator) -> torch.Tensor:
    """STEPS optimizer-like steps, the same new values in every model, each followed by one EMA
    update of every setup. Returns the running elementwise max of |param| (the error scale)."""
    masters = [p.detach().to(torch.float32, copy=True) for p in models[0].parameters()]
    scale = [m.abs() for m in masters]
    for _ in range(STEPS):
        with torch.no_grad():
            for i, master in enumerate(masters):
                master.add_(0.5 * torch.randn(master.shape, generator=generator))
                scale[i] = torch.maximum(scale[i], master.abs())
                for model in models:
                    list(model.parameters())[i].copy_(master)
        for setup in setups:
            setup.update()
    return scale


def assert_ema_close(actual: list[torch.Tensor], expected: list[torch.Tensor], scale, dtype, what: str) -> None:
    assert len(actual) == len(expected), f"{what}: {len(actual)} EMA tensors, expected {len(expected)}"
    for i, (a, e, s) in enumerate(zip(actual, expected, scale, strict=True)):
        assert a.shape == e.shape, f"{what}: tensor {i} has shape {tuple(a.shape)}, expected {tuple(e.shape)}"
        err = (a.double() - e.double()).abs()
        bound = ERROR_FACTOR * EPS[dtype] * s.double()
        bad = ~(err <= bound)
        if bad.any():
            worst = int((err - bound).flatten().argmax())
            raise AssertionError(
                f"{what}: tensor {i} {tuple(a.shape)}: {int(bad.sum())}/{a.numel()} elements off; worst at flat "
                f"index {worst}: got {a.flatten()[worst].item()!r}, expected {e.flatten()[worst].item()!r} "
                f"(error {err.flatten()[worst].item():.3g}, bound {bound.flatten()[worst].item():.3g})"
            )


def compare(peer_build, dtype: torch.dtype, backend: str = "auto"):
    """Run a peer and sema side by side; returns (peer setup, sema EMAs, scale, EMA dtype compared)."""
    peer_model, sema_model = make_model(dtype), make_model(dtype)  # seeded: the same start values
    for a, b in zip(peer_model.parameters(), sema_model.parameters(), strict=True):
        assert torch.equal(a, b)
    peer_setup = peer_build(peer_model, DECAY, True)
    # A peer without an fp32 EMA here is compared with sema keeping the EMA in the params' dtype.
    ema_dtype = torch.float32 if peer_setup.ema_dtype == torch.float32 else None
    ours = peers.sema_setup(sema_model, DECAY, backend, ema_dtype=ema_dtype)
    assert ours.ema_dtype == peer_setup.ema_dtype
    scale = run_same_steps([peer_model, sema_model], [peer_setup, ours], torch.Generator().manual_seed(7))
    return peer_setup, ours.emas(), scale


def _peer_or_skip(name: str):
    peer = peers.PEERS[name]
    ok, why = peer.availability()
    if not ok:
        pytest.skip(why)
    return peer


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", list(peers.PEERS))
def test_peer_ema_equals_sema_after_20_steps(name, dtype):
    peer = _peer_or_skip(name)
    setup, ours, scale = compare(peer.build, dtype)
    if dtype == torch.float32 or setup.fp32_ema:
        assert setup.ema_dtype == torch.float32, f"{name}: an fp32-EMA configuration must give an fp32 EMA"
    else:
        without = {"timm_v3_reimpl", "nemo_style"}
        assert name in without or "no dtype=" in setup.config, f"{name} has an fp32-EMA configuration; use it"
    assert_ema_close(setup.emas(), ours, scale, setup.ema_dtype, f"{name} ({setup.config})")


def test_sema_torch_backend_equals_auto():
    _, auto, scale = compare(peers.PEERS["loop"].build, torch.bfloat16, "auto")
    _, ref, _ = compare(peers.PEERS["loop"].build, torch.bfloat16, "torch")
    assert_ema_close(auto, ref, scale, torch.float32, "sema auto vs torch backend")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_negative_control_wrong_decay_is_rejected(dtype):
    def wrong_loop(model, decay, fp32):  # uses decay where 1 - decay belongs
        return peers.PEERS["loop"].build(model, 1.0 - decay, fp32)

    def wrong_start(model, decay, fp32):  # starts the EMA at zero instead of at the params
        setup = peers.PEERS["nemo_style"].build(model, decay, fp32)
        for e in setup.emas():
            e.zero_()
        return setup

    setup, ours, scale = compare(wrong_loop, dtype)
    with pytest.raises(AssertionError, match="elements off"):
        assert_ema_close(setup.emas(), ours, scale, setup.ema_dtype, "wrong decay")
    if dtype == torch.float32:  # 0.75**20 of the start is far above fp32 rounding, not above bf16's
        setup, ours, scale = compare(wrong_start, dtype)
        with pytest.raises(AssertionError, match="elements off"):
            assert_ema_close(setup.emas(), ours, scale, setup.ema_dtype, "wrong start")


def test_quick_run_end_to_end(tmp_path, capsys):
    out = tmp_path / "peers.json"
    assert peers.main(["--quick", "--no-progress", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "sema SwitchEMA.update (auto backend)" in text and "faster" in text
    result = json.loads(out.read_text())
    assert {"device", "torch", "sema", "date", "git_commit"} <= set(result["provenance"])
    rows = result["rows"]
    assert {r["param_set"] for r in rows} == {"tiny"} and {r["param_dtype"] for r in rows} == {"fp32", "bf16"}
    for dtype in ("fp32", "bf16"):
        mine = {r["peer"]: r for r in rows if r["param_dtype"] == dtype}
        same_dtype_row = {"sema_auto_same_dtype"} if dtype != "fp32" else set()
        assert set(mine) == {"sema_auto", "sema_torch", *same_dtype_row, *peers.PEERS}
        assert mine["sema_auto"]["sema_auto_speedup"] == pytest.approx(1.0)
        for name, r in mine.items():
            available = name.startswith("sema_") or peers.PEERS[name].availability()[0]
            assert ("skipped" in r) != available, name
            if "skipped" in r:
                assert "not installed" in r["skipped"] or "its own class runs instead" in r["skipped"]
                continue
            assert r["repeats"] == peers.QUICK_REPEATS and r["median_ms"] > 0 and r["GB/s"] > 0
            assert r["ema_dtype"] == ("fp32" if r["fp32_ema"] else dtype)
            # Each speed-up is against the sema row whose EMA moves the same bytes.
            reference = mine[r["compared_with"]]
            assert reference["peer"].startswith("sema_auto") and reference["ema_dtype"] == r["ema_dtype"], name
            assert r["sema_auto_speedup"] == pytest.approx(r["median_ms"] / reference["median_ms"])


class _StandInModelEmaV3:
    """timm.utils.ModelEmaV3's constructor signature (with or without ``dtype=``) and its update:
    a deep copy, moved to ``dtype``; ``update(model)`` lerps every floating tensor in fp32."""

    def __init__(self, model, decay=0.9999, min_decay=0.0, update_after_step=0, use_warmup=False,
                 warmup_gamma=1.0, warmup_power=2 / 3, device=None, dtype=None, foreach=True,
                 exclude_buffers=False):  # fmt: skip
        type(self).calls.append(dict(decay=decay, use_warmup=use_warmup, dtype=dtype, foreach=foreach))
        self.decay, self.module = decay, copy.deepcopy(model)
        if dtype is not None:
            self.module.to(dtype=dtype)

    @torch.no_grad()
    def update(self, model, step=None):
        for e, p in zip(self.module.state_dict().values(), model.state_dict().values(), strict=True):
            e.copy_(e.float().lerp_(p.float(), 1.0 - self.decay))


class _OldStandInModelEmaV3(_StandInModelEmaV3):
    def __init__(self, model, decay=0.9999, min_decay=0.0, update_after_step=0, use_warmup=False,
                 warmup_gamma=1.0, warmup_power=2 / 3, device=None, foreach=True,
                 exclude_buffers=False):  # fmt: skip
        super().__init__(model, decay, use_warmup=use_warmup, foreach=foreach)


@pytest.fixture(params=[_StandInModelEmaV3, _OldStandInModelEmaV3], ids=["timm_with_dtype", "timm_without_dtype"])
def stand_in_timm(request, monkeypatch):
    cls = type(request.param.__name__, (request.param,), {"calls": []})
    timm = types.ModuleType("timm")
    timm.__spec__ = importlib.machinery.ModuleSpec("timm", None)
    timm.__path__ = []
    timm.utils = types.ModuleType("timm.utils")
    timm.utils.ModelEmaV3 = cls
    monkeypatch.setitem(sys.modules, "timm", timm)
    monkeypatch.setitem(sys.modules, "timm.utils", timm.utils)
    monkeypatch.setattr(peers.importlib.metadata, "version", lambda name: "0.0-stand-in")
    return cls


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_timm_peer_uses_its_own_options(stand_in_timm, dtype):
    """timm's class with decay, no warm-up and foreach; dtype=float32 for a bf16 model where the
    installed timm takes it; the reimplementation stands aside while timm is installed."""
    assert peers.PEERS["timm_v3"].availability()[0]
    ok, why = peers.PEERS["timm_v3_reimpl"].availability()
    assert not ok and "timm is installed" in why
    setup, ours, scale = compare(peers.PEERS["timm_v3"].build, dtype)
    (call,) = stand_in_timm.calls
    assert call["decay"] == DECAY and call["use_warmup"] is False and call["foreach"] is True
    has_dtype = "dtype" in peers.inspect.signature(stand_in_timm).parameters
    if dtype == torch.bfloat16 and has_dtype:
        assert call["dtype"] == torch.float32 and setup.fp32_ema and "dtype=torch.float32" in setup.config
    elif dtype == torch.bfloat16:
        assert not setup.fp32_ema and setup.ema_dtype == torch.bfloat16 and "no dtype=" in setup.config
    else:
        assert call["dtype"] is None and setup.fp32_ema
    assert_ema_close(setup.emas(), ours, scale, setup.ema_dtype, f"timm stand-in ({setup.config})")

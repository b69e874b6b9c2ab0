"""``sema.compat.ema_pytorch.EMA`` against the real ema-pytorch 0.8.3 (``ema_pytorch.EMA``).

Each trajectory test builds one model, gives the peer the model and the drop-in an identical deep
copy, trains both with their own optimizer on the same batches, calls ``update()`` on both after
every step and compares the two ``state_dict()`` s after every step: the same keys in the same
order, the same dtypes, integer tensors (``step``, ``num_batches_tracked``) equal, float tensors
(EMA params and buffers, and the online model) within the bound below. A negative control (the
drop-in with ``update_after_step`` one off, or another beta) must fail the same check.

Tolerance (TOLERANCES): both sides compute the decay the same way (float32 tensor math on the
step) and the update as a ``lerp`` with ``w = 1 - decay``: the drop-in's fused kernels use
torch's two-branch lerp formula, so each update rounds the same way up to the order of the
operations inside one element (at most one rounding of the stored dtype apart: eps of that dtype
times the largest magnitude of the tensor). An error made at one update is multiplied by the
decay at every later one, so over the run it stays below ``4 eps scale / (1 - d_max)``,
``d_max`` the largest decay reached (the bound of tests/test_migration.py). In practice the
two agree bit for bit on both backends; the bound is what the contract promises.

Backends: every trajectory runs on the torch and the cpp backend (``SEMA_BACKEND``), and checks
that the drop-in's buckets use that backend.
"""

from __future__ import annotations

import copy
import io
import pickle
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from conftest import SmallCNN, assert_params_untouched, cpu_backends, param_snapshot
from torch import Tensor, nn

from sema.buckets import BucketMovedError
from sema.compat import ema_pytorch as compat

ema_pytorch = pytest.importorskip("ema_pytorch", reason="ema-pytorch is not installed (make install puts it in)")
Peer = ema_pytorch.EMA
Ours = compat.EMA

TOLERANCES = {torch.float32: 2.0**-23, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11, torch.float64: 2.0**-52}
ERROR_FACTOR = 4.0
BACKENDS = [b for b in ("torch", "cpp") if b in cpu_backends()]


class TinyCNN(SmallCNN):
    def features(self, x: Tensor) -> Tensor:
        return F.relu(self.bn1(self.conv1(x))).mean(dim=(2, 3))

    def batch(self, g: torch.Generator, dtype: torch.dtype) -> Tensor:
        return torch.randn(8, 3, 8, 8, generator=g).to(dtype)


class TinyTransformer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(6, 16)
        self.enc = nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, dropout=0.0, batch_first=True)
        self.head = nn.Linear(16, 4)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.enc(self.embed(x)).mean(dim=1))

    def batch(self, g: torch.Generator, dtype: torch.dtype) -> Tensor:
        return torch.randn(4, 5, 6, generator=g).to(dtype)


MODELS: dict[str, Callable[[], nn.Module]] = {"cnn": TinyCNN, "transformer": TinyTransformer}


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """The models are tiny: intra-op threads only add contention (on 2 shared cores, tens of
    seconds per test)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("SEMA_BACKEND", request.param)
    return request.param


def make_model(kind: str, dtype: torch.dtype, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return MODELS[kind]().to(dtype)


def check_states(peer: nn.Module, ours: nn.Module, d_max: float, where: str) -> float:
    """The worst ratio of |ours - peer| to the bound over every state_dict entry (0 when equal);
    keys, order, dtypes and integer entries must match exactly."""
    a, b = peer.state_dict(), ours.state_dict()
    assert list(a) == list(b), f"{where}: keys differ: peer {list(a)}, sema {list(b)}"
    worst = 0.0
    for key, x in a.items():
        y = b[key]
        assert x.dtype == y.dtype and x.shape == y.shape, f"{where}: {key}: {x.dtype}{tuple(x.shape)} vs {y.dtype}"
        if not x.is_floating_point():
            assert torch.equal(x, y), f"{where}: {key}: peer {x}, sema {y}"
            continue
        scale = x.detach().double().abs().max().clamp_min(1e-30)
        bound = ERROR_FACTOR * TOLERANCES[x.dtype] * scale / max(1.0 - d_max, 1e-12)
        err = (x.detach().double() - y.detach().double()).abs().max()
        ratio = float(torch.nan_to_num(err / bound, nan=float("inf")))
        worst = max(worst, ratio)
    return worst


def train_pair(
    kind: str,
    dtype: torch.dtype,
    steps: int,
    peer_kwargs: dict[str, Any],
    ours_kwargs: dict[str, Any] | None = None,
    prepare: Callable[[nn.Module], Any] | None = None,
    between: Callable[[nn.Module], None] | None = None,
    seed: int = 0,
) -> tuple[float, Peer, Ours]:
    """Train the peer's model and the drop-in's twin on the same batches, update both after
    every step, return the worst ratio seen over all steps (see check_states)."""
    model = make_model(kind, dtype, seed)
    if prepare is not None:
        prepare(model)
    twin = copy.deepcopy(model)
    peer = Peer(model, **peer_kwargs)
    ours = Ours(twin, **(peer_kwargs if ours_kwargs is None else ours_kwargs))
    opts = [
        torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.05, momentum=0.9) for m in (model, twin)
    ]
    g = torch.Generator().manual_seed(seed + 1)
    worst = 0.0
    for step in range(steps):
        x = model.batch(g, dtype)
        for m, opt in zip((model, twin), opts, strict=True):
            m(x).float().square().mean().backward()
            opt.step()
            opt.zero_grad()
            if between is not None:
                between(m)
        peer.update()
        ours.update()
        d_max = peer.get_current_decay()
        worst = max(worst, check_states(peer, ours, d_max, f"step {step}"))
    return worst, peer, ours


CASES: dict[str, tuple[str, torch.dtype, int, dict[str, Any]]] = {
    "cnn-fp32-defaults": ("cnn", torch.float32, 130, {}),
    "transformer-fp32-defaults": ("transformer", torch.float32, 130, {}),
    "cnn-bf16-defaults": ("cnn", torch.bfloat16, 130, {}),
    "transformer-bf16-every-step": (
        "transformer",
        torch.bfloat16,
        100,
        {"beta": 0.99, "update_after_step": 3, "update_every": 1},
    ),
    "cnn-fp32-min_value": (
        "cnn",
        torch.float32,
        100,
        {"beta": 0.9, "update_after_step": 0, "update_every": 1, "min_value": 0.5},
    ),
    "cnn-fp32-warmup-every3": (
        "cnn",
        torch.float32,
        100,
        {"beta": 0.99, "update_after_step": 7, "update_every": 3, "inv_gamma": 2.0, "power": 0.75, "use_foreach": True},
    ),
    "cnn-fp32-names": (
        "cnn",
        torch.float32,
        100,
        {
            "beta": 0.95,
            "update_after_step": 4,
            "update_every": 2,
            "ignore_names": {"fc.bias", "bn1.running_var"},
            "ignore_startswith_names": {"bn2."},
            "param_or_buffer_names_no_ema": {"conv1.bias", "bn1.running_mean", "not.a.name"},
        },
    ),
    "transformer-fp32-names": (
        "transformer",
        torch.float32,
        100,
        {
            "beta": 0.95,
            "update_after_step": 2,
            "update_every": 1,
            "param_or_buffer_names_no_ema": ["head.weight"],
            "ignore_startswith_names": {"enc.norm1"},
        },
    ),
    "cnn-fp32-switch": (
        "cnn",
        torch.float32,
        100,
        {"beta": 0.9, "update_after_step": 2, "update_every": 1, "update_model_with_ema_every": 5},
    ),
    "cnn-fp32-pull": (
        "cnn",
        torch.float32,
        100,
        {
            "beta": 0.9,
            "update_after_step": 2,
            "update_every": 2,
            "update_model_with_ema_every": 4,
            "update_model_with_ema_beta": 0.5,
            "param_or_buffer_names_no_ema": {"fc.bias"},
        },
    ),
    "cnn-fp32-no-online-model": (
        "cnn",
        torch.float32,
        100,
        {"beta": 0.95, "update_after_step": 3, "update_every": 1, "include_online_model": False},
    ),
    "cnn-fp32-frozen-beta": ("cnn", torch.float32, 100, {"beta": 1.0, "update_after_step": 30, "update_every": 4}),
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_same_ema_at_every_step(case: str, backend: str) -> None:
    kind, dtype, steps, kwargs = CASES[case]
    worst, peer, ours = train_pair(kind, dtype, steps, kwargs)
    assert worst <= 1.0, f"{case} on {backend}: off by {worst:.3g} x the bound"
    assert set(ours.switch_ema.backends.values()) == {backend}
    assert int(ours.step) == steps and bool(ours.initted)
    if kwargs.get("beta", 0.9999) < 1.0 and steps > kwargs.get("update_after_step", 100) + 10:
        assert peer.get_current_decay() > 0.0  # the run got past the warm start into averaging


def test_bf16_model_with_fp32_ema_model(backend: str) -> None:
    """The peer's dtype option for an fp32 EMA of a bf16 model: ``ema_model=`` an fp32 copy with
    ``coerce_dtype=True``; the drop-in keeps that EMA in fp32 buckets and adopts the module."""
    kwargs: dict[str, Any] = {"beta": 0.99, "update_after_step": 2, "update_every": 1, "coerce_dtype": True}
    model = make_model("cnn", torch.bfloat16)
    twin = copy.deepcopy(model)
    theirs_ema = copy.deepcopy(model).float()
    ours_template = copy.deepcopy(model).float()
    peer = Peer(model, ema_model=theirs_ema, **kwargs)
    ours = Ours(twin, ema_model=lambda: ours_template, **kwargs)
    assert ours.ema_model is ours_template
    assert {b.ema_flat.dtype for b in ours.switch_ema.buckets} == {torch.float32}
    opts = [torch.optim.SGD(m.parameters(), lr=0.05) for m in (model, twin)]
    g = torch.Generator().manual_seed(3)
    for step in range(100):
        x = model.batch(g, torch.bfloat16)
        for m, opt in zip((model, twin), opts, strict=True):
            m(x).float().square().mean().backward()
            opt.step()
            opt.zero_grad()
        peer.update()
        ours.update()
        ratio = check_states(peer, ours, peer.get_current_decay(), f"step {step}")
        assert ratio <= 1.0, f"step {step}: {ratio:.3g} x the bound"


def test_frozen_params_are_averaged_like_the_peer(backend: str) -> None:
    """ema-pytorch averages every float param, trainable or not: a frozen param changed by hand
    is averaged by the drop-in's tensor path."""

    def freeze(m: nn.Module) -> None:
        m.conv1.requires_grad_(False)

    def nudge(m: nn.Module) -> None:
        with torch.no_grad():
            m.conv1.weight.mul_(0.98).add_(0.01)

    kwargs = {"beta": 0.9, "update_after_step": 2, "update_every": 1}
    worst, _, ours = train_pair("cnn", torch.float32, 60, kwargs, prepare=freeze, between=nudge)
    assert worst <= 1.0
    assert "conv1.weight" not in {n for b in ours.switch_ema.buckets for n in b.names}
    assert not torch.equal(ours.ema_model.conv1.weight, ours.model.conv1.weight)  # averaged, not shared


@pytest.mark.parametrize(
    "wrong",
    [{"update_after_step": 3}, {"beta": 0.85}, {"update_every": 2}],
    ids=["update_after_step-one-off", "other-beta", "other-update_every"],
)
def test_negative_control(wrong: dict[str, Any], backend: str) -> None:
    """The check above rejects a drop-in whose schedule is slightly off."""
    kwargs = {"beta": 0.9, "update_after_step": 2, "update_every": 1}
    worst, _, _ = train_pair("cnn", torch.float32, 30, kwargs, ours_kwargs={**kwargs, **wrong})
    assert worst > 1.0


def test_same_signature_and_defaults() -> None:
    import inspect

    theirs = inspect.signature(Peer.__init__).parameters
    ours = inspect.signature(Ours.__init__).parameters
    assert list(ours) == list(theirs)
    for name, p in theirs.items():
        assert ours[name].default == p.default, name
        assert ours[name].kind == p.kind, name


@pytest.mark.parametrize("include_online_model", [True, False])
@pytest.mark.parametrize("direction", ["peer-to-sema", "sema-to-peer"])
def test_state_dict_loads_both_ways(direction: str, include_online_model: bool, backend: str) -> None:
    """A checkpoint written by one (through torch.save) loads into the other, which then goes on
    exactly as the writer would have."""
    kwargs = {"beta": 0.95, "update_after_step": 5, "update_every": 2, "include_online_model": include_online_model}
    base = make_model("cnn", torch.float32, seed=5)
    writer_cls, reader_cls = (Peer, Ours) if direction == "peer-to-sema" else (Ours, Peer)
    writer_model = copy.deepcopy(base)
    writer = writer_cls(writer_model, **kwargs)
    opt = torch.optim.SGD(writer_model.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(6)
    for _ in range(25):
        writer_model(writer_model.batch(g, torch.float32)).square().mean().backward()
        opt.step()
        opt.zero_grad()
        writer.update()
    buffer = io.BytesIO()
    torch.save(writer.state_dict(), buffer)
    buffer.seek(0)
    saved = torch.load(buffer)
    reader_model = make_model("cnn", torch.float32, seed=99)  # other weights: all must come from the file
    if not include_online_model:
        reader_model.load_state_dict(writer_model.state_dict())
    reader = reader_cls(reader_model, **kwargs)
    reader.load_state_dict(saved)
    assert int(reader.step) == 25 and bool(reader.initted)
    peer, ours = (writer, reader) if writer_cls is Peer else (reader, writer)
    assert check_states(peer, ours, 0.95, "after loading") == 0.0
    models = (writer_model, reader_model)
    opts = [torch.optim.SGD(m.parameters(), lr=0.05) for m in models]
    for step in range(25):
        x = base.batch(g, torch.float32)
        for m, o in zip(models, opts, strict=True):
            m(x).square().mean().backward()
            o.step()
            o.zero_grad()
        writer.update()
        reader.update()
        assert check_states(peer, ours, peer.get_current_decay(), f"step {step}") <= 1.0


def test_lazy_init_ema_and_init_ema(backend: str) -> None:
    kwargs = {"beta": 0.9, "update_after_step": 1, "update_every": 1, "lazy_init_ema": True}
    model = make_model("cnn", torch.float32)
    twin = copy.deepcopy(model)
    peer, ours = Peer(model, **kwargs), Ours(twin, **kwargs)
    assert ours.ema_model is None and ours.switch_ema is None
    keys = list(ours.state_dict())
    assert keys == list(peer.state_dict()) and not any(k.startswith("ema_model.") for k in keys)
    peer.update()
    ours.update()  # builds the EMA on the first update, as the peer does
    assert ours.ema_model is not None
    assert check_states(peer, ours, 0.0, "after the first update") == 0.0
    with pytest.raises(RuntimeError, match="built already"):
        ours.init_ema()
    other = Ours(copy.deepcopy(model), lazy_init_ema=True)
    other.init_ema()
    assert not bool(other.initted) and other.ema_model is not None
    with pytest.raises(ValueError, match="lazy_init_ema"):
        Ours(copy.deepcopy(model), ema_model=copy.deepcopy(model), lazy_init_ema=True)


def test_forward_eval_and_forward_method_names(backend: str) -> None:
    """``ema(x)`` runs ema_model in its own mode (train, as the deep copy was: BatchNorm then
    updates the EMA's running stats, in both); forward_eval, eval() and forwarded methods."""
    kwargs = {"beta": 0.9, "update_after_step": 1, "update_every": 1, "forward_method_names": ("features",)}
    worst, peer, ours = train_pair("cnn", torch.float32, 12, kwargs)
    assert worst <= 1.0
    x = torch.randn(4, 3, 8, 8)
    assert ours.ema_model.training == peer.ema_model.training
    torch.testing.assert_close(ours(x), peer(x), rtol=0, atol=0)
    assert check_states(peer, ours, 0.9, "after a train-mode forward") <= 1.0
    # ema-pytorch's forward_eval keeps ema_model's mode (train here), despite its name: so here
    torch.testing.assert_close(ours.forward_eval(x), peer.forward_eval(x), rtol=0, atol=0)
    assert ours.ema_model.training
    assert check_states(peer, ours, 0.9, "after forward_eval") <= 1.0
    torch.testing.assert_close(ours.features(x), peer.features(x), rtol=0, atol=0)
    assert peer.eval() is peer.ema_model
    assert ours.eval() is ours.ema_model and not ours.ema_model.training and ours.model.training
    torch.testing.assert_close(ours(x), peer(x.clone()), rtol=0, atol=0)
    with pytest.raises(NotImplementedError):
        ours.forward(x)  # the peer overrides __call__, not forward


def test_public_methods_match_the_peer(backend: str) -> None:
    """get_current_decay, get_params_iter/get_buffers_iter, parameter_names/buffer_names,
    copy_params_from_model_to_ema, copy_params_from_ema_to_model, update_model_with_ema,
    update_moving_average for every pair, add_to_optimizer_post_step_hook, model,
    restore_ema_model_device."""
    kwargs = {"beta": 0.97, "update_after_step": 3, "update_every": 2, "param_or_buffer_names_no_ema": {"fc.weight"}}
    model = make_model("cnn", torch.float32)
    twin = copy.deepcopy(model)
    peer, ours = Peer(model, **kwargs), Ours(twin, **kwargs)
    assert ours.model is twin
    assert ours.parameter_names == peer.parameter_names and ours.buffer_names == peer.buffer_names
    opts = [torch.optim.SGD(m.parameters(), lr=0.05) for m in (model, twin)]
    handles = [e.add_to_optimizer_post_step_hook(o) for e, o in zip((peer, ours), opts, strict=True)]
    g = torch.Generator().manual_seed(2)

    def train(steps: int) -> None:
        for _ in range(steps):
            x = model.batch(g, torch.float32)
            for m, o in zip((model, twin), opts, strict=True):
                m(x).square().mean().backward()
                o.step()  # update() runs in the post-step hook
                o.zero_grad()

    def same(where: str) -> None:
        assert check_states(peer, ours, 0.97, where) <= 1.0

    train(20)
    same("hooks")
    assert ours.get_current_decay() == peer.get_current_decay()
    for step in (0, 3, 4, 5, 50, 10**6):
        peer.step.fill_(step)
        ours.step.fill_(step)
        assert ours.get_current_decay() == peer.get_current_decay(), step
    peer.step.fill_(20)
    ours.step.fill_(20)
    for name in ("get_params_iter", "get_buffers_iter"):
        for m_peer, m_ours in ((peer.ema_model, ours.ema_model), (model, twin)):
            ours_names = [n for n, _ in getattr(ours, name)(m_ours)]
            assert ours_names == [n for n, _ in getattr(peer, name)(m_peer)] and ours_names
    train(3)
    ours.copy_params_from_model_to_ema()
    peer.copy_params_from_model_to_ema()
    same("copy_params_from_model_to_ema")
    train(6)
    peer.copy_params_from_ema_to_model()
    ours.copy_params_from_ema_to_model()
    same("copy_params_from_ema_to_model")
    train(4)
    peer.update_model_with_ema(0.3)
    ours.update_model_with_ema(0.3)
    same("update_model_with_ema(0.3)")
    peer.update_moving_average(peer.ema_model, peer.model, 0.7)
    ours.update_moving_average(ours.ema_model, ours.model, 0.7)
    same("update_moving_average(ema_model, model)")
    peer.update_moving_average(peer.model, peer.ema_model, 0.6)
    ours.update_moving_average(ours.model, ours.ema_model, 0.6)
    same("update_moving_average(model, ema_model)")
    a, b = make_model("cnn", torch.float32, 7), make_model("cnn", torch.float32, 8)
    a2, b2 = copy.deepcopy(a), copy.deepcopy(b)
    peer.update_moving_average(a, b, 0.8)
    ours.update_moving_average(a2, b2, 0.8)  # any other pair: the peer's per-tensor loop
    for (n, x), (_, y) in zip(a.state_dict().items(), a2.state_dict().items(), strict=True):
        assert torch.equal(x, y), n
    assert not torch.equal(a.fc.bias, make_model("cnn", torch.float32, 7).fc.bias)
    ours.restore_ema_model_device()  # a no-op here: the EMA is on the model's device
    for h in handles:
        h.remove()
    train(2)
    assert int(ours.step) == int(peer.step) == 20 + 3 + 6 + 4


def test_in_place_edits_of_ema_model_reach_the_ema(backend: str) -> None:
    """In ema-pytorch, ema_model's params are the EMA: an in-place edit changes it. So here."""
    kwargs = {"beta": 0.9, "update_after_step": 1, "update_every": 1}
    _, peer, ours = train_pair("cnn", torch.float32, 5, kwargs)
    for e in (peer, ours):
        with torch.no_grad():
            e.ema_model.fc.weight.add_(1.0)
            e.ema_model.bn1.running_mean.add_(1.0)
        e.ema_model.load_state_dict(e.ema_model.state_dict())
        e.update()
    assert check_states(peer, ours, 0.9, "after edits") <= 1.0
    ours_sd = ours.state_dict()
    assert (
        ours_sd["ema_model.fc.weight"].data_ptr()
        == ours.switch_ema.storage.buckets[0].ema_flat.data_ptr()
        + 4 * (ours.switch_ema.storage.buckets[0].offsets[ours.switch_ema.storage.buckets[0].names.index("fc.weight")])
    )


def test_refusals_leave_everything_as_it_was(backend: str) -> None:
    model = make_model("cnn", torch.float32)
    before = param_snapshot(model)
    with pytest.raises(TypeError, match="EMAPytree"):
        Ours({"w": torch.zeros(3)})
    for bad in ({"beta": 1.5}, {"beta": float("nan")}, {"update_every": 0}, {"update_after_step": -1}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            Ours(model, **bad)
    with pytest.raises(TypeError, match="ignore_names"):
        Ours(model, ignore_names="fc.bias")
    with pytest.raises(ValueError, match="coerce_dtype=True"):
        Ours(model, ema_model=copy.deepcopy(model).double())
    with pytest.raises(ValueError, match=r"EMA in torch\.bfloat16 of a torch\.float32"):
        Ours(model, ema_model=copy.deepcopy(model).bfloat16(), coerce_dtype=True)
    with pytest.raises(ValueError, match="not in ema_model"):
        Ours(model, ema_model=nn.Linear(2, 2))
    with pytest.raises(AttributeError, match="forward_method_names"):
        Ours(model, forward_method_names=("no_such_method",))
    model.lock = threading.Lock()  # ema-pytorch prints and exit()s when the deep copy fails
    with pytest.raises(TypeError, match="lock"):
        Ours(model)
    del model.lock
    assert_params_untouched(model, before)


def test_moves_and_rebinding_are_refused(backend: str) -> None:
    kwargs = {"beta": 0.9, "update_after_step": 1, "update_every": 1}
    _, _, ours = train_pair("cnn", torch.float32, 4, kwargs)
    ours.to("cpu")  # a no-op move is fine; step/initted follow any device
    ours.cpu().float()
    for call in (lambda: ours.to(torch.float64), lambda: ours.half(), lambda: ours.ema_model.half()):
        snapshot = {k: v.clone() for k, v in ours.state_dict().items()}
        with pytest.raises(RuntimeError, match="move or convert the model before building"):
            call()
        for k, v in ours.state_dict().items():
            assert v.dtype == snapshot[k].dtype and torch.equal(v, snapshot[k]), k
    ours.update()
    independent = copy.deepcopy(ours.ema_model).half()  # a deep copy is the user's own module
    assert independent.fc.weight.dtype == torch.float16
    with pytest.raises(ValueError, match="assign"):
        ours.load_state_dict(ours.state_dict(), assign=True)
    with pytest.raises(TypeError, match="deep-copied"):
        copy.deepcopy(ours)
    with pytest.raises(TypeError, match="pickled"):
        pickle.dumps(ours)
    ours.ignore_names.add("fc.bias")
    with pytest.raises(RuntimeError, match="ignore_names changed"):
        ours.update()
    ours.ignore_names.discard("fc.bias")
    saved_fc = ours.ema_model.fc.weight
    ours.ema_model.fc.weight = nn.Parameter(saved_fc.detach().clone())
    with pytest.raises(RuntimeError, match=r"fc\.weight no longer view"):
        ours.update()
    ours.ema_model.fc.weight = saved_fc
    ours.update()
    real = ours.ema_model
    ours.ema_model = copy.deepcopy(real)
    with pytest.raises(RuntimeError, match="ema_model was replaced"):
        ours.update()
    ours.ema_model = real
    ours.model.to(torch.float64)
    with pytest.raises(BucketMovedError, match="no longer live where") as moved:
        ours.update()
    # The error names the class the user built and the fix, not sema's internals.
    assert "sema.compat.ema_pytorch.EMA.update()" in str(moved.value)
    assert "before building sema.compat.ema_pytorch.EMA" in str(moved.value)
    assert "SwitchEMA" not in str(moved.value)


def test_ema_model_pickles_and_loads_as_an_ordinary_module(backend: str) -> None:
    """torch.save / pickle of ema_model (its move guard is a partial of a module-level function,
    written by reference): the loaded copy holds the same values in tensors of its own and
    converts like any module; the live ema_model still refuses moves."""
    kwargs = {"beta": 0.9, "update_after_step": 1, "update_every": 1}
    _, peer, ours = train_pair("cnn", torch.float32, 4, kwargs)
    expected = {k: v.clone() for k, v in ours.ema_model.state_dict().items()}
    buffer = io.BytesIO()
    torch.save(ours.ema_model, buffer)
    buffer.seek(0)
    for loaded in (torch.load(buffer, weights_only=False), pickle.loads(pickle.dumps(ours.ema_model))):
        assert list(loaded.state_dict()) == list(expected)
        for k, v in loaded.state_dict().items():
            assert torch.equal(v, expected[k]), k
        loaded.half()  # an ordinary module now
        assert loaded.fc.weight.dtype == torch.float16 and loaded.bn1.running_mean.dtype == torch.float16
    with pytest.raises(RuntimeError, match="move or convert the model before building"):
        ours.ema_model.half()
    for k, v in ours.ema_model.state_dict().items():
        assert v.dtype == expected[k].dtype and torch.equal(v, expected[k]), k
    peer.update()
    ours.update()  # the live EMA is unaffected
    assert check_states(peer, ours, peer.get_current_decay(), "after pickling ema_model") <= 1.0


def _frozen_state(ema: Ours) -> dict[str, Tensor]:
    return {k: v.clone() for k, v in ema.state_dict().items()}


def _assert_state(ema: Ours, before: dict[str, Tensor]) -> None:
    after = ema.state_dict()
    assert list(after) == list(before)
    for k, v in after.items():
        assert torch.equal(v, before[k]), k


def test_replaced_submodules_are_refused(backend: str) -> None:
    """ema-pytorch follows a submodule replaced in ema_model or in the model by name (shown on
    the real peer); sema's buckets hold the original modules' params, so the drop-in refuses
    before changing anything, and works again once the original module is back."""
    kwargs = {"beta": 0.5, "update_after_step": 0, "update_every": 1}
    _, peer, ours = train_pair("cnn", torch.float32, 3, kwargs)
    peer.ema_model.fc = nn.Linear(8, 4)
    nn.init.zeros_(peer.ema_model.fc.weight)
    peer.update()
    assert peer.ema_model.fc.weight.abs().sum() > 0  # the peer averaged the new module

    for owner, label in ((ours.ema_model, r"ema\.ema_model\.fc"), (ours.model, r"model\.fc")):
        original, before = owner.fc, _frozen_state(ours)
        owner.fc = nn.Linear(8, 4)
        for call in (ours.update, ours.copy_params_from_model_to_ema, ours.copy_params_from_ema_to_model):
            with pytest.raises(RuntimeError, match=label + r" was replaced or removed.*load_state_dict"):
                call()
        owner.fc = original
        _assert_state(ours, before)
    bn2 = ours.ema_model.bn2
    del ours.ema_model.bn2  # a removed submodule (its buffers are on the tensor path)
    with pytest.raises(RuntimeError, match=r"ema\.ema_model\.bn2 was replaced or removed"):
        ours.update()
    ours.ema_model.bn2 = nn.BatchNorm2d(8)  # an equal module, but not the one sema built on
    with pytest.raises(RuntimeError, match=r"ema\.ema_model\.bn2 was replaced"):
        ours.update()
    # Negative control: with the original modules back, update() runs (step counted once, EMA moved).
    ours.ema_model.bn2 = bn2
    steps, fc = int(ours.step), ours.ema_model.fc.weight.detach().clone()
    ours.update()
    assert int(ours.step) == steps + 1 and not torch.equal(ours.ema_model.fc.weight, fc)


@pytest.mark.parametrize("include_online_model", [True, False])
def test_another_online_model_is_refused(include_online_model: bool, backend: str) -> None:
    """ema-pytorch averages toward whatever ``online_model`` holds now (shown on the real peer);
    sema's buckets hold the params of the model the EMA was built on, so the drop-in refuses."""
    kwargs = {"beta": 0.5, "update_after_step": 0, "update_every": 1, "include_online_model": include_online_model}
    _, peer, ours = train_pair("cnn", torch.float32, 3, kwargs)

    def swap(ema: nn.Module, model: nn.Module) -> None:
        if include_online_model:
            ema.online_model = model
        else:
            ema.online_model[0] = model

    other = make_model("cnn", torch.float32, seed=7)
    before_peer = peer.ema_model.fc.weight.detach().clone()
    swap(peer, copy.deepcopy(other))
    peer.update()
    target = other.fc.weight.detach()
    assert (peer.ema_model.fc.weight - target).abs().max() < (before_peer - target).abs().max()

    original = ours.model
    swap(ours, copy.deepcopy(other))
    before = _frozen_state(ours)
    for call in (ours.update, ours.copy_params_from_model_to_ema, ours.update_model_with_ema):
        with pytest.raises(RuntimeError, match="online_model is no longer the model this EMA was built on"):
            call()
    _assert_state(ours, before)
    swap(ours, original)
    steps = int(ours.step)
    ours.update()
    assert int(ours.step) == steps + 1


class TiedLM(nn.Module):
    """Embedding tied to the output head: named_parameters() lists the tied weight once, in
    both libraries."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(11, 8)
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 11, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.norm(self.embed(x)))

    def batch(self, g: torch.Generator, dtype: torch.dtype) -> Tensor:
        return torch.randint(0, 11, (4, 6), generator=g)


def test_tied_weights_stay_tied(backend: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(MODELS, "tied", TiedLM)
    kwargs = {"beta": 0.9, "update_after_step": 1, "update_every": 1}
    worst, peer, ours = train_pair("tied", torch.float32, 40, kwargs)
    assert worst <= 1.0
    assert ours.ema_model.head.weight is ours.ema_model.embed.weight
    assert list(ours.parameter_names) and ours.parameter_names == peer.parameter_names


def test_model_without_trainable_params(backend: str) -> None:
    """Everything frozen: no buckets at all; the tensor path averages what the peer averages."""

    def freeze(m: nn.Module) -> None:
        m.requires_grad_(False)

    def nudge(m: nn.Module) -> None:
        with torch.no_grad():
            for p in m.parameters():
                p.mul_(0.97).add_(0.02)

    model = make_model("cnn", torch.float32)
    freeze(model)
    twin = copy.deepcopy(model)
    kwargs = {"beta": 0.9, "update_after_step": 2, "update_every": 1}
    peer, ours = Peer(model, **kwargs), Ours(twin, **kwargs)
    assert ours.switch_ema is None
    g = torch.Generator().manual_seed(4)
    for step in range(30):
        x = model.batch(g, torch.float32)
        for m in (model, twin):
            m(x)  # train-mode BatchNorm moves the running stats
            nudge(m)
        peer.update()
        ours.update()
        assert check_states(peer, ours, peer.get_current_decay(), f"step {step}") <= 1.0
    assert not torch.equal(ours.ema_model.fc.weight, twin.fc.weight)


def test_first_update_writes_every_element(backend: str) -> None:
    """NaN-poison the whole EMA (buckets and ema_model's own tensors, in both libraries) before
    the first update: its copy must overwrite every element."""
    model = make_model("cnn", torch.float32)
    twin = copy.deepcopy(model)
    peer, ours = Peer(model, beta=0.9), Ours(twin, beta=0.9)
    with torch.no_grad():
        for e in (peer, ours):
            for t in (*e.ema_model.parameters(), *e.ema_model.buffers()):
                if t.is_floating_point():
                    t.fill_(float("nan"))
    assert ours.switch_ema.buckets[0].ema_flat.isnan().any()  # the poison reached the buckets
    peer.update()
    ours.update()
    assert check_states(peer, ours, 0.0, "after the first update") == 0.0
    assert all(t.isfinite().all() for t in ours.ema_model.state_dict().values() if t.is_floating_point())

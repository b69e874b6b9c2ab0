"""``sema.compat.timm.ModelEmaV3`` against the real timm ``ModelEmaV3`` (timm 1.0.31).

timm is loaded from its ``utils/model_ema.py`` alone (``import timm`` needs torchvision, which has
no build for the pinned CPU torch here): the file imports only torch, so it is executed by path
from ``.venv/peers`` (``make install`` puts timm there with ``pip install --no-deps --target``) or
from an importable timm, as in tests/test_migration.py.

Each trajectory trains two identical models (same data, same optimizer), one under timm's EMA and
one under the drop-in, and compares every entry of the two ``state_dict()`` after every step.

TOLERANCES, per EMA dtype (``scale``: the largest magnitude of timm's tensor at that step;
``d_max``: the largest per-update decay of the run):

- fp32 EMA (fp32 model, or ``dtype=torch.float32`` for a bf16 model): ``4 eps32 scale / (1 - d_max)``.
  Both update in fp32 with 2-3 roundings of < 1.5 eps32 each (timm's foreach path with mixed
  dtypes computes ``e (1 - w) + w m``, sema the lerp); an error made at one update is multiplied
  by the decay at every later one, so the sum stays below ``1 / (1 - d_max)`` times one step's
  (the bound of tests/test_migration.py).
- bf16 EMA with ``stochastic_rounding=True`` (timm's default for a bf16 model): 0. Same
  arithmetic, same draws from a generator seeded alike, same chunks: bit for bit.
- bf16 EMA with ``stochastic_rounding=False``: ``eps_bf16 scale``, one bf16 ulp of the scale.
  Both compute torch's two-branch fp32 lerp (sema's kernels use torch's formula) and round it
  once to bf16, so they agree bit for bit here; the ulp leaves room for a platform whose fp32
  lerp fuses differently and flips one rounding.
- Integer buffers (``num_batches_tracked``): 0 (copied).

Each schedule also runs a drop-in set one step off (``update_after_step`` + 1, or another
stochastic rounding seed), which must fail the same check: the check can fail.
"""

from __future__ import annotations

import copy
import io
import pickle
import warnings
from collections.abc import Iterator

import conftest
import pytest
import torch
import torch.nn.functional as F
from conftest import load_timm_model_ema
from torch import Tensor, nn

import sema
from sema.compat.timm import ModelEmaV3

EPS32 = 2.0**-23
EPS_BF16 = 2.0**-7
STEPS = 100
DECAY = 0.9  # short memory: a start one step off shows within the run
BACKENDS = ["torch"] + (["cpp"] if sema.available_backends("cpu")["cpp"][0] else [])


TIMM = load_timm_model_ema("_peer_timm_model_ema_compat")
pytestmark = pytest.mark.skipif(TIMM is None, reason="timm not installed: run `make install` (puts it in .venv/peers)")


class SmallCNN(conftest.SmallCNN):
    """conftest's CNN, and a frozen param the loop changes (timm averages it too)."""

    def __init__(self) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.ones(4), requires_grad=False)

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x) * self.gain

    def batch(self, gen: torch.Generator, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        return torch.randn(8, 3, 8, 8, generator=gen).to(dtype), torch.randint(0, 4, (8,), generator=gen)


class SmallTransformer(nn.Module):
    """Embedding tied to the output head (a state_dict holds the tied weight under both names,
    and timm averages each name), a frozen positional table, one encoder layer."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(16, 16)
        self.pos = nn.Parameter(torch.randn(1, 6, 16) * 0.1, requires_grad=False)
        self.layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
        self.norm = nn.LayerNorm(16)
        self.head = nn.Linear(16, 16, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.norm(self.layer(self.embed(x) + self.pos)))

    def batch(self, gen: torch.Generator, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        x = torch.randint(0, 16, (4, 6), generator=gen)
        return x, torch.roll(x, 1, dims=1)


MODELS = {"cnn": SmallCNN, "transformer": SmallTransformer}


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny models: intra-op threads only add contention."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: Tensor, y: Tensor) -> None:
    model.train()
    out = model(x).float()
    loss = F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    with torch.no_grad():
        frozen = model.gain if isinstance(model, SmallCNN) else model.pos
        frozen.mul_(0.99).add_(0.01)  # a frozen param that changes: timm averages it


def max_decay(kwargs: dict, steps: int, with_step: bool) -> float:
    ema = TIMM.ModelEmaV3(nn.Linear(1, 1), **{k: v for k, v in kwargs.items() if k != "dtype"})
    return max(ema.get_decay(s if with_step else None) for s in range(steps + 1))


class Compare:
    """Worst ratio of |ours - timm| to the bound over every state_dict entry."""

    def __init__(self, kind: str, d_max: float) -> None:
        self.kind = kind
        self.d_max = d_max
        self.worst = (0.0, "")

    def bound(self, t: Tensor) -> float:
        if not t.is_floating_point() or self.kind == "sr":
            return 0.0
        scale = float(t.double().abs().max())
        if t.dtype == torch.bfloat16:
            return EPS_BF16 * scale
        return 4 * EPS32 * scale / (1.0 - self.d_max)

    def __call__(self, ours: dict[str, Tensor], theirs: dict[str, Tensor], step: int) -> None:
        assert list(ours) == list(theirs), "state_dict keys differ"
        for k, t in theirs.items():
            o = ours[k]
            assert o.dtype == t.dtype and o.shape == t.shape, f"{k}: {o.dtype}{tuple(o.shape)} vs {t.dtype}"
            err = float((o.double() - t.double()).abs().max()) if t.numel() else 0.0
            if err != err:
                err = float("inf")
            bound = self.bound(t)
            ratio = err / bound if bound else (0.0 if err == 0 else float("inf"))
            if ratio > self.worst[0]:
                self.worst = (ratio, f"step {step} {k}: err {err:.3g}, bound {bound:.3g}")


# (model dtype, ModelEmaV3 kwargs, comparison kind)
DTYPES = {
    "fp32": (torch.float32, {}, "fp32"),
    "bf16_sr": (torch.bfloat16, {}, "sr"),
    "bf16_sr_noforeach": (torch.bfloat16, {"foreach": False}, "sr"),
    "bf16_ema_fp32": (torch.bfloat16, {"dtype": torch.float32}, "fp32"),
    "bf16_no_sr": (torch.bfloat16, {"stochastic_rounding": False}, "bf16"),
}
# (kwargs, pass step)
SCHEDULES = {
    "plain": ({}, False),
    "step_after5": ({"update_after_step": 5}, True),
    "warmup_after3": ({"use_warmup": True, "update_after_step": 3, "warmup_gamma": 2.0, "min_decay": 0.3}, True),
    "exclude_buffers": ({"exclude_buffers": True, "update_after_step": 2}, True),
}
# Every dtype option meets every schedule on some model, and each backend runs each dtype option
# that uses it (stochastic rounding runs timm's algorithm in torch ops whatever the backend).
CASES = [
    ("cnn", "fp32", "plain", "torch"),
    ("cnn", "fp32", "warmup_after3", "cpp"),
    ("cnn", "fp32", "exclude_buffers", "torch"),
    ("cnn", "bf16_sr", "step_after5", "torch"),
    ("cnn", "bf16_sr_noforeach", "warmup_after3", "torch"),
    ("cnn", "bf16_ema_fp32", "plain", "cpp"),
    ("cnn", "bf16_no_sr", "exclude_buffers", "cpp"),
    ("transformer", "fp32", "step_after5", "cpp"),
    ("transformer", "bf16_sr", "exclude_buffers", "torch"),
    ("transformer", "bf16_ema_fp32", "warmup_after3", "torch"),
    ("transformer", "bf16_ema_fp32", "step_after5", "cpp"),
    ("transformer", "bf16_no_sr", "plain", "torch"),
]


def shifted(kind: str, kwargs: dict, with_step: bool) -> dict:
    """The same setting one step off (or with another seed): must fail the check."""
    if kind == "sr":
        return {**kwargs, "stochastic_rounding_seed": 1}
    if with_step:
        return {**kwargs, "update_after_step": kwargs.get("update_after_step", 0) + 1}
    return {**kwargs, "decay": DECAY + 0.001}


def run(model_name: str, dtype: torch.dtype, kwargs: dict, with_step: bool, kind: str, backend: str, seed: int):
    torch.manual_seed(seed)
    base = MODELS[model_name]().to(dtype)
    # Tied weights with timm's foreach path and mixed dtypes: timm's result is no average there
    # (docs in sema/compat/timm.py); its foreach=False path lerps each name, as sema does.
    if model_name == "transformer" and "dtype" in kwargs:
        kwargs = {**kwargs, "foreach": False}
    kwargs = {"decay": DECAY, **kwargs}
    theirs_model, ours_model, wrong_model = (copy.deepcopy(base) for _ in range(3))
    theirs = TIMM.ModelEmaV3(theirs_model, **kwargs)
    ours = ModelEmaV3(ours_model, backend=backend, **kwargs)
    wrong = ModelEmaV3(wrong_model, backend=backend, **shifted(kind, kwargs, with_step))
    trained = [(theirs_model, theirs), (ours_model, ours)]
    optimizers = [torch.optim.AdamW(m.parameters(), lr=1e-2, foreach=True) for m, _ in trained]
    d_max = max_decay(kwargs, STEPS, with_step)
    check, check_wrong = Compare(kind, d_max), Compare(kind, d_max)
    gen = torch.Generator().manual_seed(seed)
    for step in range(STEPS):
        x, y = base.batch(gen, dtype)
        for (model, ema), opt in zip(trained, optimizers, strict=True):
            train_step(model, opt, x, y)
            ema.update(model, step=step + 1) if with_step else ema.update(model)
        with torch.no_grad():  # the control follows the same trajectory without training a third model
            for dst, src in zip(wrong_model.state_dict().values(), ours_model.state_dict().values(), strict=True):
                dst.copy_(src)
        wrong.update(wrong_model, step=step + 1) if with_step else wrong.update(wrong_model)
        expected = theirs.state_dict()
        check(ours.state_dict(), expected, step)
        check_wrong(wrong.state_dict(), expected, step)
    return check.worst, check_wrong.worst


CASE_IDS = ["-".join(c) for c in CASES]


@pytest.mark.parametrize(("model_name", "dtype_name", "schedule_name", "backend"), CASES, ids=CASE_IDS)
def test_same_ema_every_step(model_name: str, dtype_name: str, schedule_name: str, backend: str) -> None:
    if backend not in BACKENDS:
        pytest.skip(f"sema's {backend} backend is not built here")
    dtype, dtype_kwargs, kind = DTYPES[dtype_name]
    schedule_kwargs, with_step = SCHEDULES[schedule_name]
    ours, wrong = run(model_name, dtype, {**dtype_kwargs, **schedule_kwargs}, with_step, kind, backend, seed=7)
    assert ours[0] <= 1.0, f"drop-in off timm's EMA beyond the bound: {ours[1]}"
    assert wrong[0] > 1.0, f"a drop-in one step off passed the check (the check cannot fail): {wrong[1]}"


def make_pair(
    model_cls: type = SmallCNN, model_dtype: torch.dtype = torch.float32, backend: str = "torch", **kwargs: object
) -> tuple[nn.Module, ModelEmaV3, nn.Module, nn.Module]:
    torch.manual_seed(0)
    base = model_cls().to(model_dtype)
    a, b = copy.deepcopy(base), copy.deepcopy(base)
    return a, ModelEmaV3(a, backend=backend, **kwargs), b, TIMM.ModelEmaV3(b, **kwargs)


def perturb(*models: nn.Module, seed: int = 1) -> None:
    """The same random change to every model's params and float buffers (positive, so running
    variances stay valid)."""
    gen = torch.Generator().manual_seed(seed)
    values = [torch.rand(t.shape, generator=gen) for t in models[0].state_dict().values() if t.is_floating_point()]
    for m in models:
        floats = [t for t in m.state_dict().values() if t.is_floating_point()]
        with torch.no_grad():
            for t, v in zip(floats, values, strict=True):
                t.add_(v.to(t.dtype))


def assert_same_state(ours: dict[str, Tensor], theirs: dict[str, Tensor], rel: float = 4 * EPS32) -> None:
    assert list(ours) == list(theirs)
    for k in theirs:
        torch.testing.assert_close(ours[k], theirs[k], rtol=rel, atol=rel * float(theirs[k].abs().max()), msg=k)


def test_constructor_signature_and_defaults_match_timm() -> None:
    import inspect

    theirs = inspect.signature(TIMM.ModelEmaV3.__init__).parameters
    ours = inspect.signature(ModelEmaV3.__init__).parameters
    assert [n for n in ours if n != "backend"] == list(theirs)
    for name, p in theirs.items():
        assert ours[name].default == p.default, name
    assert ours["backend"].kind is inspect.Parameter.KEYWORD_ONLY
    _, ours_ema, _, theirs_ema = make_pair()
    for name in [n for n in theirs if n not in ("self", "model")]:
        assert getattr(ours_ema, name) == getattr(theirs_ema, name), name


def test_get_decay_matches_timm() -> None:
    settings = [
        {},
        {"update_after_step": 4},
        {"use_warmup": True},
        {"use_warmup": True, "warmup_gamma": 3.0, "warmup_power": 0.75, "min_decay": 0.2, "update_after_step": 2},
    ]
    for kwargs in settings:
        ours = ModelEmaV3(nn.Linear(2, 2), decay=0.999, **kwargs)
        theirs = TIMM.ModelEmaV3(nn.Linear(2, 2), decay=0.999, **kwargs)
        for step in [None, 0, 1, 2, 3, 5, 6, 10, 100, 10**6]:
            assert ours.get_decay(step) == theirs.get_decay(step), (kwargs, step)
    ours.decay = 0.5  # an attribute, read at every call, as in timm
    assert ours.get_decay(None) == 0.5


@pytest.mark.parametrize("backend", BACKENDS)
def test_checkpoints_load_both_ways(backend: str) -> None:
    a, ours, b, theirs = make_pair(decay=0.8, backend=backend)
    for step in range(5):
        perturb(a, b, seed=step)
        ours.update(a)
        theirs.update(b)
    # timm -> drop-in: a drop-in built on another copy of the model takes timm's checkpoint.
    buffer = io.BytesIO()
    torch.save(theirs.state_dict(), buffer)
    c = copy.deepcopy(a)
    loaded = ModelEmaV3(c, decay=0.8, backend=backend)
    buffer.seek(0)
    loaded.load_state_dict(torch.load(buffer))
    assert_same_state(loaded.state_dict(), theirs.state_dict(), rel=0.0)
    perturb(c, b, seed=11)
    perturb(a, seed=11)
    loaded.update(c)
    theirs.update(b)
    assert_same_state(loaded.state_dict(), theirs.state_dict())
    # drop-in -> timm
    ours.update(a)
    fresh = TIMM.ModelEmaV3(copy.deepcopy(b), decay=0.8)
    fresh.load_state_dict(ours.state_dict())
    assert_same_state(fresh.state_dict(), ours.state_dict(), rel=0.0)
    # timm's train.py resumes the EMA with load_checkpoint(model_ema.module, ..., use_ema=True)
    plain = {k.removeprefix("module."): v for k, v in theirs.state_dict().items()}
    ours.module.load_state_dict(plain)
    assert_same_state(ours.module.state_dict(), theirs.module.state_dict(), rel=0.0)
    assert list(ours.module.state_dict()) == list(a.state_dict())


def test_module_forward_and_eval() -> None:
    a, ours, b, theirs = make_pair(decay=0.5)
    perturb(a, b)
    ours.update(a)
    theirs.update(b)
    assert not ours.module.training and not theirs.module.training and ours.training == theirs.training
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(ours(x), theirs(x))
    torch.testing.assert_close(ours.module(x), theirs.module(x))
    assert [p.requires_grad for p in ours.module.parameters()] == [p.requires_grad for p in b.parameters()]
    # forward does not touch the live model or the EMA (eval mode: BatchNorm reads its stats)
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    ours(x)
    assert_same_state(ours.state_dict(), before, rel=0.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_set_matches_timm(backend: str) -> None:
    a, ours, b, theirs = make_pair(decay=0.9, backend=backend)
    perturb(a, b)
    ours.update(a)
    theirs.update(b)
    perturb(a, b, seed=3)
    ours.set(a)
    theirs.set(b)
    assert_same_state(ours.state_dict(), theirs.state_dict(), rel=0.0)
    assert_same_state(ours.module.state_dict(), a.state_dict(), rel=0.0)


@pytest.mark.parametrize("exclude_buffers", [False, True])
def test_apply_update_methods_match_timm(exclude_buffers: bool) -> None:
    a, ours, b, theirs = make_pair(SmallTransformer, decay=0.9)
    a.eval(), b.eval()
    for step in range(3):
        perturb(a, b, seed=step)
        if exclude_buffers:
            ours.apply_update_no_buffers_(a, 0.7)
            with torch.no_grad():  # timm's apply_* methods need it (only its update() has it); ours do not
                theirs.apply_update_no_buffers_(b, 0.7)
        else:
            ours.apply_update_(a, 0.7)
            with torch.no_grad():
                theirs.apply_update_(b, 0.7)
        assert_same_state(ours.state_dict(), theirs.state_dict())


class Wrapper(nn.Module):
    """Stands in for DDP: the same tensors under ``module.``."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, x: Tensor) -> Tensor:
        return self.module(x)


def test_update_through_a_wrapper_and_from_another_model() -> None:
    a, ours, b, theirs = make_pair(decay=0.9)
    wrapped = Wrapper(a)
    for step in range(3):
        perturb(a, b, seed=step)
        ours.update(wrapped, step=step + 1)
        theirs.update(Wrapper(b), step=step + 1)
    assert wrapped in ours._verified  # the fused path, checked once
    assert_same_state(ours.state_dict(), theirs.state_dict())
    # another model of the same structure goes through the multi-tensor path, as timm allows
    other = SmallCNN()
    ours.update(other, step=10)
    theirs.update(copy.deepcopy(other), step=10)
    assert_same_state(ours.state_dict(), theirs.state_dict())
    with pytest.raises(ValueError, match="entries"):
        ours.update(nn.Linear(2, 2))


def test_device_argument() -> None:
    a, ours, b, theirs = make_pair(decay=0.9, device="cpu")
    perturb(a, b)
    ours.update(a)
    theirs.update(b)
    assert_same_state(ours.state_dict(), theirs.state_dict())
    assert ours.device == "cpu"
    model = SmallCNN()
    ptrs = [p.data_ptr() for p in model.parameters()]
    for device in ("meta", torch.device("cuda", 0)):
        with pytest.raises(ValueError, match=r"offload.*ema_device='cpu'"):
            ModelEmaV3(model, device=device)
    assert [p.data_ptr() for p in model.parameters()] == ptrs  # refused before anything moved


def test_dtype_argument() -> None:
    model = SmallCNN()
    ptrs = [p.data_ptr() for p in model.parameters()]
    for dtype in (torch.bfloat16, torch.float64, torch.float16):
        with pytest.raises(ValueError, match="float32 or in each tensor's own dtype"):
            ModelEmaV3(model, dtype=dtype)
    assert [p.data_ptr() for p in model.parameters()] == ptrs
    with pytest.raises(TypeError, match="dtype"):
        ModelEmaV3(model, dtype="float32")
    ema = ModelEmaV3(model, dtype=torch.float32)  # the model's own dtype: accepted
    assert all(t.dtype == torch.float32 for t in ema.module.state_dict().values() if t.is_floating_point())
    bf16 = ModelEmaV3(SmallCNN().to(torch.bfloat16), dtype=torch.float32)
    theirs = TIMM.ModelEmaV3(SmallCNN().to(torch.bfloat16), dtype=torch.float32)
    assert [t.dtype for t in bf16.state_dict().values()] == [t.dtype for t in theirs.state_dict().values()]


def test_moves_are_refused_or_caught() -> None:
    a, ours, _, _ = make_pair()
    assert ours.to("cpu") is ours and ours.float() is ours  # no change: allowed
    with pytest.raises(RuntimeError, match="cannot be moved or converted"):
        ours.half()
    assert all(t.dtype != torch.float16 for t in ours.state_dict().values())
    ours.module.fc.weight.data = ours.module.fc.weight.data.clone()
    with pytest.raises(RuntimeError, match="module or its tensors were replaced"):
        ours.update(a)
    a, ours, _, _ = make_pair()
    ours.module = copy.deepcopy(a)
    with pytest.raises(RuntimeError, match="module or its tensors were replaced"):
        ours.update(a)
    a, ours, _, _ = make_pair()
    a.to(torch.float64)
    with pytest.raises(sema.BucketMovedError, match="ModelEmaV3"):
        ours.update(a)


def test_reassigned_buffer_is_followed() -> None:
    a, ours, b, theirs = make_pair(decay=0.5)
    ours.update(a)
    theirs.update(b)
    for m in (a, b):
        m.bn1.running_mean = torch.full((6,), 3.0)  # a new tensor in the slot: timm reads it
        m.bn2.running_var.data = torch.full((8,), 2.0)  # new memory under the same tensor
        m.gain.data = torch.full((4,), 0.5)  # a frozen param's memory replaced
    ours.update(a)
    theirs.update(b)
    assert_same_state(ours.state_dict(), theirs.state_dict())


def test_attributes_changed_after_construction_take_effect() -> None:
    """timm reads decay, foreach, stochastic_rounding and exclude_buffers at every call."""
    a, ours, b, theirs = make_pair(SmallCNN, torch.bfloat16, decay=0.9)
    for step, (attr, value) in enumerate(
        [("stochastic_rounding", False), ("decay", 0.5), ("exclude_buffers", True), ("stochastic_rounding", True)]
    ):
        setattr(ours, attr, value)
        setattr(theirs, attr, value)
        perturb(a, b, seed=step)
        ours.update(a)
        theirs.update(b)
        assert_same_state(ours.state_dict(), theirs.state_dict(), rel=0.0)


def test_copy_and_pickle_are_refused() -> None:
    _, ours, _, _ = make_pair()
    with pytest.raises(TypeError, match="load_state_dict"):
        copy.deepcopy(ours)
    with pytest.raises(TypeError, match="state_dict"):
        pickle.dumps(ours)


def test_live_model_is_not_a_submodule() -> None:
    a, ours, _, _ = make_pair()
    assert list(ours._modules) == ["module"]
    a.eval()
    ours.train()
    assert not a.training  # train() on the EMA leaves the live model alone
    assert ours.module.training  # and reaches the EMA module, as in timm


def test_warns_nothing_on_the_common_path() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        a, ours, _, _ = make_pair()
        ours.update(a, step=3)


def test_tied_weight_with_mixed_dtypes_warns_and_matches_timm_per_name() -> None:
    from sema.compat.timm import TiedWeightWarning

    with pytest.warns(TiedWeightWarning, match=r"head\.weight"):
        a, ours, b, _ = make_pair(SmallTransformer, torch.bfloat16, decay=0.8, dtype=torch.float32)
    theirs = TIMM.ModelEmaV3(b, decay=0.8, dtype=torch.float32, foreach=False)
    for step in range(3):
        perturb(a, b, seed=step)
        ours.update(a)
        theirs.update(b)
    assert_same_state(ours.state_dict(), theirs.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ModelEmaV3(SmallTransformer(), dtype=torch.float32, foreach=False)
        ModelEmaV3(SmallTransformer().to(torch.bfloat16))  # same dtype (stochastic rounding): timm per name too


@pytest.mark.parametrize("foreach", [True, False])
def test_stochastic_rounding_across_timm_chunks(foreach: bool) -> None:
    """Over 2**22 elements timm splits its stochastic-rounding pass into chunks, each with its own
    draws: the same split gives the same bits."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(2048, 2048), nn.Linear(16, 16)).to(torch.bfloat16)
    a, b = copy.deepcopy(base), copy.deepcopy(base)
    ours = ModelEmaV3(a, decay=0.9, foreach=foreach, stochastic_rounding_seed=5)
    theirs = TIMM.ModelEmaV3(b, decay=0.9, foreach=foreach, stochastic_rounding_seed=5)
    for _ in range(2):
        with torch.no_grad():
            for p, q in zip(a.parameters(), b.parameters(), strict=True):
                noise = torch.randn(p.shape).to(torch.bfloat16)
                p.add_(noise)
                q.add_(noise)
        ours.update(a)
        theirs.update(b)
        assert_same_state(ours.state_dict(), theirs.state_dict(), rel=0.0)


def test_channels_last_model_and_compiled_ema() -> None:
    """timm's train.py converts to channels_last before building the EMA and may compile the EMA
    (``model_ema = torch.compile(model_ema)``); ``update`` then reaches the drop-in through it."""
    torch.manual_seed(0)
    base = SmallCNN().to(memory_format=torch.channels_last)
    a, b = copy.deepcopy(base), copy.deepcopy(base)
    ours, theirs = ModelEmaV3(a, decay=0.9), TIMM.ModelEmaV3(b, decay=0.9)
    assert ours.module.conv1.weight.stride() == theirs.module.conv1.weight.stride()
    compiled = torch.compile(ours, backend="eager")
    for step in range(3):
        perturb(a, b, seed=step)
        compiled.update(a, step=step + 1)
        theirs.update(b, step=step + 1)
    assert_same_state(ours.state_dict(), theirs.state_dict(), rel=0.0)
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(compiled(x), theirs(x), rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("model_dtype", [torch.float16, torch.float64], ids=["fp16", "fp64"])
def test_fp16_and_fp64_models(model_dtype: torch.dtype, backend: str) -> None:
    """An EMA in the model's own dtype: both round torch's fp32 lerp once (fp16), or lerp in
    fp64 (sema's fp64 buckets run on the torch backend): bit for bit."""
    a, ours, b, theirs = make_pair(SmallCNN, model_dtype, backend=backend, decay=0.9)
    for step in range(10):
        perturb(a, b, seed=step)
        ours.update(a, step=step)
        theirs.update(b, step=step)
        assert_same_state(ours.state_dict(), theirs.state_dict(), rel=0.0)

"""``sema.compat.torch_ema.ExponentialMovingAverage`` against the real torch_ema 0.3.

Each trajectory trains two identical copies of a model (a small CNN with BatchNorm, a small
transformer) with the same data and optimizer, checks that the copies stay bit-identical, and
after every optimizer step updates torch_ema on one and the drop-in on the other; the shadows are
compared after every step. Every public method of torch_ema's class is exercised here; the
module docstring of ``sema/compat/torch_ema.py`` lists what differs.

TOLERANCES (|ours - peer| per element, ``scale`` the largest magnitude of the peer's tensor at
that step, ``d_max`` the largest per-update decay reached so far):

| EMA dtype                              | bound                               |
| -------------------------------------- | ----------------------------------- |
| fp32 (fp32 params, or bf16 params after ``to(dtype=torch.float32)``) | ``4 eps32 scale / (1 - d_max)`` |
| fp64                                   | ``4 eps64 scale / (1 - d_max)``     |
| bf16 (bf16 params, the default)        | 0: bit for bit                      |

Why: sema's fused ``lerp`` rounds twice, torch_ema's ``s - (s - p) * w`` three times, each error
below 1.5 eps of the largest magnitude involved; an error made at one update is multiplied by the
decay at every later one, so the difference stays below ``4 eps scale / (1 - d_max)`` (the bound
of tests/test_migration.py). A bf16 EMA runs torch_ema's own three ops on each flat bucket, so
it must be equal bit for bit. The negative controls (a warmup one step off, a wrong bf16 formula)
must fail these checks.
"""

from __future__ import annotations

import copy
import gc
import io
from collections.abc import Callable, Iterator

import pytest
import torch
from conftest import SmallCNN as SharedCNN
from torch import Tensor, nn

import sema
from sema import ops
from sema.compat.torch_ema import ExponentialMovingAverage as Ours

torch_ema = pytest.importorskip("torch_ema", reason="torch_ema 0.3 is the peer; install torch-ema==0.3")
Peer = torch_ema.ExponentialMovingAverage

EPS = {torch.float32: 2.0**-23, torch.float64: 2.0**-52}
ERROR_FACTOR = 4.0
DECAY = 0.9  # with use_num_updates, (1 + n) / (10 + n) stays below it until n = 80: both regimes in 100 steps
STEPS = 100
BACKENDS = [name for name in ("torch", "cpp") if sema.available_backends("cpu")[name][0]]


class SmallCNN(SharedCNN):
    @staticmethod
    def batch(dtype: torch.dtype) -> Tensor:
        return torch.randn(4, 3, 8, 8, dtype=dtype)


class SmallTransformer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(6, 16)
        self.layer = nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, dropout=0.0, batch_first=True)
        self.head = nn.Linear(16, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.layer(self.embed(x)).mean(dim=1))

    @staticmethod
    def batch(dtype: torch.dtype) -> Tensor:
        return torch.randn(4, 5, 6, dtype=dtype)


MODELS = {"cnn": SmallCNN, "transformer": SmallTransformer}


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny models on a shared 2-core VM: intra-op threads only wait on each other (30x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def twins(kind: str, dtype: torch.dtype, seed: int) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(seed)
    model = MODELS[kind]().to(dtype)
    list(model.parameters())[1].requires_grad_(False)  # torch_ema averages frozen params too
    return model, copy.deepcopy(model)


def train_step(models: list[nn.Module], optimizers: list[torch.optim.Optimizer], x: Tensor) -> None:
    for model, optimizer in zip(models, optimizers, strict=True):
        model(x).float().square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    first, *rest = models
    for other in rest:
        for a, b in zip(first.parameters(), other.parameters(), strict=True):
            assert torch.equal(a, b), "the twin models diverged: the comparison would mean nothing"


def peer_decays(decay: float, use_num_updates: bool, steps: int) -> list[float]:
    """The per-update decay torch_ema uses at updates 1..steps."""
    if not use_num_updates:
        return [decay] * steps
    return [min(decay, (1 + n) / (10 + n)) for n in range(1, steps + 1)]


def check_shadows(
    ours: list[Tensor], theirs: list[Tensor], d_max: float, what: str, exact_low_precision: bool = True
) -> None:
    """Ours within the TOLERANCES bound of theirs (bit for bit for bf16/fp16 EMAs)."""
    assert len(ours) == len(theirs), f"{what}: {len(ours)} shadows, peer {len(theirs)}"
    for j, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        assert a.dtype == b.dtype and a.shape == b.shape, f"{what} [{j}]: {a.dtype}{tuple(a.shape)} vs peer {b.dtype}"
        if a.dtype in (torch.bfloat16, torch.float16) and exact_low_precision:
            if not torch.equal(a, b):
                i = int((a != b).flatten().nonzero()[0])
                raise AssertionError(
                    f"{what} [{j}]: bf16 shadow differs from the peer's: {int((a != b).sum())} elements, first "
                    f"at {i}: {a.flatten()[i].item()!r} vs {b.flatten()[i].item()!r}"
                )
            continue
        a64, b64 = a.double(), b.double()
        scale = max(b64.abs().max().item(), 1e-30) if b.numel() else 1.0
        bound = ERROR_FACTOR * EPS[a.dtype] * scale / (1.0 - d_max)
        err = (a64 - b64).abs()
        worst = err.max().item() if err.numel() else 0.0
        if not worst <= bound:  # NaN fails too
            i = int(err.flatten().argmax())
            raise AssertionError(
                f"{what} [{j}]: |ours - peer| = {worst:.3g} > bound {bound:.3g} "
                f"({worst / (EPS[a.dtype] * scale):.1f} eps of the scale {scale:.3g}) at {i}: "
                f"{a.flatten()[i].item()!r} vs {b.flatten()[i].item()!r}"
            )


def run_trajectory(
    kind: str,
    dtype: torch.dtype,
    use_num_updates: bool,
    backend: str,
    fp32_ema: bool = False,
    ours_hook: Callable[[Ours], None] | None = None,
    steps: int = STEPS,
) -> None:
    """Train the twins; after every step update both EMAs and compare them."""
    model, twin = twins(kind, dtype, seed=hash((kind, str(dtype), use_num_updates)) % 2**31)
    theirs = Peer(model.parameters(), decay=DECAY, use_num_updates=use_num_updates)
    ours = Ours(twin.parameters(), decay=DECAY, use_num_updates=use_num_updates, backend=backend)
    if fp32_ema:  # torch_ema's dtype option: an fp32 EMA of bf16 params
        theirs.to(dtype=torch.float32)
        ours.to(dtype=torch.float32)
    if ours_hook is not None:
        ours_hook(ours)
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9) for m in (model, twin)]
    decays = peer_decays(DECAY, use_num_updates, steps)
    for step in range(steps):
        train_step([model, twin], optimizers, MODELS[kind].batch(dtype))
        theirs.update()
        ours.update()
        assert ours_hook is not None or ours.num_updates == theirs.num_updates
        check_shadows(ours.shadow_params, theirs.shadow_params, max(decays[: step + 1]), f"step {step + 1}")


# A bf16 EMA runs torch_ema's own torch ops on the buckets, never a sema backend: one backend suffices.
TRAJECTORIES = [
    pytest.param(kind, dtype, use_num_updates, backend, id=f"{kind}-{dtype}-{label}-{backend}")
    for kind in MODELS
    for dtype in ("fp32", "bf16", "bf16-fp32ema")
    for use_num_updates, label in ((True, "num_updates"), (False, "plain"))
    for backend in (BACKENDS[:1] if dtype == "bf16" else BACKENDS)
]


@pytest.mark.parametrize(("kind", "dtype", "use_num_updates", "backend"), TRAJECTORIES)
def test_same_ema_as_torch_ema_every_step(kind: str, dtype: str, use_num_updates: bool, backend: str) -> None:
    param_dtype = torch.float32 if dtype == "fp32" else torch.bfloat16
    run_trajectory(kind, param_dtype, use_num_updates, backend, fp32_ema=dtype == "bf16-fp32ema")


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp64_params(backend: str) -> None:
    run_trajectory("cnn", torch.float64, True, backend, steps=30)


def test_negative_control_warmup_one_step_off() -> None:
    def shifted(ours: Ours) -> None:
        ours.num_updates = 1

    with pytest.raises(AssertionError, match="bound"):
        run_trajectory("cnn", torch.float32, True, "torch", ours_hook=shifted, steps=20)


def test_negative_control_bf16_fused_rounding_is_not_the_peers() -> None:
    """A bf16 EMA updated with sema's fused lerp (one rounding) instead of torch_ema's three ops
    drifts from the peer: the exact check must see it (why bf16 runs the peer's arithmetic)."""

    def fused(ours: Ours) -> None:
        ours._plan = [(False, e, p, b) for _, e, p, b in ours._plan]

    with pytest.raises(AssertionError, match="bf16 shadow differs"):
        run_trajectory("transformer", torch.bfloat16, False, "torch", ours_hook=fused, steps=40)


@pytest.mark.parametrize("backend", BACKENDS)
def test_update_takes_one_fused_pass_per_bucket(backend: str, monkeypatch: pytest.MonkeyPatch) -> None:
    model = SmallCNN()
    ours = Ours(model.parameters(), decay=0.99, backend=backend)
    calls: list[int] = []
    real = ops.dispatch_update
    monkeypatch.setattr(ops, "dispatch_update", lambda *a: (calls.append(a[0].numel()), real(*a))[1])
    monkeypatch.setattr(ops, "ema_update_multi_", lambda *a, **k: pytest.fail("multi-tensor op on the bucket path"))
    ours.update()
    ours.update(model.parameters())  # the same params, in order: the bucket path
    assert len(calls) == 2 * len(ours._ema.storage.buckets) == 2


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_update_with_other_params(dtype: torch.dtype, backend: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """update(other_model.parameters()) folds another model's params in (multi-tensor op for an fp32
    EMA), interleaved with plain update() calls, as torch_ema does."""
    model, twin = twins("transformer", dtype, seed=3)
    other = copy.deepcopy(model)
    theirs = Peer(model.parameters(), decay=DECAY)
    ours = Ours(twin.parameters(), decay=DECAY, backend=backend)
    multi_calls = []
    real = ops.ema_update_multi_
    monkeypatch.setattr(ops, "ema_update_multi_", lambda *a, **k: (multi_calls.append(1), real(*a, **k))[1])
    optimizers = [torch.optim.AdamW(m.parameters(), lr=1e-2) for m in (model, twin, other)]
    decays = peer_decays(DECAY, True, 40)
    for step in range(40):
        x = SmallTransformer.batch(dtype)
        train_step([model, twin], optimizers[:2], x)
        train_step([other], optimizers[2:], x)
        with torch.no_grad():
            for p in other.parameters():
                p.add_(0.01)  # other differs from model
        if step % 3 == 2:
            theirs.update()
            ours.update()
        else:
            theirs.update(other.parameters())
            ours.update(other.parameters())
        check_shadows(ours.shadow_params, theirs.shadow_params, max(decays[: step + 1]), f"step {step + 1}")
    assert bool(multi_calls) == (dtype == torch.float32)
    with pytest.raises(ValueError, match="Number of parameters"):
        ours.update(list(other.parameters())[:-1])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", ["fp32", "bf16", "bf16-fp32ema"])
def test_store_copy_to_restore_and_average_parameters(dtype: str, backend: str) -> None:
    param_dtype = torch.float32 if dtype == "fp32" else torch.bfloat16
    model, twin = twins("cnn", param_dtype, seed=5)
    theirs = Peer(model.parameters(), decay=DECAY)
    ours = Ours(twin.parameters(), decay=DECAY, backend=backend)
    if dtype == "bf16-fp32ema":
        theirs.to(dtype=torch.float32)
        ours.to(dtype=torch.float32)
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9) for m in (model, twin)]
    for _ in range(30):
        train_step([model, twin], optimizers, SmallCNN.batch(param_dtype))
        theirs.update()
        ours.update()
    live = [p.detach().clone() for p in twin.parameters()]
    with pytest.raises(RuntimeError, match="no `store\\(\\)`ed weights"):
        ours.restore()

    def expect_ema_inside() -> None:
        for j, (p, s) in enumerate(zip(twin.parameters(), ours.shadow_params, strict=True)):
            assert torch.equal(p, s.to(p.dtype)), f"param {j} does not hold the EMA (cast with round to nearest)"

    def expect_live() -> None:
        for j, (p, before) in enumerate(zip(twin.parameters(), live, strict=True)):
            assert torch.equal(p, before), f"param {j} not restored bit for bit"

    theirs.store()
    ours.store()
    for c, t in zip(ours.collected_params, theirs.collected_params, strict=True):
        assert torch.equal(c, t)
    with torch.no_grad():  # poison: every element must be written by copy_to, then by restore
        for p in twin.parameters():
            p.fill_(float("nan"))
    ours.copy_to()
    theirs.copy_to()
    expect_ema_inside()
    check_shadows([p.detach() for p in twin.parameters()], [p.detach() for p in model.parameters()], DECAY, "copy_to")
    with torch.no_grad():
        for p in twin.parameters():
            p.fill_(float("nan"))
    ours.restore()
    theirs.restore()
    expect_live()

    with pytest.raises(KeyError):
        with ours.average_parameters():
            expect_ema_inside()
            raise KeyError("evaluation failed")
    expect_live()
    with theirs.average_parameters(), ours.average_parameters():
        expect_ema_inside()
    expect_live()
    for c, t in zip(ours.collected_params, theirs.collected_params, strict=True):
        assert torch.equal(c, t)

    # Explicit parameter lists: another model gets the EMA, and its own values back.
    other = copy.deepcopy(twin)
    ours.store(other.parameters())
    ours.copy_to(other.parameters())
    for p, s in zip(other.parameters(), ours.shadow_params, strict=True):
        assert torch.equal(p, s.to(p.dtype))
    ours.restore(other.parameters())
    for p, q in zip(other.parameters(), twin.parameters(), strict=True):
        assert torch.equal(p, q)
    with ours.average_parameters(other.parameters()):
        for p, s in zip(other.parameters(), ours.shadow_params, strict=True):
            assert torch.equal(p, s.to(p.dtype))
    expect_live()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("direction", ["peer_to_ours", "ours_to_peer"])
@pytest.mark.parametrize("collected", [False, True], ids=["", "stored"])
def test_state_dict_both_ways(direction: str, collected: bool, backend: str) -> None:
    """A torch_ema checkpoint (through torch.save/torch.load) loads into the drop-in and the other
    way round; training then goes on with the same EMAs."""
    model, twin = twins("transformer", torch.float32, seed=7)
    theirs = Peer(model.parameters(), decay=DECAY)
    ours = Ours(twin.parameters(), decay=DECAY, backend=backend)
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.05) for m in (model, twin)]
    for _ in range(15):
        train_step([model, twin], optimizers, SmallTransformer.batch(torch.float32))
        theirs.update()
        ours.update()
    if collected:
        with torch.no_grad():
            theirs.store()
        ours.store()
    source, target = (theirs, ours) if direction == "peer_to_ours" else (ours, theirs)
    buffer = io.BytesIO()
    torch.save(source.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    assert set(state) == {"decay", "num_updates", "shadow_params", "collected_params"}
    fresh = Ours(twin.parameters(), decay=0.5, use_num_updates=False, backend=backend)
    target = fresh if target is ours else Peer(model.parameters(), decay=0.5, use_num_updates=False)
    if target is fresh:
        with torch.no_grad():  # poison: every shadow element must be loaded
            for s in fresh.shadow_params:
                s.fill_(float("nan"))
    target.load_state_dict(state)
    assert (target.decay, target.num_updates) == (DECAY, 15)
    assert (target.collected_params is None) == (not collected)
    for a, b in zip(target.shadow_params, source.shadow_params, strict=True):
        assert torch.equal(a, b)
    if collected:
        for a, b in zip(target.collected_params, source.collected_params, strict=True):
            assert torch.equal(a, b)
    ours_now, theirs_now = (fresh, theirs) if target is fresh else (ours, target)
    decays = peer_decays(DECAY, True, 30)
    for step in range(15, 30):
        train_step([model, twin], optimizers, SmallTransformer.batch(torch.float32))
        theirs_now.update()
        ours_now.update()
        check_shadows(ours_now.shadow_params, theirs_now.shadow_params, max(decays[: step + 1]), f"step {step + 1}")


def test_load_state_dict_casts_to_the_params_dtype_as_torch_ema_does() -> None:
    model, twin = twins("cnn", torch.bfloat16, seed=9)
    theirs = Peer(model.parameters(), decay=DECAY)
    ours = Ours(twin.parameters(), decay=DECAY)
    theirs.to(dtype=torch.float32)
    ours.to(dtype=torch.float32)
    for s, t in zip(ours.shadow_params, theirs.shadow_params, strict=True):
        s.add_(1e-3)  # values bf16 cannot hold
        t.add_(1e-3)
    state_ours, state_theirs = ours.state_dict(), theirs.state_dict()
    assert all(s.dtype == torch.float32 for s in state_ours["shadow_params"])
    theirs.load_state_dict(state_theirs)
    ours.load_state_dict(state_ours)
    for s, t in zip(ours.shadow_params, theirs.shadow_params, strict=True):
        assert s.dtype == torch.bfloat16 and torch.equal(s, t)


def test_load_state_dict_refuses_before_changing_anything() -> None:
    model = SmallCNN()
    ours = Ours(model.parameters(), decay=DECAY)
    ours.update()
    before = [s.clone() for s in ours.shadow_params]
    good = ours.state_dict()
    bad_states = {
        "wrong count": {**good, "shadow_params": good["shadow_params"][:-1]},
        "wrong shape": {**good, "shadow_params": [s.reshape(-1) for s in good["shadow_params"]]},
        "bad decay": {**good, "decay": 1.5},
        "bad num_updates": {**good, "num_updates": 1.5},
        "collected count": {**good, "collected_params": good["shadow_params"][:1]},
        "not a state": {"shadow_params": []},
    }
    for what, state in bad_states.items():
        with pytest.raises(ValueError):
            ours.load_state_dict(state)
        assert (ours.decay, ours.num_updates) == (DECAY, 1), what
        for s, b in zip(ours.shadow_params, before, strict=True):
            assert torch.equal(s, b), what
    with pytest.raises(ValueError, match="wrong number"):
        Peer(model.parameters(), decay=DECAY).load_state_dict(bad_states["wrong count"])


def test_shadow_params_are_views_of_the_buckets_and_writes_are_the_peers() -> None:
    model, twin = twins("cnn", torch.float32, seed=11)
    theirs = Peer(model.parameters(), decay=DECAY)
    ours = Ours(twin.parameters(), decay=DECAY)
    bucket = ours._ema.storage.buckets[0]
    for s in ours.shadow_params:  # reading them is free: no copy
        assert s.untyped_storage().data_ptr() == bucket.ema_flat.untyped_storage().data_ptr()
    for ema in (theirs, ours):
        ema.shadow_params[0].mul_(2.0)  # in place: the EMA itself
        ema.shadow_params[2] = torch.full_like(ema.shadow_params[2], 0.25)  # replaced entry
    for ema in (theirs, ours):
        ema.update()
    check_shadows(ours.shadow_params, theirs.shadow_params, DECAY, "after writes")
    assert ours.shadow_params[2].untyped_storage().data_ptr() == bucket.ema_flat.untyped_storage().data_ptr()
    values = [torch.rand_like(s) for s in theirs.shadow_params]
    theirs.shadow_params = [v.clone() for v in values]
    ours.shadow_params = [v.clone() for v in values]
    theirs.copy_to()
    ours.copy_to()
    for p, v in zip(twin.parameters(), values, strict=True):
        assert torch.equal(p, v)
    ours.shadow_params.append(torch.zeros(1))
    with pytest.raises(ValueError, match="entries"):
        ours.update()


def test_decay_and_num_updates_can_be_set_like_attributes() -> None:
    model, twin = twins("cnn", torch.float32, seed=13)
    theirs = Peer(model.parameters(), decay=DECAY)
    ours = Ours(twin.parameters(), decay=DECAY)
    for step in range(12):
        if step == 5:
            theirs.decay = ours.decay = 0.5
        if step == 8:
            theirs.num_updates = ours.num_updates = None
        theirs.update()
        ours.update()
        check_shadows(ours.shadow_params, theirs.shadow_params, DECAY, f"step {step}")


def test_weak_reference_semantics() -> None:
    """torch_ema holds its params weakly: once the model is gone, calls without parameters raise
    ValueError. The drop-in keeps the params alive (its buckets hold them) but raises the same."""

    def build(cls: type) -> tuple[object, nn.Module, torch.optim.Optimizer]:
        model = SmallCNN()
        return cls(model.parameters(), decay=DECAY), model, torch.optim.SGD(model.parameters(), lr=0.1)

    for cls in (Peer, Ours):
        ema, model, optimizer = build(cls)
        replacement = copy.deepcopy(model)
        ema.update()
        del model
        ema.update()  # the optimizer still holds the params
        del optimizer
        gc.collect()
        for call in (ema.update, ema.copy_to, ema.store, ema.average_parameters().__enter__):
            with pytest.raises(ValueError, match="no longer exists"):
                call()
        ema.update(replacement.parameters())  # explicit params still work
        ema.copy_to(replacement.parameters())

    model = SmallCNN()
    ours = Ours(model.parameters(), decay=DECAY)
    model.load_state_dict({k: v.clone() for k, v in model.state_dict().items()}, assign=True)
    gc.collect()
    with pytest.raises(ValueError, match="no longer exists"):  # the params it was built with are gone
        ours.update()


def test_to_after_the_model_was_converted() -> None:
    """model.double() after building: update() says to call ema.to(); ema.to(dtype=float64)
    rebuilds the buckets where the params are, and the EMA goes on like torch_ema's."""
    model, twin = twins("cnn", torch.float32, seed=17)
    theirs = Peer(model.parameters(), decay=DECAY)
    ours = Ours(twin.parameters(), decay=DECAY)
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.05) for m in (model, twin)]
    for _ in range(5):
        train_step([model, twin], optimizers, SmallCNN.batch(torch.float32))
        theirs.update()
        ours.update()
    theirs.store()
    ours.store()
    model.double()
    twin.double()
    with pytest.raises(sema.BucketMovedError, match=r"ema\.to"):
        ours.update()
    assert ours.num_updates == 5
    theirs.to(dtype=torch.float64)
    ours.to(device="cpu", dtype=torch.float64)
    assert all(s.dtype == torch.float64 for s in ours.shadow_params)
    assert all(c.dtype == torch.float64 for c in ours.collected_params)
    check_shadows([s.float() for s in ours.shadow_params], [t.float() for t in theirs.shadow_params], DECAY, "to()")
    for step in range(5, 25):
        train_step([model, twin], optimizers, SmallCNN.batch(torch.float64))
        theirs.update()
        ours.update()
        # the fp32 history's difference (within the fp32 bound) only shrinks under fp64 updates
        check_shadows(
            [s.float() for s in ours.shadow_params], [t.float() for t in theirs.shadow_params], DECAY, f"{step}"
        )
    with torch.no_grad():
        for p in twin.parameters():
            p.fill_(float("nan"))
    ours.restore()
    theirs.restore()
    for p, q in zip(twin.parameters(), model.parameters(), strict=True):
        assert p.dtype == torch.float64 and torch.equal(p, q)


def test_to_refuses_what_sema_cannot_keep() -> None:
    model = SmallCNN()
    ours = Ours(model.parameters(), decay=DECAY)
    ours.update()
    before = [s.clone() for s in ours.shadow_params]
    with pytest.raises(ValueError, match="beside the params"):
        ours.to(device="meta")
    with pytest.raises(TypeError, match="float32 or in each param's"):
        ours.to(dtype=torch.float16)
    ours.to(device="cpu")
    ours.to()
    for s, b in zip(ours.shadow_params, before, strict=True):
        assert torch.equal(s, b)


def test_constructor_arguments_and_refusals() -> None:
    model = SmallCNN()
    ours = Ours(model.parameters(), 0.99)
    assert (ours.decay, ours.num_updates, ours.collected_params) == (0.99, 0, None)
    assert Ours(model.parameters(), 0.99, use_num_updates=False).num_updates is None
    assert Ours(model.parameters(), decay=1.0).decay == 1.0  # torch_ema allows decay 1
    for decay in (-0.1, 1.1, float("nan")):
        with pytest.raises(ValueError, match="Decay must be between 0 and 1"):
            Ours(model.parameters(), decay)
    with pytest.raises(ValueError, match="Decay must be between 0 and 1"):
        Peer(model.parameters(), 1.1)
    with pytest.raises(TypeError, match=r"not an nn\.Parameter"):
        Ours([torch.zeros(3)], 0.9)
    with pytest.raises(TypeError, match="only float params"):
        Ours([nn.Parameter(torch.zeros(3, dtype=torch.long), requires_grad=False)], 0.9)
    empty, peer_empty = Ours([], 0.9), Peer([], 0.9)
    for ema in (empty, peer_empty):
        ema.update()
        ema.copy_to()
        with ema.average_parameters():
            pass
    assert empty.num_updates == peer_empty.num_updates == 1
    assert empty.state_dict()["shadow_params"] == [] == peer_empty.state_dict()["shadow_params"]
    frozen = nn.Linear(3, 3).requires_grad_(False)
    ema = Ours(frozen.parameters(), 0.5)
    assert not any(p.requires_grad for p in frozen.parameters())  # left as they were
    with torch.no_grad():
        frozen.weight.add_(1.0)
    before = ema.shadow_params[0].clone()
    ema.update()
    assert not torch.equal(ema.shadow_params[0], before)  # frozen params are averaged


def test_duplicate_params_share_one_shadow() -> None:
    layer = nn.Linear(3, 3)
    other = nn.Linear(3, 3)
    theirs = Peer([layer.weight, layer.weight, layer.bias], 0.9)
    ours = Ours([layer.weight, layer.weight, layer.bias], 0.9)
    for _ in range(3):
        with torch.no_grad():
            layer.weight.add_(0.1)
        theirs.update()
        ours.update()
        theirs.update([other.weight, other.weight, other.bias])
        ours.update([other.weight, other.weight, other.bias])
    check_shadows(ours.shadow_params, theirs.shadow_params, 0.9, "duplicates")
    with pytest.raises(ValueError, match="share one shadow"):
        ours.update([other.weight, layer.weight, other.bias])


def test_deepcopy_is_an_independent_ema_of_the_same_params_and_pickle_is_refused() -> None:
    import pickle

    model, twin = twins("cnn", torch.bfloat16, seed=19)
    theirs, ours = Peer(model.parameters(), 0.9), Ours(twin.parameters(), 0.9)
    theirs.to(dtype=torch.float32)
    ours.to(dtype=torch.float32)
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.05) for m in (model, twin)]
    for _ in range(3):
        train_step([model, twin], optimizers, SmallCNN.batch(torch.bfloat16))
        theirs.update()
        ours.update()
    with torch.no_grad():  # torch_ema's store() under grad mode keeps autograd history: no deepcopy then
        theirs.store()
    ours.store()
    theirs_copy, ours_copy = copy.deepcopy(theirs), copy.deepcopy(ours)
    for original, twin_copy in ((theirs, theirs_copy), (ours, ours_copy)):
        assert twin_copy.num_updates == original.num_updates == 3
        for a, b in zip(twin_copy.shadow_params, original.shadow_params, strict=True):
            assert a.dtype == torch.float32 and torch.equal(a, b) and a.data_ptr() != b.data_ptr()
        for a, b in zip(twin_copy.collected_params, original.collected_params, strict=True):
            assert torch.equal(a, b) and a.data_ptr() != b.data_ptr()
    for _ in range(3):  # the copies follow the same params; the originals stay where they were
        train_step([model, twin], optimizers, SmallCNN.batch(torch.bfloat16))
        theirs_copy.update()
        ours_copy.update()
    check_shadows(ours_copy.shadow_params, theirs_copy.shadow_params, DECAY, "deepcopy")
    check_shadows(ours.shadow_params, theirs.shadow_params, DECAY, "original")
    assert ours.num_updates == theirs.num_updates == 3
    with pytest.raises(TypeError):
        pickle.dumps(theirs)
    with pytest.raises(TypeError, match="state_dict"):
        pickle.dumps(ours)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mixed_dtypes_in_one_ema(backend: str) -> None:
    """fp32, bf16 and fp16 params in one EMA: one bucket each; fp32 fused, bf16 and fp16 bit for bit
    with torch_ema. A real optimizer on a synthetic loss (CPU fp16 convolutions are not the point)."""
    torch.manual_seed(23)
    shapes = [(7, 5), (5,), (3, 4, 2), (17,), (1,), (33,)]
    dtypes = [torch.float32, torch.bfloat16, torch.float16] * 2
    params = [nn.Parameter(torch.randn(s).to(d)) for s, d in zip(shapes, dtypes, strict=True)]
    twin = [nn.Parameter(p.detach().clone()) for p in params]
    theirs = Peer(params, decay=DECAY)
    ours = Ours(twin, decay=DECAY, backend=backend)
    assert len(ours._ema.storage.buckets) == 3
    optimizers = [torch.optim.SGD(ps, lr=0.1, momentum=0.9) for ps in (params, twin)]
    decays = peer_decays(DECAY, True, STEPS)
    for step in range(STEPS):
        targets = [torch.randn(s) for s in shapes]
        for ps, optimizer in zip((params, twin), optimizers, strict=True):
            sum(((p.float() - t) ** 2).sum() for p, t in zip(ps, targets, strict=True)).backward()
            optimizer.step()
            optimizer.zero_grad()
        for p, q in zip(params, twin, strict=True):
            assert torch.equal(p, q)
        theirs.update()
        ours.update()
        check_shadows(ours.shadow_params, theirs.shadow_params, max(decays[: step + 1]), f"step {step + 1}")


def test_a_refused_construction_leaves_the_params_as_they_were() -> None:
    frozen = nn.Parameter(torch.randn(5), requires_grad=False)
    trained = nn.Parameter(torch.randn(4))
    on_meta = nn.Parameter(torch.empty(3, device="meta"))
    data_ptrs = (frozen.data_ptr(), trained.data_ptr())
    with pytest.raises(ValueError, match="meta"):
        Ours([frozen, trained, on_meta], 0.9)
    assert (frozen.requires_grad, trained.requires_grad) == (False, True)
    assert (frozen.data_ptr(), trained.data_ptr()) == data_ptrs  # not moved into a bucket

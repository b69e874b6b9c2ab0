"""``sema.compat.diffusers.EMAModel`` against the real ``diffusers.training_utils.EMAModel`` (0.42).

The peer and the drop-in each average their own copy of one model (same init, same data, same
optimizer: the params stay bit-identical, which each test checks), and their EMAs are compared
after every optimizer step. Each case also runs a drop-in whose ``update_after_step`` is one off,
which must fail the same check (the negative control). Cases run on the torch and the cpp backend
(``SEMA_BACKEND``).

Tolerances (``TOLERANCES``; ``scale`` is the largest magnitude of the peer's tensor at that step,
``d_max`` the largest decay reached so far):

- EMA in fp32 (fp32 params, or bf16 params with ``ema.to(dtype=torch.float32)``, the usual
  mixed-precision recipe): diffusers computes ``s - w * (s - p)`` (3 roundings), sema
  ``lerp(s, p, w)`` (2), each below 1.5 eps of the largest magnitude involved; an error made at one
  step is multiplied by the decay at every later one, so the difference stays below
  ``4 eps32 scale / (1 - d_max)`` (the bound of tests/test_migration.py).
- EMA in bf16/fp16 (params of that dtype, no ``to(dtype=...)``): none. The drop-in runs diffusers'
  own arithmetic there, so it must equal the peer bit for bit at every step, for ``foreach``
  False and True. Negative controls: the off-by-one drop-in differs, and so does one fp32 lerp
  per step rounded once (sema's fused kernel), so the check tells the roundings apart. (Running
  the ``foreach`` arithmetic on whole flat buckets differs too, in the last elements of some
  tensors; that is why the drop-in runs it on the per-param views.)
"""

from __future__ import annotations

import contextlib
import copy
import io
import os
import pickle
import warnings
from collections.abc import Iterator
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from conftest import SmallCNN
from torch import Tensor, nn

import sema
from sema.compat.diffusers import EMAModel

training_utils = pytest.importorskip("diffusers.training_utils", reason="diffusers is not installed")
Peer = training_utils.EMAModel

EPS32 = 2.0**-23
TOLERANCES = {"fp32": 4.0 * EPS32}
STEPS = 100
DECAY = 0.9  # short memory: a start that is one step off shows within the run
BACKENDS = ["torch"] + (["cpp"] if sema.available_backends("cpu")["cpp"][0] else [])


class SmallTransformer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(6, 16)
        self.layer = nn.TransformerEncoderLayer(16, 2, dim_feedforward=16, dropout=0.0, batch_first=True)
        self.head = nn.Linear(16, 4)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.layer(self.embed(x)).mean(dim=1))


def make_model(kind: str, dtype: torch.dtype) -> nn.Module:
    return (SmallCNN() if kind == "cnn" else SmallTransformer()).to(dtype)


def batch(kind: str, dtype: torch.dtype, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    x = torch.randn((8, 3, 8, 8) if kind == "cnn" else (8, 5, 6), generator=generator).to(dtype)
    return x, torch.randint(0, 4, (8,), generator=generator)


@contextlib.contextmanager
def sema_backend(name: str) -> Iterator[None]:
    """``SEMA_BACKEND=name`` while an EMAModel is built (its storage keeps the backend)."""
    before = os.environ.get("SEMA_BACKEND")
    os.environ["SEMA_BACKEND"] = name
    try:
        yield
    finally:
        if before is None:
            del os.environ["SEMA_BACKEND"]
        else:
            os.environ["SEMA_BACKEND"] = before


def drop_in(params: Any, backend: str, **options: Any) -> EMAModel:
    with sema_backend(backend):
        ema = EMAModel(params, **options)
    assert set(ema._ema.backends.values()) == {backend}
    return ema


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny models: intra-op threads only add contention."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class Flat:
    """Lists of tensors shaped like the shadow params, flattened into one fp64 vector, so one
    comparison costs a handful of ops whatever the number of tensors."""

    def __init__(self, like: list[Tensor]) -> None:
        sizes = torch.tensor([t.numel() for t in like])
        self.segment = torch.repeat_interleave(torch.arange(len(like)), sizes)
        self.offsets = torch.cumsum(sizes, 0) - sizes
        self.count = len(like)

    def __call__(self, tensors: list[Tensor]) -> Tensor:
        return torch.cat([t.detach().reshape(-1).to(torch.float64) for t in tensors])

    def ratio(self, actual: Tensor, expected: Tensor, factor: float) -> tuple[float, str]:
        """The worst |actual - expected| / (factor * scale), scale the max |expected| per tensor."""
        scale = torch.zeros(self.count, dtype=torch.float64)
        scale = scale.scatter_reduce(0, self.segment, expected.abs(), "amax").clamp_min(1e-30)
        err = (actual - expected).abs()
        ratios = torch.nan_to_num(err / (factor * scale[self.segment]), nan=float("inf"))
        i = int(ratios.argmax())
        k = int(self.segment[i])
        return float(ratios[i]), (
            f"shadow #{k}[{i - int(self.offsets[k])}]: sema {actual[i].item()!r}, diffusers {expected[i].item()!r}, "
            f"diff {err[i].item():.3g}, scale {scale[k].item():.3g}"
        )


class Pair:
    """The peer and the drop-in (plus the off-by-one control) on two copies of one model."""

    def __init__(
        self, kind: str, dtype: torch.dtype, options: dict[str, Any], pattern: str = "same", seed: int = 0
    ) -> None:
        torch.manual_seed(seed)
        self.kind, self.dtype, self.pattern = kind, dtype, pattern
        self.peer_model = make_model(kind, dtype)
        self.our_model = copy.deepcopy(self.peer_model)
        if pattern == "frozen":  # a frozen param that changes: diffusers copies it at every step
            for m in (self.peer_model, self.our_model):
                m.fc.bias.requires_grad_(False) if kind == "cnn" else m.head.bias.requires_grad_(False)
        # "same": EMAModel(model.parameters()) and step(model.parameters()), the fused path;
        # "copy": EMAModel(ema_copy.parameters()) and step(model.parameters()), the list path.
        peer_src = self.peer_model if pattern != "copy" else copy.deepcopy(self.peer_model)
        our_src = self.our_model if pattern != "copy" else copy.deepcopy(self.our_model)
        self.peer = Peer(peer_src.parameters(), **options)
        # One drop-in per backend, over the same params (the second shares the first's param buckets).
        self.ours = {backend: drop_in(list(our_src.parameters()), backend, **options) for backend in BACKENDS}
        shifted = {**options, "update_after_step": options.get("update_after_step", 0) + 1}
        self.control = drop_in(list(our_src.parameters()), "torch", **shifted)
        # fp16: AdamW's eps and squared grads underflow (the params reach inf), so SGD with momentum.
        optimizer = (lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9)) if dtype == torch.float16 else None
        optimizer = optimizer or (lambda ps: torch.optim.AdamW(ps, lr=1e-2))
        self.peer_opt = optimizer([p for p in self.peer_model.parameters() if p.requires_grad])
        self.our_opt = optimizer([p for p in self.our_model.parameters() if p.requires_grad])
        self.data = torch.Generator().manual_seed(seed)
        self.calls = 0

    def train_step(self) -> None:
        x, y = batch(self.kind, self.dtype, self.data)
        for model, opt in ((self.peer_model, self.peer_opt), (self.our_model, self.our_opt)):
            F.cross_entropy(model(x).float(), y).backward()
            opt.step()
            opt.zero_grad()
            if self.pattern == "frozen":
                with torch.no_grad():
                    frozen = model.fc.bias if self.kind == "cnn" else model.head.bias
                    frozen.add_(0.01 * (self.calls % 3 - 1))
        if self.pattern == "moved" and self.calls == 10:  # out of the buckets: the list path from now
            for p in self.our_model.parameters():
                p.data = p.data.clone()
        self.calls += 1
        for a, b in zip(self.peer_model.parameters(), self.our_model.parameters(), strict=True):
            assert torch.equal(a, b), "the two copies of the model diverged: the comparison would be meaningless"

    def ema_step(self) -> None:
        self.peer.step(self.peer_model.parameters())
        for ema in self.emas():
            ema.step(self.our_model.parameters())
        for ema in self.ours.values():
            assert ema.optimization_step == self.peer.optimization_step
            assert ema.cur_decay_value == self.peer.cur_decay_value

    def emas(self) -> list[EMAModel]:
        return [*self.ours.values(), self.control]


OPTIONS = {
    "default": {"decay": DECAY},
    "warmup": {"decay": DECAY, "use_ema_warmup": True, "power": 3 / 4, "update_after_step": 3},
    "after-min": {"decay": DECAY, "update_after_step": 2, "min_decay": 0.3},
}
CASES = [
    # (model, dtype, precision: "fp32" EMA kept by .to(dtype=float32) for bf16 params, options, foreach, pattern)
    ("cnn", torch.float32, "default", False, "same"),
    ("cnn", torch.float32, "warmup", True, "copy"),
    ("cnn", torch.bfloat16, "after-min", False, "frozen"),
    ("transformer", torch.float32, "after-min", True, "same"),
    ("transformer", torch.float32, "default", False, "moved"),
    ("transformer", torch.bfloat16, "warmup", False, "same"),
    ("cnn", torch.bfloat16, "default", True, "copy"),
]


@pytest.mark.parametrize(
    "kind,dtype,options,foreach,pattern",
    CASES,
    ids=[f"{c[0]}-{str(c[1])[6:]}-{c[2]}-fe{int(c[3])}-{c[4]}" for c in CASES],
)
def test_matches_peer_at_every_step(kind: str, dtype: torch.dtype, options: str, foreach: bool, pattern: str) -> None:
    pair = Pair(kind, dtype, {**OPTIONS[options], "foreach": foreach}, pattern)
    if dtype != torch.float32:  # the mixed-precision recipe: bf16 params, EMA in fp32
        for ema in (pair.peer, *pair.emas()):
            ema.to(dtype=torch.float32)
            assert all(s.dtype == torch.float32 for s in ema.shadow_params)
    flat = Flat(pair.peer.shadow_params)
    worst = dict.fromkeys([*pair.ours, "control"], (0.0, -1, ""))
    d_max = 0.0
    for call in range(STEPS):
        pair.train_step()
        pair.ema_step()
        d_max = max(d_max, pair.peer.cur_decay_value)
        factor = TOLERANCES["fp32"] / (1.0 - d_max)
        expected = flat(pair.peer.shadow_params)
        for label, ema in (*pair.ours.items(), ("control", pair.control)):
            ratio, where = flat.ratio(flat(ema.shadow_params), expected, factor)
            if ratio > worst[label][0]:
                worst[label] = (ratio, call, where)
    for backend in pair.ours:
        ratio, call, where = worst[backend]
        assert ratio <= 1.0, f"{backend} backend: {ratio:.3g}x the bound off diffusers at call {call}: {where}"
        in_buckets = pair.ours[backend]._in_buckets
        if pattern == "same":
            assert in_buckets, "the params never left their buckets: step() should stay on the fused path"
        if pattern == "moved":
            assert not in_buckets, "the params left their buckets: step() must have seen it"
        staged = pair.ours[backend]._staging is not None
        assert staged == (pattern in ("copy", "moved")), (
            f"{pattern}: the staging buffer is {'' if staged else 'not '}used"
        )
    assert worst["control"][0] > 1.0, f"the negative control (update_after_step one off) matched: {worst['control']}"


HALF_CASES = [
    # (model, dtype of the params and their EMA, foreach, pattern): every step() path of the drop-in
    ("cnn", torch.bfloat16, False, "same"),
    ("transformer", torch.bfloat16, True, "same"),
    ("cnn", torch.bfloat16, True, "copy"),
    ("transformer", torch.float16, False, "copy"),
    ("transformer", torch.bfloat16, False, "moved"),
    ("cnn", torch.float16, True, "moved"),
    ("cnn", torch.bfloat16, False, "frozen"),
]


@pytest.mark.parametrize(
    "kind,dtype,foreach,pattern",
    HALF_CASES,
    ids=[f"{c[0]}-{str(c[1])[6:]}-fe{int(c[2])}-{c[3]}" for c in HALF_CASES],
)
def test_half_precision_ema_is_bit_for_bit_the_peers(
    kind: str, dtype: torch.dtype, foreach: bool, pattern: str
) -> None:
    """A bf16/fp16 EMA runs diffusers' own arithmetic on each flat bucket (or list), so it equals
    the peer's bit for bit at every step, for both of its variants. Negative controls: the
    off-by-one drop-in differs, and so does one fp32 lerp rounded once (sema's fused kernel), so
    the check tells the two roundings apart."""
    pair = Pair(kind, dtype, {"decay": DECAY, "foreach": foreach}, pattern)
    flat = Flat(pair.peer.shadow_params)
    control_differs = lerp_differs = 0
    for call in range(STEPS):
        before = clones(pair.peer.shadow_params)
        pair.train_step()
        pair.ema_step()
        expected = flat(pair.peer.shadow_params)
        for backend, ema in pair.ours.items():
            assert all(s.dtype == dtype for s in ema.shadow_params)
            actual = flat(ema.shadow_params)
            if not torch.equal(actual, expected):
                i = int((actual != expected).nonzero()[0])
                pytest.fail(f"{backend} backend, call {call}: element {i} is {actual[i]!r}, diffusers {expected[i]!r}")
        control_differs += not torch.equal(flat(pair.control.shadow_params), expected)
        w = 1.0 - pair.peer.cur_decay_value
        params = pair.peer_model.parameters()
        once = [s.float().lerp(p.float(), w).to(dtype) for s, p in zip(before, params, strict=True)]
        lerp_differs += not torch.equal(flat(once), expected)
    for backend, ema in pair.ours.items():
        assert ema._in_buckets == (pattern != "moved"), f"{backend}: the params' place after {pattern}"
        staged = pattern in ("copy", "moved")
        assert (ema._staging is not None) == staged, f"{backend}: the staging buffer is {'not ' * staged}used"
    assert control_differs, "the negative control (update_after_step one off) matched diffusers bit for bit"
    assert lerp_differs, "one fp32 lerp per step matched diffusers bit for bit: the test cannot tell the roundings"


# --- the rest of the API, each against the peer ----------------------------------------------


def trained_pair(
    dtype: torch.dtype = torch.float32, pattern: str = "same", steps: int = 12, ema_fp32: bool = False
) -> Pair:
    pair = Pair("cnn", dtype, {"decay": DECAY}, pattern, seed=1)
    if ema_fp32:
        for ema in (pair.peer, *pair.emas()):
            ema.to(dtype=torch.float32)
    for _ in range(steps):
        pair.train_step()
        pair.ema_step()
    return pair


def assert_close_to_peer(ours: list[Tensor], theirs: list[Tensor], d_max: float = DECAY) -> None:
    flat = Flat(theirs)
    ratio, where = flat.ratio(flat(ours), flat(theirs), TOLERANCES["fp32"] / (1.0 - d_max))
    assert ratio <= 1.0, f"{ratio:.3g}x the fp32 bound off diffusers: {where}"


def assert_equal(actual: list[Tensor], expected: list[Tensor], what: str) -> None:
    assert len(actual) == len(expected), f"{what}: {len(actual)} tensors, expected {len(expected)}"
    for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
        assert a.dtype == e.dtype and a.shape == e.shape, f"{what} #{i}: {a.dtype}{tuple(a.shape)} vs {e.dtype}"
        assert torch.equal(a, e), f"{what} #{i}: differs by up to {(a.double() - e.double()).abs().max().item():.3g}"


def clones(tensors: Any) -> list[Tensor]:
    return [t.detach().clone() for t in tensors]


@pytest.mark.parametrize(
    "dtype,pattern", [(torch.float32, "same"), (torch.float32, "copy"), (torch.bfloat16, "same")], ids=str
)
def test_store_copy_to_restore_like_the_peer(dtype: torch.dtype, pattern: str) -> None:
    # bf16 params, fp32 EMA: copy_to casts to bf16 (round to nearest even)
    pair = trained_pair(dtype=dtype, pattern=pattern, ema_fp32=dtype != torch.float32)
    ours = pair.ours["torch"]
    live = clones(pair.our_model.parameters())
    for ema, model in ((pair.peer, pair.peer_model), (ours, pair.our_model)):
        ema.store(model.parameters())
        ema.copy_to(model.parameters())
    assert all(t.device.type == "cpu" for t in ours.temp_stored_params)
    expected = [s.to(dtype) for s in ours.shadow_params]
    assert_equal(clones(pair.our_model.parameters()), expected, "params after copy_to (our own EMA, cast)")
    assert_close_to_peer(list(pair.our_model.parameters()), list(pair.peer_model.parameters()))
    for ema, model in ((pair.peer, pair.peer_model), (ours, pair.our_model)):
        ema.restore(model.parameters())
        assert ema.temp_stored_params is None
    assert_equal(clones(pair.our_model.parameters()), live, "params after restore")
    assert_equal(clones(pair.peer_model.parameters()), live, "the peer's params after restore")
    for ema, model in ((pair.peer, pair.peer_model), (ours, pair.our_model)):
        with pytest.raises(RuntimeError, match="no `store\\(\\)`ed weights"):
            ema.restore(model.parameters())
    pair.train_step()  # training goes on from the restored params, in the buckets
    pair.ema_step()
    assert_close_to_peer(pair.ours["torch"].shadow_params, pair.peer.shadow_params)


def test_state_dict_loads_both_ways() -> None:
    pair = trained_pair()
    peer_state = pair.peer.state_dict()
    fresh = EMAModel(copy.deepcopy(pair.our_model).parameters(), decay=0.5, update_after_step=7, power=0.1)
    fresh.load_state_dict(peer_state)
    assert_equal(fresh.shadow_params, pair.peer.shadow_params, "diffusers' shadow params loaded into sema")
    for key, value in peer_state.items():
        if key != "shadow_params":
            assert getattr(fresh, key) == value, key
    # ... and back: sema's state (saved and loaded through torch.save) into a fresh diffusers EMAModel
    buffer = io.BytesIO()
    torch.save(pair.ours["cpp" if "cpp" in pair.ours else "torch"].state_dict(), buffer)
    buffer.seek(0)
    their_fresh = Peer(copy.deepcopy(pair.peer_model).parameters(), decay=0.5)
    their_fresh.load_state_dict(torch.load(buffer))
    assert their_fresh.optimization_step == pair.peer.optimization_step and their_fresh.decay == DECAY
    assert_close_to_peer(their_fresh.shadow_params, pair.peer.shadow_params)
    # Both go on from the loaded states and stay together.
    for _ in range(5):
        pair.train_step()
        their_fresh.step(pair.peer_model.parameters())
        fresh.step(pair.our_model.parameters())
        assert fresh.cur_decay_value == their_fresh.cur_decay_value
    assert_close_to_peer(fresh.shadow_params, their_fresh.shadow_params)


def test_state_dict_holds_references_and_shadow_params_assign_copies() -> None:
    pair = trained_pair(steps=3)
    ours = pair.ours["torch"]
    state = ours.state_dict()
    assert set(state) == set(pair.peer.state_dict())
    with torch.no_grad():
        state["shadow_params"][0].add_(1.0)  # a reference, as diffusers returns it
    assert torch.equal(ours.shadow_params[0], state["shadow_params"][0])
    values = [torch.randn_like(s) for s in ours.shadow_params]
    ours.shadow_params = values
    assert_equal(ours.shadow_params, values, "shadow_params after assignment")
    assert ours.shadow_params[0] is not values[0]


def test_replacing_a_shadow_params_entry_behaves_like_the_peer() -> None:
    """``ema.shadow_params[i] = t``: diffusers averages ``t`` from then on; the drop-in copies it
    into the EMA at its next call (state_dict, copy_to, step, to), with the same values after."""
    pair = trained_pair(steps=3)
    ours = pair.ours["torch"]
    expected = clones(ours.shadow_params)
    expected[0], expected[2] = expected[0] * 2.0, torch.zeros_like(expected[2])
    for ema in (pair.peer, ours):
        assert ema.shadow_params is ema.shadow_params  # one list, as diffusers' attribute
        ema.shadow_params[2] = torch.zeros_like(ema.shadow_params[2])
        ema.shadow_params[0] = ema.shadow_params[0] * 2.0
    state = ours.state_dict()
    assert torch.count_nonzero(state["shadow_params"][2]) == 0, "the replaced entry was lost"
    assert_equal(ours.shadow_params, expected, "shadows after replacing entries")
    assert_close_to_peer(ours.shadow_params, pair.peer.shadow_params)
    assert all(s is v for s, v in zip(ours.shadow_params, ours._views, strict=True)), "entries not adopted"
    for ema, model in ((pair.peer, pair.peer_model), (ours, pair.our_model)):
        ema.shadow_params[3] = torch.full_like(ema.shadow_params[3], 0.5)
        ema.store(model.parameters())
        ema.copy_to(model.parameters())
    assert_close_to_peer(list(pair.our_model.parameters()), list(pair.peer_model.parameters()))
    assert torch.count_nonzero(list(pair.our_model.parameters())[3] - 0.5) == 0, "copy_to missed the entry"
    for ema, model in ((pair.peer, pair.peer_model), (ours, pair.our_model)):
        ema.restore(model.parameters())
        ema.shadow_params[1] = ema.shadow_params[1] + 1.0
    pair.train_step()
    pair.ema_step()
    assert_close_to_peer(ours.shadow_params, pair.peer.shadow_params)
    before = clones(ours.shadow_params)
    ours.shadow_params[1] = torch.zeros(ours.shadow_params[1].shape, dtype=torch.float64)
    with pytest.raises(NotImplementedError, match="float32 or in each param's own dtype"):
        ours.step(pair.our_model.parameters())  # an fp64 EMA entry: refused before anything changes
    assert ours.optimization_step == pair.peer.optimization_step
    assert_equal(ours._views, before, "shadows after a refused entry")
    state = pair.peer.state_dict()
    ours.load_state_dict(state)  # its values supersede the entry replaced before
    ours.step(pair.our_model.parameters())
    pair.peer.step(pair.peer_model.parameters())
    assert_close_to_peer(ours.shadow_params, pair.peer.shadow_params)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_inference_mode_then_plain_steps_like_the_peer(dtype: torch.dtype) -> None:
    """The staging buffer, the decay weights and rebuilt buckets made inside
    ``torch.inference_mode()`` still take the steps after it. diffusers' steps do; its ``to()``
    inside inference_mode makes inference tensors that fail the next step outside, so the peer's
    runs outside."""
    pair = Pair("cnn", dtype, {"decay": DECAY}, "copy", seed=2)
    for call in range(6):
        pair.train_step()
        with torch.inference_mode() if call % 2 == 0 else contextlib.nullcontext():
            pair.ema_step()
            if call == 2 and dtype != torch.float32:
                for ema in pair.emas():
                    ema.to(dtype=torch.float32)  # rebuilds sema's buckets inside inference_mode
        if call == 2 and dtype != torch.float32:
            pair.peer.to(dtype=torch.float32)
    assert pair.ours["torch"]._staging is not None
    assert_close_to_peer(pair.ours["torch"].shadow_params, pair.peer.shadow_params)
    model = SmallCNN().to(dtype)
    with torch.inference_mode():  # the params move into the buckets: they must stay trainable after it
        ours = EMAModel(model.parameters(), decay=DECAY)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    F.cross_entropy(model(torch.randn(2, 3, 8, 8).to(dtype)).float(), torch.tensor([0, 1])).backward()
    optimizer.step()
    ours.step(model.parameters())


def test_load_state_dict_adopts_an_fp32_ema_for_bf16_params() -> None:
    pair = trained_pair(dtype=torch.bfloat16, steps=3)
    pair.peer.to(dtype=torch.float32)
    ours = pair.ours["torch"]
    ours.load_state_dict(pair.peer.state_dict())  # diffusers would now hold fp32 shadows: so does sema
    assert_equal(ours.shadow_params, pair.peer.shadow_params, "fp32 shadows loaded for bf16 params")
    pair.train_step()
    pair.ema_step()
    assert_close_to_peer(ours.shadow_params, pair.peer.shadow_params)


def test_load_state_dict_refuses_before_changing_anything() -> None:
    pair = trained_pair(steps=3)
    ours = pair.ours["torch"]
    before, settings = clones(ours.shadow_params), dict(ours.state_dict(), shadow_params=None)
    good = pair.peer.state_dict()
    bad_states = {
        "Invalid min_decay": dict(good, decay=0.5, min_decay=0),  # an int: diffusers refuses it too
        "Decay must be between 0 and 1": dict(good, decay=1.5),
        "Invalid optimization_step": dict(good, optimization_step=3.0),
        "shadow_params must be a list": dict(good, shadow_params=tuple(good["shadow_params"])),
        "2 shadow params": dict(good, decay=0.5, shadow_params=good["shadow_params"][:2]),
        "shapes differ": dict(good, decay=0.5, shadow_params=[s.reshape(-1) for s in good["shadow_params"]]),
    }
    for message, state in bad_states.items():
        with pytest.raises(ValueError, match=message):
            ours.load_state_dict(state)
        assert_equal(ours.shadow_params, before, f"shadows after a refused state ({message})")
        assert dict(ours.state_dict(), shadow_params=None) == settings, message
    with pytest.raises(ValueError, match="Invalid min_decay"):  # the peer says the same
        Peer(copy.deepcopy(pair.peer_model).parameters()).load_state_dict(bad_states["Invalid min_decay"])


class Holder(nn.Module):
    """A stand-in for a diffusers model where ModelMixin cannot be imported."""


def tiny_model_cls() -> type:
    modeling = pytest.importorskip("diffusers.models.modeling_utils", reason="diffusers' ModelMixin is absent")
    configuration = pytest.importorskip("diffusers.configuration_utils", reason="diffusers' ConfigMixin is absent")

    class TinyDiffusersModel(modeling.ModelMixin, configuration.ConfigMixin):
        @configuration.register_to_config
        def __init__(self, width: int = 6) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, width, 3)
            self.norm = nn.GroupNorm(2, width)
            self.out = nn.Linear(width, 2)

    return TinyDiffusersModel


def test_save_pretrained_and_from_pretrained_both_ways(tmp_path: Any) -> None:
    model_cls = tiny_model_cls()
    torch.manual_seed(3)
    model = model_cls()
    peer = Peer(copy.deepcopy(model).parameters(), decay=DECAY, model_cls=model_cls, model_config=model.config)
    ours = EMAModel(copy.deepcopy(model).parameters(), decay=DECAY, model_cls=model_cls, model_config=model.config)
    trained = copy.deepcopy(model)
    for _ in range(4):
        with torch.no_grad():
            for p in trained.parameters():
                p.add_(torch.randn_like(p) * 0.1)
        peer.step(trained.parameters())
        ours.step(trained.parameters())
    ours.save_pretrained(str(tmp_path / "ours"))
    peer.save_pretrained(str(tmp_path / "peer"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # from_config(path) is deprecated in diffusers itself
        theirs_of_ours = Peer.from_pretrained(str(tmp_path / "ours"), model_cls)
        ours_of_theirs = EMAModel.from_pretrained(str(tmp_path / "peer"), model_cls)
        ours_of_ours = EMAModel.from_pretrained(str(tmp_path / "ours"), model_cls)
    assert_equal(theirs_of_ours.shadow_params, ours.shadow_params, "diffusers loading sema's save_pretrained")
    assert_equal(ours_of_ours.shadow_params, ours.shadow_params, "sema loading its own save_pretrained")
    assert_equal(ours_of_theirs.shadow_params, peer.shadow_params, "sema loading diffusers' save_pretrained")
    for loaded in (theirs_of_ours, ours_of_theirs, ours_of_ours):
        assert loaded.optimization_step == 4 and loaded.decay == DECAY and loaded.model_cls is model_cls
    for ema in (EMAModel(model.parameters()), EMAModel(model.parameters(), model_cls=model_cls)):
        with pytest.raises(ValueError, match="can only be used if `model_c"):
            ema.save_pretrained(str(tmp_path / "nothing"))


def test_to_moves_or_recasts_what_it_can_and_refuses_the_rest() -> None:
    pair = trained_pair(dtype=torch.bfloat16, steps=5)
    ours = pair.ours["torch"]
    views = ours.shadow_params
    ours.to("cpu")  # the params live on the CPU: nothing to move
    ours.to(device=torch.device("cpu"), dtype=torch.bfloat16, non_blocking=True)
    assert all(a is b for a, b in zip(views, ours.shadow_params, strict=True))
    params = clones(pair.our_model.parameters())
    assert not all(torch.equal(s, p) for s, p in zip(views, params, strict=True))  # else the next check is idle
    expected = [v.float() for v in views]
    ours.to(dtype=torch.float32)
    assert_equal(ours.shadow_params, expected, "shadows after to(dtype=float32)")
    fp32_views = ours.shadow_params
    ours.to("cpu")  # keeps the fp32 EMA of the bf16 params: no dtype= means no cast
    assert all(a is b for a, b in zip(fp32_views, ours.shadow_params, strict=True))
    ours.shadow_params = values = [torch.randn_like(s) for s in ours.shadow_params]
    ours.to(dtype=torch.bfloat16)  # back: rounds to nearest even, as diffusers' tensor.to() does
    assert_equal(ours.shadow_params, [v.to(torch.bfloat16) for v in values], "shadows after to(dtype=bfloat16)")
    before = clones(ours.shadow_params)
    with pytest.raises(NotImplementedError, match="beside the params"):
        ours.to("meta")
    with pytest.raises(NotImplementedError, match="float32 or in each param's own dtype"):
        ours.to(dtype=torch.float16)
    with pytest.raises(TypeError, match=r"dtype must be a torch\.dtype"):
        ours.to(dtype="float32")
    assert_equal(ours.shadow_params, before, "shadows after refused to() calls")
    fp32 = trained_pair(steps=2).ours["torch"]
    with pytest.raises(NotImplementedError, match="float32 or in each param's own dtype"):
        fp32.to(dtype=torch.bfloat16)  # an EMA coarser than its fp32 params


def test_pin_memory_is_refused_with_the_reason() -> None:
    ours = EMAModel(SmallCNN().parameters())
    with pytest.raises(NotImplementedError, match="offload"):
        ours.pin_memory()


def test_deprecated_arguments_behave_like_the_peer() -> None:
    model = SmallCNN()
    for cls in (Peer, EMAModel):
        with pytest.warns(FutureWarning, match="Passing a `torch.nn.Module`"):
            ema = cls(copy.deepcopy(model))
        assert ema.use_ema_warmup is True
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ema = cls(copy.deepcopy(model).parameters(), max_value=0.5, min_value=0.25, device="cpu", unknown=1)
        said = " ".join(str(w.message) for w in caught if w.category is FutureWarning)
        assert all(f"`{name}` argument is deprecated" in said for name in ("max_value", "min_value", "device")), said
        assert (ema.decay, ema.min_decay) == (0.5, 0.25)
        with pytest.warns(FutureWarning, match="ExponentialMovingAverage.step"):
            ema.step(model)
        assert ema.optimization_step == 1


def test_get_decay_is_the_peers() -> None:
    params = list(SmallCNN().parameters())
    for options in (
        {},
        {"decay": 0.99, "min_decay": 0.5, "update_after_step": 4},
        {"use_ema_warmup": True, "inv_gamma": 3, "power": 0.75, "update_after_step": 2},
    ):
        peer, ours = Peer(params, **options), EMAModel(copy.deepcopy(SmallCNN()).parameters(), **options)
        for step in (0, 1, 2, 3, 4, 5, 6, 7, 50, 10**6):
            assert ours.get_decay(step) == peer.get_decay(step), (options, step)


def test_bad_input_is_refused_before_anything_changes() -> None:
    model = SmallCNN()
    with pytest.raises(TypeError, match=r"nn\.Parameter"):
        EMAModel([torch.randn(3)])
    with pytest.raises(ValueError, match="again"):
        EMAModel([model.fc.weight, model.fc.bias, model.fc.weight])
    with pytest.raises(ValueError, match="nothing to average"):
        EMAModel([])
    with pytest.raises(TypeError, match=r"float32, bfloat16 or float16(.|\n)*fp32 accuracy(.|\n)*sema\.SwitchEMA"):
        EMAModel([nn.Parameter(torch.zeros(3, dtype=torch.float64))])
    ours = EMAModel(model.parameters())
    before = clones(ours.shadow_params)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    for method in (ours.step, ours.copy_to):
        with pytest.raises(ValueError, match="params given"):
            method(list(model.parameters())[:-1])
    assert ours.optimization_step == 0 and ours.cur_decay_value is None
    assert_equal(ours.shadow_params, before, "shadows after refused calls")
    with pytest.raises(TypeError, match="deep-copied"):
        copy.deepcopy(ours)
    with pytest.raises(TypeError, match="pickled"):
        pickle.dumps(ours)


def test_params_of_another_dtype_take_the_multi_tensor_op() -> None:
    """An fp32 EMA stepped with bf16 params: diffusers promotes to fp32 (``s - w * (s - p)``), sema's
    multi-tensor op reads the bf16 params into its fp32 lerp; no staging copy (it would round)."""
    torch.manual_seed(4)
    master = SmallCNN()
    live = copy.deepcopy(master).to(torch.bfloat16)
    peer = Peer(copy.deepcopy(master).parameters(), decay=DECAY)
    ours = EMAModel(copy.deepcopy(master).parameters(), decay=DECAY)
    for _ in range(6):
        with torch.no_grad():
            for p in live.parameters():
                p.add_(torch.randn_like(p) * 0.05)
        peer.step(live.parameters())
        ours.step(live.parameters())
    assert ours._staging is None
    assert all(s.dtype == torch.float32 for s in ours.shadow_params)
    assert_close_to_peer(ours.shadow_params, peer.shadow_params)


@pytest.mark.parametrize("foreach", [False, True])
def test_half_ema_stepped_with_params_of_another_dtype_is_the_peers(foreach: bool) -> None:
    """A bf16 EMA stepped with fp32 params (the list path): diffusers' arithmetic per tensor, so
    the peer's bits (its ``s - p`` promotes to fp32, the result rounds to bf16)."""
    torch.manual_seed(6)
    master = SmallCNN()
    peer = Peer(copy.deepcopy(master).to(torch.bfloat16).parameters(), decay=DECAY, foreach=foreach)
    ours = EMAModel(copy.deepcopy(master).to(torch.bfloat16).parameters(), decay=DECAY, foreach=foreach)
    for _ in range(8):
        with torch.no_grad():
            for p in master.parameters():
                p.add_(torch.randn_like(p) * 0.05)
        peer.step(master.parameters())
        ours.step(master.parameters())
        assert_equal(ours.shadow_params, peer.shadow_params, "bf16 shadows stepped with fp32 params")
    assert ours._staging is None and ours._in_buckets


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_staged_step_is_bit_for_bit_the_fused_step(dtype: torch.dtype) -> None:
    """Another model's params go through the staging buffer, then the same fused op: the same bits
    as stepping the params the EMA was built from. The staging views are NaN-poisoned between
    steps, so a slot the copy missed would show."""
    torch.manual_seed(5)
    live = SmallTransformer().to(dtype)
    fused = EMAModel(live.parameters(), decay=DECAY, use_ema_warmup=True)
    staged = EMAModel(copy.deepcopy(live).parameters(), decay=DECAY, use_ema_warmup=True)
    for _ in range(5):
        with torch.no_grad():
            for p in live.parameters():
                p.add_(torch.randn_like(p) * 0.05)
        fused.step(live.parameters())
        staged.step(live.parameters())
        assert staged._staging is not None and fused._staging is None
        with torch.no_grad():
            for v in staged._staging_views:
                v.fill_(float("nan"))
    assert_equal(staged.shadow_params, fused.shadow_params, "staged vs fused shadows")

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
- EMA in bf16 (bf16 params, no ``to(dtype=...)``): sema rounds the fp32 lerp to bf16 once per step,
  diffusers rounds three times in bf16 (twice with ``foreach``), so the two differ by a few bf16
  units and fp32 rounding is no bound. Each is compared with an fp64 replay of the same updates:
  sema within ``2 u_bf16 scale / (1 - d_max)`` (one rounding per step, at most ``u = 2**-8`` of
  the magnitude, decayed at every later step; 2 for the scale's drift over the run), diffusers
  within ``4 u_bf16 scale / (1 - d_max)`` (three roundings). Measured: sema reaches about 0.4 of
  its bound, diffusers about 0.2 of its own, both about 0.85 u scale / (1 - d_max); the control 20x.
"""

from __future__ import annotations

import contextlib
import copy
import os
from collections.abc import Iterator
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import sema
from sema.compat.diffusers import EMAModel

training_utils = pytest.importorskip("diffusers.training_utils", reason="diffusers is not installed")
Peer = training_utils.EMAModel

EPS32 = 2.0**-23
U_BF16 = 2.0**-8
TOLERANCES = {"fp32": 4.0 * EPS32, "bf16-sema": 2.0 * U_BF16, "bf16-diffusers": 4.0 * U_BF16}
STEPS = 100
DECAY = 0.9  # short memory: a start that is one step off shows within the run
BACKENDS = ["torch"] + (["cpp"] if sema.available_backends("cpu")["cpp"][0] else [])


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(6)
        self.conv2 = nn.Conv2d(6, 8, 3, stride=2, padding=1)
        self.bn2 = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean(dim=(2, 3)))


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
        self.peer_opt = torch.optim.AdamW([p for p in self.peer_model.parameters() if p.requires_grad], lr=1e-2)
        self.our_opt = torch.optim.AdamW([p for p in self.our_model.parameters() if p.requires_grad], lr=1e-2)
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
    assert worst["control"][0] > 1.0, f"the negative control (update_after_step one off) matched: {worst['control']}"


@pytest.mark.parametrize("kind,foreach", [("cnn", False), ("transformer", True)])
def test_bf16_ema_within_rounding_of_the_exact_average(kind: str, foreach: bool) -> None:
    pair = Pair(kind, torch.bfloat16, {"decay": DECAY, "foreach": foreach})
    flat = Flat(pair.peer.shadow_params)
    exact = flat(pair.peer.shadow_params)
    params = list(pair.our_model.parameters())
    labelled = {
        **{f"{b} backend": (e, "bf16-sema") for b, e in pair.ours.items()},
        "diffusers": (pair.peer, "bf16-diffusers"),
    }
    labelled["control"] = (pair.control, "bf16-sema")
    worst = dict.fromkeys(labelled, 0.0)
    d_max = 0.0
    for _ in range(STEPS):
        pair.train_step()
        pair.ema_step()
        d = pair.peer.cur_decay_value
        d_max = max(d_max, d)
        exact.lerp_(flat(params), torch.tensor(1.0 - d, dtype=torch.float32).item())
        for label, (ema, tolerance) in labelled.items():
            assert all(s.dtype == torch.bfloat16 for s in ema.shadow_params)
            actual = flat(ema.shadow_params)
            worst[label] = max(worst[label], flat.ratio(actual, exact, TOLERANCES[tolerance] / (1.0 - d_max))[0])
    for label in labelled:
        if label != "control":
            assert worst[label] <= 1.0, f"{label}: the bf16 EMA is {worst[label]:.3g}x its bound off the fp64 replay"
    assert worst["control"] > 1.0, "the negative control (update_after_step one off) passed the bf16 bound"

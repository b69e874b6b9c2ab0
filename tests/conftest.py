"""Shared test helpers: tolerances, poisoned outputs, the fp64 oracle and verbose comparisons."""

from __future__ import annotations

import importlib.util
import os
import sys
import types
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# The Triton backend runs on CPU tensors only under its interpreter, which must be chosen before
# triton is first imported (torch does not import it). Decided by whether torch sees a GPU: the
# driver library can be missing from ctypes' search path on a machine whose GPU works.
if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest

import sema

# Machine epsilon per dtype: the bound on one rounding is eps/2 relative.
EPS = {torch.float32: 2.0**-23, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}

# (param dtype, ema dtype) pairs of the contract.
DTYPE_PAIRS = [
    (torch.float32, torch.float32),
    (torch.bfloat16, torch.float32),
    (torch.float16, torch.float32),
    (torch.bfloat16, torch.bfloat16),
    (torch.float16, torch.float16),
]
SIZES = [0, 1, 17, 4097, 2**20 + 3]
WEIGHTS = [0.0, 1e-4, 0.5, 1.0]


def pair_id(pair: tuple[torch.dtype, torch.dtype]) -> str:
    short = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
    return f"param_{short[pair[0]]}-ema_{short[pair[1]]}"


def cpu_backends() -> list[str]:
    """Backends that can run on CPU tensors here (torch always; others when built/enabled)."""
    return [name for name, (ok, _) in sema.available_backends("cpu").items() if ok]


def poisoned(n: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.full((n,), float("nan"), dtype=dtype)


def random_values(n: int, dtype: torch.dtype, generator: torch.Generator) -> torch.Tensor:
    """Normal values over several orders of magnitude (kept inside the dtype's range)."""
    scale = torch.pow(10.0, torch.empty(n).uniform_(-2, 2, generator=generator))
    return (torch.randn(n, generator=generator, dtype=torch.float64) * scale).to(dtype)


def fp32_weight(w: float) -> float:
    return float(torch.tensor(w, dtype=torch.float32))


def update_bound(e64: torch.Tensor, p64: torch.Tensor, expected: torch.Tensor, ema_dtype: torch.dtype) -> torch.Tensor:
    """Error allowed for one fp32-math lerp stored in ``ema_dtype``: the fp32 arithmetic
    (two roundings of terms bounded by |e| + |p|) plus the final rounding to ``ema_dtype``."""
    arith = 2 * EPS[torch.float32] * (e64.abs() + p64.abs())
    store = 0.5 * EPS[ema_dtype] * expected.abs() if ema_dtype != torch.float32 else 0.0
    tiny = torch.finfo(ema_dtype).tiny  # subnormal results
    return arith + store + tiny


def assert_within(actual: torch.Tensor, expected: torch.Tensor, bound: torch.Tensor, what: str) -> None:
    """Fail with the worst element: where, by how much, against which bound."""
    err = (actual.double() - expected).abs()
    bad = ~(err <= bound)  # NaN counts as bad
    if bad.any():
        idx = int(bad.nonzero()[0])
        worst = int(torch.nan_to_num(err - bound, nan=float("inf")).argmax())
        raise AssertionError(
            f"{what}: {int(bad.sum())}/{actual.numel()} elements off; first at {idx}: got "
            f"{actual[idx].item()!r}, expected {expected[idx].item()!r} (bound {bound[idx].item():.3g}); "
            f"worst at {worst}: err {err[worst].item():.3g} vs bound {bound[worst].item():.3g}"
        )


BITS = {8: torch.int64, 4: torch.int32, 2: torch.int16}  # element size -> integer dtype of the same width


def assert_bits_equal(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    int_type = BITS[actual.element_size()]
    a, b = actual.contiguous().view(int_type), expected.contiguous().view(int_type)
    diff = a != b
    if actual.dtype != expected.dtype or diff.any():
        idx = int(diff.nonzero()[0]) if diff.any() else -1
        raise AssertionError(
            f"{what}: {int(diff.sum())} elements differ bitwise (dtypes {actual.dtype}/{expected.dtype}); "
            f"first at {idx}" + (f": {actual[idx].item()!r} vs {expected[idx].item()!r}" if idx >= 0 else "")
        )


def assert_same(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    """Bit equality, except that a NaN only has to be a NaN (kernels may keep other payload bits)."""
    actual, expected = actual.cpu(), expected.cpu()
    int_type = BITS[actual.element_size()]
    if actual.dtype == expected.dtype and torch.equal(actual.view(int_type), expected.view(int_type)):
        return
    nan = torch.isnan(expected)
    if not torch.equal(torch.isnan(actual), nan):
        idx = int((torch.isnan(actual) != nan).nonzero()[0])
        raise AssertionError(f"{what}: NaN where none is expected or the reverse, first at {idx}: {actual[idx]!r}")
    assert_bits_equal(actual.masked_fill(nan, 0), expected.masked_fill(nan, 0), what)


def special_fp32(generator: torch.Generator) -> torch.Tensor:
    """Values where a cast to bf16/fp16 goes wrong first, then a million random bit patterns
    (every class of fp32: NaN payloads, subnormals, huge, tiny)."""
    bf16_ulp, fp16_ulp = 2.0**-7, 2.0**-10
    values = [
        float("nan"),
        -float("nan"),
        float("inf"),
        -float("inf"),
        0.0,
        -0.0,
        1.0,
        -1.0,
        1 + bf16_ulp / 2,
        1 + 3 * bf16_ulp / 2,
        -(1 + bf16_ulp / 2),
        1 + bf16_ulp / 2 + 2.0**-23,  # bf16 ties
        1 + fp16_ulp / 2,
        1 + 3 * fp16_ulp / 2,
        2049.0,
        2051.0,  # fp16 ties
        65504.0,
        65519.996,
        65520.0,
        -65520.0,
        1e10,
        3.4028234e38,  # fp16 max, round to Inf, overflow
        2.0**-24,
        2.0**-25,
        3 * 2.0**-26,
        2.0**-25 * (1 + 2.0**-20),
        2.0**-14,
        2.0**-14 - 2.0**-24,  # fp16 subnormals
        1e-45,
        -1e-45,
        1.1754942e-38,
        1.1754944e-38,
        3.3895e38,  # fp32 subnormals and bf16 overflow
    ]
    specials = torch.tensor(values, dtype=torch.float32)
    nan_bits = torch.tensor([0x7F800001, 0x7FC00001, 0x7FFFFFFF, -1, -4194305, 0x7F80FFFF], dtype=torch.int32)
    random_bits = torch.randint(-(2**31), 2**31, (2**20,), dtype=torch.int32, generator=generator)
    return torch.cat([specials, nan_bits.view(torch.float32), random_bits.view(torch.float32)])


def random_bits(n: int, dtype: torch.dtype, generator: torch.Generator) -> torch.Tensor:
    """Random bit patterns with the extremes up front: NaN payloads, Inf, -0, subnormals."""
    int_type = BITS[torch.empty((), dtype=dtype).element_size()]
    info = torch.iinfo(int_type)
    bits = torch.randint(info.min, info.max + 1, (n,), dtype=torch.int64, generator=generator).to(int_type)
    extremes = torch.tensor([0, -1, info.min, info.max, 1, -2, info.max - 1, info.min + 1], dtype=torch.int64)
    k = min(n, extremes.numel())
    bits[:k] = extremes[:k].to(int_type)
    return bits.view(dtype)


@pytest.fixture
def generator() -> torch.Generator:
    return torch.Generator().manual_seed(1234)


def param_snapshot(model: torch.nn.Module) -> dict[str, tuple[int, torch.Tensor]]:
    """Each param's address and a copy of its values, tied names included."""
    return {n: (p.data_ptr(), p.detach().clone()) for n, p in model.named_parameters(remove_duplicate=False)}


def assert_params_untouched(model: torch.nn.Module, before: dict[str, tuple[int, torch.Tensor]]) -> None:
    """Every param lives where it did and holds the same bits (a refused call moved nothing)."""
    for name, p in model.named_parameters(remove_duplicate=False):
        ptr, value = before[name]
        assert p.data_ptr() == ptr, f"{name} was re-pointed and not restored"
        assert_bits_equal(p.detach().flatten(), value.flatten(), name)


# --- models and peers shared by the migration and drop-in tests --------------------------------


class SmallCNN(nn.Module):
    """Two conv + BatchNorm layers and a linear head: params, float buffers and an integer one."""

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


def load_timm_model_ema(module_name: str = "_peer_timm_model_ema") -> types.ModuleType | None:
    """timm's ``utils/model_ema.py`` from the package ``make install`` puts in ``.venv/peers``
    (``import timm`` itself needs torchvision, which has no build for the pinned CPU torch), or
    from an importable timm; None where neither is there."""
    candidates = [Path(sys.prefix) / "peers" / "timm" / "utils" / "model_ema.py"]
    spec = importlib.util.find_spec("timm")
    if spec is not None and spec.origin is not None:
        candidates.append(Path(spec.origin).parent / "utils" / "model_ema.py")
    for path in candidates:
        if path.is_file():
            spec = importlib.util.spec_from_file_location(module_name, path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            return module
    return None

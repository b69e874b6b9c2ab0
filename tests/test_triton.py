"""The Triton backend (``sema.kernels``) against the fp64 oracle and the PyTorch reference.

Without a GPU the kernels run on CPU tensors under the Triton interpreter, which must be chosen
before triton is first imported (tests/conftest.py does the same). The interpreter is slow
(about 3 ms a launch plus 2 ms per block), so the 2**20 + 3 size runs fewer steps than the rest.
"""

from __future__ import annotations

import os

import torch

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import importlib
import subprocess
import sys
import textwrap

import pytest

import sema
from sema import reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

try:
    kernels = importlib.import_module("sema.kernels")
    AVAILABLE, REASON = kernels.availability(DEVICE)
except ImportError as exc:  # PYTHONPATH alone does not map kernels/ to sema.kernels
    AVAILABLE, REASON = False, f"sema.kernels is not importable ({exc}); pip install -e . first"

pytestmark = pytest.mark.skipif(not AVAILABLE, reason=f"triton backend unavailable on {DEVICE}: {REASON}")

INTERPRETED = AVAILABLE and kernels._interpreted()  # CPU tensors, or TRITON_INTERPRET=1 with a GPU

# Machine epsilon (the spacing at 1.0) per dtype: one rounding errs by at most eps/2 relative.
EPS = {torch.float32: 2.0**-23, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}
# Tolerance per stored dtype: ulps lost when a fp32 result is stored. Round to nearest even
# loses half an ulp; the interpreter truncates fp32 -> bf16 (numpy has no bf16), losing up to
# one, always toward zero. fp32 results are not rounded again: the lerp bound covers them.
STORE_ULPS = {
    torch.float32: 0.0,
    torch.bfloat16: 1.0 if INTERPRETED else 0.5,
    torch.float16: 0.5,
}
# Bits by which a cast output may fall short of ``tensor.to(dtype)`` (toward zero).
CAST_SLACK_BITS = {torch.float32: 0, torch.bfloat16: 1 if INTERPRETED else 0, torch.float16: 0}
# The fp32 lerp (a difference, a product, an fma) errs by under 2 eps * (|e| + |p|).
LERP_EPS_FACTOR = 2.0

SHORT = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
# (param dtype, ema dtype): the pairs of the kernel contract.
DTYPE_PAIRS = [
    (torch.float32, torch.float32),
    (torch.bfloat16, torch.float32),
    (torch.float16, torch.float32),
    (torch.bfloat16, torch.bfloat16),
    (torch.float16, torch.float16),
]
SWAP_PAIRS = [pair for pair in DTYPE_PAIRS if pair != (torch.float16, torch.float32)]
SIZES = [0, 1, 15, 17, 4097]
BIG = 2**20 + 3
WEIGHTS = [0.0, 1e-4, 0.5, 1.0]
STEPS = 50
# The multi-tensor launches cover 50 tensors of five dtype pairs each: 15 steps (every weight three
# times, each step on fresh values checked against fp64) take ~30 s under the interpreter, 50 took 100.
MULTI_STEPS = 15
BIG_STEPS = 2  # a launch over BIG elements takes about 0.5 s under the interpreter


def pair_id(pair: tuple[torch.dtype, torch.dtype]) -> str:
    return f"param_{SHORT[pair[0]]}-ema_{SHORT[pair[1]]}"


def random_values(n: int, dtype: torch.dtype, generator: torch.Generator) -> torch.Tensor:
    """Normal values over four orders of magnitude, inside every dtype's range."""
    scale = torch.pow(10.0, torch.empty(n, dtype=torch.float64).uniform_(-2, 2, generator=generator))
    values = torch.randn(n, generator=generator, dtype=torch.float64) * scale
    return values.to(dtype).to(DEVICE)


def random_bits(n: int, dtype: torch.dtype, generator: torch.Generator) -> torch.Tensor:
    """Every bit pattern is possible: NaN payloads, infinities, subnormals."""
    bits = {4: torch.int32, 2: torch.int16}[dtype.itemsize]
    info = torch.iinfo(bits)
    return torch.randint(info.min, info.max + 1, (n,), generator=generator, dtype=bits).view(dtype).to(DEVICE)


def as_bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view({4: torch.int32, 2: torch.int16}[t.element_size()]).to(torch.int64)


def weight_value(w: float | torch.Tensor) -> float:
    """The weight the kernels compute with: fp32."""
    return float(w) if isinstance(w, torch.Tensor) else float(torch.tensor(w, dtype=torch.float32))


def as_weight(w: float, step: int) -> float | torch.Tensor:
    """Even steps pass a Python float, odd steps a 0-d fp32 device tensor (read by the kernel)."""
    return w if step % 2 == 0 else torch.tensor(w, dtype=torch.float32, device=DEVICE)


def assert_bits_equal(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype}, expected {expected.dtype}"
    a, b = as_bits(actual).flatten(), as_bits(expected).flatten()
    diff = a != b
    if diff.any():
        idx = int(diff.nonzero()[0])
        raise AssertionError(
            f"{what}: {int(diff.sum())}/{a.numel()} elements differ bitwise; first at {idx}: "
            f"0x{int(a[idx]) & 0xFFFFFFFF:08x} ({actual.flatten()[idx].item()!r}) vs "
            f"0x{int(b[idx]) & 0xFFFFFFFF:08x} ({expected.flatten()[idx].item()!r})"
        )


def assert_within(actual: torch.Tensor, expected: torch.Tensor, bound: torch.Tensor, what: str) -> None:
    """Fail with the first and the worst element: where, by how much, against which bound."""
    err = (actual.double() - expected).abs()
    bad = ~(err <= bound)  # NaN is bad
    if bad.any():
        idx = int(bad.nonzero()[0])
        worst = int(torch.nan_to_num(err / bound, nan=float("inf")).argmax())
        raise AssertionError(
            f"{what}: {int(bad.sum())}/{actual.numel()} elements off; first at {idx}: got {actual[idx].item()!r}, "
            f"expected {expected[idx].item()!r} (err {err[idx].item():.3g}, bound {bound[idx].item():.3g}); "
            f"worst at {worst}: err {err[worst].item():.3g} = {(err[worst] / bound[worst]).item():.3g} x bound"
        )


def assert_cast(actual: torch.Tensor, source: torch.Tensor, what: str) -> None:
    """``actual`` is ``source.to(actual.dtype)`` (round to nearest even), or under the interpreter
    short of it by at most ``CAST_SLACK_BITS`` toward zero (the magnitude bits count down)."""
    expected = source.to(actual.dtype)
    slack = CAST_SLACK_BITS[actual.dtype]
    if slack == 0:
        assert_bits_equal(actual, expected, what)
        return
    short = as_bits(expected) - as_bits(actual)  # same sign bit: the magnitude difference
    bad = (short < 0) | (short > slack)
    if bad.any():
        idx = int(bad.nonzero()[0])
        raise AssertionError(
            f"{what}: {int(bad.sum())}/{actual.numel()} elements are not {actual.dtype} casts of the EMA "
            f"(slack {slack} bits toward zero); first at {idx}: got {actual[idx].item()!r}, "
            f"expected {expected[idx].item()!r} from {source[idx].item()!r}"
        )


def check_update(
    ema_before: torch.Tensor,
    param_before: torch.Tensor,
    w: float | torch.Tensor,
    ema_after: torch.Tensor,
    param_after: torch.Tensor,
    switch: bool,
    what: str,
) -> None:
    """One update step against the fp64 oracle, from the same starting state."""
    weight = weight_value(w)
    e64, p64 = ema_before.double().flatten(), param_before.double().flatten()
    expected = e64 + weight * (p64 - e64)
    ema_dtype = ema_after.dtype
    bound = (
        LERP_EPS_FACTOR * EPS[torch.float32] * (e64.abs() + p64.abs())
        + STORE_ULPS[ema_dtype] * EPS[ema_dtype] * expected.abs()
        + torch.finfo(ema_dtype).tiny  # subnormal results
    )
    assert_within(ema_after.flatten(), expected, bound, f"{what}: ema")
    if weight == 1.0:  # torch.lerp's second branch: the param exactly
        assert_bits_equal(ema_after, param_before.to(ema_dtype), f"{what}: ema at w=1")
    if weight == 0.0:
        assert_bits_equal(ema_after, ema_before, f"{what}: ema at w=0")
    if switch:
        assert_cast(param_after.flatten(), ema_after.flatten(), f"{what}: switched param")
    else:
        assert_bits_equal(param_after, param_before, f"{what}: param (no switch)")


def run_update_steps(pair, n, w, switch, steps, generator, update=None) -> None:
    """``steps`` updates with fresh random params each step, each checked from the state the
    kernel left (so an error shows at the step that made it instead of compounding)."""
    update = update or kernels.ema_update_
    param_dtype, ema_dtype = pair
    ema = random_values(n, ema_dtype, generator)
    for step in range(steps):
        param = random_values(n, param_dtype, generator)
        ema_before, param_before = ema.clone(), param.clone()
        weight = as_weight(w, step)
        update(ema, param, weight, switch)
        kind = "tensor" if isinstance(weight, torch.Tensor) else "float"
        check_update(ema_before, param_before, weight, ema, param, switch, f"step {step} ({kind} w={w})")


@pytest.fixture
def generator() -> torch.Generator:
    return torch.Generator().manual_seed(20240214)


# --- availability ---------------------------------------------------------------------------


def test_availability_reasons():
    ok, reason = kernels.availability(DEVICE)
    assert ok, reason
    if DEVICE == "cpu":
        assert "TRITON_INTERPRET=1" in reason
    ok, reason = kernels.availability("mps")
    assert not ok and "mps" in reason


def test_import_without_triton_says_why():
    """``import sema.kernels`` must not fail without triton; availability gives the reason."""
    code = textwrap.dedent(
        """
        import sys
        sys.modules["triton"] = None  # what an uninstalled package looks like to import
        import sema.kernels
        print(sema.kernels.availability("cuda"))
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "(False" in result.stdout and "triton is not installed" in result.stdout, result.stdout


# --- ema_update_ ----------------------------------------------------------------------------


@pytest.mark.parametrize("switch", [False, True], ids=["update", "update_switch"])
@pytest.mark.parametrize("w", WEIGHTS, ids=[f"w={w}" for w in WEIGHTS])
@pytest.mark.parametrize("n", SIZES, ids=[f"n={n}" for n in SIZES])
@pytest.mark.parametrize("pair", DTYPE_PAIRS, ids=pair_id)
def test_ema_update(pair, n, w, switch, generator):
    run_update_steps(pair, n, w, switch, STEPS if n else 1, generator)


@pytest.mark.parametrize("pair", DTYPE_PAIRS, ids=pair_id)
def test_ema_update_big(pair, generator):
    """256 full blocks and a 3-element tail; a float w then a tensor w."""
    run_update_steps(pair, BIG, 1e-4, True, BIG_STEPS, generator)


# --- switch_ --------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [*SIZES, BIG], ids=[f"n={n}" for n in [*SIZES, BIG]])
@pytest.mark.parametrize("pair", DTYPE_PAIRS, ids=pair_id)
def test_switch(pair, n, generator):
    param_dtype, ema_dtype = pair
    for step in range(3 if n < BIG else 1):
        ema = random_values(n, ema_dtype, generator)
        ema_before = ema.clone()
        param = torch.full((n,), float("nan"), dtype=param_dtype, device=DEVICE)  # poison: every element written
        kernels.switch_(ema, param)
        assert_cast(param, ema, f"step {step}: switched param")
        assert_bits_equal(ema, ema_before, f"step {step}: ema (read only)")


# --- swap_ ----------------------------------------------------------------------------------

FP32_SPECIALS = [
    float("nan"), -float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 1.0, -1.0,
    torch.finfo(torch.float32).max, -torch.finfo(torch.float32).max,
    torch.finfo(torch.float32).tiny, 1e-45, -1e-45, 3e-39,  # smallest normal, subnormals
    torch.finfo(torch.bfloat16).max, 1.00390625,
]  # fmt: skip
# Bit patterns: low halves 0x8000 (the tie), 0xFFFF (carry into hi), 0x7FFF; hi 0xFFFF (wrap);
# signalling and payload NaNs.
FP32_SPECIAL_BITS = [
    0x3F808000, 0x3F80FFFF, 0x3F807FFF, 0xBF808000, 0x7F7F8000, 0x7F7FFFFF, 0xFFFF8000, 0xFFFFFFFF,
    0x7F800001, 0x7FC00001, 0xFF80FFFF, 0x00008000, 0x8000FFFF, 0x7F7FFFFF, 0x0000FFFF,
]  # fmt: skip
BF16_SPECIAL_BITS = [
    0x0000, 0x8000, 0x7F80, 0xFF80, 0x7FC0, 0xFFC0, 0x7F81, 0xFFFF, 0x7F7F, 0xFF7F, 0x0001, 0x8001, 0x3F80,
]  # fmt: skip


def special_values(dtype: torch.dtype) -> torch.Tensor:
    """Special values of ``dtype`` as bit patterns (so NaN payloads are exact)."""
    if dtype == torch.float32:
        from_floats = torch.tensor(FP32_SPECIALS, dtype=torch.float32).view(torch.int32)
        from_bits = torch.tensor(FP32_SPECIAL_BITS, dtype=torch.int64).to(torch.int32)  # wraps: same bits
        return torch.cat([from_floats, from_bits]).view(torch.float32)
    from_floats = torch.tensor(FP32_SPECIALS, dtype=torch.float32).to(dtype).view(torch.int16)
    from_bits = torch.tensor(BF16_SPECIAL_BITS, dtype=torch.int64).to(torch.int16)
    return torch.cat([from_floats, from_bits]).view(dtype)


def swap_inputs(pair, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random bit patterns, with every (ema special, param special) combination up front."""
    param_dtype, ema_dtype = pair
    ema, param = random_bits(n, ema_dtype, generator), random_bits(n, param_dtype, generator)
    ema_specials, param_specials = special_values(ema_dtype), special_values(param_dtype)
    combos = torch.cartesian_prod(torch.arange(len(ema_specials)), torch.arange(len(param_specials)))[:n]
    ema[: len(combos)] = ema_specials[combos[:, 0]].to(DEVICE)
    param[: len(combos)] = param_specials[combos[:, 1]].to(DEVICE)
    return ema, param


SWAP_SIZES = [*SIZES, 1000, BIG]  # 1000: room for all special combinations


@pytest.mark.parametrize("n", SWAP_SIZES, ids=[f"n={n}" for n in SWAP_SIZES])
@pytest.mark.parametrize("pair", SWAP_PAIRS, ids=pair_id)
def test_swap_bit_exact(pair, n, generator):
    """swap_ then swap_(restore=True): bit-identical to the reference each time, and back to the
    original bits (for equal dtypes the swap is an exchange: its own inverse)."""
    ema, param = swap_inputs(pair, n, generator)
    ema_orig, param_orig = ema.clone(), param.clone()
    ema_ref, param_ref = ema.clone(), param.clone()
    for restore in (False, True):
        kernels.swap_(ema, param, restore=restore)
        reference.swap_(ema_ref, param_ref, restore=restore)
        assert_bits_equal(ema, ema_ref, f"ema after swap_(restore={restore})")
        assert_bits_equal(param, param_ref, f"param after swap_(restore={restore})")
        if restore is False and pair[0] == pair[1]:
            assert_bits_equal(ema, param_orig, "ema after exchange")
            assert_bits_equal(param, ema_orig, "param after exchange")
    assert_bits_equal(ema, ema_orig, "ema after swap + restore")
    assert_bits_equal(param, param_orig, "param after swap + restore")


def test_swap_packed_param_is_rounded_ema(generator):
    """The param slot holds the EMA rounded to bf16 half away from zero: equal to round to
    nearest even except on exact ties (low half 0x8000) and NaN payloads."""
    ema = random_values(4097, torch.float32, generator)
    param = random_values(4097, torch.bfloat16, generator)
    tie = as_bits(ema) & 0xFFFF == 0x8000
    ema_before = ema.clone()
    kernels.swap_(ema, param)
    assert_cast(param[~tie], ema_before[~tie], "packed param slot")


def test_swap_refuses_fp16_with_fp32_ema():
    with pytest.raises(TypeError, match="no lossless in-place swap"):
        kernels.swap_(torch.zeros(4, device=DEVICE), torch.zeros(4, dtype=torch.float16, device=DEVICE))


# --- unaligned views -------------------------------------------------------------------------

# (ema offset, param offset) in elements into 16-byte aligned buffers, and the elements after which
# an fp32 EMA and bf16 params at those offsets are 16-byte aligned together (None: never).
HEADS = {(1, 1): 7, (1, 5): 3, (0, 1): None, (3, 0): None}
VIEW_OFFSETS = list(HEADS)
VIEW_SIZE = 2 * 4096 + 21  # full blocks after any head, and a tail


def offset_view(buffer: torch.Tensor, offset: int, n: int) -> torch.Tensor:
    assert buffer.data_ptr() % 16 == 0
    return buffer[offset : offset + n]


@pytest.mark.parametrize("offsets", VIEW_OFFSETS, ids=[f"ema+{e}-param+{p}" for e, p in VIEW_OFFSETS])
@pytest.mark.parametrize("pair", DTYPE_PAIRS, ids=pair_id)
def test_unaligned_views(pair, offsets, generator):
    """Every op on views that start off 16-byte boundaries, in place, and nothing written around
    them: the update with switch (3 steps), the switch, and swap + restore (bit-exact)."""
    param_dtype, ema_dtype = pair
    n = VIEW_SIZE
    ema_buffer = random_values(n + 16, ema_dtype, generator)
    param_buffer = random_values(n + 16, param_dtype, generator)
    ema, param = offset_view(ema_buffer, offsets[0], n), offset_view(param_buffer, offsets[1], n)

    def check_guards(what: str) -> None:
        for buffer, offset, before in ((ema_buffer, offsets[0], ema_guard), (param_buffer, offsets[1], param_guard)):
            outside = torch.cat([buffer[:offset], buffer[offset + n :]])
            assert_bits_equal(outside, before, f"{what}: elements around the view")

    ema_guard = torch.cat([ema_buffer[: offsets[0]], ema_buffer[offsets[0] + n :]]).clone()
    for step in range(3):
        param.copy_(random_values(n, param_dtype, generator))
        param_guard = torch.cat([param_buffer[: offsets[1]], param_buffer[offsets[1] + n :]]).clone()
        ema_before, param_before = ema.clone(), param.clone()
        weight = as_weight(0.25, step)
        kernels.ema_update_(ema, param, weight, True)
        check_update(ema_before, param_before, weight, ema, param, True, f"step {step}")
        check_guards(f"update step {step}")
    param.copy_(random_values(n, param_dtype, generator))
    kernels.switch_(ema, param)
    assert_cast(param, ema, "switched param")
    check_guards("switch")
    if pair in SWAP_PAIRS:
        ema_before, param_before = ema.clone(), param.clone()
        ema_ref, param_ref = ema.clone(), param.clone()
        kernels.swap_(ema, param)
        reference.swap_(ema_ref, param_ref)
        assert_bits_equal(ema, ema_ref, "ema after swap_")
        assert_bits_equal(param, param_ref, "param after swap_")
        kernels.swap_(ema, param, restore=True)
        assert_bits_equal(ema, ema_before, "ema after swap + restore")
        assert_bits_equal(param, param_before, "param after swap + restore")
        check_guards("swap")


class LaunchRecorder:
    """Stands in for a kernel: records each launch's tensors and grid, then runs the real one."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append((grid, [a for a in args if isinstance(a, torch.Tensor) and a.dim() == 1]))
            return self.kernel[grid](*args, **kwargs)

        return launch


@pytest.mark.parametrize("offsets", VIEW_OFFSETS, ids=[f"ema+{e}-param+{p}" for e, p in VIEW_OFFSETS])
def test_unaligned_views_split_off_their_head(offsets, generator, monkeypatch):
    """Views that reach a 16-byte boundary together run as a head of a few elements (one masked
    program) and an aligned rest, so that the rest gets vector accesses; views that never align
    together run in one launch."""
    modules = {name: importlib.import_module(f"sema.kernels.{name}") for name in ("ema", "switch", "swap")}
    recorders = {}
    for name, kernel_name in (("ema", "_ema_update_kernel"), ("switch", "_switch_kernel"), ("swap", "_swap_kernel")):
        recorders[name] = LaunchRecorder(getattr(modules[name], kernel_name))
        monkeypatch.setattr(modules[name], kernel_name, recorders[name])
    n = VIEW_SIZE
    ema = offset_view(random_values(n + 16, torch.float32, generator), offsets[0], n)
    param = offset_view(random_values(n + 16, torch.bfloat16, generator), offsets[1], n)
    kernels.ema_update_(ema, param, 0.5, True)
    kernels.switch_(ema, param)
    kernels.swap_(ema, param)
    head = HEADS[offsets]
    for name, recorder in recorders.items():
        parts = [(grid, [(t.data_ptr(), t.numel()) for t in tensors]) for grid, tensors in recorder.launches]
        if head is None:
            assert parts == [((-(-n // 4096),), [(ema.data_ptr(), n), (param.data_ptr(), n)])], name
        else:
            rest = [(ema.data_ptr() + 4 * head, n - head), (param.data_ptr() + 2 * head, n - head)]
            assert all(address % 16 == 0 for address, _ in rest), f"{name}: the test's HEADS are wrong"
            head_part = ((1,), [(ema.data_ptr(), head), (param.data_ptr(), head)])
            assert parts == [head_part, ((-(-(n - head) // 4096),), rest)], name


# --- negative controls: the checkers reject wrong kernels -----------------------------------


def test_checker_rejects_weight_complement(generator):
    """The update with ``1 - w`` instead of ``w``."""

    def wrong_update(ema, param, w, switch):
        kernels.ema_update_(ema, param, 1.0 - w, switch)

    with pytest.raises(AssertionError, match="ema"):
        run_update_steps((torch.bfloat16, torch.float32), 17, 1e-4, True, 2, generator, update=wrong_update)


@pytest.mark.parametrize("switch", [False, True], ids=["update", "update_switch"])
def test_checker_rejects_skipped_tail(switch, generator):
    """A launcher whose grid leaves out the last, partial block."""
    from sema.kernels.ema import _ema_update_kernel
    from sema.kernels.launch import block_size

    def wrong_update(ema, param, w, switch):
        block = block_size(ema.dtype, param.dtype)
        grid = (ema.numel() // block,)  # should round up
        _ema_update_kernel[grid](
            ema, param, w, ema.numel(), BLOCK=block, SWITCH=switch, WEIGHT_IS_TENSOR=isinstance(w, torch.Tensor)
        )

    with pytest.raises(AssertionError, match=r"elements off|bitwise|casts"):
        run_update_steps((torch.float32, torch.float32), 4097, 0.5, switch, 1, generator, update=wrong_update)


def test_checker_rejects_unwritten_switch(generator):
    """A switch that writes nothing leaves the NaN poison in place."""
    ema = random_values(17, torch.float32, generator)
    param = torch.full((17,), float("nan"), dtype=torch.bfloat16, device=DEVICE)
    with pytest.raises(AssertionError, match=r"not .* casts|bitwise"):
        assert_cast(param, ema, "unwritten param")


def test_checker_rejects_truncated_cast(generator):
    """On a GPU a truncating fp32 -> bf16 cast is wrong; under the interpreter a cast that
    rounds the wrong way (up in magnitude) is."""
    ema = random_values(4097, torch.float32, generator)
    nearest = ema.to(torch.bfloat16)
    if INTERPRETED:
        wrong = (as_bits(nearest) + 1).to(torch.int16).view(torch.bfloat16)
    else:
        wrong = (as_bits(ema) >> 16).to(torch.int16).view(torch.bfloat16)
    with pytest.raises(AssertionError):
        assert_cast(wrong, ema, "wrong cast")


def test_checker_rejects_lossy_swap(generator):
    """A swap that drops the carry cannot be told apart on most values, but the reference can."""
    ema, param = swap_inputs((torch.bfloat16, torch.float32), 1000, generator)
    ema_ref, param_ref = ema.clone(), param.clone()
    reference.swap_(ema_ref, param_ref)
    high = (as_bits(ema) >> 16).to(torch.int16)
    with pytest.raises(AssertionError, match="bitwise"):
        assert_bits_equal(high.view(torch.bfloat16), param_ref, "param slot without carry")


# --- ema_update_multi_ ----------------------------------------------------------------------


def multi_tensors(generator: torch.Generator) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """50 (ema, param) pairs: every dtype pair, random sizes, empty ones, channels_last and
    transposed (dense, not contiguous) ones, and one spanning several blocks."""
    emas, params = [], []
    for i in range(50):
        param_dtype, ema_dtype = DTYPE_PAIRS[i % len(DTYPE_PAIRS)]
        kind = i % 7
        if kind == 0:
            shape = (0,) if i % 2 else (3, 0, 5)
        elif kind == 1:
            shape = tuple(int(s) for s in torch.randint(1, 6, (4,), generator=generator))
        elif kind == 2:
            shape = (
                int(torch.randint(1, 40, (), generator=generator)),
                int(torch.randint(1, 40, (), generator=generator)),
            )
        elif kind == 3 and i < 14:
            shape = (3 * 8192 + 5,)  # i = 3: bf16/bf16, 4 programs; i = 10: fp32/fp32, 7 programs
        else:
            shape = (int(torch.randint(1, 3000, (), generator=generator)),)
        param = random_values(torch.Size(shape).numel(), param_dtype, generator).reshape(shape)
        if kind == 1:
            param = param.contiguous(memory_format=torch.channels_last)
        elif kind == 2:
            param = param.t()
        ema = torch.empty_strided(param.shape, param.stride(), dtype=ema_dtype, device=DEVICE)
        ema.copy_(random_values(ema.numel(), ema_dtype, generator).reshape(ema.shape))
        emas.append(ema)
        params.append(param)
    assert any(not p.is_contiguous() and p.dim() == 4 for p in params)
    return emas, params


class LaunchCounter:
    """Stands in for a kernel: counts launches, then runs the real one."""

    def __init__(self, kernel):
        self.kernel, self.grids = kernel, []

    def __getitem__(self, grid):
        self.grids.append(grid)
        return self.kernel[grid]


@pytest.mark.parametrize("switch", [False, True], ids=["update", "update_switch"])
def test_ema_update_multi(switch, generator, monkeypatch):
    multi = importlib.import_module("sema.kernels.multi")
    counter = LaunchCounter(multi._ema_update_multi_kernel)
    monkeypatch.setattr(multi, "_ema_update_multi_kernel", counter)
    emas, params = multi_tensors(generator)
    for step in range(MULTI_STEPS):
        for param in params:
            param.copy_(random_values(param.numel(), param.dtype, generator).reshape(param.shape))
        w = as_weight([1e-4, 0.5, 1.0, 0.0, 0.3][step % 5], step)
        emas_before, params_before = [e.clone() for e in emas], [p.clone() for p in params]
        kernels.ema_update_multi_(emas, params, w, switch)
        for i in range(len(emas)):
            what = f"step {step}, tensor {i} {tuple(params[i].shape)} {pair_id((params[i].dtype, emas[i].dtype))}"
            check_update(emas_before[i], params_before[i], w, emas[i], params[i], switch, what)
        assert all(e.stride() == p.stride() for e, p in zip(emas, params, strict=True))
    assert len(counter.grids) == MULTI_STEPS * len(DTYPE_PAIRS), "one launch per dtype pair per call"


def test_multi_block_table_entries():
    """One entry per block: its own addresses and element count. An unaligned head that both
    tensors leave together is an entry of its own (full blocks after it are aligned), a full block
    that stays unaligned gets ``block + 1`` (the masked path), and partial entries come first."""
    multi = importlib.import_module("sema.kernels.multi")
    block = 4096
    base = 1 << 20  # 16-byte aligned
    rows = [
        base, 2 * base, 2 * block + 5,  # aligned fp32/bf16: two full blocks and a tail of 5
        base + 4, 2 * base + 10, block + 3,  # fp32 at +4 bytes, bf16 at +10: aligned together after 3
        base + 4, 2 * base, block,  # offsets that never align together: no head, the masked path
    ]  # fmt: skip
    entries = multi._entries(rows, block, 4, 2)
    assert entries == [
        base + 2 * block * 4, 2 * base + 2 * block * 2, 5,
        base + 4, 2 * base + 10, 3,
        base + 4, 2 * base, block + 1,
        base, 2 * base, block,
        base + block * 4, 2 * base + block * 2, block,
        base + 16, 2 * base + 16, block,
    ]  # fmt: skip


def test_multi_block_table_is_cached():
    multi = importlib.import_module("sema.kernels.multi")
    block = 4096
    emas = [torch.zeros(n, device=DEVICE) for n in (3 * block + 5, 0, 7)]
    params = [torch.zeros(n, device=DEVICE) for n in (3 * block + 5, 0, 7)]
    table = multi._block_table([emas], params, block)
    assert table.view(-1, 3)[:, 2].tolist() == [5, 7, block, block, block]  # no entry for the empty tensor
    assert multi._block_table([emas], params, block) is table
    as_bf16 = [p.view(torch.bfloat16)[: p.numel()] for p in params]  # same addresses and counts
    assert multi._block_table([emas], as_bf16, block) is not table


def test_ema_update_multi_unaligned_views(generator):
    """Views off 16-byte boundaries in one multi-tensor launch per dtype pair: a head split off
    (HEADS), full blocks that never align (the masked path), tails; nothing written around them."""
    emas, params, buffers = [], [], []
    for i, (ema_offset, param_offset) in enumerate(HEADS):
        for pair in ((torch.bfloat16, torch.float32), (torch.float32, torch.float32)):
            n = 4096 + 100 * i + 1
            ema_buffer = random_values(n + 16, pair[1], generator)
            param_buffer = random_values(n + 16, pair[0], generator)
            emas.append(offset_view(ema_buffer, ema_offset, n))
            params.append(offset_view(param_buffer, param_offset, n))
            buffers += [(ema_buffer, ema_offset, n), (param_buffer, param_offset, n)]
    outside = [torch.cat([b[:o], b[o + n :]]).clone() for b, o, n in buffers]
    for step in range(3):
        for param in params:
            param.copy_(random_values(param.numel(), param.dtype, generator))
        emas_before, params_before = [e.clone() for e in emas], [p.clone() for p in params]
        w = as_weight(0.25, step)
        kernels.ema_update_multi_(emas, params, w, True)
        for i in range(len(emas)):
            what = f"step {step}, tensor {i} {pair_id((params[i].dtype, emas[i].dtype))}"
            check_update(emas_before[i], params_before[i], w, emas[i], params[i], True, what)
    for (buffer, offset, n), before in zip(buffers, outside, strict=True):
        assert_bits_equal(torch.cat([buffer[:offset], buffer[offset + n :]]), before, "elements around a view")


def test_multi_only_empty_tensors():
    emas = [torch.zeros(0, device=DEVICE), torch.zeros(2, 0, device=DEVICE)]
    params = [torch.zeros(0, device=DEVICE), torch.zeros(2, 0, device=DEVICE)]
    kernels.ema_update_multi_(emas, params, 0.5, True)


# --- routing through sema.ops ---------------------------------------------------------------


def test_ops_route_to_triton(generator, monkeypatch):
    """``backend="triton"`` runs these kernels: each launcher is spied on and the results checked."""
    calls = []
    for module_name, launcher in [("ema", "_launch_update"), ("switch", "_launch_switch"), ("swap", "_launch_swap"),
                                  ("multi", "_launch_update_multi")]:  # fmt: skip
        module = importlib.import_module(f"sema.kernels.{module_name}")
        real = getattr(module, launcher)

        def spy(*args, _real=real, _name=launcher):
            calls.append(_name)
            return _real(*args)

        monkeypatch.setattr(module, launcher, spy)
    n = 4097
    ema, param = random_values(n, torch.float32, generator), random_values(n, torch.bfloat16, generator)
    ema_before, param_before = ema.clone(), param.clone()
    w = torch.tensor(1e-4, device=DEVICE)
    sema.ops.ema_update_(ema, param, w, switch=True, backend="triton")
    check_update(ema_before, param_before, w, ema, param, True, "sema.ops.ema_update_")

    poisoned = torch.full((n,), float("nan"), dtype=torch.bfloat16, device=DEVICE)
    sema.ops.switch_(ema, poisoned, backend="triton")
    assert_cast(poisoned, ema, "sema.ops.switch_")

    ema_ref, param_ref = ema.clone(), param.clone()
    sema.ops.swap_(ema, param, backend="triton")
    reference.swap_(ema_ref, param_ref)
    assert_bits_equal(param, param_ref, "sema.ops.swap_")

    emas = [random_values(n, torch.float32, generator)]
    params = [random_values(n, torch.float32, generator)]
    before = emas[0].clone()
    sema.ops.ema_update_multi_(emas, params, 1.0, backend="triton")
    check_update(before, params[0], 1.0, emas[0], params[0], False, "sema.ops.ema_update_multi_")
    assert calls == ["_launch_update", "_launch_switch", "_launch_swap", "_launch_update_multi"]

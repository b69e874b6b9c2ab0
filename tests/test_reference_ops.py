"""The op contract on the reference backend: against an fp64 computation, bit-exact swaps,
input checks, the registered custom ops, and negative controls the checkers must reject."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from conftest import (
    DTYPE_PAIRS,
    SIZES,
    WEIGHTS,
    assert_bits_equal,
    assert_within,
    fp32_weight,
    pair_id,
    poisoned,
    random_values,
    update_bound,
)

import sema
from sema import reference
from sema.cpu_threads import PLANNER

STEPS = 100


@pytest.fixture(autouse=True)
def all_threads():
    """PyTorch's parallel paths run on every call, whatever the machine's load (the thread
    planner has its own tests in test_contention.py)."""
    with PLANNER.all_threads():
        yield


def run_update_trajectory(
    update: Callable[..., None],
    param_dtype: torch.dtype,
    ema_dtype: torch.dtype,
    n: int,
    w: float,
    w_as_tensor: bool,
    switch: bool,
    steps: int,
    generator: torch.Generator,
) -> None:
    """``steps`` updates with fresh random params; every step is checked against fp64."""
    ema = random_values(n, ema_dtype, generator)
    weight = torch.tensor(w, dtype=torch.float32) if w_as_tensor else w
    w64 = fp32_weight(w)
    for step in range(steps):
        param = random_values(n, param_dtype, generator)
        e64, p64 = ema.double(), param.double()
        expected = torch.lerp(e64, p64, w64)
        before = ema.clone()
        update(ema, param, weight, switch)
        what = f"step {step}"
        if w == 0.0:
            assert_bits_equal(ema, before, f"{what}: w=0 must leave the EMA unchanged")
        elif w == 1.0:
            # Equal values; the sign of a zero may differ, as with torch.lerp: p - (p - e) * 0.
            assert_within(ema, p64.to(ema_dtype).double(), torch.zeros(n, dtype=torch.float64), f"{what}: w=1 copies")
        else:
            assert_within(ema, expected, update_bound(e64, p64, expected, ema_dtype), what)
        if switch:
            assert_bits_equal(param, ema.to(param_dtype), f"{what}: switched param must be the cast EMA")


def reference_update(ema, param, w, switch):
    sema.ops.ema_update_(ema, param, w, switch=switch, backend="torch")


@pytest.mark.parametrize("n", SIZES, ids=lambda n: f"n{n}")
@pytest.mark.parametrize("pair", DTYPE_PAIRS, ids=pair_id)
@pytest.mark.parametrize("w", WEIGHTS, ids=lambda w: f"w{w}")
@pytest.mark.parametrize("w_as_tensor", [False, True], ids=["w_float", "w_tensor"])
def test_update_matches_fp64(pair, n, w, w_as_tensor, generator):
    steps = STEPS if n < 2**20 else 100 if w in (1e-4,) else 20
    run_update_trajectory(reference_update, *pair, n, w, w_as_tensor, False, steps, generator)


@pytest.mark.parametrize("n", [0, 17, 2**20 + 3], ids=lambda n: f"n{n}")
@pytest.mark.parametrize("pair", DTYPE_PAIRS, ids=pair_id)
@pytest.mark.parametrize("w", [1e-4, 0.5], ids=lambda w: f"w{w}")
def test_update_switch_matches_fp64(pair, n, w, generator):
    run_update_trajectory(reference_update, *pair, n, w, True, True, 30, generator)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("w", [1e-4, 1e-3, 0.3337, 0.77, 0.9999])
@pytest.mark.parametrize("w_as_tensor", [False, True], ids=["w_float", "w_tensor"])
@pytest.mark.parametrize("switch", [False, True], ids=["update", "update_switch"])
def test_reduced_ema_is_one_rounding_of_the_fp32_lerp(dtype, w, w_as_tensor, switch, generator):
    """A bf16/fp16 EMA gets the fp32 lerp (fp32 weight) rounded once, bit for bit. The fp64
    bounds above cannot see a weight rounded to bf16 first (what ``Tensor.lerp_`` does with a
    tensor weight on a bf16 tensor): its error hides under the final rounding."""
    n = 2**20 + 3
    ema, param = random_values(n, dtype, generator), random_values(n, dtype, generator)
    expected = ema.float().lerp_(param.float(), torch.tensor(w, dtype=torch.float32)).to(dtype)
    sema.ops.ema_update_(ema, param, torch.tensor(w) if w_as_tensor else w, switch=switch, backend="torch")
    assert_bits_equal(ema, expected, "ema")
    if switch:
        assert_bits_equal(param, expected, "switched param")


@pytest.mark.parametrize("n", [0, 1, 4097], ids=lambda n: f"n{n}")
@pytest.mark.parametrize("pair", DTYPE_PAIRS, ids=pair_id)
def test_switch_writes_cast_ema(pair, n, generator):
    param_dtype, ema_dtype = pair
    ema = random_values(n, ema_dtype, generator)
    param = poisoned(n, param_dtype)
    before = ema.clone()
    sema.ops.switch_(ema, param, backend="torch")
    assert_bits_equal(param, ema.to(param_dtype), "switch_")
    assert_bits_equal(ema, before, "switch_ must not change the EMA")


# --- negative controls: the checker must reject wrong kernels ------------------------------


def wrong_swapped_weight(ema, param, w, switch):
    reference.ema_update_(ema, param, 1.0 - w, switch)


def wrong_low_precision(ema, param, w, switch):
    ema.copy_(ema.to(param.dtype).lerp_(param, w))


def wrong_skips_tail(ema, param, w, switch):
    reference.ema_update_(ema[:-1], param[:-1], w, switch)


def wrong_truncating_switch(ema, param, w, switch):
    reference.ema_update_(ema, param, w, False)
    if switch:  # truncate instead of rounding to nearest even
        bits = ema.view(torch.int32) & ~0xFFFF
        param.copy_(bits.view(torch.float32))


@pytest.mark.parametrize(
    "wrong, pair, switch",
    [
        (wrong_swapped_weight, (torch.float32, torch.float32), False),
        (wrong_low_precision, (torch.bfloat16, torch.float32), False),
        (wrong_skips_tail, (torch.float16, torch.float32), False),
        (wrong_truncating_switch, (torch.bfloat16, torch.float32), True),
    ],
    ids=["swapped_weight", "bf16_math", "skips_tail", "truncating_cast"],
)
def test_checker_rejects_wrong_kernels(wrong, pair, switch, generator):
    with pytest.raises(AssertionError):
        run_update_trajectory(wrong, *pair, 4097, 0.25, False, switch, 5, generator)


# --- swap ------------------------------------------------------------------------------------


def special_fp32() -> torch.Tensor:
    """Extremes, NaN payloads, ties and low halves that exercise the carry."""
    words = [
        0x00000000, 0x80000000, 0x7F800000, 0xFF800000, 0x7FC00000, 0xFFC00001, 0x7F800001,
        0x7FFFFFFF, 0xFFFFFFFF, 0x7F7FFFFF, 0xFF7FFFFF, 0x7F7F8000, 0x00000001, 0x807FFFFF,
        0x3F808000, 0x3F818000, 0x3F80FFFF, 0x3F807FFF, 0x7FFF8000, 0xFFFF8000, 0x00008000,
    ]  # fmt: skip
    return torch.tensor([w - (1 << 32) if w >= 1 << 31 else w for w in words], dtype=torch.int32).view(torch.float32)


def random_bits(n: int, dtype: torch.dtype, generator: torch.Generator) -> torch.Tensor:
    int_type = {4: torch.int32, 2: torch.int16}[torch.empty((), dtype=dtype).element_size()]
    info = torch.iinfo(int_type)
    return torch.randint(info.min, info.max + 1, (n,), dtype=int_type, generator=generator).view(dtype)


@pytest.mark.parametrize("pair", [p for p in DTYPE_PAIRS if p[0] == p[1] or p[0] == torch.bfloat16], ids=pair_id)
def test_swap_round_trip_bit_exact(pair, generator):
    param_dtype, ema_dtype = pair
    n = 1 << 20
    ema = random_bits(n, ema_dtype, generator)
    param = random_bits(n, param_dtype, generator)
    if ema_dtype == torch.float32:
        ema[: len(special_fp32())] = special_fp32()
    ema0, param0 = ema.clone(), param.clone()
    sema.ops.swap_(ema, param, backend="torch")
    if ema_dtype == param_dtype:
        assert_bits_equal(param, ema0, "swap_ gives the param the EMA")
        assert_bits_equal(ema, param0, "swap_ gives the EMA the param")
    else:
        # The param holds the EMA rounded half away from zero: hi16 + (lo16 >= 0x8000).
        word = ema0.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
        packed = ((word >> 16) + ((word & 0xFFFF) >= 0x8000)) & 0xFFFF
        expected = torch.where(packed >= 1 << 15, packed - (1 << 16), packed).to(torch.int16).view(torch.bfloat16)
        assert_bits_equal(param, expected, "swap_ packs the rounded EMA into the param")
    sema.ops.swap_(ema, param, restore=True, backend="torch")
    assert_bits_equal(ema, ema0, "swap_ then restore: EMA")
    assert_bits_equal(param, param0, "swap_ then restore: param")


def test_swap_rounding_is_within_half_ulp(generator):
    ema = random_values(4097, torch.float32, generator)
    param = random_values(4097, torch.bfloat16, generator)
    ema0 = ema.clone()
    sema.ops.swap_(ema, param, backend="torch")
    bound = 0.5 * 2.0**-7 * ema0.double().abs() * 2  # half a bf16 ulp, ulp <= 2 * eps * |x|
    assert_within(param, ema0.double(), bound, "swapped-in bf16 value")


def test_swap_refuses_fp16_with_fp32_ema():
    ema, param = torch.zeros(4), torch.zeros(4, dtype=torch.float16)
    with pytest.raises(TypeError, match="scratch"):
        sema.ops.swap_(ema, param)


# --- multi-tensor ----------------------------------------------------------------------------


def test_update_multi_matches_per_tensor(generator):
    shapes = [(3, 5), (0,), (7,), (2, 3, 4, 5), (1,)]
    dtypes = [torch.float32, torch.bfloat16, torch.float16]
    params = [
        random_values(int(torch.tensor(s).prod()), dtypes[i % 3], generator).view(s) for i, s in enumerate(shapes)
    ]
    params[3] = params[3].contiguous(memory_format=torch.channels_last)
    emas = [p.to(torch.float32, memory_format=torch.preserve_format) + 1 for p in params]
    expected = [e.clone() for e in emas]
    for e, p in zip(expected, params, strict=False):
        reference.ema_update_(sema.ops.dense_view(e), sema.ops.dense_view(p.clone()), 0.3, False)
    sema.ops.ema_update_multi_(emas, params, 0.3, backend="torch")
    for i, (e, x) in enumerate(zip(emas, expected, strict=False)):
        assert_bits_equal(e, x, f"tensor {i}")


# --- input checks ----------------------------------------------------------------------------


def bad_calls():
    ok_e, ok_p = torch.zeros(8), torch.zeros(8, dtype=torch.bfloat16)
    shared = torch.zeros(16)
    return [
        ("length", lambda: sema.ops.ema_update_(torch.zeros(8), torch.zeros(9), 0.1), ValueError, "elements"),
        ("2-D", lambda: sema.ops.ema_update_(torch.zeros(2, 4), torch.zeros(2, 4), 0.1), ValueError, "1-D"),
        ("strided", lambda: sema.ops.ema_update_(torch.zeros(16)[::2], torch.zeros(8), 0.1), ValueError, "contiguous"),
        ("fp64", lambda: sema.ops.ema_update_(ok_e, torch.zeros(8, dtype=torch.float64), 0.1), TypeError, "dtype"),
        ("ema bf16 param fp32", lambda: sema.ops.ema_update_(ok_p.clone(), ok_e, 0.1), TypeError, "EMA must be"),
        ("overlap", lambda: sema.ops.ema_update_(shared[:8], shared[4:12], 0.1), ValueError, "share memory"),
        ("w > 1", lambda: sema.ops.ema_update_(ok_e, ok_p, 1.5), ValueError, "outside"),
        ("w nan", lambda: sema.ops.ema_update_(ok_e, ok_p, float("nan")), ValueError, "outside"),
        ("w 1-d", lambda: sema.ops.ema_update_(ok_e, ok_p, torch.tensor([0.1])), ValueError, "0-d"),
        ("w str", lambda: sema.ops.ema_update_(ok_e, ok_p, "0.1"), TypeError, "float"),
        ("backend", lambda: sema.ops.ema_update_(ok_e, ok_p, 0.1, backend="nope"), ValueError, "unknown backend"),
        ("not tensor", lambda: sema.ops.switch_([0.0], ok_p), TypeError, "torch.Tensor"),
        ("multi lengths", lambda: sema.ops.ema_update_multi_([ok_e], [], 0.1), ValueError, "EMA tensors"),
    ]  # fmt: skip


@pytest.mark.parametrize("case", bad_calls(), ids=lambda c: c[0])
def test_bad_input_raises_before_writing(case):
    _, call, error, message = case
    with pytest.raises(error, match=message):
        call()


def test_bad_input_leaves_tensors_unchanged(generator):
    ema = random_values(8, torch.float32, generator)
    param = random_values(8, torch.bfloat16, generator)
    e0, p0 = ema.clone(), param.clone()
    with pytest.raises(ValueError):
        sema.ops.ema_update_(ema, param, 2.0, switch=True)
    assert_bits_equal(ema, e0, "ema after a refused call")
    assert_bits_equal(param, p0, "param after a refused call")


def test_env_var_picks_backend_and_unavailable_backend_says_why(monkeypatch):
    monkeypatch.setenv("SEMA_BACKEND", "torch")
    assert sema.ops.resolve_backend(None, torch.device("cpu")) == "torch"
    monkeypatch.setenv("SEMA_BACKEND", "cuda")
    with pytest.raises(sema.BackendUnavailableError, match=r"SEMA_BACKEND='cuda'.*not cpu"):
        sema.ops.resolve_backend(None, torch.device("cpu"))


def test_available_backends_reports_reasons():
    report = sema.available_backends("cpu")
    assert set(report) == {"torch", "triton", "cpp", "cuda"}
    assert report["torch"][0] is True
    for name, (ok, reason) in report.items():
        assert isinstance(ok, bool) and isinstance(reason, str) and reason, name
    assert report["cuda"] == (False, "serves cuda tensors, not cpu")


# --- the registered custom ops ---------------------------------------------------------------


@pytest.mark.parametrize("pair", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32)], ids=pair_id)
def test_custom_ops_pass_opcheck(pair, generator):
    param_dtype, ema_dtype = pair
    ema = random_values(33, ema_dtype, generator)
    param = random_values(33, param_dtype, generator)
    w = torch.tensor(0.25)
    torch.library.opcheck(torch.ops.sema.ema_update_.default, (ema, param, w, 0.0, "torch"))
    torch.library.opcheck(torch.ops.sema.ema_update_switch_.default, (ema, param, None, 0.25, "torch"))
    torch.library.opcheck(torch.ops.sema.switch_.default, (ema, param, "torch"))
    torch.library.opcheck(torch.ops.sema.swap_.default, (ema, param, False, "torch"))


def test_custom_op_matches_direct_call(generator):
    ema = random_values(4097, torch.float32, generator)
    param = random_values(4097, torch.bfloat16, generator)
    ema2, param2 = ema.clone(), param.clone()
    torch.ops.sema.ema_update_switch_(ema, param, torch.tensor(0.3), 0.0, "torch")
    sema.ops.ema_update_(ema2, param2, torch.tensor(0.3), switch=True, backend="torch")
    assert_bits_equal(ema, ema2, "custom op vs direct: ema")
    assert_bits_equal(param, param2, "custom op vs direct: param")

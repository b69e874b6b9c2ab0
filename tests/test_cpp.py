"""The ``cpp`` backend (sema._C on the CPU) against the reference backend and an fp64 computation.

Tolerances: the kernels round exactly as PyTorch does on the same machine, so the main check is
bit equality with the ``torch`` backend (NaN compared as NaN: its payload is not specified),
step after step; every step is also held to the fp64 bound of ``conftest.update_bound`` so that
a reference and a kernel wrong the same way still fail. The baseline (non-AVX2) kernels are
compared bit for bit with the same formula evaluated op by op in numpy float32.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch
from conftest import (
    BITS,
    DTYPE_PAIRS,
    assert_bits_equal,
    assert_same,
    assert_within,
    fp32_weight,
    pair_id,
    poisoned,
    random_bits,
    random_values,
    special_fp32,
    update_bound,
)

import sema
from sema import _extension, reference
from sema.cpu_threads import PLANNER

CPP_AVAILABLE, CPP_REASON = sema.available_backends("cpu")["cpp"]
pytestmark = pytest.mark.skipif(not CPP_AVAILABLE, reason=f"backend 'cpp' unavailable: {CPP_REASON}")

SIZES = [0, 1, 15, 17, 4097, 2**20 + 3]
WEIGHTS = [0.0, 1e-4, 0.5, 1.0]
STEPS = 50
BIG_STEPS = 3  # 2**20 + 3 elements (the parallel path): a few steps keep the module fast
SWAP_PAIRS = [pair for pair in DTYPE_PAIRS if pair != (torch.float16, torch.float32)]


@pytest.fixture(autouse=True)
def all_threads():
    """The kernels' parallel paths run on every call, whatever the machine's load (the thread
    planner has its own tests in test_contention.py)."""
    with PLANNER.all_threads():
        yield


def size_id(n: int) -> str:
    return f"n{n}"


def cpu_isa() -> str:
    return _extension.extension.cpu_isa()


def bitwise_like_torch() -> bool:
    """Whether the kernels in use round as this process's torch.lerp_ (fma on AVX2 and up)."""
    torch_uses_fma = torch.backends.cpu.get_cpu_capability() != "DEFAULT"
    return torch_uses_fma == (cpu_isa() == "avx2")


def cpp_update(ema: torch.Tensor, param: torch.Tensor, w: float | torch.Tensor, switch: bool) -> None:
    sema.ops.ema_update_(ema, param, w, switch=switch, backend="cpp")


def check_update_trajectory(
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
    """``steps`` updates with fresh random params, each compared with the reference backend
    (bit for bit) and with fp64 (bounded)."""
    ema = random_values(n, ema_dtype, generator)
    expected_ema = ema.clone()
    weight = torch.tensor(w, dtype=torch.float32) if w_as_tensor else w
    w64 = fp32_weight(w)
    for step in range(steps):
        param = random_values(n, param_dtype, generator)
        expected_param = param.clone()
        e64, p64 = ema.double(), param.double()
        update(ema, param, weight, switch)
        reference.ema_update_(expected_ema, expected_param, weight, switch)
        what = f"step {step}"
        if bitwise_like_torch():
            assert_same(ema, expected_ema, f"{what}: ema vs the torch backend")
            assert_same(param, expected_param, f"{what}: param vs the torch backend")
        exact = torch.lerp(e64, p64, w64)
        assert_within(ema, exact, update_bound(e64, p64, exact, ema_dtype), f"{what}: ema vs fp64")
        if switch:
            assert_same(param, ema.to(param_dtype), f"{what}: the switched param must be the cast EMA")
        else:
            assert_bits_equal(param, expected_param, f"{what}: param must not change without switch")
        expected_ema.copy_(ema)  # the next step starts from the same state on both sides


# --- updates ------------------------------------------------------------------------------


@pytest.mark.parametrize("switch", [False, True], ids=["update", "update_switch"])
@pytest.mark.parametrize("w_as_tensor", [False, True], ids=["w_float", "w_tensor"])
@pytest.mark.parametrize(
    ("n", "w"),
    # w = 0 and w = 1 take no size-dependent path: the big size runs with the two branches of the lerp
    [(n, w) for n in SIZES for w in WEIGHTS if n < 2**20 or w in (1e-4, 0.5)],
    ids=lambda v: f"n{v}" if isinstance(v, int) else f"w{v}",
)
@pytest.mark.parametrize("pair", DTYPE_PAIRS, ids=pair_id)
def test_update_matches_reference_and_fp64(pair, n, w, w_as_tensor, switch, generator):
    steps = STEPS if n < 2**20 else BIG_STEPS
    check_update_trajectory(cpp_update, *pair, n, w, w_as_tensor, switch, steps, generator)


@pytest.mark.parametrize("w", [1e-4, 0.3, 0.7, 1.0], ids=lambda w: f"w{w}")
@pytest.mark.parametrize("n", [17, 4097, 2**20 + 3], ids=size_id)
@pytest.mark.parametrize("pair", DTYPE_PAIRS, ids=pair_id)
def test_baseline_kernels_round_without_fma(pair, n, w, generator):
    """The baseline kernels compute base + coeff * (p - e) with a rounding per op (PyTorch's
    DEFAULT capability), the same in numpy float32; then the store rounds to nearest even."""
    param_dtype, ema_dtype = pair
    ema, param = random_values(n, ema_dtype, generator), random_values(n, param_dtype, generator)
    e32, p32 = ema.float().numpy(), param.float().numpy()
    weight = np.float32(w)
    coeff, base = (weight, e32) if weight < 0.5 else (weight - np.float32(1), p32)
    expected = torch.from_numpy(base + coeff * (p32 - e32)).to(ema_dtype)
    previous = _extension.extension.set_cpu_isa("baseline")
    try:
        sema.ops.ema_update_(ema, param, w, switch=True, backend="cpp")
    finally:
        _extension.extension.set_cpu_isa(previous)
    assert_same(ema, expected, "baseline ema vs numpy float32")
    assert_same(param, expected.to(param_dtype), "baseline switched param")


def test_thread_count_does_not_change_results(generator):
    n = 2**20 + 3
    ema, param = random_values(n, torch.float32, generator), random_values(n, torch.bfloat16, generator)
    results = []
    threads = torch.get_num_threads()
    try:
        for count in (1, 2, 3):
            torch.set_num_threads(count)
            e, p = ema.clone(), param.clone()
            sema.ops.ema_update_(e, p, 1e-3, switch=True, backend="cpp")
            results.append((e, p))
    finally:
        torch.set_num_threads(threads)
    for e, p in results[1:]:
        assert_bits_equal(e, results[0][0], "ema with another thread count")
        assert_bits_equal(p, results[0][1], "param with another thread count")


@pytest.mark.parametrize("switch", [False, True], ids=["update", "update_switch"])
def test_multi_matches_reference(switch, generator):
    """Pairs of several shapes and dtypes, some in a channels-last (dense, non-contiguous) layout."""
    pairs = [
        (torch.float32, torch.float32, (3, 5)),
        (torch.bfloat16, torch.float32, (4, 3, 2, 2)),
        (torch.float16, torch.float32, (0,)),
        (torch.bfloat16, torch.bfloat16, (70_000,)),
        (torch.float16, torch.float16, (2, 8, 3, 3)),
        (torch.float32, torch.float32, (1,)),
    ]
    emas, params = [], []
    for param_dtype, ema_dtype, shape in pairs:
        n = int(np.prod(shape))
        e, p = random_values(n, ema_dtype, generator).view(shape), random_values(n, param_dtype, generator).view(shape)
        if len(shape) == 4:
            e, p = e.to(memory_format=torch.channels_last), p.to(memory_format=torch.channels_last)
        emas.append(e)
        params.append(p)
    # The op is elementwise, so logical-order copies give the expected values in any layout.
    before = [
        (e.contiguous().view(-1).clone(), p.contiguous().view(-1).clone()) for e, p in zip(emas, params, strict=True)
    ]
    w = torch.tensor(3e-3)
    sema.ops.ema_update_multi_(emas, params, w, switch=switch, backend="cpp")
    for i, (e, p) in enumerate(before):
        e64, p64 = e.double(), p.double()
        exact = torch.lerp(e64, p64, fp32_weight(3e-3))
        reference.ema_update_(e, p, w, switch)
        actual_e, actual_p = emas[i].contiguous().view(-1), params[i].contiguous().view(-1)
        assert_within(actual_e, exact, update_bound(e64, p64, exact, e.dtype), f"multi pair {i} ema vs fp64")
        if bitwise_like_torch():
            assert_same(actual_e, e, f"multi pair {i} ema vs the torch backend")
        assert_same(actual_p, actual_e.to(p.dtype) if switch else p, f"multi pair {i} param")


# --- casts --------------------------------------------------------------------------------


@pytest.mark.parametrize("isa", ["avx2", "baseline"])
@pytest.mark.parametrize("param_dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_switch_cast_bit_equal_to_torch(param_dtype, isa, generator):
    if isa not in _extension.build_info()["cpu_kernels"]:
        pytest.skip(f"sema._C has no {isa} kernels on this machine")
    source = special_fp32(generator)
    for n in (source.numel(), 37):  # the vector loop and the scalar remainder
        ema = source[:n].clone()
        param = poisoned(n, param_dtype)
        previous = _extension.extension.set_cpu_isa(isa)
        try:
            sema.ops.switch_(ema, param, backend="cpp")
        finally:
            _extension.extension.set_cpu_isa(previous)
        assert_same(param, ema.to(param_dtype), f"{isa} cast of {n} fp32 values to {param_dtype}")


@pytest.mark.parametrize("pair", DTYPE_PAIRS, ids=pair_id)
def test_large_switch_streams_every_element(pair, generator):
    """Destinations of 16 MiB and more take the non-temporal store path (csrc/ema_cpu.cpp,
    kStreamMinBytes): unaligned starts, both threads' ranges and the tail all land."""
    param_dtype, ema_dtype = pair
    n = (16 << 20) // torch.empty((), dtype=param_dtype).element_size() + 37
    if ema_dtype == param_dtype:  # a raw copy: random bits, signalling NaNs where the unaligned heads start
        source = random_bits(n + 3, ema_dtype, generator)
        int_type = BITS[source.element_size()]
        snans = [0x7F800001, -8388607] if int_type == torch.int32 else [0x7F81, -127, 0x7C01, -1023]  # +-sNaN
        source.view(int_type)[:16] = torch.tensor(snans * (16 // len(snans)), dtype=int_type)
    else:
        source = special_fp32(generator).repeat(n // 2**20 + 2)[: n + 3]
    for start in (0, 1, 3):  # 16-byte aligned, and not
        ema = source[start:n]
        buffer = torch.full((n + 8,), -7.0, dtype=param_dtype)  # guards before and after the view
        param = buffer[start:n]
        sema.ops.switch_(ema, param, backend="cpp")
        expected = ema.to(param_dtype, copy=True)
        if ema_dtype == param_dtype:
            assert_bits_equal(param, expected, f"copy of {ema.numel()} from offset {start}")
        else:
            assert_same(param, expected, f"cast of {ema.numel()} from offset {start}")
        assert_bits_equal(buffer[:start], torch.full((start,), -7.0, dtype=param_dtype), "before the view")
        assert_bits_equal(buffer[n:], torch.full((8,), -7.0, dtype=param_dtype), "after the view")


@pytest.mark.parametrize("n", [4099, 2**16 + 5], ids=size_id)  # one thread, two
@pytest.mark.parametrize("pair", DTYPE_PAIRS, ids=pair_id)
def test_update_on_offset_views_stays_inside(pair, n, generator):
    """The 8-lane loops and scalar tails on views that start 0-3 elements into their buffers, ema
    and param misaligned against each other: every element as the reference has it, nothing
    before or after the views written."""
    param_dtype, ema_dtype = pair
    for ema_offset, param_offset in ((0, 0), (1, 0), (0, 3), (3, 1)):
        for switch in (False, True):
            ema_buffer = torch.full((n + 8,), -7.0, dtype=ema_dtype)
            param_buffer = torch.full((n + 8,), -7.0, dtype=param_dtype)
            ema = ema_buffer[ema_offset : ema_offset + n]
            param = param_buffer[param_offset : param_offset + n]
            ema.copy_(random_values(n, ema_dtype, generator))
            param.copy_(random_values(n, param_dtype, generator))
            expected_ema, expected_param = ema.clone(), param.clone()
            reference.ema_update_(expected_ema, expected_param, 0.3, switch)
            sema.ops.ema_update_(ema, param, 0.3, switch=switch, backend="cpp")
            what = f"offsets {ema_offset}/{param_offset}, switch={switch}"
            if bitwise_like_torch():
                assert_same(ema, expected_ema, f"{what}: ema")
            assert_same(param, ema.to(param_dtype) if switch else expected_param, f"{what}: param")
            for buffer, offset in ((ema_buffer, ema_offset), (param_buffer, param_offset)):
                guard = torch.full((n + 8,), -7.0, dtype=buffer.dtype)
                assert_bits_equal(buffer[:offset], guard[:offset], f"{what}: before the view")
                assert_bits_equal(buffer[offset + n :], guard[offset + n :], f"{what}: after the view")


@pytest.mark.parametrize("pair", DTYPE_PAIRS, ids=pair_id)
def test_switch_matches_reference(pair, generator):
    param_dtype, ema_dtype = pair
    for n in SIZES:
        ema = random_values(n, ema_dtype, generator)
        param = poisoned(n, param_dtype)
        sema.ops.switch_(ema, param, backend="cpp")
        expected = poisoned(n, param_dtype)
        reference.switch_(ema, expected)
        assert_same(param, expected, f"switch_ n={n}")


@pytest.mark.parametrize("param_dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_widening_loads_are_exact(param_dtype, generator):
    """Every finite 16-bit value, widened to fp32 by the update with w = 1 (ema <- param)."""
    bits = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16)
    param = bits.view(param_dtype)
    param = param[torch.isfinite(param)].clone()
    ema = torch.zeros(param.numel())  # lerp(+0, p, 1) = p + 0 * (p - 0) keeps the sign of p = -0
    sema.ops.ema_update_(ema, param, 1.0, backend="cpp")
    assert_bits_equal(ema, param.float(), f"{param_dtype} -> fp32")


# --- swaps --------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [*SIZES[:-1], 2**20 + 3], ids=size_id)
@pytest.mark.parametrize("pair", SWAP_PAIRS, ids=pair_id)
def test_swap_bit_exact_and_restores(pair, n, generator):
    param_dtype, ema_dtype = pair
    ema, param = random_bits(n, ema_dtype, generator), random_bits(n, param_dtype, generator)
    original_ema, original_param = ema.clone(), param.clone()
    expected_ema, expected_param = ema.clone(), param.clone()
    sema.ops.swap_(ema, param, backend="cpp")
    reference.swap_(expected_ema, expected_param)
    assert_bits_equal(ema, expected_ema, "swapped ema vs the torch backend")
    assert_bits_equal(param, expected_param, "swapped param vs the torch backend")
    if ema_dtype != param_dtype:
        # the param slot holds the EMA rounded half away from zero (DESIGN.md)
        finite = torch.isfinite(original_ema) & torch.isfinite(param.float())
        assert_within(
            param.float()[finite],
            original_ema.double()[finite],
            original_ema.double()[finite].abs() * 2.0**-8 + 2.0**-133,  # relative, or a bf16 subnormal
            "packed param vs the EMA",
        )
    sema.ops.swap_(ema, param, restore=True, backend="cpp")
    assert_bits_equal(ema, original_ema, "ema after swap + restore")
    assert_bits_equal(param, original_param, "param after swap + restore")


def test_swap_refuses_fp16_params_with_fp32_ema():
    ema, param = torch.zeros(8), torch.zeros(8, dtype=torch.float16)
    with pytest.raises(TypeError, match="lossless"):
        sema.ops.swap_(ema, param, backend="cpp")
    with pytest.raises(TypeError, match="lossless"):
        sema._ext_cpu.swap_(ema, param)
    with pytest.raises(ValueError, match="lossless"):
        _extension.extension.cpu_swap(ema.data_ptr(), param.data_ptr(), 8, 0, 2, False, 1)


# --- negative controls: the checkers above must reject wrong kernels ----------------------


def truncating_update(ema, param, w, switch):
    """The right fp32 lerp, stored to bf16 by truncation instead of rounding to nearest even."""
    wide = ema.float()
    sema.ops.ema_update_(wide, param.float(), w, backend="cpp")
    ema.view(torch.int16).copy_((wide.view(torch.int32) >> 16).to(torch.int16))
    if switch:
        param.copy_(ema)


def tail_skipping_update(ema, param, w, switch):
    """Right everywhere but the last element, which a vector loop without a remainder skips."""
    if ema.numel() > 1:
        sema.ops.ema_update_(ema[:-1], param[:-1], w, switch=switch, backend="cpp")


def fma_mismatched_update(ema, param, w, switch):
    """The other rounding of the lerp (fma vs separate ops): within fp64 bounds, yet not torch's."""
    previous = _extension.extension.set_cpu_isa("baseline" if cpu_isa() == "avx2" else "avx2")
    try:
        sema.ops.ema_update_(ema, param, w, switch=switch, backend="cpp")
    finally:
        _extension.extension.set_cpu_isa(previous)


@pytest.mark.parametrize(
    ("wrong", "pair"),
    [
        (truncating_update, (torch.bfloat16, torch.bfloat16)),
        (tail_skipping_update, (torch.float32, torch.float32)),
        (fma_mismatched_update, (torch.float32, torch.float32)),
    ],
    ids=["truncating_store", "skipped_tail", "other_rounding"],
)
def test_checker_rejects_wrong_kernels(wrong, pair, generator):
    if wrong is fma_mismatched_update and len(_extension.build_info()["cpu_kernels"]) < 2:
        pytest.skip("one CPU kernel variant only: no other rounding to compare with")
    if wrong is fma_mismatched_update and not bitwise_like_torch():
        pytest.skip("the kernels in use do not round as torch here, so only the fp64 bound is checked")
    with pytest.raises(AssertionError):
        check_update_trajectory(wrong, *pair, 4097, 0.3, False, False, 3, generator)


# --- input checks: raised in Python, before any pointer reaches C++ -----------------------


class _Untouchable:
    def __getattr__(self, name):
        raise AssertionError(f"sema._C.{name} was reached with bad input")


def _shared_buffer(first: slice, second: slice) -> tuple[torch.Tensor, torch.Tensor]:
    buffer = torch.zeros(64)
    return buffer[first], buffer[second]


# name -> (ema, param) factory, the exception expected
BAD_INPUTS = {
    "int_dtype": (lambda: (torch.zeros(16, dtype=torch.int32), torch.zeros(16, dtype=torch.int32)), TypeError),
    "fp64": (lambda: (torch.zeros(16, dtype=torch.float64), torch.zeros(16, dtype=torch.float64)), TypeError),
    "bf16_ema_fp16_param": (
        lambda: (torch.zeros(16, dtype=torch.bfloat16), torch.zeros(16, dtype=torch.float16)),
        TypeError,
    ),
    "length": (lambda: (torch.zeros(16), torch.zeros(15)), ValueError),
    "overlap": (lambda: _shared_buffer(slice(0, 32), slice(16, 48)), ValueError),
    "same_buffer": (lambda: _shared_buffer(slice(0, 16), slice(0, 16)), ValueError),
    "non_contiguous": (lambda: (torch.zeros(32)[::2], torch.zeros(16)), ValueError),
    "2d": (lambda: (torch.zeros(4, 4), torch.zeros(4, 4)), ValueError),
    "meta_device": (lambda: (torch.zeros(16, device="meta"), torch.zeros(16, device="meta")), ValueError),
    "param_on_meta": (lambda: (torch.zeros(16), torch.zeros(16, device="meta")), ValueError),
    "sparse": (lambda: (torch.zeros(16).to_sparse(), torch.zeros(16)), ValueError),
    "not_a_tensor": (lambda: (np.zeros(16, dtype=np.float32), torch.zeros(16)), TypeError),
}

OPS = {
    "ema_update_": lambda backend, ema, param: backend.ema_update_(ema, param, 0.1),
    "switch_": lambda backend, ema, param: backend.switch_(ema, param),
    "swap_": lambda backend, ema, param: backend.swap_(ema, param),
    "ema_update_multi_": lambda backend, ema, param: backend.ema_update_multi_([ema], [param], 0.1),
}


@pytest.mark.parametrize(
    ("op", "case"),
    [
        (op, case)
        for op in OPS
        for case in BAD_INPUTS
        if not (op == "ema_update_multi_" and case in ("2d", "non_contiguous"))  # any dense shape is fine there
    ],
)
def test_bad_input_raises_before_cpp(op, case, monkeypatch):
    from sema import _ext_cpu

    make, error = BAD_INPUTS[case]
    ema, param = make()
    monkeypatch.setattr(_ext_cpu, "_C", _Untouchable())
    with pytest.raises(error):
        OPS[op](_ext_cpu, ema, param)


def test_bad_weight_and_lists_raise_before_cpp(monkeypatch):
    from sema import _ext_cpu

    monkeypatch.setattr(_ext_cpu, "_C", _Untouchable())
    with pytest.raises(ValueError, match="w as a tensor"):
        _ext_cpu.ema_update_(torch.zeros(4), torch.zeros(4), torch.zeros(2))
    with pytest.raises(ValueError, match="w as a tensor"):
        _ext_cpu.ema_update_(torch.zeros(4), torch.zeros(4), torch.zeros((), device="meta"))
    strided = torch.zeros(8, 8)[:, ::2]
    with pytest.raises(ValueError, match="not dense"):
        _ext_cpu.ema_update_multi_([strided], [torch.zeros(8, 8)[:, ::2]], 0.1)
    shared = torch.zeros(64)
    with pytest.raises(ValueError, match="share memory"):
        _ext_cpu.ema_update_multi_([shared[:16], shared[16:32]], [torch.zeros(16), shared[8:24]], 0.1)
    with pytest.raises(ValueError, match="EMA tensors"):
        _ext_cpu.ema_update_multi_([torch.zeros(4)], [], 0.1)


# name -> arguments (ema_ptr, param_ptr, numel, ema_dtype, param_dtype) relative to a 16-element
# fp32 ema ``e`` and bf16 param ``p``
RAW_BAD_ARGUMENTS = {
    "negative_numel": lambda e, p: (e, p, -1, 0, 1),
    "null_pointer": lambda e, p: (0, p, 16, 0, 1),
    "misaligned_ema": lambda e, p: (e + 2, p, 8, 0, 1),
    "misaligned_param": lambda e, p: (e, p + 1, 8, 0, 1),
    "bad_dtype_code": lambda e, p: (e, p, 16, 0, 7),
    "bf16_ema_fp32_param": lambda e, p: (p, e, 16, 1, 0),
    "overlap": lambda e, p: (e, e + 16, 8, 0, 1),
    "wrapping_range": lambda e, p: (2**64 - 16, p, 16, 0, 1),
}


@pytest.mark.parametrize("case", RAW_BAD_ARGUMENTS)
def test_cpp_checks_raw_arguments(case):
    """The C++ side rejects what would be a wrong memory access, whatever Python passes."""
    e, p = torch.zeros(16), torch.zeros(16, dtype=torch.bfloat16)
    args = RAW_BAD_ARGUMENTS[case](e.data_ptr(), p.data_ptr())
    with pytest.raises(ValueError, match=r"sema\._C\.cpu_ema_update: "):
        _extension.extension.cpu_ema_update(*args, 0.5, True, 1)
    assert e.abs().sum() == 0 and p.float().abs().sum() == 0, "a rejected call wrote memory"


def test_cpp_checks_threads_lists_and_isa():
    c = _extension.extension
    e, p = torch.zeros(16), torch.zeros(16, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="num_threads"):
        c.cpu_ema_update(e.data_ptr(), p.data_ptr(), 16, 0, 1, 0.5, False, 0)
    with pytest.raises(ValueError, match="one entry per tensor pair"):
        c.cpu_ema_update_multi([e.data_ptr()], [], [16], [0], [1], 0.5, False, 1)
    with pytest.raises(ValueError, match="unknown instruction set"):
        c.set_cpu_isa("avx512")


# --- build and availability ---------------------------------------------------------------


def test_availability_reports_the_build():
    ok, reason = sema.available_backends("cpu")["cpp"]
    info = _extension.build_info()
    assert ok
    assert info["interface_version"] == _extension.INTERFACE_VERSION
    assert info["version"] in reason and info["compiler"] in reason and info["cpu_isa"] in reason
    assert info["cpu_isa"] in info["cpu_kernels"]
    from sema import _ext_cpu

    assert _ext_cpu.availability("cuda") == (False, "serves CPU tensors, not cuda")

"""The K-EMA op of the ``cpp`` backend (sema._C on the CPU): K EMAs of one param in one pass.

The contract (/tmp/sema-team/KEMA.md, issue #14 section 2): per element and per k, exactly the
single op ``ema_update_(emas[k], param, ws[k])``; with ``switch_index = s``, then
``switch_(emas[s], param)``. So the oracle here is K separate cpp single updates (bit-equal to
``torch.lerp_`` already, test_cpp.py), compared bit for bit, NaN payloads included, step after
step; and, where the kernels round as this process's torch.lerp_, the reference backend's single
ops (NaN compared as NaN). The CUDA kernels of the same op are checked in test_cuda_emulated.py
(on the host) and test_cuda_ext.py (on a GPU).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pytest
import torch
from conftest import DTYPE_PAIRS, assert_bits_equal, assert_same, pair_id, random_bits, random_values
from torch import Tensor

import sema
from sema import _ext_cpu, _extension, reference
from sema.cpu_threads import PLANNER

CPP_AVAILABLE, CPP_REASON = sema.available_backends("cpu")["cpp"]
pytestmark = pytest.mark.skipif(not CPP_AVAILABLE, reason=f"backend 'cpp' unavailable: {CPP_REASON}")

# 2047-2049: the kernel's param blocks of 2048; 2**16 + 5: two threads at least; 2**20 + 3: all
SIZES = [0, 1, 17, 2047, 2049, 4097, 2**16 + 5, 2**20 + 3]
K_COUNTS = [1, 2, 3, 8]
STEPS = 4
BIG_STEPS = 2

KUpdate = Callable[[Sequence[Tensor], Tensor, Tensor, "int | None"], None]


@pytest.fixture(autouse=True)
def all_threads():
    """The parallel paths run on every call, whatever the machine's load (test_contention.py
    has the planner's own tests)."""
    with PLANNER.all_threads():
        yield


def isas() -> list[str]:
    return list(_extension.build_info().get("cpu_kernels", ())) if CPP_AVAILABLE else []


@pytest.fixture(params=isas() or ["none"])
def isa(request):
    """Both instruction sets the build has: AVX2 (fma) and baseline (no fma) kernels."""
    previous = _extension.extension.set_cpu_isa(request.param)
    try:
        yield request.param
    finally:
        _extension.extension.set_cpu_isa(previous)


def bitwise_like_torch() -> bool:
    torch_uses_fma = torch.backends.cpu.get_cpu_capability() != "DEFAULT"
    return torch_uses_fma == (_extension.extension.cpu_isa() == "avx2")


def k_weights(k: int, generator: torch.Generator) -> Tensor:
    """K fp32 weights: the edge weights 0, 1, 0.5 and 1e-4 among random ones."""
    edges = torch.tensor([0.0, 1.0, 0.5, 1e-4])
    ws = torch.rand(k, generator=generator)
    picks = torch.randperm(k, generator=generator)[: min(k, 2)]
    ws[picks] = edges[torch.randint(0, 4, (picks.numel(),), generator=generator)]
    return ws


def k_single_updates(emas: Sequence[Tensor], param: Tensor, ws: Tensor, switch_index: int | None) -> None:
    """The contract's definition, on the same backend: K single updates, then the switch."""
    for k, ema in enumerate(emas):
        _ext_cpu.ema_update_(ema, param, ws[k].clone())
    if switch_index is not None:
        _ext_cpu.switch_(emas[switch_index], param)


def check_k_update(
    update_k: KUpdate,
    emas: list[Tensor],
    param: Tensor,
    ws: Tensor,
    switch_index: int | None,
    what: str,
) -> None:
    """Runs ``update_k`` and K single updates on copies; fails unless every EMA and the param are
    bit for bit equal (and, where the kernels round as torch does, equal to the reference's single
    ops, NaN as NaN)."""
    expected, expected_param = [e.clone() for e in emas], param.clone()
    torch_emas, torch_param = [e.clone() for e in emas], param.clone()
    update_k(emas, param, ws, switch_index)
    k_single_updates(expected, expected_param, ws, switch_index)
    for k in range(len(emas)):
        assert_bits_equal(emas[k], expected[k], f"{what}: EMA {k}")
    assert_bits_equal(param, expected_param, f"{what}: param")
    if bitwise_like_torch():
        for k, ema in enumerate(torch_emas):
            reference.ema_update_(ema, torch_param, ws[k].clone())
        if switch_index is not None:
            reference.switch_(torch_emas[switch_index], torch_param)
        for k in range(len(emas)):
            assert_same(emas[k], torch_emas[k], f"{what}: EMA {k} vs the reference")
        assert_same(param, torch_param, f"{what}: param vs the reference")


def switch_cycle(k: int) -> list[int | None]:
    return [None, 0, k - 1]


# --- flat -------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", SIZES, ids=lambda n: f"n{n}")
@pytest.mark.parametrize("k", K_COUNTS, ids=lambda k: f"K{k}")
@pytest.mark.parametrize("pair", DTYPE_PAIRS, ids=pair_id)
def test_k_update_bit_equal_to_k_single_updates(pair, k, n, generator):
    """Many steps, a fresh param each, switch_index cycling None, 0, K-1."""
    check_trajectory(pair, k, n, _extension.extension.cpu_isa(), generator)


@pytest.mark.parametrize("n", [17, 4097, 2**16 + 5], ids=lambda n: f"n{n}")
@pytest.mark.parametrize("pair", DTYPE_PAIRS, ids=pair_id)
def test_k_update_every_instruction_set(isa, pair, n, generator):
    check_trajectory(pair, 3, n, isa, generator)


def check_trajectory(pair: tuple[torch.dtype, torch.dtype], k: int, n: int, isa: str, generator) -> None:
    param_dtype, ema_dtype = pair
    emas = [random_values(n, ema_dtype, generator) for _ in range(k)]
    for step in range(STEPS if n < 2**20 else BIG_STEPS):
        switch_index = switch_cycle(k)[step % 3]
        param = random_values(n, param_dtype, generator)
        ws = k_weights(k, generator)
        what = f"{isa}, step {step}, switch_index {switch_index}, ws {ws.tolist()}"
        check_k_update(_ext_cpu.ema_update_k_, emas, param, ws, switch_index, what)


@pytest.mark.parametrize("k", [2, 8], ids=lambda k: f"K{k}")
@pytest.mark.parametrize("pair", DTYPE_PAIRS, ids=pair_id)
def test_k_update_nonfinite_bits(isa, pair, k, generator):
    """Random bit patterns (NaN payloads, Inf, -0, subnormals) in the EMAs and the param."""
    param_dtype, ema_dtype = pair
    n = 2**16 + 5
    emas = [random_bits(n, ema_dtype, generator) for _ in range(k)]
    param = random_bits(n, param_dtype, generator)
    check_k_update(_ext_cpu.ema_update_k_, emas, param, k_weights(k, generator), k - 1, isa)


@pytest.mark.parametrize("n", [1, 17, 2049, 2**20 + 3], ids=lambda n: f"n{n}")
@pytest.mark.parametrize("pair", DTYPE_PAIRS, ids=pair_id)
def test_every_element_written(pair, n, generator):
    """Every weight 1: each EMA must become the param, element for element (an element a kernel
    skipped keeps its old value: random, not the param's; NaN would not do, lerp(NaN, p, 1) is
    NaN), and the param switched to one of them is unchanged."""
    param_dtype, ema_dtype = pair
    param = random_values(n, param_dtype, generator)
    before = param.clone()
    emas = [random_values(n, ema_dtype, generator) for _ in range(3)]
    _ext_cpu.ema_update_k_(emas, param, torch.ones(3), 1)
    for k, ema in enumerate(emas):
        assert_bits_equal(ema, before.to(ema_dtype), f"EMA {k}")
    assert_bits_equal(param, before, "param switched to an EMA equal to it")


@pytest.mark.parametrize("pair", DTYPE_PAIRS, ids=pair_id)
def test_k_update_unaligned_views(pair, generator):
    """EMA and param views starting 1-3 elements in; the bytes around each view stay."""
    param_dtype, ema_dtype = pair
    n, k = 3 * 2048 + 77, 3
    for offsets in ([0, 1, 0, 0], [0, 0, 0, 3], [2, 0, 0, 0], [1, 2, 3, 1]):  # (param, EMA 0, 1, 2)
        buffers = [random_values(n + 4, ema_dtype, generator) for _ in range(k)]
        param_buffer = random_values(n + 4, param_dtype, generator)
        saved = [b.clone() for b in [param_buffer, *buffers]]
        emas = [b[o : o + n] for b, o in zip(buffers, offsets[1:], strict=True)]
        param = param_buffer[offsets[0] : offsets[0] + n]
        check_k_update(_ext_cpu.ema_update_k_, emas, param, k_weights(k, generator), 2, f"offsets {offsets}")
        for buffer, old, offset in zip([param_buffer, *buffers], saved, offsets, strict=True):
            assert_bits_equal(buffer[:offset], old[:offset], f"offsets {offsets}: bytes before a view")
            assert_bits_equal(buffer[offset + n :], old[offset + n :], f"offsets {offsets}: bytes after a view")


def test_any_number_of_emas_in_one_pass(generator):
    """The CPU has no 8-EMA limit: K = 11, switching the 10th."""
    n, k = 4097, 11
    emas = [random_values(n, torch.float32, generator) for _ in range(k)]
    param = random_values(n, torch.bfloat16, generator)
    check_k_update(_ext_cpu.ema_update_k_, emas, param, k_weights(k, generator), 9, "K=11")


def test_thread_count_does_not_change_results(generator):
    n, k = 2**18 + 7, 3
    emas = [random_values(n, torch.float32, generator) for _ in range(k)]
    param = random_values(n, torch.bfloat16, generator)
    ws = k_weights(k, generator)
    results = []
    for threads in (1, 2, 3):
        e, p = [x.clone() for x in emas], param.clone()
        _extension.extension.cpu_ema_update_k([x.data_ptr() for x in e], p.data_ptr(), n, 0, 1, ws.tolist(), 1, threads)
        results.append((e, p))
    for threads, (e, p) in zip((2, 3), results[1:], strict=True):
        for k in range(3):
            assert_bits_equal(e[k], results[0][0][k], f"{threads} threads: EMA {k}")
        assert_bits_equal(p, results[0][1], f"{threads} threads: param")


# --- multi-tensor -----------------------------------------------------------------------------


@pytest.mark.parametrize("switch_index", [None, 0, 2], ids=lambda s: f"switch{s}")
def test_k_multi_bit_equal_to_k_single_updates(switch_index, generator):
    """40 tensors of mixed dtype pairs, shapes and sizes (0 included), K = 3, several steps."""
    k = 3
    shapes = [(i * 7919 % 3000,) if i % 3 else (i % 7 + 1, i * 31 % 50) for i in range(40)]
    shapes[5] = (0,)
    emas: list[list[Tensor]] = [[] for _ in range(k)]
    params = []
    for i, shape in enumerate(shapes):
        param_dtype, ema_dtype = DTYPE_PAIRS[i % len(DTYPE_PAIRS)]
        n = int(torch.tensor(shape).prod())
        for row in emas:
            row.append(random_values(n, ema_dtype, generator).view(shape))
        params.append(random_values(n, param_dtype, generator).view(shape))
    for step in range(4):
        ws = k_weights(k, generator)
        expected = [[e.clone() for e in row] for row in emas]
        expected_params = [p.clone() for p in params]
        _ext_cpu.ema_update_k_multi_(emas, params, ws, switch_index)
        for i in range(len(params)):
            k_single_updates([row[i].view(-1) for row in expected], expected_params[i].view(-1), ws, switch_index)
            for j in range(k):
                assert_bits_equal(emas[j][i], expected[j][i], f"step {step}: tensor {i}, EMA {j}")
            assert_bits_equal(params[i], expected_params[i], f"step {step}: tensor {i}, param")


# --- negative controls ------------------------------------------------------------------------


def reads_param_after_the_switch(emas, param, ws, switch_index):
    """Switches while updating, so that the EMAs after it read the new param."""
    for k, ema in enumerate(emas):
        _ext_cpu.ema_update_(ema, param, ws[k].clone(), switch=k == switch_index)


def first_weight_for_all(emas, param, ws, switch_index):
    _ext_cpu.ema_update_k_(emas, param, ws[:1].expand(len(emas)).contiguous(), switch_index)


def misses_the_last_element(emas, param, ws, switch_index):
    _ext_cpu.ema_update_k_([e[:-1] for e in emas], param[:-1], ws, switch_index)


def switches_the_old_ema(emas, param, ws, switch_index):
    if switch_index is not None:
        _ext_cpu.switch_(emas[switch_index], param)
    _ext_cpu.ema_update_k_(emas, param.clone(), ws, None)


@pytest.mark.parametrize(
    "wrong", [reads_param_after_the_switch, first_weight_for_all, misses_the_last_element, switches_the_old_ema]
)
def test_checker_rejects_wrong_k_updates(wrong, generator):
    n, k = 4097, 3
    emas = [random_values(n, torch.float32, generator) for _ in range(k)]
    param = random_values(n, torch.bfloat16, generator)
    ws = torch.tensor([0.3, 0.01, 0.7])
    with pytest.raises(AssertionError):
        check_k_update(wrong, emas, param, ws, 0, wrong.__name__)


# --- bad input --------------------------------------------------------------------------------


def test_bad_input_raises_before_cpp(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("reached C++")

    monkeypatch.setattr(_extension.extension, "cpu_ema_update_k", fail, raising=False)
    monkeypatch.setattr(_ext_cpu, "_C", type("C", (), {"cpu_ema_update_k": fail, "cpu_ema_update_k_multi": fail}))
    e0, e1, p = torch.zeros(8), torch.zeros(8), torch.zeros(8)
    cases = [
        (([], p, torch.zeros(0), None), ValueError, "no EMAs"),
        (([e0, e1], p, torch.zeros(3), None), ValueError, "ws must be a 1-D contiguous float32 tensor of 2"),
        (([e0, e1], p, torch.zeros(2, dtype=torch.float64), None), ValueError, "float32 tensor of 2"),
        (([e0, e1], p, torch.zeros(2), 2), ValueError, r"switch_index must be None or an int in \[0, 2\)"),
        (([e0, e1], p, torch.zeros(2), True), ValueError, "switch_index"),
        (([e0, e0], p, torch.zeros(2), None), ValueError, "share memory"),
        (([e0, torch.zeros(8, dtype=torch.bfloat16)], p.bfloat16(), torch.zeros(2), None), TypeError, "one dtype"),
        (([e0, torch.zeros(7)], p, torch.zeros(2), None), ValueError, "elements"),
    ]
    for args, error, message in cases:
        with pytest.raises(error, match=message):
            _ext_cpu.ema_update_k_(*args)
    with pytest.raises(ValueError, match="share memory"):
        _ext_cpu.ema_update_k_multi_([[e0], [e1]], [e0], torch.zeros(2), None)
    with pytest.raises(ValueError, match="switch_index"):
        _ext_cpu.ema_update_k_multi_([[e0], [e1]], [p], torch.zeros(2), -1)


def test_cpp_checks_raw_arguments():
    """sema._C checks what protects memory itself, whoever calls it."""
    c = _extension.extension
    e0, e1, p = torch.zeros(8), torch.zeros(8), torch.zeros(8)
    args = ([e0.data_ptr(), e1.data_ptr()], p.data_ptr(), 8, 0, 0, [0.5, 0.5], -1, 1)
    c.cpu_ema_update_k(*args)
    bad = [
        ({0: [e0.data_ptr(), e0.data_ptr()]}, "EMAs 0 and 1 share memory"),
        ({0: []}, "no EMAs"),
        ({0: [e0.data_ptr(), 0]}, "null pointer"),
        ({5: [0.5]}, "1 weights for 2 EMAs"),
        ({6: 2}, r"switch_index 2 is outside \[-1, 2\)"),
        ({7: 0}, "num_threads 0"),
        ({3: 1}, "does not fit"),
    ]
    for change, message in bad:
        changed = [change.get(i, a) for i, a in enumerate(args)]
        with pytest.raises(ValueError, match=message):
            c.cpu_ema_update_k(*changed)
    with pytest.raises(ValueError, match="every EMA list must have one entry per tensor"):
        c.cpu_ema_update_k_multi([[e0.data_ptr()], []], [p.data_ptr()], [8], [0], [0], [0.5, 0.5], -1, 1)

"""The ``cuda`` backend (sema._C's CUDA kernels) against the reference backend on CUDA tensors
and an fp64 computation, and what the build embeds (cubins for sm_80 and sm_90, PTX).

Tolerances as in test_cpp.py: bit equality with the ``torch`` backend on the same device (the
kernels compute the fma that nvcc makes of PyTorch's lerp, and round casts to nearest even with
the same intrinsics; a NaN only has to be a NaN), and the fp64 bound of ``conftest.update_bound``
at every step. The kernel tests skip without a GPU; the build and input-check tests run anywhere.
"""

from __future__ import annotations

import shutil
import struct
import subprocess

import pytest
import torch
from conftest import (
    DTYPE_PAIRS,
    assert_bits_equal,
    assert_same,
    assert_within,
    fp32_weight,
    pair_id,
    poisoned,
    random_bits,
    random_values,
    update_bound,
)

import sema
from sema import _ext_cuda, _extension, ops, reference

CUDA_AVAILABLE, CUDA_REASON = sema.available_backends("cuda")["cuda"]
SIZES = [0, 1, 15, 17, 4097, 8193, 2**20 + 3, 2**24 + 5]  # tiles of 2048-8192 elements
WEIGHTS = [0.0, 1e-4, 0.5, 1.0]
STEPS = 50
BIG_STEPS = 5
SWAP_PAIRS = [pair for pair in DTYPE_PAIRS if pair != (torch.float16, torch.float32)]
REQUIRED_CUBINS = ("sm_80", "sm_90")


def needs_cuda(test):
    """Marks a kernel test ``cuda`` and skips it, with the reason, where the backend is unavailable."""
    skip = pytest.mark.skipif(not CUDA_AVAILABLE, reason=f"backend 'cuda' unavailable: {CUDA_REASON}")
    return pytest.mark.cuda(skip(test))


def size_id(n: int) -> str:
    return f"n{n}"


def on_gpu(n: int, dtype: torch.dtype, generator: torch.Generator) -> torch.Tensor:
    return random_values(n, dtype, generator).cuda()


# --- updates ------------------------------------------------------------------------------


@needs_cuda
@pytest.mark.parametrize("switch", [False, True], ids=["update", "update_switch"])
@pytest.mark.parametrize("w_as_tensor", [False, True], ids=["w_float", "w_tensor"])
@pytest.mark.parametrize("w", WEIGHTS, ids=lambda w: f"w{w}")
@pytest.mark.parametrize("n", SIZES, ids=size_id)
@pytest.mark.parametrize("pair", DTYPE_PAIRS, ids=pair_id)
def test_update_matches_reference_and_fp64(pair, n, w, w_as_tensor, switch, generator):
    param_dtype, ema_dtype = pair
    ema = on_gpu(n, ema_dtype, generator)
    expected_ema = ema.clone()
    weight = torch.tensor(w, dtype=torch.float32, device="cuda") if w_as_tensor else w
    for step in range(STEPS if n < 2**20 else BIG_STEPS):
        param = on_gpu(n, param_dtype, generator)
        expected_param = param.clone()
        e64, p64 = ema.double(), param.double()
        sema.ops.ema_update_(ema, param, weight, switch=switch, backend="cuda")
        reference.ema_update_(expected_ema, expected_param, weight, switch)
        what = f"step {step}"
        assert_same(ema, expected_ema, f"{what}: ema vs the torch backend")
        assert_same(param, expected_param, f"{what}: param vs the torch backend")
        exact = torch.lerp(e64, p64, fp32_weight(w))
        assert_within(ema.cpu(), exact.cpu(), update_bound(e64, p64, exact, ema_dtype).cpu(), f"{what}: vs fp64")
        if switch:
            assert_same(param, ema.to(param_dtype), f"{what}: the switched param must be the cast EMA")
        expected_ema.copy_(ema)


@needs_cuda
@pytest.mark.parametrize("pair", DTYPE_PAIRS, ids=pair_id)
def test_unaligned_views_take_the_scalar_path(pair, generator):
    """Views starting one element in: no 16-byte alignment, so the kernel's scalar loop runs."""
    param_dtype, ema_dtype = pair
    n = 4097 + 1
    ema, param = on_gpu(n, ema_dtype, generator), on_gpu(n, param_dtype, generator)
    expected_ema, expected_param = ema[1:].clone(), param[1:].clone()
    sema.ops.ema_update_(ema[1:], param[1:], 0.3, switch=True, backend="cuda")
    reference.ema_update_(expected_ema, expected_param, 0.3, True)
    assert_same(ema[1:], expected_ema, "unaligned ema")
    assert_same(param[1:], expected_param, "unaligned param")


@needs_cuda
@pytest.mark.parametrize("switch", [False, True], ids=["update", "update_switch"])
def test_multi_many_tensors(switch, generator):
    """150 pairs of mixed dtypes and sizes (0 included): one piece table and launch per dtype pair."""
    emas, params = [], []
    for i in range(150):
        param_dtype, ema_dtype = DTYPE_PAIRS[i % len(DTYPE_PAIRS)]
        n = (i * 7919) % 20_000 if i % 11 else 0
        emas.append(on_gpu(n, ema_dtype, generator))
        params.append(on_gpu(n, param_dtype, generator))
    expected = [(e.clone(), p.clone()) for e, p in zip(emas, params, strict=True)]
    w = torch.tensor(2e-3, device="cuda")
    sema.ops.ema_update_multi_(emas, params, w, switch=switch, backend="cuda")
    for i, (e, p) in enumerate(expected):
        reference.ema_update_(e, p, w, switch)
        assert_same(emas[i], e, f"pair {i} ema")
        assert_same(params[i], p, f"pair {i} param")


@needs_cuda
def test_tensor_weight_in_a_cuda_graph(generator):
    """w read on the device: a captured update follows the value w holds at replay."""
    n = 2**20 + 3
    ema, param = on_gpu(n, torch.float32, generator), on_gpu(n, torch.bfloat16, generator)
    w = torch.tensor(0.25, device="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm up (loads the kernel) outside the capture
        sema.ops.ema_update_(ema.clone(), param.clone(), w, switch=True, backend="cuda")
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        sema.ops.ema_update_(ema, param, w, switch=True, backend="cuda")
    expected_ema, expected_param = ema.clone(), param.clone()
    for value in (0.25, 0.75, 1e-4):
        w.fill_(value)
        graph.replay()
        reference.ema_update_(expected_ema, expected_param, value, True)
        torch.cuda.synchronize()
        assert_same(ema, expected_ema, f"graph replay with w={value}")
        assert_same(param, expected_param, f"graph replay with w={value}, param")


@needs_cuda
def test_runs_on_the_current_stream(generator):
    n = 2**22
    ema, param = on_gpu(n, torch.float32, generator), on_gpu(n, torch.float16, generator)
    expected_ema, expected_param = ema.clone(), param.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            sema.ops.ema_update_(ema, param, 0.1, switch=True, backend="cuda")
            param.add_(1.0)  # ordered after the kernel only if it ran on this stream
    torch.cuda.current_stream().wait_stream(stream)
    for _ in range(3):
        reference.ema_update_(expected_ema, expected_param, 0.1, True)
        expected_param.add_(1.0)
    assert_same(ema, expected_ema, "ema after a side stream")
    assert_same(param, expected_param, "param after a side stream")


@needs_cuda
def test_past_2_31_elements():
    """int64 offsets: the last elements of a buffer longer than 2**31 are updated."""
    n = 2**31 + 17
    free, _ = torch.cuda.mem_get_info()
    if free < n * 6 + 2**30:
        pytest.skip(f"needs {n * 6 / 2**30:.1f} GiB free on the GPU, {free / 2**30:.1f} GiB are")
    ema = torch.zeros(n, device="cuda")
    param = torch.ones(n, dtype=torch.bfloat16, device="cuda")
    sema.ops.ema_update_(ema, param, 0.5, switch=True, backend="cuda")
    tail = ema[-(2**20) :]
    assert torch.all(tail == 0.5), f"{int((tail != 0.5).sum())} of the last 2**20 elements were not updated"
    assert torch.all(param[-(2**20) :] == 0.5)
    assert float(ema[0]) == 0.5
    del ema, param
    torch.cuda.empty_cache()


# --- K EMAs in one pass (issue #14 section 2) ---------------------------------------------

K_SIZES = [0, 1, 17, 4097, 8193, 2**20 + 3]


def k_weights(k: int, generator: torch.Generator) -> torch.Tensor:
    """K fp32 weights on the GPU: the edge weights 0, 1, 0.5 and 1e-4 among random ones."""
    edges = torch.tensor([0.0, 1.0, 0.5, 1e-4])
    ws = torch.rand(k, generator=generator)
    picks = torch.randperm(k, generator=generator)[: min(k, 2)]
    ws[picks] = edges[torch.randint(0, 4, (picks.numel(),), generator=generator)]
    return ws.cuda()


def k_single_updates(emas, param, ws, switch_index) -> None:
    """The contract's definition, on the same backend: K single updates (w = ws[k], read on the
    device), then switch_(emas[switch_index], param)."""
    for k, ema in enumerate(emas):
        _ext_cuda.ema_update_(ema, param, ws[k])
    if switch_index is not None:
        _ext_cuda.switch_(emas[switch_index], param)


def check_k_step(emas, param, ws, switch_index, what: str) -> None:
    expected, expected_param = [e.clone() for e in emas], param.clone()
    _ext_cuda.ema_update_k_(emas, param, ws, switch_index)
    k_single_updates(expected, expected_param, ws, switch_index)
    for k in range(len(emas)):
        assert_bits_equal(emas[k], expected[k], f"{what}: EMA {k}")
    assert_bits_equal(param, expected_param, f"{what}: param")


@needs_cuda
@pytest.mark.parametrize("n", K_SIZES, ids=size_id)
@pytest.mark.parametrize("k", [1, 2, 3, 8, 11], ids=lambda k: f"K{k}")
@pytest.mark.parametrize("pair", DTYPE_PAIRS, ids=pair_id)
def test_k_update_bit_equal_to_k_single_updates(pair, k, n, generator):
    """Many steps, switch_index cycling None, 0, K-1; K = 11 runs as passes of 8 and 3."""
    param_dtype, ema_dtype = pair
    emas = [on_gpu(n, ema_dtype, generator) for _ in range(k)]
    for step in range(12 if n < 2**20 else 3):
        switch_index = [None, 0, k - 1][step % 3]
        check_k_step(emas, on_gpu(n, param_dtype, generator), k_weights(k, generator), switch_index, f"step {step}")


@needs_cuda
@pytest.mark.parametrize("pair", DTYPE_PAIRS, ids=pair_id)
def test_k_update_nonfinite_unaligned_and_large(pair, generator):
    """Random bit patterns (NaN payloads, Inf, subnormals); views one element in; 2**24 + 5."""
    param_dtype, ema_dtype = pair
    n = 2**16 + 5
    emas = [random_bits(n, ema_dtype, generator).cuda() for _ in range(3)]
    check_k_step(emas, random_bits(n, param_dtype, generator).cuda(), k_weights(3, generator), 2, "bits")
    buffers = [on_gpu(n + 1, ema_dtype, generator) for _ in range(3)]
    emas = [buffers[0][1:], buffers[1][:-1], buffers[2][1:]]
    check_k_step(emas, on_gpu(n + 1, param_dtype, generator)[1:], k_weights(3, generator), 1, "unaligned")
    n = 2**24 + 5
    emas = [on_gpu(n, ema_dtype, generator) for _ in range(2)]
    check_k_step(emas, on_gpu(n, param_dtype, generator), k_weights(2, generator), 0, "2**24 + 5")


@needs_cuda
@pytest.mark.parametrize("k", [3, 10], ids=lambda k: f"K{k}")
@pytest.mark.parametrize("switch_index", [None, 0, -1], ids=lambda s: f"switch{s}")
def test_k_multi_many_tensors(k, switch_index, generator):
    """150 tensors of mixed dtype pairs and sizes (0 included): bit for bit the K single updates;
    K = 10 runs as passes of 8 and 2, the pass holding the switch last."""
    switch_index = k - 1 if switch_index == -1 else switch_index
    emas, params = [[] for _ in range(k)], []
    for i in range(150):
        param_dtype, ema_dtype = DTYPE_PAIRS[i % len(DTYPE_PAIRS)]
        n = (i * 7919) % 20_000 if i % 11 else 0
        for row in emas:
            row.append(on_gpu(n, ema_dtype, generator))
        params.append(on_gpu(n, param_dtype, generator))
    _ext_cuda.check_update_k_multi(emas, params, k_weights(k, generator), switch_index)
    for step in range(3):
        ws = k_weights(k, generator)
        expected = [[e.clone() for e in row] for row in emas]
        expected_params = [p.clone() for p in params]
        _ext_cuda.ema_update_k_multi_(emas, params, ws, switch_index)
        for i in range(len(params)):
            k_single_updates([row[i] for row in expected], expected_params[i], ws, switch_index)
            for j in range(k):
                assert_bits_equal(emas[j][i], expected[j][i], f"step {step}: tensor {i}, EMA {j}")
            assert_bits_equal(params[i], expected_params[i], f"step {step}: tensor {i}, param")


@needs_cuda
@pytest.mark.parametrize("multi", [False, True], ids=["flat", "multi"])
def test_k_weights_in_a_cuda_graph(multi, generator):
    """ws read on the device: a captured K-EMA update follows the values ws holds at replay."""
    n, k = 2**20 + 3, 3
    emas = [on_gpu(n, torch.float32, generator) for _ in range(k)]
    param = on_gpu(n, torch.bfloat16, generator)
    ws = k_weights(k, generator)

    def update() -> None:
        if multi:
            _ext_cuda.ema_update_k_multi_([[e] for e in emas], [param], ws, 1)
        else:
            _ext_cuda.ema_update_k_(emas, param, ws, 1)

    saved = [e.clone() for e in emas], param.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm up (kernels, piece tables) outside the capture
        update()
    torch.cuda.current_stream().wait_stream(stream)
    for e, s in zip(emas, saved[0], strict=True):
        e.copy_(s)
    param.copy_(saved[1])
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        update()
    expected, expected_param = [e.clone() for e in emas], param.clone()
    for values in ([0.25, 0.75, 1e-4], [1.0, 0.0, 0.5]):
        ws.copy_(torch.tensor(values))
        graph.replay()
        k_single_updates(expected, expected_param, ws, 1)
        torch.cuda.synchronize()
        for j in range(k):
            assert_bits_equal(emas[j], expected[j], f"replay with ws={values}: EMA {j}")
        assert_bits_equal(param, expected_param, f"replay with ws={values}: param")


@needs_cuda
def test_k_update_runs_on_the_current_stream(generator):
    n = 2**22
    emas = [on_gpu(n, torch.float32, generator) for _ in range(2)]
    param = on_gpu(n, torch.float16, generator)
    expected, expected_param = [e.clone() for e in emas], param.clone()
    ws = torch.tensor([0.1, 0.01], device="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            _ext_cuda.ema_update_k_(emas, param, ws, 0)
            param.add_(1.0)  # ordered after the kernel only if it ran on this stream
    torch.cuda.current_stream().wait_stream(stream)
    for _ in range(3):
        k_single_updates(expected, expected_param, ws, 0)
        expected_param.add_(1.0)
    for j in range(2):
        assert_same(emas[j], expected[j], f"EMA {j} after a side stream")
    assert_same(param, expected_param, "param after a side stream")


@needs_cuda
def test_k_piece_table_cached(monkeypatch, generator):
    """The second call with the same tensors plans nothing: it launches over the cached table."""
    emas = [[on_gpu(5000, torch.float32, generator) for _ in range(3)] for _ in range(2)]
    params = [on_gpu(5000, torch.bfloat16, generator) for _ in range(3)]
    ws = k_weights(2, generator)
    _ext_cuda.ema_update_k_multi_(emas, params, ws, None)

    def fail(*args, **kwargs):
        raise AssertionError("planned again")

    monkeypatch.setattr(_ext_cuda._C, "cuda_plan_update_k_multi", fail)
    expected = [[e.clone() for e in row] for row in emas]
    expected_params = [p.clone() for p in params]
    _ext_cuda.ema_update_k_multi_(emas, params, ws, 0)
    for i in range(3):
        k_single_updates([row[i] for row in expected], expected_params[i], ws, 0)
        assert_bits_equal(params[i], expected_params[i], f"tensor {i}, param")


# --- multi-tensor piece tables: cached, validated once, stream safe ------------------------


def multi_pairs(count: int, generator: torch.Generator) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """fp32 EMAs of bf16 params, sizes 1 to 70,000 (some cut into several pieces)."""
    sizes = torch.randint(1, 70_000, (count,), generator=generator).tolist()
    return [on_gpu(n, torch.float32, generator) for n in sizes], [on_gpu(n, torch.bfloat16, generator) for n in sizes]


class CountingExtension:
    """sema._C with a count of piece-table plans."""

    def __init__(self, extension):
        self.extension, self.plans = extension, 0

    def __getattr__(self, name):
        return getattr(self.extension, name)

    def cuda_plan_update_multi(self, *args):
        self.plans += 1
        return self.extension.cuda_plan_update_multi(*args)


@needs_cuda
def test_piece_table_cached_and_the_trusted_path_does_not_revalidate(monkeypatch, generator):
    """The dispatch path plans once per set of tensors and never re-runs the tensor checks;
    new addresses (a tensor replaced) get a new table; results match the reference each call."""
    counting = CountingExtension(_ext_cuda._C)
    monkeypatch.setattr(_ext_cuda, "_C", counting)

    def no_checks(*args, **kwargs):
        raise AssertionError("the trusted multi-tensor path re-validated its tensors")

    monkeypatch.setattr(_ext_cuda, "flat_pairs", no_checks)
    monkeypatch.setattr(_ext_cuda, "check_pair", no_checks)
    emas, params = multi_pairs(40, generator)
    expected = [(e.clone(), p.clone()) for e, p in zip(emas, params, strict=True)]
    w = torch.tensor(0.01, device="cuda")
    for step in range(3):
        if step == 2:  # a tensor moves: new addresses, a new table
            emas[5] = emas[5].clone()
        ops.dispatch_update_multi(emas, params, w, True, "cuda")
        for i, (e, p) in enumerate(expected):
            reference.ema_update_(e, p, w, True)
            assert_same(emas[i], e, f"step {step}, pair {i} ema")
            assert_same(params[i], p, f"step {step}, pair {i} param")
        assert counting.plans == (1 if step < 2 else 2), f"step {step}: {counting.plans} plans"


@needs_cuda
def test_piece_table_first_upload_is_waited_for_on_another_stream(generator):
    """A table copied on a stream that is still busy, then used on another stream: the kernel
    there must wait for the copy, or it reads uninitialised memory as pointers."""
    emas, params = multi_pairs(30, generator)
    expected = [(e.clone(), p.clone()) for e, p in zip(emas, params, strict=True)]
    upload, other = torch.cuda.Stream(), torch.cuda.Stream()
    torch.cuda.synchronize()
    with torch.cuda.stream(upload):
        torch.cuda._sleep(200_000_000)  # ~0.1 s: the copy queued behind it is still pending below
        _ext_cuda._tables_for(emas, params, emas[0].device)
    with torch.cuda.stream(other):
        _ext_cuda.ema_update_multi_(emas, params, 0.25, True)
    torch.cuda.synchronize()
    for i, (e, p) in enumerate(expected):
        reference.ema_update_(e, p, 0.25, True)
        assert_same(emas[i], e, f"pair {i} ema")
        assert_same(params[i], p, f"pair {i} param")


@needs_cuda
def test_piece_table_eviction_waits_for_kernels_on_other_streams(generator):
    """A table read by a kernel still queued on another stream is evicted; its memory must not
    be handed out (and overwritten) before that kernel has run."""
    emas, params = multi_pairs(30, generator)
    _ext_cuda.ema_update_multi_(emas, params, 0.0, False)  # builds the table on the current stream
    torch.cuda.synchronize()
    expected = [(e.clone(), p.clone()) for e, p in zip(emas, params, strict=True)]
    key = next(reversed(_ext_cuda._piece_tables))
    table = _ext_cuda._piece_tables[key].storage
    address, shape = table.data_ptr(), table.shape
    del table
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.cuda._sleep(200_000_000)
        _ext_cuda.ema_update_multi_(emas, params, 0.5, True)  # queued behind the sleep
    _ext_cuda._piece_tables.pop(key)  # evicted while the side stream's kernel waits
    garbage = torch.full(shape, -1, dtype=torch.int64, device="cuda")  # the current stream reuses freed blocks
    assert garbage.data_ptr() != address, "the evicted table's memory was reused while a kernel would still read it"
    torch.cuda.synchronize()
    for i, (e, p) in enumerate(expected):
        reference.ema_update_(e, p, 0.5, True)
        assert_same(emas[i], e, f"pair {i} ema")
        assert_same(params[i], p, f"pair {i} param")


@needs_cuda
def test_piece_table_of_a_captured_graph_is_never_evicted(generator):
    emas, params = multi_pairs(20, generator)
    w = torch.tensor(0.1, device="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # builds the table outside the capture
        _ext_cuda.ema_update_multi_(emas, params, w, False)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        _ext_cuda.ema_update_multi_(emas, params, w, False)
    for _ in range(_ext_cuda.PIECE_TABLE_CACHE_SIZE + 4):  # other tensor sets push every cached table out
        others = multi_pairs(3, generator)
        _ext_cuda.ema_update_multi_(*others, w, False)
    expected = [(e.clone(), p.clone()) for e, p in zip(emas, params, strict=True)]
    for value in (0.3, 1e-3):
        w.fill_(value)
        graph.replay()
        torch.cuda.synchronize()
        for i, (e, p) in enumerate(expected):
            reference.ema_update_(e, p, value, False)
            assert_same(emas[i], e, f"replay with w={value}, pair {i}")


@needs_cuda
def test_piece_table_first_built_inside_a_capture_raises(generator):
    emas, params = multi_pairs(3, generator)
    stream = torch.cuda.Stream()
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="before CUDA-graph capture"):
        with torch.cuda.graph(graph, stream=stream):
            _ext_cuda.ema_update_multi_(emas, params, 0.1, False)


# --- casts and swaps ----------------------------------------------------------------------


@needs_cuda
@pytest.mark.parametrize("param_dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_switch_cast_bit_equal_to_torch(param_dtype, generator):
    values = torch.tensor(
        [
            *(float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 1 + 2.0**-8, 1 + 3 * 2.0**-8, 1 + 2.0**-11),
            *(65504.0, 65519.996, 65520.0, 2.0**-24, 2.0**-25, 3 * 2.0**-26, 1e-45, 3.3895e38),
        ],
        dtype=torch.float32,
    )
    random_bits = torch.randint(-(2**31), 2**31, (2**20,), dtype=torch.int32, generator=generator)
    ema = torch.cat([values, random_bits.view(torch.float32)]).cuda()
    param = poisoned(ema.numel(), param_dtype).cuda()
    sema.ops.switch_(ema, param, backend="cuda")
    assert_same(param, ema.to(param_dtype), f"cast to {param_dtype}")


@needs_cuda
@pytest.mark.parametrize("pair", DTYPE_PAIRS, ids=pair_id)
def test_switch_matches_reference(pair, generator):
    param_dtype, ema_dtype = pair
    for n in SIZES:
        ema = on_gpu(n, ema_dtype, generator)
        param = poisoned(n, param_dtype).cuda()
        sema.ops.switch_(ema, param, backend="cuda")
        assert_same(param, ema.to(param_dtype), f"switch_ n={n}")


@needs_cuda
@pytest.mark.parametrize("n", SIZES, ids=size_id)
@pytest.mark.parametrize("pair", SWAP_PAIRS, ids=pair_id)
def test_swap_bit_exact_and_restores(pair, n, generator):
    param_dtype, ema_dtype = pair
    ema, param = random_bits(n, ema_dtype, generator).cuda(), random_bits(n, param_dtype, generator).cuda()
    original_ema, original_param = ema.clone(), param.clone()
    expected_ema, expected_param = ema.clone(), param.clone()
    sema.ops.swap_(ema, param, backend="cuda")
    reference.swap_(expected_ema, expected_param)
    assert_bits_equal(ema.cpu(), expected_ema.cpu(), "swapped ema vs the torch backend")
    assert_bits_equal(param.cpu(), expected_param.cpu(), "swapped param vs the torch backend")
    sema.ops.swap_(ema, param, restore=True, backend="cuda")
    assert_bits_equal(ema.cpu(), original_ema.cpu(), "ema after swap + restore")
    assert_bits_equal(param.cpu(), original_param.cpu(), "param after swap + restore")


# --- input checks (run without a GPU: they raise before sema._C is reached) ---------------


class _Untouchable:
    def __getattr__(self, name):
        raise AssertionError(f"sema._C.{name} was reached with bad input")


def test_bad_input_raises_before_cuda(monkeypatch):
    monkeypatch.setattr(_ext_cuda, "_C", _Untouchable())
    cpu_pair = (torch.zeros(16), torch.zeros(16))
    meta_pair = (torch.zeros(16, device="meta"), torch.zeros(16, device="meta"))
    for ema, param in (cpu_pair, meta_pair):
        with pytest.raises(ValueError, match="serves cuda tensors"):
            _ext_cuda.ema_update_(ema, param, 0.1)
        with pytest.raises(ValueError, match="serves cuda tensors"):
            _ext_cuda.switch_(ema, param)
        with pytest.raises(ValueError, match="serves cuda tensors"):
            _ext_cuda.swap_(ema, param)
        with pytest.raises(ValueError, match="serves cuda tensors"):
            _ext_cuda.ema_update_multi_([ema], [param], 0.1)
        with pytest.raises(ValueError, match="serves cuda tensors"):
            _ext_cuda.check_update_multi([ema], [param], 0.1)
        with pytest.raises(ValueError, match="serves cuda tensors"):
            _ext_cuda.ema_update_k_([ema], param, torch.zeros(1), None)
        with pytest.raises(ValueError, match="serves cuda tensors"):
            _ext_cuda.ema_update_k_multi_([[ema]], [param], torch.zeros(1), None)
        with pytest.raises(ValueError, match="serves cuda tensors"):
            _ext_cuda.check_update_k_multi([[ema]], [param], torch.zeros(1), None)
    if torch.cuda.is_available():
        ema, param = torch.zeros(16, device="cuda"), torch.zeros(16, device="cuda")
        with pytest.raises(ValueError, match="w as a tensor"):
            _ext_cuda.ema_update_(ema, param, torch.tensor(0.1))  # w on the CPU
        with pytest.raises(ValueError, match="w as a tensor"):
            _ext_cuda.ema_update_(ema, param, torch.tensor(0.1, dtype=torch.float64, device="cuda"))
        with pytest.raises(TypeError, match="lossless"):
            _ext_cuda.swap_(ema, param.half())
        with pytest.raises(ValueError, match="share memory"):
            _ext_cuda.ema_update_(ema, ema, 0.1)
        with pytest.raises(ValueError, match="w shares memory"):
            _ext_cuda.ema_update_(ema, param, ema[3])  # a 0-d view into the buffer being written
        with pytest.raises(ValueError, match="share memory"):
            _ext_cuda.check_update_multi([ema, ema[:8]], [param, param[8:].clone()], 0.1)
        with pytest.raises(ValueError, match="w shares memory"):
            _ext_cuda.check_update_multi([ema], [param], param[0])
        other = torch.zeros(16, device="cuda")
        with pytest.raises(ValueError, match="ws must be a 1-D contiguous float32 tensor of 2 weights"):
            _ext_cuda.ema_update_k_([ema, other], param, torch.zeros(2), None)  # ws on the CPU
        with pytest.raises(ValueError, match="switch_index"):
            _ext_cuda.ema_update_k_([ema, other], param, torch.zeros(2, device="cuda"), 2)
        with pytest.raises(ValueError, match="share memory"):
            _ext_cuda.ema_update_k_([ema, ema[:16]], param, torch.zeros(2, device="cuda"), None)
        with pytest.raises(ValueError, match="ws shares memory"):
            _ext_cuda.ema_update_k_([ema, other], param, param[:2], None)
        with pytest.raises(ValueError, match="share memory"):
            _ext_cuda.check_update_k_multi([[ema], [ema]], [param], torch.zeros(2, device="cuda"), None)


def test_availability_says_why():
    ok, reason = _ext_cuda.availability("cuda")
    assert reason
    if not torch.cuda.is_available():
        assert not ok
    assert _ext_cuda.availability("cpu") == (False, "serves CUDA tensors, not cpu")


# --- the build ----------------------------------------------------------------------------


def fatbin_entries(path: str) -> list[tuple[str, int]]:
    """(kind, arch) of every entry in the .nv_fatbin section of a shared library: ("elf", 90)
    is an sm_90 cubin, ("ptx", 90) compute_90 PTX. Reads the ELF and fatbin headers directly,
    for machines without cuobjdump."""
    with open(path, "rb") as f:
        data = f.read()
    assert data[:4] == b"\x7fELF" and data[4] == 2, f"{path} is not a 64-bit ELF file"
    (section_offset,) = struct.unpack_from("<Q", data, 0x28)
    entry_size, count, names_index = struct.unpack_from("<HHH", data, 0x3A)

    def section(i: int) -> tuple[int, ...]:
        return struct.unpack_from("<IIQQQQIIQQ", data, section_offset + i * entry_size)

    names = section(names_index)[4]
    blob = b""
    for i in range(count):
        name_offset, *_, offset, size = section(i)[:6]
        name = data[names + name_offset : data.index(b"\0", names + name_offset)]
        if name == b".nv_fatbin":
            blob = data[offset : offset + size]
    entries, pos = [], 0
    while pos + 16 <= len(blob):
        magic, _, header_size, fat_size = struct.unpack_from("<IHHQ", blob, pos)
        if magic != 0xBA55ED50:
            pos += 8  # containers are 8-byte aligned
            continue
        entry, end = pos + header_size, pos + header_size + fat_size
        while entry < end:
            kind, _, entry_header_size, payload_size = struct.unpack_from("<HHIQ", blob, entry)
            (arch,) = struct.unpack_from("<I", blob, entry + 28)
            entries.append(({1: "ptx", 2: "elf"}.get(kind, str(kind)), arch))
            entry += entry_header_size + payload_size
        pos = end
    return entries


def test_build_has_device_code_for_sm80_and_sm90():
    info = _extension.build_info()
    if not info:
        pytest.skip(f"sema._C is not built: {_extension.load_error}")
    if not info["cuda"]:
        pytest.skip(f"sema._C was built without CUDA: {info['cuda_skipped']}")
    for arch in REQUIRED_CUBINS:
        assert arch in info["cuda_archs"], f"build metadata lists {info['cuda_archs']}, not {arch}"
    path = _extension.extension.__file__
    entries = fatbin_entries(path)
    for arch in REQUIRED_CUBINS:
        assert ("elf", int(arch[3:])) in entries, f"no {arch} cubin in {path}: {entries}"
    assert ("ptx", 90) in entries, f"no compute_90 PTX in {path}: {entries}"
    cuobjdump = shutil.which("cuobjdump")
    if cuobjdump:  # the vendor tool, where installed, must agree
        listing = subprocess.run([cuobjdump, "--list-elf", path], capture_output=True, text=True, check=True).stdout
        for arch in REQUIRED_CUBINS:
            assert f".{arch}." in listing, f"cuobjdump --list-elf lists no {arch} cubin:\n{listing}"

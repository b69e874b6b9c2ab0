"""The Triton K-EMA update (``sema.kernels.ema_update_k_`` and ``ema_update_k_multi_``) against K
separate Triton single-op updates, bit for bit.

The single op is the reference here, not torch: under the interpreter both round fp32 -> bf16 by
truncation (numpy has no bf16), so only the Triton single op has the same 16-bit outputs. It is
itself checked against the fp64 oracle in tests/test_triton.py. The interpreter is slow (about
2 ms a block), so sizes stay at a block or two.
"""

from __future__ import annotations

import os

import torch

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import importlib

import pytest

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

try:
    kernels = importlib.import_module("sema.kernels")
    AVAILABLE, REASON = kernels.availability(DEVICE)
except ImportError as exc:
    AVAILABLE, REASON = False, f"sema.kernels is not importable ({exc}); pip install -e . first"

pytestmark = pytest.mark.skipif(not AVAILABLE, reason=f"triton backend unavailable on {DEVICE}: {REASON}")

SHORT = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
DTYPE_PAIRS = [  # (param dtype, EMA dtype)
    (torch.float32, torch.float32),
    (torch.bfloat16, torch.float32),
    (torch.float16, torch.float32),
    (torch.bfloat16, torch.bfloat16),
    (torch.float16, torch.float16),
]
BLOCK = 4096  # sema.kernels.ema_k.K_BLOCK, for every dtype pair
N = BLOCK + 17  # one full block and a masked last block
# Weights of the K EMAs: both lerp branches, the exact ends and the tie at 0.5.
WEIGHTS = [0.25, 1e-4, 1.0, 0.0, 0.5, 0.75, 0.9990000128746033, 3e-3]


def pair_id(pair: tuple[torch.dtype, torch.dtype]) -> str:
    return f"param_{SHORT[pair[0]]}-ema_{SHORT[pair[1]]}"


def switch_ids(index: int | None) -> str:
    return "no_switch" if index is None else f"switch_{index}"


@pytest.fixture
def generator() -> torch.Generator:
    return torch.Generator().manual_seed(1402)


def random_values(n: int, dtype: torch.dtype, generator: torch.Generator) -> torch.Tensor:
    """Normal values over four orders of magnitude, inside every dtype's range."""
    scale = torch.pow(10.0, torch.empty(n, dtype=torch.float64).uniform_(-2, 2, generator=generator))
    return (torch.randn(n, generator=generator, dtype=torch.float64) * scale).to(dtype).to(DEVICE)


def random_bits(n: int, dtype: torch.dtype, generator: torch.Generator) -> torch.Tensor:
    """Every bit pattern is possible: NaN payloads, infinities, subnormals."""
    bits = {4: torch.int32, 2: torch.int16}[dtype.itemsize]
    info = torch.iinfo(bits)
    return torch.randint(info.min, info.max + 1, (n,), generator=generator, dtype=bits).view(dtype).to(DEVICE)


def as_bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view({4: torch.int32, 2: torch.int16}[t.element_size()]).flatten()


def assert_bits_equal(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, what
    diff = as_bits(actual) != as_bits(expected)
    if diff.any():
        i = int(diff.nonzero()[0])
        raise AssertionError(
            f"{what}: {int(diff.sum())}/{diff.numel()} elements differ bitwise; first at {i}: "
            f"{actual.flatten()[i].item()!r} vs {expected.flatten()[i].item()!r}"
        )


def weights(k: int, generator: torch.Generator) -> torch.Tensor:
    """K fp32 weights on the device: ``WEIGHTS`` in a fresh random order."""
    order = torch.randperm(len(WEIGHTS), generator=generator)[:k]
    return torch.tensor([WEIGHTS[i] for i in order], dtype=torch.float32, device=DEVICE)


def k_single_updates(emas: list[torch.Tensor], param: torch.Tensor, ws: torch.Tensor, switch_index: int | None):
    """The contract's definition: K single updates with ``w = ws[k]`` (0-d), then the switch."""
    for k, ema in enumerate(emas):
        kernels.ema_update_(ema, param, ws[k])
    if switch_index is not None:
        kernels.switch_(emas[switch_index], param)


def check_against_single_updates(emas, param, ws, switch_index, update_k=None) -> None:
    """``update_k`` (default :func:`sema.kernels.ema_update_k_`) on the tensors in place, and
    :func:`k_single_updates` on clones: bitwise equal EMAs and param."""
    update_k = update_k or kernels.ema_update_k_
    expected_emas, expected_param = [ema.clone() for ema in emas], param.clone()
    ws_before = ws.clone()
    update_k(emas, param, ws, switch_index)
    k_single_updates(expected_emas, expected_param, ws, switch_index)
    for k, (ema, expected) in enumerate(zip(emas, expected_emas, strict=True)):
        assert_bits_equal(ema, expected, f"ema {k}")
    assert_bits_equal(param, expected_param, "param")
    assert_bits_equal(ws, ws_before, "ws")


# --- the flat op ----------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 2, 3, 8])
@pytest.mark.parametrize("pair", DTYPE_PAIRS, ids=pair_id)
def test_equals_k_single_updates(pair, k, generator):
    """Every dtype pair and K, without a switch and switching the first and the last EMA. Two
    steps, the second from the state the first left."""
    param_dtype, ema_dtype = pair
    for switch_index in sorted({None, 0, k - 1}, key=lambda i: -1 if i is None else i):
        emas = [random_values(N, ema_dtype, generator) for _ in range(k)]
        for _ in range(2):
            param = random_values(N, param_dtype, generator)
            check_against_single_updates(emas, param, weights(k, generator), switch_index)


@pytest.mark.parametrize("n", [0, 1, 15, 17, BLOCK - 1, BLOCK, BLOCK + 1, 2 * BLOCK + 9])
def test_sizes_around_block_boundaries(n, generator):
    param = random_values(n, torch.bfloat16, generator)
    emas = [random_values(n, torch.float32, generator) for _ in range(3)]
    check_against_single_updates(emas, param, weights(3, generator), 2)


@pytest.mark.parametrize("switch_index", [None, 1], ids=switch_ids)
@pytest.mark.parametrize("pair", DTYPE_PAIRS, ids=pair_id)
def test_nan_inf_and_every_bit_pattern(pair, switch_index, generator):
    """Random bits in the EMAs and the param (NaN payloads, infinities, subnormals), and NaN and
    infinite weights."""
    param_dtype, ema_dtype = pair
    n = BLOCK + 33
    param = random_bits(n, param_dtype, generator)
    emas = [random_bits(n, ema_dtype, generator) for _ in range(3)]
    specials = torch.tensor([float("nan"), float("inf"), -0.0, float("-inf")], dtype=param_dtype, device=DEVICE)
    param[:4] = specials
    emas[0][4:8] = specials.to(ema_dtype)
    check_against_single_updates(emas, param, weights(3, generator), switch_index)
    odd = torch.tensor([float("nan"), float("inf"), 0.5], dtype=torch.float32, device=DEVICE)
    check_against_single_updates(emas, param, odd, switch_index)


@pytest.mark.parametrize("switch_index", [None, 0, 8, 9], ids=switch_ids)
def test_more_than_eight_emas_run_in_passes(switch_index, generator):
    """K = 10: passes of 8 and 2, each reading the params; the pass that switches runs last, so
    every EMA, in either pass, reads the param from before the switch."""
    param = random_values(BLOCK + 5, torch.float32, generator)
    emas = [random_values(BLOCK + 5, torch.float32, generator) for _ in range(10)]
    ws = torch.rand(10, generator=generator).to(DEVICE)
    check_against_single_updates(emas, param, ws, switch_index)


def test_passes():
    ema_k = importlib.import_module("sema.kernels.ema_k")
    assert ema_k.passes(3, None) == [(range(0, 3), -1)]
    assert ema_k.passes(3, 2) == [(range(0, 3), 2)]
    assert ema_k.passes(17, None) == [(range(0, 8), -1), (range(8, 16), -1), (range(16, 17), -1)]
    assert ema_k.passes(17, 3) == [(range(8, 16), -1), (range(16, 17), -1), (range(0, 8), 3)]
    assert ema_k.passes(17, 9) == [(range(0, 8), -1), (range(16, 17), -1), (range(8, 16), 1)]


class LaunchRecorder:
    """Stands in for a kernel: records each launch's grid, EMA addresses and lengths, then runs it."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            tensors = [(a.data_ptr(), a.numel()) for a in args if isinstance(a, torch.Tensor)]
            self.launches.append((grid, kwargs["K"], kwargs["SWITCH_INDEX"], tensors[:-1]))  # ws last
            return self.kernel[grid](*args, **kwargs)

        return launch


# EMA offsets (fp32 elements) and param offset (bf16 elements) into 16-byte aligned buffers, and the
# elements after which all of them are 16-byte aligned together (None: never).
VIEW_HEADS = {((1, 1), 1): 7, ((1, 5), 5): 3, ((1, 2), 1): None, ((0, 0), 1): None}


@pytest.mark.parametrize("offsets", list(VIEW_HEADS), ids=lambda o: f"emas+{o[0]}-param+{o[1]}")
def test_unaligned_views(offsets, generator, monkeypatch):
    """Views off 16-byte boundaries: a head that all K EMAs and the param leave together runs
    apart (one program) so that the rest is aligned, or, when they never align together, one
    launch; bit-equal results, and nothing written around the views."""
    ema_k = importlib.import_module("sema.kernels.ema_k")
    recorder = LaunchRecorder(ema_k._ema_update_k_kernel)
    monkeypatch.setattr(ema_k, "_ema_update_k_kernel", recorder)
    (ema_offsets, param_offset), n = offsets, 2 * BLOCK + 21
    ema_buffers = [random_values(n + 16, torch.float32, generator) for _ in ema_offsets]
    param_buffer = random_values(n + 16, torch.bfloat16, generator)
    assert all(b.data_ptr() % 16 == 0 for b in [*ema_buffers, param_buffer])
    emas = [b[o : o + n] for b, o in zip(ema_buffers, ema_offsets, strict=True)]
    param = param_buffer[param_offset : param_offset + n]
    buffers, buffer_offsets = [*ema_buffers, param_buffer], [*ema_offsets, param_offset]
    buffers_before = [b.clone() for b in buffers]
    check_against_single_updates(emas, param, weights(2, generator), 1)
    for buffer, offset, before in zip(buffers, buffer_offsets, buffers_before, strict=True):
        outside = torch.cat([buffer[:offset], buffer[offset + n :]])
        assert_bits_equal(outside, torch.cat([before[:offset], before[offset + n :]]), "elements around a view")
    views = [*emas, param]
    head = VIEW_HEADS[offsets]
    if head is None:
        assert recorder.launches == [((-(-n // BLOCK),), 2, 1, [(v.data_ptr(), n) for v in views])]
    else:
        rest = [(v.data_ptr() + head * v.element_size(), n - head) for v in views]
        assert all(address % 16 == 0 for address, _ in rest), "the test's VIEW_HEADS are wrong"
        assert recorder.launches == [
            ((1,), 2, 1, [(v.data_ptr(), head) for v in views]),
            ((-(-(n - head) // BLOCK),), 2, 1, rest),
        ]


# --- negative controls: the comparison rejects wrong K-EMA updates ---------------------------


def test_rejects_a_switch_before_the_other_updates(generator):
    """Switching right after the switched EMA's update, so that the EMAs after it read the new
    param: K single ops in the wrong order, which the comparison must reject."""

    def switch_too_early(emas, param, ws, switch_index):
        for k, ema in enumerate(emas):
            kernels.ema_update_(ema, param, ws[k])
            if k == switch_index:
                kernels.switch_(ema, param)

    emas = [random_values(N, torch.float32, generator) for _ in range(3)]
    param = random_values(N, torch.bfloat16, generator)
    ws = torch.tensor([0.25, 0.5, 0.75], device=DEVICE)
    with pytest.raises(AssertionError, match="ema 1"):
        check_against_single_updates(emas, param, ws, 0, update_k=switch_too_early)


def test_rejects_a_kernel_that_skips_the_last_ema_or_the_tail(generator):
    """The real kernel launched for K - 1 EMAs, and over all but the masked last block."""
    ema_k = importlib.import_module("sema.kernels.ema_k")

    def launch(n_emas: int, n_elements: int):
        def update_k(emas, param, ws, switch_index):
            slots = [*emas[:n_emas], *[None] * (ema_k.MAX_K - n_emas)]
            ema_k._ema_update_k_kernel[(-(-param.numel() // BLOCK),)](
                *slots, param, ws, n_elements, BLOCK=BLOCK, K=n_emas, SWITCH_INDEX=-1, enable_fp_fusion=False
            )

        return update_k

    param = random_values(N, torch.float32, generator)
    emas = [random_values(N, torch.float32, generator) for _ in range(3)]
    ws = torch.tensor([0.25, 0.5, 0.75], device=DEVICE)
    check_against_single_updates(emas, param, ws, None, update_k=launch(3, N))
    with pytest.raises(AssertionError, match="ema 2"):
        check_against_single_updates(emas, param, ws, None, update_k=launch(2, N))
    with pytest.raises(AssertionError, match="ema 0: 17/"):
        check_against_single_updates(emas, param, ws, None, update_k=launch(3, BLOCK))


# --- the multi-tensor op --------------------------------------------------------------------


def multi_tensors(k: int, generator: torch.Generator) -> tuple[list[list[torch.Tensor]], list[torch.Tensor]]:
    """K EMAs of 20 params: every dtype pair, empty, channels_last and transposed (dense, not
    contiguous) params, and one spanning a few blocks."""
    params: list[torch.Tensor] = []
    for i in range(20):
        param_dtype = DTYPE_PAIRS[i % len(DTYPE_PAIRS)][0]
        kind = i % 6
        shape = {0: (0,), 1: (2, 3, 4, 5), 2: (13, 31), 3: (2 * BLOCK + 7,)}.get(kind, (int(i * 37 + 1),))
        param = random_values(torch.Size(shape).numel(), param_dtype, generator).reshape(shape)
        if kind == 1:
            param = param.contiguous(memory_format=torch.channels_last)
        params.append(param.t() if kind == 2 else param)
    emas = []
    for _ in range(k):
        emas.append([])
        for i, param in enumerate(params):
            ema = torch.empty_strided(param.shape, param.stride(), dtype=DTYPE_PAIRS[i % 5][1], device=DEVICE)
            ema.copy_(random_values(ema.numel(), ema.dtype, generator).reshape(ema.shape))
            emas[-1].append(ema)
    return emas, params


def flat(t: torch.Tensor) -> torch.Tensor:
    """A dense tensor's elements as one 1-D contiguous view, in memory order."""
    return t.as_strided((t.numel(),), (1,))


class LaunchCounter:
    def __init__(self, kernel):
        self.kernel, self.grids = kernel, []

    def __getitem__(self, grid):
        self.grids.append(grid)
        return self.kernel[grid]


@pytest.mark.parametrize("switch_index", [None, 0, 2], ids=switch_ids)
def test_multi_equals_k_single_multi_updates(switch_index, generator, monkeypatch):
    """Three EMAs of 20 params in one launch per dtype pair, against K single-op multi-tensor
    updates and the switch of each tensor."""
    ema_k = importlib.import_module("sema.kernels.ema_k")
    counter = LaunchCounter(ema_k._ema_update_k_multi_kernel)
    monkeypatch.setattr(ema_k, "_ema_update_k_multi_kernel", counter)
    emas, params = multi_tensors(3, generator)
    for step in range(2):
        for param in params:
            param.copy_(random_values(param.numel(), param.dtype, generator).reshape(param.shape))
        ws = weights(3, generator)
        expected_emas, expected_params = [[e.clone() for e in row] for row in emas], [p.clone() for p in params]
        kernels.ema_update_k_multi_(emas, params, ws, switch_index)
        for k in range(3):
            kernels.ema_update_multi_(expected_emas[k], expected_params, ws[k])
        if switch_index is not None:
            for ema, param in zip(expected_emas[switch_index], expected_params, strict=True):
                kernels.switch_(flat(ema), flat(param))
        for i, param in enumerate(params):
            what = f"step {step}, param {i} {tuple(param.shape)} {pair_id((param.dtype, emas[0][i].dtype))}"
            for k in range(3):
                assert_bits_equal(emas[k][i], expected_emas[k][i], f"{what}: ema {k}")
                assert emas[k][i].stride() == param.stride()
            assert_bits_equal(param, expected_params[i], f"{what}: param")
    assert len(counter.grids) == 2 * len(DTYPE_PAIRS), "one launch per dtype pair per call"


def test_multi_more_than_eight_emas(generator):
    params = [random_values(n, torch.float32, generator) for n in (5, BLOCK + 3)]
    emas = [[random_values(p.numel(), torch.float32, generator) for p in params] for _ in range(9)]
    ws = torch.rand(9, generator=generator).to(DEVICE)
    expected_emas, expected_params = [[e.clone() for e in row] for row in emas], [p.clone() for p in params]
    kernels.ema_update_k_multi_(emas, params, ws, 0)
    for k in range(9):
        kernels.ema_update_multi_(expected_emas[k], expected_params, ws[k])
    for ema, param in zip(expected_emas[0], expected_params, strict=True):
        kernels.switch_(ema, param)
    for k in range(9):
        for i in range(2):
            assert_bits_equal(emas[k][i], expected_emas[k][i], f"ema {k}, param {i}")
    for i in range(2):
        assert_bits_equal(params[i], expected_params[i], f"param {i}")


def test_multi_block_table_entries():
    """K = 2: one entry per block with both EMA addresses, the param address and the count. A head
    that all three leave together is an entry of its own; EMAs that never align together run
    every full block through the masked path (count ``block + 1``)."""
    multi = importlib.import_module("sema.kernels.multi")
    block, base = BLOCK, 1 << 20
    rows = [
        base, 2 * base, 3 * base, block + 5,  # aligned: a full block and a tail of 5
        base + 4, 2 * base + 4, 3 * base + 10, block + 3,  # aligned together after 3 elements
        base, 2 * base + 4, 3 * base, block,  # the two EMAs never align together
    ]  # fmt: skip
    assert multi._entries(rows, block, 4, 2, n_emas=2) == [
        base + 4 * block, 2 * base + 4 * block, 3 * base + 2 * block, 5,
        base + 4, 2 * base + 4, 3 * base + 10, 3,
        base, 2 * base + 4, 3 * base, block + 1,
        base, 2 * base, 3 * base, block,
        base + 16, 2 * base + 16, 3 * base + 16, block,
    ]  # fmt: skip


def test_multi_only_empty_tensors():
    params = [torch.zeros(0, device=DEVICE), torch.zeros(2, 0, device=DEVICE)]
    emas = [[torch.zeros_like(p) for p in params] for _ in range(2)]
    kernels.ema_update_k_multi_(emas, params, torch.ones(2, device=DEVICE), 1)


# --- routing through sema.ops ---------------------------------------------------------------


def test_ops_route_to_triton(generator, monkeypatch):
    """``backend="triton"`` runs these kernels (each launcher spied on), results checked."""
    import sema

    ema_k = importlib.import_module("sema.kernels.ema_k")
    calls = []
    for launcher in ("_launch_update_k", "_launch_update_k_multi"):
        real = getattr(ema_k, launcher)

        def spy(*args, _real=real, _name=launcher):
            calls.append(_name)
            return _real(*args)

        monkeypatch.setattr(ema_k, launcher, spy)
    param = random_values(N, torch.bfloat16, generator)
    emas = [random_values(N, torch.float32, generator) for _ in range(2)]

    def through_ops(emas, param, ws, switch_index):
        sema.ops.ema_update_k_(emas, param, ws, switch_index, backend="triton")

    check_against_single_updates(emas, param, weights(2, generator), 1, update_k=through_ops)

    def through_ops_multi(emas, param, ws, switch_index):
        sema.ops.ema_update_k_multi_([[ema] for ema in emas], [param], ws, switch_index, backend="triton")

    check_against_single_updates(emas, param, weights(2, generator), 0, update_k=through_ops_multi)
    assert calls == ["_launch_update_k", "_launch_update_k_multi"]

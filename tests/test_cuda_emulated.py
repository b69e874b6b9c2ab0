"""The CUDA kernels of csrc/ema_cuda.cu, run on the CPU.

nvcc builds csrc/ema_cuda.cu with -DSEMA_CUDA_HOST_EMULATION: the same kernel bodies
(``run_flat_block``, ``run_multi_block``), grids (``flat_grid``: one contiguous piece per block,
at most as many blocks as stay resident, here a settable "capacity"), multi-tensor piece tables
(``plan_pieces``) and dtype dispatch as sema._C, with each launch run on the host one (block,
thread) at a time. That is exact for these kernels (each element belongs to one thread; no thread
reads another's), so the tables below check the GPU code's indexing, its unrolled tiles (2 or 4
vectors of 16 bytes per thread, all loaded before the first store), the partial tile that ends a
piece, the scalar tails, the piece boundaries and formulas where no GPU is lent. What it cannot
check is the device itself: the intrinsics' device implementations, the launch, occupancy,
streams and CUDA graphs; tests/test_cuda_ext.py does that on a GPU.

Tolerances as in test_cpp.py and test_cuda_ext.py: bit equality with the ``torch`` backend (the
kernels compute the lerp as one fma, which torch.lerp_ also does on an AVX2 CPU; a NaN only has to
be a NaN), and the fp64 bound of ``conftest.update_bound`` at every step.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

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
from torch import Tensor

from sema import reference
from sema._extension import DTYPE_CODES

ROOT = Path(__file__).resolve().parents[1]
SOURCE = Path(os.environ.get("SEMA_CUDA_SOURCE") or ROOT / "csrc" / "ema_cuda.cu")  # another file: mutants
# Elements per tile (kThreads x kUnroll vectors): 2048 for fp32 updates, 4096 for fp32/16-bit
# pairs and 16-bit updates, 8192 for 16-bit switches; a block's piece is at least 1024 (fp32).
TILE = 4096
SIZES = [0, 1, 15, 17, 1023, 1025, 2047, 2048, 2049, TILE - 1, TILE, TILE + 1, 2 * TILE + 1, 3 * 8192 + 5, 2**20 + 3]
WEIGHTS = [0.0, 1e-4, 0.5, 0.7, 1.0]
STEPS = 20
SWAP_PAIRS = [pair for pair in DTYPE_PAIRS if pair != (torch.float16, torch.float32)]
H200_BLOCKS = 132 * 8  # resident blocks of an H200 (132 SMs) at 8 blocks per SM
BLOCKS = [1, H200_BLOCKS]  # one block walks every tile of the buffer; or many small pieces


def find_nvcc() -> str | None:
    fallback = Path("/usr/local/cuda/bin/nvcc")
    return shutil.which("nvcc") or (str(fallback) if fallback.is_file() else None)


class EmulatedKernels:
    """sema._C's CUDA entry points, built for the host; methods take CPU tensors."""

    def __init__(self, library: Path):
        self.lib = ctypes.CDLL(str(library))
        ptr, i64, i32, f32, err = ctypes.c_size_t, ctypes.c_int64, ctypes.c_int, ctypes.c_float, ctypes.c_char_p
        self.lib.sema_emulated_set_max_blocks.argtypes = [i64]
        self.lib.sema_emulated_update.argtypes = [ptr, ptr, i64, i32, i32, f32, ptr, i32, err, i64]
        self.lib.sema_emulated_update_multi.argtypes = [
            ctypes.POINTER(ptr), ctypes.POINTER(ptr), ctypes.POINTER(i64), ctypes.POINTER(i32),
            ctypes.POINTER(i32), i64, f32, ptr, i32, err, i64,
        ]  # fmt: skip
        self.lib.sema_emulated_switch.argtypes = [ptr, ptr, i64, i32, i32, err, i64]
        self.lib.sema_emulated_swap.argtypes = [ptr, ptr, i64, i32, i32, i32, err, i64]
        self.lib.sema_emulated_plan_multi.argtypes = [
            ctypes.POINTER(ptr), ctypes.POINTER(ptr), ctypes.POINTER(i64), i64, i32, i32,
            ctypes.POINTER(i64), i64, ctypes.POINTER(i64), err, i64,
        ]  # fmt: skip
        self.lib.sema_emulated_flat_grid.argtypes = [i64, i32, ctypes.POINTER(i64), ctypes.POINTER(i64)]
        self.lib.sema_emulated_update_k.argtypes = [ctypes.POINTER(ptr), i32, ptr, i64, i32, i32, ptr, i32, err, i64]
        self.lib.sema_emulated_update_k_multi.argtypes = [
            ctypes.POINTER(ptr), i32, ctypes.POINTER(ptr), ctypes.POINTER(i64), i64, i32, i32, ptr, i32, err, i64,
        ]  # fmt: skip
        self.lib.sema_emulated_plan_k_multi.argtypes = [
            ctypes.POINTER(ptr), i32, ctypes.POINTER(ptr), ctypes.POINTER(i64), i64, i32, i32,
            ctypes.POINTER(i64), i64, ctypes.POINTER(i64), err, i64,
        ]  # fmt: skip
        self.set_max_blocks(H200_BLOCKS)

    def flat_grid(self, n: int, vector: int) -> tuple[int, int]:
        """(blocks, elements per block) of a flat launch over n elements."""
        blocks, piece = ctypes.c_int64(), ctypes.c_int64()
        assert self.lib.sema_emulated_flat_grid(n, vector, ctypes.byref(blocks), ctypes.byref(piece)) == 0
        return blocks.value, piece.value

    def set_max_blocks(self, blocks: int) -> None:
        """How many blocks the launches treat as resident at once (SMs x blocks per SM)."""
        self.lib.sema_emulated_set_max_blocks(blocks)

    @contextlib.contextmanager
    def max_blocks(self, blocks: int) -> Iterator[None]:
        self.set_max_blocks(blocks)
        try:
            yield
        finally:
            self.set_max_blocks(H200_BLOCKS)

    def plan_multi(self, emas: list[Tensor], params: list[Tensor]) -> list[tuple[int, int, int]]:
        """The multi-tensor piece table of one dtype pair: (ema address, param address, count)."""
        n = len(emas)
        codes = self._pair(emas[0], params[0]) if emas else (0, 0)
        room = 3 * (H200_BLOCKS + n + 16)
        table, written = (ctypes.c_int64 * room)(), ctypes.c_int64()
        self._call(
            self.lib.sema_emulated_plan_multi,
            (ctypes.c_size_t * n)(*[e.data_ptr() for e in emas]),
            (ctypes.c_size_t * n)(*[p.data_ptr() for p in params]),
            (ctypes.c_int64 * n)(*[e.numel() for e in emas]),
            n,
            *codes,
            table,
            room,
            ctypes.byref(written),
        )
        values = [table[i] for i in range(written.value)]
        return [tuple(values[i : i + 3]) for i in range(0, len(values), 3)]

    @staticmethod
    def _call(fn, *args) -> None:
        error = ctypes.create_string_buffer(1024)
        if fn(*args, error, len(error)) != 0:
            raise RuntimeError(error.value.decode())

    @staticmethod
    def _weight(w: float | Tensor) -> tuple[float, int]:
        if isinstance(w, Tensor):
            assert w.dtype == torch.float32 and w.numel() == 1 and w.device.type == "cpu"
            return 0.0, w.data_ptr()  # the kernels read w through the pointer, as on the GPU
        return float(w), 0

    @staticmethod
    def _pair(ema: Tensor, param: Tensor) -> tuple[int, int]:
        assert ema.is_contiguous() and param.is_contiguous() and ema.numel() == param.numel()
        return DTYPE_CODES[ema.dtype], DTYPE_CODES[param.dtype]

    def ema_update_(self, ema: Tensor, param: Tensor, w: float | Tensor, switch: bool = False) -> None:
        codes = self._pair(ema, param)
        w_value, w_ptr = self._weight(w)
        self._call(
            self.lib.sema_emulated_update, ema.data_ptr(), param.data_ptr(), ema.numel(), *codes, w_value, w_ptr, switch
        )

    def ema_update_multi_(self, emas: list[Tensor], params: list[Tensor], w: float | Tensor, switch: bool) -> None:
        n = len(emas)
        codes = [self._pair(e, p) for e, p in zip(emas, params, strict=True)]
        w_value, w_ptr = self._weight(w)
        self._call(
            self.lib.sema_emulated_update_multi,
            (ctypes.c_size_t * n)(*[e.data_ptr() for e in emas]),
            (ctypes.c_size_t * n)(*[p.data_ptr() for p in params]),
            (ctypes.c_int64 * n)(*[e.numel() for e in emas]),
            (ctypes.c_int * n)(*[c[0] for c in codes]),
            (ctypes.c_int * n)(*[c[1] for c in codes]),
            n,
            w_value,
            w_ptr,
            switch,
        )

    @staticmethod
    def _weights(ws: Tensor) -> int:
        assert ws.dtype == torch.float32 and ws.dim() == 1 and ws.is_contiguous() and ws.device.type == "cpu"
        return ws.data_ptr()  # read by the kernels, as on the GPU

    def ema_update_k_(self, emas: list[Tensor], param: Tensor, ws: Tensor, switch_index: int | None) -> None:
        """K EMAs of one flat param in one launch (K <= 8)."""
        codes = self._pair(emas[0], param)
        for ema in emas:
            assert self._pair(ema, param) == codes
        self._call(
            self.lib.sema_emulated_update_k,
            (ctypes.c_size_t * len(emas))(*[e.data_ptr() for e in emas]),
            len(emas),
            param.data_ptr(),
            param.numel(),
            *codes,
            self._weights(ws),
            -1 if switch_index is None else switch_index,
        )

    def _k_arrays(self, emas: list[list[Tensor]], params: list[Tensor]) -> tuple:
        n, k = len(params), len(emas)
        return (
            (ctypes.c_size_t * (k * n))(*[e.data_ptr() for row in emas for e in row]),
            k,
            (ctypes.c_size_t * n)(*[p.data_ptr() for p in params]),
            (ctypes.c_int64 * n)(*[p.numel() for p in params]),
            n,
        )

    def ema_update_k_multi_(
        self, emas: list[list[Tensor]], params: list[Tensor], ws: Tensor, switch_index: int | None
    ) -> None:
        """emas[k][i] is EMA k of params[i]; one piece table and one launch per dtype pair, as
        sema/_ext_cuda.py does on the device."""
        groups: dict[tuple[int, int], list[int]] = {}
        for i, param in enumerate(params):
            codes = self._pair(emas[0][i], param)
            assert all(self._pair(row[i], param) == codes for row in emas)
            groups.setdefault(codes, []).append(i)
        for codes, members in groups.items():
            self._call(
                self.lib.sema_emulated_update_k_multi,
                *self._k_arrays([[row[i] for i in members] for row in emas], [params[i] for i in members]),
                *codes,
                self._weights(ws),
                -1 if switch_index is None else switch_index,
            )

    def plan_k_multi(self, emas: list[list[Tensor]], params: list[Tensor]) -> list[tuple[int, ...]]:
        """The K-EMA piece table of one dtype pair: (param address, count, K EMA addresses)."""
        k = len(emas)
        room = (k + 2) * (H200_BLOCKS + len(params) + 16)
        table, written = (ctypes.c_int64 * room)(), ctypes.c_int64()
        self._call(
            self.lib.sema_emulated_plan_k_multi,
            *self._k_arrays(emas, params),
            *self._pair(emas[0][0], params[0]),
            table,
            room,
            ctypes.byref(written),
        )
        values = [table[i] for i in range(written.value)]
        return [tuple(values[i : i + k + 2]) for i in range(0, len(values), k + 2)]

    def switch_(self, ema: Tensor, param: Tensor) -> None:
        codes = self._pair(ema, param)
        self._call(self.lib.sema_emulated_switch, ema.data_ptr(), param.data_ptr(), ema.numel(), *codes)

    def swap_(self, ema: Tensor, param: Tensor, restore: bool = False) -> None:
        codes = self._pair(ema, param)
        self._call(self.lib.sema_emulated_swap, ema.data_ptr(), param.data_ptr(), ema.numel(), *codes, restore)


@pytest.fixture(scope="module")
def kernels(tmp_path_factory) -> EmulatedKernels:
    nvcc = find_nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found: the emulated CUDA kernels need it to build")
    digest = hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:16]
    library = tmp_path_factory.mktemp("cuda-emulation") / f"libsema_cuda_emulated_{digest}.so"
    command = [nvcc, "-std=c++17", "-O2", "-Xcompiler", "-fPIC", "-shared", "-DSEMA_CUDA_HOST_EMULATION"]
    build = subprocess.run(
        [*command, "-o", str(library), str(SOURCE)], capture_output=True, text=True, timeout=600, check=False
    )
    assert build.returncode == 0, f"nvcc failed:\n{build.stderr[-4000:]}"
    return EmulatedKernels(library)


def torch_lerp_is_one_fma() -> bool:
    """torch.lerp_ on this CPU rounds as the kernels (one fma) when its capability is AVX2 or up."""
    return torch.backends.cpu.get_cpu_capability() != "DEFAULT"


# --- updates ------------------------------------------------------------------------------


@pytest.mark.parametrize("switch", [False, True], ids=["update", "update_switch"])
@pytest.mark.parametrize("w_as_tensor", [False, True], ids=["w_value", "w_pointer"])
@pytest.mark.parametrize("w", WEIGHTS, ids=lambda w: f"w{w}")
@pytest.mark.parametrize("n", SIZES, ids=lambda n: f"n{n}")
@pytest.mark.parametrize("pair", DTYPE_PAIRS, ids=pair_id)
def test_update_matches_reference_and_fp64(kernels, pair, n, w, w_as_tensor, switch, generator):
    param_dtype, ema_dtype = pair
    ema = random_values(n, ema_dtype, generator)
    expected_ema = ema.clone()
    weight = torch.tensor(w, dtype=torch.float32) if w_as_tensor else w
    for step in range(STEPS if n < 2**20 else 3):
        param = random_values(n, param_dtype, generator)
        expected_param = param.clone()
        e64, p64 = ema.double(), param.double()
        # even steps: one block walks every full tile, the partial tile and the tail of the buffer
        with kernels.max_blocks(BLOCKS[step % 2]):
            kernels.ema_update_(ema, param, weight, switch)
        reference.ema_update_(expected_ema, expected_param, weight, switch)
        what = f"step {step}"
        if torch_lerp_is_one_fma():
            assert_same(ema, expected_ema, f"{what}: ema vs the torch backend")
            assert_same(param, expected_param, f"{what}: param vs the torch backend")
        exact = torch.lerp(e64, p64, fp32_weight(w))
        if w == 0.0:
            assert_bits_equal(ema, e64.to(ema_dtype), f"{what}: w=0 leaves the EMA")
        elif w != 1.0:
            assert_within(ema, exact, update_bound(e64, p64, exact, ema_dtype), f"{what}: vs fp64")
        if switch:
            assert_same(param, ema.to(param_dtype), f"{what}: the switched param must be the cast EMA")
        else:
            assert_bits_equal(param, p64.to(param_dtype), f"{what}: update must not write the param")
        expected_ema.copy_(ema)


@pytest.mark.parametrize("blocks", [1, 2, 3, 7, 64, H200_BLOCKS])
@pytest.mark.parametrize("pair", DTYPE_PAIRS, ids=pair_id)
def test_pieces_for_any_number_of_blocks(kernels, pair, blocks, generator):
    """Blocks of unequal and equal pieces: tiles, partial tiles and tails at piece boundaries."""
    param_dtype, ema_dtype = pair
    for n in (10 * TILE + 123, 7 * TILE, 2**16 + 9):
        ema, param = random_values(n, ema_dtype, generator), random_values(n, param_dtype, generator)
        expected_ema, expected_param = ema.clone(), param.clone()
        with kernels.max_blocks(blocks):
            kernels.ema_update_(ema, param, 0.3, True)
        reference.ema_update_(expected_ema, expected_param, 0.3, True)
        assert_same(ema, expected_ema, f"ema, n={n}")
        assert_same(param, expected_param, f"param, n={n}")


@pytest.mark.parametrize("blocks", [1, 7, 132 * 5, H200_BLOCKS])
@pytest.mark.parametrize("vector", [4, 8])
def test_flat_grid_is_one_wave_of_equal_pieces(kernels, vector, blocks, generator):
    """No more blocks than are resident (no second, partly filled wave), nor than 256-vector
    shares; pieces of whole vectors, equal but for the last, covering the buffer."""
    sizes = [
        1,
        255,
        256 * vector,
        256 * vector + 1,
        10**6 + 7,
        2**31 + 17,
        *torch.randint(1, 2**28, (20,), generator=generator).tolist(),
    ]
    with kernels.max_blocks(blocks):
        for n in sizes:
            count, piece = kernels.flat_grid(n, vector)
            where = f"n={n}: {count} blocks of {piece}"
            assert 1 <= count <= blocks, where
            assert piece % vector == 0 and (count - 1) * piece < n <= count * piece, where
            assert count <= -(-n // (256 * vector)), f"{where}: fewer than 256 vectors per block"
            # as equal as whole vectors allow: less than a vector above an even share of the blocks
            share = n / min(-(-n // (256 * vector)), blocks)
            assert piece < share + vector, f"{where}: an even share is {share:.1f}"


@pytest.mark.parametrize("blocks", BLOCKS)
@pytest.mark.parametrize("offset", [1, 2, 3])
@pytest.mark.parametrize("pair", DTYPE_PAIRS, ids=pair_id)
def test_unaligned_views_take_the_scalar_path(kernels, pair, offset, blocks, generator):
    """Views starting `offset` elements in: the 16-byte vector path is off, the scalar loop runs."""
    param_dtype, ema_dtype = pair
    n = 3 * TILE + 77
    ema = random_values(n + offset, ema_dtype, generator)
    param = random_values(n + offset, param_dtype, generator)
    head_e, head_p = ema[:offset].clone(), param[:offset].clone()
    expected_ema, expected_param = ema[offset:].clone(), param[offset:].clone()
    with kernels.max_blocks(blocks):
        kernels.ema_update_(ema[offset:], param[offset:], 0.3, True)
    reference.ema_update_(expected_ema, expected_param, 0.3, True)
    assert_same(ema[offset:], expected_ema, "unaligned ema")
    assert_same(param[offset:], expected_param, "unaligned param")
    assert_bits_equal(ema[:offset], head_e, "bytes before the view")
    assert_bits_equal(param[:offset], head_p, "bytes before the view")


@pytest.mark.parametrize("blocks", [3, H200_BLOCKS])
@pytest.mark.parametrize("switch", [False, True], ids=["update", "update_switch"])
def test_multi_many_tensors(kernels, switch, blocks, generator):
    """150 pairs of mixed dtypes and sizes (0 included): one piece table and one launch per
    dtype pair; with 3 resident blocks the pieces span many tiles, with an H200's they are small."""
    emas, params = [], []
    for i in range(150):
        param_dtype, ema_dtype = DTYPE_PAIRS[i % len(DTYPE_PAIRS)]
        n = (i * 7919) % 20_000 if i % 11 else 0
        emas.append(random_values(n, ema_dtype, generator))
        params.append(random_values(n, param_dtype, generator))
    expected = [(e.clone(), p.clone()) for e, p in zip(emas, params, strict=True)]
    w = torch.tensor(2e-3)
    with kernels.max_blocks(blocks):
        kernels.ema_update_multi_(emas, params, w, switch)
    for i, (e, p) in enumerate(expected):
        reference.ema_update_(e, p, w, switch)
        assert_same(emas[i], e, f"pair {i} ema")
        assert_same(params[i], p, f"pair {i} param")


def test_every_element_written_once_in_a_multi_launch(kernels):
    """65 tensors of odd sizes with w=1 (ema <- param): every element, and only those, changes."""
    sizes = [(i * 4099) % 30_000 + 1 for i in range(65)]
    params = [torch.arange(1, n + 1, dtype=torch.float32) for n in sizes]
    guard = [torch.full((n + 8,), -7.0) for n in sizes]  # views with untouched tails
    emas = [g[:n] for g, n in zip(guard, sizes, strict=True)]
    kernels.ema_update_multi_(emas, params, 1.0, False)
    for g, p, n in zip(guard, params, sizes, strict=True):
        assert_bits_equal(g[:n], p, f"tensor of {n}")
        assert_bits_equal(g[n:], torch.full((8,), -7.0), f"past the end of a tensor of {n}")


@pytest.mark.parametrize("blocks", [1, 7, 100, H200_BLOCKS])
@pytest.mark.parametrize("count", [1, 3, 40, 600, 2000])
@pytest.mark.parametrize("pair", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32)], ids=pair_id)
def test_multi_piece_table(kernels, pair, count, blocks, generator):
    """The piece table partitions every non-empty tensor, in order, into pieces of one size (a
    whole number of 16-byte vectors, the last of each tensor shorter), and with fewer tensors
    than half the resident blocks it has at most one piece per resident block: one wave."""
    param_dtype, ema_dtype = pair
    vector = 16 // param_dtype.itemsize
    sizes = torch.randint(0, 50_000 if count < 100 else 3_000, (count,), generator=generator).tolist()
    sizes[-1] = 0  # an empty tensor gets no piece
    sizes[0] = max(sizes[0], 1)
    emas = [torch.empty(n, dtype=ema_dtype) for n in sizes]
    params = [torch.empty(n, dtype=param_dtype) for n in sizes]
    with kernels.max_blocks(blocks):
        pieces = kernels.plan_multi(emas, params)
    rows = iter(pieces)
    piece = max(n for _, _, n in pieces)
    for i, (e, p) in enumerate(zip(emas, params, strict=True)):
        covered = 0
        while covered < e.numel():
            row = next(rows, None)
            assert row is not None, f"tensor {i} covered up to {covered} of {e.numel()}"
            ema_at, param_at, n = row
            where = f"tensor {i} of {e.numel()}, piece at {covered}"
            assert ema_at == e.data_ptr() + covered * e.element_size(), f"{where}: ema address"
            assert param_at == p.data_ptr() + covered * p.element_size(), f"{where}: param address"
            assert n == min(piece, e.numel() - covered), f"{where}: {n} elements, pieces of {piece}"
            if n < e.numel():  # a tensor cut in pieces: they start on 16-byte vectors
                assert piece % vector == 0 and piece >= 256 * vector, f"{where}: pieces of {piece} elements"
            covered += n
    assert next(rows, None) is None, "pieces past the last tensor"
    if 2 * sum(n > 0 for n in sizes) <= blocks:
        assert len(pieces) <= blocks, f"{len(pieces)} pieces for {blocks} resident blocks"


# --- K EMAs in one pass -------------------------------------------------------------------

# Tiles of the K-EMA kernels: 4 (16-byte EMA vectors) or 2 (32-byte) vectors per thread, so 4096
# elements for fp32 EMAs, 8192 for flat 16-bit pairs, 4096 for multi-tensor 16-bit pairs.
K_SIZES = [0, 1, 15, 17, 1025, 2047, 4095, 4096, 4097, 8191, 8192, 8193, 3 * 8192 + 5]
K_COUNTS = [1, 2, 3, 8]


def k_weights(k: int, generator: torch.Generator) -> Tensor:
    """K fp32 weights: the edge weights 0, 1, 0.5 and 1e-4 among random ones."""
    edges = torch.tensor([0.0, 1.0, 0.5, 1e-4])
    ws = torch.rand(k, generator=generator)
    picks = torch.randperm(k, generator=generator)[: min(k, 2)]
    ws[picks] = edges[torch.randint(0, 4, (picks.numel(),), generator=generator)]
    return ws


def k_single_updates(kernels, emas: list[Tensor], param: Tensor, ws: Tensor, switch_index: int | None) -> None:
    """The contract's definition: K separate single-op updates (w = ws[k] read through a pointer),
    then switch_(emas[switch_index], param)."""
    for k, ema in enumerate(emas):
        kernels.ema_update_(ema, param, ws[k : k + 1].view(()), False)
    if switch_index is not None:
        kernels.switch_(emas[switch_index], param)


def switch_ids(k: int) -> list[int | None]:
    return [None, 0, k - 1] if k > 1 else [None, 0]


@pytest.mark.parametrize("n", K_SIZES, ids=lambda n: f"n{n}")
@pytest.mark.parametrize("k", K_COUNTS, ids=lambda k: f"K{k}")
@pytest.mark.parametrize("pair", DTYPE_PAIRS, ids=pair_id)
def test_k_update_bit_equal_to_k_single_updates(kernels, pair, k, n, generator):
    """Every switch_index (None, 0, K-1), many steps, one block or an H200's: bit for bit the K
    single updates, NaN payloads included."""
    param_dtype, ema_dtype = pair
    emas = [random_values(n, ema_dtype, generator) for _ in range(k)]
    expected = [e.clone() for e in emas]
    for step, switch_index in enumerate(switch_ids(k) * 2):
        param = random_values(n, param_dtype, generator)
        expected_param = param.clone()
        ws = k_weights(k, generator)
        with kernels.max_blocks(BLOCKS[step % 2]):
            kernels.ema_update_k_(emas, param, ws, switch_index)
        k_single_updates(kernels, expected, expected_param, ws, switch_index)
        what = f"step {step}, switch_index {switch_index}, ws {ws.tolist()}"
        for i in range(k):
            assert_bits_equal(emas[i], expected[i], f"{what}: EMA {i}")
        assert_bits_equal(param, expected_param, f"{what}: param")


@pytest.mark.parametrize("k", [2, 8], ids=lambda k: f"K{k}")
@pytest.mark.parametrize("pair", DTYPE_PAIRS, ids=pair_id)
def test_k_update_large_and_nonfinite(kernels, pair, k, generator):
    """2**20 + 3 elements of random bit patterns (NaN payloads, Inf, subnormals) in the EMAs and
    the param, the switch to the last EMA: bit for bit the K single updates."""
    param_dtype, ema_dtype = pair
    n = 2**20 + 3
    emas = [random_bits(n, ema_dtype, generator) for _ in range(k)]
    param = random_bits(n, param_dtype, generator)
    expected, expected_param = [e.clone() for e in emas], param.clone()
    ws = k_weights(k, generator)
    kernels.ema_update_k_(emas, param, ws, k - 1)
    k_single_updates(kernels, expected, expected_param, ws, k - 1)
    for i in range(k):
        assert_bits_equal(emas[i], expected[i], f"EMA {i}")
    assert_bits_equal(param, expected_param, "param")


@pytest.mark.parametrize("blocks", BLOCKS)
@pytest.mark.parametrize("pair", DTYPE_PAIRS, ids=pair_id)
def test_k_update_unaligned_views(kernels, pair, blocks, generator):
    """One EMA view, or the param view, starting 1-3 elements in: the piece takes the scalar
    path; the bytes before each view stay."""
    param_dtype, ema_dtype = pair
    n, k = 3 * 8192 + 77, 3
    for offsets in ([0, 1, 0, 0], [0, 0, 0, 3], [2, 0, 0, 0], [1, 1, 1, 1]):  # (param, EMA 0, 1, 2)
        buffers = [random_values(n + 3, ema_dtype, generator) for _ in range(k)]
        param_buffer = random_values(n + 3, param_dtype, generator)
        heads = [b.clone() for b in [param_buffer, *buffers]]
        emas = [b[o : o + n] for b, o in zip(buffers, offsets[1:], strict=True)]
        param = param_buffer[offsets[0] : offsets[0] + n]
        expected, expected_param = [e.clone() for e in emas], param.clone()
        ws = k_weights(k, generator)
        with kernels.max_blocks(blocks):
            kernels.ema_update_k_(emas, param, ws, 1)
        k_single_updates(kernels, expected, expected_param, ws, 1)
        for i in range(k):
            assert_bits_equal(emas[i], expected[i], f"offsets {offsets}: EMA {i}")
        assert_bits_equal(param, expected_param, f"offsets {offsets}: param")
        for buffer, head, offset in zip([param_buffer, *buffers], heads, offsets, strict=True):
            assert_bits_equal(buffer[:offset], head[:offset], f"offsets {offsets}: bytes before a view")
            assert_bits_equal(buffer[offset + n :], head[offset + n :], f"offsets {offsets}: bytes after a view")


@pytest.mark.parametrize("switch_index", [None, 0, 2], ids=lambda s: f"switch{s}")
@pytest.mark.parametrize("blocks", [3, H200_BLOCKS])
def test_k_multi_many_tensors(kernels, blocks, switch_index, generator):
    """150 tensors of mixed dtype pairs and sizes (0 included), K = 3: bit for bit the K single
    updates of each tensor."""
    k = 3
    emas: list[list[Tensor]] = [[] for _ in range(k)]
    params = []
    for i in range(150):
        param_dtype, ema_dtype = DTYPE_PAIRS[i % len(DTYPE_PAIRS)]
        n = (i * 7919) % 20_000 if i % 11 else 0
        for row in emas:
            row.append(random_values(n, ema_dtype, generator))
        params.append(random_values(n, param_dtype, generator))
    expected = [[e.clone() for e in row] for row in emas]
    expected_params = [p.clone() for p in params]
    ws = k_weights(k, generator)
    with kernels.max_blocks(blocks):
        kernels.ema_update_k_multi_(emas, params, ws, switch_index)
    for i in range(len(params)):
        k_single_updates(kernels, [row[i] for row in expected], expected_params[i], ws, switch_index)
        for j in range(k):
            assert_bits_equal(emas[j][i], expected[j][i], f"tensor {i}, EMA {j}")
        assert_bits_equal(params[i], expected_params[i], f"tensor {i}, param")


@pytest.mark.parametrize("k", [1, 8], ids=lambda k: f"K{k}")
@pytest.mark.parametrize("pair", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16)], ids=pair_id)
def test_k_multi_unaligned_and_many_steps(kernels, pair, k, generator):
    """Views at odd offsets among aligned ones, 6 steps, switching EMA (step % K) each step."""
    param_dtype, ema_dtype = pair
    sizes = [5000, 1, 8193, 4096, 12_345]
    offsets = [0, 1, 3, 0, 2]
    emas = [[random_values(n + 4, ema_dtype, generator)[o : o + n] for n, o in zip(sizes, offsets, strict=True)]]
    emas += [[random_values(n, ema_dtype, generator) for n in sizes] for _ in range(k - 1)]
    params = [
        random_values(n + 4, param_dtype, generator)[o : o + n] for n, o in zip(sizes, offsets[::-1], strict=True)
    ]
    expected = [[e.clone() for e in row] for row in emas]
    expected_params = [p.clone() for p in params]
    for step in range(6):
        ws = k_weights(k, generator)
        switch_index = step % k
        kernels.ema_update_k_multi_(emas, params, ws, switch_index)
        for i in range(len(sizes)):
            k_single_updates(kernels, [row[i] for row in expected], expected_params[i], ws, switch_index)
        for i in range(len(sizes)):
            for j in range(k):
                assert_bits_equal(emas[j][i], expected[j][i], f"step {step}: tensor {i}, EMA {j}")
            assert_bits_equal(params[i], expected_params[i], f"step {step}: tensor {i}, param")


@pytest.mark.parametrize("blocks", [1, 7, H200_BLOCKS])
@pytest.mark.parametrize("k", [1, 3, 8], ids=lambda k: f"K{k}")
def test_k_multi_piece_table_cuts_as_the_single_table(kernels, k, blocks, generator):
    """The K-EMA table cuts every tensor where the single-op table does; each row's EMA k address
    is EMA k's base plus the row's offset into the tensor."""
    sizes = torch.randint(0, 40_000, (40,), generator=generator).tolist()
    sizes[0], sizes[-1] = max(sizes[0], 1), 0
    params = [torch.empty(n, dtype=torch.bfloat16) for n in sizes]
    emas = [[torch.empty(n) for n in sizes] for _ in range(k)]
    with kernels.max_blocks(blocks):
        rows = kernels.plan_k_multi(emas, params)
        singles = kernels.plan_multi(emas[0], params)
    assert len(rows) == len(singles), f"{len(rows)} K-EMA pieces, {len(singles)} single-op pieces"
    owner = {p.data_ptr(): i for i, p in enumerate(params) if p.numel()}
    for r, (row, single) in enumerate(zip(rows, singles, strict=True)):
        param_at, count, *ema_at = row
        assert (param_at, count) == (single[1], single[2]), f"row {r}: {row[:2]} vs {single[1:]}"
        assert ema_at[0] == single[0], f"row {r}: EMA 0 address"
        base = max(a for a in owner if a <= param_at)
        offset = (param_at - base) // 2
        for j in range(k):
            expected = emas[j][owner[base]].data_ptr() + 4 * offset
            assert ema_at[j] == expected, f"row {r}: EMA {j} at {ema_at[j]}, expected {expected}"


def test_k_negative_control_switch_before_the_last_read(kernels, generator):
    """A wrong K-EMA (EMA 0 switches the param before EMA 1 reads it) fails the comparison the
    tests above make."""
    n = 3 * TILE + 5
    emas = [random_values(n, torch.float32, generator) for _ in range(2)]
    param = random_values(n, torch.float32, generator)
    expected, expected_param = [e.clone() for e in emas], param.clone()
    ws = torch.tensor([0.3, 0.6])
    kernels.ema_update_(emas[0], param, ws[0:1].view(()), True)  # switches first: wrong
    kernels.ema_update_(emas[1], param, ws[1:2].view(()), False)
    k_single_updates(kernels, expected, expected_param, ws, 0)
    with pytest.raises(AssertionError):
        assert_bits_equal(emas[1], expected[1], "EMA 1")


def test_k_update_refuses_more_than_8_emas_per_pass(kernels):
    emas = [torch.zeros(4) for _ in range(9)]
    with pytest.raises(RuntimeError, match=r"9 EMAs; one pass takes 1 to 8"):
        kernels.ema_update_k_(emas, torch.zeros(4), torch.zeros(9), None)


# --- switch and swap ----------------------------------------------------------------------


@pytest.mark.parametrize("param_dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_switch_cast_bit_equal_to_torch(kernels, param_dtype, generator):
    ema = special_fp32(generator)
    param = poisoned(ema.numel(), param_dtype)
    kernels.switch_(ema, param)
    assert_same(param, ema.to(param_dtype), f"fp32 -> {param_dtype}")


@pytest.mark.parametrize("blocks", BLOCKS)
@pytest.mark.parametrize("pair", DTYPE_PAIRS, ids=pair_id)
def test_switch_matches_reference(kernels, pair, blocks, generator):
    param_dtype, ema_dtype = pair
    for n in [*SIZES, 8191, 8192, 3 * 8192 + 1]:
        ema = random_values(n, ema_dtype, generator)
        param = poisoned(n, param_dtype)
        with kernels.max_blocks(blocks):
            kernels.switch_(ema, param)
        expected = poisoned(n, param_dtype)
        reference.switch_(ema, expected)
        assert_same(param, expected, f"switch n={n}")


@pytest.mark.parametrize("blocks", BLOCKS)
@pytest.mark.parametrize("n", [1, 17, 2047, TILE + 1, 8193, 2**20 + 3], ids=lambda n: f"n{n}")
@pytest.mark.parametrize("pair", SWAP_PAIRS, ids=pair_id)
def test_swap_bit_exact_and_restores(kernels, pair, n, blocks, generator):
    """Random bit patterns (NaN payloads included): the swap equals the reference's, and the
    restoring swap gives back both buffers bit for bit."""
    param_dtype, ema_dtype = pair
    ema_bits = torch.randint(-(2**31), 2**31, (n,), dtype=torch.int64, generator=generator)
    param_bits = torch.randint(-(2**15), 2**15, (n,), dtype=torch.int64, generator=generator)
    ema = ema_bits.to(BITS[torch.empty((), dtype=ema_dtype).element_size()]).view(ema_dtype)
    param = param_bits.to(torch.int32 if param_dtype == torch.float32 else torch.int16).view(param_dtype)
    ema0, param0 = ema.clone(), param.clone()
    expected_ema, expected_param = ema.clone(), param.clone()
    with kernels.max_blocks(blocks):
        kernels.swap_(ema, param)
    reference.swap_(expected_ema, expected_param)
    assert_bits_equal(ema, expected_ema, "swapped ema")
    assert_bits_equal(param, expected_param, "swapped param")
    with kernels.max_blocks(blocks):
        kernels.swap_(ema, param, restore=True)
    assert_bits_equal(ema, ema0, "restored ema")
    assert_bits_equal(param, param0, "restored param")


# --- negative controls --------------------------------------------------------------------


def test_the_checks_see_a_launch_that_misses_elements(kernels, generator):
    """Negative control for the comparisons above: an update that leaves the last tile alone
    (as a lost block would) fails them. (Mutating the kernel source itself also fails this file,
    checked by hand: a masked tail loop that stops one vector early, a flat grid whose pieces
    are rounded down instead of up, a piece table whose pieces skip the last element.)"""
    n = 3 * TILE
    ema, param = random_values(n, torch.float32, generator), random_values(n, torch.float32, generator)
    expected_ema, expected_param = ema.clone(), param.clone()
    kernels.ema_update_(ema[: 2 * TILE], param[: 2 * TILE], 0.3, False)  # stands for a lost block
    reference.ema_update_(expected_ema, expected_param, 0.3, False)
    with pytest.raises(AssertionError):
        assert_same(ema, expected_ema, "ema")


def test_bad_dtype_pair_raises_with_the_op_name(kernels):
    with pytest.raises(RuntimeError, match=r"sema ema_update_ \[cuda\]: unsupported dtype pair"):
        kernels.ema_update_(torch.zeros(4, dtype=torch.bfloat16), torch.zeros(4, dtype=torch.float16), 0.5)

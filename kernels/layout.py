"""How a block of a flat tensor is spread over threads, shared by every kernel.

A block is ``ROWS`` rows of ``ROW`` elements, a row being two 16-byte vectors of the widest
tensor of the op (8 fp32 or 16 bf16/fp16 elements), and each thread owns whole rows. The
widest tensors are read and written as two ``[ROWS, ROW // 2]`` halves, one vector per row
each; a 2-byte tensor beside a 4-byte one as whole ``[ROWS, ROW]`` rows, one vector per row,
split into halves in registers (:func:`split_rows`) and joined back (:func:`join_rows`).

Why not 1-D blocks: Triton gives each memory access its own layout and caps a store at 16
bytes per thread, so a 1-D fp32 store gets 4 elements per thread while the bf16 access
beside it gets 8, and the values cross warps through shared memory (``st.shared`` and
``bar.sync`` in the PTX) on every block. Why not one 3-D ``[ROWS, 2, ROW // 2]`` view of
the wide tensor: Triton 3.6 and 3.9 order its two non-contiguous dimensions differently,
and one of the two orders puts neighbouring threads on the two halves of a row.

Only the last block of a tensor is masked, and it runs in ``TAIL_PARTS`` passes of fewer
rows: its masked, possibly scalar accesses then need no more registers than a full block,
and the register count of the whole kernel (which sets how many blocks fit on an SM) stays
that of the unmasked body.
"""

from __future__ import annotations

import triton
import triton.language as tl

TAIL_PARTS = tl.constexpr(4)


@triton.jit
def first_element(BLOCK: tl.constexpr):
    """The first element of this program's block, in int64 (buckets past 2**31 elements). The
    partial last block, if any, goes to program 0: blocks usually start in program order, and
    its slower masked passes then run beside the full blocks instead of after them."""
    program = tl.program_id(0)
    block = tl.where(program == 0, tl.num_programs(0) - 1, program - 1)
    return block.to(tl.int64) * BLOCK


@triton.jit
def row_offsets(ROWS: tl.constexpr, ROW: tl.constexpr):
    """Offsets of ``ROWS`` rows: the first and the second half of each row (``[ROWS, ROW // 2]``
    each), and the whole rows (``[ROWS, ROW]``)."""
    rows = tl.arange(0, ROWS)[:, None] * ROW
    first = rows + tl.arange(0, ROW // 2)[None, :]
    return first, first + ROW // 2, rows + tl.arange(0, ROW)[None, :]


@triton.jit
def split_rows(rows, ROWS: tl.constexpr, ROW: tl.constexpr):
    """``[ROWS, ROW]`` -> its two ``[ROWS, ROW // 2]`` halves; every element stays in its thread."""
    return tl.split(tl.permute(tl.reshape(rows, (ROWS, 2, ROW // 2)), (0, 2, 1)))


@triton.jit
def join_rows(first, second, ROWS: tl.constexpr, ROW: tl.constexpr):
    """The inverse of :func:`split_rows`."""
    return tl.reshape(tl.permute(tl.join(first, second), (0, 2, 1)), (ROWS, ROW))


@triton.jit
def load_rows(ptr, offsets, n_valid, MASKED: tl.constexpr):
    return tl.load(ptr + offsets, mask=offsets < n_valid if MASKED else None)


@triton.jit
def store_rows(ptr, offsets, values, n_valid, MASKED: tl.constexpr):
    tl.store(ptr + offsets, values.to(ptr.dtype.element_ty), mask=offsets < n_valid if MASKED else None)

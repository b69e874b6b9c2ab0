"""Flat parameter buckets: one contiguous buffer per (device, dtype) group of trainable params.

Each param's ``.data`` is re-pointed to a view of its bucket, so the ``Parameter`` objects,
optimizer references and autograd stay intact while one kernel launch covers the bucket.
Each param starts at a 16-byte aligned offset (so kernels can use 16-byte vector loads on
every param); the padding between params is zero in both the param and the EMA buffer.
"""

from __future__ import annotations

import ctypes
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

ALIGN_BYTES = 16

# CPU buckets of this size and more ask Linux for transparent huge pages (see _empty).
HUGE_PAGE_BYTES = 2 << 20
HUGE_PAGE_MIN_BYTES = 4 * HUGE_PAGE_BYTES
_MADV_HUGEPAGE = 14  # <sys/mman.h> on Linux
_LINUX = sys.platform == "linux"


class BucketMovedError(RuntimeError):
    """A bucketed param no longer lives in its bucket (``.to()``, ``load_state_dict(assign=True)``,
    ``param.data = ...``): the EMA would silently stop following it."""


class ParamAliasError(ValueError):
    """Tracked params share memory in a way bucketing would break (a param that is a view of part
    of another, or of a tensor the EMA does not track); raised before any param moves."""


@dataclass
class FlatBucket:
    """Params of one (device, dtype), their flat storage and the matching EMA buffer.

    ``param_flat`` and ``ema_flat`` are 1-D, equal length (padding included); param ``i``
    occupies ``[offsets[i], offsets[i] + numels[i])`` of both. Distinct ``Parameter`` objects
    that shared one memory region before bucketing (old-style tying) share one slot, so they
    stay tied and have one EMA.
    """

    device: torch.device
    dtype: torch.dtype
    param_flat: Tensor
    ema_flat: Tensor
    names: list[str]
    params: list[nn.Parameter]
    offsets: list[int]
    numels: list[int]
    data_ptrs: tuple[int, ...] = field(default=())
    base_ptr: int = 0
    shapes: tuple[tuple[torch.Size, tuple[int, ...]], ...] = field(default=())

    def ema_view(self, index: int) -> Tensor:
        """The EMA of param ``index``, shaped (and strided) like the param."""
        p = self.params[index]
        start = self.ema_flat.storage_offset() + self.offsets[index]
        return self.ema_flat.as_strided(p.shape, _dense_strides(p), start)

    def moved(self) -> list[str]:
        """Names of the params that are no longer views of this bucket's storage at their offsets
        with their shapes (empty when all are). A change that keeps the storage and the offsets is
        no move: ``share_memory_()`` puts the whole storage in shared memory in place, which
        changes every data pointer, so the pointers are re-read from the bucket's base then. An
        empty param holds no memory (its data pointer is 0): only its shape is checked."""
        base = self.param_flat.data_ptr()
        ptrs = tuple(map(Tensor.data_ptr, self.params))
        if base == self.base_ptr and ptrs == self.data_ptrs:
            return []
        size = self.param_flat.element_size()
        start = base - self.param_flat.storage_offset() * size
        moved = [
            name
            for name, p, ptr, offset, numel, layout in zip(
                self.names, self.params, ptrs, self.offsets, self.numels, self.shapes, strict=True
            )
            if ptr != (start + offset * size if numel else 0) or (p.shape, p.stride()) != layout
        ]
        if not moved:
            self.base_ptr, self.data_ptrs = base, ptrs
        return moved


def _dense_strides(t: Tensor) -> tuple[int, ...]:
    """Strides of ``t`` when it is dense (contiguous, channels_last, ...), else contiguous ones,
    so a param keeps its memory format when it moves into the bucket."""
    return torch.empty_like(t, device="meta").stride()


def _align(n: int, dtype: torch.dtype) -> int:
    step = max(1, ALIGN_BYTES // torch.empty((), dtype=dtype).element_size())
    return -(-n // step) * step


def plan_buckets(
    named_params: Sequence[tuple[str, nn.Parameter]],
) -> dict[tuple[torch.device, torch.dtype], list[tuple[str, nn.Parameter]]]:
    """Group params by (device, dtype), keeping model order inside each group."""
    groups: dict[tuple[torch.device, torch.dtype], list[tuple[str, nn.Parameter]]] = {}
    for name, p in named_params:
        groups.setdefault((p.device, p.dtype), []).append((name, p))
    return groups


# --- memory shared between params ---------------------------------------------------------


def _extent(t: Tensor) -> int:
    """Bytes from ``t.data_ptr()`` to one past its last element (its numel for dense tensors)."""
    return (1 + sum((size - 1) * stride for size, stride in zip(t.shape, t.stride(), strict=True))) * t.element_size()


def _memory_key(t: Tensor) -> tuple:
    return (t.data_ptr(), tuple(t.shape), t.stride(), t.dtype)


def check_aliasing(
    named: Sequence[tuple[str, Tensor]],
    untracked: Sequence[tuple[str, Tensor]] = (),
    allow_ties: bool = True,
) -> list[list[str]]:
    """Check how the tracked params ``named`` share memory, before bucketing moves any of them;
    returns the groups of names that are exact ties (distinct ``Parameter`` objects over the same
    memory, shape, strides and dtype: ``head.weight = nn.Parameter(emb.weight)``).

    Raises :class:`ParamAliasError`, naming both tensors and the fix, when a tracked param
    overlaps another one without being an exact tie (a view of part of it), when it overlaps a
    tensor in ``untracked`` (frozen params, buffers: bucketing would move only one side), and
    on exact ties when ``allow_ties`` is false (where params are not bucketed, a tie would be
    two EMAs of one memory). Pass local tensors (a DTensor's shard); tensors on the meta device
    and empty ones hold no memory and are skipped. Sorting by address: O(n log n).
    """
    entries = []
    for tracked, pairs in ((True, named), (False, untracked)):
        for name, t in pairs:
            if t.numel() and t.device.type != "meta" and t.layout == torch.strided:
                start = t.data_ptr()
                entries.append(((t.device.type, t.device.index or 0), start, start + _extent(t), tracked, name, t))
    entries.sort(key=lambda e: (e[0], e[1], -e[2]))
    clusters: list[list[tuple]] = []  # runs of spans that overlap, each start below the run's end
    end = 0
    for entry in entries:
        if clusters and clusters[-1][0][0] == entry[0] and entry[1] < end:
            clusters[-1].append(entry)
            end = max(end, entry[2])
        else:
            clusters.append([entry])
            end = entry[2]
    ties = []
    for cluster in clusters:
        if len(cluster) < 2:
            continue
        tracked_entries = [e for e in cluster if e[3]]
        if not tracked_entries:
            continue
        for e in cluster:
            if not e[3]:
                raise ParamAliasError(
                    f"param {tracked_entries[0][4]!r} shares memory with {e[4]!r}, which the EMA does not track "
                    "(a frozen param or a buffer); bucketing would move only the param and untie them. Give the "
                    "param its own memory (nn.Parameter(t.clone())), or make both trainable and tie them with one "
                    "Parameter object"
                )
        first = tracked_entries[0]
        for e in tracked_entries[1:]:
            if _memory_key(e[5]) != _memory_key(first[5]):
                raise ParamAliasError(
                    f"params {first[4]!r} ({_describe(first[5])}) and {e[4]!r} ({_describe(e[5])}) overlap in "
                    "memory without being the same tensor (one is a view of part of the other); sema cannot keep "
                    "such a relation. Give each its own memory (nn.Parameter(t.clone())), or tie them with one "
                    "Parameter object"
                )
        names = [e[4] for e in tracked_entries]
        if not allow_ties:
            a, b = names[0], names[1]
            raise ParamAliasError(
                f"params {a!r} and {b!r} are distinct Parameters over the same memory (old-style tying); here "
                f"they would get two EMAs of one memory. Tie them with the same Parameter object "
                f"(e.g. `model.{b} = model.{a}`), or untie them with nn.Parameter(t.clone())"
            )
        ties.append(names)
    return ties


def _describe(t: Tensor) -> str:
    return f"{t.dtype} {tuple(t.shape)} at byte {t.data_ptr()} with strides {t.stride()}"


# --- building buckets, all or nothing -----------------------------------------------------


def build_bucket(
    device: torch.device,
    dtype: torch.dtype,
    members: Sequence[tuple[str, nn.Parameter]],
    ema_dtype: torch.dtype,
    ema_device: torch.device | None = None,
) -> FlatBucket:
    """Copy ``members`` into one flat buffer, re-point each ``param.data`` to its view and
    allocate the EMA buffer (initialised to the params, cast to ``ema_dtype``) on ``ema_device``
    (default: the params' device; host memory for CUDA params is pinned, for async copies).

    All or nothing: both buffers are allocated and every value copied before the first param is
    re-pointed, and on any failure every param points at its old memory again. That keeps the
    old params alive until the end: the peak is old params + param bucket + EMA bucket.
    Exact ties (see :func:`check_aliasing`) share one slot; partial overlaps are refused first.
    Params in shared memory (``model.share_memory()``, CPU) get a bucket in shared memory.
    """
    check_aliasing(members)
    params = [p for _, p in members]
    slot_of: dict[tuple, int] = {}
    offsets, numels, sources = [], [], []
    total = 0
    for p in params:
        key = _memory_key(p) if p.numel() else None
        if key is not None and key in slot_of:
            offsets.append(offsets[slot_of[key]])
        else:
            total = _align(total, dtype)
            if key is not None:
                slot_of[key] = len(offsets)
            offsets.append(total)
            sources.append(len(offsets) - 1)
            total += p.numel()
        numels.append(p.numel())
    total = _align(total, dtype)
    shared = device.type == "cpu" and any(p.untyped_storage().is_shared() for p in params)
    flat = _empty(total, dtype, device, shared)
    ema_flat = ema_buffer(total, ema_dtype, device, ema_device, shared)
    originals = [p.data for p in params]
    views = [flat.as_strided(p.shape, _dense_strides(p), offset) for p, offset in zip(params, offsets, strict=True)]
    try:
        with torch.no_grad():
            flat.zero_()
            for i in sources:
                views[i].copy_(originals[i])
            ema_flat.copy_(flat)
            for p, view in zip(params, views, strict=True):
                p.data = view
    except BaseException:
        _restore(params, originals)
        raise
    return FlatBucket(
        device=device,
        dtype=dtype,
        param_flat=flat,
        ema_flat=ema_flat,
        names=[n for n, _ in members],
        params=params,
        offsets=offsets,
        numels=numels,
        data_ptrs=tuple(p.data_ptr() for p in params),
        base_ptr=flat.data_ptr(),
        shapes=tuple((p.shape, p.stride()) for p in params),
    )


def build_buckets(
    plans: Sequence[tuple[torch.device, torch.dtype, Sequence[tuple[str, nn.Parameter]], torch.dtype]],
    ema_device: torch.device | None = None,
) -> list[FlatBucket]:
    """:func:`build_bucket` for each ``(device, dtype, members, ema_dtype)``, all or nothing: the
    params of every plan are checked for shared memory first, and if a later bucket fails (an
    allocation, say), the params of the buckets already built point at their old memory again."""
    check_aliasing([member for _, _, members, _ in plans for member in members])
    params = [p for _, _, members, _ in plans for _, p in members]
    originals = [p.data for p in params]
    built = []
    try:
        for device, dtype, members, ema_dtype in plans:
            built.append(build_bucket(device, dtype, members, ema_dtype, ema_device))
    except BaseException:
        _restore(params, originals)
        raise
    return built


def _restore(params: Sequence[nn.Parameter], originals: Sequence[Tensor]) -> None:
    for p, old in zip(params, originals, strict=True):
        if p.data_ptr() != old.data_ptr() or p.shape != old.shape or p.stride() != old.stride():
            p.data = old


def live_state_dict(model: nn.Module) -> dict[str, object]:
    """``model.state_dict()`` with every tensor copied into its own contiguous storage: the way to
    save the live weights of a bucketed model.

    A bucketed param is a view of its bucket, so ``torch.save`` of any part of
    ``model.state_dict()`` writes the whole bucket, and ``safetensors.torch.save_model`` /
    ``load_model`` refuse the model (its tensors share a storage none of them covers). Save this
    instead (``torch.save(sd, f)`` or ``safetensors.torch.save_file(sd, f)``: each tensor costs
    its own bytes) and load with ``model.load_state_dict(torch.load(f))`` or
    ``model.load_state_dict(safetensors.torch.load_file(f))``, which copy into the bucket (never
    ``assign=True``, which moves params out of it). A snapshot: it costs one copy of the weights.
    Tied params appear under each name, each with its own copy, as ``state_dict()`` lists them.
    """
    return {
        name: value.detach().clone(memory_format=torch.contiguous_format) if isinstance(value, Tensor) else value
        for name, value in model.state_dict().items()
    }


def huge_pages_wanted() -> bool:
    """False when ``SEMA_HUGEPAGES=0`` (or off/false/no) turns the huge-page request off."""
    return os.environ.get("SEMA_HUGEPAGES", "1").strip().lower() not in ("0", "off", "false", "no")


def _empty(numel: int, dtype: torch.dtype, device: torch.device, shared: bool = False) -> Tensor:
    """An uninitialised bucket buffer. On Linux CPUs, one of HUGE_PAGE_MIN_BYTES or more is
    madvise()d MADV_HUGEPAGE over its 2 MiB-aligned interior before sema writes it, so that where
    transparent huge pages are enabled ("always" or "madvise") the kernel backs it with 2 MiB
    pages: every EMA op streams the whole bucket, and with 4 KiB pages that is a TLB miss per
    4 KiB. On the 2-core VM of bench/results/torch_formulations-cpp-*.json ("4 KiB pages" rows)
    that gained 3% in the median. Best effort: large buffers come from a fresh mmap, but glibc
    may serve one under 32 MiB from heap memory used before (its pages stay as they are; the
    hint stays on that range after the bucket is freed, which is harmless), and on any failure
    the buffer simply stays on normal pages. ``shared``: in shared memory, as
    ``Tensor.share_memory_()`` makes it, so that other processes see the writes."""
    flat = torch.empty(numel, dtype=dtype, device=device)
    if shared:  # CPU only; huge pages for shared memory are a separate kernel setting (shmem_enabled)
        return flat.share_memory_()
    nbytes = flat.numel() * flat.element_size()
    if device.type == "cpu" and _LINUX and nbytes >= HUGE_PAGE_MIN_BYTES and huge_pages_wanted():
        start = -(-flat.data_ptr() // HUGE_PAGE_BYTES) * HUGE_PAGE_BYTES
        end = (flat.data_ptr() + nbytes) // HUGE_PAGE_BYTES * HUGE_PAGE_BYTES
        if end > start:
            _madvise_hugepage(start, end - start)
    return flat


def ema_buffer(
    numel: int, dtype: torch.dtype, param_device: torch.device, ema_device: torch.device | None, shared: bool = False
) -> Tensor:
    """An uninitialised EMA buffer for a bucket of params on ``param_device``: on ``ema_device``
    where one is given (offload). Host memory for CUDA params is not pinned: only the host reads
    and writes the EMA (the staging it copies through is pinned), and the pinned allocator rounds
    each block up to a power of two."""
    if ema_device is None or ema_device == param_device:
        return _empty(numel, dtype, param_device, shared)
    return _empty(numel, dtype, ema_device)


def _madvise_hugepage(address: int, length: int) -> bool:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        madvise = libc.madvise
        madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
        madvise.restype = ctypes.c_int
        return madvise(address, length, _MADV_HUGEPAGE) == 0
    except (OSError, AttributeError):
        return False

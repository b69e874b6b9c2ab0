"""The offload and overlap engines (issue #17, sema/offload.py) on the CPU: ``ema_device="cpu"``
runs the GPU pipeline with CPU params (chunked staging copies and the cpp update on a worker
thread, threading events in place of CUDA events), and ``overlap=True`` is accepted and runs
synchronously.

Every comparison is exact (``torch.equal``): the worker runs the same kernel on the same elements
with the same weights as the synchronous update, only in chunks, and every op is elementwise. The
reference is a plain ``SwitchEMA`` on the same backend, on an identical model fed the same data.
Ordering tests make the worker slow on purpose (it waits on a gate) so that a write which the
ordering does not hold back lands inside the pipeline; a negative control shows such a write
does leak into the EMA without ``wait()``, so the check can fail.
"""

from __future__ import annotations

import gc
import subprocess
import sys
import threading
import warnings

import pytest
import torch
from torch import nn

import sema
from sema import offload
from sema.offload import OffloadRaceWarning, OffloadWorkerError

CPP = sema.available_backends("cpu")["cpp"]
BACKENDS = ["torch", pytest.param("cpp", marks=pytest.mark.skipif(not CPP, reason="sema._C not built"))]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


class Net(nn.Module):
    def __init__(self, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.fc1 = nn.Linear(24, 40)
        self.bn = nn.BatchNorm1d(40)
        self.fc2 = nn.Linear(40, 17)
        self.to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.bn(self.fc1(x))))


def twins(seed: int, dtype: torch.dtype = torch.float32) -> tuple[Net, Net]:
    torch.manual_seed(seed)
    a = Net(dtype)
    b = Net(dtype)
    b.load_state_dict(a.state_dict())
    return a, b


def train(pairs: list[tuple[Net, sema.SwitchEMA]], steps: int, seed: int, dtype: torch.dtype) -> None:
    """``steps`` SGD steps of each model on the same batches, ``update()`` after each; the
    offloaded ones through ``attach``."""
    opts = []
    for model, ema in pairs:
        opt = torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9)  # AdamW's eps underflows in fp16
        ema.attach(opt)
        opts.append(opt)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(16, 24, generator=gen).to(dtype)
        for (model, ema), opt in zip(pairs, opts, strict=True):
            opt.zero_grad()
            model(x).float().square().mean().backward()
            opt.step()
            ema.update()


def emas_of(state: dict) -> list[dict[str, torch.Tensor]]:
    return state["ema"] if isinstance(state["ema"], list) else [state["ema"]]


def assert_same_state(expected: dict, actual: dict) -> None:
    for k, (want, got) in enumerate(zip(emas_of(expected), emas_of(actual), strict=True)):
        assert want.keys() == got.keys()
        for name in want:
            w, g = want[name], got[name]
            assert g.dtype == w.dtype and g.shape == w.shape, name
            assert torch.isfinite(w).all(), f"{name}: the reference EMA is not finite; the test trains badly"
            if not torch.equal(w.cpu(), g.cpu()):
                diff = (w.double().cpu() - g.double().cpu()).abs()
                raise AssertionError(f"EMA {k} {name}: {int((diff > 0).sum())} elements differ, max {diff.max():.3g}")
    for name, value in expected["buffers"].items():
        assert torch.equal(value.cpu(), actual["buffers"][name].cpu()), name
    for key in ("step", "calls", "epochs", "num_switches"):
        assert expected[key] == actual[key], key


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize(
    "options",
    [
        {"decay": 0.9},
        {"decay": (0.9, 0.99)},
        {"decay": 0.95, "warmup": "power", "update_every": 3, "buffers": "ema"},
        {"decay": 0.9, "switch_every": 7, "copy_only": ["fc2.bias"], "buffers": "copy"},
        {"decay": 0.9, "update_after_step": 5, "compensate_update_every": False, "update_every": 2},
    ],
    ids=["plain", "two-decays", "power-every3-bufema", "switch7-copyonly", "after5-uncompensated"],
)
@pytest.mark.parametrize(("staging", "chunk"), [(None, 1 << 20), (2, 97)], ids=["direct", "staged-chunk97"])
def test_offload_matches_synchronous_update(
    backend: str, dtype: torch.dtype, options: dict, staging: int | None, chunk: int
) -> None:
    options = {"switch_every": None, **options}
    if dtype != torch.float32 and options.get("buffers") == "ema":
        options["buffers"] = "copy"
    sync_model, off_model = twins(chunk + len(options), dtype)
    sync = sema.SwitchEMA(sync_model, backend=backend, **options)
    off = sema.SwitchEMA(
        off_model,
        backend=backend,
        ema_device="cpu",
        offload_chunk_elements=chunk,
        offload_staging_chunks=staging,
        **options,
    )
    assert off.ema_device == torch.device("cpu") and sync.ema_device is None
    assert (off.staging_bytes > 0) == bool(staging) and sync.staging_bytes == 0
    train([(sync_model, sync), (off_model, off)], 14, seed=chunk, dtype=dtype)
    assert_same_state(sync.state_dict(), off.state_dict())
    for p, q in zip(sync_model.parameters(), off_model.parameters(), strict=True):
        assert torch.equal(p, q)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("chunk", [1, 4097], ids=lambda c: f"chunk{c}")
def test_odd_chunks_and_fp16(dtype: torch.dtype, chunk: int) -> None:
    sync_model, off_model = twins(chunk, dtype)
    sync = sema.SwitchEMA(sync_model, decay=0.8, switch_every=None)
    off = sema.SwitchEMA(
        off_model,
        decay=0.8,
        switch_every=None,
        ema_device="cpu",
        offload_chunk_elements=chunk,
        offload_staging_chunks=2,
    )
    train([(sync_model, sync), (off_model, off)], 5 if chunk == 1 else 20, seed=chunk, dtype=dtype)
    assert_same_state(sync.state_dict(), off.state_dict())


def test_fp64_params_offload() -> None:
    sync_model, off_model = twins(3, torch.float64)
    sync = sema.SwitchEMA(sync_model, decay=0.9, switch_every=None)
    off = sema.SwitchEMA(
        off_model, decay=0.9, switch_every=None, ema_device="cpu", offload_chunk_elements=100, offload_staging_chunks=2
    )
    train([(sync_model, sync), (off_model, off)], 20, seed=3, dtype=torch.float64)
    assert_same_state(sync.state_dict(), off.state_dict())


def test_cpu_params_are_read_directly_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    """No staging for CPU params unless asked: one update per bucket, and wait() returns only
    once it is done (the params are read until then)."""
    model, reference = big_model(17), big_model(17)
    ref = sema.SwitchEMA(reference, decay=0.5, switch_every=None)
    ema = sema.SwitchEMA(model, decay=0.5, switch_every=None, ema_device="cpu", offload_chunk_elements=1000)
    assert ema.staging_bytes == 0 and len(ema._engine.tasks) == len(ema.buckets)
    ref.update()
    gate = Gate(monkeypatch, hold_at=1)
    ema.update()
    assert gate.reached.wait(30)
    waited = threading.Event()

    def wait() -> None:
        ema.wait()
        waited.set()

    waiter = threading.Thread(target=wait)
    waiter.start()
    assert not waited.wait(0.3), "wait() returned while the update still reads the params"
    gate.release.set()
    waiter.join(30)
    assert waited.is_set()
    with torch.no_grad():
        for p in model.parameters():
            p.sub_(100.0)
    assert_same_state(ref.state_dict(), ema.state_dict())


def test_staging_is_two_chunks_of_the_widest_dtype() -> None:
    model = Net()
    model.fc2.to(torch.bfloat16)
    ema = sema.SwitchEMA(model, ema_device="cpu", offload_chunk_elements=256, offload_staging_chunks=2)
    assert ema.staging_bytes == 2 * 256 * 4
    small = sema.SwitchEMA(Net(), ema_device="cpu", offload_chunk_elements=1 << 30, offload_staging_chunks=2)
    numel = small.buckets[0].param_flat.numel()
    assert small.staging_bytes == numel * 4  # a chunk never exceeds the longest bucket, the ring never the chunks


@pytest.mark.parametrize("backend", BACKENDS)
def test_overlap_on_cpu_is_the_synchronous_update(backend: str) -> None:
    a, b = twins(11)
    sync = sema.SwitchEMA(a, decay=(0.9, 0.99), switch_every=None, backend=backend)
    over = sema.SwitchEMA(b, decay=(0.9, 0.99), switch_every=None, backend=backend, overlap=True)
    train([(a, sync), (b, over)], 25, seed=11, dtype=torch.float32)
    assert_same_state(sync.state_dict(), over.state_dict())


# --- ordering ------------------------------------------------------------------------------------


class Gate:
    """Holds the worker before its ``hold_at``-th chunk update until released."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, hold_at: int) -> None:
        self.reached = threading.Event()
        self.release = threading.Event()
        self.count = 0
        original = offload.OffloadEngine._update

        def gated(engine: offload.OffloadEngine, *args: object) -> None:
            self.count += 1
            if self.count == hold_at:
                self.reached.set()
                assert self.release.wait(30), "gate never released"
            original(engine, *args)

        monkeypatch.setattr(offload.OffloadEngine, "_update", gated)


def big_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(256, 256), nn.Linear(256, 256))  # ~131k params


@pytest.mark.parametrize("how", ["attach", "wait"])
def test_write_after_update_never_leaks(monkeypatch: pytest.MonkeyPatch, how: str) -> None:
    model = big_model(1)
    reference = big_model(1)
    ref = sema.SwitchEMA(reference, decay=0.5, switch_every=None, backend="torch")
    ema = sema.SwitchEMA(
        model,
        decay=0.5,
        switch_every=None,
        backend="torch",
        ema_device="cpu",
        offload_chunk_elements=1000,
        offload_staging_chunks=2,
    )
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    if how == "attach":
        ema.attach(opt)
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        p.grad = torch.full_like(p, 100.0)
        with torch.no_grad():
            noise = torch.randn_like(p)
            p.add_(noise)
            q.add_(noise)
    ref.update()
    gate = Gate(monkeypatch, hold_at=3)  # two chunks are copied before the first update: hold at the third
    ema.update()
    assert gate.reached.wait(30)
    threading.Timer(0.2, gate.release.set).start()  # the step below must wait for the worker meanwhile
    if how == "wait":
        ema.wait()
        with torch.no_grad():
            for p in model.parameters():
                p.sub_(100.0)
    else:
        opt.step()  # the attached pre-step hook waits for the copies
    assert_same_state(ref.state_dict(), ema.state_dict())


def test_negative_control_a_racing_write_leaks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without wait()/attach the write races the copies (documented as undefined): here the worker
    is held before copying the later chunks, so the write lands in them and the check above sees it."""
    model = big_model(2)
    reference = big_model(2)
    ref = sema.SwitchEMA(reference, decay=0.5, switch_every=None, backend="torch")
    ema = sema.SwitchEMA(
        model,
        decay=0.5,
        switch_every=None,
        backend="torch",
        ema_device="cpu",
        offload_chunk_elements=1000,
        offload_staging_chunks=2,
    )
    ref.update()
    gate = Gate(monkeypatch, hold_at=1)
    ema.update()
    assert gate.reached.wait(30)
    with torch.no_grad():
        for p in model.parameters():
            p.sub_(100.0)
    gate.release.set()
    with pytest.warns(OffloadRaceWarning):
        state = ema.state_dict()
    with pytest.raises(AssertionError, match="elements differ"):
        assert_same_state(ref.state_dict(), state)


def test_state_dict_mid_flight_waits_and_is_exact(monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = big_model(4), big_model(4)
    sync = sema.SwitchEMA(a, decay=0.7, switch_every=None)
    off = sema.SwitchEMA(
        b, decay=0.7, switch_every=None, ema_device="cpu", offload_chunk_elements=4096, offload_staging_chunks=2
    )
    sync.update()
    gate = Gate(monkeypatch, hold_at=5)
    off.update()
    assert gate.reached.wait(30)
    threading.Timer(0.2, gate.release.set).start()
    assert_same_state(sync.state_dict(), off.state_dict())  # waits for the held update to finish


def test_kill_and_resume_is_bit_identical() -> None:
    options = {"decay": (0.9, 0.999), "warmup": "inverse", "switch_every": None, "buffers": "copy"}
    straight_model, first_model = twins(21)
    straight = sema.SwitchEMA(straight_model, **options)
    first = sema.SwitchEMA(
        first_model, ema_device="cpu", offload_chunk_elements=300, offload_staging_chunks=2, **options
    )
    train([(straight_model, straight), (first_model, first)], 15, seed=5, dtype=torch.float32)
    saved_state, saved_model = first.state_dict(), {k: v.clone() for k, v in first_model.state_dict().items()}
    del first, first_model
    gc.collect()
    resumed_model = Net()
    resumed_model.load_state_dict(saved_model)
    resumed = sema.SwitchEMA(
        resumed_model, ema_device="cpu", offload_chunk_elements=300, offload_staging_chunks=2, **options
    )
    resumed.load_state_dict(saved_state)
    # The optimizer state is not part of the EMA: restart both optimizers from here.
    train([(straight_model, straight), (resumed_model, resumed)], 15, seed=6, dtype=torch.float32)
    assert_same_state(straight.state_dict(), resumed.state_dict())


def test_switch_and_swapped_copy_the_host_ema_in() -> None:
    a, b = twins(8, torch.bfloat16)
    sync = sema.SwitchEMA(a, decay=0.9, switch_every=None)
    off = sema.SwitchEMA(
        b, decay=0.9, switch_every=None, ema_device="cpu", offload_chunk_elements=64, offload_staging_chunks=2
    )
    train([(a, sync), (b, off)], 10, seed=8, dtype=torch.bfloat16)
    live = [p.detach().clone() for p in b.parameters()]
    with sync.swapped(), off.swapped():
        for p, q in zip(a.parameters(), b.parameters(), strict=True):
            assert torch.equal(p, q)  # the fp32 EMA rounded to bf16 the same way
    for p, q in zip(live, b.parameters(), strict=True):
        assert torch.equal(p, q)  # restored bit for bit
    with pytest.raises(sema.SwappedWriteError):
        with off.swapped():
            with torch.no_grad():
                b.fc1.weight.add_(1.0)
    sync.switch()
    off.switch()
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q)


def test_module_view_waits_for_the_update(monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = big_model(9), big_model(9)
    sync = sema.SwitchEMA(a, decay=0.5, switch_every=None)
    off = sema.SwitchEMA(
        b, decay=0.5, switch_every=None, ema_device="cpu", offload_chunk_elements=4096, offload_staging_chunks=2
    )
    teacher = off.module
    with torch.no_grad():
        for p, q in zip(a.parameters(), b.parameters(), strict=True):
            noise = torch.randn_like(p)
            p.add_(noise)
            q.add_(noise)
    sync.update()
    gate = Gate(monkeypatch, hold_at=4)
    off.update()
    assert gate.reached.wait(30)
    threading.Timer(0.2, gate.release.set).start()
    assert off.module is teacher  # the property waits for the pending update
    for p, q in zip(sync.module.parameters(), teacher.parameters(), strict=True):
        assert torch.equal(p, q)


# --- errors --------------------------------------------------------------------------------------


def test_worker_error_surfaces_at_the_next_call_until_reset(monkeypatch: pytest.MonkeyPatch) -> None:
    model = big_model(12)
    ema = sema.SwitchEMA(
        model, decay=0.9, switch_every=None, ema_device="cpu", offload_chunk_elements=5000, offload_staging_chunks=2
    )
    ema.update()
    ema.synchronize()

    def broken(*args: object) -> None:
        raise MemoryError("injected failure in the worker")

    monkeypatch.setattr(offload.ops, "dispatch_update", broken)
    ema.update()  # returns: the failure happens on the worker
    # synchronize() first: wait() returns once the params are read, which may be before the failure
    for call in (ema.synchronize, ema.wait, ema.update, ema.state_dict, ema.switch):
        with pytest.raises(OffloadWorkerError, match="injected failure") as info:
            call()
        assert "Traceback" in str(info.value) and "broken" in str(info.value)
        assert isinstance(info.value.__cause__, MemoryError)
    monkeypatch.undo()
    ema.reset()  # a defined EMA again: updates go on
    ema.update()
    ema.synchronize()
    assert ema.step == 1


def test_worker_error_cleared_by_load_state_dict(monkeypatch: pytest.MonkeyPatch) -> None:
    model = big_model(13)
    ema = sema.SwitchEMA(model, decay=0.9, switch_every=None, ema_device="cpu")
    ema.update()
    good = ema.state_dict()
    monkeypatch.setattr(offload.ops, "dispatch_update", lambda *a: 1 / 0)
    ema.update()
    with pytest.raises(OffloadWorkerError, match="ZeroDivisionError"):
        ema.synchronize()
    monkeypatch.undo()
    ema.load_state_dict(good)
    assert_same_state(good, ema.state_dict())


def test_worker_stops_when_the_ema_is_dropped() -> None:
    before = {t for t in threading.enumerate() if t.name == "sema-offload"}
    model = big_model(14)
    ema = sema.SwitchEMA(model, switch_every=None, ema_device="cpu")
    ema.update()
    ema.synchronize()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ema.attach(opt)  # the hook holds the EMA weakly
    (worker,) = {t for t in threading.enumerate() if t.name == "sema-offload"} - before
    del ema
    gc.collect()
    worker.join(10)
    assert not worker.is_alive()
    model[0].weight.grad = torch.zeros_like(model[0].weight)
    opt.step()  # the hook of a dropped EMA does nothing


def test_attach_returns_a_removable_handle() -> None:
    model = Net()
    ema = sema.SwitchEMA(model, switch_every=None, ema_device="cpu")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    handle = ema.attach(opt)
    assert len(opt._optimizer_step_pre_hooks) == 1
    handle.remove()
    assert not opt._optimizer_step_pre_hooks
    with pytest.raises(TypeError, match=r"torch\.optim\.Optimizer"):
        ema.attach(model)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"ema_device": "meta"}, ValueError, "host only"),
        ({"ema_device": "cuda"}, ValueError, "host only"),
        ({"ema_device": "not-a-device"}, ValueError, "not a device"),
        ({"ema_device": "cpu", "flatten": False}, ValueError, "flat buckets"),
        ({"ema_device": "cpu", "offload_chunk_elements": 0}, ValueError, "positive int"),
        ({"offload_chunk_elements": True}, ValueError, "positive int"),
        ({"offload_staging_chunks": -1}, ValueError, "non-negative int"),
        ({"overlap": 1}, TypeError, "overlap must be True or False"),
        ({"ema_device": "cpu", "offload_threads": 0}, ValueError, "positive int"),
        ({"ema_device": "cpu", "offload_threads": True}, ValueError, "positive int"),
        ({"offload_threads": 2}, ValueError, "no worker without ema_device='cpu'"),
    ],
)
def test_bad_offload_arguments_leave_the_model_untouched(kwargs: dict, error: type, match: str) -> None:
    model = Net()
    before = [(p.data_ptr(), p.detach().clone()) for p in model.parameters()]
    with pytest.raises(error, match=match):
        sema.SwitchEMA(model, **kwargs)
    for (ptr, value), p in zip(before, model.parameters(), strict=True):
        assert p.data_ptr() == ptr and torch.equal(p, value)


@pytest.mark.parametrize("ring", [1, 3, 1000], ids=lambda r: f"ring{r}")
def test_staging_ring_sizes_give_the_same_ema(ring: int) -> None:
    sync_model, off_model = twins(ring)
    sync = sema.SwitchEMA(sync_model, decay=(0.9, 0.99), switch_every=None)
    off = sema.SwitchEMA(
        off_model,
        decay=(0.9, 0.99),
        switch_every=None,
        ema_device="cpu",
        offload_chunk_elements=97,
        offload_staging_chunks=ring,
    )
    chunks = len(off._engine.tasks)
    assert off.staging_bytes == min(ring, chunks) * 97 * 4
    train([(sync_model, sync), (off_model, off)], 10, seed=ring, dtype=torch.float32)
    assert_same_state(sync.state_dict(), off.state_dict())


def test_a_ring_holding_every_chunk_frees_the_params_before_the_update_ends(monkeypatch: pytest.MonkeyPatch) -> None:
    model, reference = big_model(15), big_model(15)
    ref = sema.SwitchEMA(reference, decay=0.5, switch_every=None)
    ema = sema.SwitchEMA(
        model, decay=0.5, switch_every=None, ema_device="cpu", offload_chunk_elements=5000, offload_staging_chunks=64
    )
    ref.update()
    gate = Gate(monkeypatch, hold_at=1)  # the worker holds before its first chunk update
    ema.update()
    assert gate.reached.wait(30)
    ema.wait()  # returns while the update is held: every chunk is staged already
    with torch.no_grad():
        for p in model.parameters():
            p.sub_(100.0)
    gate.release.set()
    assert_same_state(ref.state_dict(), ema.state_dict())


@pytest.mark.parametrize("decay", [0.9, (0.9, 0.99)], ids=["one", "two"])
def test_updates_in_pieces_equal_one_launch(decay: float | tuple) -> None:
    """overlap=True splits each bucket's launch into pieces (sema.offload.OVERLAP_PIECE_ELEMENTS);
    on the CPU the same storage op is checked with a small piece, including a fused switch."""
    a, b = big_model(16), big_model(16)
    whole = sema.SwitchEMA(a, decay=decay, switch_every=None, copy_only=["1.bias"])
    pieces = sema.SwitchEMA(b, decay=decay, switch_every=None, copy_only=["1.bias"])
    for step in range(6):
        with torch.no_grad():
            for p, q in zip(a.parameters(), b.parameters(), strict=True):
                noise = torch.randn_like(p)
                p.add_(noise)
                q.add_(noise)
        switch = step == 4
        weights = {torch.device("cpu"): whole._weights(whole._steps[torch.device("cpu")], None)}
        whole.storage.update_(weights, switch)
        pieces.storage.update_(weights, switch, piece=1000)
    assert_same_state(whole.state_dict(), pieces.state_dict())
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q)


# --- found in review -------------------------------------------------------------------------------


def test_exit_with_an_update_in_flight_is_clean(tmp_path) -> None:
    """The worker is joined at exit: a daemon thread killed inside a kernel aborts the process."""
    script = tmp_path / "exit_mid_update.py"
    script.write_text(
        "import torch, sema\n"
        "from torch import nn\n"
        "model = nn.Sequential(*[nn.Linear(1024, 1024) for _ in range(8)])\n"
        "ema = sema.SwitchEMA(model, switch_every=None, ema_device='cpu')\n"
        "ema.update()\n"
        "ema.update()\n"
    )
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


def test_an_interrupted_hand_over_leaves_nothing_in_flight(monkeypatch: pytest.MonkeyPatch) -> None:
    model = big_model(18)
    ema = sema.SwitchEMA(model, decay=0.9, switch_every=None, ema_device="cpu")
    ema.update()
    good = ema.state_dict()

    class Interrupting:
        def put(self, job: object) -> None:
            raise KeyboardInterrupt

    real = ema._engine._jobs
    monkeypatch.setattr(ema._engine, "_jobs", Interrupting())
    with pytest.raises(KeyboardInterrupt):
        ema.update()
    monkeypatch.setattr(ema._engine, "_jobs", real)
    done = threading.Event()
    threading.Thread(target=lambda: (ema.synchronize(), done.set()), daemon=True).start()
    assert done.wait(10), "synchronize() hangs after an interrupted update()"
    assert_same_state(good, ema.state_dict())  # neither the EMA nor the counters took the failed update


def test_a_write_racing_the_worker_warns(monkeypatch: pytest.MonkeyPatch) -> None:
    model = big_model(19)
    ema = sema.SwitchEMA(model, decay=0.5, switch_every=None, ema_device="cpu")
    gate = Gate(monkeypatch, hold_at=1)
    ema.update()
    assert gate.reached.wait(30)
    with torch.no_grad():
        model[0].weight.add_(1.0)  # no wait(): races the worker's read
    gate.release.set()
    with pytest.warns(OffloadRaceWarning, match="ema.wait"):
        ema.synchronize()
    with warnings.catch_warnings():
        warnings.simplefilter("error", OffloadRaceWarning)
        ema.update()
        ema.wait()
        with torch.no_grad():
            model[0].weight.add_(1.0)  # after wait(): no warning
        ema.synchronize()


def test_another_ema_of_the_params_waits_before_writing_them(monkeypatch: pytest.MonkeyPatch) -> None:
    model, reference = big_model(20), big_model(20)
    ref = sema.SwitchEMA(reference, decay=0.5, switch_every=None)
    offloaded = sema.SwitchEMA(model, decay=0.5, switch_every=None, ema_device="cpu")
    other = sema.SwitchEMA(model, decay=0.9, switch_every=None)  # shares the buckets
    with torch.no_grad():
        for p, q in zip(model.parameters(), reference.parameters(), strict=True):
            noise = torch.randn_like(p)
            p.add_(noise)
            q.add_(noise)
        for _, _, e in other.storage.named_emas():
            e.fill_(7.0)  # what other.switch() writes into the params
    ref.update()
    gate = Gate(monkeypatch, hold_at=1)
    offloaded.update()
    assert gate.reached.wait(30)
    switched = threading.Event()
    threading.Thread(target=lambda: (other.switch(), switched.set()), daemon=True).start()
    assert not switched.wait(0.3), "the other SwitchEMA wrote the params while the offload worker read them"
    gate.release.set()
    assert switched.wait(30)
    assert_same_state(ref.state_dict(), offloaded.state_dict())
    assert all(bool((p == 7.0).all()) for p in model.parameters())


def test_offload_refuses_params_another_ema_holds_with_others() -> None:
    model = big_model(21)
    first = sema.SwitchEMA(model, switch_every=None)  # one bucket over both layers, kept alive
    before = [(p.data_ptr(), p.detach().clone()) for p in model.parameters()]
    with pytest.raises(ValueError, match="flat buckets only"):
        sema.SwitchEMA(model, switch_every=None, ema_device="cpu", include=["0.*"])
    for (ptr, value), p in zip(before, model.parameters(), strict=True):
        assert p.data_ptr() == ptr and torch.equal(p, value)
    assert first.buckets[0].params[0] is model[0].weight


def test_the_overlap_engine_without_cuda_devices_runs_inline() -> None:
    """OverlapEngine is only built for CUDA params; with none it runs the storage op inline, which
    lets its bookkeeping (reset, load_state_dict, switch) run here."""
    a, b = twins(22)
    plain = sema.SwitchEMA(a, decay=0.9, switch_every=3, buffers="copy")
    over = sema.SwitchEMA(b, decay=0.9, switch_every=3, buffers="copy")
    over._engine = offload.OverlapEngine(over.storage)
    train([(a, plain), (b, over)], 10, seed=22, dtype=torch.float32)
    assert_same_state(plain.state_dict(), over.state_dict())
    over.load_state_dict(plain.state_dict())
    over.reset()
    plain.reset()
    assert_same_state(plain.state_dict(), over.state_dict())


def test_averaged_state_dict_of_an_offloaded_ema_is_on_the_host() -> None:
    model = Net()
    ema = sema.SwitchEMA(model, switch_every=None, buffers="copy", ema_device="cpu")
    ema.update()
    out = ema.averaged_state_dict()
    assert out.keys() == model.state_dict().keys()
    assert all(t.device.type == "cpu" for t in out.values())


def test_a_failed_engine_leaves_the_params_where_they_were(monkeypatch: pytest.MonkeyPatch) -> None:
    # The engine is built once the storage has re-pointed the params (its tasks are views of the
    # buckets): a failure there (a pinned allocation, a thread) must leave the model as it was.
    model = Net()
    model.tied = nn.Linear(24, 40)
    model.tied.weight = nn.Parameter(model.fc1.weight.data)  # an old-style tie: two Parameters, one memory
    before = [(p.data_ptr(), p.detach().clone()) for p in model.parameters()]

    def failing(self: offload.OffloadEngine, *args: object) -> None:
        raise MemoryError("injected: no pinned memory")

    monkeypatch.setattr(offload.OffloadEngine, "__init__", failing)
    with pytest.raises(MemoryError, match="injected"):
        sema.SwitchEMA(model, ema_device="cpu", offload_staging_chunks=2)
    monkeypatch.undo()
    for p, (ptr, value) in zip(model.parameters(), before, strict=True):
        assert p.data_ptr() == ptr, "a param was left in a bucket of the failed SwitchEMA"
        assert torch.equal(p, value)
    assert model.tied.weight.data_ptr() == model.fc1.weight.data_ptr(), "the tie was broken"
    ema = sema.SwitchEMA(model, decay=0.5, switch_every=None, ema_device="cpu")  # and it builds afterwards
    ema.update()
    ema.synchronize()
    assert torch.equal(ema.averaged_state_dict()["fc1.weight"], before[0][1])


def test_the_worker_starts_after_the_update_is_counted(monkeypatch: pytest.MonkeyPatch) -> None:
    # The job is queued last in update() (the worker's threads would slow down whatever the
    # training thread still did after it), and the host step counter is the worker's: it computes
    # the weights from it and counts the update once done, so update() runs no torch op.
    model = big_model(21)
    ema = sema.SwitchEMA(model, decay=0.9, switch_every=None, ema_device="cpu")
    seen = []
    real = ema._engine._jobs

    class Recording:
        def put(self, job: object) -> None:
            seen.append((ema._updates_seen, int(ema._engine.step)))
            real.put(job)

        def get(self) -> object:
            return real.get()

    monkeypatch.setattr(ema._engine, "_jobs", Recording())
    for _ in range(3):
        ema.update()
    assert ema.step == 3  # waits for the worker's count
    assert seen == [(1, 0), (2, 1), (3, 2)]


@pytest.mark.parametrize("cap", [None, 1], ids=["uncapped", "offload_threads1"])
def test_offload_threads_caps_the_workers_kernels(monkeypatch: pytest.MonkeyPatch, cap: int | None) -> None:
    # all_threads(): every parallel call takes the most threads it may, so the count is the cap's.
    from sema import _ext_cpu
    from sema.cpu_threads import PLANNER

    seen = []
    real = _ext_cpu._C

    class Recording:
        def __getattr__(self, name: str) -> object:
            return getattr(real, name)

        def cpu_ema_update(self, *args: object) -> None:
            seen.append((threading.current_thread().name, args[-1]))
            real.cpu_ema_update(*args)

    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        monkeypatch.setattr(_ext_cpu, "_C", Recording())
        model = nn.Sequential(nn.Linear(512, 512), nn.Linear(512, 512))  # 2 MiB of fp32 params: parallel work
        ema = sema.SwitchEMA(model, decay=0.9, switch_every=None, ema_device="cpu", offload_threads=cap)
        with PLANNER.all_threads():
            for _ in range(3):
                ema.update()
            ema.synchronize()
    finally:
        torch.set_num_threads(previous)
    assert seen and all(name == "sema-offload" for name, _ in seen), seen
    assert {threads for _, threads in seen} == {2 if cap is None else cap}, seen
